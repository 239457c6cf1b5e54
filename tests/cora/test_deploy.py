"""cora.deploy: BatchNorm folding and fused ReLU / residual add, against the converted model."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn

import cora
from cora.deploy import DeployedBasicBlock, DeployedBottleneck, DeployedConv, deploy, warmup, weight_bytes
from cora.experiments.cifar_resnet import CifarBasicBlock
from cora.experiments.models import cifar_resnet
from cora_kernels.scratch import scratch_bytes
from tests.helpers import compile_fullgraph, randomise_bn
from tests.tolerances import assert_close_rel

tv_resnet = pytest.importorskip("torchvision.models.resnet")


@pytest.fixture(scope="module")
def resnet8():
    torch.manual_seed(0)
    model = randomise_bn(cifar_resnet(8), seed=1)
    calib = torch.randn(8, 3, 32, 32)
    cfg = cora.CoRaConfig(bits=4, method="uniform", budget=0.2, rounding="nearest", range_method="minmax",
                          factorization="weight", sequential=False, refine=False, progress=False,
                          calib_images=8, stats_images=8, tune_iterations=0)
    conv = cora.convert(model, calib, cfg).eval()
    assert any(m.rank > 0 for m in conv.modules() if isinstance(m, cora.CoRaConv2d))
    return conv


def _swap_convs(module: nn.Module, bits: int, rank: int, seed: int, adapter_dtype: str = "float16") -> nn.Module:
    """Replace every nn.Conv2d by a CoRaConv2d with a rank-``rank`` adapter stored in ``adapter_dtype``."""
    torch.manual_seed(seed)
    for name, m in list(module.named_modules()):
        if type(m) is nn.Conv2d:
            r = min(rank, m.in_channels * m.kernel_size[0] * m.kernel_size[1], m.out_channels)
            parent, _, child = name.rpartition(".")
            new = cora.CoRaConv2d.from_conv(m, bits, r, adapter_dtype=adapter_dtype)
            setattr(module.get_submodule(parent) if parent else module, child, new)
    return module


def _count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


@pytest.mark.parametrize("weights", ["packed", "dense"])
@pytest.mark.parametrize("backend", [None, "reference"])
def test_resnet8_deploy_matches_converted(resnet8, backend, weights, monkeypatch):
    if backend:
        monkeypatch.setenv("CORA_BACKEND", backend)
    else:
        monkeypatch.delenv("CORA_BACKEND", raising=False)
    dep = deploy(resnet8, weights=weights)
    assert _count(dep, nn.BatchNorm2d) == 0
    assert _count(dep, DeployedBasicBlock) == 3
    assert dep.cora_deploy == {"blocks": 3, "folded_bn": 7, "traced_fusions": 0, "weights": weights}
    assert not dep.training
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = resnet8(x)
        got = dep(x)
    assert_close_rel(got, want, torch.float32)
    # also an intermediate tensor (logits alone could hide a wrong ReLU placement)
    with torch.no_grad():
        assert_close_rel(dep.layer2(dep.layer1(torch.relu(dep.conv1(x)))),
                         resnet8.layer2(resnet8.layer1(torch.relu(resnet8.bn1(resnet8.conv1(x))))), torch.float32)


def test_deploy_leaves_the_converted_model_unchanged(resnet8):
    before = {k: v.clone() for k, v in resnet8.state_dict().items() if isinstance(v, torch.Tensor)}
    kinds = [type(m) for m in resnet8.modules()]
    dep = deploy(resnet8)
    assert dep is not resnet8
    assert [type(m) for m in resnet8.modules()] == kinds
    after = resnet8.state_dict()
    assert before.keys() <= after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, DeployedConv) for m in resnet8.modules())
    # inplace=True rewrites the model it is given
    copy_ = copy.deepcopy(resnet8)
    assert deploy(copy_, inplace=True) is copy_ and _count(copy_, DeployedConv) == 7


def test_deploy_without_cora_layers_raises():
    with pytest.raises(ValueError, match="no CoRaConv2d"):
        deploy(cifar_resnet(8))


def _tv_block(kind: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "basic":
        ds = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        block = tv_resnet.BasicBlock(8, 16, stride=2, downsample=ds)
    else:
        ds = nn.Sequential(nn.Conv2d(8, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
        block = tv_resnet.Bottleneck(8, 8, stride=2, downsample=ds)  # width 8, out 8*4
    return _swap_convs(randomise_bn(block, seed + 1), bits=4, rank=3, seed=seed + 2)


@pytest.mark.parametrize("kind,cls,n_convs", [("basic", DeployedBasicBlock, 3), ("bottleneck", DeployedBottleneck, 4)])
def test_torchvision_blocks(kind, cls, n_convs, monkeypatch):
    monkeypatch.delenv("CORA_BACKEND", raising=False)
    block = _tv_block(kind, seed=5)
    model = nn.Sequential(block, nn.Identity())
    dep = deploy(model)
    assert isinstance(dep[0], cls)
    assert isinstance(dep[0].shortcut, DeployedConv) and dep[0].shortcut.has_bn
    assert _count(dep, DeployedConv) == n_convs and _count(dep, nn.BatchNorm2d) == 0
    assert dep.cora_deploy["folded_bn"] == n_convs
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        assert_close_rel(dep(x), model(x), torch.float32)
    # identity shortcut (no downsample) too
    torch.manual_seed(6)
    plain = tv_resnet.BasicBlock(8, 8) if kind == "basic" else tv_resnet.Bottleneck(32, 8)
    plain = _swap_convs(randomise_bn(plain, 7), bits=3, rank=2, seed=8)
    dep2 = deploy(nn.Sequential(plain))
    assert isinstance(dep2[0], cls) and isinstance(dep2[0].shortcut, nn.Identity)
    x = torch.randn(2, plain.conv1.in_channels, 6, 6)
    with torch.no_grad():
        assert_close_rel(dep2(x), plain(x), torch.float32)


def test_sequential_conv_bn_relu_and_padding_modes(monkeypatch):
    monkeypatch.setenv("CORA_BACKEND", "reference")
    torch.manual_seed(9)
    seq = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 5, (3, 4), padding="same"), nn.ReLU(),  # asymmetric 'same', no BN
        nn.Conv2d(5, 4, 1), nn.BatchNorm2d(4),  # BN without ReLU
        nn.Conv2d(4, 4, 3, padding=1),  # a lone conv stays a CoRaConv2d
    )
    seq = _swap_convs(randomise_bn(seq, 10), bits=4, rank=2, seed=11)
    dep = deploy(seq, weights="packed")  # tests/cora/test_deployed.py: the dense form of this model
    assert [type(m).__name__ for m in dep] == ["DeployedConv", "Identity", "Identity", "DeployedConv", "Identity",
                                               "DeployedConv", "Identity", "CoRaConv2d"]
    assert (dep[0].relu, dep[0].has_bn, dep[3].relu, dep[3].has_bn, dep[5].relu, dep[5].has_bn) == (
        True, True, True, False, False, True)
    x = torch.randn(2, 3, 7, 8)
    with torch.no_grad():
        assert_close_rel(dep(x), seq(x), torch.float32)


def test_block_with_a_float_conv_is_not_a_fused_block(monkeypatch):
    monkeypatch.delenv("CORA_BACKEND", raising=False)
    torch.manual_seed(12)
    block = randomise_bn(CifarBasicBlock(4, 4), 13)
    block.conv1 = cora.CoRaConv2d.from_conv(block.conv1, 4, 2)  # conv2 stays float
    model = nn.Sequential(block)
    dep = deploy(model)
    # not a fused block; its quantized conv1 -> bn1 -> relu chain is still fused, found by tracing
    assert _count(dep, DeployedBasicBlock) == 0
    assert dep.cora_deploy == {"blocks": 0, "folded_bn": 1, "traced_fusions": 1, "weights": "dense"}
    assert _count(dep, DeployedConv) == 1 and isinstance(dep.get_submodule("0.conv2"), nn.Conv2d)
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        assert_close_rel(dep(x), model(x), torch.float32)


@pytest.mark.skipif(torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET"),
                    reason="CPU tensors need the Triton interpreter; on a GPU tests/cora_kernels covers the kernel")
@pytest.mark.parametrize("adapter_dtype", ["float16", "int8"])
def test_one_fused_block_through_the_triton_interpreter(monkeypatch, adapter_dtype):
    monkeypatch.delenv("CORA_BACKEND", raising=False)
    torch.manual_seed(14)
    block = randomise_bn(CifarBasicBlock(4, 8, stride=2), 15)  # option-A shortcut, stride 2
    block = _swap_convs(block, bits=4 if adapter_dtype == "float16" else 2, rank=2, seed=16, adapter_dtype=adapter_dtype)
    stored = copy.deepcopy(block.conv2.adapter_state())
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        want = block(x)  # reference path (CPU default)
        dep = deploy(nn.Sequential(block), weights="packed")  # the kernel on packed codes
        monkeypatch.setenv("CORA_BACKEND", "triton")
        import cora_kernels.conv_fused as kernel_mod

        launches = []
        real = kernel_mod.bind_launch  # the eager path: each deployed conv's prepared launcher (cora_kernels.prepared)
        monkeypatch.setattr(kernel_mod, "bind_launch", lambda L, g, cfg, split, xs, os, rs=None:
                            launches.append((L, rs)) or real(L, g, cfg, split, xs, os, rs))
        got = dep(x)
    assert isinstance(dep[0], DeployedBasicBlock)
    # two launches: conv1 (+BN1+ReLU) and conv2 (+BN2 + option-A shortcut + ReLU)
    assert [(L.act, L.has_bn, res is not None) for L, res in launches] == [(1, True, False), (1, True, True)]
    # int8 adapters reach the kernel as stored: codes and scales, BatchNorm in the fp32 epilogue
    assert all(L.adapter_q == (adapter_dtype == "int8") for L, _ in launches)
    for key, t in dep[0].conv2.conv.adapter_state().items():
        assert (t is None and stored[key] is None) or torch.equal(t, stored[key]), key
    assert_close_rel(got, want, torch.float32)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_int8_adapter_resnet_deploy_matches(bits, monkeypatch):
    """A ResNet whose convs store int8 adapters: deploy (reference op) matches the layer by layer model."""
    monkeypatch.setenv("CORA_BACKEND", "reference")
    model = _swap_convs(randomise_bn(cifar_resnet(8), seed=20 + bits), bits=bits, rank=3, seed=bits, adapter_dtype="int8")
    model.eval()
    assert all(m.adapter_int8 for m in model.modules() if isinstance(m, cora.CoRaConv2d))
    x = torch.randn(2, 3, 32, 32)
    for weights in ("packed", "dense"):
        dep = deploy(model, weights=weights)
        assert dep.cora_deploy == {"blocks": 3, "folded_bn": 7, "traced_fusions": 0, "weights": weights}
        with torch.no_grad():
            assert_close_rel(dep(x), model(x), torch.float32)
    wb = weight_bytes(model)
    convs = [m for m in model.modules() if isinstance(m, cora.CoRaConv2d)]
    assert wb["adapters"] == sum(m.adapter_params + 4 * (m.rank + m.out_channels) for m in convs)


def test_torch_compile_fullgraph_one_op_per_conv(resnet8, monkeypatch):
    monkeypatch.setenv("CORA_BACKEND", "reference")
    eager, compiled, graphs = compile_fullgraph(deploy(resnet8, weights="packed"), torch.randn(2, 3, 32, 32))
    assert_close_rel(compiled, eager, torch.float32)
    assert len(graphs) == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert sum("cora.conv2d" in t for t in targets) == 7  # stem + 3 blocks x 2 convs
    assert not any("batch_norm" in t for t in targets)


def test_warmup_runs_each_batch_once_and_restores_flags():
    calls = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(2, 2)

        def forward(self, x):
            calls.append((x.shape[0], tuple(x.shape[1:]), x.dtype, torch.is_grad_enabled(), self.training,
                          self.inner.training))
            return x

    m = Probe()
    m.train()
    m.inner.eval()  # mixed flags must come back as they were
    warmup(m, [1, 4, 2], (3, 5, 5), "cpu", torch.float16)
    assert calls == [(b, (3, 5, 5), torch.float16, False, False, False) for b in (1, 4, 2)]
    assert m.training and not m.inner.training


def test_weight_bytes_counts_stored_buffers(resnet8):
    dep = deploy(resnet8, weights="packed")
    wb = weight_bytes(dep)
    convs = [m for m in dep.modules() if isinstance(m, cora.CoRaConv2d)]
    assert wb["codes"] == sum(p.numel() * 4 for m in convs for p in m.packed_planes()) + sum(
        p.numel() * 4 for p in dep.linear.packed_planes())
    assert wb["adapters"] == sum(2 * m.adapter_params for m in convs) + 2 * dep.linear.adapter_params  # linear: adapted too
    assert wb["batchnorm"] == 0 and wb["bn_folded"] == 8 * sum(m.out_channels for m in convs) and wb["dense"] == 0
    assert wb["total"] == sum(v for k, v in wb.items() if k not in ("total", "scratch"))
    assert wb["scratch"] == scratch_bytes("cpu")  # the dequantize strategy's shared buffers, apart from the model's
    fp16 = weight_bytes(copy.deepcopy(cifar_resnet(8)).half())
    assert wb["codes"] < fp16["float"] / 3


def test_torchvision_resnet_stem_and_blocks(monkeypatch):
    monkeypatch.delenv("CORA_BACKEND", raising=False)
    torch.manual_seed(17)
    model = tv_resnet.ResNet(tv_resnet.BasicBlock, [1, 1, 1, 1], num_classes=5)
    model = _swap_convs(randomise_bn(model, 18), bits=4, rank=1, seed=19)
    dep = deploy(model)
    assert isinstance(dep.conv1, DeployedConv) and dep.conv1.relu and dep.conv1.has_bn
    assert isinstance(dep.bn1, nn.Identity) and isinstance(dep.relu, nn.Identity)
    assert _count(dep, nn.BatchNorm2d) == 0 and dep.cora_deploy == {"blocks": 4, "folded_bn": 1 + 4 * 2 + 3, "traced_fusions": 0,
                                                                    "weights": "dense"}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close_rel(dep(x), model(x), torch.float32)


def test_deployed_forward_from_several_threads(resnet8):
    from concurrent.futures import ThreadPoolExecutor

    dep = deploy(resnet8)
    xs = [torch.randn(2, 3, 16, 16) for _ in range(4)]
    with torch.no_grad():
        want = [dep(x) for x in xs]

        def run(x):
            with torch.no_grad():
                return dep(x)

        with ThreadPoolExecutor(max_workers=4) as pool:
            got = list(pool.map(run, xs))
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_deploy_backend_is_set_on_every_conv_and_wins_over_the_environment(resnet8, monkeypatch):
    """deploy(backend=...) goes to every deployed and quantized conv; the op then runs that backend."""
    import cora_kernels.conv_fused as kernel_mod

    def refuse(*args, **kwargs):
        raise AssertionError("the Triton launcher must not run")

    dep = deploy(resnet8, backend="reference")
    convs = [m for m in dep.modules() if isinstance(m, (DeployedConv, cora.CoRaConv2d))]
    assert convs and all(m.backend is cora.Backend.REFERENCE for m in convs)
    assert all(m.backend is None for m in resnet8.modules() if isinstance(m, cora.CoRaConv2d))  # a copy was changed
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = resnet8(x)
    monkeypatch.setenv("CORA_BACKEND", "triton")
    monkeypatch.setattr(kernel_mod, "cora_conv2d_triton", refuse)
    with torch.no_grad():
        assert_close_rel(dep(x), want, torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        deploy(resnet8, backend="gpu")


class _BatchNormAct(nn.BatchNorm2d):
    """Like timm's BatchNormAct2d: a BatchNorm2d subclass whose forward also applies an activation."""

    def __init__(self, channels: int, act: nn.Module) -> None:
        super().__init__(channels)
        self.act = act

    def forward(self, x):
        return self.act(super().forward(x))


class _LeakyReLU(nn.ReLU):
    """A ReLU subclass with another forward: must not be fused as a ReLU."""

    def forward(self, x):
        return torch.nn.functional.leaky_relu(x, 0.1)


class _SubBasicBlock(CifarBasicBlock):
    """A known block's subclass with its own forward (an extra scaling): must not be fused as the block."""

    def forward(self, x):
        return 0.5 * super().forward(x)


def test_subclasses_with_their_own_forward_are_never_folded(monkeypatch):
    """Folding must be exact or not happen: a BatchNorm2d / ReLU / block subclass keeps its own forward."""
    monkeypatch.setenv("CORA_BACKEND", "reference")
    torch.manual_seed(14)
    seq = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), _BatchNormAct(6, nn.SiLU()),  # timm-style BN + activation
        nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), _LeakyReLU(),  # plain BN folds, the odd ReLU stays
        _SubBasicBlock(6, 6),
    )
    seq = _swap_convs(randomise_bn(seq, 15), bits=4, rank=2, seed=16)
    dep = deploy(seq, weights="packed")  # packed: the unfused conv stays a CoRaConv2d
    assert isinstance(dep[1], _BatchNormAct) and isinstance(dep[0], cora.CoRaConv2d)
    assert isinstance(dep[2], DeployedConv) and dep[2].has_bn and not dep[2].relu and isinstance(dep[4], _LeakyReLU)
    assert type(dep[5]) is _SubBasicBlock and dep.cora_deploy["blocks"] == 0
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        assert_close_rel(dep(x), seq(x), torch.float32)
