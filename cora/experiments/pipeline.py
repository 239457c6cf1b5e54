"""End-to-end runs shared by the command line and ``bench/accuracy.py``: load, convert, evaluate."""
from __future__ import annotations

import time

import torch
import torch.nn as nn

from ..config import CoRaConfig
from ..convert import convert

__all__ = ["load_float_model", "calibration_data", "evaluation_data", "baseline_config", "quantize_and_evaluate"]


def load_float_model(name: str, weights=None, shared=None) -> nn.Module:
    """The float model by name (``cifar_resnet{6n+2}`` from the shared checkpoints, or torchvision)."""
    from .models import build_model

    model = build_model(name, weights=weights, shared=shared)
    model.cora_architecture = {"name": name}
    return model.eval()


def _is_cifar(name: str) -> bool:
    return name.startswith("cifar_")


def calibration_data(name: str, n: int, shared=None, data_dir=None):
    """``(images, labels)`` for calibration: the class-balanced CIFAR-10 search split, or a folder."""
    from .data import cifar10_calibration, image_folder
    from .models import model_input_spec

    if _is_cifar(name):
        ds = cifar10_calibration(n, shared=shared, split="search")
        return ds.images, ds.labels
    if data_dir is None:
        raise ValueError(f"{name} needs an ImageNet-style image folder for calibration: pass --data DIR")
    spec = model_input_spec(name)
    ds = image_folder(data_dir, image_size=spec["image_size"], mean=spec["mean"], std=spec["std"])
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(ds), generator=g)[:n].tolist()
    xs, ys = zip(*(ds[i] for i in idx))
    return torch.stack(xs), torch.tensor(ys)


def evaluation_data(name: str, shared=None, data_dir=None, split: str = "test"):
    """The evaluation set: CIFAR-10 test (or the held-out calibration images) or an image folder."""
    from .data import cifar10_calibration, cifar10_test, image_folder
    from .models import model_input_spec

    if _is_cifar(name):
        return cifar10_test(shared=shared) if split == "test" else cifar10_calibration(1600, shared=shared, split="holdout")
    if data_dir is None:
        raise ValueError(f"{name} needs an ImageNet-style image folder for evaluation: pass --data DIR")
    spec = model_input_spec(name)
    return image_folder(data_dir, image_size=spec["image_size"], mean=spec["mean"], std=spec["std"])


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
    with_float: bool = True,
    with_rtn: bool = True,
) -> tuple[nn.Module, dict]:
    """Convert ``name`` with ``config`` and evaluate float, RTN and the result; returns (model, results).

    Accuracies are top-1 in percent on ``eval_split`` ("test", or "holdout" — the calibration images
    held back from the search, which is where defaults are chosen).
    """
    from .data import evaluate

    model = load_float_model(name, weights, shared)
    calib = calibration_data(name, config.calib_images, shared, data_dir)
    evalset = evaluation_data(name, shared, data_dir, eval_split)
    out: dict = {"model": name, "bits": config.bits, "method": config.method, "budget": config.budget, "eval_split": eval_split}
    out["eval_images"] = len(evalset)
    if with_float:
        out["float_acc"] = evaluate(model, evalset)
    if with_rtn:
        t = time.perf_counter()
        rtn = convert(model, calib, baseline_config(config).replace(progress=False))
        out["rtn_seconds"] = time.perf_counter() - t
        out["rtn_acc"] = evaluate(rtn, evalset)
        out["rtn_equiv_bits"] = rtn.cora_report.equiv_bits
        del rtn
    t = time.perf_counter()
    qmodel = convert(model, calib, config)
    out["quantize_seconds"] = time.perf_counter() - t
    rep = qmodel.cora_report
    qmodel.cora_architecture = model.cora_architecture
    out["acc"] = evaluate(qmodel, evalset)
    out.update(
        method=rep.method,  # "auto" resolved
        loss=rep.config["search"]["loss"],
        adapter_fraction=rep.adapter_fraction,
        equiv_bits=rep.equiv_bits,
        iterations=rep.iterations,
        calib_images=rep.calib_images,
        search_seconds=rep.search_seconds,
        tune_loss=rep.tune_loss,
        tune_iterations=rep.tune_iterations,
        tune_seconds=rep.tune_seconds,
        ranks=rep.ranks,
        seed=config.seed,
    )
    return qmodel, out
