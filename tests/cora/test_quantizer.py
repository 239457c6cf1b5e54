"""Properties of the uniform affine quantizer and the GPTQ-style rounding (cora/quantizer.py)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cora.quantizer import compute_qparams, dequantize, fake_quantize, gptq_quantize, qmax, quantize
from tests.tolerances import rel_err

torch.set_num_threads(1)

BITS = (2, 3, 4, 8)
METHODS = ("minmax", "std", "mse")


def _weight(seed: int, shape=(6, 3, 3, 3), scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale + offset


def _rows(w, per_channel):
    return w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)


# ---------------------------------------------------------------------------------- qparams / codes
@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    bits=st.sampled_from(BITS),
    per_channel=st.booleans(),
    method=st.sampled_from(METHODS),
    scale=st.floats(1e-3, 1e2),
    offset=st.floats(-2.0, 2.0),
    c_out=st.integers(1, 6),
    k=st.integers(1, 40),
)
def test_codes_in_range_and_param_layout(seed, bits, per_channel, method, scale, offset, c_out, k):
    w = _weight(seed, (c_out, k), scale, offset * scale)
    s, z = compute_qparams(w, bits, per_channel=per_channel, method=method)
    assert s.shape == (c_out,) and z.shape == (c_out,)
    assert s.dtype == torch.float32 and z.dtype == torch.float32
    assert torch.isfinite(s).all() and (s > 0).all()
    # zero is an integer representable in b bits
    assert torch.equal(z, torch.round(z)) and (z >= 0).all() and (z <= qmax(bits)).all()
    # scale is exactly representable in fp16 (how it is stored)
    assert torch.equal(s, s.half().float())
    if not per_channel:
        assert (s == s[0]).all() and (z == z[0]).all()
    q = quantize(w, s, z, bits)
    assert q.dtype == torch.uint8 and q.shape == w.shape
    assert int(q.min()) >= 0 and int(q.max()) <= 2**bits - 1
    deq = dequantize(q, s, z)
    assert torch.isfinite(deq).all()
    assert torch.equal(fake_quantize(w, s, z, bits), deq)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("per_channel", [True, False])
def test_minmax_error_at_most_half_step(bits, per_channel):
    for seed in range(4):
        w = _weight(100 + seed, (8, 4, 3, 3), scale=0.3, offset=0.05 * seed)
        s, z = compute_qparams(w, bits, per_channel=per_channel, method="minmax")
        err = (fake_quantize(w, s, z, bits) - w).abs()
        step = s.view(-1, 1, 1, 1)
        # min-max range (extended to contain 0) covers every weight; the fp16 rounding of the scale
        # may shrink the grid by at most 2^-11 relative, i.e. qmax * 2^-11 steps at the top end.
        slack = step * (0.5 + qmax(bits) * 2.0**-10) + 1e-6
        assert (err <= slack).all(), float((err - step / 2).max())
        # and strictly: nothing beyond the range edges
        rows = _rows(w, per_channel)
        lo = min(0.0, float(rows.min()))
        hi = max(0.0, float(rows.max()))
        assert float(fake_quantize(w, s, z, bits).max()) <= hi + float(s.max())
        assert float(fake_quantize(w, s, z, bits).min()) >= lo - float(s.max())


@pytest.mark.parametrize("bits", BITS)
def test_minmax_error_bound_inside_range_hypothesis(bits):
    @settings(max_examples=20, deadline=None)
    @given(seed=st.integers(0, 10**6), c=st.integers(1, 5), k=st.integers(2, 30), mag=st.floats(1e-2, 10))
    def inner(seed, c, k, mag):
        w = _weight(seed, (c, k), mag)
        s, z = compute_qparams(w, bits, per_channel=True, method="minmax")
        err = (fake_quantize(w, s, z, bits) - w).abs()
        assert (err <= s[:, None] * (0.5 + qmax(bits) * 2.0**-10) + 1e-6 * mag).all()

    inner()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_std_range_clips_with_small_k(bits):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(1, 2000, generator=g)
    w[0, 0] = 25.0  # outlier
    w[0, 1] = -25.0
    s_small, z_small = compute_qparams(w, bits, per_channel=False, method="std", std_k=2.0)
    s_big, _ = compute_qparams(w, bits, per_channel=False, method="std", std_k=50.0)
    s_mm, _ = compute_qparams(w, bits, per_channel=False, method="minmax")
    mean, std = float(w.mean()), float(w.std(unbiased=False))
    # k=2: range ~ mean +- 2 std, so the scale is ~4 std / qmax and the outliers are clipped
    expect = (min(mean + 2 * std, 25.0) - max(mean - 2 * std, -25.0)) / qmax(bits)
    assert float(s_small[0]) == pytest.approx(expect, rel=2e-3)
    fq = fake_quantize(w, s_small, z_small, bits)
    assert float(fq.max()) < 25.0 / 2 and float(fq.min()) > -25.0 / 2  # clipped
    # k large: clipped to the real range => same as min-max
    assert torch.equal(s_big, s_mm)
    assert float(s_small[0]) < float(s_big[0])


def test_std_k_monotone():
    w = _weight(3, (4, 200))
    prev = None
    for k in (0.5, 1.0, 2.0, 3.0):
        s, _ = compute_qparams(w, 4, per_channel=True, method="std", std_k=k)
        if prev is not None:
            assert (s >= prev).all()
        prev = s


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("per_channel", [True, False])
def test_mse_error_not_worse_than_minmax_per_row(bits, per_channel):
    for seed in range(3):
        w = _weight(200 + seed, (6, 2, 3, 3))
        w[0, 0, 0, 0] = 6.0  # an outlier row where clipping pays off
        rows_w = _rows(w, per_channel)
        errs = {}
        for m in ("minmax", "mse"):
            s, z = compute_qparams(w, bits, per_channel=per_channel, method=m)
            e = _rows(fake_quantize(w, s, z, bits) - w, per_channel)
            errs[m] = (e**2).sum(1)
        assert (errs["mse"] <= errs["minmax"] * (1 + 1e-5) + 1e-10).all(), (errs, rows_w.shape)
    # with an outlier and low bits, the search must actually find something better
    s, z = compute_qparams(w, 2, per_channel=True, method="mse")
    s2, z2 = compute_qparams(w, 2, per_channel=True, method="minmax")
    e_mse = ((fake_quantize(w, s, z, 2) - w) ** 2)[0].sum()
    e_mm = ((fake_quantize(w, s2, z2, 2) - w) ** 2)[0].sum()
    assert e_mse < e_mm


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("per_channel", [True, False])
def test_zero_and_constant_tensors(method, bits, per_channel):
    zeros = torch.zeros(4, 3, 3, 3)
    s, z = compute_qparams(zeros, bits, per_channel=per_channel, method=method)
    assert torch.isfinite(s).all() and (s > 0).all() and torch.isfinite(z).all()
    fq = fake_quantize(zeros, s, z, bits)
    assert torch.equal(fq, zeros)  # zeros reproduce exactly
    for c in (0.37, -2.5, 1e-3):
        const = torch.full((4, 3, 3, 3), c)
        s, z = compute_qparams(const, bits, per_channel=per_channel, method=method)
        assert torch.isfinite(s).all() and (s > 0).all()
        q = quantize(const, s, z, bits)
        assert int(q.max()) <= qmax(bits)
        fq = fake_quantize(const, s, z, bits)
        assert torch.isfinite(fq).all()
        # the range [min(0,c), max(0,c)] is exactly c wide: constant reproduced to within half a step
        assert float((fq - const).abs().max()) <= 0.5 * float(s.max()) + abs(c) * 2e-3
    # a row of zeros among non-zero rows (per channel) stays exactly zero
    w = _weight(5, (4, 3, 3, 3))
    w[2] = 0.0
    s, z = compute_qparams(w, bits, per_channel=True, method=method)
    assert torch.equal(fake_quantize(w, s, z, bits)[2], torch.zeros(3, 3, 3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("method", METHODS)
def test_nonfinite_weights_raise(bad, method):
    w = _weight(9, (4, 8))
    w[1, 3] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        compute_qparams(w, 4, method=method)


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_bad_bits_raise(bits):
    with pytest.raises(ValueError):
        compute_qparams(_weight(1, (2, 4)), bits)


def test_unknown_method_raises():
    with pytest.raises(ValueError, match="range method"):
        compute_qparams(_weight(1, (2, 4)), 4, method="percentile")


# ---------------------------------------------------------------------------------- GPTQ
def _correlated_inputs(seed, k, n=4000):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / math.sqrt(k)
    base = torch.randn(n, k, generator=g)
    x = base @ mix + 0.3 * torch.randn(n, 1, generator=g)  # correlated, with a shared component
    x = x * torch.linspace(0.2, 2.0, k)  # unequal column magnitudes (act_order matters)
    return x.double()


def _out_err(w, q, h):
    d = (w.double() - q.double()).reshape(w.shape[0], -1)
    return float(torch.trace(d @ h @ d.T))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_beats_rtn_on_output_error(bits, act_order):
    for seed in range(2):
        k = 48
        x = _correlated_inputs(seed, k)
        h = x.T @ x / x.shape[0]
        w = _weight(300 + seed, (16, k))
        s, z = compute_qparams(w, bits, per_channel=True, method="minmax")
        codes = gptq_quantize(w, h, s, z, bits, act_order=act_order, block_size=16)
        assert codes.dtype == torch.uint8 and codes.shape == w.shape
        assert int(codes.max()) <= qmax(bits)
        q_gptq = dequantize(codes, s, z)
        q_rtn = fake_quantize(w, s, z, bits)
        e_g, e_r = _out_err(w, q_gptq, h), _out_err(w, q_rtn, h)
        assert e_g < 0.9 * e_r, (e_g, e_r)


def test_gptq_conv_weight_shape():
    w = _weight(11, (8, 3, 3, 3))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 27, generator=g).double()
    h = x.T @ x / 500
    s, z = compute_qparams(w, 4)
    codes = gptq_quantize(w, h, s, z, 4)
    assert codes.shape == w.shape
    assert _out_err(w, dequantize(codes, s, z), h) <= _out_err(w, fake_quantize(w, s, z, 4), h)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_diagonal_hessian_within_one_step(bits, act_order):
    w = _weight(21, (10, 30))
    h = torch.diag(torch.linspace(0.5, 3.0, 30)).double()
    s, z = compute_qparams(w, bits, per_channel=True, method="minmax")
    codes = gptq_quantize(w, h, s, z, bits, act_order=act_order, damp=0.01)
    q = dequantize(codes, s, z)
    # no correlation to exploit: at most one grid step away from W (in practice round to nearest)
    assert ((q - w).abs() <= s[:, None] * 1.001 + 1e-6).all()
    rtn = quantize(w, s, z, bits)
    assert (codes.int() - rtn.int()).abs().max() <= 1


def test_gptq_exact_identity_hessian_equals_rtn():
    w = _weight(22, (6, 20))
    s, z = compute_qparams(w, 4)
    codes = gptq_quantize(w, torch.eye(20, dtype=torch.float64), s, z, 4, damp=0.0)
    assert torch.equal(codes, quantize(w, s, z, 4))


def test_gptq_dead_columns_and_bad_shape():
    k = 12
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, k, generator=g).double()
    x[:, 4] = 0.0  # a dead input
    h = x.T @ x / 300
    w = _weight(23, (5, k))
    s, z = compute_qparams(w, 3)
    codes = gptq_quantize(w, h, s, z, 3)
    assert int(codes.max()) <= 7
    # the weights of a dead input never matter: they are set to (the code of) 0
    assert torch.equal(dequantize(codes, s, z)[:, 4], torch.zeros(5))
    with pytest.raises(ValueError, match="hessian"):
        gptq_quantize(w, h[:-1, :-1], s, z, 3)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bits,mag", [(4, 1e6), (2, 3e5), (8, 1e8)])
def test_huge_weights_never_quantize_to_nan(method, bits, mag):
    """Scales are stored in float16 (max 65504): a range beyond 65504 * qmax must not silently give NaN."""
    w = _weight(31, (4, 50), scale=mag)
    try:
        s, z = compute_qparams(w, bits, method=method)
    except ValueError as exc:
        assert "float16" in str(exc) or "range" in str(exc)
        return
    assert torch.isfinite(s).all()
    assert torch.isfinite(fake_quantize(w, s, z, bits)).all()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mag", [1e3, 1e-4])
def test_scale_invariance_of_relative_error(method, mag):
    """Far from the fp16 limits, the relative quantization error does not depend on the weight scale."""
    w = _weight(32, (6, 60))
    errs = []
    for m in (1.0, mag):
        s, z = compute_qparams(w * m, 4, method=method)
        errs.append(float((fake_quantize(w * m, s, z, 4) - w * m).norm() / (w * m).norm()))
    assert errs[1] == pytest.approx(errs[0], rel=0.05)


# ---------------------------------------------------------------------------------- shared Cholesky
def test_prepare_hessian_factors_the_damped_matrix():
    from cora.quantizer import prepare_hessian

    x = _correlated_inputs(5, 24)
    h = x.T @ x / x.shape[0]
    dh = prepare_hessian(h, 0.05)
    shift = 0.05 * float(torch.diag(h).mean())
    assert dh.shift == pytest.approx(shift, rel=1e-12) and dh.damp == 0.05 and torch.equal(dh.raw, h)
    damped = h + shift * torch.eye(24, dtype=torch.float64)
    assert rel_err(dh.L @ dh.L.T, damped) <= 1e-12
    assert rel_err(dh.inverse() @ damped, torch.eye(24, dtype=torch.float64)) <= 1e-10
    assert dh.inverse() is dh.inverse()  # computed once
    assert prepare_hessian(-torch.eye(4, dtype=torch.float64)).L is None  # not positive definite


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_with_prepared_hessian_gives_the_same_codes(bits, act_order):
    """H⁻¹ from the shared Cholesky (permuted under act_order) reproduces GPTQ's own codes."""
    from cora.quantizer import _shared_upper_factor, prepare_hessian
    from tests.tolerances import SHARED_GPTQ_CODE_FLIPS

    for seed in range(3):
        k = 40
        x = _correlated_inputs(seed + 40, k)
        h = x.T @ x / x.shape[0]
        w = _weight(400 + seed, (12, k))
        s, z = compute_qparams(w, bits)
        dh = prepare_hessian(h, 0.01)
        perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
        assert _shared_upper_factor(dh, h, torch.diag(h) <= 0, perm, 0.01) is not None  # the shared route runs
        ref = gptq_quantize(w, h, s, z, bits, act_order=act_order, block_size=16)
        got = gptq_quantize(w, dh, s, z, bits, act_order=act_order, block_size=16)
        assert int((ref != got).sum()) <= SHARED_GPTQ_CODE_FLIPS
        assert not torch.equal(ref, quantize(w, s, z, bits))  # GPTQ differs from RTN here: codes are a real check


def test_gptq_prepared_hessian_falls_back_on_dead_columns_or_other_damp():
    """Dead columns change H inside GPTQ, another damp changes the shift: the raw H is used, same codes."""
    from cora.quantizer import prepare_hessian

    x = _correlated_inputs(7, 16)
    x[:, 3] = 0.0
    h = x.T @ x / x.shape[0]
    w = _weight(24, (6, 16))
    s, z = compute_qparams(w, 3)
    assert torch.equal(gptq_quantize(w, prepare_hessian(h), s, z, 3), gptq_quantize(w, h, s, z, 3))
    h[3, 3] = 0.5  # alive again
    assert torch.equal(gptq_quantize(w, prepare_hessian(h, 0.1), s, z, 3, damp=0.01), gptq_quantize(w, h, s, z, 3))
