"""Residual adapters (Theorem 1): factorize ``dW = W - Q(W)`` into a k×k conv A and a 1×1 conv B.

``dW`` ``[C_out, C_in, kh, kw]`` is unfolded along the output channel to ``D`` ``[C_out, K]`` with
``K = C_in*kh*kw`` in PyTorch order ``(C_in, kh, kw)``. A factorization ``D = U diag(S) Vt`` with
``U`` ``[C_out, R]``, ``S`` ``[R]``, ``Vt`` ``[R, K]``, ``R = min(C_out, K)`` gives, for any rank
``r <= R``, ``A = diag(S_r^½) Vt_r`` folded to ``[r, C_in, kh, kw]`` (a conv with the layer's stride,
padding and dilation) and ``B = U_r diag(S_r^½)`` as ``[C_out, r, 1, 1]``; at ``r = R``,
``conv1x1(conv(x; A); B) == conv(x; dW)`` exactly (up to float rounding).
A linear layer's residual ``[out, in]`` is the ``kh = kw = 1`` case: ``A`` ``[r, in]``, ``B`` ``[out, r]``,
``linear(linear(x; A); B) == linear(x; dW)`` at ``r = R``.

Two factorizations:

* ``"weight"`` (the paper): the SVD of ``D``; the top-r part is the best rank-r adapter in weight
  space (Eckart–Young).
* ``"activation"``: with ``H = E[x xᵀ] = L Lᵀ`` the second moment of the layer's im2col inputs, the SVD
  of ``D L = U S Vᵀ`` mapped back with ``Vt = Vᵀ L⁻¹``; the top-r part minimises ``E‖(D - BA) x‖²``,
  i.e. the error of the layer's *output* on the calibration inputs.

Only the top ``max_rank`` triplets can be kept (``max_rank`` from :func:`cora.budget.affordable_rank`:
no budget affords more); the factors then store those but still report ``full_rank = R``. The
activation-aware factorization and :func:`regression_residual` take the raw ``H`` or one factored
once per layer (:func:`cora.quantizer.prepare_hessian`, shared with GPTQ).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .quantizer import DampedHessian, prepare_hessian

__all__ = [
    "ResidualFactors",
    "factorize_residual",
    "adapter_from_factors",
    "full_rank",
    "regression_residual",
    "GRAM_MIN_RATIO",
]

# A factorization asked for max_rank < R triplets computes only those, from the eigen-decomposition
# of the smaller Gram matrix (float64). Its relative error on S_i grows like eps·(S_0/S_i)², so it is
# used only while the smallest kept eigenvalue is >= GRAM_MIN_RATIO · the largest (S_0/S_i <= 1e4:
# error <= ~2e-8); otherwise the full SVD. Measured on resnet18's D·L (random weights, 128 random
# 96×96 images; S_0/S_R <= 310): S and every rank-r product B·A equal the full SVD's to <= 4e-13
# (relative) even at count = R, and 256×2304 takes 0.05 s against 0.42 s for the SVD (1 thread).
GRAM_MIN_RATIO = 1e-8


@dataclass
class ResidualFactors:
    """``D ≈ U diag(S) Vt``: the top ``stored_rank`` triplets of a factorization of full rank ``full_rank``.

    Float32, on the residual's device. ``S`` is sorted in decreasing order. Without truncation
    ``stored_rank == full_rank == R`` and ``U diag(S) Vt == D``; a truncated factorization keeps only
    the first triplets (those an adapter can ever afford) but remembers ``R``, which the rank search
    normalises its mask by and the budget's cutoff weights are computed from.
    """

    U: torch.Tensor  # [C_out, r_s]
    S: torch.Tensor  # [r_s]
    Vt: torch.Tensor  # [r_s, K]
    weight_shape: tuple[int, ...]  # [C_out, C_in, kh, kw]
    full_rank: int | None = None  # R = min(C_out, K); None: the stored count (no truncation)

    def __post_init__(self) -> None:
        stored = int(self.S.numel())
        if self.full_rank is None:
            self.full_rank = stored
        if not stored <= self.full_rank:
            raise ValueError(f"{stored} stored triplets exceed the full rank {self.full_rank}")

    @property
    def stored_rank(self) -> int:
        """How many triplets are stored (the largest rank :func:`adapter_from_factors` can build)."""
        return int(self.S.numel())

    @property
    def rank(self) -> int:
        """The stored count, as before truncation existed; the budget and the search read ``full_rank``."""
        return self.stored_rank

    @property
    def truncated(self) -> bool:
        return self.stored_rank < self.full_rank

    def matrix(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """``U diag(S * weights) Vt`` reshaped to the weight shape (``weights`` ``[stored_rank]``, differentiable)."""
        s = self.S if weights is None else self.S * weights
        return ((self.U * s) @ self.Vt).reshape(self.weight_shape)


def full_rank(weight_shape: tuple[int, ...]) -> int:
    """``R = min(C_out, C_in*kh*kw)`` for a conv weight shape."""
    c_out = weight_shape[0]
    k = 1
    for d in weight_shape[1:]:
        k *= d
    return min(c_out, k)


def _top_triplets(M: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The top ``count`` singular triplets of ``M`` ``[m, n]`` (float64): ``U`` ``[m, c]``, ``S`` ``[c]``, ``Vt`` ``[c, n]``.

    Eigenvectors of the smaller Gram matrix give one side; the other side is ``M`` projected on
    them, whose norms are the singular values (so ``U diag(S) Vt`` is exactly the projection of ``M``
    on the top eigen-space). ``None`` when the kept spectrum is too wide for the Gram matrix's
    accuracy (:data:`GRAM_MIN_RATIO`).
    """
    m, n = M.shape
    if count == 0:
        return M.new_zeros(m, 0), M.new_zeros(0), M.new_zeros(0, n)
    vals, vecs = torch.linalg.eigh(M @ M.T if m <= n else M.T @ M)
    if not float(vals[-count]) >= GRAM_MIN_RATIO * float(vals[-1]) > 0:
        return None
    if m <= n:
        U = vecs[:, -count:].flip(1)
        rows = U.T @ M  # [c, n] = diag(S) Vt
        S = rows.norm(dim=1)
        Vt = rows / torch.where(S > 0, S, torch.ones_like(S)).unsqueeze(1)
    else:
        V = vecs[:, -count:].flip(1)
        cols = M @ V  # [m, c] = U diag(S)
        S = cols.norm(dim=0)
        U = cols / torch.where(S > 0, S, torch.ones_like(S))
        Vt = V.T
    order = torch.argsort(S, descending=True)  # rounding can swap near-equal neighbours
    return U[:, order], S[order], Vt[order]


def _svd(M: torch.Tensor, max_rank: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top ``max_rank`` (all when None) singular triplets of ``M`` (float64): only those when fewer than ``R``."""
    if max_rank is not None and max_rank < min(M.shape):
        top = _top_triplets(M, max_rank)
        if top is not None:
            return top
    U, S, Vt = torch.linalg.svd(M, full_matrices=False)
    if max_rank is not None:
        U, S, Vt = U[:, :max_rank], S[:max_rank], Vt[:max_rank]
    return U, S, Vt


def _damped(hessian: torch.Tensor | DampedHessian, damp: float, K: int) -> DampedHessian:
    """``hessian`` factored with ``damp``: the shared factor when it was made with that ``damp``."""
    raw = hessian.raw if isinstance(hessian, DampedHessian) else hessian
    if raw.shape != (K, K):
        raise ValueError(f"activation-aware factorization needs a [{K}, {K}] hessian, got {tuple(raw.shape)}")
    if isinstance(hessian, DampedHessian) and hessian.damp == damp:
        return hessian
    return prepare_hessian(raw, damp)


def factorize_residual(
    residual: torch.Tensor,
    *,
    method: str = "weight",
    hessian: torch.Tensor | DampedHessian | None = None,
    damp: float = 0.01,
    max_rank: int | None = None,
) -> ResidualFactors:
    """Factorize a residual ``[C_out, C_in, kh, kw]`` (or ``[C_out, K]``); see the module docstring.

    ``hessian`` (``[K, K]``, the im2col second moment, raw or from :func:`cora.quantizer.prepare_hessian`)
    is required for ``method="activation"``; it is dampened by ``damp * mean(diag(H))`` so that its
    Cholesky factor is invertible (a prepared one with the same ``damp`` is used as it is).
    ``max_rank``: keep only the top ``max_rank`` triplets (the factors still report ``full_rank = R``);
    far below ``R`` only those are computed. Float32 factors on the residual's device.
    """
    D = residual.detach().reshape(residual.shape[0], -1).to(torch.float64)
    K = D.shape[1]
    R = min(D.shape)
    if max_rank is not None:
        if max_rank < 0:
            raise ValueError(f"max_rank must be >= 0, got {max_rank}")
        max_rank = min(int(max_rank), R)
    if method == "weight":
        U, S, Vt = _svd(D, max_rank)
    elif method == "activation":
        if hessian is None:
            raise ValueError(f"activation-aware factorization needs a [{K}, {K}] hessian")
        h = _damped(hessian, damp, K)
        if h.L is None:
            raise torch.linalg.LinAlgError("activation-aware factorization: the dampened hessian is not positive definite")
        L = h.L.to(D.device)
        U, S, Vt = _svd(D @ L, max_rank)
        # Vt L^-1 via a triangular solve: X L = Vt  <=>  L^T X^T = Vt^T (only the kept rows).
        Vt = torch.linalg.solve_triangular(L.T, Vt.T, upper=True).T
    else:
        raise ValueError(f"unknown factorization {method!r}; choose 'weight' or 'activation'")
    return ResidualFactors(U.float(), S.float(), Vt.float(), tuple(residual.shape), full_rank=R)


def adapter_from_factors(factors: ResidualFactors, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` adapter: ``A`` ``[r, *weight_shape[1:]]`` and ``B`` ``[C_out, r]`` (float32).

    ``S^½`` is split evenly between the two factors so neither dominates the other's dynamic range
    (matters once they are stored in fp16).
    """
    if not 0 <= rank <= factors.stored_rank:
        limit = f" (truncated factorization of full rank {factors.full_rank})" if factors.truncated else ""
        raise ValueError(f"rank {rank} outside [0, {factors.stored_rank}]{limit}")
    root = factors.S[:rank].sqrt()
    A = (root.unsqueeze(1) * factors.Vt[:rank]).reshape(rank, *factors.weight_shape[1:])
    B = factors.U[:, :rank] * root
    return A.contiguous(), B.contiguous()


def regression_residual(
    weight: torch.Tensor,
    qweight: torch.Tensor,
    h_qq: torch.Tensor | DampedHessian,
    h_fq: torch.Tensor,
    damp: float = 0.01,
) -> torch.Tensor:
    """The full-rank correction ``C = W H_fq H_qq⁻¹ - Q`` that best maps quantized inputs to float outputs.

    With ``x_f`` the layer's input in the float model and ``x_q`` its input in the quantized model,
    ``E‖W x_f - (Q + C) x_q‖²`` is smallest at this ``C`` (``H_qq = E[x_q x_qᵀ]``, ``H_fq = E[x_f x_qᵀ]``),
    and for a rank-r ``C`` the objective equals a constant plus ``E‖(C* - C) x_q‖²``, so the best rank-r
    adapter is the activation-aware factorization of ``C*`` under ``H_qq``. When the inputs agree
    (``x_q = x_f``), ``C* = W - Q``: the plain residual. Shapes as in :func:`factorize_residual`;
    ``h_qq`` may be prepared once (:func:`cora.quantizer.prepare_hessian`) and passed on to
    :func:`factorize_residual` as well. Float32 on ``weight``'s device.
    """
    shape = weight.shape
    W = weight.detach().reshape(shape[0], -1).to(torch.float64)
    Q = qweight.detach().reshape(shape[0], -1).to(device=W.device, dtype=torch.float64)
    h = _damped(h_qq, damp, W.shape[1])
    if h.L is None:
        raise torch.linalg.LinAlgError("regression_residual: the dampened h_qq is not positive definite")
    L = h.L.to(W.device)
    target = W @ h_fq.detach().to(device=W.device, dtype=torch.float64)  # [C_out, K]
    C = torch.cholesky_solve(target.T, L).T - Q
    return C.reshape(shape).float()
