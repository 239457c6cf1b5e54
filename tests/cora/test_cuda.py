"""What only a GPU can check: a deployed model on CUDA in fp16 through both strategies of the Triton backend
(the fused kernel, and dequantize then cuDNN with the shared scratch buffer), CUDA graphs captured after a
warm-up and replayed, and the serving engine's graphs.  Skipped without a CUDA device (this machine and CI);
``bench/gpu_check.sh`` runs them on a lent GPU."""
from __future__ import annotations

import pytest
import torch

import cora
from cora.deploy import deploy, warmup
from cora.experiments.models import cifar_resnet
from tests.cora.test_deploy import resnet8  # noqa: F401  (the converted ResNet-8 fixture)
from cora_kernels import scratch
from tests.helpers import randomise_bn
from tests.tolerances import assert_close_rel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

STRATEGIES = ["fused", "dequant", "auto"]


def _deployed_cuda(model, monkeypatch, strategy):
    monkeypatch.setenv("CORA_STRATEGY", strategy)
    monkeypatch.delenv("CORA_BACKEND", raising=False)
    return deploy(model, weights="packed").cuda()


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("batch", [1, 16])
def test_deployed_fp16_on_cuda_matches_the_converted_model(resnet8, monkeypatch, strategy, batch):  # noqa: F811
    dep = _deployed_cuda(resnet8, monkeypatch, strategy)
    x = torch.randn(batch, 3, 32, 32)
    with torch.no_grad():
        want = resnet8(x)  # float32 reference forward on the CPU
        got = dep(x.cuda().half().contiguous(memory_format=torch.channels_last)).float().cpu()
    assert_close_rel(got, want, torch.float16)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cuda_graph_replay_equals_eager(resnet8, monkeypatch, strategy):  # noqa: F811
    """Warm up (tuning, scratch sized), capture on a side stream as PyTorch's recipe does, replay on new inputs."""
    dep = _deployed_cuda(resnet8, monkeypatch, strategy)
    shape = (4, 3, 32, 32)
    warmup(dep, [4], shape[1:], "cuda", torch.float16, memory_format=torch.channels_last)
    static_in = torch.randn(shape, device="cuda").half().contiguous(memory_format=torch.channels_last)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):
            dep(static_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_out = dep(static_in)
    for _ in range(2):
        x = torch.randn(shape, device="cuda").half().contiguous(memory_format=torch.channels_last)
        static_in.copy_(x)
        graph.replay()
        with torch.no_grad():
            want = dep(x)
        torch.cuda.synchronize()
        assert_close_rel(static_out.float(), want.float(), torch.float16)
    if strategy == "dequant":
        assert scratch.scratch_bytes("cuda") > 0


def test_serving_engine_graphs_on_cuda(resnet8, tmp_path, monkeypatch):  # noqa: F811
    """A checkpoint served by the engine on CUDA: every bucket captured, logits as the converted model's."""
    from cora.inference import InferenceEngine

    monkeypatch.delenv("CORA_STRATEGY", raising=False)
    path = tmp_path / "r8.safetensors"
    cora.save(resnet8, path, architecture={"name": "cifar_resnet8"})
    engine = InferenceEngine.from_checkpoint(path, device="cuda", max_batch=8)
    engine.warm_up()
    assert engine.info()["cuda_graphs"]
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        want = resnet8(x)
    assert_close_rel(engine.logits(x), want, torch.float16)


def test_quantize_runs_on_cuda():
    """convert on CUDA tensors (model and calibration images on the GPU) gives a model on the GPU."""
    torch.manual_seed(0)
    model = randomise_bn(cifar_resnet(8), seed=1).cuda()
    calib = torch.randn(16, 3, 32, 32, device="cuda")
    cfg = cora.CoRaConfig(bits=4, budget=0.1, calib_images=16, stats_images=16, tune_iterations=2, iterations=2,
                          progress=False)
    out = cora.convert(model, calib, cfg)
    assert all(p.is_cuda for p in out.buffers())
    with torch.no_grad():
        y = out(calib[:4])
    assert y.is_cuda and torch.isfinite(y).all()
