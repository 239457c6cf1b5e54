"""cora.deployed / deploy(weights=...): the dense form (effective weights computed once, one F.conv2d per conv)
against the packed one (the cora::conv2d op, reference backend), the choice and its bytes (the engine's and
the CLI's option: tests/cora/test_inference.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cora
import cora_kernels
import cora_kernels.reference
import cora.modules
from cora.deploy import DeployedConv, DeployedLinear, deploy, weight_bytes
from cora.experiments.models import cifar_resnet
from tests.cora.test_deploy import _count, _swap_convs
from tests.cora.test_fusion import Broadcast, Functional, InvertedResidual, Shared, Untraceable, _convert
from tests.helpers import compile_fullgraph, randomise_bn
from tests.tolerances import assert_close_rel


def _no_unpacking(monkeypatch):
    """Make every per-call use of the packed codes fail: the op, the code unpacking of the layers and the reference."""
    def refuse(*args, **kwargs):
        raise AssertionError("a dense deployed model must not unpack codes or call the op per call")

    monkeypatch.setattr(cora_kernels, "cora_conv2d", refuse)
    monkeypatch.setattr(cora.layer_storage, "unpack_codes", refuse)
    monkeypatch.setattr(cora_kernels.reference, "unpack_codes", refuse)


def _dense_equals_packed(model: nn.Module, shape, monkeypatch, seed: int = 0) -> nn.Module:
    """Deploy ``model`` both ways; the dense one (which never unpacks codes) equals the packed one (reference op)
    within the fp32 tolerance on fresh random inputs. Returns the dense model."""
    monkeypatch.setenv("CORA_BACKEND", "reference")
    packed = deploy(model, weights="packed")
    dense = deploy(model, weights="dense")
    assert (packed.cora_deploy["weights"], dense.cora_deploy["weights"]) == ("packed", "dense")
    assert {k: v for k, v in packed.cora_deploy.items() if k != "weights"} == {
        k: v for k, v in dense.cora_deploy.items() if k != "weights"}  # the same fusions
    assert not any(isinstance(m, (cora.CoRaConv2d, cora.QuantLinear)) and not isinstance(p, (DeployedConv, DeployedLinear))
                   for p in dense.modules() for m in p.children())  # every quantized layer left is wrapped densely
    assert all(m.dense for m in dense.modules() if isinstance(m, DeployedConv))
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = packed(x)
        with monkeypatch.context() as m:
            _no_unpacking(m)
            got = dense(x)
    assert_close_rel(got, want, torch.float32)
    return dense


@pytest.fixture(scope="module")
def resnet20():
    """A CIFAR ResNet-20 converted cheaply (uniform ranks, round to nearest, no tuning), linear head included."""
    torch.manual_seed(0)
    model = randomise_bn(cifar_resnet(20), seed=1)
    cfg = cora.CoRaConfig(bits=4, method="uniform", budget=0.2, rounding="nearest", range_method="minmax",
                          factorization="weight", sequential=False, refine=False, progress=False,
                          calib_images=8, stats_images=8, tune_iterations=0)
    return cora.convert(model, torch.randn(8, 3, 32, 32), cfg).eval()


def test_resnet20_dense_equals_packed(resnet20, monkeypatch):
    assert isinstance(resnet20.linear, cora.QuantLinear) and resnet20.linear.rank > 0
    dense = _dense_equals_packed(resnet20, (3, 3, 32, 32), monkeypatch, seed=1)
    assert dense.cora_deploy == {"blocks": 9, "folded_bn": 19, "traced_fusions": 0, "weights": "dense"}
    assert isinstance(dense.linear, DeployedLinear) and _count(dense, DeployedConv) == 19
    # the folded weight: W_eff * out_scale, bias out_shift (the ResNet's convs have no bias)
    packed = deploy(resnet20, weights="packed")
    c, p = dense.layer2[0].conv1, packed.layer2[0].conv1
    torch.testing.assert_close(c.dense_weight, p.conv.effective_weight() * p.out_scale[:, None, None, None])
    torch.testing.assert_close(c.dense_bias, p.out_shift)
    assert c.dense_weight.dtype == torch.float32 and c.dense_weight.is_contiguous()


def test_mobilenet_style_grouped_depthwise_and_unfused_convs(monkeypatch):
    """Inverted residuals (depthwise convs, traced adds), a general grouped conv, convs without BatchNorm,
    unfused convs (a conv called twice, a value used twice, a tanh GELU after the last conv), a broadcasting add."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardswish())
            self.blocks = nn.Sequential(InvertedResidual(8, nn.ReLU6()), InvertedResidual(8, nn.SiLU()))
            self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)  # no BatchNorm, no activation: unfused
            self.func = Functional()
            self.head = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.grouped(self.blocks(self.stem(x)))
            return self.head(self.func(y[:, :3]))

    model = _convert(Model(), seed=21)
    dense = _dense_equals_packed(model, (2, 3, 9, 9), monkeypatch, seed=2)
    assert dense.grouped.dense and dense.grouped.dense_weight.shape == (8, 4, 3, 3)
    assert any(m.conv.groups == 16 for m in dense.modules() if isinstance(m, DeployedConv))  # depthwise
    for cls, shape in ((Shared, (2, 3, 5, 5)), (Broadcast, (2, 4, 5, 5)), (Untraceable, (2, 3, 6, 6))):
        _dense_equals_packed(_convert(cls(), seed=23), shape, monkeypatch, seed=3)


@pytest.mark.parametrize("bits", [2, 4])
def test_int8_adapters(bits, monkeypatch):
    model = nn.Sequential(cifar_resnet(8), nn.Flatten())
    model = _swap_convs(randomise_bn(model, seed=30 + bits), bits=bits, rank=3, seed=bits, adapter_dtype="int8")
    fc = model[0].linear
    model[0].linear = cora.QuantLinear.from_linear(fc, bits, rank=2, adapter_dtype="int8")
    assert model[0].linear.adapter_int8
    _dense_equals_packed(model.eval(), (2, 3, 32, 32), monkeypatch, seed=bits)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_modes_and_asymmetric_same(mode, monkeypatch):
    torch.manual_seed(40)
    seq = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, padding_mode=mode), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 5, (3, 4), padding="same"), nn.ReLU(),  # asymmetric 'same', no BN
        nn.Conv2d(5, 4, 1), nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 3, padding=2, dilation=2, padding_mode=mode),  # unfused, dilated, padded first
    )
    seq = _swap_convs(randomise_bn(seq, 41), bits=4, rank=2, seed=42)
    dense = _dense_equals_packed(seq, (2, 3, 7, 8), monkeypatch, seed=4)
    assert [type(m).__name__ for m in dense] == ["DeployedConv", "Identity", "Identity", "DeployedConv", "Identity",
                                                 "DeployedConv", "Identity", "DeployedConv"]
    assert (dense[0]._pad_first, dense[3]._pad_first, dense[5]._pad_first) == (True, True, False)


def test_weights_choice(resnet20, monkeypatch):
    monkeypatch.delenv("CORA_BACKEND", raising=False)
    for bad in ("fast", "Dense", None):
        with pytest.raises(ValueError, match="auto, dense, packed"):
            deploy(resnet20, weights=bad)
    assert deploy(resnet20).cora_deploy["weights"] == "dense"  # auto, on the CPU
    # the Triton backend asked for (the interpreter on CPU tensors) keeps the packed codes
    assert deploy(resnet20, backend="triton").cora_deploy["weights"] == "packed"
    monkeypatch.setenv("CORA_BACKEND", "triton")
    assert deploy(resnet20).cora_deploy["weights"] == "packed"
    assert deploy(resnet20, backend="reference").cora_deploy["weights"] == "dense"
    # a bare layer deploys to its dense form
    conv = resnet20.layer1[0].conv1
    bare = deploy(conv, weights="dense")
    assert isinstance(bare, DeployedConv) and bare.dense and bare.conv is not conv
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        assert_close_rel(bare(x), conv.reference_forward(x), torch.float32)


def test_dense_buffers_bytes_state_dict_and_dtypes(resnet20):
    dense, packed = deploy(resnet20, weights="dense"), deploy(resnet20, weights="packed")
    wb, wp = weight_bytes(dense), weight_bytes(packed)
    convs = [m for m in dense.modules() if isinstance(m, DeployedConv)]
    want = sum(4 * m.dense_weight.numel() + 4 * m.dense_bias.numel() for m in convs)
    lin = dense.linear
    want += 4 * lin.dense_weight.numel() + 4 * lin.dense_bias.numel()  # the layer's own float32 bias, counted once
    assert wb["dense"] == want and wp["dense"] == 0 and wb["float"] == 0 and wp["float"] == 4 * lin.dense_bias.numel()
    assert wb["bn_folded"] == 0 and wb["codes"] == wp["codes"] and wb["adapters"] == wp["adapters"]
    assert wb["total"] == sum(v for k, v in wb.items() if k != "total")
    # not a checkpoint format: the dense buffers are not in the state dict, but .to() moves them
    assert not any("dense_" in k for k in dense.state_dict())
    assert "layer1.0.conv1.dense_weight" in dict(dense.named_buffers())
    doubled = deploy(resnet20, weights="dense").to(torch.float64)
    assert doubled.layer1[0].conv1.dense_weight.dtype == torch.float64
    # inputs of another dtype: the weight is cast to it (one layer in bfloat16, the whole model in float64)
    x = torch.randn(2, 3, 32, 32)
    h = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        assert_close_rel(doubled(x.double()).float(), dense(x), torch.float32)
        c = dense.layer1[0].conv1
        assert_close_rel(c(h.to(torch.bfloat16)).float(), c(h), torch.bfloat16)


def test_dense_compiles_fullgraph_without_the_op(resnet20, monkeypatch):
    monkeypatch.setenv("CORA_BACKEND", "reference")
    eager, compiled, graphs = compile_fullgraph(deploy(resnet20, weights="dense"), torch.randn(2, 3, 32, 32))
    assert_close_rel(compiled, eager, torch.float32)
    assert len(graphs) == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert not any("cora" in t or "batch_norm" in t for t in targets)
    assert sum("conv2d" in t or "convolution" in t for t in targets) == 19


def test_dense_forward_is_one_conv(monkeypatch):
    """The forward of a dense DeployedConv: one F.conv2d with the cached weight and the folded bias, no copies."""
    conv = cora.CoRaConv2d.from_conv(nn.Conv2d(4, 6, 3, padding=1), 4, 2)
    bn = randomise_bn(nn.BatchNorm2d(6), seed=50)
    dc = DeployedConv(conv, bn, relu=True, dense=True)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        want = torch.relu(bn(conv.reference_forward(x)))
    calls = []
    real = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda *a, **k: calls.append(a) or real(*a, **k))
    with torch.no_grad():
        y = dc(x)
    assert len(calls) == 1 and calls[0][0] is x and calls[0][1] is dc.dense_weight and calls[0][2] is dc.dense_bias
    assert_close_rel(y, want, torch.float32)
