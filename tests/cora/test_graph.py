"""The stage chain (cora.graph) and the layer inputs it serves (cora.statistics.LayerInputs)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cora.graph import trace_stages
from cora.statistics import LayerInputs, layer_moments, paired_moments, paired_moments_of


class Block(nn.Module):
    """A residual block: its input feeds both branches, so no cut inside it."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return F.relu(self.conv2(F.relu(self.bn(self.conv1(x)))) + x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)  # in place, right at the start of a stage
        self.block1 = Block(8)
        self.block2 = Block(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.block2(self.block1(self.act(self.stem(x))))
        return self.head(x.mean((2, 3)))


LAYERS = ["stem", "block1.conv1", "block1.conv2", "block2.conv1", "block2.conv2", "head"]


def _net() -> Net:
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.block1.bn.running_mean.normal_()
        net.block1.bn.running_var.uniform_(0.5, 2.0)
    return net


def test_chain_reproduces_the_forward_and_cuts_between_blocks():
    net, x = _net(), torch.randn(3, 3, 10, 10)
    chain = trace_stages(net, LAYERS, x[:1])
    assert chain is not None
    assert torch.equal(chain.forward(net, x), net(x))
    stage = chain.layer_stage
    assert set(stage) == set(LAYERS)
    assert stage["block1.conv1"] == stage["block1.conv2"]  # one residual block, one stage
    assert stage["stem"] < stage["block1.conv1"] < stage["block2.conv1"] < stage["head"]


def test_chain_does_not_modify_the_kept_input():
    net, x = _net(), torch.randn(2, 3, 8, 8)
    chain = trace_stages(net, LAYERS, x[:1])
    k = chain.layer_stage["stem"] + 1  # starts from the stem's output with the in-place ReLU
    assert chain.stages[k][0].target == "act"
    kept = net.stem(x) - 0.5  # negative values: an in-place ReLU would change them
    before = kept.clone()
    chain.run(net, k, kept)
    assert torch.equal(kept, before)


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        if x.sum() > 0:  # control flow on a value: fx cannot trace it
            return self.conv(x)
        return -self.conv(x)


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.conv(self.conv(x))


def test_no_chain_for_untraceable_models_or_layers_called_twice():
    x = torch.randn(1, 3, 4, 4)
    assert trace_stages(Branchy(), ["conv"], x) is None
    assert trace_stages(Shared(), ["conv"], x) is None


def test_staged_inputs_equal_full_passes_as_layers_change():
    """Layer by layer in execution order, changing each layer after its inputs are taken (as the
    sequential quantization does): the staged inputs are those of full forward passes."""
    net, x = _net(), torch.randn(7, 3, 9, 9)
    chain = trace_stages(net, LAYERS, x[:1])
    staged = LayerInputs(net, x, chain, batch_size=3)
    full = LayerInputs(net, x, None, batch_size=3)
    for name in LAYERS:
        got, want = list(staged.of(name)), list(full.of(name))
        assert len(got) == len(want) == 3
        for a, b in zip(got, want):
            assert torch.equal(a, b), name
        with torch.no_grad():  # "quantize" the layer: later layers see the change
            w = net.get_submodule(name).weight
            w.add_(0.1 * torch.randn_like(w))


def test_staged_inputs_cost_is_linear_in_depth():
    """The stem runs once per batch for the whole sweep (full passes would run it for every layer)."""
    net, x = _net(), torch.randn(4, 3, 6, 6)
    chain = trace_stages(net, LAYERS, x[:1])
    calls = []
    net.stem.register_forward_hook(lambda mod, args, out: calls.append(1))  # runs that finish
    staged = LayerInputs(net, x, chain, batch_size=2)
    for name in LAYERS:
        list(staged.of(name))
    assert len(calls) == 2


def test_paired_moments_staged_equal_full_passes():
    f, q, x = _net(), _net(), torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        q.stem.weight.add_(0.05 * torch.randn_like(q.stem.weight))
    chain = trace_stages(f, LAYERS, x[:1])
    for name in ["block1.conv2", "head"]:
        want = paired_moments(f, q, name, x, batch_size=2, max_rows=40)
        got = paired_moments_of(LayerInputs(f, x, chain, 2), LayerInputs(q, x, chain, 2), name, max_rows=40)
        for a, b in zip(got, want):
            assert torch.equal(a, b), name
    h = layer_moments(LayerInputs(f, x, chain, 2), "block2.conv1", max_rows=10**9)
    h_pair = paired_moments(f, f, "block2.conv1", x, batch_size=2, max_rows=10**9)[0]
    assert torch.allclose(h, h_pair, rtol=1e-12, atol=0)
