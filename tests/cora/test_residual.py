"""Theorem 1: the quantization residual of a conv factorizes exactly into a k×k conv A and a 1×1 conv B."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cora.quantizer import compute_qparams, fake_quantize
from cora.residual import ResidualFactors, adapter_from_factors, factorize_residual, full_rank
from cora.statistics import layer_input_rows
from tests.tolerances import rel_err

torch.set_num_threads(1)

# (C_in, C_out, kernel, stride, padding, dilation)
CONVS = [
    (3, 5, 1, 1, 0, 1),
    (4, 6, 3, 1, 1, 1),
    (5, 3, 3, 2, 1, 1),
    (2, 7, 5, 1, 0, 1),
    (3, 4, 7, 2, 1, 1),
    (4, 9, (3, 5), 1, 1, 1),
    (6, 4, 3, 1, 1, 2),
    (3, 8, (3, 5), 2, 0, 2),
]


def _conv_and_residual(seed, c_in, c_out, k, bits=3):
    g = torch.Generator().manual_seed(seed)
    kh, kw = (k, k) if isinstance(k, int) else k
    w = torch.randn(c_out, c_in, kh, kw, generator=g) * 0.2
    s, z = compute_qparams(w, bits, per_channel=True, method="minmax")
    dw = w - fake_quantize(w, s, z, bits)
    assert float(dw.abs().max()) > 0
    return w, dw, g


def _hessian_for(dw, stride, padding, dilation, g, n_img=6, hw=14):
    c_in = dw.shape[1]
    conv = torch.nn.Conv2d(c_in, dw.shape[0], dw.shape[2:], stride=stride, padding=padding, dilation=dilation, bias=False)
    mix = torch.randn(c_in, c_in, generator=g)
    x = torch.einsum("nchw,cd->ndhw", torch.randn(n_img, c_in, hw, hw, generator=g), mix) + 0.5
    rows = layer_input_rows(conv, x).double()
    return rows.T @ rows / rows.shape[0], rows


@pytest.mark.parametrize("method", ["weight", "activation"])
@pytest.mark.parametrize("c_in,c_out,k,stride,padding,dilation", CONVS)
def test_full_rank_adapter_reproduces_residual_conv(method, c_in, c_out, k, stride, padding, dilation):
    w, dw, g = _conv_and_residual(c_in * 100 + c_out * 10 + stride, c_in, c_out, k)
    h = None
    if method == "activation":
        h, _ = _hessian_for(dw, stride, padding, dilation, g)
    f = factorize_residual(dw, method=method, hessian=h)
    R = full_rank(dw.shape)
    assert f.rank == R == min(c_out, dw[0].numel())
    assert f.U.shape == (c_out, R) and f.S.shape == (R,) and f.Vt.shape == (R, dw[0].numel())
    A, B = adapter_from_factors(f, R)
    assert A.shape == (R, *dw.shape[1:]) and B.shape == (c_out, R)
    x = torch.randn(2, c_in, 13, 11, generator=g)
    y_ref = F.conv2d(x.double(), dw.double(), None, stride, padding, dilation)
    t = F.conv2d(x, A, None, stride, padding, dilation)
    y = F.conv2d(t, B[:, :, None, None])
    assert y.shape == y_ref.shape
    assert rel_err(y, y_ref) <= 1e-4
    # and the factors themselves rebuild D
    assert rel_err(f.matrix(), dw) <= 1e-5
    assert rel_err((B @ A.reshape(R, -1)).reshape(dw.shape), dw) <= 1e-5


@pytest.mark.parametrize("method", ["weight", "activation"])
def test_singular_values_sorted_nonnegative(method):
    for seed in range(4):
        w, dw, g = _conv_and_residual(seed, 4, 6, 3)
        h = _hessian_for(dw, 1, 1, 1, g)[0] if method == "activation" else None
        f = factorize_residual(dw, method=method, hessian=h)
        assert (f.S >= 0).all()
        assert (f.S[:-1] >= f.S[1:]).all()
        assert f.S.dtype == torch.float32


@pytest.mark.parametrize("c_in,c_out,k", [(4, 6, 3), (8, 5, 1), (3, 16, (3, 5))])
def test_weight_truncation_is_eckart_young(c_in, c_out, k):
    w, dw, g = _conv_and_residual(42, c_in, c_out, k)
    f = factorize_residual(dw, method="weight")
    D = dw.reshape(c_out, -1).double()
    # the SVD is the real one: compare with torch's singular values of D
    assert torch.allclose(f.S.double(), torch.linalg.svdvals(D), rtol=1e-5, atol=1e-7)
    for r in range(0, f.rank + 1):
        A, B = adapter_from_factors(f, r)
        approx = B.double() @ A.reshape(r, D.shape[1]).double()
        err = float(((D - approx) ** 2).sum())
        expect = float((f.S[r:].double() ** 2).sum())
        assert err == pytest.approx(expect, rel=1e-4, abs=1e-9 * float((D**2).sum()))
    # and no random rank-r matrix does better (sanity of optimality)
    r = max(1, f.rank // 2)
    A, B = adapter_from_factors(f, r)
    best = float(((D - B.double() @ A.reshape(r, D.shape[1]).double()) ** 2).sum())
    for _ in range(5):
        P = torch.randn(c_out, r, generator=g, dtype=torch.float64)
        Q = torch.linalg.lstsq(P, D).solution  # best Q for a random column space
        assert float(((D - P @ Q) ** 2).sum()) >= best * (1 - 1e-6)


def test_activation_aware_beats_weight_svd_on_output_error():
    c_in, c_out, k = 6, 12, 3
    w, dw, g = _conv_and_residual(7, c_in, c_out, k, bits=2)
    h, rows = _hessian_for(dw, 1, 1, 1, g, n_img=8)
    D = dw.reshape(c_out, -1).double()
    fa = factorize_residual(dw, method="activation", hessian=h, damp=1e-6)
    fw = factorize_residual(dw, method="weight")

    def out_err(f, r):
        A, B = adapter_from_factors(f, r)
        E = D - B.double() @ A.reshape(r, D.shape[1]).double()
        return float(((rows @ E.T) ** 2).sum(1).mean())  # E||(D - BA) x||^2 over the calibration rows

    strictly = 0
    for r in range(1, fa.rank):
        ea, ew = out_err(fa, r), out_err(fw, r)
        assert ea <= ew * (1 + 1e-4), (r, ea, ew)
        strictly += ea < ew * 0.99
        # the activation-aware error equals the discarded (output-space) singular values squared
        assert ea == pytest.approx(float((fa.S[r:].double() ** 2).sum()), rel=1e-3)
    assert strictly >= fa.rank // 2  # correlated inputs: the gain is real, not a tie
    # at full rank both reproduce the output exactly
    assert out_err(fa, fa.rank) <= 1e-8 * float(((rows @ D.T) ** 2).sum(1).mean())


def test_rank_out_of_range_raises():
    _, dw, _ = _conv_and_residual(1, 3, 4, 3)
    f = factorize_residual(dw)
    with pytest.raises(ValueError, match="rank"):
        adapter_from_factors(f, f.rank + 1)
    with pytest.raises(ValueError, match="rank"):
        adapter_from_factors(f, -1)
    A, B = adapter_from_factors(f, 0)
    assert A.shape == (0, 3, 3, 3) and B.shape == (4, 0)


def test_bad_factorization_args_raise():
    _, dw, _ = _conv_and_residual(2, 3, 4, 3)
    with pytest.raises(ValueError, match="hessian"):
        factorize_residual(dw, method="activation")
    with pytest.raises(ValueError, match="hessian"):
        factorize_residual(dw, method="activation", hessian=torch.eye(5))
    with pytest.raises(ValueError, match="factorization"):
        factorize_residual(dw, method="qr")


def test_matrix_with_weights_is_differentiable():
    _, dw, _ = _conv_and_residual(3, 3, 4, 3)
    f = factorize_residual(dw)
    assert isinstance(f, ResidualFactors)
    t = torch.ones(f.rank, requires_grad=True)
    m = f.matrix(t)
    assert m.shape == dw.shape
    (m * dw).sum().backward()
    assert t.grad is not None and torch.isfinite(t.grad).all()
    # d/dt_i <D_t, D> = S_i * (u_i^T D v_i) = S_i^2 >= 0
    assert torch.allclose(t.grad, f.S**2, rtol=1e-3, atol=1e-6)


# ------------------------------------------------------------------ truncated and shared factorizations
def _random_hessian(g, k, n=None):
    """A correlated, full-rank second moment ``[k, k]`` (float64) of random rows."""
    n = n or 4 * k
    x = torch.randn(n, k, generator=g, dtype=torch.float64) @ torch.randn(k, k, generator=g, dtype=torch.float64)
    return x.T @ x / n + 0.1 * torch.eye(k, dtype=torch.float64)


def _product(f, r):
    A, B = adapter_from_factors(f, r)
    return (B.double() @ A.reshape(r, -1).double())


@pytest.mark.parametrize("method", ["weight", "activation"])
@pytest.mark.parametrize("c_out,c_in,k,max_rank", [(24, 6, 3, 5), (40, 30, 1, 4), (9, 4, 3, 2), (16, 16, 3, 15)])
def test_truncated_factorization_keeps_top_triplets_and_full_rank(method, c_out, c_in, k, max_rank):
    """max_rank far below R: only the top triplets, equal to the full factorization's; R is remembered."""
    from tests.tolerances import TRUNCATED_RTOL

    _, dw, g = _conv_and_residual(c_out * 7 + c_in + max_rank, c_in, c_out, k)
    h = _random_hessian(g, c_in * k * k) if method == "activation" else None
    full = factorize_residual(dw, method=method, hessian=h)
    part = factorize_residual(dw, method=method, hessian=h, max_rank=max_rank)
    R = full_rank(dw.shape)
    assert part.full_rank == full.full_rank == R and full.stored_rank == R
    assert part.stored_rank == max_rank and part.truncated == (max_rank < R)
    assert part.U.shape == (c_out, max_rank) and part.Vt.shape == (max_rank, c_in * k * k)
    if method == "weight" and part.truncated:  # the cheap route really ran (it declines ill-conditioned spectra)
        from cora.residual import _top_triplets

        assert _top_triplets(dw.reshape(c_out, -1).double(), max_rank) is not None
    assert rel_err(part.S, full.S[:max_rank]) <= TRUNCATED_RTOL
    for r in range(1, max_rank + 1):
        assert rel_err(_product(part, r), _product(full, r)) <= TRUNCATED_RTOL, r
    if part.truncated:
        with pytest.raises(ValueError, match="truncated"):
            adapter_from_factors(part, max_rank + 1)


def test_truncation_threshold_and_bounds():
    _, dw, _ = _conv_and_residual(5, 8, 16, 3)  # R = 16
    for m in (0, 1, 7, 8, 15, 16, 100):
        f = factorize_residual(dw, max_rank=m)
        assert f.stored_rank == min(m, 16) and f.full_rank == 16 and f.S.shape == (min(m, 16),)
    with pytest.raises(ValueError, match="max_rank"):
        factorize_residual(dw, max_rank=-1)


def test_zero_rows_in_a_truncated_factorization_stay_finite():
    """A residual of rank below max_rank (rows exactly zero; the Gram route declines): finite factors."""
    g = torch.Generator().manual_seed(4)
    dw = torch.randn(30, 4, 3, 3, generator=g)
    dw[2:] = 0.0  # rank 2
    f = factorize_residual(dw, max_rank=5)
    assert torch.isfinite(f.U).all() and torch.isfinite(f.Vt).all()
    assert float(f.S[2:].abs().max()) <= 1e-6 * float(f.S[0])
    assert rel_err(f.matrix(), dw) <= 1e-5


@pytest.mark.parametrize("max_rank", [None, 3])
def test_prepared_hessian_gives_the_same_factors(max_rank):
    """One Cholesky shared: the factors equal those from the raw H; another damp is recomputed."""
    from cora.quantizer import prepare_hessian
    from tests.tolerances import SHARED_HESSIAN_RTOL

    _, dw, g = _conv_and_residual(77, 5, 12, 3)
    h = _random_hessian(g, 45)
    for damp in (0.01, 0.1):
        raw = factorize_residual(dw, method="activation", hessian=h, damp=damp, max_rank=max_rank)
        shared = factorize_residual(dw, method="activation", hessian=prepare_hessian(h, 0.01), damp=damp, max_rank=max_rank)
        assert rel_err(shared.S, raw.S) <= SHARED_HESSIAN_RTOL
        assert rel_err(shared.matrix(), raw.matrix()) <= SHARED_HESSIAN_RTOL
    other = factorize_residual(dw, method="activation", hessian=h, damp=0.01, max_rank=max_rank)
    assert rel_err(other.S, raw.S) > 1e-3  # the damp matters: the test above could tell them apart


def test_regression_residual_with_prepared_hessian():
    from cora.quantizer import prepare_hessian
    from cora.residual import regression_residual
    from tests.tolerances import SHARED_HESSIAN_RTOL

    w, dw, g = _conv_and_residual(78, 4, 6, 3)
    h_qq = _random_hessian(g, 36)
    h_fq = h_qq + 0.05 * torch.randn(36, 36, generator=g, dtype=torch.float64)
    qw = w - dw
    raw = regression_residual(w, qw, h_qq, h_fq)
    shared = regression_residual(w, qw, prepare_hessian(h_qq), h_fq)
    assert rel_err(shared, raw) <= SHARED_HESSIAN_RTOL and rel_err(raw, dw) > 1e-3
