"""What a CoRa checkpoint's metadata may say, checked field by field (no file access here).

A layer description (``layers``), the architecture, the preprocessing and evaluation records and the
decoded metadata as a whole: each ``*_problem`` function says in one line why a value is not what
:func:`cora.save` writes (None: it is), and :func:`build_layer` makes the fresh layer a description
stands for. :class:`CheckpointError` is the one error of a checkpoint that cannot be used.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch.nn as nn

from .modules import CoRaConv2d, QuantLinear

__all__ = ["CheckpointError", "layer_spec", "spec_problem", "build_layer", "geometry_problem", "check_decoded",
           "evaluation_problem", "preprocessing_problem", "check_architecture", "ADAPTER_DTYPES"]

_PREPROCESSING_KEYS = frozenset({"image_size", "resize_size", "mean", "std", "class_names"})
ADAPTER_DTYPES = ("float16", "bfloat16", "float32", "int8")
_CONV_KEYS = frozenset({"type", "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "bias",
                        "padding_mode", "bits", "rank", "adapter_dtype"})
_LINEAR_KEYS = frozenset({"type", "in_features", "out_features", "bias", "bits", "rank", "adapter_dtype"})
_OLD_LINEAR_KEYS = frozenset({"type", "in_features", "out_features", "bias", "bits"})  # before linear adapters


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: not a CoRa file, damaged, wrong version or wrong model."""


def layer_spec(mod: nn.Module) -> dict:
    if isinstance(mod, CoRaConv2d):
        return dict(
            type="CoRaConv2d",
            in_channels=mod.in_channels,
            out_channels=mod.out_channels,
            kernel_size=list(mod.kernel_size),
            stride=list(mod.stride),
            padding=mod.padding if isinstance(mod.padding, str) else list(mod.padding),
            dilation=list(mod.dilation),
            groups=mod.groups,
            bias=mod.bias is not None,
            padding_mode=mod.padding_mode,
            bits=mod.bits,
            rank=mod.rank,
            adapter_dtype=str(mod.adapter_a.dtype).replace("torch.", ""),
        )
    return dict(
        type="QuantLinear", in_features=mod.in_features, out_features=mod.out_features, bias=mod.bias is not None, bits=mod.bits,
        rank=mod.rank, adapter_dtype=str(mod.adapter_a.dtype).replace("torch.", ""),
    )


def is_int(v, lo: int) -> bool:
    return type(v) is int and v >= lo  # type(): a JSON true is not a channel count


def _is_pair(v, lo: int) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(is_int(x, lo) for x in v)


def spec_problem(spec) -> str | None:
    """Why ``spec`` is not a layer description save could have written (None: it is one)."""
    if not isinstance(spec, dict):
        return f"expected a JSON object, got {type(spec).__name__}"
    kind = spec.get("type")
    keys = {"CoRaConv2d": _CONV_KEYS, "QuantLinear": _LINEAR_KEYS}.get(kind) if isinstance(kind, str) else None
    if keys is None:
        return f"unknown layer type {kind!r}"
    if kind == "QuantLinear" and set(spec) == _OLD_LINEAR_KEYS:
        keys = _OLD_LINEAR_KEYS
    if set(spec) != keys:
        missing, unknown = sorted(keys - set(spec)), sorted(set(spec) - keys)
        return "fields " + ", ".join(p for p in (missing and f"missing {missing}", unknown and f"unknown {unknown}") if p)
    if not isinstance(spec["bias"], bool) or not is_int(spec["bits"], 1):
        return "bias must be true/false and bits a positive integer"
    if kind == "QuantLinear":
        ok = is_int(spec["in_features"], 1) and is_int(spec["out_features"], 1)
        if ok and "rank" in spec:
            ok = is_int(spec["rank"], 0) and spec["adapter_dtype"] in ADAPTER_DTYPES
        return None if ok else "in/out features must be positive integers, the rank >= 0 and the adapter dtype known"
    ok = (
        all(is_int(spec[k], 1) for k in ("in_channels", "out_channels", "groups"))
        and is_int(spec["rank"], 0)
        and all(_is_pair(spec[k], 1) for k in ("kernel_size", "stride", "dilation"))
        and (spec["padding"] in ("same", "valid") or _is_pair(spec["padding"], 0))
        and isinstance(spec["padding_mode"], str)
        and spec["adapter_dtype"] in ADAPTER_DTYPES
    )
    return None if ok else "a geometry field, the rank or the adapter dtype has an invalid value"


def build_layer(name: str, spec) -> nn.Module:
    """A fresh layer from its recorded description; :class:`CheckpointError` for anything save would not write."""
    problem = spec_problem(spec)
    if problem is None:
        args = {k: v for k, v in spec.items() if k != "type"}
        try:
            return CoRaConv2d(**args) if spec["type"] == "CoRaConv2d" else QuantLinear(**args)
        except Exception as exc:  # the constructors check divisibility, ranks, bits, padding modes
            problem = f"{type(exc).__name__}: {exc}"
    raise CheckpointError(f"bad layer description for {name!r}: {problem}")


def _as_tuple(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


def geometry_problem(old: nn.Module, new: nn.Module) -> str | None:
    """Why ``new`` (from the checkpoint) cannot stand in for the model's ``old`` layer (None: it can)."""
    if isinstance(new, CoRaConv2d):
        if not isinstance(old, (nn.Conv2d, CoRaConv2d)):
            return f"is a {type(old).__name__} in the model, a conv in the checkpoint"
        fields = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")
    else:
        if not isinstance(old, (nn.Linear, QuantLinear)):
            return f"is a {type(old).__name__} in the model, a linear layer in the checkpoint"
        fields = ("in_features", "out_features")
    diffs = [f"{f} {_as_tuple(getattr(old, f))} vs {_as_tuple(getattr(new, f))}" for f in fields
             if _as_tuple(getattr(old, f)) != _as_tuple(getattr(new, f))]
    if (old.bias is not None) != (new.bias is not None):
        diffs.append(f"bias {old.bias is not None} vs {new.bias is not None}")
    return f"model vs checkpoint: {', '.join(diffs)}" if diffs else None


def check_decoded(path: Path, meta: dict) -> None:
    layers, arch, report, smeta = meta["layers"], meta["architecture"], meta["report"], meta["state_metadata"]
    if not isinstance(layers, dict) or not layers:
        raise CheckpointError(f"{path}: checkpoint lists no quantized layers")
    if arch is not None and not (
        isinstance(arch, dict) and isinstance(arch.get("name"), str) and set(arch) <= {"name", "kwargs"}
        and isinstance(arch.get("kwargs", {}), dict)
    ):
        raise CheckpointError(f"{path}: architecture must be null or {{\"name\": str, \"kwargs\": {{...}}}}, got {arch!r}")
    if report is not None and not isinstance(report, dict):
        raise CheckpointError(f"{path}: report must be null or a JSON object")
    if smeta is not None and not (isinstance(smeta, dict) and all(isinstance(v, dict) for v in smeta.values())):
        raise CheckpointError(f"{path}: state_metadata must be a JSON object of objects")
    problem = preprocessing_problem(meta["preprocessing"])
    if problem is not None:
        raise CheckpointError(f"{path}: preprocessing {problem}")
    problem = evaluation_problem(meta["evaluation"])
    if problem is not None:
        raise CheckpointError(f"{path}: evaluation {problem}")


def evaluation_problem(ev) -> str | None:
    """Why ``ev`` is not an evaluation record: null, or an object of numbers, strings and nulls."""
    if ev is None:
        return None
    if not isinstance(ev, dict) or not all(
            v is None or isinstance(v, str) or (type(v) in (int, float) and math.isfinite(v)) for v in ev.values()):
        return "must be null or an object of finite numbers, strings and nulls"
    return None


def _is_number(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def preprocessing_problem(pre) -> str | None:
    """Why ``pre`` is not a preprocessing record (None: it is one, or it is None). A record is
    ``{"image_size": int >= 1, "resize_size": int >= image_size, "mean": [3 finite numbers], "std":
    [3 finite numbers > 0], "class_names": null or a list of strings}``."""
    if pre is None:
        return None
    if not isinstance(pre, dict) or set(pre) != _PREPROCESSING_KEYS:
        return f"must be null or an object with exactly the fields {sorted(_PREPROCESSING_KEYS)}"
    if not (is_int(pre["image_size"], 1) and is_int(pre["resize_size"], pre["image_size"])):
        return "image_size must be a positive integer and resize_size an integer >= image_size"
    for k in ("mean", "std"):
        v = pre[k]
        if not (isinstance(v, list) and len(v) == 3 and all(_is_number(x) for x in v)):
            return f"{k} must be 3 finite numbers (RGB)"
    if not all(x > 0 for x in pre["std"]):
        return "std must be positive"
    names = pre["class_names"]
    if names is not None and not (isinstance(names, list) and names and all(isinstance(c, str) for c in names)):
        return "class_names must be null or a non-empty list of strings"
    return None


def check_architecture(arch) -> None:
    if arch is None:
        return
    if not (isinstance(arch, dict) and isinstance(arch.get("name"), str) and set(arch) <= {"name", "kwargs"}
            and isinstance(arch.get("kwargs", {}), dict)):
        raise ValueError(f"architecture must be None or {{'name': str, 'kwargs': dict}}, got {arch!r}")
