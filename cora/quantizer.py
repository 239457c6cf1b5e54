"""Uniform affine b-bit weight quantization (fake-quant reference) and GPTQ-style rounding.

Convention: ``scale = (hi - lo) / (2**b - 1)``, ``zero = round(-lo / scale)``,
``q = clamp(round(W / scale) + zero, 0, 2**b - 1)``, ``Q(W) = scale * (q - zero)``.

Shapes: a weight ``W`` is ``[C_out, ...]`` (conv ``[C_out, C_in, kh, kw]`` or linear ``[C_out, C_in]``).
``scale`` and ``zero`` are always float32 ``[C_out]`` (per-tensor quantization repeats one value), so
that every consumer (modules, kernels) handles a single layout. ``scale`` is rounded to float16 at
creation because that is how it is stored; ``zero`` is an integer in ``[0, 2**b - 1]`` held in float.
The range always contains 0 so that ``zero`` is representable in b bits.
"""
from __future__ import annotations

import torch

from cora_kernels.packing import SUPPORTED_BITS

__all__ = [
    "qmax",
    "compute_qparams",
    "quantize",
    "dequantize",
    "fake_quantize",
    "gptq_quantize",
]

_MSE_GRID = torch.linspace(0.30, 1.0, 15)  # coarse shrink factors of each range end (MSE search)


def qmax(bits: int) -> int:
    """Largest code for ``bits`` bits."""
    return 2**bits - 1


def _rows(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    return w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)


def _params_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    width = hi - lo
    # A constant-zero row has no range: any positive scale quantizes it exactly to code `zero`.
    scale = torch.where(width > 0, width / qmax(bits), torch.ones_like(width))
    scale = scale.to(torch.float16).to(torch.float32)  # stored as fp16: use exactly that value
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 2.0**-24))  # fp16 underflow guard
    zero = torch.clamp(torch.round(-lo / scale), 0, qmax(bits)) + 0.0  # + 0.0 turns -0.0 into 0.0
    return scale, zero


def _row_error(rows: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Squared quantization error per row; ``scale``/``zero`` are ``[rows, n_candidates]``."""
    s = scale.unsqueeze(-1)
    z = zero.unsqueeze(-1)
    q = torch.clamp(torch.round(rows.unsqueeze(1) / s) + z, 0, qmax(bits))
    return ((s * (q - z) - rows.unsqueeze(1)) ** 2).sum(-1)


def compute_qparams(
    w: torch.Tensor,
    bits: int,
    *,
    per_channel: bool = True,
    method: str = "minmax",
    std_k: float = 5.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for ``w`` (float ``[C_out, ...]``) -> float32 ``([C_out], [C_out])``.

    ``method``: ``"minmax"`` (the real range), ``"std"`` (``mean ± std_k·std`` clipped to the real
    range, the paper's setting) or ``"mse"`` (a grid search over both ends of the range, i.e. over
    scale and zero point jointly, minimising the squared weight error per row).
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} not supported; choose one of {SUPPORTED_BITS}")
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf; cannot quantize")
    w = w.detach().to(torch.float32)
    rows = _rows(w, per_channel)
    lo, hi = rows.min(dim=1).values, rows.max(dim=1).values
    if method == "minmax":
        scale, zero = _params_from_range(lo, hi, bits)
    elif method == "std":
        mean, std = rows.mean(dim=1), rows.std(dim=1, unbiased=False)
        scale, zero = _params_from_range(torch.maximum(mean - std_k * std, lo), torch.minimum(mean + std_k * std, hi), bits)
    elif method == "mse":
        scale, zero = _mse_search(rows, lo, hi, bits)
    else:
        raise ValueError(f"unknown range method {method!r}")
    if not torch.isfinite(scale).all():  # range / qmax above the float16 maximum (65504): would quantize to NaN
        raise ValueError(
            f"weight range too large for float16 scales at {bits} bits (max |w| = {float(w.abs().max()):.3g})"
        )
    n = w.shape[0]
    if not per_channel:
        scale, zero = scale.expand(n).clone(), zero.expand(n).clone()
    return scale, zero


def _mse_search(rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Coarse-to-fine grid over (lo shrink, hi shrink) per row; returns the best (scale, zero)."""
    grid = _MSE_GRID.to(rows.device)
    a, b = torch.meshgrid(grid, grid, indexing="ij")
    a = a.reshape(1, -1).expand(rows.shape[0], -1)
    b = b.reshape(1, -1).expand(rows.shape[0], -1)
    best_a, best_b = _best_candidates(rows, lo, hi, bits, a, b)
    # refine around each row's best pair at a quarter of the coarse step
    step = float(grid[1] - grid[0]) / 4
    offs = torch.arange(-2, 3, device=rows.device, dtype=rows.dtype) * step
    da, db = torch.meshgrid(offs, offs, indexing="ij")
    a = (best_a[:, None] + da.reshape(1, -1)).clamp(0.05, 1.0)
    b = (best_b[:, None] + db.reshape(1, -1)).clamp(0.05, 1.0)
    best_a, best_b = _best_candidates(rows, lo, hi, bits, a, b)
    return _params_from_range(lo * best_a, hi * best_b, bits)


def _best_candidates(rows, lo, hi, bits, a, b) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the shrink pair among candidates ``a``/``b`` ``[rows, n]`` with the least squared error."""
    n_rows, n_cand = a.shape
    best_err = torch.full((n_rows,), float("inf"), device=rows.device)
    best_a = torch.ones(n_rows, device=rows.device)
    best_b = torch.ones(n_rows, device=rows.device)
    chunk = max(1, int(16e6 // max(1, rows.numel())))  # bound the [rows, candidates, K] temporary
    for start in range(0, n_cand, chunk):
        ca, cb = a[:, start : start + chunk], b[:, start : start + chunk]
        s, z = _params_from_range(lo[:, None] * ca, hi[:, None] * cb, bits)
        e, idx = _row_error(rows, s, z, bits).min(dim=1)
        better = e < best_err
        best_err = torch.where(better, e, best_err)
        best_a = torch.where(better, ca.gather(1, idx[:, None]).squeeze(1), best_a)
        best_b = torch.where(better, cb.gather(1, idx[:, None]).squeeze(1), best_b)
    return best_a, best_b


def _bcast(p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return p.reshape(-1, *([1] * (w.dim() - 1)))


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (uint8, same shape as ``w``) for per-row ``scale``/``zero`` ``[C_out]``."""
    q = torch.round(w.to(torch.float32) / _bcast(scale, w)) + _bcast(zero, w)
    return torch.clamp(q, 0, qmax(bits)).to(torch.uint8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Float32 weights ``scale * (q - zero)`` from codes ``[C_out, ...]``."""
    return _bcast(scale, q) * (q.to(torch.float32) - _bcast(zero, q))


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``dequantize(quantize(w))``, float32."""
    return dequantize(quantize(w, scale, zero, bits), scale, zero)


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    *,
    damp: float = 0.01,
    act_order: bool = True,
    block_size: int = 128,
) -> torch.Tensor:
    """Error-compensating rounding of ``w`` (GPTQ): returns uint8 codes with the shape of ``w``.

    ``w`` is ``[C_out, K]`` (or a conv weight, flattened in PyTorch order ``(C_in, kh, kw)`` to match
    ``F.unfold``); ``hessian`` is ``H = E[x xᵀ]`` ``[K, K]`` of the layer's (im2col) inputs. Columns are
    rounded one at a time (largest ``diag(H)`` first with ``act_order``) and each column's rounding error
    is pushed onto the columns not yet rounded through the Cholesky factor of ``H⁻¹``, which minimises
    ``‖(W - Q) X‖`` greedily. The quantization grid (``scale``, ``zero``) is fixed beforehand.
    """
    shape = w.shape
    W = w.detach().reshape(shape[0], -1).to(torch.float64).clone()
    K = W.shape[1]
    if hessian.shape != (K, K):
        raise ValueError(f"hessian must be [{K}, {K}], got {tuple(hessian.shape)}")
    H = hessian.detach().to(torch.float64).clone()
    dead = torch.diag(H) <= 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K)
    W, H = W[:, perm], H[perm][:, perm]
    H += torch.eye(K, dtype=H.dtype) * (damp * torch.diag(H).mean())
    hinv = _upper_cholesky_of_inverse(H)
    s = scale.to(torch.float64)
    z = zero.to(torch.float64)
    top = qmax(bits)
    Q = torch.zeros_like(W)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        err1 = torch.zeros_like(W1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = W1[:, i]
            q = torch.clamp(torch.round(col / s) + z, 0, top)
            Q[:, i1 + i] = q
            e = (col - s * (q - z)) / h1[i, i]
            W1[:, i:] -= e.unsqueeze(1) * h1[i, i:].unsqueeze(0)
            err1[:, i] = e
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    codes = torch.empty_like(Q)
    codes[:, perm] = Q
    return codes.to(torch.uint8).reshape(shape)


def _upper_cholesky_of_inverse(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of ``H⁻¹``, increasing the dampening if ``H`` is not positive definite."""
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    extra = 0.0
    base = float(torch.diag(H).mean()) if H.numel() else 1.0
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(H + extra * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(L)
            U, info2 = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info2) == 0:
                return U
        extra = base * 1e-2 if extra == 0 else extra * 10
    raise RuntimeError("GPTQ: the calibration second-moment matrix is not positive definite")
