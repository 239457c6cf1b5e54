"""Calibration data and the task losses (cora/calibration.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from cora.calibration import CalibrationSet, Objective, materialize, model_logits, select_output


def _data(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 4, 4, generator=g), torch.randint(0, 5, (n,), generator=g)


def test_every_input_form_gives_the_same_tensors():
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    for calib in ((x, y), [x, y], loader, [(x[:4], y[:4]), (x[4:], y[4:])]):
        xs, ys = materialize(calib, 100)
        assert torch.equal(xs, x) and torch.equal(ys, y)
    xs, ys = materialize(x, 100)
    assert torch.equal(xs, x) and ys is None
    xs, ys = materialize([{"image": x[:5], "label": y[:5]}, {"image": x[5:], "label": y[5:]}], 7)
    assert torch.equal(xs, x[:7]) and torch.equal(ys, y[:7])


def test_labels_kept_only_when_every_batch_has_them():
    x, y = _data()
    xs, ys = materialize([(x[:5], y[:5]), x[5:]], 100)
    assert xs.shape[0] == 10 and ys is None


def test_bad_calibration_data():
    x, y = _data()
    with pytest.raises(ValueError, match="empty"):
        materialize([], 10)
    with pytest.raises(ValueError, match="NaN"):
        materialize(torch.full((2, 3, 4, 4), float("nan")), 10)
    with pytest.raises(TypeError, match="DataLoader"):
        materialize(3, 10)
    with pytest.raises(ValueError, match="4 labels for 10 images"):
        materialize((x, y[:4]), 10)
    with pytest.raises(ValueError, match="11 labels for 10 images"):  # surplus labels are not dropped
        materialize((x, torch.cat([y, y[:1]])), 10)
    with pytest.raises(ValueError, match="batch dimension"):  # a 1-D tensor is not "empty"
        materialize(torch.randn(12), 10)


def test_one_hot_labels_are_converted_exactly():
    x, y = _data()
    one_hot = torch.nn.functional.one_hot(y, 5)
    for form in (one_hot, one_hot.float(), one_hot.bool().long()):
        _, got = materialize((x, form), 100)
        assert torch.equal(got, y) and got.dtype == torch.int64
    _, got = materialize((x, y[:, None]), 100)  # [N, 1] is one index per image
    assert torch.equal(got, y)


@pytest.mark.parametrize("labels,match", [
    (lambda y: y.float(), "integer class indices"),  # float labels are not truncated
    (lambda y: y.float() + 0.5, "integer class indices"),
    (lambda y: torch.nn.functional.one_hot(y, 5) * 2, "neither class indices"),  # not one-hot
    (lambda y: torch.nn.functional.one_hot(y, 5).float() * 0.5, "neither class indices"),
    (lambda y: y - 10, ">= 0"),
    (lambda y: y.reshape(2, 5), "one label per image|shape"),
    (lambda y: y.bool(), "integer class indices"),
])
def test_labels_in_the_wrong_form_are_refused(labels, match):
    x, y = _data()
    with pytest.raises(ValueError, match=match):
        materialize((x, labels(y)), 100)


def test_label_range_checked_against_the_model():
    x, y = _data()
    data = CalibrationSet.gather((x, y), 10)
    data.check_labels(5)  # labels in [0, 5)
    with pytest.raises(ValueError, match=r"model has 3 outputs"):
        data.check_labels(3)
    CalibrationSet(x).check_labels(1)  # no labels: nothing to check


def test_calibration_set_subset_is_seeded_and_spread():
    x, y = _data(50)
    data = CalibrationSet.gather((x, y), 40)
    assert len(data) == 40 and data.has_labels and not CalibrationSet(x).has_labels
    a, b = data.statistics_subset(8, seed=1), data.statistics_subset(8, seed=1)
    assert torch.equal(a, b) and a.shape[0] == 8
    assert not torch.equal(a, x[:8])  # not simply the first images (they may be sorted by class)
    assert not torch.equal(a, data.statistics_subset(8, seed=2))


def test_objectives_compute_ce_and_kl_on_the_indexed_images():
    x, y = _data()
    g = torch.Generator().manual_seed(3)
    out = torch.randn(4, 5, generator=g)
    teacher = torch.randn(10, 5, generator=g)
    idx = torch.tensor([7, 0, 3, 3])
    assert torch.equal(Objective("ce", labels=y)(out, idx), F.cross_entropy(out, y[idx]))
    kl = Objective("kl", teacher_logits=teacher)(out, idx)
    p = F.softmax(teacher[idx], -1)
    ref = (p * (F.log_softmax(teacher[idx], -1) - F.log_softmax(out, -1))).sum(-1).mean()
    assert torch.allclose(kl, ref, rtol=1e-5)
    assert float(Objective("kl", teacher_logits=teacher)(teacher[idx], idx)) == pytest.approx(0.0, abs=1e-6)


def test_objectives_check_what_they_need():
    with pytest.raises(ValueError, match="label"):
        Objective("ce")
    with pytest.raises(ValueError, match="logits"):
        Objective("kl")
    with pytest.raises(ValueError, match="choose one of"):
        Objective("mse", labels=torch.zeros(3, dtype=torch.long))


def test_model_logits_restores_the_mode():
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 5), torch.nn.Dropout(0.5)).train()
    x, _ = _data()
    a, b = model_logits(m, x, batch_size=3), model_logits(m, x)
    assert a.shape == (10, 5) and m.training
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)  # eval mode: dropout off, the same in any batches


def test_select_output():
    t = torch.randn(2, 3)
    assert select_output(t) is t
    assert select_output((t, t * 2), 1).equal(t * 2)
    assert select_output({"logits": t, "aux": None}, "logits") is t
    with pytest.raises(ValueError, match="returns a tuple of 2.*output"):
        select_output((t, t))
    with pytest.raises(ValueError, match="returns a dict.*logits"):
        select_output({"logits": t})
    with pytest.raises(ValueError, match="does not select"):
        select_output((t,), 3)
    with pytest.raises(ValueError, match="not a tensor"):
        select_output({"aux": None}, "aux")
