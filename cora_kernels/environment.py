"""The environment variables that the kernels read, each in one place (read at call time).

* ``TRITON_INTERPRET`` -- :func:`is_interpreting`: Triton runs kernels on CPU tensors through its
  interpreter (it must be set before Triton is imported);
* ``CORA_AUTOTUNE`` -- :func:`autotune_enabled`: ``0`` turns the timing of launch candidates off;
* ``CORA_TUNE_SECONDS`` -- :func:`tune_seconds`: the tuning time a :func:`cora_kernels.tuning.tuning_budget`
  allows when it is given none (default 60 s; beyond it the untimed rules decide);
* ``CORA_STRATEGY`` -- :func:`strategy_override`: ``fused`` or ``dequant`` forces how a ``groups == 1``
  conv runs on the Triton backend (benchmarks report each strategy alone; tests run the dequantize
  strategy under the interpreter); ``auto`` (default) lets the tuner choose.

Imports nothing but the standard library, so that every kernel module can import it.
"""
from __future__ import annotations

import os

__all__ = ["is_interpreting", "autotune_enabled", "tune_seconds", "strategy_override", "DEFAULT_TUNE_SECONDS"]

DEFAULT_TUNE_SECONDS = 60.0


def is_interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET`` set, not "0")."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_enabled() -> bool:
    """False when ``CORA_AUTOTUNE=0``: launches then use the untimed choices of :mod:`cora_kernels.tuning`."""
    return os.environ.get("CORA_AUTOTUNE", "1") != "0"


def tune_seconds() -> float:
    """``CORA_TUNE_SECONDS`` as a float >= 0 (unset or empty: :data:`DEFAULT_TUNE_SECONDS`);
    ValueError naming the variable for anything else."""
    raw = os.environ.get("CORA_TUNE_SECONDS", "").strip()
    if not raw:
        return DEFAULT_TUNE_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"CORA_TUNE_SECONDS must be a finite number of seconds >= 0, got {raw!r}")
    return value


_STRATEGY_CHOICES = ("auto", "fused", "dequant")


def strategy_override() -> str | None:
    """``"fused"`` or ``"dequant"`` when ``CORA_STRATEGY`` forces one, None for ``auto`` (unset or empty;
    case-insensitive); ValueError naming the variable and the choices for anything else."""
    raw = os.environ.get("CORA_STRATEGY", "").strip().lower() or "auto"
    if raw not in _STRATEGY_CHOICES:
        raise ValueError(f"CORA_STRATEGY must be one of {_STRATEGY_CHOICES}, got {raw!r}")
    return None if raw == "auto" else raw
