"""cora.inference: buckets, padding, top-k and info on the CPU (the CUDA-graph path needs a GPU)."""
import socket
import sys
import types

import pytest
import torch

import cora
from cora.inference import InferenceEngine, batch_buckets, bucket_for
from tests.cora.serve_helpers import make_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("inference") / "r20.safetensors")


@pytest.fixture(scope="module")
def images():
    from cora.experiments.data import NpzImageDataset, load_npz

    arrays, labels = load_npz("data/cifar10_test.npz")
    return NpzImageDataset(arrays[:6], labels[:6]).images  # float32 [6, 3, 32, 32], normalised


@pytest.fixture(scope="module")
def engine(ckpt):
    e = InferenceEngine.from_checkpoint(ckpt, device="cpu", max_batch=6)
    e.warm_up()
    return e


def test_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert [bucket_for(n, [1, 2, 4, 6]) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    with pytest.raises(ValueError):
        bucket_for(7, [1, 2, 4, 6])
    with pytest.raises(ValueError):
        batch_buckets(0)


def test_padding_is_invisible(engine, ckpt, images):
    x = images
    offline = cora.deploy(cora.load(ckpt))
    with torch.no_grad():
        ref = offline(x)
    for n in (1, 3, 5, 6):  # 3 -> bucket 4, 5 -> bucket 6: padded rows must not change the real ones
        torch.testing.assert_close(engine.logits(x[:n]), ref[:n], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        engine.logits(torch.zeros(7, 3, 32, 32))
    with pytest.raises(ValueError):
        engine.logits(torch.zeros(1, 3, 16, 16))


def test_predict_top_k(engine, images):
    x = images[:3]
    top = engine.predict(x, top_k=3)
    assert len(top) == 3 and all(len(t) == 3 for t in top)
    for t in top:
        probs = [p for _, p in t]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert len(engine.predict(x[:1], top_k=50)[0]) == 10  # at most the class count
    assert engine.label(3) == "cat" and engine.label(99) is None


def test_info(engine, ckpt):
    info = engine.info()
    meta = cora.checkpoint.read_metadata(ckpt)
    assert info["architecture"] == "cifar_resnet20" and info["bits"] == 4 and info["float"] is False
    assert info["checkpoint_sha256"] == meta["cora_sha256"]
    assert info["equiv_bits"] == meta["report"]["equiv_bits"]
    assert info["accuracy"] is None  # nothing recorded: never invented
    assert info["device"] == "cpu" and info["dtype"] == "float32" and info["batch_buckets"] == [1, 2, 4, 6]
    assert info["ready"] and info["cuda_graphs"] is False


def test_refuses_a_checkpoint_without_preprocessing(tmp_path):
    path = make_checkpoint(tmp_path / "bare.safetensors", preprocessing=False)
    with pytest.raises(ValueError, match="preprocessing"):
        InferenceEngine.from_checkpoint(path, device="cpu")


def test_float_mode():
    e = InferenceEngine.from_float("cifar_resnet20", device="cpu", max_batch=2)
    e.warm_up()
    info = e.info()
    assert info["float"] is True and info["bits"] is None and info["checkpoint_sha256"] is None
    assert len(e.predict(torch.zeros(2, 3, 32, 32), top_k=1)) == 2


def test_bad_device_and_dtype(ckpt):
    with pytest.raises(ValueError):
        InferenceEngine.from_checkpoint(ckpt, device="cpu", dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            InferenceEngine.from_checkpoint(ckpt, device="cuda")


def test_info_shows_the_accuracy_recorded_at_quantization(ckpt, tmp_path):
    model = cora.load(ckpt)
    recorded = {"acc": 87.5, "float_acc": 91.25, "eval_split": "holdout", "eval_images": 3400}
    path = cora.save(model, tmp_path / "with_acc.safetensors", evaluation=recorded)
    assert cora.load(path).cora_evaluation == recorded
    assert InferenceEngine.from_checkpoint(path, device="cpu", max_batch=1).info()["accuracy"] == recorded
    with pytest.raises(ValueError, match="evaluation"):
        cora.save(model, tmp_path / "bad.safetensors", evaluation={"acc": float("nan")})


def test_deploy_weights(ckpt, images):
    """auto deploys dense weights on the CPU; packed keeps the codes (the op's reference path); same logits."""
    auto = InferenceEngine.from_checkpoint(ckpt, device="cpu", max_batch=2)
    packed = InferenceEngine.from_checkpoint(ckpt, device="cpu", max_batch=2, deploy_weights="packed")
    assert auto.info()["weights"] == "dense" and auto.model.cora_deploy["weights"] == "dense"
    assert packed.info()["weights"] == "packed" and packed.model.cora_deploy["weights"] == "packed"
    torch.testing.assert_close(auto.logits(images[:2]), packed.logits(images[:2]), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="auto, dense, packed"):
        InferenceEngine.from_checkpoint(ckpt, device="cpu", deploy_weights="int4")
    assert InferenceEngine.from_float("cifar_resnet20", device="cpu", max_batch=1).info()["weights"] is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_deploy_weights(ckpt, monkeypatch, capsys):
    """cora serve --deploy-weights reaches the replicas' settings; bad uses are refused before Ray starts
    (cora.serve replaced by a stand-in that records what it would run)."""
    from cora.cli import main

    runs = []
    monkeypatch.setitem(sys.modules, "cora.serve", types.SimpleNamespace(run=runs.append))
    base = ["serve", str(ckpt), "--device", "cpu", "--port", str(_free_port()), "--metrics-port", str(_free_port())]
    assert main(base) == 0 and main(base + ["--deploy-weights", "packed"]) == 0
    assert [r.deploy_weights for r in runs] == ["auto", "packed"]  # the ServeSettings record run() gets
    assert main(base + ["--deploy-weights", "int4"]) == 2
    assert "--deploy-weights" in capsys.readouterr().err
    assert main(["serve", "--float", "cifar_resnet20", "--deploy-weights", "dense", "--device", "cpu"]) == 2
    assert "--deploy-weights is for a checkpoint" in capsys.readouterr().err
    assert len(runs) == 2
