"""``cifar_shufflenetv2_x0_5`` by name: the shared weights, the clear errors for a wrong file, its
preprocessing record, and the command line (quantize, eval, load, serving engine) end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import Subset

from cora.zoo import paths
from cora.zoo.registry import (
    CIFAR10_CLASSES,
    build_model,
    cifar_shufflenetv2_x0_5,
    model_input_spec,
    preprocessing_for,
)

torch.set_num_threads(1)

NAME = "cifar_shufflenetv2_x0_5"
ROOT = Path(__file__).resolve().parents[3]
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def _shared(pattern: str) -> Path:
    try:
        return paths.find_glob(pattern)
    except FileNotFoundError as e:
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            raise  # CI must have the shared folder (tests/conftest.py)
        pytest.skip(f"the shared folder lacks {pattern}: {e}")


@pytest.fixture(scope="module")
def weights() -> Path:
    return _shared("models/cifar10_shufflenetv2_x0_5-*.pt")


def _convs(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def test_fresh_model_structure():
    m = build_model(NAME, weights=False)
    assert not m.training
    convs = _convs(m)
    assert len(convs) == 56 and sum(c.groups == c.in_channels > 1 for c in convs) == 19
    assert m.conv1[0].stride == (1, 1) and m.conv1[0].kernel_size == (3, 3) and m.conv1[0].bias is None
    assert isinstance(m.maxpool, torch.nn.Identity)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert cifar_shufflenetv2_x0_5(num_classes=5).fc.out_features == 5
    with pytest.raises(ValueError, match=f"{NAME} takes no keyword argument.*bogus.*num_classes"):
        build_model(NAME, weights=False, bogus=1)


def test_shared_weights_strict_and_accurate(weights):
    from cora.experiments.data import evaluate
    from cora.experiments.pipeline import evaluation_data

    m = build_model(NAME)
    assert not m.training
    raw = torch.load(weights, map_location="cpu", weights_only=True)
    sd = m.state_dict()
    assert set(sd) == set(raw)
    assert all(torch.equal(sd[k], v) for k, v in raw.items())
    convs = _convs(m)
    assert len(convs) == 56 and sum(c.groups == c.in_channels > 1 for c in convs) == 19
    # the evaluation data of the name carries the model's own normalisation (CIFAR-10's, not ImageNet's)
    _shared("data/cifar10_test.npz")
    ds = evaluation_data(NAME)
    assert ds.mean == MEAN and ds.std == STD
    acc = evaluate(m, Subset(ds, range(200)), device=torch.device("cpu"))
    print(f"{NAME}: float top-1 {acc:.2f} % on the first 200 shared test images")
    assert acc > 70  # 83.05 % on the first 2,000 (shared/README.md)


def test_wrong_state_dict_one_line(weights, tmp_path):
    resnet = _shared("models/resnet20-*.th")
    with pytest.raises(ValueError) as e:
        build_model(NAME, weights=resnet)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 800
    assert msg.startswith(f"{resnet} does not fit {NAME}: ")
    assert "missing keys (conv1.0.weight," in msg and "unexpected keys (conv1.weight," in msg

    state = torch.load(weights, map_location="cpu", weights_only=True)
    del state["fc.bias"]
    state["fc.weight"] = torch.randn(7, 1024)
    partial = tmp_path / "partial.pt"
    torch.save(state, partial)
    with pytest.raises(ValueError, match=r"does not fit cifar_shufflenetv2_x0_5: 1 missing keys \(fc.bias\); "
                                         r"1 shape mismatches.*fc.weight \(7, 1024\) vs \(10, 1024\)"):
        build_model(NAME, weights=partial)
    with pytest.raises(ValueError, match=r"does not fit cifar_shufflenetv2_x0_5\(num_classes=5\).*fc.weight"):
        build_model(NAME, num_classes=5)  # the shared 10-class weights

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.pt is not a readable torch checkpoint") as e:
        build_model(NAME, weights=truncated)
    assert "\n" not in str(e.value).strip()


def test_missing_weights_name_the_place(tmp_path, monkeypatch):
    monkeypatch.setenv("CORA_SHARED", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        build_model(NAME)
    assert str(tmp_path / "models" / "cifar10_shufflenetv2_x0_5-*.pt") in str(e.value)


def test_preprocessing_record_and_name_check():
    spec = model_input_spec(NAME)
    assert spec["mean"] == MEAN and spec["std"] == STD and spec["image_size"] == spec["resize_size"] == 32
    assert spec["num_classes"] == 10
    pre = preprocessing_for(NAME)
    assert pre == {"image_size": 32, "resize_size": 32, "mean": list(MEAN), "std": list(STD),
                   "class_names": list(CIFAR10_CLASSES)}
    assert preprocessing_for(NAME, {"num_classes": 5})["class_names"] is None
    with pytest.raises(ValueError, match="cifar_resnet<6n\\+2>, cifar_shufflenetv2_x0_5 or a torchvision.*examples"):
        build_model("cifar_shufflenet")


def _run(args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("CORA_DEBUG", None)
    p = subprocess.run([sys.executable, "-m", "cora", *args], capture_output=True, text=True, env=env, cwd=str(ROOT),
                       timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    return json.loads([line for line in p.stdout.splitlines() if line.strip()][-1])


@pytest.mark.slow
def test_cli_quantize_eval_load_serve(weights, tmp_path):
    """4 bits (whose default path the W3 block reconstruction bug does not reach), the cheapest settings."""
    from cora.checkpoint import load, read_metadata
    from cora.inference import InferenceEngine

    _shared("data/cifar10_calib.npz")
    ckpt = tmp_path / "shufflenet.safetensors"
    cheap = ["--calib", "10", "--iters", "1", "--tune-iters", "1", "--no-rtn", "--quiet", "--threads", "1",
             "--eval-split", "holdout", "--device", "cpu", "--eval-limit", "20", "--json"]
    res = _run(["quantize", NAME, "--bits", "4", *cheap, "--out", str(ckpt)])
    assert res["model"] == NAME and res["eval_images"] == 20 and res["calib_images"] == 10
    assert res["float_acc"] >= 50  # 20 held-out calibration images: the pretrained model, not noise
    meta = read_metadata(ckpt)
    assert meta["architecture"]["name"] == NAME
    assert meta["preprocessing"] == preprocessing_for(NAME)  # what cora serve uses
    back = _run(["eval", "--checkpoint", str(ckpt), "--eval-split", "holdout", "--eval-limit", "20", "--device", "cpu",
                 "--threads", "1", "--json"])
    assert back["model"] == NAME and back["acc"] == res["acc"] and back["eval_images"] == 20

    model = load(ckpt)  # rebuilt by name alone
    assert type(model).__name__ == "ShuffleNetV2" and isinstance(model.maxpool, torch.nn.Identity)
    engine = InferenceEngine.from_checkpoint(ckpt, device="cpu", max_batch=2)
    assert engine.info()["architecture"] == NAME and engine.label(3) == "cat"
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(engine.logits(x), model(x), rtol=1e-3, atol=1e-3)
