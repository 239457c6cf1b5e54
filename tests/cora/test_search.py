"""The differentiable rank search and its Butterworth soft mask (cora/search.py)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cora.budget import adapter_fraction
from cora.calibration import Objective, model_logits
from cora.config import SearchConfig
from cora.search import butterworth_mask, search_ranks
from tests.helpers import toy_setup
from tests.tolerances import FLOAT64_ULPS_RTOL

torch.set_num_threads(1)


def _ce(y):
    return Objective("ce", labels=y)


# ---------------------------------------------------------------------------------- the mask
@settings(max_examples=40, deadline=None)
@given(rank=st.integers(1, 300), rho=st.floats(0.01, 1.0), order=st.integers(1, 8))
def test_shape_first_and_monotone(rank, rho, order):
    t = butterworth_mask(torch.tensor(rho), rank, order)
    assert t.shape == (rank,) and t.dtype == torch.float32
    assert float(t[0]) == 1.0
    assert torch.isfinite(t).all() and (t > 0).all() and (t <= 1).all()
    # monotone up to one float32 ulp: the vectorised body and the scalar tail of the pow may round an
    # entry differently (the same cause as test_mask_count_is_the_head_of_the_full_mask's slack)
    assert (t[1:] <= torch.nextafter(t[:-1], torch.tensor(float("inf")))).all()


@pytest.mark.parametrize("rank", [8, 20, 64, 100])
@pytest.mark.parametrize("order", [1, 2, 4, 6])
def test_half_power_at_cutoff(rank, order):
    for k in (1, rank // 4, rank // 2, rank - 1):
        if k < 1:
            continue
        rho = k / rank
        t = butterworth_mask(torch.tensor(rho, dtype=torch.float64), rank, order)
        assert float(t[k]) == pytest.approx(1 / math.sqrt(2), rel=1e-9)
        # the formula at every index
        i = torch.arange(rank, dtype=torch.float64)
        ref = 1 / torch.sqrt(1 + ((i / rank) / rho) ** (2 * order))
        assert torch.allclose(t, ref, rtol=1e-12)


def test_order_changes_steepness():
    rank, rho = 50, 0.4
    k = int(rho * rank)
    masks = {n: butterworth_mask(torch.tensor(rho, dtype=torch.float64), rank, n) for n in (1, 2, 4, 8)}
    for lo_n, hi_n in ((1, 2), (2, 4), (4, 8)):
        lo, hi = masks[lo_n], masks[hi_n]
        # higher order: closer to 1 before the cutoff, closer to 0 after it
        assert (hi[1:k] > lo[1:k]).all()
        assert (hi[k + 1 :] < lo[k + 1 :]).all()
        assert float(hi[k]) == pytest.approx(float(lo[k]), rel=1e-9)


@pytest.mark.parametrize("order", [1, 4])
def test_gradient_wrt_rho_positive(order):
    rank = 32
    for rho0 in (0.1, 0.5, 0.9):
        rho = torch.tensor(rho0, dtype=torch.float64, requires_grad=True)
        t = butterworth_mask(rho, rank, order)
        t.sum().backward()
        assert rho.grad is not None and float(rho.grad) > 0
        # each entry i > 0 individually increases with rho
        rho2 = torch.tensor(rho0, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(lambda r: butterworth_mask(r, rank, order), rho2)
        assert float(jac[0]) == 0.0
        assert (jac[1:] > 0).all()
        # raising the cutoff raises the mask
        up = butterworth_mask(torch.tensor(rho0 + 0.05, dtype=torch.float64), rank, order)
        base = butterworth_mask(torch.tensor(rho0, dtype=torch.float64), rank, order)
        assert (up[1:] > base[1:]).all() and float(up[0]) == float(base[0]) == 1.0


@pytest.mark.parametrize("rank", [0, -3])
def test_rank_below_one_raises(rank):
    with pytest.raises(ValueError, match="rank"):
        butterworth_mask(torch.tensor(0.5), rank)


def test_rank_one():
    t = butterworth_mask(torch.tensor(1.0), 1)
    assert t.tolist() == [1.0]


# ---------------------------------------------------------------------------------- the search
def test_budget_weights_match_the_formula():
    """Bud(rho) reported by the search is sum_l R_l (C_in kh kw + C_out) / P_conv * rho_l."""
    model, layers, x, y, conv_params = toy_setup()
    rep = search_ranks(copy.deepcopy(model), layers, x, _ce(y), budget=0.1, weight_params=conv_params,
                       settings=SearchConfig(iterations=3), progress=False)
    w = {}
    for l in layers:
        c_out, c_in, kh, kw = model.get_submodule(l.name).weight.shape
        w[l.name] = min(c_out, c_in * kh * kw) * (c_in * kh * kw + c_out) / conv_params
    bud = sum(w[n] * rep.cutoffs[n] for n in w)
    assert rep.continuous_budget == pytest.approx(bud, rel=1e-5)
    assert rep.trace[-1][2] == pytest.approx(bud, rel=1e-5)


@pytest.mark.parametrize("budget_mode", ["project", "penalty"])
@pytest.mark.parametrize("loss", ["ce", "kl"])
def test_search_holds_budget_and_reports(budget_mode, loss):
    model, layers, x, y, conv_params = toy_setup()
    objective = _ce(y) if loss == "ce" else Objective("kl", teacher_logits=model_logits(model, x))
    budget = 0.08
    rep = search_ranks(copy.deepcopy(model), layers, x, objective, budget=budget, weight_params=conv_params,
                       settings=SearchConfig(iterations=20, batch_size=16, budget_mode=budget_mode), progress=False)
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_search_with_the_model_on_cuda():
    """Model, images and labels on the GPU (the cutoffs stay on the CPU): the search runs and holds the budget."""
    model, layers, x, y, conv_params = toy_setup()
    rep = search_ranks(copy.deepcopy(model).cuda(), layers, x.cuda(), _ce(y.cuda()), budget=0.08,
                       weight_params=conv_params, settings=SearchConfig(iterations=5, batch_size=16), progress=False)
    assert 0 < rep.adapter_fraction <= 0.08
    assert all(math.isfinite(t) for _, t, _ in rep.trace)


def test_search_penalty_mode_pulls_budget_down():
    """With the paper's penalty and a big lr the continuous budget drops from its initial value."""
    model, layers, x, y, conv_params = toy_setup()
    rep = search_ranks(copy.deepcopy(model), layers, x, _ce(y), budget=0.02, weight_params=conv_params,
                       settings=SearchConfig(iterations=20, lr=0.05, gamma=10.0, budget_mode="penalty"), progress=False)
    first, last = rep.trace[0][2], rep.trace[-1][2]
    assert last < first
    assert rep.adapter_fraction <= 0.02


def test_search_repeatable_with_same_seed():
    model, layers, x, y, conv_params = toy_setup()
    kw = dict(budget=0.1, weight_params=conv_params, settings=SearchConfig(iterations=15, batch_size=16, lr=0.05), progress=False)
    a = search_ranks(copy.deepcopy(model), layers, x, _ce(y), seed=3, **kw)
    b = search_ranks(copy.deepcopy(model), layers, x, _ce(y), seed=3, **kw)
    assert a.ranks == b.ranks
    assert a.cutoffs == b.cutoffs
    assert [t[:2] for t in a.trace] == [t[:2] for t in b.trace]


def test_search_soft_conv_matches_quantized_plus_masked_residual():
    """After the swap, each adapted conv computes conv(x; Q(W) + U diag(S T^2) Vt)."""
    model, layers, x, y, conv_params = toy_setup()
    sm = copy.deepcopy(model)
    search_ranks(sm, layers, x, _ce(y), budget=0.1, weight_params=conv_params, settings=SearchConfig(iterations=2),
                 progress=False)
    soft = sm.get_submodule("conv2")
    layer = layers[1]
    t = butterworth_mask(soft.rho.detach(), layer.full_rank, 4)
    w = layer.qweight + layer.factors.matrix(t * t)
    inp = torch.randn(2, 8, 9, 9)
    ref = torch.nn.functional.conv2d(inp, w, None, 2, 1)
    with torch.no_grad():
        out = soft(inp)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------- truncated factors
@settings(max_examples=30, deadline=None)
@given(rank=st.integers(1, 300), rho=st.floats(0.01, 1.0), order=st.integers(1, 8), frac=st.floats(0.0, 1.0))
def test_mask_count_is_the_head_of_the_full_mask(rank, rho, order, frac):
    count = int(frac * rank)
    full = butterworth_mask(torch.tensor(rho, dtype=torch.float64), rank, order)
    head = butterworth_mask(torch.tensor(rho, dtype=torch.float64), rank, order, count)
    assert head.shape == (count,)
    # equal up to float64 rounding: the vectorised pow / rsqrt may round an entry of a shorter tensor differently
    torch.testing.assert_close(head, full[:count], rtol=FLOAT64_ULPS_RTOL, atol=0.0)


def test_mask_margin_bounds_the_dropped_weight():
    from cora.search import mask_margin

    for order in (1, 2, 4, 8):
        m = mask_margin(order, 1e-3)
        # a cutoff at its affordable rank a (rho*R = a): the weight T^2 at index m*a is the tail
        t = butterworth_mask(torch.tensor(0.01, dtype=torch.float64), 10000, order)
        assert float(t[round(m * 100)] ** 2) == pytest.approx(1e-3, rel=0.05)
    assert mask_margin(4) == pytest.approx(999 ** 0.125)


def _truncated(layers, budget, conv_params, order=4):
    from cora.budget import AdaptedLayer, affordable_rank
    from cora.residual import factorize_residual
    from cora.search import mask_margin

    out = []
    for l in layers:
        m = affordable_rank(l.factors.weight_shape, budget, conv_params, margin=mask_margin(order))
        residual = l.factors.matrix()
        out.append(AdaptedLayer(l.name, l.qweight, factorize_residual(residual, max_rank=m)))
    return out


def test_soft_conv_masks_stored_triplets_over_the_full_rank():
    """A truncated layer: conv(x; Q(W) + U_m diag(S_m T_m^2) Vt_m) with T indexed over R, not m."""
    model, layers, x, y, conv_params = toy_setup()
    trunc = _truncated(layers, 0.1, conv_params)
    layer = trunc[1]
    assert layer.factors.truncated and layer.full_rank == 16
    sm = copy.deepcopy(model)
    search_ranks(sm, trunc, x, _ce(y), budget=0.1, weight_params=conv_params, settings=SearchConfig(iterations=2), progress=False)
    soft = sm.get_submodule("conv2")
    t = butterworth_mask(soft.rho.detach(), layer.full_rank, 4)[: layer.factors.stored_rank]
    w = layer.qweight + layer.factors.matrix(t * t)
    inp = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        out = soft(inp)
    assert torch.allclose(out, torch.nn.functional.conv2d(inp, w, None, 2, 1), rtol=1e-4, atol=1e-5)
    wrong = layer.qweight + layer.factors.matrix(butterworth_mask(soft.rho.detach(), layer.factors.stored_rank, 4) ** 2)
    assert not torch.allclose(out, torch.nn.functional.conv2d(inp, wrong, None, 2, 1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("budget", [0.05, 0.1])
def test_search_outcome_unchanged_by_truncation(budget):
    """Dropping the triplets beyond mask_margin × the affordable rank leaves the searched ranks as they were."""
    model, layers, x, y, conv_params = toy_setup()
    trunc = _truncated(layers, budget, conv_params)
    assert any(l.factors.truncated for l in trunc)
    kw = dict(budget=budget, weight_params=conv_params, settings=SearchConfig(iterations=30, batch_size=16), progress=False)
    full = search_ranks(copy.deepcopy(model), layers, x, _ce(y), **kw)
    cut = search_ranks(copy.deepcopy(model), trunc, x, _ce(y), **kw)
    assert cut.ranks == full.ranks
    for n in full.cutoffs:
        assert cut.cutoffs[n] == pytest.approx(full.cutoffs[n], abs=0.05)


# ---------------------------------------------------------------------------------- linear layers
def _linear_setup(seed=0, bits=2):
    """ToyCNN with its fc adapted too (a linear [10, 24]); P counts conv and linear weights."""
    from cora.budget import AdaptedLayer, budget_weight_count
    from cora.quantizer import compute_qparams, fake_quantize
    from cora.residual import factorize_residual

    model, layers, x, y, _ = toy_setup(seed, bits=bits)
    w = model.fc.weight.detach()
    s, z = compute_qparams(w, bits)
    qw = fake_quantize(w, s, z, bits)
    layers = layers + [AdaptedLayer("fc", qw, factorize_residual(w - qw, method="weight"))]
    return model, layers, x, y, budget_weight_count(model)


def test_soft_adapter_linear_is_the_masked_linear():
    """The search's linear stand-in computes linear(x; Q + U diag(S T²) Vt) + bias (float64 direct computation)."""
    from cora.search import _SoftAdapterLinear
    from tests.tolerances import assert_close_rel

    model, layers, *_ = _linear_setup()
    fc = copy.deepcopy(model.fc)
    layer = layers[-1]
    soft = _SoftAdapterLinear(fc, layer, 0.4, 4)
    x = torch.randn(6, 24, generator=torch.Generator().manual_seed(9))
    t = butterworth_mask(torch.tensor(0.4, dtype=torch.float64), layer.full_rank, 4)
    f = layer.factors
    w = layer.qweight.double() + (f.U.double() * (f.S.double() * t * t)) @ f.Vt.double()
    ref = x.double() @ w.T + fc.bias.detach().double()
    with torch.no_grad():
        assert_close_rel(soft(x), ref, torch.float32)
    soft(x).square().sum().backward()
    assert soft.rho.grad is not None and float(soft.rho.grad) != 0.0


def test_search_with_a_linear_layer_holds_the_budget():
    model, layers, x, y, P = _linear_setup()
    kw = dict(budget=0.1, weight_params=P, settings=SearchConfig(iterations=15, batch_size=16, lr=0.05), progress=False)
    rep = search_ranks(copy.deepcopy(model), layers, x, _ce(y), **kw)
    assert set(rep.ranks) == {l.name for l in layers} and rep.ranks["fc"] >= 1
    assert sum(rep.ranks[l.name] * l.cost_per_rank for l in layers) <= 0.1 * P
    assert rep.adapter_fraction == pytest.approx(adapter_fraction(rep.ranks, layers, P))
    from cora.budget import cutoff_weights

    start = max(min(1.0, 0.1 / float(cutoff_weights(layers, P).sum())), 1.0 / layers[-1].full_rank)
    assert rep.cutoffs["fc"] != pytest.approx(start, rel=1e-3)  # the task loss moved the linear's cutoff
