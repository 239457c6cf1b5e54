"""Numerics of the grouped / depthwise kernel (through the Triton interpreter on CPU) against the reference."""
import pytest
import torch

from cora_kernels import tuning
from cora_kernels.conv_depthwise import _mode, cora_conv2d_grouped_triton
from cora_kernels.geometry import ACTIVATIONS
from cora_kernels.reference import cora_conv2d_reference, dequantize_weight
from cora_kernels.testing import Case, random_layer
from tests.tolerances import assert_close_rel

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _dw(c_in, mult=1, **kw):
    """A depthwise case: groups == C_in, C_out = mult * C_in, no adapter."""
    return Case(C_in=c_in, C_out=mult * c_in, groups=c_in, rank=0, **kw)


# Depthwise 3x3 / 5x5, stride 1 / 2, padding 0 / 1 / 2, dilation 2, channel multiplier 2, int2/3/4/8,
# fp32 / fp16 / bf16, NCHW and channels_last, each epilogue option; C_out 20 spans two channel tiles of
# the interpreter's config.  Then general groups (2 and 3 input channels per group).
CASES = [
    _dw(6, N=2, H=7, W=7, k=(3, 3), bits=4, bias=True),
    _dw(5, mult=2, N=1, H=8, W=7, k=(3, 3), stride=(2, 2), bits=3, dtype=F16, bn=True, relu=True, channels_last=True),
    _dw(20, N=1, H=6, W=6, k=(5, 5), padding=(2, 2), bits=2, dtype=BF16, res=True, relu=True, channels_last=True),
    _dw(4, mult=2, N=2, H=7, W=6, k=(5, 5), stride=(2, 2), padding=(2, 2), bits=4, dtype=F16, bias=True, bn=True,
        res=True, relu=True),
    _dw(6, N=1, H=7, W=7, k=(3, 3), padding=(2, 2), dilation=(2, 2), bits=3, res=True),
    _dw(7, N=1, H=5, W=6, k=(3, 3), bits=8, dtype=BF16, bias=True, relu=True),
    _dw(3, mult=2, N=2, H=7, W=7, k=(3, 3), stride=(2, 2), padding=(0, 0), bits=2, bias=True, bn=True),
    Case(N=1, C_in=8, C_out=12, H=6, W=6, k=(3, 3), groups=4, rank=0, bits=4, dtype=F16, bias=True, bn=True,
         res=True, relu=True),
    Case(N=2, C_in=9, C_out=6, H=7, W=5, k=(3, 3), stride=(2, 1), groups=3, rank=0, bits=3, channels_last=True),
]


def _check(c: Case, activation=None, wide=False, **extra):
    args, kw = random_layer(c)
    if wide:  # a pre-activation over about [-12, 12]: past relu6's clamp and both bends of hardswish
        kw["residual"] = kw["residual"] * 4
    y = cora_conv2d_grouped_triton(*args, **kw, activation=activation, **extra)
    y_ref = cora_conv2d_reference(*args, **kw, compute_dtype=torch.float64, out_dtype=torch.float64,
                                  activation=activation)
    assert y.dtype == c.dtype
    assert y.is_contiguous(memory_format=torch.channels_last if c.channels_last else torch.contiguous_format)
    err = assert_close_rel(y, y_ref, c.dtype, msg=str(c))
    print(f"{c}: rel err {err:.2e}")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_grouped_matches_reference(case):
    _check(case)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_grouped_activation_matches_reference(activation):
    """Every fused activation after bias, BatchNorm and the residual (depthwise with a channel multiplier)."""
    _check(_dw(4, mult=2, N=1, H=6, W=6, k=(3, 3), bits=4, bias=True, bn=True, res=True), activation=activation,
           wide=True)


def test_gpu_tile_under_the_interpreter():
    """A tile the GPU uses (not the interpreter's), with a channel multiplier and every epilogue option."""
    c = _dw(18, mult=2, N=1, H=9, W=9, k=(3, 3), bits=4, dtype=F16, bias=True, bn=True, res=True, relu=True)
    _check(c, config=tuning.DEPTHWISE_CONFIGS[0])


@pytest.mark.parametrize("bits, dtype", [(4, F32), (3, F16), (2, BF16)])
def test_delta_input_reproduces_dequantized_weights(bits, dtype):
    """One nonzero input pixel of value 1 (channel multiplier 2): each tap of the output is exactly the
    dequantized weight ``scale * (q - zero)`` of both output channels that read the pixel's channel."""
    c = _dw(4, mult=2, N=1, H=7, W=7, k=(3, 3), bits=bits, dtype=dtype)
    args, kw = random_layer(c)
    x, planes, scale, zero = args[:4]
    w = dequantize_weight(planes, scale, zero, bits, (c.C_out, 1, 3, 3), dtype=torch.float32)
    assert (w != 0).any()
    for ch in (0, 3):
        x = torch.zeros_like(x)
        x[0, ch, 3, 3] = 1.0
        y = cora_conv2d_grouped_triton(x, planes, scale, zero, None, None, None, **kw)
        outs = [2 * ch, 2 * ch + 1]
        others = [o for o in range(c.C_out) if o not in outs]
        assert torch.count_nonzero(y[0, others]) == 0
        for kh in range(3):
            for kw_ in range(3):
                got = y[0, outs, 3 - kh + 1, 3 - kw_ + 1]
                assert torch.equal(got, w[outs, 0, kh, kw_].to(dtype)), (bits, dtype, ch, kh, kw_)


def test_refuses_groups_one_and_adapters():
    c = Case(N=1, C_in=4, C_out=4, H=5, W=5, rank=0)
    args, kw = random_layer(c)
    with pytest.raises(NotImplementedError, match="fused"):
        cora_conv2d_grouped_triton(*args, **kw)
    c = _dw(4, N=1, H=5, W=5)
    args, kw = random_layer(c)
    a, b = torch.randn(2, c.K), torch.randn(c.C_out, 2)
    with pytest.raises(ValueError, match="groups"):
        cora_conv2d_grouped_triton(*args[:4], a, b, None, **kw)


def test_mode():
    assert _mode(1, 1) == 0 and _mode(1, 2) == 1 and _mode(2, 2) == 2 and _mode(4, 1) == 2


def test_depthwise_config_by_shape():
    pick = tuning.depthwise_config
    assert pick(M=10**6, C_out=384, interpreting=True) is tuning.DEPTHWISE_INTERPRETER_CONFIG
    big, small = 2 * 112 * 112, 49
    for c_out, block_c in [(16, 32), (32, 32), (96, 32), (144, 32), (192, 64), (240, 128), (384, 128), (960, 128)]:
        for m in (big, small):
            cfg = pick(M=m, C_out=c_out)
            assert cfg in tuning.DEPTHWISE_CONFIGS and cfg.BLOCK_C == block_c, (c_out, m, cfg)
        # the small-M tile only when the large one makes too few programs
        assert pick(M=small, C_out=c_out).BLOCK_M <= pick(M=big, C_out=c_out).BLOCK_M
    assert pick(M=big, C_out=384).name == "dw_c128" and pick(M=small, C_out=384).name == "dw_c128_small_m"
    # a channel multiplier: never the excluded tiles (64 channels at most)
    for c_out in (240, 384, 960):
        for m in (big, small):
            cfg = pick(M=m, C_out=c_out, multiplier=True)
            assert cfg.name not in tuning.DEPTHWISE_MULTIPLIER_EXCLUDED and cfg.BLOCK_C <= 64, (c_out, m, cfg)
    for cfg in tuning.DEPTHWISE_CONFIGS:  # 16 fp32 accumulators per thread (more spilled)
        assert cfg.BLOCK_M * cfg.BLOCK_C == 16 * 32 * cfg.num_warps, cfg
