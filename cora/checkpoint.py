"""Saved CoRa models: safetensors tensors plus JSON metadata, never pickle.

A checkpoint holds every tensor of the converted model's ``state_dict`` (packed codes, scales, zero
points, adapters, BatchNorm statistics, the float layers), and string metadata:

* ``cora_format`` / ``cora_format_version``: what the file is and which layout it uses;
* ``architecture``: JSON ``{"name": ..., "kwargs": {...}}`` from which :func:`cora.experiments.models.build_model`
  rebuilds the float skeleton (CIFAR ResNets, torchvision models), or ``null`` when the caller must
  pass the model;
* ``layers``: JSON, for each quantized layer, its type and constructor arguments (bits, rank, ...);
* ``config`` and ``report``: the conversion settings and results (for the record);
* ``tensor_sha256``: a digest of all tensor bytes, so that a tampered or damaged file is rejected.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from cora_kernels.packing import PACK_FORMAT_VERSION

from ._modules_util import set_submodule
from .modules import MODULE_FORMAT_VERSION, CoRaConv2d, QuantLinear

__all__ = ["save", "load", "CheckpointError", "CHECKPOINT_FORMAT_VERSION"]

CHECKPOINT_FORMAT_VERSION = 1
_FORMAT = "cora-checkpoint"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: not a CoRa file, damaged, wrong version or wrong model."""


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        # reshape: 0-dim tensors (num_batches_tracked) cannot be viewed as bytes
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _layer_spec(mod: nn.Module) -> dict:
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
        type="QuantLinear", in_features=mod.in_features, out_features=mod.out_features, bias=mod.bias is not None, bits=mod.bits
    )


def _build_layer(spec: dict) -> nn.Module:
    spec = dict(spec)
    kind = spec.pop("type")
    if kind == "CoRaConv2d":
        return CoRaConv2d(**spec)
    if kind == "QuantLinear":
        return QuantLinear(**spec)
    raise CheckpointError(f"unknown layer type {kind!r} in checkpoint")


def save(model: nn.Module, path: str | os.PathLike, *, architecture: dict | None = None) -> Path:
    """Write ``model`` (converted by :func:`cora.convert`) to ``path`` as safetensors + metadata.

    ``architecture``: ``{"name": "cifar_resnet20"}`` (or any :func:`cora.experiments.models.build_model` name, with
    optional ``"kwargs"``) so that :func:`load` can rebuild the model alone; defaults to
    ``model.cora_architecture`` if set.
    """
    from safetensors.torch import save_file

    layers = {n: _layer_spec(m) for n, m in model.named_modules() if isinstance(m, (CoRaConv2d, QuantLinear))}
    if not layers:
        raise ValueError("the model has no CoRa layers; convert it first")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    arch = architecture if architecture is not None else getattr(model, "cora_architecture", None)
    report = getattr(model, "cora_report", None)
    meta = {
        "cora_format": _FORMAT,
        "cora_format_version": str(CHECKPOINT_FORMAT_VERSION),
        "module_format_version": str(MODULE_FORMAT_VERSION),
        "pack_format_version": str(PACK_FORMAT_VERSION),
        "architecture": json.dumps(arch),
        "layers": json.dumps(layers),
        "config": json.dumps(report.config if report is not None else None),
        "report": json.dumps(report.to_dict() if report is not None else None),
        "tensor_sha256": _digest(tensors),
    }
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)  # never leave a half-written checkpoint under the real name
    return path


def read_metadata(path: str | os.PathLike) -> dict:
    """The checkpoint's metadata (JSON fields decoded); raises :class:`CheckpointError` on a bad file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({exc.__class__.__name__}: {exc})") from None
    if meta.get("cora_format") != _FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a CoRa checkpoint")
    if meta.get("cora_format_version") != str(CHECKPOINT_FORMAT_VERSION):
        raise CheckpointError(
            f"{path}: checkpoint format version {meta.get('cora_format_version')} is not supported "
            f"(this cora reads version {CHECKPOINT_FORMAT_VERSION})"
        )
    versions = (meta.get("pack_format_version"), meta.get("module_format_version"))
    if versions != (str(PACK_FORMAT_VERSION), str(MODULE_FORMAT_VERSION)):
        raise CheckpointError(f"{path}: packed-weight format {meta.get('pack_format_version')} is not supported")
    out = dict(meta)
    try:
        for key in ("architecture", "layers", "config", "report"):
            out[key] = json.loads(meta.get(key, "null"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: metadata field is not valid JSON ({exc})") from None
    if not isinstance(out["layers"], dict) or not out["layers"]:
        raise CheckpointError(f"{path}: checkpoint lists no quantized layers")
    return out


def load(path: str | os.PathLike, model: nn.Module | None = None, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a saved CoRa model. Returns it in eval mode with ``cora_report`` restored.

    ``model``: the float architecture to fill (its quantized layers are replaced); by default it is
    rebuilt from the name recorded in the file.
    """
    from safetensors.torch import load_file

    meta = read_metadata(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:
        raise CheckpointError(f"{path}: tensor data is damaged or truncated ({exc.__class__.__name__}: {exc})") from None
    if _digest(tensors) != meta.get("tensor_sha256"):
        raise CheckpointError(f"{path}: tensor data does not match its recorded digest (damaged or modified file)")
    if model is None:
        arch = meta["architecture"]
        if not isinstance(arch, dict) or "name" not in arch:
            raise CheckpointError(f"{path} records no architecture; pass the float model: cora.load(path, model)")
        from .experiments.models import build_model

        model = build_model(arch["name"], weights=False, **arch.get("kwargs", {}))
    for name, spec in meta["layers"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{path}: layer {name!r} of the checkpoint does not exist in the model") from None
        if not isinstance(old, (nn.Conv2d, nn.Linear, CoRaConv2d, QuantLinear)):
            raise CheckpointError(f"{path}: layer {name!r} is a {type(old).__name__} in the model, not a conv/linear")
        try:
            new = _build_layer(spec)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: bad layer description for {name!r}: {exc}") from None
        set_submodule(model, name, new)
        tensors[f"{name}._extra_state" if name else "_extra_state"] = new.get_extra_state()
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: checkpoint does not match the model: {exc}") from None
    report = meta.get("report")
    if report:
        from .convert import ConversionReport

        model.cora_report = ConversionReport(**report)
    model.cora_architecture = meta["architecture"]
    return model.to(map_location).eval()
