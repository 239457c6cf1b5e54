"""The one tolerance policy of the test suite (design.md §4).

Relative error ``||y - y_ref|| / ||y_ref||`` against a float64 (or float32) reference:
fp32 paths <= 1e-4, fp16 / bf16 paths <= 2e-3.  Never test on zeros.
"""
from __future__ import annotations

import torch

__all__ = ["RTOL", "rel_err", "tol_for", "assert_close_rel"]

RTOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-3}


def tol_for(dtype: torch.dtype) -> float:
    return RTOL.get(dtype, 1e-4)


def rel_err(y: torch.Tensor, y_ref: torch.Tensor) -> float:
    """``||y - y_ref|| / ||y_ref||`` in float64; the reference must not be all zeros."""
    y = y.detach().to(torch.float64)
    y_ref = y_ref.detach().to(torch.float64)
    den = y_ref.norm().item()
    if den == 0.0:
        raise AssertionError("reference is all zeros: the comparison would be meaningless")
    return (y - y_ref).norm().item() / den


def assert_close_rel(y: torch.Tensor, y_ref: torch.Tensor, dtype: torch.dtype | None = None, msg: str = ""):
    if tuple(y.shape) != tuple(y_ref.shape):
        raise AssertionError(f"shape {tuple(y.shape)} != {tuple(y_ref.shape)} {msg}")
    tol = tol_for(dtype if dtype is not None else y.dtype)
    err = rel_err(y, y_ref)
    assert err <= tol, f"rel err {err:.3e} > {tol:.0e} {msg}"
    return err
