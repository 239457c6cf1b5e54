"""A small on-disk cache of baseline accuracies (float, RTN) already measured, so a re-run skips them.

An entry's key is a SHA-256 over what decides the number: the kind of result (``"float"``, or the RTN
config as JSON), the float model's state dict (every tensor's name, dtype, shape and bytes), the
evaluation images and labels, and for RTN the calibration images; the value is a small dict (accuracy,
equivalent bits, ...). The cache is one JSON file, ``$CORA_CACHE_DIR/eval_cache.json`` (default
``$XDG_CACHE_HOME/cora``, else ``~/.cache/cora``), written atomically; an unreadable file counts as
empty. Only data held in memory as tensors is keyed (the CIFAR-10 arrays); other data sets are not
cached (hashing an image folder would cost a pass over it).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

__all__ = ["CACHE_ENV", "cache_file", "tensors_digest", "cache_key", "lookup", "store"]

CACHE_ENV = "CORA_CACHE_DIR"
_FILE = "eval_cache.json"
_MAX_ENTRIES = 256  # the oldest go first beyond this


def cache_file() -> Path:
    """Where the cache lives (see the module doc)."""
    folder = os.environ.get(CACHE_ENV)
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        folder = str(Path(base) / "cora")
    return Path(folder).expanduser() / _FILE


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(kind: str, model: torch.nn.Module, data: dict[str, torch.Tensor]) -> str:
    """The key of a result of ``kind`` for ``model`` on the tensors ``data`` (images, labels, ...)."""
    h = hashlib.sha256(kind.encode())
    h.update(tensors_digest(dict(model.state_dict())).encode())
    h.update(tensors_digest(data).encode())
    return h.hexdigest()


def _read() -> dict:
    try:
        entries = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def lookup(key: str) -> dict | None:
    """The stored value of ``key``, or None."""
    value = _read().get(key)
    return value if isinstance(value, dict) else None


def store(key: str, value: dict) -> None:
    """Record ``value`` under ``key``. A cache that cannot be written is left alone (it is only a cache)."""
    entries = _read()
    entries.pop(key, None)
    entries[key] = value
    while len(entries) > _MAX_ENTRIES:
        entries.pop(next(iter(entries)))
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".eval_cache-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f)
        os.replace(tmp, path)
    except OSError:
        pass
