"""The pretrained ``cifar_shufflenetv2_x0_5`` deployed on the kernels: every conv, pointwise and depthwise, runs
on a Triton kernel (the fused one for ``groups == 1``, the grouped one for the 19 depthwise convs) under the
interpreter, with channel shuffle, split and concat left in PyTorch, and the result equals the converted model."""
from __future__ import annotations

import os

import pytest
import torch

import cora
from cora.deployed import DeployedConv
from cora.experiments import paths
from cora.experiments.models import build_model
from tests.tolerances import assert_close_rel

torch.set_num_threads(1)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET"),
                    reason="CPU tensors need the Triton interpreter; on a GPU tests/cora_kernels covers the kernels")
def test_every_conv_on_a_kernel_and_exact(monkeypatch):
    try:
        paths.find_glob("models/cifar10_shufflenetv2_x0_5-*.pt")
    except FileNotFoundError as e:
        pytest.skip(f"no shared ShuffleNet weights: {e}")
    monkeypatch.delenv("CORA_BACKEND", raising=False)
    torch.manual_seed(0)
    model = build_model("cifar_shufflenetv2_x0_5").eval()
    calib = torch.randn(8, 3, 16, 16)
    cfg = cora.CoRaConfig(bits=4, method="uniform", calib_images=8, rounding="nearest", tune_iterations=0,
                          progress=False)
    q = cora.convert(model, calib, cfg)
    convs = [m for m in q.modules() if isinstance(m, cora.CoRaConv2d)]
    assert sum(m.rank > 0 for m in convs) == 37  # the groups == 1 convs
    assert {m.bits for m in convs if m.groups > 1} == {8}  # the depthwise convs at grouped_bits' default
    dep = cora.deploy(q, weights="packed")
    deployed = [m for m in dep.modules() if isinstance(m, DeployedConv)]
    assert len(deployed) == 56 and sum(m.conv.groups > 1 for m in deployed) == 19
    import cora_kernels.conv_depthwise as depthwise
    import cora_kernels.conv_fused as fused

    calls = {"fused": 0, "grouped": 0}
    real_bind, real_grouped = fused.bind_launch, depthwise._launch
    monkeypatch.setattr(fused, "bind_launch", lambda *a, **k: calls.__setitem__("fused", calls["fused"] + 1)
                        or real_bind(*a, **k))
    monkeypatch.setattr(depthwise, "_launch", lambda *a, **k: calls.__setitem__("grouped", calls["grouped"] + 1)
                        or real_grouped(*a, **k))
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        want = q(x)  # the converted model, reference path
        monkeypatch.setenv("CORA_BACKEND", "triton")
        got = dep(x)
    assert calls == {"fused": 37, "grouped": 19}, calls
    assert_close_rel(got, want, torch.float32)
