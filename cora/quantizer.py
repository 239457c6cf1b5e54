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

from dataclasses import dataclass, field

import torch

from cora_kernels.packing import SUPPORTED_BITS

__all__ = [
    "qmax",
    "compute_qparams",
    "quantize",
    "dequantize",
    "fake_quantize",
    "gptq_quantize",
    "DampedHessian",
    "prepare_hessian",
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


@dataclass
class DampedHessian:
    """A layer's second moment ``H`` ``[K, K]`` dampened and factored once, for every consumer of that layer.

    ``shift = max(damp · mean(diag H), 1e-12)`` is added to the diagonal and ``L`` (float64 ``[K, K]``,
    lower, on ``raw``'s device) is the Cholesky factor of ``H + shift·I``; ``None`` when that is not
    positive definite (consumers then fall back to their own handling of the raw ``H``). ``inverse()``
    is ``(H + shift·I)⁻¹``, computed on first use and kept. GPTQ (:func:`gptq_quantize`) and the
    activation-aware factorization / regression (:mod:`cora.residual`) accept this in place of the raw
    ``H``; each uses the shared factor only where its own computation would be the same up to float
    rounding (same ``damp``; for GPTQ no dead columns), and otherwise starts again from ``raw``.
    """

    raw: torch.Tensor = field(repr=False)  # [K, K] the undamped H as given (any float dtype and device)
    damp: float
    shift: float
    L: torch.Tensor | None = field(repr=False)  # [K, K] float64, lower
    _inverse: torch.Tensor | None = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return int(self.raw.shape[0])

    def inverse(self) -> torch.Tensor:
        """``(H + shift·I)⁻¹`` float64 ``[K, K]`` (cached; requires ``L``)."""
        if self.L is None:
            raise ValueError("the dampened second moment is not positive definite: no inverse")
        if self._inverse is None:
            self._inverse = torch.cholesky_inverse(self.L)
        return self._inverse


def prepare_hessian(hessian: torch.Tensor, damp: float = 0.01) -> DampedHessian:
    """Dampen ``hessian`` (``[K, K]``, any float dtype, any device) by ``damp`` and factor it once.

    Float64 on purpose: GPTQ's ``H⁻¹`` from a float32 Cholesky changed 0.1–1 % of the 2-bit codes of
    resnet18's 3×3 convs (random weights, 128 random 96×96 images; layer4.0.conv1: 0.96 %), whereas
    the float64 products below agree with the separate computations to rounding.
    """
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"hessian must be a square [K, K] matrix, got {tuple(hessian.shape)}")
    raw = hessian.detach()
    H = raw.to(torch.float64)
    K = H.shape[0]
    mean_diag = float(torch.diag(H).mean()) if K else 1.0
    shift = max(damp * mean_diag, 1e-12)
    L, info = torch.linalg.cholesky_ex(H + shift * torch.eye(K, dtype=H.dtype, device=H.device))
    return DampedHessian(raw, float(damp), shift, L if int(info) == 0 else None)


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor | DampedHessian,
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
    ``F.unfold``); ``hessian`` is ``H = E[x xᵀ]`` ``[K, K]`` of the layer's (im2col) inputs, raw or
    already factored (:func:`prepare_hessian`, whose ``H⁻¹`` is then reused when ``damp`` matches and
    no column is dead). Columns are rounded one at a time (largest ``diag(H)`` first with
    ``act_order``) and each column's rounding error is pushed onto the columns not yet rounded through
    the Cholesky factor of ``H⁻¹``, which minimises ``‖(W - Q) X‖`` greedily. The quantization grid
    (``scale``, ``zero``) is fixed beforehand. Runs on ``w``'s device.
    """
    shape = w.shape
    W = w.detach().reshape(shape[0], -1).to(torch.float64).clone()
    K = W.shape[1]
    shared = hessian if isinstance(hessian, DampedHessian) else None
    raw = shared.raw if shared is not None else hessian
    if raw.shape != (K, K):
        raise ValueError(f"hessian must be [{K}, {K}], got {tuple(raw.shape)}")
    H = raw.detach().to(device=W.device, dtype=torch.float64).clone()
    dead = torch.diag(H) <= 0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K, device=H.device)
    hinv = _shared_upper_factor(shared, H, dead, perm, damp)
    if hinv is None:
        H[dead, dead] = 1.0
        perm = torch.argsort(torch.diag(H), descending=True) if act_order else perm
        H = H[perm][:, perm]
        H += torch.eye(K, dtype=H.dtype, device=H.device) * (damp * torch.diag(H).mean())
        hinv = _upper_cholesky_of_inverse(H)
    W[:, dead] = 0.0
    W = W[:, perm]
    Q = _gptq_columns(W, hinv, scale.to(W), zero.to(W), qmax(bits), block_size)
    codes = torch.empty_like(Q)
    codes[:, perm] = Q
    return codes.to(torch.uint8).reshape(shape)


def _shared_upper_factor(
    shared: DampedHessian | None, H: torch.Tensor, dead: torch.Tensor, perm: torch.Tensor, damp: float
) -> torch.Tensor | None:
    """GPTQ's upper Cholesky factor of ``(P H Pᵀ + δI)⁻¹ = P (H + δI)⁻¹ Pᵀ`` from the shared ``H⁻¹``.

    ``None`` where sharing would not reproduce GPTQ's own computation: no shared factor, another
    ``damp``, dead columns (GPTQ changes their diagonal), or the 1e-12 floor of the shift in effect
    (GPTQ adds ``damp·mean(diag H)`` unfloored). The permutation is the same either way (no dead
    column), so only the mathematically equal ways of getting the factor differ, by rounding.
    """
    if shared is None or shared.L is None or shared.damp != damp or bool(dead.any()):
        return None
    if not damp * float(torch.diag(H).mean()) > 1e-12:  # the floor would make the shifts differ
        return None
    hinv = shared.inverse().to(H.device)[perm][:, perm]
    U, info = torch.linalg.cholesky_ex(hinv, upper=True)
    return U if int(info) == 0 else None


def _gptq_columns(
    W: torch.Tensor, hinv: torch.Tensor, s: torch.Tensor, z: torch.Tensor, top: int, block_size: int
) -> torch.Tensor:
    """GPTQ's column loop on permuted ``W`` ``[C_out, K]`` (float64, modified) -> codes ``[C_out, K]`` (float64)."""
    K = W.shape[1]
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
    return Q


def _upper_cholesky_of_inverse(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of ``H⁻¹``, increasing the dampening if ``H`` is not positive definite."""
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
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
