"""Saved CoRa models: :func:`save` and :func:`load` (one safetensors file, checked as a whole, never pickle).

:func:`load` is transactional: the checkpoint is checked against the caller's model (every layer,
every tensor's name, shape and dtype) before anything in it is replaced, and a failure later on
puts the model back as it was. :func:`save` refuses what :func:`load` could not read back (it
loads the file's content into a freshly built model first, when an architecture is recorded), and
writes through a temporary file in the target's folder, renamed into place.

The file format (metadata keys, the digest, version 1 files) is :mod:`cora.checkpoint_format`; what
each metadata field may hold is :mod:`cora.checkpoint_schema`.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from cora_kernels.packing import PACK_FORMAT_VERSION

from .checkpoint_format import (
    CHECKPOINT_FORMAT_VERSION,
    DIGEST_KEY,
    FORMAT,
    JSON_KEYS,
    digest,
    read_checkpoint,
    write_checkpoint,
)
from .checkpoint_schema import (
    ADAPTER_DTYPES,
    CheckpointError,
    build_layer,
    check_architecture,
    evaluation_problem,
    geometry_problem,
    layer_spec,
    preprocessing_problem,
)
from .files import check_output_path, new_parent_folders
from .layer_storage import MODULE_FORMAT_VERSION
from .modules import CoRaConv2d, QuantLinear

__all__ = ["save", "load", "read_metadata", "preprocessing_problem", "check_output_path", "CheckpointError",
           "CHECKPOINT_FORMAT_VERSION"]

_DEPLOY_HINT = "save the converted model before deploying: cora.save(converted); cora.deploy(cora.load(path))"


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
        new = build_layer(name, spec)
        try:
            old = model.get_submodule(name) if name else None
        except AttributeError:
            old = None
        if old is None:
            problems.append(f"layer {name!r} of the checkpoint does not exist in the model")
            continue
        why = geometry_problem(old, new)
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
            model.set_submodule(name, layer)
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


def read_metadata(path: str | os.PathLike) -> dict:
    """The checkpoint's metadata, JSON fields decoded (``architecture``, ``layers``, ``config``,
    ``report``, ``state_metadata``, ``preprocessing``, ``evaluation``), after checking the whole file against its digest.

    Raises :class:`CheckpointError` for anything wrong with the file, ``FileNotFoundError`` when
    there is none.
    """
    return read_checkpoint(Path(path))[0]


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
    meta, tensors = read_checkpoint(path)
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
    if str(a).replace("torch.", "") not in ADAPTER_DTYPES or a != b:
        raise ValueError(
            f"layer {name!r}: adapters are {a}/{b}; {type(m).__name__} stores them in one of {ADAPTER_DTYPES}: {hint}"
        )
    try:
        fresh = build_layer(name, layer_spec(m)).state_dict()
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
    problem = evaluation_problem(ev)
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
    check_architecture(arch)
    report = _report_dict(model)
    pre = _preprocessing(model, preprocessing, arch)
    meta = {
        "cora_format": FORMAT,
        "cora_format_version": str(CHECKPOINT_FORMAT_VERSION),
        "module_format_version": str(MODULE_FORMAT_VERSION),
        "pack_format_version": str(PACK_FORMAT_VERSION),
        "architecture": _json("the architecture", arch),
        "layers": json.dumps({n: layer_spec(m) for n, m in layers.items()}),
        "state_metadata": _json("the state dict's _metadata", smeta),
        "config": _json("the report's config", report["config"] if report is not None else None),
        "report": _json("model.cora_report", report),
        "preprocessing": json.dumps(pre),
        "evaluation": json.dumps(_evaluation(model, evaluation)),
    }
    meta[DIGEST_KEY] = digest(meta, tensors)
    if arch is not None:  # a dry run of load(path): the recorded name must rebuild this very model
        decoded = {k: json.loads(meta[k]) for k in JSON_KEYS}
        try:
            _load_into(_build_architecture(arch), decoded, dict(tensors), "cpu", rollback=False)
        except CheckpointError as exc:
            raise ValueError(f"load(path) could not rebuild this model from architecture={arch!r}: {exc}") from None
    with new_parent_folders(path):  # a failed write leaves no folder behind either
        write_checkpoint(path, tensors, meta)
    return path
