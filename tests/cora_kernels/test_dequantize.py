"""The dequantize strategy (effective weight in scratch, then the vendor conv) against the reference.

On a machine without a GPU the dequantize kernel runs through the Triton interpreter and ``F.conv2d``
on the CPU; with one, the same tests run on CUDA (``cora_kernels.testing.DEFAULT_DEVICE``).
"""
import threading

import pytest
import torch

from cora_kernels import scratch
from cora_kernels.conv_fused import cora_conv2d_triton, records
from cora_kernels.dequantize import effective_weight
from cora_kernels.geometry import ACTIVATIONS, check_conv_args
from cora_kernels.ops import cora_conv2d
from cora_kernels.packing import dequantize_adapter, from_gemm_layout
from cora_kernels.reference import cora_conv2d_reference, dequantize_weight
from cora_kernels.testing import DEFAULT_DEVICE, Case, random_layer
from tests.cora_kernels.test_conv_fused import ACT_CASES, CASES, _widen
from tests.tolerances import assert_close_rel, rel_err, tol_for


def _check(c: Case, activation=None, wide=False):
    args, kw = random_layer(c)
    if wide:
        _widen(kw)
    y = cora_conv2d_triton(*args, **kw, activation=activation, strategy="dequant")
    y_ref = cora_conv2d_reference(*args, **kw, compute_dtype=torch.float64, out_dtype=torch.float64,
                                  activation=activation)
    assert y.dtype == c.dtype and y.shape == y_ref.shape
    assert y.is_contiguous(memory_format=torch.channels_last if c.channels_last else torch.contiguous_format)
    err = assert_close_rel(y, y_ref, c.dtype, msg=str(c))
    print(f"{c}: rel err {err:.2e}")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_dequant_strategy_matches_reference(case):
    """Every case of the fused kernel's grid (bits 2/3/4, int8 adapters, every epilogue option, both
    layouts, fp32/fp16/bf16) by the dequantize strategy."""
    _check(case)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", ACT_CASES, ids=["fp32", "fp16"])
def test_dequant_strategy_activation_matches_reference(case, activation):
    _check(case, activation=activation, wide=True)


def _effective_reference(args, kw, c: Case) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``out_scale * (Q(W) + B·A)`` as ``[C_out, C_in, kh, kw]`` and ``out_scale * bias + out_shift``, in float64."""
    x, planes, scale, zero, a, b, bias = args
    shape = (c.C_out, c.C_in, *c.k)
    w = dequantize_weight(planes, scale, zero, c.bits, shape, dtype=torch.float64)
    if a is not None:
        A = dequantize_adapter(a, kw.get("a_scale"), torch.float64)
        B = dequantize_adapter(b, kw.get("b_scale"), torch.float64)
        w = w + from_gemm_layout(B @ A, shape)
    osc = kw.get("out_scale")
    bias64 = None if bias is None else bias.double()
    if osc is not None:
        w = w * osc.double()[:, None, None, None]
        bias64 = (torch.zeros(c.C_out, dtype=torch.float64, device=w.device) if bias64 is None else bias64)
        bias64 = bias64 * osc.double() + kw["out_shift"].double()
    return w, bias64


WEIGHT_CASES = [
    Case(C_in=5, C_out=7, bits=4, rank="odd", bias=True, bn=True),
    Case(C_in=33, C_out=70, bits=3, rank="full", dtype=torch.float16),  # more than one tile both ways
    Case(C_in=64, C_out=24, k=(1, 1), padding=(0, 0), bits=2, rank=0, dtype=torch.bfloat16, bn=True),
    Case(C_in=9, C_out=11, k=(5, 3), padding=(2, 1), bits=8, rank=1, adapter="int8", bias=True),
    Case(C_in=16, C_out=130, bits=4, rank="odd", adapter="int8", dtype=torch.float16, bn=True),
]


@pytest.mark.parametrize("case", WEIGHT_CASES, ids=str)
def test_effective_weight_is_the_folded_weight(case):
    """The kernel's weight and bias equal ``out_scale·(Q(W) + B·A)`` and ``out_scale·bias + out_shift``
    up to one rounding to the activation dtype, in the channels_last order cuDNN reads fastest."""
    args, kw = random_layer(case)
    x, planes, scale, zero, a, b, bias = args
    g = check_conv_args(*args, bits=case.bits, kernel_size=case.k, stride=case.stride, padding=case.padding,
                        dilation=case.dilation, out_scale=kw.get("out_scale"), out_shift=kw.get("out_shift"),
                        a_scale=kw.get("a_scale"), b_scale=kw.get("b_scale"))
    layer, ep = records(planes, scale, zero, a, b, bias, g, bits=case.bits, a_scale=kw.get("a_scale"),
                        b_scale=kw.get("b_scale"), out_scale=kw.get("out_scale"), out_shift=kw.get("out_shift"), act=0)
    w, b_eff = effective_weight(layer, ep, g, case.dtype)
    w_ref, b_ref = _effective_reference(args, kw, case)
    assert w.shape == w_ref.shape and w.dtype == case.dtype
    assert w.is_contiguous(memory_format=torch.channels_last)
    # one rounding of each entry to the dtype (fp32: the fp32 sum of two terms)
    floor = rel_err(w_ref.to(case.dtype), w_ref)
    assert rel_err(w, w_ref) <= floor + (1e-6 if case.dtype == torch.float32 else 1e-4)
    if b_ref is None:
        assert b_eff is None
    else:
        assert rel_err(b_eff, b_ref) <= rel_err(b_ref.to(case.dtype), b_ref) + 1e-6


def test_delta_input_reproduces_the_effective_weight():
    """One nonzero pixel: the output is the effective weight itself (fp32, no bias)."""
    c = Case(N=1, C_in=6, C_out=5, H=7, W=7, k=(3, 3), padding=(1, 1), bits=3, rank="odd")
    args, kw = random_layer(c)
    x = torch.zeros_like(args[0])
    x[0, :, 3, 3] = torch.randn(c.C_in, device=x.device) + 2.0  # never zero where it is set
    y = cora_conv2d_triton(x, *args[1:], **kw, strategy="dequant")
    w_ref, _ = _effective_reference(args, kw, c)
    want = torch.einsum("ocij,c->oij", w_ref.flip(2, 3), x[0, :, 3, 3].double())  # the 3x3 window around (3, 3)
    assert rel_err(y[0, :, 2:5, 2:5], want) <= tol_for(torch.float32)


def test_op_follows_cora_strategy(monkeypatch):
    """CORA_STRATEGY=dequant sends the op's Triton backend through the dequantize strategy: same result as
    the fused kernel within the fp32 tolerance, and the scratch buffer is used."""
    c = Case(N=2, C_in=8, C_out=6, bits=4, rank="odd", bias=True, bn=True, res=True, relu=True)
    args, kw = random_layer(c)
    monkeypatch.setenv("CORA_STRATEGY", "fused")
    scratch.release_scratch()
    y_fused = cora_conv2d(*args, **kw, backend="triton")
    assert scratch.scratch_bytes(args[0].device) == 0
    monkeypatch.setenv("CORA_STRATEGY", "dequant")
    y_dq = cora_conv2d(*args, **kw, backend="triton")
    assert scratch.scratch_bytes(args[0].device) >= c.C_out * c.K * 4
    assert rel_err(y_dq, y_fused) <= tol_for(torch.float32)


def test_strategy_argument_checked():
    args, kw = random_layer(Case())
    with pytest.raises(ValueError, match="strategy must be"):
        cora_conv2d_triton(*args, **kw, strategy="cudnn")


# --- the scratch buffer ---------------------------------------------------------------------------

def test_scratch_is_shared_and_grows_to_the_largest_request():
    dev = torch.device(DEFAULT_DEVICE)
    scratch.release_scratch()
    (a,) = scratch.scratch_tensor([(4, 8)], torch.float16, dev)
    (b,) = scratch.scratch_tensor([(2, 3)], torch.float16, dev)
    assert a.data_ptr() == b.data_ptr()  # the second layer reuses the first one's bytes
    w, bias = scratch.scratch_tensor([(100, 37), (100,)], torch.float32, dev)
    assert w.shape == (100, 37) and bias.shape == (100,) and w.is_contiguous()
    assert (bias.data_ptr() - w.data_ptr()) % 256 == 0 and bias.data_ptr() >= w.data_ptr() + w.numel() * 4  # no overlap
    held = scratch.scratch_bytes(dev)
    assert held >= 100 * 37 * 4 + 100 * 4
    scratch.scratch_tensor([(10,)], torch.float32, dev)
    assert scratch.scratch_bytes(dev) == held  # smaller requests never shrink or add
    scratch.release_scratch()
    assert scratch.scratch_bytes(dev) == 0


def test_scratch_per_thread():
    dev = torch.device(DEFAULT_DEVICE)
    scratch.release_scratch()
    ptrs = []

    def take():
        ptrs.append(scratch.scratch_tensor([(64,)], torch.float32, dev)[0].data_ptr())

    take()
    t = threading.Thread(target=take)
    t.start()
    t.join()
    assert len(set(ptrs)) == 2  # two host threads never share a buffer (one thread keeps one, whatever its stream)
    scratch.release_scratch()


def test_scratch_refuses_to_grow_during_capture(monkeypatch):
    dev = torch.device(DEFAULT_DEVICE)
    scratch.release_scratch()
    scratch.scratch_tensor([(16,)], torch.float32, dev)
    monkeypatch.setattr(scratch, "_capturing", lambda device: True)
    (small,) = scratch.scratch_tensor([(8,)], torch.float32, dev)  # fits: fine during a capture
    with pytest.raises(RuntimeError, match="before capturing"):
        scratch.scratch_tensor([(1 << 16,)], torch.float32, dev)
    monkeypatch.setattr(scratch, "_capturing", lambda device: False)
    (big,) = scratch.scratch_tensor([(1 << 16,)], torch.float32, dev)
    # the buffer a capture used is retired, never freed: a graph may still address it
    assert scratch.scratch_bytes(dev) >= (1 << 16) * 4 + 16 * 4
    scratch.release_scratch()
