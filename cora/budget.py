"""The adapter budget: what a rank costs, and integer ranks that never exceed the budget.

A conv with weight ``[C_out, C_in, kh, kw]`` and an adapter of rank ``r`` stores ``r·(C_in·kh·kw +
C_out)`` adapter parameters; its full rank is ``R = min(C_out, C_in·kh·kw)``. A linear layer
``[out, in]`` is the same with ``kh = kw = 1``: ``r·(in + out)`` parameters, ``R = min(out, in)``.

The budget is a fraction of ``P`` (:func:`budget_weight_count`): the weight parameters of every
``nn.Conv2d`` of the model, and of every ``nn.Linear`` when linear layers are quantized
(``CoRaConfig.quantize_linear``, the default; with ``quantize_linear=False`` they stay float, get
no adapter and are not counted, so ``P`` is the conv weights alone). ``P`` depends on the model and
those layer kinds only, not on which layers are skipped or left without an adapter (skip patterns,
depthwise convs): the same model and budget always allow the same number of adapter parameters.
``Σ_l r_l·cost_l <= budget·P``. In the continuous form used by the search, a cutoff
``rho_l in [1/R_l, 1]`` costs ``w_l·rho_l`` with ``w_l = R_l·cost_l / P`` (:func:`cutoff_weights`).

:func:`allocate_ranks` turns any continuous demand into integer ranks that hold the budget
(projection onto the budget, floor, then a largest-remainder fill); :func:`uniform_ranks` is the
same fraction of the full rank at every layer. No layer can ever get more than
``floor(budget·P / cost)`` (:func:`affordable_rank`), so only that many singular triplets of its
residual need to be computed and stored. :func:`budget_shares` says which layers carry how much.

:func:`bits_breakdown` splits a converted model's equivalent bits per weight into what stores them
(codes at the base width, the extra code bits of layers left wider, scales and zero points, adapters).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .residual import ResidualFactors

__all__ = [
    "AdaptedLayer",
    "affordable_rank",
    "budget_weight_count",
    "cutoff_weights",
    "project_onto_budget",
    "allocate_ranks",
    "uniform_ranks",
    "adapter_fraction",
    "budget_shares",
    "BITS_PARTS",
    "bits_breakdown",
]

# The parts of the equivalent bits per weight, in the order reports print them (see bits_breakdown)
BITS_PARTS = ("codes", "wide", "scales", "adapters")


@dataclass
class AdaptedLayer:
    """One conv or linear layer that gets an adapter: its quantized weight and the factorization of its residual."""

    name: str
    qweight: torch.Tensor  # float32 Q(W) [C_out, C_in, kh, kw], or [out, in] for a linear layer
    factors: ResidualFactors

    @property
    def full_rank(self) -> int:
        """``R = min(C_out, C_in·kh·kw)`` (``min(out, in)``), also when the factorization stores fewer triplets."""
        return self.factors.full_rank

    @property
    def cost_per_rank(self) -> int:
        """Adapter parameters per unit of rank: ``C_in·kh·kw + C_out`` (``in + out``)."""
        shape = self.factors.weight_shape
        return math.prod(shape[1:]) + shape[0]


def affordable_rank(weight_shape: tuple[int, ...], budget: float, weight_params: int, *, margin: float = 1.0) -> int:
    """``min(R, floor(margin · budget·P / cost))`` for a conv weight ``[C_out, C_in, kh, kw]`` (or ``[out, in]``).

    At ``margin = 1`` the largest rank the layer can get under ``budget`` even if it took all of it
    (``cost = C_in·kh·kw + C_out`` parameters per rank, ``R = min(C_out, C_in·kh·kw)``); a larger
    ``margin`` also keeps directions the rank search's soft mask still weights
    (:func:`cora.search.mask_margin`). ``budget`` in ``[0, 1]``, ``weight_params`` (``P``) > 0.
    """
    if weight_params <= 0 or budget < 0 or margin < 1.0:
        raise ValueError(f"need weight_params > 0, budget >= 0, margin >= 1; got {weight_params}, {budget}, {margin}")
    k = math.prod(weight_shape[1:])
    R = min(weight_shape[0], k)
    # the 1e-9 keeps an exactly affordable rank whose float product lands just below the integer
    return min(R, int(math.floor(margin * budget * weight_params / (k + weight_shape[0]) + 1e-9)))


def budget_weight_count(model: nn.Module, *, linear: bool = True) -> int:
    """``P``, what the budget is a fraction of: the weight parameters of every ``nn.Conv2d`` of
    ``model``, plus those of every ``nn.Linear`` when ``linear`` (``CoRaConfig.quantize_linear``)."""
    kinds = (nn.Conv2d, nn.Linear) if linear else (nn.Conv2d,)
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, kinds))


def cutoff_weights(layers: list[AdaptedLayer], weight_params: int) -> torch.Tensor:
    """``w_l = R_l·cost_l / P`` (float32 ``[L]``): the budget a cutoff ``rho_l = 1`` spends."""
    return torch.tensor([l.full_rank * l.cost_per_rank / weight_params for l in layers])


def project_onto_budget(x: torch.Tensor, w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, budget: float) -> torch.Tensor:
    """Euclidean projection of ``x`` onto ``{w·x <= budget, lo <= x <= hi}`` (``w > 0``, all ``[L]``).

    The solution is ``clip(x - λ·w, lo, hi)`` with the smallest ``λ >= 0`` that meets the budget
    (KKT conditions); ``λ`` is found by bisection. If even ``lo`` exceeds the budget, ``lo`` is returned.
    """
    clipped = torch.minimum(torch.maximum(x, lo), hi)
    if float((w * clipped).sum()) <= budget:
        return clipped
    if float((w * lo).sum()) >= budget:
        return lo.clone()
    a, b = 0.0, float(((x - lo) / w).max())
    for _ in range(100):
        mid = 0.5 * (a + b)
        if float((w * torch.minimum(torch.maximum(x - mid * w, lo), hi)).sum()) > budget:
            a = mid
        else:
            b = mid
    return torch.minimum(torch.maximum(x - b * w, lo), hi)


def allocate_ranks(
    demand: dict[str, float], layers: list[AdaptedLayer], budget: float, weight_params: int, min_rank: int = 1
) -> dict[str, int]:
    """Integer ranks from a continuous demand (``rho_l · R_l``) with ``Σ r_l·cost_l <= budget·P``.

    The demand is first projected onto the budget, floored (at least ``min_rank`` where it fits), then
    the leftover budget is filled one rank at a time by largest remainder (demand minus rank), so the
    result stays as close to the demand as integers allow and never exceeds the budget.
    """
    limit = budget * weight_params
    cost = {l.name: l.cost_per_rank for l in layers}
    full = {l.name: l.full_rank for l in layers}
    names = [l.name for l in layers]
    x = torch.tensor([float(demand[n]) for n in names], dtype=torch.float64)
    c = torch.tensor([float(cost[n]) for n in names], dtype=torch.float64)
    R = torch.tensor([float(full[n]) for n in names], dtype=torch.float64)
    x = project_onto_budget(x, c, torch.zeros_like(x), R, limit)
    ranks = {n: min(full[n], max(min_rank, int(math.floor(float(v) + 1e-9)))) for n, v in zip(names, x)}
    want = dict(zip(names, (float(v) for v in x)))
    used = sum(ranks[n] * cost[n] for n in names)
    while used > limit:  # min_rank did not fit: take back from the most over-served layer
        n = max((n for n in names if ranks[n] > 0), key=lambda n: (ranks[n] - want[n], cost[n]))
        ranks[n] -= 1
        used -= cost[n]
    while True:  # fill what is left by largest remainder
        fits = [n for n in names if ranks[n] < full[n] and used + cost[n] <= limit]
        if not fits:
            break
        n = max(fits, key=lambda n: (want[n] - ranks[n], -cost[n]))
        ranks[n] += 1
        used += cost[n]
    return ranks


def uniform_ranks(layers: list[AdaptedLayer], budget: float, weight_params: int) -> dict[str, int]:
    """The same fraction of the full rank at every layer, sized to fill the budget."""
    total = sum(l.full_rank * l.cost_per_rank for l in layers)
    frac = min(1.0, budget * weight_params / total) if total else 0.0
    return allocate_ranks({l.name: frac * l.full_rank for l in layers}, layers, budget, weight_params)


def adapter_fraction(ranks: dict[str, int], layers: list[AdaptedLayer], weight_params: int) -> float:
    """Adapter parameters of ``ranks`` as a fraction of ``P``."""
    return sum(ranks[l.name] * l.cost_per_rank for l in layers) / weight_params


def budget_shares(ranks: dict[str, int], layers: list[AdaptedLayer], weight_params: int) -> dict[str, float]:
    """Each adapted layer's adapter parameters ``r_l·cost_l`` as a fraction of ``P`` (``layers``' order;
    0.0 at rank 0); they add up to :func:`adapter_fraction`."""
    return {l.name: ranks[l.name] * l.cost_per_rank / weight_params for l in layers}


def bits_breakdown(layers, bits: int) -> dict[str, float]:
    """The equivalent bits per weight of quantized ``layers``, split by what stores them (:data:`BITS_PARTS`).

    ``layers``: the converted ``CoRaConv2d`` / ``QuantLinear`` modules (anything with ``bits``,
    ``weight_shape``, ``storage_bits()`` and ``adapter_bits()``); ``bits``: the conversion's base width.
    Per weight of all of them (``N``):

    * ``codes``: ``Σ min(b_l, bits)·n_l / N``, the codes at the base width (``bits`` when no layer is narrower);
    * ``wide``: ``Σ max(b_l - bits, 0)·n_l / N``, what layers left wider than ``bits`` (``grouped_bits``,
      ``layer_bits``, mixed precision) add;
    * ``scales``: the scales and zero points (an fp16 scale and a b-bit zero per range);
    * ``adapters``: the adapter parameters at their storage width (with int8's scales).

    The parts add up to ``Σ storage_bits() / N``, the report's ``equiv_bits``. All zeros for no layers.
    """
    parts = dict.fromkeys(BITS_PARTS, 0)
    weights = 0
    for layer in layers:
        n = math.prod(layer.weight_shape)
        stored, adapter = layer.storage_bits(), layer.adapter_bits()
        parts["codes"] += min(layer.bits, bits) * n
        parts["wide"] += max(layer.bits - bits, 0) * n
        parts["adapters"] += adapter
        parts["scales"] += stored - adapter - layer.bits * n
        weights += n
    return {k: v / weights if weights else 0.0 for k, v in parts.items()}
