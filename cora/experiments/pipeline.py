"""End-to-end runs shared by the command line and ``bench/accuracy.py``: load, convert, evaluate."""
from __future__ import annotations

import time

import torch
import torch.nn as nn

from ..config import CoRaConfig
from ..convert import convert
from ..zoo.registry import load_float_model  # re-exported: the harness's runs start from it

__all__ = [
    "load_float_model",
    "calibration_data",
    "evaluation_data",
    "check_conversion",
    "baseline_config",
    "quantize_and_evaluate",
]


def _is_cifar(name: str) -> bool:
    return name.startswith("cifar_")


def _normalisation(name: str) -> dict:
    """The model's input mean and std, for the CIFAR-10 arrays."""
    from ..zoo.registry import model_input_spec

    spec = model_input_spec(name)
    return {"mean": spec["mean"], "std": spec["std"]}


def _image_folder(name: str, data_dir, what: str):
    from .data import image_folder
    from ..zoo.registry import model_input_spec

    if data_dir is None:
        raise ValueError(f"{name} needs an ImageNet-style image folder for {what}: pass --data DIR")
    spec = model_input_spec(name)
    return image_folder(data_dir, image_size=spec["image_size"], mean=spec["mean"], std=spec["std"])


def calibration_data(name: str, n: int, shared=None, data_dir=None):
    """``(images, labels)`` for calibration: the class-balanced CIFAR-10 search split, or ``n`` images
    of a folder picked by :func:`cora.experiments.data.split_indices` (all of them if it holds fewer)."""
    from .data import cifar10_calibration, split_indices

    if _is_cifar(name):
        try:
            ds = cifar10_calibration(n, shared=shared, split="search", **_normalisation(name))
        except ValueError as e:
            raise ValueError(f"cannot calibrate on {n} CIFAR-10 images (--calib): {e}") from e
        return ds.images, ds.labels
    ds = _image_folder(name, data_dir, "calibration")
    xs, ys = zip(*(ds[i] for i in split_indices(len(ds), n, "search").tolist()))
    return torch.stack(xs), torch.tensor(ys)


SPLITS = ("test", "holdout")


def evaluation_data(name: str, shared=None, data_dir=None, split: str = "test", *, calib_images: int = 1600,
                    limit: int | None = None):
    """The evaluation set.

    CIFAR models: ``split="test"`` is the 10,000 CIFAR-10 test images; ``"holdout"`` the images of
    ``cifar10_calib.npz`` that a calibration on ``calib_images`` images does not use (``5000 -
    calib_images``). Other models: the image folder ``data_dir``, all of it for ``"test"``, and for
    ``"holdout"`` the images that :func:`calibration_data` with ``n = calib_images`` does not pick.
    The held-out split therefore never overlaps the calibration images; when it would be empty this
    raises ``ValueError``. ``limit``: at most that many images, the first of the split, class-balanced
    (:func:`cora.experiments.data.balanced_subset`).
    """
    from torch.utils.data import Subset

    from .data import CALIB_FILE, balanced_subset, cifar10_calibration, cifar10_test, split_indices

    if split not in SPLITS:
        raise ValueError(f"the evaluation split must be one of {', '.join(SPLITS)}, got {split!r}")
    if _is_cifar(name):
        if split == "test":
            ds = cifar10_test(shared=shared, **_normalisation(name))
        else:
            ds = cifar10_calibration(calib_images, shared=shared, split="holdout", **_normalisation(name))
            if len(ds) == 0:
                raise ValueError(
                    f"no held-out images left: the calibration uses all {calib_images} images of {CALIB_FILE}; "
                    f"calibrate on fewer (--calib) or evaluate on the test split (--eval-split test)"
                )
    else:
        ds = _image_folder(name, data_dir, "evaluation")
        if split == "holdout":
            idx = split_indices(len(ds), calib_images, "holdout")
            if len(idx) == 0:
                raise ValueError(
                    f"no held-out images left: the calibration uses all {len(ds)} images of {data_dir} "
                    f"(calibration images: {calib_images}); calibrate on fewer (--calib) or evaluate on the "
                    f"whole folder (--eval-split test)"
                )
            ds = Subset(ds, idx.tolist())
    return balanced_subset(ds, limit)


def check_conversion(model: nn.Module, config: CoRaConfig, *, labels: bool = True) -> None:
    """What :func:`cora.convert` would refuse about the model and config before any work (skip
    patterns that match no layer, nothing left to quantize, ...), raised now as ``ValueError``."""
    from ..convert import quantizable_layers

    quantizable_layers(model, config)
    config.resolved(has_labels=labels)  # e.g. loss="ce" without labels is refused here


def baseline_config(config: CoRaConfig) -> CoRaConfig:
    """The plain RTN baseline next to a config: round to nearest, min-max ranges, same granularity, no adapters."""
    if config.quantizer.range_method == "std":  # the paper's quantizer keeps its own ranges
        return config.replace(method="none", rounding="nearest")
    return config.replace(method="none", rounding="nearest", range_method="minmax")


def quantize_and_evaluate(
    name: str,
    config: CoRaConfig,
    *,
    weights=None,
    shared=None,
    data_dir=None,
    eval_split: str = "test",
    eval_limit: int | None = None,
    with_float: bool = True,
    with_rtn: bool = True,
    device: str | torch.device = "cpu",
    labels: bool = True,
) -> tuple[nn.Module, dict]:
    """Convert ``name`` with ``config`` and evaluate float, RTN and the result; returns (model, results).

    Accuracies are top-1 in percent on ``eval_split`` ("test", or "holdout" — the calibration images
    not used for this calibration, which is where defaults are chosen), at most ``eval_limit`` images
    of it (see :func:`evaluation_data`); ``results["eval_images"]`` is how many. Every input is
    checked (model, weights, data, config against the model) before the first evaluation or conversion.
    Everything runs on ``device`` (the conversion included); the returned model is on it.
    ``labels=False``: the conversion gets the calibration images only, as a user without labels
    would calibrate (the labels still score the evaluation).
    """
    from .data import evaluate

    device = torch.device(device)
    model = load_float_model(name, weights, shared).to(device)
    check_conversion(model, config, labels=labels)
    images, calib_labels = calibration_data(name, config.calib_images, shared, data_dir)
    calib = (images.to(device), calib_labels.to(device)) if labels else images.to(device)
    evalset = evaluation_data(name, shared, data_dir, eval_split, calib_images=config.calib_images, limit=eval_limit)
    out: dict = {"model": name, "bits": config.bits, "method": config.method, "budget": config.budget, "eval_split": eval_split,
                 "device": device.type, "labels": labels}
    out["eval_images"] = len(evalset)
    if with_float:
        out["float_acc"] = evaluate(model, evalset, device=device)
    if with_rtn:
        t = time.perf_counter()
        rtn = convert(model, calib, baseline_config(config).replace(progress=False))
        out["rtn_seconds"] = time.perf_counter() - t
        out["rtn_acc"] = evaluate(rtn, evalset, device=device)
        out["rtn_equiv_bits"] = rtn.cora_report.equiv_bits
        del rtn
    t = time.perf_counter()
    qmodel = convert(model, calib, config)
    out["quantize_seconds"] = time.perf_counter() - t
    rep = qmodel.cora_report
    qmodel.cora_architecture = model.cora_architecture
    out["acc"] = evaluate(qmodel, evalset, device=device)
    # saved with the checkpoint (cora.save), shown by cora serve: the accuracy measured here
    qmodel.cora_evaluation = {k: out[k] for k in ("acc", "float_acc", "rtn_acc", "eval_split", "eval_images") if k in out}
    out.update(
        method=rep.method,  # "auto" resolved
        loss=rep.config["search"]["loss"],
        adapter_fraction=rep.adapter_fraction,
        equiv_bits=rep.equiv_bits,
        bits_breakdown=rep.bits_breakdown,
        iterations=rep.iterations,
        calib_images=rep.calib_images,
        search_seconds=rep.search_seconds,
        tune_loss=rep.tune_loss,
        tune_iterations=rep.tune_iterations,
        tune_seconds=rep.tune_seconds,
        tune_norms=rep.tune_norms,
        ranks=rep.ranks,
        seed=config.seed,
    )
    return qmodel, out
