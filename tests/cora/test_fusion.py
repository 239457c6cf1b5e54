"""cora.fusion (through cora.deploy): conv -> BN -> + residual -> activation chains found by tracing."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import cora
from cora.deploy import DeployedConv, deploy
from cora.fusion import ACTIVATION_MODULES
from tests.cora.test_deploy import _count
from tests.helpers import compile_fullgraph, randomise_bn
from tests.tolerances import assert_close_rel

torch.set_num_threads(1)


def _convert(model: nn.Module, seed: int) -> nn.Module:
    """Every conv a CoRaConv2d (rank 2; grouped convs take no adapter), random BatchNorm statistics, eval mode."""
    model = randomise_bn(model, seed)
    torch.manual_seed(seed + 1)
    for name, m in list(model.named_modules()):
        if type(m) is nn.Conv2d:
            parent, _, child = name.rpartition(".")
            new = cora.CoRaConv2d.from_conv(m, 4, 2 if m.groups == 1 else 0)
            setattr(model.get_submodule(parent) if parent else model, child, new)
    return model.eval()


def _check_same(dep, model, shape, seed=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert_close_rel(dep(x), model(x), torch.float32)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: expand 1x1 -> ReLU6, depthwise 3x3 -> ReLU6, project 1x1, + x."""

    def __init__(self, c: int, act: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(c, 2 * c, 1, bias=False), nn.BatchNorm2d(2 * c), act,
            nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c, bias=False), nn.BatchNorm2d(2 * c), type(act)(),
            nn.Conv2d(2 * c, c, 1, bias=False), nn.BatchNorm2d(c),
        )

    def forward(self, x):
        return x + self.conv(x)


@pytest.mark.parametrize("act", [nn.ReLU6(inplace=True), nn.SiLU(), nn.Hardswish(), nn.GELU(), nn.ReLU()])
def test_inverted_residual_block_is_three_launches(act, monkeypatch):
    monkeypatch.setenv("CORA_BACKEND", "reference")
    model = _convert(nn.Sequential(InvertedResidual(4, act), InvertedResidual(4, act)), seed=3)
    dep = deploy(model)
    fused = [m for m in dep.modules() if isinstance(m, DeployedConv)]
    name = ACTIVATION_MODULES[type(act)]
    assert len(fused) == 6 and [m.activation for m in fused] == [name, name, None] * 2
    assert all(m.has_bn for m in fused) and _count(dep, nn.BatchNorm2d) == 0 and _count(dep, type(act)) == 0
    assert isinstance(dep, fx.GraphModule) and dep.cora_deploy["traced_fusions"] == 6
    code = dep.code
    assert code.count("residual = ") == 2 and "add" not in code and " + " not in code  # the adds are in the kernel
    _check_same(dep, model, (2, 4, 6, 6))
    assert not any(isinstance(m, DeployedConv) for m in model.modules())  # the converted model is untouched


class Functional(nn.Module):
    """Activations as functions and tensor methods, a residual added first-operand-last, an in-place add."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c3 = nn.Conv2d(4, 4, 1)
        self.c4 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = F.silu(self.b1(self.c1(x)))
        z = F.hardswish(y + self.b2(self.c2(y)))  # residual as the first operand
        w = self.c3(z).relu()
        w += z  # in place after the activation: not in the epilogue's order
        return F.gelu(self.c4(w), approximate="tanh")  # not the exact GELU: stays


def test_functional_activations_and_residual_order(monkeypatch):
    monkeypatch.setenv("CORA_BACKEND", "reference")
    model = _convert(Functional(), seed=5)
    dep = deploy(model, weights="packed")  # packed: unfused convs stay CoRaConv2d (dense: tests/cora/test_deployed.py)
    acts = {name: m.activation for name, m in dep.named_modules() if isinstance(m, DeployedConv)}
    assert acts == {"c1": "silu", "c2": "hardswish", "c3": "relu"}
    assert isinstance(dep.c4, cora.CoRaConv2d)
    assert dep.code.count("residual = ") == 1
    _check_same(dep, model, (2, 3, 5, 5))


class Shared(nn.Module):
    """A conv output used twice, a BN output used twice, a conv called twice: none of them may be fused."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c3, self.b3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        a = self.c1(x)
        b = self.b1(a) * a  # a used twice
        c = self.b2(self.c2(b))
        d = torch.relu(c) + c  # c used twice: the BN folds, the ReLU stays
        return self.b3(self.c3(self.c3(d)))  # c3 called twice


def test_values_used_twice_and_shared_convs_stay(monkeypatch):
    monkeypatch.setenv("CORA_BACKEND", "reference")
    model = _convert(Shared(), seed=7)
    dep = deploy(model, weights="packed")
    fused = {name: (m.has_bn, m.activation) for name, m in dep.named_modules() if isinstance(m, DeployedConv)}
    assert fused == {"c2": (True, None)}
    assert isinstance(dep.c1, cora.CoRaConv2d) and isinstance(dep.c3, cora.CoRaConv2d)
    _check_same(dep, model, (2, 3, 5, 5))


class Broadcast(nn.Module):
    """A residual that broadcasts ([N, C, 1, 1]): fused into the module, added outside the kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        m = x.mean((2, 3), keepdim=True)
        return F.relu6(self.b(self.c(x)) + m)


def test_broadcasting_residual_gives_the_same_result(monkeypatch):
    monkeypatch.setenv("CORA_BACKEND", "reference")
    model = _convert(Broadcast(), seed=9)
    dep = deploy(model)
    assert isinstance(dep.c, DeployedConv) and dep.c.activation == "relu6"
    _check_same(dep, model, (2, 4, 5, 5))


def test_module_chains_fuse_in_place_and_keep_the_class(monkeypatch):
    """conv -> BN -> activation modules, each called once: the model keeps its class (no GraphModule)."""
    monkeypatch.setenv("CORA_BACKEND", "reference")
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.SiLU(), nn.Conv2d(4, 4, 1), nn.Hardswish(),
                        nn.Conv2d(4, 4, 1), nn.GELU(approximate="tanh"))
    model = _convert(seq, seed=11)
    dep = deploy(model, weights="packed")
    assert type(dep) is nn.Sequential
    assert [type(m).__name__ for m in dep] == ["DeployedConv", "Identity", "Identity", "DeployedConv", "Identity",
                                               "CoRaConv2d", "GELU"]
    assert (dep[0].activation, dep[3].activation, dep.cora_deploy["traced_fusions"]) == ("silu", "hardswish", 2)
    _check_same(dep, model, (2, 3, 6, 6))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU6())

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.body(x)
        return -self.body(x)


def test_untraceable_model_falls_back_to_sequential_runs(monkeypatch):
    monkeypatch.setenv("CORA_BACKEND", "reference")
    model = _convert(Untraceable(), seed=13)
    dep = deploy(model)
    assert type(dep) is Untraceable and isinstance(dep.body[0], DeployedConv) and dep.body[0].activation == "relu6"
    assert dep.cora_deploy == {"blocks": 0, "folded_bn": 1, "traced_fusions": 0, "weights": "dense"}
    _check_same(dep, model, (2, 3, 6, 6))


def test_deployed_conv_activation_arguments():
    conv = cora.CoRaConv2d.from_conv(nn.Conv2d(3, 4, 3), 4, 1)
    assert DeployedConv(conv, relu=True).activation == "relu"
    with pytest.raises(ValueError, match="give one activation"):
        DeployedConv(conv, relu=True, activation="silu")
    with pytest.raises(ValueError, match="activation must be one of"):
        DeployedConv(conv, activation="tanh")


class BatchNormAct2d(nn.BatchNorm2d):
    """Stands in for timm's class of that name (the same forward: eval BatchNorm, ``drop``, ``act``)."""

    def __init__(self, channels: int, act: nn.Module) -> None:
        super().__init__(channels)
        self.drop, self.act = nn.Identity(), act

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


BatchNormAct2d.__module__ = "timm.layers.norm_act"


class _Tanh(nn.Module):
    def forward(self, x):
        return torch.tanh(x)


def test_timm_batchnorm_act_folds_with_its_activation(monkeypatch):
    """timm's BatchNorm + activation module: folded with its activation fused when the epilogue computes it,
    left alone otherwise; a plain BatchNorm2d subclass from elsewhere is never folded (test_deploy)."""
    monkeypatch.setenv("CORA_BACKEND", "reference")
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, nn.SiLU()), nn.Conv2d(4, 4, 1), BatchNormAct2d(4, _Tanh()),
                        nn.Conv2d(4, 4, 1), BatchNormAct2d(4, nn.Identity()), nn.ReLU6())
    model = _convert(seq, seed=15)
    dep = deploy(model, weights="packed")
    assert [type(m).__name__ for m in dep] == ["DeployedConv", "Identity", "CoRaConv2d", "BatchNormAct2d",
                                               "DeployedConv", "Identity", "Identity"]
    assert (dep[0].activation, dep[0].has_bn, dep[4].activation, dep[4].has_bn) == ("silu", True, "relu6", True)
    _check_same(dep, model, (2, 3, 6, 6))


def test_traced_deploy_compiles_fullgraph_one_op_per_conv(monkeypatch):
    """The GraphModule deploy returns for inverted-residual blocks compiles as one graph: one cora::conv2d per
    conv (the activation and residual inside it), no BatchNorm, activation or add left."""
    monkeypatch.setenv("CORA_BACKEND", "reference")
    model = _convert(nn.Sequential(InvertedResidual(4, nn.SiLU()), InvertedResidual(4, nn.Hardswish())), seed=17)
    eager, compiled, graphs = compile_fullgraph(deploy(model, weights="packed"), torch.randn(2, 4, 6, 6))
    assert_close_rel(compiled, eager, torch.float32)
    assert len(graphs) == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert sum("cora.conv2d" in t for t in targets) == 6
    assert not any(k in t for t in targets for k in ("batch_norm", "silu", "hardswish", "add"))
