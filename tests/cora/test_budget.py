"""Budget arithmetic and integer rank allocation (cora/budget.py)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cora.budget import (
    AdaptedLayer,
    adapter_fraction,
    allocate_ranks,
    budget_shares,
    budget_weight_count,
    cutoff_weights,
    project_onto_budget,
    uniform_ranks,
)
from cora.residual import ResidualFactors
from tests.helpers import fake_adapted_layer, toy_setup

torch.set_num_threads(1)

layer_shapes = st.lists(
    st.tuples(st.integers(1, 64), st.integers(1, 64), st.sampled_from([1, 3, 5])), min_size=1, max_size=8
)


def _layers_from(shapes):
    return [fake_adapted_layer(f"l{i}", co, ci, k) for i, (co, ci, k) in enumerate(shapes)]


def _fake_linear(name: str, out: int, inp: int) -> AdaptedLayer:
    """An AdaptedLayer of a linear weight ``[out, in]`` (allocation only reads shapes)."""
    R = min(out, inp)
    factors = ResidualFactors(torch.zeros(out, R), torch.ones(R), torch.zeros(R, inp), (out, inp))
    return AdaptedLayer(name, torch.zeros(out, inp), factors)


# ---------------------------------------------------------------------------------- budget weights
def test_cost_per_rank_and_fraction():
    model, layers, *_ , conv_params = toy_setup()
    for l in layers:
        conv = model.get_submodule(l.name)
        c_out, c_in, kh, kw = conv.weight.shape
        assert l.cost_per_rank == c_in * kh * kw + c_out
        assert l.full_rank == min(c_out, c_in * kh * kw)
    ranks = {l.name: l.full_rank // 2 for l in layers}
    weights = {n: model.get_submodule(n).weight for n in ranks}
    expect = sum(r * (weights[n][0].numel() + weights[n].shape[0]) for n, r in ranks.items())
    assert adapter_fraction(ranks, layers, conv_params) == pytest.approx(expect / conv_params)


# ---------------------------------------------------------------------------------- allocation
@settings(max_examples=150, deadline=None)
@given(
    shapes=layer_shapes,
    budget=st.floats(0.0005, 1.0),
    demand_frac=st.lists(st.floats(0.0, 1.5), min_size=8, max_size=8),
    min_rank=st.sampled_from([0, 1]),
)
def test_allocate_ranks_holds_and_fills_budget(shapes, budget, demand_frac, min_rank):
    layers = _layers_from(shapes)
    conv_params = sum(math.prod(l.factors.weight_shape) for l in layers)
    demand = {l.name: demand_frac[i] * l.full_rank for i, l in enumerate(layers)}
    ranks = allocate_ranks(demand, layers, budget, conv_params, min_rank=min_rank)
    assert set(ranks) == {l.name for l in layers}
    limit = budget * conv_params
    used = sum(ranks[l.name] * l.cost_per_rank for l in layers)
    assert used <= limit + 1e-9
    assert adapter_fraction(ranks, layers, conv_params) <= budget + 1e-12
    for l in layers:
        assert isinstance(ranks[l.name], int)
        assert 0 <= ranks[l.name] <= l.full_rank
        # filled: no single remaining rank would still fit
        if ranks[l.name] < l.full_rank:
            assert used + l.cost_per_rank > limit, (l.name, ranks, used, limit)


@settings(max_examples=60, deadline=None)
@given(shapes=layer_shapes, demand_frac=st.lists(st.floats(0.0, 1.0), min_size=8, max_size=8))
def test_allocate_ranks_respects_feasible_integer_demand(shapes, demand_frac):
    """A demand that already fits gets at least its floor at every layer."""
    layers = _layers_from(shapes)
    conv_params = sum(math.prod(l.factors.weight_shape) for l in layers)
    demand = {l.name: float(max(1, math.floor(demand_frac[i] * l.full_rank))) for i, l in enumerate(layers)}
    cost = sum(demand[l.name] * l.cost_per_rank for l in layers)
    budget = min(1.0, cost / conv_params * 1.001)
    if cost > conv_params:
        return
    ranks = allocate_ranks(demand, layers, budget, conv_params)
    for l in layers:
        assert ranks[l.name] >= demand[l.name]


def test_allocate_ranks_all_fit():
    layers = _layers_from([(8, 4, 3), (16, 8, 1)])
    conv_params = sum(math.prod(l.factors.weight_shape) for l in layers)
    ranks = allocate_ranks({l.name: 1e6 for l in layers}, layers, 1.0, conv_params)
    # budget 1 is larger than all full-rank adapters? not always; but never more than full rank
    assert all(ranks[l.name] <= l.full_rank for l in layers)
    tiny = allocate_ranks({l.name: 3.0 for l in layers}, layers, 1e-6, conv_params)
    assert all(r == 0 for r in tiny.values())


def test_uniform_ranks_equal_fractions():
    shapes = (("a", 16, 16, 3), ("b", 32, 16, 3), ("c", 64, 32, 3), ("d", 64, 64, 1))
    layers = [fake_adapted_layer(n, co, ci, k) for n, co, ci, k in shapes]
    conv_params = sum(math.prod(l.factors.weight_shape) for l in layers)
    for budget in (0.05, 0.1, 0.3):
        ranks = uniform_ranks(layers, budget, conv_params)
        assert adapter_fraction(ranks, layers, conv_params) <= budget
        total = sum(l.full_rank * l.cost_per_rank for l in layers)
        frac = budget * conv_params / total
        for l in layers:
            assert abs(ranks[l.name] - frac * l.full_rank) <= 1.0 + 1e-9, (l.name, ranks, frac)
        fracs = [ranks[l.name] / l.full_rank for l in layers]
        assert max(fracs) - min(fracs) <= max(2.0 / l.full_rank for l in layers) + 1e-9


# ---------------------------------------------------------------------------------- projection
@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    n=st.integers(1, 10),
    budget_frac=st.floats(0.0, 1.5),
)
def test_project_satisfies_constraints_and_is_closest(seed, n, budget_frac):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, generator=g, dtype=torch.float64) + 0.01
    lo = torch.rand(n, generator=g, dtype=torch.float64) * 0.2
    hi = lo + torch.rand(n, generator=g, dtype=torch.float64) + 0.01
    x0 = torch.randn(n, generator=g, dtype=torch.float64)
    budget = float((w * lo).sum() + budget_frac * (w * (hi - lo)).sum())
    p = project_onto_budget(x0, w, lo, hi, budget)
    assert (p >= lo - 1e-12).all() and (p <= hi + 1e-12).all()
    if float((w * lo).sum()) < budget:
        assert float((w * p).sum()) <= budget * (1 + 1e-12) + 1e-12
        # no random feasible point is closer to x0
        d = float((p - x0).norm())
        for _ in range(20):
            y = lo + torch.rand(n, generator=g, dtype=torch.float64) * (hi - lo)
            if float((w * y).sum()) <= budget:
                assert d <= float((y - x0).norm()) + 1e-9
        # the box-clamped point is returned unchanged when it already fits
        c = torch.minimum(torch.maximum(x0, lo), hi)
        if float((w * c).sum()) <= budget:
            assert torch.equal(p, c)
        else:
            assert float((w * p).sum()) == pytest.approx(budget, rel=1e-9, abs=1e-12)  # the budget is active


def test_budget_weight_count_and_cutoff_weights():
    """P counts conv and linear weights (conv weights only with linear=False); w_l = R_l (C_in kh kw + C_out) / P."""
    model, layers, *_ = toy_setup()
    # ToyCNN by hand: conv1 8·3·3·3, conv2 16·8·3·3, conv3 16·16·3·3, conv4 24·16·1·1; fc 10·24
    p_conv = 216 + 1152 + 2304 + 384
    assert budget_weight_count(model, linear=False) == p_conv
    assert budget_weight_count(model) == p_conv + 240
    w = cutoff_weights(layers, p_conv)
    for l, wl in zip(layers, w.tolist()):
        c_out, c_in, kh, kw = model.get_submodule(l.name).weight.shape
        assert wl == pytest.approx(min(c_out, c_in * kh * kw) * (c_in * kh * kw + c_out) / p_conv, rel=1e-6)


def test_linear_layers_cost_and_shares():
    """A linear layer [out, in] costs in + out per rank, full rank min(out, in); the shares add up to the fraction."""
    lin, conv = _fake_linear("fc", 10, 64), fake_adapted_layer("conv", 16, 8, 3)
    assert (lin.cost_per_rank, lin.full_rank) == (74, 10)
    P = 16 * 8 * 9 + 10 * 64
    ranks = {"fc": 3, "conv": 2}
    shares = budget_shares(ranks, [conv, lin], P)
    assert list(shares) == ["conv", "fc"]
    assert shares["fc"] == pytest.approx(3 * 74 / P) and shares["conv"] == pytest.approx(2 * (72 + 16) / P)
    assert sum(shares.values()) == pytest.approx(adapter_fraction(ranks, [conv, lin], P))
    assert budget_shares({"fc": 0, "conv": 0}, [conv, lin], P) == {"conv": 0.0, "fc": 0.0}


@settings(max_examples=40, deadline=None)
@given(shapes=layer_shapes, linears=st.lists(st.tuples(st.integers(1, 128), st.integers(1, 128)), min_size=1, max_size=4),
       budget=st.floats(0.001, 1.0), demand_frac=st.lists(st.floats(0.0, 1.0), min_size=12, max_size=12))
def test_allocation_with_linear_layers_holds_the_budget(shapes, linears, budget, demand_frac):
    """Convs and linear layers together: P counts both, and neither allocation ever exceeds budget·P."""
    layers = _layers_from(shapes) + [_fake_linear(f"fc{i}", o, i_) for i, (o, i_) in enumerate(linears)]
    P = sum(math.prod(l.factors.weight_shape) for l in layers)
    demand = {l.name: f * l.full_rank for l, f in zip(layers, demand_frac)}
    for ranks in (allocate_ranks(demand, layers, budget, P), uniform_ranks(layers, budget, P)):
        assert sum(ranks[l.name] * l.cost_per_rank for l in layers) <= budget * P + 1e-9
        assert all(0 <= ranks[l.name] <= l.full_rank for l in layers)
        assert sum(budget_shares(ranks, layers, P).values()) == pytest.approx(adapter_fraction(ranks, layers, P))


# ---------------------------------------------------------------------------------- affordable rank
@pytest.mark.parametrize("shape,budget,conv_params,margin,expect", [
    ((512, 512, 3, 3), 0.05, 11_166_912, 1.0, 109),  # resnet18 layer4: 558345.6 / 5120 = 109.05
    ((512, 512, 3, 3), 0.05, 11_166_912, 2.0, 218),  # 218.1
    ((64, 64, 3, 3), 0.05, 11_166_912, 1.0, 64),  # 872.4 > R = 64
    ((100, 20, 1, 1), 0.5, 2400, 1.0, 10),  # exactly 1200 / 120 = 10
    ((100, 20, 1, 1), 0.3, 1000, 1.0, 2),  # 300 / 120 = 2.5
    ((8, 3, 3, 3), 0.01, 1000, 1.0, 0),  # 10 / 35 < 1: no rank is affordable
])
def test_affordable_rank_hand_computed(shape, budget, conv_params, margin, expect):
    from cora.budget import affordable_rank

    assert affordable_rank(shape, budget, conv_params, margin=margin) == expect


@settings(max_examples=40, deadline=None)
@given(shapes=layer_shapes, budget=st.floats(0.001, 1.0), demand_frac=st.lists(st.floats(0.0, 1.0), min_size=8, max_size=8))
def test_no_allocation_exceeds_the_affordable_rank(shapes, budget, demand_frac):
    """allocate_ranks never gives a layer more than affordable_rank: truncating there loses nothing."""
    from cora.budget import affordable_rank

    layers = _layers_from(shapes)
    conv_params = sum(math.prod(l.factors.weight_shape) for l in layers)
    demand = {l.name: demand_frac[i] * l.full_rank * 5 for i, l in enumerate(layers)}
    for ranks in (allocate_ranks(demand, layers, budget, conv_params), uniform_ranks(layers, budget, conv_params)):
        for l in layers:
            assert ranks[l.name] <= affordable_rank(l.factors.weight_shape, budget, conv_params)


def test_truncated_factors_keep_the_full_rank_for_the_budget():
    """A layer whose factorization stores fewer triplets still costs and reports R (cutoff weights)."""
    from cora.budget import AdaptedLayer
    from cora.residual import factorize_residual

    g = torch.Generator().manual_seed(9)
    w = torch.randn(32, 8, 3, 3, generator=g)
    full = AdaptedLayer("a", w, factorize_residual(w))
    part = AdaptedLayer("a", w, factorize_residual(w, max_rank=4))
    assert part.factors.stored_rank == 4 and part.full_rank == full.full_rank == 32
    assert torch.equal(cutoff_weights([part], 10_000), cutoff_weights([full], 10_000))
    assert uniform_ranks([part], 0.01, 10_000) == uniform_ranks([full], 0.01, 10_000)
