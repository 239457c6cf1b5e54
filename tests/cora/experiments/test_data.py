from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cora.experiments import paths
from cora.experiments.data import (
    NpzImageDataset,
    balanced_subset,
    calibration_indices,
    cifar10_calibration,
    cifar10_test,
    dataset_labels,
    evaluate,
    image_folder,
    load_npz,
    make_loader,
    split_indices,
)

torch.set_num_threads(1)


def test_load_npz_shared():
    images, labels = load_npz("data/cifar10_calib.npz")
    assert images.shape == (5000, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (5000,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [500] * 10


def test_load_npz_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("CORA_SHARED", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        load_npz("data/missing.npz")
    assert str(tmp_path / "data" / "missing.npz") in str(e.value)
    f = tmp_path / "a.npz"
    np.savez(f, images=np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="labels"):
        load_npz(f)
    np.savez(f, images=np.zeros((2, 3, 32, 32), np.uint8), labels=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=r"\[N, 32, 32, 3\]"):
        load_npz(f)
    np.savez(f, images=np.zeros((2, 32, 32, 3), np.uint8), labels=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="labels must be"):
        load_npz(f)
    (tmp_path / "junk.npz").write_text("not an npz")
    with pytest.raises(ValueError):
        load_npz(tmp_path / "junk.npz")


def test_dataset_normalisation():
    imgs = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    ds = NpzImageDataset(imgs, np.arange(5), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    x, y = ds[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    expect = (imgs[3, :, :, 1] / 255.0 - 0.4) / 0.25
    assert np.allclose(x[1].numpy(), expect, atol=1e-6)


def test_calibration_split_balanced_disjoint_deterministic():
    _, labels = load_npz("data/cifar10_calib.npz")
    s = calibration_indices(labels, 1600, "search")
    h = calibration_indices(labels, 1600, "holdout")
    assert len(s) == 1600 and len(h) == 3400
    assert np.bincount(labels[s]).tolist() == [160] * 10
    assert np.bincount(labels[h]).tolist() == [340] * 10
    assert not set(s) & set(h) and len(set(s) | set(h)) == 5000
    # The first n/10 images of each class, in file order.
    for c in range(10):
        assert s[labels[s] == c].tolist() == np.flatnonzero(labels == c)[:160].tolist()
    assert np.array_equal(s, calibration_indices(labels, 1600, "search"))
    ds = cifar10_calibration(1600)
    assert len(ds) == 1600 and torch.bincount(ds.labels).tolist() == [160] * 10
    assert len(cifar10_calibration(1600, split="holdout")) == 3400


@pytest.mark.parametrize("n", [0, 5, 15, 5010, 1601])
def test_calibration_bad_n(n):
    with pytest.raises(ValueError, match="multiple of 10"):
        calibration_indices(np.repeat(np.arange(10), 500), n)


def test_calibration_bad_split():
    with pytest.raises(ValueError, match="search"):
        calibration_indices(np.repeat(np.arange(10), 500), 100, "train")


def test_loader_seeded_shuffle():
    ds = NpzImageDataset(np.zeros((20, 32, 32, 3), np.uint8), np.arange(20))
    order = lambda seed: torch.cat([y for _, y in make_loader(ds, 8, shuffle=True, seed=seed)]).tolist()
    assert order(1) == order(1) and sorted(order(1)) == list(range(20))
    assert order(1) != order(2)
    assert torch.cat([y for _, y in make_loader(ds, 8)]).tolist() == list(range(20))


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    ds = image_folder(tmp_path, image_size=24)
    assert len(ds) == 4 and ds.classes == ["cat", "dog"]
    x, y = ds[3]
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and y == 1
    xb, yb = next(iter(make_loader(ds, 4)))
    assert xb.shape == (4, 3, 24, 24) and yb.tolist() == [0, 0, 1, 1]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        image_folder(tmp_path / "empty")


class _Oracle(torch.nn.Module):
    """Predicts the class stored in pixel [0, 0, 0]; wrong for the last sample."""

    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(1)

    def forward(self, x):
        assert not self.training
        cls = x[:, 0, 0, 0].round().long()
        return torch.nn.functional.one_hot(cls, 10).float()


def test_evaluate_tiny_model():
    n = 10
    labels = torch.arange(n) % 10
    imgs = torch.zeros(n, 3, 2, 2)
    imgs[:, 0, 0, 0] = labels.float()
    imgs[-1, 0, 0, 0] = (labels[-1] + 1) % 10
    ds = torch.utils.data.TensorDataset(imgs, labels)
    m = _Oracle().train()
    assert evaluate(m, ds, batch_size=3) == pytest.approx(90.0)
    assert m.training and m.bn.training  # the training flag is restored
    assert evaluate(m, make_loader(ds, 4)) == pytest.approx(90.0)


def test_evaluate_npz_dataset_fast_path():
    ds = NpzImageDataset(np.zeros((7, 32, 32, 3), np.uint8), np.zeros(7, np.int64))

    class Zero(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 10).index_fill_(1, torch.tensor([0]), 1.0)

    assert evaluate(Zero(), ds, batch_size=3) == 100.0


def test_shared_paths_used():
    assert paths.find_file("data/cifar10_test.npz").is_file()


@pytest.mark.slow
def test_resnet20_float_accuracy():
    from cora.experiments.models import build_model

    acc = evaluate(build_model("cifar_resnet20"), cifar10_test())
    assert acc == pytest.approx(81.03, abs=0.1)


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n" + b"garbage" * 8, b"", b"not an image at all"])
def test_image_folder_unreadable_image(tmp_path, content):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / c / "0.png")
    bad = tmp_path / "dog" / "1.png"
    bad.write_bytes(content)
    ds = image_folder(tmp_path, image_size=24)
    assert ds[0][0].shape == (3, 24, 24)
    with pytest.raises(ValueError, match="cannot read image") as e:
        ds[2]
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="1.png"):
        evaluate(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(2)), ds)


def test_truncated_image(tmp_path):
    (tmp_path / "a").mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 7).save(tmp_path / "a" / "0.jpg")
    data = (tmp_path / "a" / "0.jpg").read_bytes()
    (tmp_path / "a" / "0.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="0.jpg"):
        image_folder(tmp_path, image_size=16)[0]


def test_split_indices_disjoint_for_any_n():
    for n in (1, 7, 10, 11, 50):
        s, h = split_indices(10 if n != 50 else 50, n, "search"), split_indices(10 if n != 50 else 50, n, "holdout")
        total = 10 if n != 50 else 50
        assert len(s) == min(n, total) and len(h) == total - len(s)
        assert not set(s.tolist()) & set(h.tolist()) and list(h) == sorted(h)
    assert split_indices(10, 20, "holdout").size == 0
    assert np.array_equal(split_indices(100, 10), split_indices(100, 10))
    with pytest.raises(ValueError):
        split_indices(10, 0)
    with pytest.raises(ValueError):
        split_indices(10, 5, "train")


def test_balanced_subset():
    labels = np.array([0, 0, 0, 0, 1, 2, 2, 1, 0, 2])
    ds = NpzImageDataset(np.zeros((10, 32, 32, 3), np.uint8), labels)
    sub = balanced_subset(ds, 5)
    # classes take turns: 0, 1, 2, then 0, 1 (the first of each class in dataset order)
    assert isinstance(sub, NpzImageDataset) and sub.labels.tolist() == [0, 0, 1, 2, 1]
    assert balanced_subset(ds, 100) is ds and balanced_subset(ds, None) is ds
    assert len(balanced_subset(ds, 10)) == 10
    with pytest.raises(ValueError, match="positive"):
        balanced_subset(ds, 0)
    test = cifar10_test()
    first = balanced_subset(test, 30)
    assert torch.bincount(first.labels, minlength=10).tolist() == [3] * 10
    assert torch.equal(first.images[0], test.images[int(np.flatnonzero(test.labels.numpy() == first.labels[0].item())[0])])


def test_balanced_subset_of_a_folder(tmp_path):
    rng = np.random.default_rng(0)
    for c, k in (("a", 3), ("b", 1)):
        (tmp_path / c).mkdir()
        for i in range(k):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    ds = image_folder(tmp_path, image_size=8)
    sub = balanced_subset(ds, 3)
    assert len(sub) == 3 and dataset_labels(sub).tolist() == [0, 0, 1]
    assert [y for _, y in sub] == [0, 0, 1]
