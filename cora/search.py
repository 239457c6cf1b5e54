"""Differentiable rank search: one soft cutoff per adapted layer, trained on the task loss under the budget.

Each adapted conv's (or linear layer's) singular values are softly masked by a normalised Butterworth low-pass over
their index, ``T_i = 1 / sqrt(1 + ((i / R) / rho)^(2n))`` (:func:`butterworth_mask`), with one
trainable cutoff ``rho`` per layer. During the search the layer computes
``conv(x; Q(W) + U diag(S·T²) Vt)``, the quantized conv plus its full-rank, softly masked adapter, as
ONE conv (``linear(x; Q(W) + U diag(S·T²) Vt)`` for a linear layer), so a step costs about one float
training step.

* ``budget_mode="penalty"`` (the paper): loss ``+ gamma · exp(relu(Bud - Bud*))``; known to overshoot.
* ``budget_mode="project"`` (ours): after every optimizer step the cutoffs are projected (Euclidean) onto
  ``{rho : Bud(rho) <= Bud*, 1/R_l <= rho_l <= 1}`` (:mod:`cora.budget`), so the task loss alone
  decides where the budget goes.

``optimizer="adam"`` is the paper's (per-cutoff steps, gradients clipped to ±grad_clip);
``optimizer="sgd"`` takes momentum steps along the gradient normalised by its largest entry, which keeps
the ratios between layers so the projected cutoffs settle at equal marginal value per unit of budget.

Either way :func:`cora.budget.allocate_ranks` turns the final cutoffs into integer ranks whose cost
never exceeds the budget.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._modules_util import kept_modes
from .budget import AdaptedLayer, adapter_fraction, allocate_ranks, cutoff_weights, project_onto_budget
from .calibration import Objective
from .config import SearchConfig
from .progress import progress_bar
from .layout import preferred_layout

__all__ = ["butterworth_mask", "mask_margin", "SearchReport", "search_ranks"]


def butterworth_mask(rho: torch.Tensor, rank: int, order: int = 4, count: int | None = None) -> torch.Tensor:
    """``T_i = 1 / sqrt(1 + ((i / R) / rho)^(2n))`` for ``i = 0..count-1`` (``[count]``, ``rho``'s dtype).

    ``rho`` is a scalar tensor (the cutoff as a fraction of the full rank ``R = rank``, differentiable);
    ``T_0 = 1``, ``T`` decreases monotonically in ``i`` and equals ``1/sqrt(2)`` at ``i / R = rho``.
    ``count`` (default ``R``): only the first entries, for a truncated factorization; the index is
    still normalised by the full rank ``R``.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    count = rank if count is None else count
    if not 0 <= count <= rank:
        raise ValueError(f"count must be in [0, {rank}], got {count}")
    idx = torch.arange(count, dtype=rho.dtype, device=rho.device) / rank
    return torch.rsqrt(1.0 + (idx / rho) ** (2 * order))


def mask_margin(order: int = 4, tail: float = 1e-3) -> float:
    """How far past a layer's affordable rank ``a`` its triplets must be kept for the search.

    Within the budget a layer's cutoff is at most ``rho·R <= a``, so at an index ``i >= m·a`` the soft
    weight ``T_i² = 1 / (1 + (i / (rho·R))^(2n))`` is at most ``1 / (1 + m^(2n))``; this returns the
    ``m`` that makes that ``tail``: ``(1/tail - 1)^(1/(2n))`` (2.37 for the default order 4).
    """
    if order < 1 or not 0.0 < tail < 1.0:
        raise ValueError(f"need order >= 1 and 0 < tail < 1, got {order}, {tail}")
    return (1.0 / tail - 1.0) ** (1.0 / (2 * order))


@dataclass
class SearchReport:
    """What the search did: the integer ``ranks`` and the final ``cutoffs``, the achieved
    ``adapter_fraction``, ``continuous_budget`` (``Bud(rho)`` before the integer allocation) and a
    ``trace`` of ``(iteration, task loss, Bud)``."""

    method: str
    ranks: dict[str, int]
    budget: float
    adapter_fraction: float
    iterations: int = 0
    images: int = 0
    seconds: float = 0.0
    cutoffs: dict[str, float] = field(default_factory=dict)
    continuous_budget: float | None = None
    trace: list[tuple[int, float, float]] = field(default_factory=list)


# ---------------------------------------------------------------------- the search
class _SoftAdapterConv(nn.Module):
    """``conv(x; Q(W) + U diag(S·T(rho)²) Vt)`` with a trainable cutoff ``rho``.

    ``T`` is indexed over the full rank ``R`` and applied to the stored triplets only (a truncated
    factorization has dropped the tail no budget can afford).
    """

    def __init__(self, conv: nn.Conv2d | nn.Linear, layer: AdaptedLayer, rho_init: float, order: int) -> None:
        super().__init__()
        self.conv, self.order, self.rank = conv, order, layer.full_rank
        self.count = layer.factors.stored_rank
        conv.weight.requires_grad_(False)
        self.register_buffer("qweight", layer.qweight.to(conv.weight.device))
        self.register_buffer("us", layer.factors.U.to(conv.weight.device))
        self.register_buffer("s", layer.factors.S.to(conv.weight.device))
        self.register_buffer("vt", layer.factors.Vt.to(conv.weight.device))
        self.rho = nn.Parameter(torch.tensor(float(rho_init)))

    def masked_weight(self) -> torch.Tensor:
        """``Q(W) + U diag(S·T²) Vt`` float32, the layer's weight shape (differentiable in ``rho``)."""
        # rho lives on the CPU with the optimiser's other small tensors (bounds, costs); the mask follows the weight
        t = butterworth_mask(self.rho, self.rank, self.order, self.count).to(self.s.device)
        return self.qweight + ((self.us * (self.s * t * t)) @ self.vt).reshape(self.qweight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv._conv_forward(x, self.masked_weight(), self.conv.bias)


class _SoftAdapterLinear(_SoftAdapterConv):
    """``linear(x; Q(W) + U diag(S·T(rho)²) Vt)`` with a trainable cutoff ``rho`` (``W`` ``[out, in]``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight(), self.conv.bias)


def search_ranks(
    search_model: nn.Module,
    layers: list[AdaptedLayer],
    inputs: torch.Tensor,
    objective: Objective,
    *,
    budget: float,
    weight_params: int,
    settings: SearchConfig = SearchConfig(),
    seed: int = 0,
    progress: bool = True,
) -> SearchReport:
    """Search one cutoff per adapted layer; returns ranks that hold ``budget`` and a report.

    ``search_model`` is a throw-away copy of the model whose non-adapted quantized layers already
    hold their quantized weights; the adapted convs and linear layers (by name in ``layers``) are
    swapped for soft ones here. ``weight_params``: ``P``, what ``budget`` is a fraction of
    (:func:`cora.budget.budget_weight_count`). ``inputs`` ``[N, ...]`` are the calibration images and
    ``objective`` the task loss on them (cross-entropy to their labels or KL to the float logits).
    ``settings``: iterations, batch size, optimizer, budget mode and the rest (``settings.loss`` is not
    read: ``objective`` is the loss).
    """
    iterations, batch_size, optimizer = settings.iterations, settings.batch_size, settings.optimizer
    budget_mode, grad_clip, gamma, rho_init = settings.budget_mode, settings.grad_clip, settings.gamma, settings.rho_init
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # anything stochastic inside the model (e.g. dropout) repeats too
    for p in search_model.parameters():
        p.requires_grad_(False)
    w = cutoff_weights(layers, weight_params)
    if rho_init is None:
        # Start from the uniform allocation that exactly fills the budget (the uniform ranks),
        # so that the search only has to move budget between layers.
        rho_init = min(1.0, budget / float(w.sum()))
    soft = {}
    for layer in layers:
        mod = search_model.get_submodule(layer.name)
        kind = _SoftAdapterLinear if isinstance(mod, nn.Linear) else _SoftAdapterConv
        soft[layer.name] = kind(mod, layer, max(rho_init, 1.0 / layer.full_rank), settings.order)
        search_model.set_submodule(layer.name, soft[layer.name])
    names = [l.name for l in layers]
    rhos = [soft[n].rho for n in names]
    lo = torch.tensor([1.0 / l.full_rank for l in layers])
    hi = torch.ones(len(layers))
    if optimizer == "adam":
        opt = torch.optim.Adam(rhos, lr=settings.lr)
    elif optimizer == "sgd":
        # Plain momentum SGD on gradients normalised by their largest entry: unlike Adam, whose
        # per-coordinate scaling equalises the layers' step sizes, this keeps the *ratios* of the
        # layers' gradients, so with the projection the cutoffs settle where every layer's marginal
        # loss reduction per unit of budget is equal (the KKT point of the budgeted problem).
        opt = torch.optim.SGD(rhos, lr=settings.lr, momentum=0.9)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose 'adam' or 'sgd'")
    # channels-last batches where the model computes the same on them (probed in eval mode: no BatchNorm
    # statistics or RNG touched): faster CPU convs, the same result up to float summation order
    with kept_modes(search_model, train=False):
        inputs = inputs.contiguous(memory_format=preferred_layout(search_model, inputs))
    search_model.train(settings.bn_mode == "train")
    n = inputs.shape[0]
    bs = min(batch_size, n)
    order_idx = torch.randperm(n, generator=gen)
    pos = 0
    report = SearchReport("search", {}, budget, 0.0, iterations=iterations, images=n)
    bar = progress_bar(iterations, "rank search", progress)
    start = time.perf_counter()
    for it in range(1, iterations + 1):
        if pos + bs > n:
            order_idx, pos = torch.randperm(n, generator=gen), 0
        idx = order_idx[pos : pos + bs]
        pos += bs
        task = objective(search_model(inputs[idx]), idx)
        bud = (w * torch.stack(rhos)).sum()
        total = task + gamma * torch.exp(F.relu(bud - budget)) if budget_mode == "penalty" else task
        opt.zero_grad(set_to_none=True)
        total.backward()
        for r in rhos:
            if r.grad is None:  # a layer this batch never reached
                r.grad = torch.zeros_like(r)
        if optimizer == "adam":
            for r in rhos:
                r.grad.clamp_(-grad_clip, grad_clip)
        else:
            peak = max(float(r.grad.abs()) for r in rhos)
            for r in rhos:
                r.grad.div_(peak + 1e-12)
        opt.step()
        with torch.no_grad():
            vec = torch.stack([r.detach() for r in rhos])
            if budget_mode == "project":
                vec = project_onto_budget(vec, w, lo, hi, budget)
            else:
                vec = torch.minimum(torch.maximum(vec, lo), hi)
            for r, v in zip(rhos, vec):
                r.copy_(v)
            bud_now = float((w * vec).sum())
        if it == 1 or it % max(1, iterations // 25) == 0 or it == iterations:
            report.trace.append((it, float(task.detach()), bud_now))
        bar.set_postfix_str(f"loss {float(task.detach()):.4f} budget {bud_now:.4f}/{budget:.4f}", refresh=False)
        bar.update(1)
    bar.close()
    report.seconds = time.perf_counter() - start
    cut = {nm: float(r.detach()) for nm, r in zip(names, rhos)}
    report.cutoffs = cut
    report.continuous_budget = float((w * torch.tensor([cut[nm] for nm in names])).sum())
    demand = {l.name: cut[l.name] * l.full_rank for l in layers}
    report.ranks = allocate_ranks(demand, layers, budget, weight_params)
    report.adapter_fraction = adapter_fraction(report.ranks, layers, weight_params)
    return report
