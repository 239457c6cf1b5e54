"""A deployed conv on the Triton backend in eager mode runs its launcher prepared once
(cora_kernels.prepared.PreparedConv), not the validating op: same results, rebuilt after a move, dropped by
copies; and the Python part of a deployed call (pytest-benchmark, kernel launches stubbed; never asserted)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from cora import CoRaConv2d
from cora.deploy import DeployedConv, deploy
from cora_kernels import conv_fused
from tests.cora.test_deploy import _swap_convs
from tests.cora_kernels.test_prepared import stubbed_launches  # noqa: F401  (a fixture)
from tests.helpers import randomise_bn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU tensors need the Triton interpreter")


def _model(seed: int) -> nn.Module:
    """Reflect padding (the input padded first), a strided conv with SiLU, a depthwise conv (the grouped kernel)."""
    torch.manual_seed(seed)
    m = randomise_bn(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.SiLU(),
                                   nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)), seed + 1)
    for i in (0, 3, 6):
        m[i] = CoRaConv2d.from_conv(m[i], 4, 0 if m[i].groups > 1 else 2)
    return m.eval()


def _launches(dep):
    return [m._prepared for m in dep.modules() if isinstance(m, DeployedConv)]


def test_prepared_path_equals_the_op(monkeypatch):
    dep = deploy(_model(3), weights="packed", backend="triton")
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        got = dep(x)
        assert all(p is not None for p in _launches(dep))  # every conv took the prepared launcher
        again = dep(x)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # what torch.compile sees: the op
        want = dep(x)
    assert torch.equal(got, want) and torch.equal(again, want)


def test_a_move_or_a_copy_prepares_again():
    dep = deploy(_model(5), weights="packed", backend="triton")
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        y = dep(x)
    twin = copy.deepcopy(dep)
    assert all(p is None for p in _launches(twin))  # a copy does not share the original's tensors through it
    dep.to("cpu", torch.float32)  # a move (here to where it is) drops the launchers: their tensors may have changed
    assert all(p is None for p in _launches(dep))
    with torch.no_grad():
        assert torch.equal(dep(x), y) and torch.equal(twin(x), y)


@pytest.mark.parametrize("path", ["prepared", "op"])
def test_host_time_of_a_deployed_call(benchmark, stubbed_launches, monkeypatch, path):  # noqa: F811
    """One deployed conv (ResNet-18 layer2 shape: 128 -> 128, 3x3, 28x28, batch 1, fp16 channels_last, BN,
    residual, ReLU) on the Triton backend, launches stubbed: the host time a GPU call adds on top of the
    kernel's launch.  The op path is what torch.compile keeps; compare both in the benchmark table."""
    conv = _swap_convs(nn.Sequential(nn.Conv2d(128, 128, 3, padding=1, bias=False)), bits=4, rank=8, seed=0)[0]
    bn = randomise_bn(nn.Sequential(nn.BatchNorm2d(128)), 1)[0].eval()
    layer = DeployedConv(conv, bn, relu=True, backend="triton").eval()
    x = torch.randn(1, 128, 28, 28).half().contiguous(memory_format=torch.channels_last)
    res = torch.randn(1, 128, 28, 28).half().contiguous(memory_format=torch.channels_last)
    if path == "op":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert conv_fused._cora_conv2d_kernel.__class__.__name__ == "_NoLaunch"
    with torch.no_grad():
        layer(x, res)
        benchmark(layer, x, res)


def test_warmup_tunes_within_a_budget(monkeypatch):
    """cora.warmup opens a tuning budget (tune_seconds, else CORA_TUNE_SECONDS) around its runs and returns
    the seconds spent timing candidates."""
    from cora.deploy import warmup
    from cora_kernels import tuning

    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append([b.seconds for b in tuning._BUDGETS])
            return x

    assert warmup(Probe(), [2, 1], (3, 4, 4), tune_seconds=7.5) == 0.0  # nothing timed on the CPU
    monkeypatch.setenv("CORA_TUNE_SECONDS", "3")
    warmup(Probe(), [1], (3, 4, 4))
    assert seen == [[7.5], [7.5], [3.0]] and tuning._BUDGETS == []
