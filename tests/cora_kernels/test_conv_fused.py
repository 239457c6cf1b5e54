"""Numerics of the fused kernel (through the Triton interpreter on CPU) against the reference."""
import pytest
import torch
import torch.nn.functional as F

from cora_kernels.conv_fused import cora_conv2d_triton, dense_gemm_weight
from cora_kernels.geometry import ACTIVATIONS
from cora_kernels.packing import from_gemm_layout
from cora_kernels.reference import cora_conv2d_reference, dequantize_weight
from cora_kernels.testing import Case, random_layer
from tests.tolerances import assert_close_rel, rel_err, tol_for

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# A covering subset of the grid (kernel 1/3/5/7, stride 1/2, padding 0/1/3, dilation 1/2, odd C_in/C_out,
# batch 1/3, rank 0/1/odd/full, bits 2/3/4, fp32/fp16/bf16, each epilogue option, both memory formats,
# split-K), each factor level appearing in several combinations.
CASES = [
    Case(N=1, C_in=5, C_out=7, k=(1, 1), padding=(0, 0), bits=4, rank=0),
    Case(N=3, C_in=5, C_out=7, k=(3, 3), bits=4, rank="odd", bias=True),
    Case(N=1, C_in=3, C_out=9, H=9, W=9, k=(5, 5), stride=(2, 2), padding=(3, 3), bits=3, rank=1, relu=True),
    Case(N=1, C_in=3, C_out=5, H=11, W=10, k=(7, 7), stride=(2, 2), padding=(3, 3), bits=4, rank="full",
         bias=True, bn=True),
    Case(N=3, C_in=7, C_out=5, k=(3, 3), dilation=(2, 2), padding=(1, 1), bits=3, rank="odd", res=True, relu=True),
    Case(N=1, C_in=33, C_out=17, H=5, W=5, k=(3, 3), bits=4, rank=1, dtype=F16, bias=True, bn=True, res=True,
         relu=True, channels_last=True),
    Case(N=3, C_in=9, C_out=11, H=6, W=5, k=(3, 1), padding=(1, 0), bits=3, rank=0, dtype=F16),
    Case(N=1, C_in=64, C_out=40, H=6, W=6, k=(3, 3), bits=3, rank="odd", dtype=F16, channels_last=True),  # aligned
    Case(N=1, C_in=64, C_out=24, H=5, W=5, k=(1, 1), padding=(0, 0), bits=4, rank="full", dtype=F32,
         bias=True),  # aligned, full rank
    Case(N=3, C_in=5, C_out=13, H=8, W=8, k=(2, 3), stride=(2, 1), padding=(1, 0), bits=4, rank="odd",
         dtype=BF16, bias=True, relu=True),
    Case(N=1, C_in=32, C_out=9, H=6, W=6, k=(3, 3), bits=4, rank="odd", split_k=4, bias=True, bn=True, res=True,
         relu=True),  # split-K with every epilogue option
    Case(N=2, C_in=6, C_out=7, H=5, W=5, k=(5, 5), padding=(0, 0), stride=(1, 1), bits=3, rank=1, dtype=F16,
         split_k=3, channels_last=True),
    # int2: 16 codes per word, one plane
    Case(N=2, C_in=5, C_out=7, k=(3, 3), bits=2, rank="odd", bias=True),
    Case(N=1, C_in=33, C_out=17, H=5, W=5, k=(3, 3), bits=2, rank=1, dtype=F16, bias=True, bn=True, res=True,
         relu=True),
    Case(N=1, C_in=64, C_out=24, H=5, W=5, k=(3, 3), bits=2, rank="odd", dtype=BF16, split_k=2, channels_last=True),
    # int8 adapters with per-row fp32 scales: int2/3/4, every activation dtype, split-K, aligned path, r_pad 32
    Case(N=2, C_in=5, C_out=7, k=(3, 3), bits=2, rank="odd", bias=True, adapter="int8"),
    Case(N=1, C_in=33, C_out=17, H=5, W=5, k=(3, 3), bits=3, rank=1, dtype=F16, bias=True, bn=True, res=True,
         relu=True, channels_last=True, adapter="int8"),
    Case(N=1, C_in=64, C_out=24, H=4, W=4, k=(1, 1), padding=(0, 0), bits=4, rank="full", dtype=F16,
         adapter="int8"),  # aligned, r 24 -> r_pad 32
    Case(N=1, C_in=32, C_out=9, H=6, W=6, k=(3, 3), bits=4, rank="odd", dtype=BF16, split_k=4, bias=True,
         adapter="int8"),
]


def _check(c: Case, activation=None, wide=False, **extra):
    args, kw = random_layer(c)
    if wide:
        _widen(kw)
    y = cora_conv2d_triton(*args, **kw, split_k=c.split_k, activation=activation, **extra)
    y_ref = cora_conv2d_reference(*args, **kw, compute_dtype=torch.float64, out_dtype=torch.float64,
                                  activation=activation)
    assert y.dtype == c.dtype
    assert y.is_contiguous(memory_format=torch.channels_last if c.channels_last else torch.contiguous_format)
    err = assert_close_rel(y, y_ref, c.dtype, msg=str(c))
    print(f"{c}: rel err {err:.2e}")
    return args, kw, y


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fused_matches_reference(case):
    _check(case)


def _widen(kw):
    """A residual of std 4 spreads the pre-activation over about [-12, 12]: past relu6's clamp at 6 and
    both bends of hardswish (-3, 3), not only the O(1) values where silu / gelu look alike."""
    kw["residual"] = kw["residual"] * 4


# every epilogue option; the second splits K (the activation then runs in the reduction kernel)
ACT_CASES = [
    Case(N=1, C_in=6, C_out=7, H=5, W=5, k=(3, 3), bits=4, rank="odd", bias=True, bn=True, res=True),
    Case(N=1, C_in=32, C_out=9, H=5, W=5, k=(3, 3), bits=3, rank=1, dtype=F16, split_k=3, bias=True, bn=True,
         res=True, channels_last=True),
]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", ACT_CASES, ids=["fp32", "fp16_splitk"])
def test_fused_activation_matches_reference(case, activation):
    _check(case, activation=activation, wide=True)


_TORCH_ACT = {"relu": F.relu, "relu6": F.relu6, "silu": F.silu, "hardswish": F.hardswish, "gelu": F.gelu,
              "sigmoid": torch.sigmoid, "hardsigmoid": F.hardsigmoid}


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_activation_is_torchs(activation):
    """The reference's activation against a plain torch composition: conv with the dequantized weight
    plus adapter, bias, BatchNorm, residual, then torch's own function (F.gelu: exact erf), in fp64."""
    c = Case(N=2, C_in=5, C_out=6, H=6, W=5, k=(3, 3), bits=4, rank="odd", bias=True, bn=True, res=True)
    args, kw = random_layer(c)
    _widen(kw)
    x, planes, scale, zero, a, b, bias = args
    shape = (c.C_out, c.C_in, *c.k)
    w = dequantize_weight(planes, scale, zero, c.bits, shape, dtype=torch.float64) + from_gemm_layout(
        b.double() @ a.double(), shape)
    pre = F.conv2d(x.double(), w, bias.double(), padding=c.padding)
    pre = pre * kw["out_scale"].double()[None, :, None, None] + kw["out_shift"].double()[None, :, None, None]
    pre = pre + kw["residual"].double()
    assert (pre > 6).any() and (pre < -3).any()  # every piece of every activation is exercised
    want = _TORCH_ACT[activation](pre)
    got = cora_conv2d_reference(*args, **kw, activation=activation, compute_dtype=torch.float64,
                                out_dtype=torch.float64)
    assert_close_rel(got, want, torch.float32)
    assert rel_err(got, pre) > 100 * tol_for(torch.float32)  # the activation did something
    got32 = cora_conv2d_reference(*args, **kw, activation=activation)
    assert_close_rel(got32, want, torch.float32)


def test_relu_flag_is_the_relu_activation():
    c = Case(N=1, C_in=6, C_out=7, H=5, W=5, k=(3, 3), bits=4, rank=1, bias=True, res=True)
    args, kw = random_layer(c)
    y = cora_conv2d_triton(*args, **kw, activation="relu")
    torch.testing.assert_close(cora_conv2d_triton(*args, **dict(kw, relu=True)), y, rtol=0, atol=0)
    torch.testing.assert_close(cora_conv2d_triton(*args, **dict(kw, relu=True), activation="relu"), y, rtol=0, atol=0)
    assert (y >= 0).all() and (y == 0).any()


def test_bad_activation_raises_before_launch():
    c = Case(N=1, C_in=4, C_out=5, H=5, W=5, rank=0)
    args, kw = random_layer(c)
    for fn in (cora_conv2d_triton, cora_conv2d_reference):
        with pytest.raises(ValueError, match=r"activation.*relu.*relu6.*silu.*hardswish.*gelu"):
            fn(*args, **kw, activation="tanh")
        with pytest.raises(ValueError, match="relu=True"):
            fn(*args, **dict(kw, relu=True), activation="silu")


SLOW_CASES = [
    Case(N=3, C_in=c_in, C_out=c_out, H=7, W=7, k=(k, k), stride=(s, s), padding=(p, p), dilation=(d, d), bits=bits,
         rank=rank, dtype=dt, bias=True, bn=bn, res=res, relu=relu)
    for (k, s, p, d) in [(1, 1, 0, 1), (3, 2, 1, 1), (5, 1, 3, 2), (7, 2, 3, 1)]
    for (c_in, c_out, bits, rank) in [(3, 5, 4, "full"), (13, 11, 3, 0), (32, 19, 4, "odd")]
    for (dt, bn, res, relu) in [(F32, True, False, True), (F16, False, True, False), (BF16, True, True, True)]
]


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=str)
def test_fused_grid_slow(case):
    _check(case)


@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("bits", [3, 4])
def test_delta_input_reproduces_dequantized_weights(bits, dtype):
    """One nonzero input pixel of value 1: the output at each tap is exactly the dequantized weight."""
    c = Case(N=1, C_in=6, C_out=9, H=7, W=7, k=(3, 3), padding=(1, 1), bits=bits, rank=0, dtype=dtype)
    args, kw = random_layer(c)
    x, planes, scale, zero = args[:4]
    w = dequantize_weight(planes, scale, zero, bits, (c.C_out, c.C_in, 3, 3), dtype=torch.float32)
    for ch in (0, 5):
        x = torch.zeros_like(x)
        x[0, ch, 3, 3] = 1.0
        y = cora_conv2d_triton(x, planes, scale, zero, None, None, None, **kw)
        for kh in range(3):
            for kw_ in range(3):
                got = y[0, :, 3 - kh + 1, 3 - kw_ + 1]
                assert torch.equal(got, w[:, ch, kh, kw_].to(dtype)), (bits, dtype, ch, kh, kw_)


@pytest.mark.parametrize("dtype", [F32, F16])
def test_dense_weight_control_variant(dtype):
    """The fp16-weight control (BITS=16) computes the same layer from a dense dequantized weight."""
    c = Case(N=2, C_in=9, C_out=10, H=6, W=6, k=(3, 3), bits=4, rank="odd", dtype=dtype, bias=True, relu=True)
    args, kw = random_layer(c)
    x, planes, scale, zero = args[:4]
    dense = dense_gemm_weight(planes, scale, zero, c.bits, c.K, dtype)
    assert dense.shape == (c.K, c.C_out)
    y = cora_conv2d_triton(*args, **kw, dense_weight=dense)
    y_ref = cora_conv2d_reference(*args, **kw, compute_dtype=torch.float64, out_dtype=torch.float64)
    tol_dtype = dtype
    assert_close_rel(y, y_ref, tol_dtype)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_int8_adapter_reference_matches_direct_fp64(bits):
    """The reference with int8 adapters is the conv with ``Q(W) + (sb*qb)(sa*qa)`` (fp64, dequantized by hand);
    reading the codes without their scales would be far off (the check can fail)."""
    c = Case(N=2, C_in=6, C_out=8, H=6, W=5, k=(3, 3), bits=bits, rank="odd", bias=True, adapter="int8")
    args, kw = random_layer(c)
    x, planes, scale, zero, qa, qb, bias = args
    assert qa.dtype == qb.dtype == torch.int8 and kw["a_scale"].dtype == kw["b_scale"].dtype == torch.float32
    a = kw["a_scale"].double()[:, None] * qa.double()
    b = kw["b_scale"].double()[:, None] * qb.double()
    shape = (c.C_out, c.C_in, *c.k)
    w = dequantize_weight(planes, scale, zero, bits, shape, dtype=torch.float64) + from_gemm_layout(b @ a, shape)
    direct = F.conv2d(x.double(), w, bias.double(), padding=c.padding)
    conv = {k: v for k, v in kw.items() if k not in ("a_scale", "b_scale")}
    assert_close_rel(cora_conv2d_reference(*args, **kw), direct, torch.float32)
    assert_close_rel(cora_conv2d_reference(*args, **kw, compute_dtype=torch.float64, out_dtype=torch.float64),
                     direct, torch.float32)
    unscaled = cora_conv2d_reference(x, planes, scale, zero, qa.float(), qb.float(), bias, **conv)
    assert rel_err(unscaled, direct) > 100 * tol_for(torch.float32)


def test_int8_adapter_zero_rows_of_b():
    """A row of B with scale 0 is zero whatever its codes (the kernel divides by b_scale: no 0/0)."""
    c = Case(N=1, C_in=8, C_out=6, H=5, W=5, k=(3, 3), bits=4, rank=2, bias=True, adapter="int8")
    args, kw = random_layer(c)
    assert (args[5][1] != 0).any()
    kw["b_scale"] = kw["b_scale"].clone()
    kw["b_scale"][1] = 0.0
    y = cora_conv2d_triton(*args, **kw)
    y_ref = cora_conv2d_reference(*args, **kw, compute_dtype=torch.float64, out_dtype=torch.float64)
    assert_close_rel(y, y_ref, torch.float32)


def test_nchw_and_channels_last_agree():
    c = Case(N=2, C_in=8, C_out=6, H=5, W=5, k=(3, 3), bits=4, rank=1, dtype=F32, res=True)
    args, kw = random_layer(c)
    y1 = cora_conv2d_triton(*args, **kw)
    x_cl = args[0].contiguous(memory_format=torch.channels_last)
    kw_cl = dict(kw, residual=kw["residual"].contiguous(memory_format=torch.channels_last))
    y2 = cora_conv2d_triton(x_cl, *args[1:], **kw_cl)
    assert y1.is_contiguous() and y2.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y1, y2, rtol=0, atol=1e-6)


def test_groups_not_in_kernel():
    c = Case(N=1, C_in=2, C_out=4, rank=0)  # per-group K = 9 * 2
    args, kw = random_layer(c)
    x = torch.randn(1, 4, c.H, c.W, device=args[0].device)
    with pytest.raises(NotImplementedError):
        cora_conv2d_triton(x, *args[1:], **kw, groups=2)
