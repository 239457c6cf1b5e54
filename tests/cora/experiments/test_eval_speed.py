"""The fast evaluation of ``quantize`` (deployed dense weights, channels-last), the baseline cache, and the
thread count not changing a conversion beyond float summation order."""
from __future__ import annotations

import torch

from cora import CoRaConfig, convert
from cora.experiments import eval_cache, pipeline
from cora.experiments.data import NpzImageDataset, evaluate
from tests.helpers import ToyCNN, randomise_bn
from tests.tolerances import THREAD_COUNT_RTOL


def _toy(seed: int = 0):
    torch.manual_seed(seed)
    return randomise_bn(ToyCNN(), seed)


def _dataset(model, n: int = 60, seed: int = 1) -> NpzImageDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 16, 16, 3), generator=g, dtype=torch.uint8)
    ds = NpzImageDataset(images.numpy(), torch.zeros(n, dtype=torch.int64).numpy())
    with torch.no_grad():  # labels: the model's own predictions, so the reference scores 100 %
        ds.labels = model(ds.images).argmax(1)
    return ds


def test_evaluate_model_runs_the_deployed_model_with_the_same_predictions():
    calib = torch.randn(32, 3, 16, 16)
    q = convert(_toy(), calib, CoRaConfig(bits=4, method="uniform", calib_images=32, progress=False))
    ds = _dataset(q.eval())
    assert evaluate(q, ds) == 100.0
    assert pipeline.evaluate_model(q, ds, torch.device("cpu")) == 100.0
    ds.labels = (ds.labels + 1) % 10  # every prediction now wrong: the fast path really scores them
    assert pipeline.evaluate_model(q, ds, torch.device("cpu")) == 0.0


def test_baselines_come_from_the_cache_only_for_the_same_model_and_data(tmp_path, monkeypatch):
    monkeypatch.setenv(eval_cache.CACHE_ENV, str(tmp_path))
    model, calls = _toy(), []
    ds = _dataset(model)

    def compute():
        calls.append(1)
        return {"float_acc": float(torch.rand(()))}

    first, hit = pipeline._cached("float", model, ds, {}, True, compute)
    assert not hit and len(calls) == 1
    again, hit = pipeline._cached("float", model, ds, {}, True, compute)
    assert hit and again == first and len(calls) == 1
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0] += 1e-3  # other weights: measured again
    assert not pipeline._cached("float", model, ds, {}, True, compute)[1]
    ds.labels = (ds.labels + 1) % 10  # other data: measured again
    assert not pipeline._cached("float", model, ds, {}, True, compute)[1]
    assert not pipeline._cached("rtn x", model, ds, {}, True, compute)[1]  # another kind
    assert not pipeline._cached("float", model, ds, {}, False, compute)[1]  # cache off
    assert len(calls) == 5 and (tmp_path / "eval_cache.json").is_file()


def test_an_unreadable_cache_counts_as_empty(tmp_path, monkeypatch):
    monkeypatch.setenv(eval_cache.CACHE_ENV, str(tmp_path))
    (tmp_path / "eval_cache.json").write_text("{not json")
    assert eval_cache.lookup("k") is None
    eval_cache.store("k", {"a": 1.0})
    assert eval_cache.lookup("k") == {"a": 1.0}


def test_the_thread_count_changes_a_conversion_only_by_summation_order():
    calib = torch.randn(48, 3, 16, 16), torch.randint(0, 10, (48,))
    config = CoRaConfig(bits=3, calib_images=48, iterations=8, tune_iterations=8, progress=False)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            q = convert(_toy(), calib, config)
            with torch.no_grad():
                results.append((q.cora_report.ranks, q(calib[0][:16])))
    finally:
        torch.set_num_threads(before)
    (ranks1, y1), (ranks2, y2) = results
    assert ranks1 == ranks2
    assert float((y1 - y2).norm() / y1.norm()) < THREAD_COUNT_RTOL


def test_the_rtn_baseline_is_plain_rounding_without_tuning():
    for config in (CoRaConfig(bits=3), CoRaConfig.paper(4), CoRaConfig(bits=2, tune_iterations=40)):
        rtn = pipeline.baseline_config(config).resolved(has_labels=False)
        assert rtn.method == "none" and rtn.quantizer.rounding == "nearest" and rtn.tune.iterations == 0
