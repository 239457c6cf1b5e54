"""The normalized Butterworth soft rank mask (cora/butterworth.py)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cora.butterworth import butterworth_mask

torch.set_num_threads(1)


@settings(max_examples=40, deadline=None)
@given(rank=st.integers(1, 300), rho=st.floats(0.01, 1.0), order=st.integers(1, 8))
def test_shape_first_and_monotone(rank, rho, order):
    t = butterworth_mask(torch.tensor(rho), rank, order)
    assert t.shape == (rank,) and t.dtype == torch.float32
    assert float(t[0]) == 1.0
    assert torch.isfinite(t).all() and (t > 0).all() and (t <= 1).all()
    assert (t[1:] <= t[:-1]).all()


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
