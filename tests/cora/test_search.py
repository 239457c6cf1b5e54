"""Rank search and integer rank allocation (cora/search.py)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from cora.calibration import model_logits
from cora.quantizer import compute_qparams, fake_quantize
from cora.residual import ResidualFactors, factorize_residual, full_rank
from cora.search import AdaptedLayer, _project, adapter_fraction, allocate_ranks, heuristic_ranks, search_ranks

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------- helpers
def _fake_layer(name: str, c_out: int, c_in: int, k: int) -> AdaptedLayer:
    """An AdaptedLayer whose factors have the right shapes (allocation only reads shapes)."""
    shape = (c_out, c_in, k, k)
    R = full_rank(shape)
    f = ResidualFactors(torch.zeros(c_out, R), torch.ones(R), torch.zeros(R, c_in * k * k), shape)
    return AdaptedLayer(name, torch.zeros(shape), f)


layer_shapes = st.lists(
    st.tuples(st.integers(1, 64), st.integers(1, 64), st.sampled_from([1, 3, 5])), min_size=1, max_size=8
)


def _layers_from(shapes):
    return [_fake_layer(f"l{i}", co, ci, k) for i, (co, ci, k) in enumerate(shapes)]


class ToyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.conv4 = nn.Conv2d(16, 24, 1, bias=True)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x))) + x
        x = torch.relu(self.conv4(x))
        return self.fc(x.mean((2, 3)))


def _toy_setup(seed=0, n=64, bits=2):
    torch.manual_seed(seed)
    model = ToyCNN().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial BN statistics
        for bn in (model.bn1, model.bn2, model.bn3):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    layers = []
    for name in ("conv1", "conv2", "conv3", "conv4"):
        w = model.get_submodule(name).weight.detach()
        s, z = compute_qparams(w, bits)
        qw = fake_quantize(w, s, z, bits)
        layers.append(AdaptedLayer(name, qw, factorize_residual(w - qw, method="weight")))
    conv_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    return model, layers, x, y, conv_params


# ---------------------------------------------------------------------------------- budget weights
def test_cost_per_rank_and_fraction():
    model, layers, *_ , conv_params = _toy_setup()
    for l in layers:
        conv = model.get_submodule(l.name)
        c_out, c_in, kh, kw = conv.weight.shape
        assert l.cost_per_rank == c_in * kh * kw + c_out
        assert l.full_rank == min(c_out, c_in * kh * kw)
    ranks = {l.name: l.full_rank // 2 for l in layers}
    expect = sum(r * (model.get_submodule(n).weight[0].numel() + model.get_submodule(n).weight.shape[0]) for n, r in ranks.items())
    assert adapter_fraction(ranks, layers, conv_params) == pytest.approx(expect / conv_params)


def test_budget_weights_match_design_formula():
    """Bud(rho) reported by the search is sum_l R_l (C_in kh kw + C_out) / P_conv * rho_l."""
    model, layers, x, y, conv_params = _toy_setup()
    rep = search_ranks(copy.deepcopy(model), layers, x, budget=0.1, conv_params=conv_params, iterations=3,
                       loss="ce", labels=y, progress=False)
    w = {}
    for l in layers:
        c_out, c_in, kh, kw = model.get_submodule(l.name).weight.shape
        w[l.name] = min(c_out, c_in * kh * kw) * (c_in * kh * kw + c_out) / conv_params
    bud = sum(w[n] * rep.cutoffs[n] for n in w)
    assert rep.continuous_budget == pytest.approx(bud, rel=1e-5)
    assert rep.trace[-1][2] == pytest.approx(bud, rel=1e-5)


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


def test_heuristic_ranks_equal_fractions():
    layers = [_fake_layer("a", 16, 16, 3), _fake_layer("b", 32, 16, 3), _fake_layer("c", 64, 32, 3), _fake_layer("d", 64, 64, 1)]
    conv_params = sum(math.prod(l.factors.weight_shape) for l in layers)
    for budget in (0.05, 0.1, 0.3):
        ranks = heuristic_ranks(layers, budget, conv_params)
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
    p = _project(x0, w, lo, hi, budget)
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


# ---------------------------------------------------------------------------------- the search
@pytest.mark.parametrize("budget_mode", ["project", "penalty"])
@pytest.mark.parametrize("loss", ["ce", "kl"])
def test_search_holds_budget_and_reports(budget_mode, loss):
    model, layers, x, y, conv_params = _toy_setup()
    teacher = model_logits(model, x) if loss == "kl" else None
    budget = 0.08
    rep = search_ranks(copy.deepcopy(model), layers, x, budget=budget, conv_params=conv_params, iterations=20,
                       batch_size=16, loss=loss, labels=y if loss == "ce" else None, teacher_logits=teacher,
                       budget_mode=budget_mode, progress=False)
    assert rep.adapter_fraction <= budget
    assert rep.adapter_fraction == pytest.approx(adapter_fraction(rep.ranks, layers, conv_params))
    assert rep.adapter_fraction > budget * 0.5  # the budget is used, not wasted
    for l in layers:
        assert 0 <= rep.ranks[l.name] <= l.full_rank
        assert 1.0 / l.full_rank - 1e-6 <= rep.cutoffs[l.name] <= 1.0 + 1e-6
    if budget_mode == "project":
        assert rep.continuous_budget <= budget * (1 + 1e-5)
        assert all(b <= budget * (1 + 1e-5) for _, _, b in rep.trace)
    assert rep.iterations == 20 and rep.images == x.shape[0] and rep.seconds > 0
    assert rep.trace and all(math.isfinite(t) for _, t, _ in rep.trace)


def test_search_penalty_mode_pulls_budget_down():
    """With the paper's penalty and a big lr the continuous budget drops from its initial value."""
    model, layers, x, y, conv_params = _toy_setup()
    rep = search_ranks(copy.deepcopy(model), layers, x, budget=0.02, conv_params=conv_params, iterations=20,
                       lr=0.05, gamma=10.0, loss="ce", labels=y, budget_mode="penalty", progress=False)
    first, last = rep.trace[0][2], rep.trace[-1][2]
    assert last < first
    assert rep.adapter_fraction <= 0.02


def test_search_repeatable_with_same_seed():
    model, layers, x, y, conv_params = _toy_setup()
    kw = dict(budget=0.1, conv_params=conv_params, iterations=15, batch_size=16, loss="ce", labels=y, progress=False, lr=0.05)
    a = search_ranks(copy.deepcopy(model), layers, x, seed=3, **kw)
    b = search_ranks(copy.deepcopy(model), layers, x, seed=3, **kw)
    assert a.ranks == b.ranks
    assert a.cutoffs == b.cutoffs
    assert [t[:2] for t in a.trace] == [t[:2] for t in b.trace]


def test_search_needs_labels_or_teacher():
    model, layers, x, y, conv_params = _toy_setup()
    with pytest.raises(ValueError, match="label"):
        search_ranks(copy.deepcopy(model), layers, x, budget=0.1, conv_params=conv_params, iterations=2,
                     loss="ce", labels=None, progress=False)
    with pytest.raises(ValueError, match="logits"):
        search_ranks(copy.deepcopy(model), layers, x, budget=0.1, conv_params=conv_params, iterations=2,
                     loss="kl", teacher_logits=None, progress=False)


def test_search_soft_conv_matches_quantized_plus_masked_residual():
    """After the swap, each adapted conv computes conv(x; Q(W) + U diag(S T^2) Vt)."""
    from cora.butterworth import butterworth_mask

    model, layers, x, y, conv_params = _toy_setup()
    sm = copy.deepcopy(model)
    search_ranks(sm, layers, x, budget=0.1, conv_params=conv_params, iterations=2, loss="ce", labels=y, progress=False)
    soft = sm.get_submodule("conv2")
    layer = layers[1]
    t = butterworth_mask(soft.rho.detach(), layer.full_rank, 4)
    w = layer.qweight + layer.factors.matrix(t * t)
    inp = torch.randn(2, 8, 9, 9)
    ref = torch.nn.functional.conv2d(inp, w, None, 2, 1)
    with torch.no_grad():
        out = soft(inp)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)
