"""CoRaConv2d through the cora::conv2d op: the real Triton kernel (interpreter on CPU) and torch.compile."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cora
from cora import CoRaConv2d
from tests.tolerances import assert_close_rel

# The real kernel: on a GPU machine on CUDA tensors, otherwise on CPU tensors through the interpreter
# (tests/conftest.py sets TRITON_INTERPRET=1 when there is no CUDA device).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CASES = [
    # (conv kwargs, bits, rank)
    (dict(in_channels=5, out_channels=7, kernel_size=3, stride=1, padding=1), 4, 3),
    (dict(in_channels=6, out_channels=9, kernel_size=3, stride=2, padding=1, bias=False), 3, 1),
    (dict(in_channels=4, out_channels=6, kernel_size=(3, 5), padding="same", dilation=2), 4, 6),
    (dict(in_channels=3, out_channels=8, kernel_size=1), 3, 0),
    (dict(in_channels=5, out_channels=5, kernel_size=3, padding=2, padding_mode="reflect"), 4, 2),
    # int8 adapters (per-row fp32 scales)
    (dict(in_channels=6, out_channels=7, kernel_size=3, stride=2, padding=1), 2, 3, "int8"),
    (dict(in_channels=4, out_channels=6, kernel_size=(3, 5), padding="same", dilation=2), 3, 2, "int8"),
]


def _layer(kwargs, bits, rank, seed, adapter_dtype="float16"):
    torch.manual_seed(seed)
    return CoRaConv2d.from_conv(nn.Conv2d(**kwargs), bits=bits, rank=rank, adapter_dtype=adapter_dtype)


def _expected(m: CoRaConv2d, x: torch.Tensor) -> torch.Tensor:
    """``F.conv2d`` with the effective weight, through an nn.Conv2d of the same options."""
    conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                     m.groups, m.bias is not None, m.padding_mode).double()
    with torch.no_grad():
        conv.weight.copy_(m.effective_weight().double())
        if m.bias is not None:
            conv.bias.copy_(m.bias.double())
        return conv(x.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_triton_backend_matches_effective_weight(case, dtype, monkeypatch):
    monkeypatch.setenv("CORA_BACKEND", "triton")
    kwargs, bits, rank, *adapter_dtype = CASES[case]
    m = _layer(kwargs, bits, rank, seed=case, adapter_dtype=(adapter_dtype or ["float16"])[0]).to(DEVICE)
    assert m.adapter_int8 == (adapter_dtype == ["int8"])
    x = torch.randn(2, kwargs["in_channels"], 9, 8).to(DEVICE, dtype)
    with torch.no_grad():
        y = m(x)
    assert y.dtype == dtype
    assert_close_rel(y.cpu(), _expected(m.cpu(), x.cpu()), dtype)


def test_reference_backend_matches(monkeypatch):
    monkeypatch.setenv("CORA_BACKEND", "reference")
    m = _layer(CASES[0][0], 4, 3, seed=11)
    x = torch.randn(3, 5, 7, 7)
    with torch.no_grad():
        assert_close_rel(m(x), _expected(m, x), torch.float32)
        # the op's own reference implementation, through the one argument builder
        assert_close_rel(m.op_forward(x, backend="reference"), _expected(m, x), torch.float32)


def _refuse(*args, **kwargs):
    raise AssertionError("this path must not run")


def test_layer_backend_overrides_the_environment(monkeypatch):
    """One decision (cora_kernels.resolve_backend): the layer's backend first, then CORA_BACKEND."""
    m = _layer(CASES[0][0], 4, 3, seed=13).to(DEVICE)
    x = torch.randn(2, 5, 6, 6).to(DEVICE)
    monkeypatch.setenv("CORA_BACKEND", "reference")
    m.backend = cora.Backend.TRITON
    monkeypatch.setattr(CoRaConv2d, "reference_forward", _refuse)
    with torch.no_grad():
        assert_close_rel(m(x).cpu(), _expected(m.cpu(), x.cpu()), torch.float32)
    monkeypatch.undo()
    monkeypatch.setenv("CORA_BACKEND", "triton")
    m = m.to(DEVICE)
    m.backend = "reference"
    monkeypatch.setattr(CoRaConv2d, "op_forward", _refuse)
    with torch.no_grad():
        m(x)
    with pytest.raises(ValueError, match="reference"):
        CoRaConv2d(3, 4, 3, backend="cuda-please")


@pytest.mark.parametrize("kwargs, bits, dtype", [
    (dict(in_channels=6, out_channels=6, kernel_size=3, stride=2, padding=1, groups=6), 4, torch.float32),
    (dict(in_channels=4, out_channels=8, kernel_size=5, padding="same", groups=4, bias=False), 3, torch.float16),
    (dict(in_channels=6, out_channels=4, kernel_size=3, padding=1, groups=2), 2, torch.float32),
], ids=["depthwise", "depthwise_mult2", "grouped"])
def test_grouped_layer_runs_the_grouped_kernel(kwargs, bits, dtype, monkeypatch):
    """A depthwise / grouped CoRaConv2d with backend="triton" runs the direct grouped kernel (the
    interpreter on CPU) through op_forward, never reference_forward, and matches reference_forward."""
    import cora_kernels.conv_depthwise as cd

    torch.manual_seed(21)
    m = CoRaConv2d.from_conv(nn.Conv2d(**kwargs), bits=bits, rank=0).to(DEVICE)
    x = torch.randn(2, kwargs["in_channels"], 7, 6).to(DEVICE, dtype)
    with torch.no_grad():
        want = m.reference_forward(x.float())  # float32: the layer's own reference, not rounded to fp16
    calls = []
    real = cd.cora_conv2d_grouped_triton
    monkeypatch.setattr(cd, "cora_conv2d_grouped_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(CoRaConv2d, "reference_forward", _refuse)
    monkeypatch.delenv("CORA_BACKEND", raising=False)
    m.backend = "triton"
    with torch.no_grad():
        y = m(x)
    assert calls == [1] and y.dtype == dtype
    assert_close_rel(y.cpu(), want.cpu(), dtype)
    assert_close_rel(y.cpu(), _expected(m.cpu(), x.cpu()), dtype)


def test_autograd_uses_reference_path(monkeypatch):
    monkeypatch.setenv("CORA_BACKEND", "triton")  # would fail under autograd if the op were used
    m = _layer(CASES[0][0], 4, 3, seed=12)
    x = torch.randn(2, 5, 6, 6, requires_grad=True)
    m(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.c1 = CoRaConv2d.from_conv(nn.Conv2d(3, 8, 3, padding=1), bits=4, rank=2)
        self.c2 = CoRaConv2d.from_conv(nn.Conv2d(8, 4, 3, stride=2, padding=1), bits=3, rank=1)

    def forward(self, x):
        return self.c2(F.relu(self.c1(x)))


@pytest.mark.parametrize("backend", [None, "reference"])
def test_torch_compile_fullgraph_on_cpu(backend, monkeypatch):
    if backend:
        monkeypatch.setenv("CORA_BACKEND", backend)
    else:
        monkeypatch.delenv("CORA_BACKEND", raising=False)
    torch._dynamo.reset()
    model = _Tiny().eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="eager")(x)
    assert_close_rel(compiled, eager, torch.float32)
