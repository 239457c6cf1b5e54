"""A layer prepared once (cora_kernels.prepared.PreparedConv): same results as the op, validation once per
input key, and the host time of a call (pytest-benchmark, kernel launches stubbed; never asserted)."""
import pytest
import torch

from cora_kernels import conv_depthwise, conv_fused, prepared
from cora_kernels.geometry import activation_code, pair
from cora_kernels.ops import cora_conv2d
from cora_kernels.prepared import PreparedConv
from cora_kernels.records import Epilogue, PackedWeight
from cora_kernels.testing import Case, random_layer
from tests.cora_kernels.test_conv_fused import CASES

F16 = torch.float16


def _records(args, kw, c: Case):
    x, planes, scale, zero, a, b, bias = args
    w = PackedWeight(tuple(planes), scale, zero, c.bits, pair(c.k, "k"), pair(c.stride, "s"), pair(c.padding, "p"),
                     pair(c.dilation, "d"), c.groups, a, b, kw.get("a_scale"), kw.get("b_scale"), bias, c.C_in)
    ep = Epilogue(kw.get("out_scale"), kw.get("out_shift"), activation_code(kw.get("activation"), kw.get("relu", False)))
    return w, ep


GROUPED = [Case(N=2, C_in=8, C_out=8, groups=8, rank=0, bits=4, bias=True, bn=True, res=True, relu=True),
           Case(N=1, C_in=6, C_out=12, groups=3, rank=0, bits=3, dtype=F16, channels_last=True)]


@pytest.mark.parametrize("case", CASES[::3] + GROUPED, ids=str)
def test_prepared_equals_the_op(case):
    args, kw = random_layer(case)
    res = kw.pop("residual", None)
    call = PreparedConv(*_records(args, kw, case))
    want = cora_conv2d(*args, **kw, residual=res, backend="triton")
    for _ in range(2):  # the first call makes the plan, the second runs it
        got = call(args[0], res)
        assert got.dtype == want.dtype and got.shape == want.shape and got.stride() == want.stride()
        assert torch.equal(got, want), str(case)


def test_prepared_dequant_strategy(monkeypatch):
    c = Case(N=2, C_in=8, C_out=6, bits=4, rank="odd", bias=True, bn=True, res=True, relu=True)
    args, kw = random_layer(c)
    res = kw.pop("residual")
    monkeypatch.setenv("CORA_STRATEGY", "dequant")
    call = PreparedConv(*_records(args, kw, c))
    assert torch.equal(call(args[0], res), cora_conv2d(*args, **kw, residual=res, backend="triton"))


def test_validated_once_per_input_key(monkeypatch):
    c = Case(N=1, C_in=5, C_out=7, bits=4, rank="odd", bias=True)
    args, kw = random_layer(c)
    call = PreparedConv(*_records(args, kw, c))
    x = args[0]
    first = call(x)
    calls = []
    real = prepared.check_conv_args
    monkeypatch.setattr(prepared, "check_conv_args", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert torch.equal(call(torch.clone(x)), first)  # same key: no validation
    assert calls == []
    call(torch.randn(2, 5, 6, 6))  # a new shape: validated, a new plan
    assert calls == [1] and len(call._plans) == 2
    with pytest.raises(ValueError, match="input channels"):
        call(torch.randn(1, 4, 6, 6))  # a bad input still fails on its first call, with the op's message


def test_bad_layer_refused_at_construction():
    c = Case(C_in=5, C_out=7, bits=4, rank="odd")
    args, kw = random_layer(c)
    w, ep = _records(args, kw, c)
    with pytest.raises(ValueError, match="zero must be a floating tensor"):
        PreparedConv(PackedWeight(w.planes, w.scale, w.zero[:3], 4, w.kernel_size, in_channels=5, a=w.a, b=w.b))
    with pytest.raises(ValueError, match="in_channels"):
        PreparedConv(PackedWeight(w.planes, w.scale, w.zero, 4, w.kernel_size, a=w.a, b=w.b))
    with pytest.raises(ValueError, match="activation code"):
        PreparedConv(w, Epilogue(act=99))
    with pytest.raises(ValueError, match="words per channel"):
        PreparedConv(PackedWeight(w.planes, w.scale, w.zero, 4, (5, 5), in_channels=5))


# --- host time ---------------------------------------------------------------------------------------

class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **meta)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **meta: None


@pytest.fixture
def stubbed_launches(monkeypatch):
    for mod, name in ((conv_fused, "_cora_conv2d_kernel"), (conv_fused, "_splitk_epilogue_kernel"),
                      (conv_depthwise, "_cora_conv2d_grouped_kernel")):
        monkeypatch.setattr(mod, name, _NoLaunch())


def _resnet_layer():
    """A ResNet-18 layer2 conv (128 -> 128, 3x3, 28x28) at batch 1, fp16 channels_last, rank 8, with the
    deployed epilogue (folded BatchNorm, residual, ReLU)."""
    c = Case(N=1, C_in=128, C_out=128, H=28, W=28, bits=4, rank=8, dtype=F16, bias=False, bn=True, res=True,
             relu=True, channels_last=True)
    args, kw = random_layer(c, device="cpu")
    return c, args, kw


@pytest.mark.parametrize("path", ["prepared", "op"])
def test_host_time_of_a_call(benchmark, stubbed_launches, path):
    """The Python part of one deployed call on the Triton backend, launches stubbed (CPU tensors).  Compare
    the two paths in the saved benchmark table; nothing is asserted about time."""
    c, args, kw = _resnet_layer()
    res = kw.pop("residual").contiguous(memory_format=torch.channels_last)
    if path == "prepared":
        call = PreparedConv(*_records(args, kw, c))
        call(args[0], res)
        benchmark(call, args[0], res)
    else:
        benchmark(lambda: cora_conv2d(*args, **kw, residual=res, backend="triton"))


def test_cora_strategy_is_read_per_call(monkeypatch):
    """A plan is per CORA_STRATEGY: switching the variable between calls switches the strategy (a deployed
    model benchmarked fused-only, then tuned, must not keep the first one's plans)."""
    from cora_kernels import scratch

    c = Case(N=1, C_in=8, C_out=6, bits=4, rank="odd", bias=True, bn=True)
    args, kw = random_layer(c)
    call = PreparedConv(*_records(args, kw, c))
    dequants = []
    real = prepared.cora_conv2d_dequant
    monkeypatch.setattr(prepared, "cora_conv2d_dequant", lambda *a: dequants.append(1) or real(*a))
    monkeypatch.delenv("CORA_STRATEGY", raising=False)
    y_auto = call(args[0])
    assert dequants == []
    monkeypatch.setenv("CORA_STRATEGY", "dequant")
    y_dq = call(args[0])
    assert dequants == [1] and len(call._plans) == 2
    monkeypatch.setenv("CORA_STRATEGY", "fused")
    assert torch.equal(call(args[0]), y_auto) and dequants == [1]
    assert (y_dq - y_auto).abs().max() < 1e-3 * y_auto.abs().max()
    scratch.release_scratch()
