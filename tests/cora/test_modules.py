"""CoRaConv2d and QuantLinear against nn.Conv2d / nn.Linear (cora/modules.py)."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cora.modules import CoRaConv2d, QuantLinear
from cora.quantizer import compute_qparams, dequantize, quantize
from cora.residual import adapter_from_factors, factorize_residual, full_rank
from cora_kernels.packing import dequantize_adapter, pack_codes, plane_bits, quantize_adapter, to_gemm_layout
from tests.tolerances import rel_err, tol_for

torch.set_num_threads(1)

# (kernel, stride, padding, dilation, bias, padding_mode, groups)
CONV_OPTS = [
    (1, 1, 0, 1, True, "zeros", 1),
    (3, 1, 1, 1, True, "zeros", 1),
    (3, 2, 1, 1, False, "zeros", 1),
    (3, 2, 0, 1, True, "zeros", 1),
    (3, 1, "same", 2, True, "zeros", 1),
    (3, 1, "valid", 1, False, "zeros", 1),
    ((3, 5), 1, 1, 1, True, "zeros", 1),
    ((3, 5), 2, (1, 2), 1, True, "zeros", 1),
    ((2, 4), 1, "same", 1, True, "zeros", 1),  # even kernel: asymmetric 'same' padding
    (3, 1, 1, 2, True, "reflect", 1),
    (3, 2, 1, 1, False, "circular", 1),
    (3, 1, "same", 1, True, "reflect", 1),
    (3, 1, 1, 1, True, "replicate", 1),
    (3, 1, 1, 1, True, "zeros", 2),  # grouped: no adapter
    (3, 2, 1, 1, False, "circular", 2),
]
BITS = (2, 3, 4, 8)


def _conv(seed, c_in, c_out, kernel, stride, padding, dilation, bias, mode, groups):
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, groups, bias, mode)
    if bias:
        with torch.no_grad():
            conv.bias.normal_()
    return conv


def _ref_conv(conv: nn.Conv2d, weight: torch.Tensor) -> nn.Conv2d:
    """The same nn.Conv2d (all options, bias) with ``weight`` swapped in."""
    ref = copy.deepcopy(conv)
    with torch.no_grad():
        ref.weight.copy_(weight)
    return ref


def _ranks_for(conv, groups):
    R = full_rank(conv.weight.shape)
    return [0] if groups != 1 else [0, 1, R]


CASES = [
    (i, opts, rank_kind, BITS[(i + j) % 4])
    for i, opts in enumerate(CONV_OPTS)
    for j, rank_kind in enumerate(["zero", "one", "full"])
    if not (opts[6] != 1 and rank_kind != "zero")
]


@pytest.mark.parametrize("idx,opts,rank_kind,bits", CASES)
def test_conv_matches_nn_conv_with_effective_weight(idx, opts, rank_kind, bits):
    kernel, stride, padding, dilation, bias, mode, groups = opts
    c_in, c_out = 4, 6
    conv = _conv(idx, c_in, c_out, kernel, stride, padding, dilation, bias, mode, groups)
    R = full_rank(conv.weight.shape)
    rank = {"zero": 0, "one": 1, "full": R}[rank_kind]
    m = CoRaConv2d.from_conv(conv, bits, rank)
    assert m.rank == rank and m.bits == bits
    ref = _ref_conv(conv, m.effective_weight())
    g = torch.Generator().manual_seed(idx)
    x = torch.randn(2, c_in, 11, 13, generator=g)
    with torch.no_grad():
        y_ref = ref(x)
        y = m(x)
    assert y.shape == y_ref.shape and y.dtype == torch.float32
    assert rel_err(y, y_ref) <= 1e-4
    # the quantized conv is a real approximation of the float one (not a bug that happens to agree)
    with torch.no_grad():
        y_float = conv(x)
    assert rel_err(y, y_float) < (0.9 if bits == 2 else 0.5)
    # unbatched input
    with torch.no_grad():
        y3 = m(x[0])
    assert y3.shape == y_ref[0].shape
    assert rel_err(y3, y_ref[0]) <= 1e-4


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("rank_kind", ["zero", "one", "full"])
def test_all_bits_and_ranks_one_config(bits, rank_kind):
    conv = _conv(50 + bits, 5, 7, 3, 1, 1, 1, True, "zeros", 1)
    R = full_rank(conv.weight.shape)
    rank = {"zero": 0, "one": 1, "full": R}[rank_kind]
    m = CoRaConv2d.from_conv(conv, bits, rank, adapter_dtype="float32")
    x = torch.randn(3, 5, 8, 8)
    with torch.no_grad():
        y = m(x)
        y_ref = _ref_conv(conv, m.effective_weight())(x)
        y_float = conv(x)
    assert rel_err(y, y_ref) <= 1e-4
    if rank == R:  # a full-rank fp32 adapter reclaims the whole residual: the float conv again
        assert rel_err(m.effective_weight(), conv.weight) <= 1e-5
        assert rel_err(y, y_float) <= 1e-4
    # more rank, more bits -> no worse in weight space
    if rank == 1:
        m0 = CoRaConv2d.from_conv(conv, bits, 0)
        e0 = (m0.effective_weight() - conv.weight).norm()
        e1 = (m.effective_weight() - conv.weight).norm()
        assert e1 < e0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("opts", [CONV_OPTS[1], CONV_OPTS[7], CONV_OPTS[9], CONV_OPTS[13]])
def test_low_precision_input_keeps_dtype(dtype, opts):
    kernel, stride, padding, dilation, bias, mode, groups = opts
    conv = _conv(7, 4, 6, kernel, stride, padding, dilation, bias, mode, groups)
    m = CoRaConv2d.from_conv(conv, 4, 0 if groups != 1 else 2)
    x = torch.randn(2, 4, 10, 10)
    ref = _ref_conv(conv, m.effective_weight()).double()
    with torch.no_grad():
        y_ref = ref(x.to(dtype).double())
        y = m(x.to(dtype))
    assert y.dtype == dtype
    assert rel_err(y, y_ref) <= (tol_for(dtype) if dtype != torch.bfloat16 else 4e-3)


def test_half_precision_error_comparable_to_plain_conv():
    """fp16 meets the policy (<= 2e-3); bf16 output rounding alone is ~1e-3 rms, and torch's own bf16
    nn.Conv2d lands at ~2.1-2.5e-3 here, so bf16 is held to "no worse than 1.5x a plain bf16 conv"."""
    for seed in range(3):
        conv = _conv(80 + seed, 8, 8, 3, 1, 1, 1, True, "zeros", 1)
        m = CoRaConv2d.from_conv(conv, 4, 2)
        for dtype in (torch.float16, torch.bfloat16):
            x = torch.randn(2, 8, 12, 12).to(dtype)
            with torch.no_grad():
                y_ref = F.conv2d(x.double(), m.effective_weight().double(), m.bias.double(), 1, 1)
                y = m(x)
                y_plain = F.conv2d(x, m.effective_weight().to(dtype), m.bias.to(dtype), 1, 1)
            assert y.dtype == dtype
            err, plain = rel_err(y, y_ref), rel_err(y_plain, y_ref)
            if dtype == torch.float16:
                assert err <= tol_for(dtype)
            assert err <= 1.5 * plain, (dtype, err, plain)


@pytest.mark.parametrize("bits", BITS)
def test_effective_weight_is_dequantized_plus_ba(bits):
    conv = _conv(9, 5, 8, (3, 5), 1, 1, 1, False, "zeros", 1)
    w = conv.weight.detach()
    s, z = compute_qparams(w, bits)
    codes = quantize(w, s, z, bits)
    qw = dequantize(codes, s, z)
    f = factorize_residual(w - qw, method="weight")
    A, B = adapter_from_factors(f, 3)
    m = CoRaConv2d.from_conv(conv, bits, 3)
    # the packed buffers decode to the codes of default rounding
    assert m.codes().dtype == torch.uint8
    assert torch.equal(m.codes(), codes)
    assert torch.equal(m.dequantized_weight(), qw)
    a16, b16 = A.half().float(), B.half().float()
    expect = qw + (b16 @ a16.reshape(3, -1)).reshape(w.shape)
    assert torch.allclose(m.effective_weight(), expect, rtol=1e-6, atol=1e-7)
    a_conv, b_conv = m.adapter_conv_weights()
    assert a_conv.shape == (3, 5, 3, 5) and b_conv.shape == (8, 3, 1, 1)
    assert torch.equal(a_conv.float(), a16) and torch.equal(b_conv.flatten(1).float(), b16)
    # packed planes have the documented layout
    planes = m.packed_planes()
    expected_planes = pack_codes(to_gemm_layout(codes.long()), bits)
    assert len(planes) == len(plane_bits(bits))
    for p, e in zip(planes, expected_planes):
        assert p.dtype == torch.int32 and torch.equal(p, e)
    assert m.scale.dtype == torch.float16 and torch.equal(m.scale.float(), s)
    assert m.zero.dtype == torch.uint8 and torch.equal(m.zero.float(), z)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("init_rank", [0, 2, 7])
def test_state_dict_round_trip_into_fresh_module(bits, init_rank):
    conv = _conv(10 + bits, 4, 8, 3, 2, 1, 1, True, "zeros", 1)
    m = CoRaConv2d.from_conv(conv, bits, 5)
    sd = m.state_dict()
    assert "_extra_state" in sd
    fresh = CoRaConv2d(4, 8, 3, 2, 1, bits=bits, rank=init_rank)
    fresh.load_state_dict(sd)
    assert fresh.rank == 5
    for k, v in m.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(fresh.state_dict()[k], v), k
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_int8_adapters_storage_bits_and_forward(bits):
    """adapter_dtype="int8": per-row rounding of the float factors, bits counted at their real size,
    forward (reference and the op's reference) = the conv with Q(W) + B_q A_q."""
    conv = _conv(60 + bits, 5, 7, 3, 1, 1, 1, True, "zeros", 1)
    r, K, c_out = 3, 45, 7
    m16 = CoRaConv2d.from_conv(conv, bits, r)
    m8 = CoRaConv2d.from_conv(conv, bits, r, adapter_dtype="int8")
    A, B = adapter_from_factors(factorize_residual(conv.weight.detach() - m8.dequantized_weight()), r)
    qa, sa = quantize_adapter(to_gemm_layout(A))
    qb, sb = quantize_adapter(B)
    assert m8.adapter_int8 and not m16.adapter_int8 and m16.adapter_a_scale is None
    assert m8.adapter_a.dtype == m8.adapter_b.dtype == torch.int8
    assert m8.adapter_a_scale.dtype == m8.adapter_b_scale.dtype == torch.float32
    assert torch.equal(m8.adapter_a, qa) and torch.equal(m8.adapter_b, qb)
    assert torch.equal(m8.adapter_a_scale, sa) and torch.equal(m8.adapter_b_scale, sb)
    assert (m8.adapter_a.abs().amax(1) == 127).all() and (m8.adapter_b.abs().amax(1) == 127).all()
    # round to nearest: every code within half a step of the float factor
    assert ((dequantize_adapter(qa, sa) - to_gemm_layout(A)).abs() <= 0.5001 * sa[:, None]).all()
    # 8 bits per adapter weight plus 32 per scale (r + C_out of them); the fp16 layer 16 per weight
    base = bits * conv.weight.numel() + (16 + bits) * c_out
    assert m8.adapter_params == m16.adapter_params == r * K + c_out * r
    assert m8.storage_bits() == base + 8 * (r * K + c_out * r) + 32 * (r + c_out)
    assert m16.storage_bits() == base + 16 * (r * K + c_out * r)
    assert CoRaConv2d.from_conv(conv, bits, 0, adapter_dtype="int8").storage_bits() == base  # rank 0: no scales
    # the stored adapter is the float one up to int8 rounding (~1/127 per row), and the forward uses exactly it
    ba = B @ A.reshape(r, -1)
    ba8 = (m8.effective_weight() - m8.dequantized_weight()).reshape(c_out, -1)
    assert 0 < rel_err(ba8, ba) < 2e-2
    x = torch.randn(2, 5, 8, 8)
    y_ref = _ref_conv(conv, m8.effective_weight())(x)
    with torch.no_grad():
        assert rel_err(m8(x), y_ref) <= 1e-4
        assert rel_err(m8.op_forward(x, backend="reference"), y_ref) <= 1e-4
        assert rel_err(m8(x.half()), y_ref) <= tol_for(torch.float16)


def test_int8_adapter_state_dict_round_trip():
    """Scales travel with the codes, the rank comes from the checkpoint; float and int8 states do not mix."""
    conv = _conv(70, 4, 8, 3, 2, 1, 1, True, "zeros", 1)
    m = CoRaConv2d.from_conv(conv, 2, 5, adapter_dtype="int8")
    sd = m.state_dict()
    assert {"adapter_a_scale", "adapter_b_scale"} <= set(sd)
    assert "adapter_a_scale" not in CoRaConv2d.from_conv(conv, 2, 5).state_dict()
    fresh = CoRaConv2d(4, 8, 3, 2, 1, bits=2, rank=1, adapter_dtype="int8")
    fresh.load_state_dict(sd)
    assert fresh.rank == 5 and fresh.adapter_a_scale.shape == (5,)
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(fresh.state_dict()[k], v) and fresh.state_dict()[k].dtype == v.dtype, k
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))
    with pytest.raises(RuntimeError, match="adapter_a_scale"):
        CoRaConv2d(4, 8, 3, 2, 1, bits=2, rank=5).load_state_dict(sd)


def test_state_dict_round_trip_rank_zero_and_grouped():
    conv = _conv(11, 4, 6, 3, 1, 1, 1, True, "zeros", 2)
    m = CoRaConv2d.from_conv(conv, 3, 0)
    fresh = CoRaConv2d(4, 6, 3, 1, 1, groups=2, bits=3)
    fresh.load_state_dict(m.state_dict())
    x = torch.randn(1, 4, 7, 7)
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))


def test_wrong_extra_state_bits_raise():
    conv = _conv(12, 4, 8, 3, 1, 1, 1, True, "zeros", 1)
    m = CoRaConv2d.from_conv(conv, 4, 2)
    sd = m.state_dict()
    sd["_extra_state"] = dict(sd["_extra_state"], bits=8)  # the buffers are 4-bit, the record says 8
    fresh = CoRaConv2d(4, 8, 3, 1, 1, bits=4, rank=2)
    with pytest.raises(RuntimeError, match="bit"):
        fresh.load_state_dict(sd)
    sd2 = m.state_dict()
    sd2["_extra_state"] = dict(sd2["_extra_state"], format_version=99)
    with pytest.raises(RuntimeError, match="format"):
        fresh.load_state_dict(sd2)
    # a 4-bit state into a 3-bit module fails too (and loudly)
    with pytest.raises(RuntimeError):
        CoRaConv2d(4, 8, 3, 1, 1, bits=3, rank=2).load_state_dict(m.state_dict())


def test_bad_inputs_raise():
    conv = _conv(13, 4, 6, 3, 1, 1, 1, True, "zeros", 1)
    m = CoRaConv2d.from_conv(conv, 4, 1)
    with pytest.raises(ValueError, match="4 input"):
        m(torch.randn(2, 5, 8, 8))
    with pytest.raises(TypeError, match="dtype"):
        m(torch.randint(0, 5, (2, 4, 8, 8)))
    with pytest.raises(TypeError, match="dtype"):
        m(torch.ones(2, 4, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError):
        m(torch.randn(1, 1, 4, 8, 8))
    with pytest.raises(TypeError):
        CoRaConv2d.from_conv(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="rank"):
        CoRaConv2d.from_conv(conv, 4, full_rank(conv.weight.shape) + 1)
    with pytest.raises(ValueError, match="groups"):
        CoRaConv2d.from_conv(_conv(14, 4, 6, 3, 1, 1, 1, True, "zeros", 2), 4, 1)
    with pytest.raises(ValueError):
        CoRaConv2d(4, 6, 3, stride=2, padding="same")
    bad = _conv(15, 4, 6, 3, 1, 1, 1, True, "zeros", 1)
    with torch.no_grad():
        bad.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        CoRaConv2d.from_conv(bad, 4, 1)
    with pytest.raises(ValueError):
        CoRaConv2d.from_conv(conv, 5, 0)  # unsupported bit width


def test_given_codes_scale_zero_are_used():
    conv = _conv(16, 4, 6, 3, 1, 1, 1, False, "zeros", 1)
    w = conv.weight.detach()
    s, z = compute_qparams(w, 3, method="mse")
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 8, w.shape, generator=g, dtype=torch.uint8)
    m = CoRaConv2d.from_conv(conv, 3, 2, codes=codes, scale=s, zero=z)
    assert torch.equal(m.codes(), codes)
    # the adapter factorizes the residual of THOSE codes
    f = factorize_residual(w - dequantize(codes, s, z))
    A, B = adapter_from_factors(f, 2)
    low_rank = (B.half().float() @ A.half().float().reshape(2, -1)).reshape(w.shape)
    assert torch.allclose(m.effective_weight(), dequantize(codes, s, z) + low_rank, atol=1e-6)
    with pytest.raises(ValueError):
        CoRaConv2d.from_conv(conv, 3, 0, codes=codes)  # codes without scale/zero
    with pytest.raises(ValueError, match="shape"):
        CoRaConv2d.from_conv(conv, 3, 0, codes=codes[:, :2], scale=s, zero=z)


def test_reference_forward_is_differentiable():
    conv = _conv(17, 3, 4, 3, 1, 1, 1, True, "zeros", 1)
    m = CoRaConv2d.from_conv(conv, 4, 2)
    x = torch.randn(1, 3, 6, 6, requires_grad=True)
    m(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------- QuantLinear
@pytest.mark.parametrize("bits,bias,per_channel", list(itertools.product(BITS, [True, False], [True, False])))
def test_quant_linear_matches_nn_linear(bits, bias, per_channel):
    torch.manual_seed(bits)
    lin = nn.Linear(19, 7, bias=bias)
    q = QuantLinear.from_linear(lin, bits, per_channel=per_channel)
    w = lin.weight.detach()
    s, z = compute_qparams(w, bits, per_channel=per_channel)
    assert torch.equal(q.codes(), quantize(w, s, z, bits))
    assert torch.equal(q.effective_weight(), dequantize(quantize(w, s, z, bits), s, z))
    ref = nn.Linear(19, 7, bias=bias)
    with torch.no_grad():
        ref.weight.copy_(q.effective_weight())
        if bias:
            ref.bias.copy_(lin.bias)
    for shape in [(5, 19), (2, 3, 19), (19,)]:
        x = torch.randn(shape)
        with torch.no_grad():
            y, y_ref = q(x), ref(x)
        assert y.shape == y_ref.shape
        assert rel_err(y, y_ref) <= 1e-5
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(4, 19).to(dtype)
        with torch.no_grad():
            y = q(x)
        assert y.dtype == dtype
        assert rel_err(y, ref.double()(x.double())) <= 4e-3
    # state dict round trip
    fresh = QuantLinear(19, 7, bias, bits=bits)
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(3, 19)
    with torch.no_grad():
        assert torch.equal(fresh(x), q(x))


def test_quant_linear_bad_inputs():
    lin = nn.Linear(6, 3)
    q = QuantLinear.from_linear(lin, 4)
    with pytest.raises(ValueError, match="6 input"):
        q(torch.randn(2, 5))
    with pytest.raises(TypeError, match="dtype"):
        q(torch.ones(2, 6, dtype=torch.int64))
    with pytest.raises(TypeError):
        QuantLinear.from_linear(nn.Conv2d(1, 1, 1))
    sd = q.state_dict()
    sd["_extra_state"] = dict(sd["_extra_state"], bits=2)
    with pytest.raises(RuntimeError, match="bit"):
        QuantLinear(6, 3, bits=4).load_state_dict(sd)
    with torch.no_grad():
        lin.weight[1, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        QuantLinear.from_linear(lin, 4)


# ---------------------------------------------------------------------------------- QuantLinear adapters
def _linear(seed: int, inp: int = 24, out: int = 10, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(inp, out, bias=bias)


def _direct(lin_q: QuantLinear, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float64 ``x (Q + B A)ᵀ + bias`` from the layer's codes and the given factors."""
    w = lin_q.dequantized_weight().double() + b.double() @ a.double()
    y = x.double() @ w.T
    return y if lin_q.bias is None else y + lin_q.bias.double()


@pytest.mark.parametrize("bits", (2, 3, 4))
@pytest.mark.parametrize("adapter_dtype", ("float16", "bfloat16", "float32"))
def test_quant_linear_adapter_forward_is_q_plus_ba(bits, adapter_dtype):
    """y = linear(x; Q) + linear(linear(x; A); B) + bias for any leading dims, = x (Q + BA)ᵀ + bias in float64;
    the rank-r adapter brings the layer closer to the float one."""
    from tests.tolerances import assert_close_rel

    lin = _linear(80 + bits, bias=bits != 3)
    r = 4
    q = QuantLinear.from_linear(lin, bits, r, adapter_dtype=adapter_dtype)
    q0 = QuantLinear.from_linear(lin, bits)
    assert q.rank == r and q.adapter_a.shape == (r, 24) and q.adapter_b.shape == (10, r)
    assert q.adapter_a.dtype == getattr(torch, adapter_dtype) and q.adapter_a_scale is None
    A, B = adapter_from_factors(factorize_residual(lin.weight.detach() - q.dequantized_weight()), r)
    assert_close_rel(q.adapter_a.float(), A, getattr(torch, adapter_dtype))  # stored = the factors, cast
    a, b = q.adapter_a.float(), q.adapter_b.float()
    assert_close_rel(q.effective_weight(), q.dequantized_weight() + b @ a, torch.float32)
    g = torch.Generator().manual_seed(bits)
    for shape in [(5, 24), (2, 3, 24), (24,)]:
        x = torch.randn(shape, generator=g)
        with torch.no_grad():
            assert_close_rel(q(x), _direct(q, x, a, b), torch.float32)
    x = torch.randn(64, 24, generator=g)
    with torch.no_grad():
        y_float = lin(x)
        assert rel_err(q(x), y_float) < rel_err(q0(x), y_float)
        for dt in (torch.float16, torch.bfloat16):
            y = q(x.to(dt))
            assert y.dtype == dt
            assert_close_rel(y, _direct(q, x.to(dt), a, b), dt)


def test_quant_linear_int8_adapter_and_storage_bits():
    """int8 adapters: rows rounded as CoRaConv2d rounds them, scales fp32, bits counted at their real size."""
    from tests.tolerances import assert_close_rel

    lin = _linear(90, 40, 12)
    r, K, out, bits = 5, 40, 12, 3
    q8 = QuantLinear.from_linear(lin, bits, r, adapter_dtype="int8")
    q16 = QuantLinear.from_linear(lin, bits, r)
    A, B = adapter_from_factors(factorize_residual(lin.weight.detach() - q8.dequantized_weight()), r)
    (qa, sa), (qb, sb) = quantize_adapter(A), quantize_adapter(B)
    assert q8.adapter_int8 and q8.adapter_a.dtype == torch.int8 and q8.adapter_a_scale.dtype == torch.float32
    assert torch.equal(q8.adapter_a, qa) and torch.equal(q8.adapter_b, qb)
    assert torch.equal(q8.adapter_a_scale, sa) and torch.equal(q8.adapter_b_scale, sb)
    base = bits * K * out + (16 + bits) * out
    assert q8.adapter_params == q16.adapter_params == r * (K + out)
    assert q8.storage_bits() == base + 8 * r * (K + out) + 32 * (r + out)
    assert q16.storage_bits() == base + 16 * r * (K + out)
    assert QuantLinear.from_linear(lin, bits).storage_bits() == base
    assert QuantLinear.from_linear(lin, bits, adapter_dtype="int8").storage_bits() == base  # rank 0: no scales
    a8, b8 = dequantize_adapter(qa, sa), dequantize_adapter(qb, sb)
    x = torch.randn(3, 2, K, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close_rel(q8(x), _direct(q8, x, a8, b8), torch.float32)
    assert 0 < rel_err(b8 @ a8, B @ A) < 2e-2  # int8 rounding, about 1/127 per row


def test_quant_linear_state_dict_rank_from_the_checkpoint_and_old_files():
    """The rank comes from the state dict; a rank-0 layer saves exactly the keys QuantLinear saved before
    adapters existed, and such a state dict loads into a layer of any rank as rank 0."""
    lin = _linear(91)
    old_keys = {"_extra_state", "bias", "qweight_p0", "scale", "zero"}
    q0 = QuantLinear.from_linear(lin, 4)
    assert set(q0.state_dict()) == old_keys
    q = QuantLinear.from_linear(lin, 4, 6)
    assert set(q.state_dict()) == old_keys | {"adapter_a", "adapter_b"}
    x = torch.randn(4, 24, generator=torch.Generator().manual_seed(2))
    for init_rank in (0, 2, 6, 9):
        fresh = QuantLinear(24, 10, bits=4, rank=init_rank)
        fresh.load_state_dict(q.state_dict())
        assert fresh.rank == 6 and set(fresh.state_dict()) == set(q.state_dict())
        for k, v in q.state_dict().items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(fresh.state_dict()[k], v), k
        with torch.no_grad():
            assert torch.equal(fresh(x), q(x))
        fresh.load_state_dict(q0.state_dict())  # an old-style (adapter-free) state dict: rank 0 again
        assert fresh.rank == 0 and set(fresh.state_dict()) == old_keys
        with torch.no_grad():
            assert torch.equal(fresh(x), q0(x))
    q8 = QuantLinear.from_linear(lin, 2, 3, adapter_dtype="int8")
    fresh = QuantLinear(24, 10, bits=2, rank=1, adapter_dtype="int8")
    fresh.load_state_dict(q8.state_dict())
    assert fresh.rank == 3 and fresh.adapter_a_scale.shape == (3,)
    with torch.no_grad():
        assert torch.equal(fresh(x), q8(x))
    with pytest.raises(RuntimeError, match="adapter_a_scale"):
        QuantLinear(24, 10, bits=2, rank=3).load_state_dict(q8.state_dict())
    bad = dict(q.state_dict(), adapter_a=torch.zeros(6, 23))
    with pytest.raises(RuntimeError, match="adapter_a"):
        QuantLinear(24, 10, bits=4, rank=6).load_state_dict(bad)


def test_quant_linear_adapter_bad_inputs():
    lin = _linear(92, 6, 3)
    with pytest.raises(ValueError, match="rank 4 outside"):
        QuantLinear(6, 3, rank=4)
    with pytest.raises(ValueError, match="adapter_dtype"):
        QuantLinear(6, 3, adapter_dtype="int4")
    q = QuantLinear.from_linear(lin, 4, 2)
    with pytest.raises(ValueError, match="do not fit"):
        q.set_adapter(torch.randn(2, 5), torch.randn(3, 2))
    with pytest.raises(ValueError, match="do not fit"):
        q.set_adapter(torch.randn(2, 6), torch.randn(3, 1))
    q.set_adapter(torch.randn(1, 6), torch.randn(3, 1))  # a new rank is fine
    assert q.rank == 1 and set(q.state_dict()) >= {"adapter_a", "adapter_b"}
    q.set_adapter(torch.randn(0, 6), torch.randn(3, 0))
    assert q.rank == 0 and "adapter_a" not in q.state_dict()
