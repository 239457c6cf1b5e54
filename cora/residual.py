"""Residual adapters (Theorem 1): factorize ``dW = W - Q(W)`` into a k×k conv A and a 1×1 conv B.

``dW`` ``[C_out, C_in, kh, kw]`` is unfolded along the output channel to ``D`` ``[C_out, K]`` with
``K = C_in*kh*kw`` in PyTorch order ``(C_in, kh, kw)``. A factorization ``D = U diag(S) Vt`` with
``U`` ``[C_out, R]``, ``S`` ``[R]``, ``Vt`` ``[R, K]``, ``R = min(C_out, K)`` gives, for any rank
``r <= R``, ``A = diag(S_r^½) Vt_r`` folded to ``[r, C_in, kh, kw]`` (a conv with the layer's stride,
padding and dilation) and ``B = U_r diag(S_r^½)`` as ``[C_out, r, 1, 1]``; at ``r = R``,
``conv1x1(conv(x; A); B) == conv(x; dW)`` exactly (up to float rounding).

Two factorizations:

* ``"weight"`` (the paper): the SVD of ``D``; the top-r part is the best rank-r adapter in weight
  space (Eckart–Young).
* ``"activation"``: with ``H = E[x xᵀ] = L Lᵀ`` the second moment of the layer's im2col inputs, the SVD
  of ``D L = U S Vᵀ`` mapped back with ``Vt = Vᵀ L⁻¹``; the top-r part minimises ``E‖(D - BA) x‖²``,
  i.e. the error of the layer's *output* on the calibration inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ResidualFactors", "factorize_residual", "adapter_from_factors", "full_rank", "regression_residual"]


@dataclass
class ResidualFactors:
    """``D = U diag(S) Vt`` (float32, CPU). ``S`` is sorted in decreasing order."""

    U: torch.Tensor  # [C_out, R]
    S: torch.Tensor  # [R]
    Vt: torch.Tensor  # [R, K]
    weight_shape: tuple[int, ...]  # [C_out, C_in, kh, kw]

    @property
    def rank(self) -> int:
        return int(self.S.numel())

    def matrix(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """``U diag(S * weights) Vt`` reshaped to the weight shape (``weights`` ``[R]``, differentiable)."""
        s = self.S if weights is None else self.S * weights
        return ((self.U * s) @ self.Vt).reshape(self.weight_shape)


def full_rank(weight_shape: tuple[int, ...]) -> int:
    """``R = min(C_out, C_in*kh*kw)`` for a conv weight shape."""
    c_out = weight_shape[0]
    k = 1
    for d in weight_shape[1:]:
        k *= d
    return min(c_out, k)


def factorize_residual(
    residual: torch.Tensor,
    *,
    method: str = "weight",
    hessian: torch.Tensor | None = None,
    damp: float = 0.01,
) -> ResidualFactors:
    """Factorize a residual ``[C_out, C_in, kh, kw]`` (or ``[C_out, K]``); see the module docstring.

    ``hessian`` (``[K, K]``, the im2col second moment) is required for ``method="activation"``; it is
    dampened by ``damp * mean(diag(H))`` so that its Cholesky factor is invertible.
    """
    D = residual.detach().reshape(residual.shape[0], -1).to(torch.float64)
    K = D.shape[1]
    if method == "weight":
        U, S, Vt = torch.linalg.svd(D, full_matrices=False)
    elif method == "activation":
        if hessian is None or hessian.shape != (K, K):
            raise ValueError(f"activation-aware factorization needs a [{K}, {K}] hessian")
        H = hessian.detach().to(torch.float64)
        mean_diag = float(torch.diag(H).mean()) if K else 1.0
        H = H + torch.eye(K, dtype=H.dtype) * max(damp * mean_diag, 1e-12)
        L = torch.linalg.cholesky(H)
        U, S, Vt = torch.linalg.svd(D @ L, full_matrices=False)
        # Vt L^-1 via a triangular solve: X L = Vt  <=>  L^T X^T = Vt^T.
        Vt = torch.linalg.solve_triangular(L.T, Vt.T, upper=True).T
    else:
        raise ValueError(f"unknown factorization {method!r}; choose 'weight' or 'activation'")
    return ResidualFactors(U.float(), S.float(), Vt.float(), tuple(residual.shape))


def adapter_from_factors(factors: ResidualFactors, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` adapter: ``A`` ``[r, *weight_shape[1:]]`` and ``B`` ``[C_out, r]`` (float32).

    ``S^½`` is split evenly between the two factors so neither dominates the other's dynamic range
    (matters once they are stored in fp16).
    """
    if not 0 <= rank <= factors.rank:
        raise ValueError(f"rank {rank} outside [0, {factors.rank}]")
    root = factors.S[:rank].sqrt()
    A = (root.unsqueeze(1) * factors.Vt[:rank]).reshape(rank, *factors.weight_shape[1:])
    B = factors.U[:, :rank] * root
    return A.contiguous(), B.contiguous()


def regression_residual(
    weight: torch.Tensor, qweight: torch.Tensor, h_qq: torch.Tensor, h_fq: torch.Tensor, damp: float = 0.01
) -> torch.Tensor:
    """The full-rank correction ``C = W H_fq H_qq⁻¹ - Q`` that best maps quantized inputs to float outputs.

    With ``x_f`` the layer's input in the float model and ``x_q`` its input in the quantized model,
    ``E‖W x_f - (Q + C) x_q‖²`` is smallest at this ``C`` (``H_qq = E[x_q x_qᵀ]``, ``H_fq = E[x_f x_qᵀ]``),
    and for a rank-r ``C`` the objective equals a constant plus ``E‖(C* - C) x_q‖²``, so the best rank-r
    adapter is the activation-aware factorization of ``C*`` under ``H_qq``. When the inputs agree
    (``x_q = x_f``), ``C* = W - Q``: the plain residual. Shapes as in :func:`factorize_residual`.
    """
    shape = weight.shape
    W = weight.detach().reshape(shape[0], -1).to(torch.float64)
    Q = qweight.detach().reshape(shape[0], -1).to(torch.float64)
    H = h_qq.detach().to(torch.float64)
    K = H.shape[0]
    H = H + torch.eye(K, dtype=H.dtype) * max(damp * float(torch.diag(H).mean()), 1e-12)
    target = W @ h_fq.detach().to(torch.float64)  # [C_out, K]
    L = torch.linalg.cholesky(H)
    C = torch.cholesky_solve(target.T, L).T - Q
    return C.reshape(shape).float()
