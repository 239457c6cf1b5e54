"""Saved CoRa models: one safetensors file, checked as a whole on load, never pickle.

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
  :func:`_digest`): every other metadata key and value exactly as stored, in sorted key order, and
  every tensor's name, dtype, shape and bytes, in sorted name order, each field length-prefixed.

So any change to the file either changes nothing :func:`load` reads (JSON whitespace of the
safetensors header) or makes it raise :class:`CheckpointError`. The digest detects damage, it is
not a signature: whoever can write the file can recompute it.

Version 1 files (digest ``tensor_sha256`` over the tensors only, no ``state_metadata``) are still
read, with a warning that their metadata is not covered; :func:`save` writes version 2.

:func:`load` is transactional: the checkpoint is checked against the caller's model (every layer,
every tensor's name, shape and dtype) before anything in it is replaced, and a failure later on
puts the model back as it was. :func:`save` refuses what :func:`load` could not read back, and
writes through a temporary file in the target's folder, renamed into place.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from cora_kernels.packing import PACK_FORMAT_VERSION

from ._modules_util import set_submodule
from .files import check_output_path, new_parent_folders, write_atomic
from .modules import MODULE_FORMAT_VERSION, CoRaConv2d, QuantLinear

__all__ = ["save", "load", "read_metadata", "preprocessing_problem", "check_output_path", "CheckpointError",
           "CHECKPOINT_FORMAT_VERSION"]

CHECKPOINT_FORMAT_VERSION = 2
_READABLE_VERSIONS = ("1", "2")
_FORMAT = "cora-checkpoint"
_DIGEST_KEY = "cora_sha256"
_V1_DIGEST_KEY = "tensor_sha256"
_DIGEST_DOMAIN = b"cora-checkpoint-digest/2\n"
_JSON_KEYS = ("architecture", "layers", "config", "report", "state_metadata", "preprocessing", "evaluation")
_OPTIONAL_KEYS = ("preprocessing", "evaluation")  # absent in files written before the key existed: null
_PREPROCESSING_KEYS = frozenset({"image_size", "resize_size", "mean", "std", "class_names"})
_ADAPTER_DTYPES = ("float16", "bfloat16", "float32", "int8")
_CONV_KEYS = frozenset({"type", "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "bias",
                        "padding_mode", "bits", "rank", "adapter_dtype"})
_LINEAR_KEYS = frozenset({"type", "in_features", "out_features", "bias", "bits", "rank", "adapter_dtype"})
_OLD_LINEAR_KEYS = frozenset({"type", "in_features", "out_features", "bias", "bits"})  # before linear adapters
_DEPLOY_HINT = "save the converted model before deploying: cora.save(converted); cora.deploy(cora.load(path))"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: not a CoRa file, damaged, wrong version or wrong model."""


# ----------------------------------------------------------------------------------------- digest
def _tensor_bytes(t: torch.Tensor):
    """The tensor's bytes in memory order (little endian, as safetensors stores them), no copy when contiguous."""
    t = t.detach().cpu().contiguous().reshape(-1)  # reshape: 0-dim tensors cannot be viewed as bytes
    return t.view(torch.uint8).numpy() if t.numel() else b""


def _field(h, data) -> None:
    # Length prefixes make the serialisation injective: no two different inputs hash the same bytes.
    h.update(len(data).to_bytes(8, "little"))  # data: bytes or a 1-D uint8 array
    h.update(data)


def _digest(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) over every metadata item but the digest itself and every tensor, canonically:
    a domain tag; the item count, then ``key, value`` (UTF-8) in sorted key order; the tensor count,
    then ``name, dtype, shape (JSON list), bytes`` in sorted name order; every field prefixed by its
    length (8 bytes, little endian)."""
    h = hashlib.sha256(_DIGEST_DOMAIN)
    keys = sorted(k for k in meta if k != _DIGEST_KEY)
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


# ----------------------------------------------------------------------------------------- layers
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
        type="QuantLinear", in_features=mod.in_features, out_features=mod.out_features, bias=mod.bias is not None, bits=mod.bits,
        rank=mod.rank, adapter_dtype=str(mod.adapter_a.dtype).replace("torch.", ""),
    )


def _is_int(v, lo: int) -> bool:
    return type(v) is int and v >= lo  # type(): a JSON true is not a channel count


def _is_pair(v, lo: int) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_is_int(x, lo) for x in v)


def _spec_problem(spec) -> str | None:
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
    if not isinstance(spec["bias"], bool) or not _is_int(spec["bits"], 1):
        return "bias must be true/false and bits a positive integer"
    if kind == "QuantLinear":
        ok = _is_int(spec["in_features"], 1) and _is_int(spec["out_features"], 1)
        if ok and "rank" in spec:
            ok = _is_int(spec["rank"], 0) and spec["adapter_dtype"] in _ADAPTER_DTYPES
        return None if ok else "in/out features must be positive integers, the rank >= 0 and the adapter dtype known"
    ok = (
        all(_is_int(spec[k], 1) for k in ("in_channels", "out_channels", "groups"))
        and _is_int(spec["rank"], 0)
        and all(_is_pair(spec[k], 1) for k in ("kernel_size", "stride", "dilation"))
        and (spec["padding"] in ("same", "valid") or _is_pair(spec["padding"], 0))
        and isinstance(spec["padding_mode"], str)
        and spec["adapter_dtype"] in _ADAPTER_DTYPES
    )
    return None if ok else "a geometry field, the rank or the adapter dtype has an invalid value"


def _build_layer(name: str, spec) -> nn.Module:
    """A fresh layer from its recorded description; :class:`CheckpointError` for anything save would not write."""
    problem = _spec_problem(spec)
    if problem is None:
        args = {k: v for k, v in spec.items() if k != "type"}
        try:
            return CoRaConv2d(**args) if spec["type"] == "CoRaConv2d" else QuantLinear(**args)
        except Exception as exc:  # the constructors check divisibility, ranks, bits, padding modes
            problem = f"{type(exc).__name__}: {exc}"
    raise CheckpointError(f"bad layer description for {name!r}: {problem}")


def _as_tuple(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


def _geometry_problem(old: nn.Module, new: nn.Module) -> str | None:
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


def _describe(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"{str(v.dtype).replace('torch.', '')} {list(v.shape)}"
    return f"a {type(v).__name__} (not a tensor)"


def _first(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def _plan(model: nn.Module, specs: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, nn.Module], dict]:
    """Check the checkpoint against ``model`` without changing it.

    Returns the new layers by name and the state dict to load (the tensors plus the new layers'
    extra states). Raises :class:`CheckpointError` listing what does not fit: missing or mismatched
    layers, and any tensor whose name, shape or dtype differs from what the model (with the new
    layers in place) holds, since ``load_state_dict`` would silently cast a dtype.
    """
    problems, new_layers = [], {}
    for name, spec in specs.items():
        new = _build_layer(name, spec)
        try:
            old = model.get_submodule(name) if name else None
        except AttributeError:
            old = None
        if old is None:
            problems.append(f"layer {name!r} of the checkpoint does not exist in the model")
            continue
        why = _geometry_problem(old, new)
        if why:
            problems.append(f"layer {name!r} {why}")
        new_layers[name] = new
    replaced = tuple(n + "." for n in new_layers)
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(replaced)}
    supplied = {}  # entries the checkpoint does not hold: the new layers' extra states
    for name, layer in new_layers.items():
        for k, v in layer.state_dict().items():
            expected[f"{name}.{k}"] = v
            if not isinstance(v, torch.Tensor):
                supplied[f"{name}.{k}"] = v
    missing = [k for k in expected if k not in tensors and k not in supplied]
    unexpected = [k for k in tensors if k not in expected]
    differ = [f"{k}: {_describe(tensors[k])} vs {_describe(v)}" for k, v in expected.items()
              if k in tensors and _describe(tensors[k]) != _describe(v)]  # dtype and shape
    if missing:
        problems.append(f"{len(missing)} entries of the model are not in the checkpoint ({_first(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors of the checkpoint are not in the model ({_first(unexpected)})")
    if differ:
        problems.append(f"{len(differ)} tensors differ, checkpoint vs model ({_first(differ)})")
    if problems:
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(problems))
    return new_layers, {**tensors, **supplied}


# ------------------------------------------------------------------------------- transactional load
def _snapshot(model: nn.Module, skip: set[int]) -> list:
    """What :func:`_restore` needs to put ``model`` back: every module's attributes (its child,
    parameter and buffer tables copied) and a copy of every tensor. Modules in ``skip`` (the layers
    about to be replaced, hence detached and never touched) are not copied."""
    snap = []
    for m in model.modules():
        if id(m) in skip:
            continue
        attrs = dict(vars(m))
        tables = {k: dict(attrs[k]) for k in ("_modules", "_parameters", "_buffers") if k in attrs}
        data = [(t, t.detach().clone()) for k in ("_parameters", "_buffers") for t in tables.get(k, {}).values() if t is not None]
        snap.append((m, attrs, tables, data))
    return snap


def _restore(snap: list) -> None:
    with torch.no_grad():
        for m, attrs, tables, data in snap:
            d = vars(m)
            for k in [k for k in d if k not in attrs]:
                del d[k]
            for k, v in attrs.items():
                if k in tables:  # the same table objects, their old contents
                    v.clear()
                    v.update(tables[k])
                d[k] = v
            for t, saved in data:
                if (t.shape, t.dtype, t.device) == (saved.shape, saved.dtype, saved.device):
                    t.copy_(saved)  # in place: storage shared with other tensors stays shared
                else:
                    t.data = saved


def _load_into(model: nn.Module, meta: dict, tensors: dict[str, torch.Tensor], map_location, *, rollback: bool) -> nn.Module:
    """Replace the recorded layers of ``model`` and load the state; all or nothing (``rollback``:
    keep what it takes to undo a failure, needed only for a model the caller gave)."""
    new_layers, state = _plan(model, meta["layers"], tensors)
    state = collections.OrderedDict(state)
    if meta.get("state_metadata") is not None:
        # load_state_dict passes state_dict._metadata[prefix] to each module's _load_from_state_dict
        state._metadata = collections.OrderedDict((k, dict(v)) for k, v in meta["state_metadata"].items())
    snap = _snapshot(model, {id(model.get_submodule(n)) for n in new_layers}) if rollback else []
    try:
        for name, layer in new_layers.items():
            set_submodule(model, name, layer)
        model.load_state_dict(state, strict=True)
        model.to(map_location)
    except Exception as exc:  # a module's own loading code (hooks, version checks) may raise anything
        _restore(snap)
        msg = " ".join(str(exc).split())
        unchanged = "; the model is unchanged" if rollback else ""
        raise CheckpointError(f"checkpoint does not load into the model ({type(exc).__name__}: {msg}){unchanged}") from exc
    return model


def _build_architecture(arch: dict) -> nn.Module:
    from .zoo import build_model

    try:
        with torch.random.fork_rng(devices=[]):  # building initialises weights: leave the caller's RNG alone
            return build_model(arch["name"], weights=False, **arch.get("kwargs", {}))
    except Exception as exc:
        raise CheckpointError(f"cannot rebuild the recorded architecture {arch!r}: {type(exc).__name__}: {exc}") from exc


def _make_report(report: dict):
    from .convert import ConversionReport

    names = {f.name for f in dataclasses.fields(ConversionReport)}
    unknown = sorted(set(report) - names)
    if unknown:
        raise CheckpointError(f"the report has fields ConversionReport does not know: {unknown}")
    try:
        return ConversionReport(**report)
    except TypeError as exc:
        raise CheckpointError(f"the report does not make a ConversionReport: {exc}") from exc


# ----------------------------------------------------------------------------------------- reading
def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
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
    if not isinstance(raw, dict) or raw.get("cora_format") != _FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a CoRa checkpoint")
    version = raw.get("cora_format_version")
    if version not in _READABLE_VERSIONS:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r} is not supported (this cora reads versions "
            f"{', '.join(_READABLE_VERSIONS)}; a newer cora writes newer ones)"
        )
    key, digest = (_DIGEST_KEY, _digest) if version == "2" else (_V1_DIGEST_KEY, lambda m, t: _tensor_digest_v1(t))
    recorded = raw.get(key)
    if not isinstance(recorded, str):
        raise CheckpointError(f"{path}: the checkpoint has no {key} digest (damaged or modified file)")
    try:
        actual = digest(raw, tensors)
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
    for k in _JSON_KEYS:
        if k not in raw:
            if (version == "1" and k == "state_metadata") or k in _OPTIONAL_KEYS:
                meta[k] = None
                continue
            raise CheckpointError(f"{path}: metadata field {k!r} is missing")
        try:
            meta[k] = json.loads(raw[k])
        except (ValueError, RecursionError) as exc:
            raise CheckpointError(f"{path}: metadata field {k!r} is not valid JSON ({exc})") from None
    _check_decoded(path, meta)
    return meta, tensors


def _check_decoded(path: Path, meta: dict) -> None:
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
    problem = _evaluation_problem(meta["evaluation"])
    if problem is not None:
        raise CheckpointError(f"{path}: evaluation {problem}")


def _evaluation_problem(ev) -> str | None:
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
    if not (_is_int(pre["image_size"], 1) and _is_int(pre["resize_size"], pre["image_size"])):
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


def read_metadata(path: str | os.PathLike) -> dict:
    """The checkpoint's metadata, JSON fields decoded (``architecture``, ``layers``, ``config``,
    ``report``, ``state_metadata``, ``preprocessing``, ``evaluation``), after checking the whole file against its digest.

    Raises :class:`CheckpointError` for anything wrong with the file, ``FileNotFoundError`` when
    there is none.
    """
    return _read(Path(path))[0]


def load(path: str | os.PathLike, model: nn.Module | None = None, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a saved CoRa model. Returns it in eval mode with ``cora_report`` restored.

    ``model``: the float architecture to fill (its quantized layers are replaced); by default it is
    rebuilt from the name recorded in the file. Everything is checked before ``model`` changes:
    the file against its digest, then every recorded layer against the model's (a conv/linear of
    the same geometry) and every tensor against the model's state dict (name, shape, dtype). If
    loading still fails (a module's own loading code), ``model`` is put back as it was: the same
    modules, parameters and buffers, with their old values. Every problem with the file or the
    model raises :class:`CheckpointError`; a missing file raises ``FileNotFoundError``.
    """
    try:
        torch.device(map_location)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"map_location {map_location!r} is not a device: {exc}") from None
    path = Path(path)
    meta, tensors = _read(path)
    report, given = None, model is not None
    try:
        if meta["report"] is not None:
            report = _make_report(meta["report"])
        if model is None:
            if meta["architecture"] is None:
                raise CheckpointError("the checkpoint records no architecture; pass the float model: cora.load(path, model)")
            model = _build_architecture(meta["architecture"])
        _load_into(model, meta, tensors, map_location, rollback=given)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc.__cause__
    model.cora_report = report
    model.cora_architecture = meta["architecture"]
    model.cora_preprocessing = meta["preprocessing"]
    model.cora_evaluation = meta["evaluation"]
    return model.eval()


# ----------------------------------------------------------------------------------------- writing
def _write_atomic(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """The checkpoint file, written atomically (:func:`cora.files.write_atomic`)."""
    import safetensors.torch

    write_atomic(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=meta))


def _quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's CoRa layers by name; refuses models :func:`load` could not rebuild."""
    from .deploy import DeployedBasicBlock, DeployedBottleneck, DeployedConv

    if any(isinstance(m, (DeployedConv, DeployedBasicBlock, DeployedBottleneck)) for m in model.modules()):
        raise ValueError(f"cannot save a deployed model: {_DEPLOY_HINT}")
    names: dict[int, list[str]] = {}
    layers = {}
    for n, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, (CoRaConv2d, QuantLinear)):
            names.setdefault(id(m), []).append(n)
            layers.setdefault(n, m)
    if not layers:
        raise ValueError("the model has no CoRa layers; convert it first")
    if "" in layers:
        raise ValueError("the model itself is a CoRa layer; save a module that holds it, e.g. nn.Sequential(layer)")
    shared = [ns for ns in names.values() if len(ns) > 1]
    if shared:
        raise ValueError(
            f"a CoRa layer is shared under several names ({', '.join(shared[0])}); load would give each name its own copy"
        )
    for name, m in layers.items():
        _check_layer_dtypes(name, m)
    return layers


def _check_layer_dtypes(name: str, m: nn.Module) -> None:
    """Every buffer of a CoRa layer must have the dtype and shape its constructor makes (load builds it that way)."""
    hint = "save the model in the dtypes cora.convert gave it (before .double(), .half() or .to(dtype))"
    a, b = m.adapter_a.dtype, m.adapter_b.dtype
    if str(a).replace("torch.", "") not in _ADAPTER_DTYPES or a != b:
        raise ValueError(
            f"layer {name!r}: adapters are {a}/{b}; {type(m).__name__} stores them in one of {_ADAPTER_DTYPES}: {hint}"
        )
    try:
        fresh = _build_layer(name, _layer_spec(m)).state_dict()
    except CheckpointError as exc:
        raise ValueError(f"layer {name!r} could not be rebuilt from its description: {exc}") from None
    for k, v in m.state_dict().items():
        ref = fresh.get(k)
        if isinstance(v, torch.Tensor) and (not isinstance(ref, torch.Tensor) or (v.dtype, v.shape) != (ref.dtype, ref.shape)):
            raise ValueError(f"layer {name!r}: {k} is {_describe(v)} but {type(m).__name__} stores {_describe(ref)}: {hint}")


def _report_dict(model: nn.Module) -> dict | None:
    from .convert import ConversionReport

    report = getattr(model, "cora_report", None)
    if report is None:
        return None
    if not isinstance(report, ConversionReport):
        raise ValueError(f"model.cora_report is a {type(report).__name__}, not a cora ConversionReport")
    d = report.to_dict()
    text = _json("model.cora_report", d)
    try:
        _make_report(json.loads(text))  # what load will do with it
    except CheckpointError as exc:
        raise ValueError(f"model.cora_report would not load back: {exc}") from None
    return d


def _check_architecture(arch) -> None:
    if arch is None:
        return
    if not (isinstance(arch, dict) and isinstance(arch.get("name"), str) and set(arch) <= {"name", "kwargs"}
            and isinstance(arch.get("kwargs", {}), dict)):
        raise ValueError(f"architecture must be None or {{'name': str, 'kwargs': dict}}, got {arch!r}")


def _json(what: str, value) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} cannot be written as JSON: {exc}") from None


def _preprocessing(model: nn.Module, given, arch) -> dict | None:
    """The preprocessing record to write: ``given``, else ``model.cora_preprocessing``, else the
    recorded architecture's own (:func:`cora.zoo.preprocessing_for`), else None."""
    pre = given if given is not None else getattr(model, "cora_preprocessing", None)
    if pre is None and arch is not None:
        from .zoo import preprocessing_for

        try:
            pre = preprocessing_for(arch["name"], arch.get("kwargs"))
        except ValueError:  # a name the zoo does not know: nothing to record
            pre = None
    if pre is not None:
        pre = json.loads(_json("the preprocessing", pre))  # tuples become lists, as load will see them
    problem = preprocessing_problem(pre)
    if problem is not None:
        raise ValueError(f"preprocessing {problem}, got {pre!r}")
    return pre


def _evaluation(model: nn.Module, given) -> dict | None:
    ev = given if given is not None else getattr(model, "cora_evaluation", None)
    if ev is not None:
        ev = json.loads(_json("the evaluation", ev))
    problem = _evaluation_problem(ev)
    if problem is not None:
        raise ValueError(f"evaluation {problem}, got {ev!r}")
    return ev


def save(model: nn.Module, path: str | os.PathLike, *, architecture: dict | None = None,
         preprocessing: dict | None = None, evaluation: dict | None = None) -> Path:
    """Write ``model`` (converted by :func:`cora.convert`) to ``path`` as safetensors + metadata.

    ``architecture``: ``{"name": "cifar_resnet20"}`` (or any :func:`cora.zoo.build_model` name, with
    optional ``"kwargs"``) so that :func:`load` can rebuild the model alone; defaults to
    ``model.cora_architecture`` if set. ``preprocessing``: how an encoded image becomes the model's
    input (see :func:`preprocessing_problem`); defaults to ``model.cora_preprocessing``, then to the
    architecture's own. ``evaluation``: the accuracy measured at quantization time (``{"acc": 91.2,
    "eval_split": "test", ...}``), defaults to ``model.cora_evaluation``; shown by ``cora serve``.
    Then the model is loaded into a freshly built one before anything is written, so a name that
    does not fit is refused here and not at load time.

    Raises ``ValueError`` (never writes) for what :func:`load` could not read back: no CoRa layers,
    a deployed model, CoRa buffers in another dtype than the layer stores (after ``.double()``),
    state-dict entries other than tensors and the CoRa layers' extra state, a report that is not a
    :class:`cora.convert.ConversionReport`, an architecture that does not rebuild this model, and
    a bad ``path`` (:func:`check_output_path`). Missing parent folders are created (and removed
    again if the write fails). The file appears complete or not at all; it gets the permissions
    ``open(path, "w")`` would give.
    """
    path = check_output_path(path)
    layers = _quantized_layers(model)
    state = model.state_dict()
    extra = {f"{n}._extra_state" for n in layers}
    odd = [k for k, v in state.items() if not isinstance(v, torch.Tensor) and k not in extra]
    if odd:
        raise ValueError(
            f"the model's state dict has entries that are not tensors ({_first(odd)}); a checkpoint holds tensors only"
        )
    dense = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.layout != torch.strided]
    if dense:
        raise ValueError(f"sparse or other non-dense tensors cannot be saved ({_first(dense)})")
    # clone: a contiguous copy the caller cannot change while it is written, sharing no memory
    tensors = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
               for k, v in state.items() if isinstance(v, torch.Tensor)}
    smeta = getattr(state, "_metadata", None)
    smeta = None if smeta is None else {k: dict(v) for k, v in smeta.items()}
    arch = architecture if architecture is not None else getattr(model, "cora_architecture", None)
    _check_architecture(arch)
    report = _report_dict(model)
    pre = _preprocessing(model, preprocessing, arch)
    meta = {
        "cora_format": _FORMAT,
        "cora_format_version": str(CHECKPOINT_FORMAT_VERSION),
        "module_format_version": str(MODULE_FORMAT_VERSION),
        "pack_format_version": str(PACK_FORMAT_VERSION),
        "architecture": _json("the architecture", arch),
        "layers": json.dumps({n: _layer_spec(m) for n, m in layers.items()}),
        "state_metadata": _json("the state dict's _metadata", smeta),
        "config": _json("the report's config", report["config"] if report is not None else None),
        "report": _json("model.cora_report", report),
        "preprocessing": json.dumps(pre),
        "evaluation": json.dumps(_evaluation(model, evaluation)),
    }
    meta[_DIGEST_KEY] = _digest(meta, tensors)
    if arch is not None:  # a dry run of load(path): the recorded name must rebuild this very model
        decoded = {k: json.loads(meta[k]) for k in _JSON_KEYS}
        try:
            _load_into(_build_architecture(arch), decoded, dict(tensors), "cpu", rollback=False)
        except CheckpointError as exc:
            raise ValueError(f"load(path) could not rebuild this model from architecture={arch!r}: {exc}") from None
    with new_parent_folders(path):  # a failed write leaves no folder behind either
        _write_atomic(path, tensors, meta)
    return path
