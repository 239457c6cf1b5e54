"""The harness behind the command line (cora/experiments/pipeline.py): the held-out split is exactly
the calibration images not used, whatever their number; every input is checked before any work."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cora.config import CoRaConfig
from cora.experiments import pipeline
from cora.experiments.data import dataset_labels
from cora.experiments.pipeline import calibration_data, evaluation_data

torch.set_num_threads(1)


def _rows(images: torch.Tensor) -> set[bytes]:
    return {x.numpy().tobytes() for x in images}


@pytest.mark.parametrize("n", [10, 1600, 2000, 4990])
def test_cifar_holdout_is_the_complement(n):
    calib, labels = calibration_data("cifar_resnet20", n)
    held = evaluation_data("cifar_resnet20", split="holdout", calib_images=n)
    assert len(calib) == n and len(held) == 5000 - n
    assert torch.bincount(held.labels, minlength=10).tolist() == [500 - n // 10] * 10
    assert not _rows(calib) & _rows(held.images)


def test_cifar_holdout_empty_is_refused():
    with pytest.raises(ValueError, match="no held-out images left: the calibration uses all 5000 images"):
        evaluation_data("cifar_resnet20", split="holdout", calib_images=5000)


def test_limits_and_splits():
    assert len(evaluation_data("cifar_resnet20", split="test", limit=25)) == 25
    assert len(evaluation_data("cifar_resnet20", split="holdout", calib_images=1600, limit=100000)) == 3400
    ten = evaluation_data("cifar_resnet20", split="holdout", calib_images=1600, limit=10)
    assert sorted(ten.labels.tolist()) == list(range(10))
    with pytest.raises(ValueError, match="split"):
        evaluation_data("cifar_resnet20", split="train")


def _folder(root, per_class=3):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir()
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_folder_holdout_is_the_complement(tmp_path, monkeypatch):
    monkeypatch.setattr("cora.experiments.models.model_input_spec",
                        lambda name: {"image_size": 8, "mean": (0.5,) * 3, "std": (0.25,) * 3})
    root = _folder(tmp_path)
    calib, _ = calibration_data("resnet18", 4, data_dir=root)
    held = evaluation_data("resnet18", data_dir=root, split="holdout", calib_images=4)
    assert len(calib) == 4 and len(held) == 2
    assert not _rows(calib) & _rows(torch.stack([x for x, _ in held]))
    assert len(evaluation_data("resnet18", data_dir=root, split="test")) == 6
    assert len(dataset_labels(evaluation_data("resnet18", data_dir=root, split="test", limit=3))) == 3
    with pytest.raises(ValueError, match="no held-out images left"):
        evaluation_data("resnet18", data_dir=root, split="holdout", calib_images=6)


def test_quantize_and_evaluate_holds_out_its_own_calibration(monkeypatch):
    seen = {}

    class Stop(Exception):
        pass

    def spy(name, shared=None, data_dir=None, split="test", *, calib_images=1600, limit=None):
        seen.update(split=split, calib_images=calib_images, limit=limit)
        raise Stop

    monkeypatch.setattr(pipeline, "evaluation_data", spy)
    with pytest.raises(Stop):
        pipeline.quantize_and_evaluate("cifar_resnet20", CoRaConfig(calib_images=2000), eval_split="holdout", eval_limit=7)
    assert seen == {"split": "holdout", "calib_images": 2000, "limit": 7}


def test_config_checked_against_the_model_before_any_work(monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("no evaluation or conversion for a config the model cannot take")

    monkeypatch.setattr("cora.experiments.data.evaluate", no_work)
    monkeypatch.setattr(pipeline, "convert", no_work)
    with pytest.raises(ValueError, match="skip pattern 'nomatch' matches no conv"):
        pipeline.quantize_and_evaluate("cifar_resnet20", CoRaConfig(skip=("nomatch",), calib_images=10), with_rtn=False)
    with pytest.raises(ValueError, match="no Conv2d or Linear layer"):
        pipeline.quantize_and_evaluate("cifar_resnet20", CoRaConfig(skip=("*",), calib_images=10))
