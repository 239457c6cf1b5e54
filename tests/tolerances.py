"""The one tolerance policy of the test suite.

Relative error ``||y - y_ref|| / ||y_ref||`` (:func:`cora_kernels.testing.rel_err`) against a
float64 (or float32) reference: fp32 paths <= 1e-4, fp16 / bf16 paths <= 2e-3.  Never test on zeros.

bf16 outputs: rounding the *exact* result to bf16 (8 significant bits) already costs about
1.6e-3 of relative error (measured 1.55-1.8e-3 on the kernel tests), so a bf16 result is allowed
2e-3 *in addition to* that unavoidable floor, ``rel_err(y_ref.to(bf16), y_ref)``.  fp16's floor is
~2e-4 and is not added.
"""
from __future__ import annotations

import torch

from cora_kernels.testing import rel_err

__all__ = [
    "RTOL", "FLOAT64_ULPS_RTOL", "TRUNCATED_RTOL", "SHARED_HESSIAN_RTOL", "SHARED_GPTQ_CODE_FLIPS", "rel_err", "tol_for",
    "assert_close_rel", "THREAD_COUNT_RTOL",
]

RTOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-3}

# The same float64 formula evaluated on tensors of different lengths: CPU kernels vectorise the body and
# the tail differently, so an entry can differ in its last bits (seen: 1.7e-18 on the Butterworth mask).
FLOAT64_ULPS_RTOL = 1e-14
# Truncated (Gram eigen-decomposition, float64) vs full SVD factorization: top singular values and
# rank-r products B·A, relative, with the factors returned in float32 (whose rounding, ~1e-7, dominates).
TRUNCATED_RTOL = 1e-5
# One shared Cholesky vs the separate float64 computations: factors returned in float32, so float32
# rounding again (the float64 intermediates agree to ~1e-13).
SHARED_HESSIAN_RTOL = 1e-5
# GPTQ codes from the shared H⁻¹ vs GPTQ's own: the same float64 factor up to rounding, so a code can
# flip only on an exact tie; the tests' random inputs have none (0 flips expected, no slack).
SHARED_GPTQ_CODE_FLIPS = 0
# A whole conversion (GPTQ, rank search, a few Adam steps) on 1 vs 2 torch threads: only the float summation
# order differs, amplified a little by the optimiser steps; outputs relative (far below any quantization error).
THREAD_COUNT_RTOL = 1e-3


def tol_for(dtype: torch.dtype) -> float:
    return RTOL.get(dtype, 1e-4)


def assert_close_rel(y: torch.Tensor, y_ref: torch.Tensor, dtype: torch.dtype | None = None, msg: str = ""):
    if tuple(y.shape) != tuple(y_ref.shape):
        raise AssertionError(f"shape {tuple(y.shape)} != {tuple(y_ref.shape)} {msg}")
    dtype = dtype if dtype is not None else y.dtype
    tol = tol_for(dtype)
    if dtype == torch.bfloat16:
        tol += rel_err(y_ref.to(torch.bfloat16), y_ref)
    err = rel_err(y, y_ref)
    assert err <= tol, f"rel err {err:.3e} > {tol:.0e} {msg}"
    return err
