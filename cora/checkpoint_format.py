"""The CoRa checkpoint file: one safetensors file, checked as a whole on reading, never pickle.

A checkpoint (format version 2) holds every tensor of the converted model's ``state_dict`` under
its state-dict name (packed codes int32, scales float16, zero points uint8, adapters (float, or
int8 with their float32 ``adapter_a_scale``/``adapter_b_scale``), biases float32, BatchNorm
statistics, the float layers), and string metadata:

* ``cora_format`` (``"cora-checkpoint"``), ``cora_format_version`` (``"2"``),
  ``module_format_version`` and ``pack_format_version``: what the file is and which layouts it uses;
* ``architecture``: JSON ``{"name": ..., "kwargs": {...}}`` from which :func:`cora.zoo.build_model`
  rebuilds the float skeleton (CIFAR ResNets, torchvision models), or ``null`` when the caller must
  pass the model;
* ``layers``: JSON, for each quantized layer, its type and constructor arguments (geometry, bits,
  rank, adapter dtype; a ``QuantLinear`` written before linear layers had adapters records neither
  rank nor adapter dtype and loads as rank 0);
* ``state_metadata``: JSON ``{module prefix: {"version": int, ...}}``, the ``state_dict()._metadata``
  that ``load_state_dict`` hands to every module's ``_load_from_state_dict`` (torchvision's MNASNet
  refuses to load without its version, BatchNorm reads its own);
* ``config`` and ``report``: the conversion settings and results (``report`` becomes ``cora_report``);
* ``preprocessing``: JSON ``{"image_size", "resize_size", "mean", "std", "class_names"}``, how an
  encoded image becomes the model's input (what ``cora serve`` needs; see
  :func:`cora.zoo.preprocessing_for`), or ``null``; becomes ``cora_preprocessing``
  (files written before it existed read as ``null``);
* ``evaluation``: JSON, the accuracy measured when the model was quantized (``{"acc": ...,
  "eval_split": ..., "eval_images": ..., ...}``: numbers, strings or null), or ``null``; becomes
  ``cora_evaluation`` (older files: ``null``);
* ``cora_sha256``: SHA-256 of a canonical serialisation of everything else in the file (see
  :func:`digest`): every other metadata key and value exactly as stored, in sorted key order, and
  every tensor's name, dtype, shape and bytes, in sorted name order, each field length-prefixed.

So any change to the file either changes nothing :func:`cora.load` reads (JSON whitespace of the
safetensors header) or makes it raise :class:`CheckpointError`. The digest detects damage, it is
not a signature: whoever can write the file can recompute it.

Version 1 files (digest ``tensor_sha256`` over the tensors only, no ``state_metadata``) are still
read, with a warning that their metadata is not covered; :func:`cora.save` writes version 2.

This module is the file format only: the digest, reading a file into checked metadata and tensors
(:func:`read_checkpoint`), writing one (:func:`write_checkpoint`). What the metadata may say is
:mod:`cora.checkpoint_schema`; loading into a model and saving one is :mod:`cora.checkpoint`.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch

from cora_kernels.packing import PACK_FORMAT_VERSION

from .checkpoint_schema import CheckpointError, check_decoded
from .files import write_atomic
from .layer_storage import MODULE_FORMAT_VERSION

__all__ = ["CHECKPOINT_FORMAT_VERSION", "FORMAT", "DIGEST_KEY", "JSON_KEYS", "digest", "read_checkpoint", "write_checkpoint"]

CHECKPOINT_FORMAT_VERSION = 2
_READABLE_VERSIONS = ("1", "2")
FORMAT = "cora-checkpoint"
DIGEST_KEY = "cora_sha256"
_V1_DIGEST_KEY = "tensor_sha256"
_DIGEST_DOMAIN = b"cora-checkpoint-digest/2\n"
JSON_KEYS = ("architecture", "layers", "config", "report", "state_metadata", "preprocessing", "evaluation")
_OPTIONAL_KEYS = ("preprocessing", "evaluation")  # absent in files written before the key existed: null


def _tensor_bytes(t: torch.Tensor):
    """The tensor's bytes in memory order (little endian, as safetensors stores them), no copy when contiguous."""
    t = t.detach().cpu().contiguous().reshape(-1)  # reshape: 0-dim tensors cannot be viewed as bytes
    return t.view(torch.uint8).numpy() if t.numel() else b""


def _field(h, data) -> None:
    # Length prefixes make the serialisation injective: no two different inputs hash the same bytes.
    h.update(len(data).to_bytes(8, "little"))  # data: bytes or a 1-D uint8 array
    h.update(data)


def digest(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) over every metadata item but the digest itself and every tensor, canonically:
    a domain tag; the item count, then ``key, value`` (UTF-8) in sorted key order; the tensor count,
    then ``name, dtype, shape (JSON list), bytes`` in sorted name order; every field prefixed by its
    length (8 bytes, little endian)."""
    h = hashlib.sha256(_DIGEST_DOMAIN)
    keys = sorted(k for k in meta if k != DIGEST_KEY)
    _field(h, str(len(keys)).encode())
    for k in keys:
        _field(h, k.encode())
        _field(h, meta[k].encode())
    _field(h, str(len(tensors)).encode())
    for name in sorted(tensors):
        t = tensors[name]
        _field(h, name.encode())
        _field(h, str(t.dtype).replace("torch.", "").encode())
        _field(h, json.dumps(list(t.shape)).encode())
        _field(h, _tensor_bytes(t))
    return h.hexdigest()


def _tensor_digest_v1(tensors: dict[str, torch.Tensor]) -> str:
    """The version-1 digest: tensors only, fields not length-prefixed (kept to read old files)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def read_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Open, verify and decode a checkpoint: (metadata with JSON fields decoded, tensors on the CPU)."""
    from safetensors import safe_open

    try:
        exists, is_file = path.exists(), path.is_file()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if not exists:
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not is_file:
        raise CheckpointError(f"{path} is not a file")
    try:
        # one open: the metadata and the tensors come from the same mapping of the file
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(raw, dict) or raw.get("cora_format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a CoRa checkpoint")
    version = raw.get("cora_format_version")
    if version not in _READABLE_VERSIONS:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r} is not supported (this cora reads versions "
            f"{', '.join(_READABLE_VERSIONS)}; a newer cora writes newer ones)"
        )
    key, digest_of = (DIGEST_KEY, digest) if version == "2" else (_V1_DIGEST_KEY, lambda m, t: _tensor_digest_v1(t))
    recorded = raw.get(key)
    if not isinstance(recorded, str):
        raise CheckpointError(f"{path}: the checkpoint has no {key} digest (damaged or modified file)")
    try:
        actual = digest_of(raw, tensors)
    except Exception as exc:  # a dtype torch cannot view as bytes, for instance
        raise CheckpointError(f"{path}: cannot compute the digest ({type(exc).__name__}: {exc})") from None
    if actual != recorded:  # not a secret: no need for a constant-time comparison
        what = "file" if version == "2" else "tensor data"
        raise CheckpointError(f"{path}: the {what} does not match its recorded digest (damaged or modified file)")
    if version == "1":
        warnings.warn(
            f"{path} is a version-1 CoRa checkpoint: its digest covers the tensors only, not the metadata "
            f"(layer geometry, architecture); load it and cora.save it again to get a fully checked file",
            UserWarning, stacklevel=3,
        )
    versions = (raw.get("pack_format_version"), raw.get("module_format_version"))
    if versions != (str(PACK_FORMAT_VERSION), str(MODULE_FORMAT_VERSION)):
        raise CheckpointError(
            f"{path}: packed-weight format {versions[0]} / module format {versions[1]} is not supported "
            f"(this cora reads {PACK_FORMAT_VERSION} / {MODULE_FORMAT_VERSION})"
        )
    meta = dict(raw)
    for k in JSON_KEYS:
        if k not in raw:
            if (version == "1" and k == "state_metadata") or k in _OPTIONAL_KEYS:
                meta[k] = None
                continue
            raise CheckpointError(f"{path}: metadata field {k!r} is missing")
        try:
            meta[k] = json.loads(raw[k])
        except (ValueError, RecursionError) as exc:
            raise CheckpointError(f"{path}: metadata field {k!r} is not valid JSON ({exc})") from None
    check_decoded(path, meta)
    return meta, tensors


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """The checkpoint file, written atomically (:func:`cora.files.write_atomic`)."""
    import safetensors.torch

    write_atomic(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=meta))
