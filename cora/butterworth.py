"""The soft rank mask of the search: a normalized Butterworth low-pass over singular-value indices."""
from __future__ import annotations

import torch

__all__ = ["butterworth_mask"]


def butterworth_mask(rho: torch.Tensor, rank: int, order: int = 4) -> torch.Tensor:
    """``T_i = 1 / sqrt(1 + ((i / R) / rho)^(2n))`` for ``i = 0..R-1`` (float32 ``[R]``).

    ``rho`` is a scalar tensor (the cutoff as a fraction of the full rank ``R``, differentiable);
    ``T_0 = 1``, ``T`` decreases monotonically in ``i`` and equals ``1/sqrt(2)`` at ``i / R = rho``.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    idx = torch.arange(rank, dtype=rho.dtype, device=rho.device) / rank
    return torch.rsqrt(1.0 + (idx / rho) ** (2 * order))
