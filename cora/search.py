"""Differentiable rank search (design.md §1.3) and the integer rank allocation that holds the budget.

During the search each adapted conv computes ``conv(x; Q(W) + U diag(S·T²) Vt)`` — the quantized conv
plus its full-rank, softly masked adapter — as ONE conv, so a step costs about one float training step.
``T`` is the Butterworth mask of :mod:`cora.butterworth` with one trainable cutoff ``rho`` per layer.

Budget: ``Bud(rho) = Σ_l w_l rho_l`` with ``w_l = R_l (C_in·kh·kw + C_out) / P_conv``.

* ``budget_mode="penalty"`` (paper): loss ``+ gamma · exp(relu(Bud - Bud*))``; known to overshoot.
* ``budget_mode="project"`` (ours): after every optimizer step the cutoffs are projected (Euclidean) onto
  ``{rho : Bud(rho) <= Bud*, 1/R_l <= rho_l <= 1}``, so the task loss alone decides where the budget goes.

``optimizer="adam"`` is the paper's (per-cutoff steps, gradients clipped to ±grad_clip);
``optimizer="sgd"`` takes momentum steps along the gradient normalised by its largest entry, which keeps
the ratios between layers so the projected cutoffs settle at equal marginal value per unit of budget.

Either way :func:`allocate_ranks` turns the cutoffs into integer ranks whose cost never exceeds the
budget (a projection of the cutoffs, floor, then a largest-remainder fill).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._modules_util import set_submodule
from .butterworth import butterworth_mask
from .residual import ResidualFactors

__all__ = ["AdaptedLayer", "SearchReport", "allocate_ranks", "heuristic_ranks", "search_ranks", "Progress"]


@dataclass
class AdaptedLayer:
    """One conv that gets an adapter: its quantized weight and the factorized residual."""

    name: str
    qweight: torch.Tensor  # float32 Q(W) [C_out, C_in, kh, kw]
    factors: ResidualFactors

    @property
    def full_rank(self) -> int:
        return self.factors.rank

    @property
    def cost_per_rank(self) -> int:
        """Adapter parameters per unit of rank: ``C_in·kh·kw + C_out``."""
        shape = self.factors.weight_shape
        return math.prod(shape[1:]) + shape[0]


@dataclass
class SearchReport:
    method: str
    ranks: dict[str, int]
    budget: float
    adapter_fraction: float
    iterations: int = 0
    images: int = 0
    seconds: float = 0.0
    cutoffs: dict[str, float] = field(default_factory=dict)
    continuous_budget: float | None = None  # Bud(rho) at the end of the search, before allocation
    trace: list[tuple[int, float, float]] = field(default_factory=list)  # (iteration, loss, Bud)


class Progress:
    """Terse progress on stderr: an in-place line on a terminal, at most ~10 lines otherwise."""

    def __init__(self, total: int, label: str, enabled: bool = True) -> None:
        self.total, self.label, self.enabled = total, label, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.every = max(1, total // 10)
        self.start = time.perf_counter()

    def update(self, step: int, text: str) -> None:
        if not self.enabled:
            return
        line = f"{self.label} {step}/{self.total} {text} [{time.perf_counter() - self.start:.1f}s]"
        if self.tty:
            sys.stderr.write("\r" + line + " " * 4)
            if step == self.total:
                sys.stderr.write("\n")
        elif step % self.every == 0 or step == self.total or step == 1:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


# ---------------------------------------------------------------------- budget and allocation
def _project(x: torch.Tensor, w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, budget: float) -> torch.Tensor:
    """Euclidean projection of ``x`` onto ``{w·x <= budget, lo <= x <= hi}`` (``w > 0``).

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
    demand: dict[str, float], layers: list[AdaptedLayer], budget: float, conv_params: int, min_rank: int = 1
) -> dict[str, int]:
    """Integer ranks from a continuous demand (``rho_l · R_l``) with ``Σ r_l·cost_l <= budget·P_conv``.

    The demand is first projected onto the budget, floored (at least ``min_rank`` where it fits), then
    the leftover budget is filled one rank at a time by largest remainder (demand minus rank), so the
    result stays as close to the demand as integers allow and never exceeds the budget.
    """
    limit = budget * conv_params
    cost = {l.name: l.cost_per_rank for l in layers}
    full = {l.name: l.full_rank for l in layers}
    names = [l.name for l in layers]
    x = torch.tensor([float(demand[n]) for n in names], dtype=torch.float64)
    c = torch.tensor([float(cost[n]) for n in names], dtype=torch.float64)
    R = torch.tensor([float(full[n]) for n in names], dtype=torch.float64)
    x = _project(x, c, torch.zeros_like(x), R, limit)
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


def heuristic_ranks(layers: list[AdaptedLayer], budget: float, conv_params: int) -> dict[str, int]:
    """The baseline: the same fraction of the full rank at every layer, sized to the budget."""
    total = sum(l.full_rank * l.cost_per_rank for l in layers)
    frac = min(1.0, budget * conv_params / total) if total else 0.0
    return allocate_ranks({l.name: frac * l.full_rank for l in layers}, layers, budget, conv_params)


def adapter_fraction(ranks: dict[str, int], layers: list[AdaptedLayer], conv_params: int) -> float:
    return sum(ranks[l.name] * l.cost_per_rank for l in layers) / conv_params


# ---------------------------------------------------------------------- the search
class _SoftAdapterConv(nn.Module):
    """``conv(x; Q(W) + U diag(S·T(rho)²) Vt)`` with a trainable cutoff ``rho``."""

    def __init__(self, conv: nn.Conv2d, layer: AdaptedLayer, rho_init: float, order: int) -> None:
        super().__init__()
        self.conv, self.order, self.rank = conv, order, layer.full_rank
        conv.weight.requires_grad_(False)
        self.register_buffer("qweight", layer.qweight.to(conv.weight.device))
        self.register_buffer("us", layer.factors.U.to(conv.weight.device))
        self.register_buffer("s", layer.factors.S.to(conv.weight.device))
        self.register_buffer("vt", layer.factors.Vt.to(conv.weight.device))
        self.rho = nn.Parameter(torch.tensor(float(rho_init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = butterworth_mask(self.rho, self.rank, self.order)
        w = self.qweight + ((self.us * (self.s * t * t)) @ self.vt).reshape(self.qweight.shape)
        return self.conv._conv_forward(x, w, self.conv.bias)


def search_ranks(
    search_model: nn.Module,
    layers: list[AdaptedLayer],
    inputs: torch.Tensor,
    *,
    budget: float,
    conv_params: int,
    iterations: int = 250,
    batch_size: int = 32,
    lr: float = 0.01,
    order: int = 4,
    gamma: float = 1.0,
    grad_clip: float = 0.2,
    rho_init: float | None = 0.9,
    loss: str = "kl",
    labels: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    budget_mode: str = "project",
    optimizer: str = "adam",
    bn_mode: str = "train",
    seed: int = 0,
    progress: bool = True,
) -> SearchReport:
    """Search one cutoff per adapted conv; returns ranks that hold ``budget`` and a report.

    ``search_model`` is a throw-away copy of the model whose non-adapted quantized layers already
    hold their quantized weights; the adapted convs (by name in ``layers``) are swapped for soft ones
    here. ``inputs`` ``[N, ...]`` are the calibration images; ``labels`` ``[N]`` (int64) are needed
    for ``loss="ce"``, ``teacher_logits`` ``[N, classes]`` (the float model's) for ``loss="kl"``.
    """
    if loss == "ce" and labels is None:
        raise ValueError("the cross-entropy search loss needs labelled calibration data (or use loss='kl')")
    if loss == "kl" and teacher_logits is None:
        raise ValueError("the KL search loss needs the float model's logits")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # anything stochastic inside the model (e.g. dropout) repeats too
    for p in search_model.parameters():
        p.requires_grad_(False)
    w = torch.tensor([l.full_rank * l.cost_per_rank / conv_params for l in layers])
    if rho_init is None:
        # Start from the uniform allocation that exactly fills the budget (the heuristic baseline),
        # so that the search only has to move budget between layers.
        rho_init = min(1.0, budget / float(w.sum()))
    soft = {}
    for layer in layers:
        conv = search_model.get_submodule(layer.name)
        soft[layer.name] = _SoftAdapterConv(conv, layer, max(rho_init, 1.0 / layer.full_rank), order)
        set_submodule(search_model, layer.name, soft[layer.name])
    names = [l.name for l in layers]
    rhos = [soft[n].rho for n in names]
    lo = torch.tensor([1.0 / l.full_rank for l in layers])
    hi = torch.ones(len(layers))
    if optimizer == "adam":
        opt = torch.optim.Adam(rhos, lr=lr)
    elif optimizer == "sgd":
        # Plain momentum SGD on gradients normalised by their largest entry: unlike Adam, whose
        # per-coordinate scaling equalises the layers' step sizes, this keeps the *ratios* of the
        # layers' gradients, so with the projection the cutoffs settle where every layer's marginal
        # loss reduction per unit of budget is equal (the KKT point of the budgeted problem).
        opt = torch.optim.SGD(rhos, lr=lr, momentum=0.9)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose 'adam' or 'sgd'")
    search_model.train(bn_mode == "train")
    n = inputs.shape[0]
    bs = min(batch_size, n)
    order_idx = torch.randperm(n, generator=gen)
    pos = 0
    report = SearchReport("cora", {}, budget, 0.0, iterations=iterations, images=n)
    bar = Progress(iterations, "rank search", progress)
    start = time.perf_counter()
    for it in range(1, iterations + 1):
        if pos + bs > n:
            order_idx, pos = torch.randperm(n, generator=gen), 0
        idx = order_idx[pos : pos + bs]
        pos += bs
        out = search_model(inputs[idx])
        if loss == "ce":
            task = F.cross_entropy(out, labels[idx])
        else:
            task = F.kl_div(F.log_softmax(out, -1), F.log_softmax(teacher_logits[idx], -1), log_target=True, reduction="batchmean")
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
            vec = _project(vec, w, lo, hi, budget) if budget_mode == "project" else torch.minimum(torch.maximum(vec, lo), hi)
            for r, v in zip(rhos, vec):
                r.copy_(v)
            bud_now = float((w * vec).sum())
        if it == 1 or it % max(1, iterations // 25) == 0 or it == iterations:
            report.trace.append((it, float(task.detach()), bud_now))
        bar.update(it, f"loss {float(task.detach()):.4f} budget {bud_now:.4f}/{budget:.4f}")
    report.seconds = time.perf_counter() - start
    cut = {nm: float(r.detach()) for nm, r in zip(names, rhos)}
    report.cutoffs = cut
    report.continuous_budget = float((w * torch.tensor([cut[nm] for nm in names])).sum())
    demand = {l.name: cut[l.name] * l.full_rank for l in layers}
    report.ranks = allocate_ranks(demand, layers, budget, conv_params)
    report.adapter_fraction = adapter_fraction(report.ranks, layers, conv_params)
    return report
