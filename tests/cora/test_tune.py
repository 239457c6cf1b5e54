"""Adapter tuning (cora/tune.py) and its place in ``convert``."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cora import CoRaConfig, CoRaConv2d, convert
from cora.calibration import Objective, model_logits
from cora.experiments.models import cifar_resnet
from cora.tune import tune_adapters
from tests.helpers import randomise_bn

torch.set_num_threads(1)

N = 48


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    return randomise_bn(cifar_resnet(8), seed=4)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(5)
    return torch.randn(N, 3, 32, 32, generator=g), torch.randint(0, 10, (N,), generator=g)


def _cfg(**kw):
    # W3 with a large budget: a big residual, so there is something for the tuning to win
    base = dict(bits=3, budget=0.3, calib_images=N, stats_images=N, progress=False, rounding="nearest", range_method="minmax",
                method="uniform", iterations=5)
    base.update(kw)
    return CoRaConfig(**base)


@pytest.fixture(scope="module")
def untuned(model, data):
    return convert(model, data, _cfg(tune_iterations=0))


def _same(a, b) -> bool:
    """state_dict entries: tensors, or the modules' extra state (a dict)."""
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def _kl(q, teacher, x):
    with torch.no_grad():
        return float(F.kl_div(F.log_softmax(q(x), -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean"))


def test_kl_tuning_lowers_kl_and_moves_only_adapters(model, data, untuned):
    x, _ = data
    q = convert(model, x, _cfg(tune_iterations=40, tune_loss="kl", tune_lr=1e-4))
    rep = q.cora_report
    assert rep.tune_loss == "kl" and rep.tune_iterations == 40 and rep.tune_seconds > 0
    assert rep.ranks == untuned.cora_report.ranks and rep.adapter_fraction == untuned.cora_report.adapter_fraction
    teacher = model_logits(model, x)
    assert _kl(q, teacher, x) < 0.9 * _kl(untuned, teacher, x)
    tuned_sd, base_sd = q.state_dict(), untuned.state_dict()
    assert tuned_sd.keys() == base_sd.keys()
    moved = {k for k in base_sd if not _same(tuned_sd[k], base_sd[k])}
    assert moved and all(k.endswith(("adapter_a", "adapter_b")) for k in moved), sorted(moved)
    assert q.linear.rank > 0 and {"linear.adapter_a", "linear.adapter_b"} <= moved  # the linear adapter is tuned too
    for k in moved:
        assert tuned_sd[k].dtype == base_sd[k].dtype and tuned_sd[k].shape == base_sd[k].shape
    assert not q.training
    assert all(p.grad is None for p in q.parameters())


def test_ce_tuning_fits_labels(model, data, untuned):
    x, y = data
    q = convert(model, (x, y), _cfg(tune_iterations=40, tune_loss="ce", tune_lr=1e-4))
    assert q.cora_report.tune_loss == "ce"
    with torch.no_grad():
        assert F.cross_entropy(q(x), y) < 0.9 * F.cross_entropy(untuned(x), y)


def test_auto_choices_follow_the_labels(model, data):
    x, y = data
    cfg = _cfg(tune_iterations=2, method="auto")
    assert cfg.method == cfg.search.loss == cfg.tune.loss == "auto"
    rep = convert(model, (x, y), cfg).cora_report  # labels: ranks searched by CE, adapters tuned by CE
    got = (rep.method, rep.config["search"]["loss"], rep.tune_loss, rep.iterations, rep.tune_iterations)
    assert got == ("search", "ce", "ce", 5, 2)
    rep = convert(model, x, cfg).cora_report  # no labels, 3 bits: uniform ranks, block reconstruction
    got = (rep.method, rep.config["search"]["loss"], rep.tune_loss, rep.iterations)
    assert got == ("uniform", "kl", "blocks", 0) and rep.tune_iterations > 0 and rep.tune_iterations % 2 == 0
    # 4 bits, steps left to auto: no tuning (none showed a reliable gain)
    rep = convert(model, x, cfg.replace(bits=4, tune_iterations=None)).cora_report
    got = (rep.method, rep.config["search"]["loss"], rep.tune_loss, rep.iterations, rep.tune_iterations)
    assert got == ("uniform", "kl", None, 0, 0)
    assert rep.config["method"] == "uniform" and rep.config["tune"]["iterations"] == 0
    rep = convert(model, x, cfg.replace(bits=4)).cora_report  # explicit steps are kept: block reconstruction
    assert rep.tune_loss == "blocks" and rep.config["tune"]["iterations"] == 2 and rep.tune_iterations > 0
    # explicit choices are kept whatever the data
    explicit = CoRaConfig(method="search", loss="kl", tune_loss="kl")
    r = explicit.resolved(True)
    assert (r.method, r.search.loss, r.tune.loss) == ("search", "kl", "kl")


def test_off_without_adapters_paper_and_zero(model, data):
    x, y = data
    assert convert(model, (x, y), _cfg(method="none")).cora_report.tune_loss is None
    assert CoRaConfig.paper(4).tune.iterations == 0
    rep = convert(model, (x, y), _cfg(tune_iterations=0)).cora_report
    assert rep.tune_loss is None and rep.tune_iterations == 0


def test_same_seed_same_adapters(model, data):
    x, y = data
    a = convert(model, (x, y), _cfg(tune_iterations=5))
    b = convert(model, (x, y), _cfg(tune_iterations=5))
    for k, v in a.state_dict().items():
        assert _same(v, b.state_dict()[k]), k


def test_model_state_restored(model, data, untuned):
    """Training mode and requires_grad flags come back; BatchNorm statistics never move."""
    import copy

    x, _ = data
    q = copy.deepcopy(untuned).train()
    flags = {n: p.requires_grad for n, p in q.named_parameters()}
    bn = {k: v.clone() for k, v in q.state_dict().items() if "running" in k or "num_batches" in k}
    tune_adapters(q, x, Objective("kl", teacher_logits=model_logits(model, x)), iterations=3)
    assert q.training
    assert {n: p.requires_grad for n, p in q.named_parameters()} == flags
    for k, v in bn.items():
        assert torch.equal(q.state_dict()[k], v), k
    assert any(isinstance(m, CoRaConv2d) for m in q.modules())


def test_divergence_leaves_adapters_untouched(model, data, untuned):
    import copy

    x, _ = data
    q = copy.deepcopy(untuned)
    teacher = model_logits(model, x)
    teacher[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="diverged"):
        tune_adapters(q, x, Objective("kl", teacher_logits=teacher), iterations=3, batch_size=N)
    for k, v in untuned.state_dict().items():
        assert _same(q.state_dict()[k], v), k
    assert all(type(m) is not nn.Module and not hasattr(m, "write_back") for m in q.modules())


def test_bad_input_raises(untuned, data):
    x, _ = data
    with pytest.raises(TypeError, match="Objective"):
        tune_adapters(untuned, x, "kl")
    with pytest.raises(ValueError, match="label"):
        convert(cifar_resnet(8).eval(), x, _cfg(tune_iterations=2, tune_loss="ce"))


@pytest.mark.parametrize("field,value", [("tune_iterations", -1), ("tune_lr", 0.0), ("tune_batch_size", 0), ("tune_loss", "mse"),
                                         ("tune_iterations", True)])
def test_bad_config(field, value):
    with pytest.raises(ValueError, match="invalid CoRaConfig"):
        CoRaConfig(**{field: value})


def test_int8_adapters_train_through_their_rounding_and_stay_int8():
    """int8 layers: the trainable stand-in computes with the masters rounded as int8 storage rounds them
    (straight-through gradients), and writing back stores exactly that: int8 codes and fp32 scales."""
    from cora.tune import _TrainableAdapterConv
    from tests.tolerances import assert_close_rel, rel_err, tol_for

    torch.manual_seed(7)
    layer = CoRaConv2d.from_conv(nn.Conv2d(4, 6, 3, padding=1), 2, 3, adapter_dtype="int8")
    w = _TrainableAdapterConv(layer)
    x = torch.randn(2, 4, 7, 7)
    w(x).square().sum().backward()
    assert w.a.grad is not None and w.a.grad.abs().sum() > 0 and w.b.grad.abs().sum() > 0
    with torch.no_grad():
        w.a.add_(0.05 * w.a.abs().mean() * torch.randn_like(w.a))  # a "trained" master, off the int8 grid
        w.b.mul_(1.1)
        y_train = w(x)
        unrounded = F.conv2d(x, w.weight_q, w.bias_f, padding=1) + F.conv2d(F.conv2d(x, w.a, padding=1), w.b)
        assert rel_err(unrounded, y_train) > tol_for(torch.float32)  # the rounding is really in the forward
        stored = w.write_back()
        assert stored is layer and layer.adapter_int8 and layer.adapter_a_scale.dtype == torch.float32
        assert (layer.adapter_a.abs().amax(1) == 127).all() and (layer.adapter_b.abs().amax(1) == 127).all()
        assert_close_rel(layer(x), y_train, torch.float32)


def test_int8_tuning_through_convert(model, data):
    x, _ = data
    base = convert(model, x, _cfg(tune_iterations=0, adapter_dtype="int8"))
    q = convert(model, x, _cfg(tune_iterations=40, tune_loss="kl", tune_lr=1e-4, adapter_dtype="int8"))
    teacher = model_logits(model, x)
    assert _kl(q, teacher, x) < 0.9 * _kl(base, teacher, x)
    tuned_sd, base_sd = q.state_dict(), base.state_dict()
    moved = {k for k in base_sd if not _same(tuned_sd[k], base_sd[k])}
    assert moved and all(k.rsplit(".", 1)[1].startswith("adapter_") for k in moved), sorted(moved)
    for k in moved:
        assert tuned_sd[k].dtype == base_sd[k].dtype and tuned_sd[k].shape == base_sd[k].shape
    assert all(m.adapter_int8 for m in q.modules() if isinstance(m, CoRaConv2d))


def test_linear_stand_in_is_the_layer_and_trains_through_int8():
    """The QuantLinear stand-in computes what the layer computes; int8 masters are rounded in the forward,
    and write_back stores that (int8 codes, fp32 scales)."""
    from cora.modules import QuantLinear
    from cora.tune import trainable_adapter
    from tests.tolerances import assert_close_rel, rel_err, tol_for

    torch.manual_seed(8)
    x = torch.randn(3, 2, 20)
    for dtype in ("float16", "int8"):
        layer = QuantLinear.from_linear(nn.Linear(20, 9), 2, 4, adapter_dtype=dtype)
        w = trainable_adapter(layer)
        assert type(w).__name__ == "_TrainableAdapterLinear" and w.a.shape == (4, 20) and w.b.shape == (9, 4)
        with torch.no_grad():
            assert_close_rel(w(x), layer(x), torch.float32)
        w(x).square().sum().backward()
        assert w.a.grad.abs().sum() > 0 and w.b.grad.abs().sum() > 0
        with torch.no_grad():
            w.a.add_(0.05 * w.a.abs().mean() * torch.randn_like(w.a))
            y_train = w(x)
            if dtype == "int8":
                unrounded = F.linear(x, w.weight_q, w.bias_f) + F.linear(F.linear(x, w.a), w.b)
                assert rel_err(unrounded, y_train) > tol_for(torch.float32)
            stored = w.write_back()
            assert stored is layer and layer.adapter_int8 == (dtype == "int8")
            assert_close_rel(layer(x), y_train, torch.float16 if dtype == "float16" else torch.float32)
