"""End-to-end runs shared by the command line and ``bench/accuracy.py``: load, convert, evaluate."""
from __future__ import annotations

import json
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
    "evaluate_model",
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
    """The plain RTN baseline next to a config: round to nearest, min-max ranges, same granularity, no adapters
    and no tuning (without it, a label-free config at 3 bits or less would fit the BatchNorms block by block)."""
    if config.quantizer.range_method == "std":  # the paper's quantizer keeps its own ranges
        return config.replace(method="none", rounding="nearest", tune_iterations=0)
    return config.replace(method="none", rounding="nearest", range_method="minmax", tune_iterations=0)


def evaluate_model(model: nn.Module, evalset, device: torch.device) -> float:
    """Top-1 accuracy in percent of ``model`` on ``evalset``, the fast way, with the same result.

    A converted model on the CPU runs as it serves there: deployed with dense weights (one ``F.conv2d``
    per conv on its effective weight, BatchNorm folded, :func:`cora.deploy`) instead of unpacking its
    codes on every call. Batches go in channels-last where the model computes the same on them
    (:func:`cora.layout.preferred_layout`). Accuracies equal the reference forward's up to float
    summation order (an image whose top two logits tie that closely can flip).
    """
    from ..deploy import deploy
    from ..modules import CoRaConv2d
    from ..layout import preferred_layout
    from .data import evaluate

    run = model
    if device.type == "cpu" and any(isinstance(m, CoRaConv2d) for m in model.modules()):
        run = deploy(model, weights="dense")
    layout = torch.contiguous_format
    images = getattr(evalset, "images", None)
    if isinstance(images, torch.Tensor) and len(images) >= 2:
        layout = preferred_layout(run.eval(), images[:2].to(device))
    return evaluate(run, evalset, device=device, memory_format=layout)


def _cached(kind: str, model: nn.Module, evalset, extra: dict, use_cache: bool, compute) -> tuple[dict, bool]:
    """``compute()``'s dict, or the one stored for the same ``kind``, model and data (:mod:`.eval_cache`);
    returns ``(value, from the cache)``. Data sets not held as tensors are never cached."""
    from . import eval_cache

    images, labels = getattr(evalset, "images", None), getattr(evalset, "labels", None)
    if not (use_cache and isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor)):
        return compute(), False
    key = eval_cache.cache_key(kind, model, {"eval_images": images, "eval_labels": labels, **extra})
    hit = eval_cache.lookup(key)
    if hit is not None:
        return hit, True
    value = compute()
    eval_cache.store(key, value)
    return value, False


def _baselines(out: dict, clock: dict, model: nn.Module, calib, images: torch.Tensor, config: CoRaConfig, evalset,
               device: torch.device, with_float: bool, with_rtn: bool, eval_cache: bool) -> None:
    """The float and RTN accuracies (cached or measured) into ``out``, their wall seconds into ``clock``."""
    if with_float:
        t = time.perf_counter()
        value, hit = _cached("float", model, evalset, {}, eval_cache,
                             lambda: {"float_acc": evaluate_model(model, evalset, device)})
        out.update(value)
        out["cached"] += ["float"] if hit else []
        clock["float"] = time.perf_counter() - t
    if with_rtn:
        t = time.perf_counter()
        rtn_config = baseline_config(config).replace(progress=False)

        def rtn_result() -> dict:
            start = time.perf_counter()
            rtn = convert(model, calib, rtn_config)
            seconds = time.perf_counter() - start
            return {"rtn_seconds": seconds, "rtn_acc": evaluate_model(rtn, evalset, device),
                    "rtn_equiv_bits": rtn.cora_report.equiv_bits}

        kind = "rtn " + json.dumps(rtn_config.replace(progress=True).to_dict(), sort_keys=True, default=str)
        value, hit = _cached(kind, model, evalset, {"calib_images": images}, eval_cache, rtn_result)
        out.update(value)
        out["cached"] += ["rtn"] if hit else []
        clock["rtn"] = time.perf_counter() - t


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
    eval_cache: bool = False,
) -> tuple[nn.Module, dict]:
    """Convert ``name`` with ``config`` and evaluate float, RTN and the result; returns (model, results).

    Accuracies are top-1 in percent on ``eval_split`` ("test", or "holdout" — the calibration images
    not used for this calibration, which is where defaults are chosen), at most ``eval_limit`` images
    of it (see :func:`evaluation_data`); ``results["eval_images"]`` is how many. Every input is
    checked (model, weights, data, config against the model) before the first evaluation or conversion.
    Everything runs on ``device`` (the conversion included); the returned model is on it.
    ``labels=False``: the conversion gets the calibration images only, as a user without labels
    would calibrate (the labels still score the evaluation). ``eval_cache``: take the float and RTN
    results from the cache of :mod:`cora.experiments.eval_cache` when the same model and data were
    measured before (``results["cached"]`` lists them), and record new ones there.
    ``results["seconds"]``: wall seconds of each part (load, float, rtn, convert and its phases, eval).
    """
    clock: dict[str, float] = {}
    t = time.perf_counter()
    device = torch.device(device)
    model = load_float_model(name, weights, shared).to(device)
    check_conversion(model, config, labels=labels)
    images, calib_labels = calibration_data(name, config.calib_images, shared, data_dir)
    calib = (images.to(device), calib_labels.to(device)) if labels else images.to(device)
    evalset = evaluation_data(name, shared, data_dir, eval_split, calib_images=config.calib_images, limit=eval_limit)
    clock["load"] = time.perf_counter() - t
    out: dict = {"model": name, "bits": config.bits, "method": config.method, "budget": config.budget, "eval_split": eval_split,
                 "device": device.type, "labels": labels, "cached": []}
    out["eval_images"] = len(evalset)
    _baselines(out, clock, model, calib, images, config, evalset, device, with_float, with_rtn, eval_cache)
    t = time.perf_counter()
    qmodel = convert(model, calib, config)
    out["quantize_seconds"] = clock["convert"] = time.perf_counter() - t
    rep = qmodel.cora_report
    qmodel.cora_architecture = model.cora_architecture
    t = time.perf_counter()
    out["acc"] = evaluate_model(qmodel, evalset, device)
    clock["eval"] = time.perf_counter() - t
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
        seconds={**clock, "phases": dict(rep.phase_seconds)},
    )
    return qmodel, out
