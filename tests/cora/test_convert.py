"""``cora.convert`` end to end on small models (cora/convert.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cora import CoRaConfig, CoRaConv2d, QuantLinear, convert
from cora.experiments.models import build_model, cifar_resnet
from tests.helpers import randomise_bn

torch.set_num_threads(1)

N_CALIB = 64


@pytest.fixture(scope="module")
def resnet8():
    torch.manual_seed(0)
    return randomise_bn(cifar_resnet(8), seed=1)  # non-default BN statistics, so "unchanged" is a real check


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(2)
    return torch.randn(N_CALIB, 3, 32, 32, generator=g), torch.randint(0, 10, (N_CALIB,), generator=g)


def _cfg(**kw):
    # adapter tuning off here: these are tests of the conversion itself (tuning: tests/test_tune.py)
    base = dict(iterations=5, calib_images=N_CALIB, batch_size=16, progress=False, tune_iterations=0)
    base.update(kw)
    return CoRaConfig(**base)


def _cheap(**kw):
    """Round to nearest with min-max ranges: the fast base, for tests about plumbing."""
    base = dict(iterations=5, calib_images=N_CALIB, batch_size=16, progress=False, range_method="minmax", rounding="nearest",
                tune_iterations=0)
    base.update(kw)
    return CoRaConfig(**base)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _budget_params(model):
    """P: conv and linear weights (what the budget is a fraction of)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


@pytest.fixture(scope="module")
def converted(resnet8, calib):
    """One conversion per method (shared by several tests to keep the runtime down)."""
    before = _snapshot(resnet8)
    out = {}
    for method in ("search", "uniform", "none"):
        out[method] = convert(resnet8, calib, _cfg(method=method))
    return before, out


@pytest.mark.parametrize("method", ["search", "uniform", "none"])
def test_layers_swapped_budget_and_report(resnet8, calib, converted, method):
    _, models = converted
    q = models[method]
    names_conv = [n for n, m in resnet8.named_modules() if isinstance(m, nn.Conv2d)]
    names_lin = [n for n, m in resnet8.named_modules() if isinstance(m, nn.Linear)]
    assert names_conv and names_lin
    for n in names_conv:
        assert isinstance(q.get_submodule(n), CoRaConv2d), n
    for n in names_lin:
        assert isinstance(q.get_submodule(n), QuantLinear), n
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in q.modules())
    rep = q.cora_report
    assert rep.method == method and rep.bits == 4 and rep.budget == 0.05
    P = _budget_params(resnet8)
    adapter = sum(m.adapter_params for m in q.modules() if isinstance(m, (CoRaConv2d, QuantLinear)))
    assert rep.adapter_fraction == pytest.approx(adapter / P)
    shares = {n: q.get_submodule(n).adapter_params / P for n in rep.ranks}
    assert rep.budget_share == pytest.approx(shares) and list(rep.budget_share) == list(rep.ranks)
    assert rep.adapter_fraction <= 0.05
    assert set(rep.quantized) == set(names_conv + names_lin)
    assert rep.calib_images == N_CALIB
    assert rep.search_seconds >= 0 and rep.total_seconds >= rep.search_seconds
    if method == "none":
        assert rep.adapter_fraction == 0.0 and rep.iterations == 0
        assert all(m.rank == 0 for m in q.modules() if isinstance(m, (CoRaConv2d, QuantLinear)))
    else:
        assert rep.adapter_fraction > 0.03  # the budget is used
        assert set(rep.ranks) == set(names_conv + names_lin)  # the linear layer is adapted too
        for n, r in rep.ranks.items():
            assert q.get_submodule(n).rank == r
        assert rep.iterations == (5 if method == "search" else 0)
        if method == "search":
            assert rep.search_seconds > 0 and rep.trace
    # equivalent bits: codes + per-channel scale/zero + fp16 adapters over all quantized weights
    total_w = sum(resnet8.get_submodule(n).weight.numel() for n in rep.quantized)
    bits = sum(m.storage_bits() for m in q.modules() if isinstance(m, (CoRaConv2d, QuantLinear)))
    assert rep.equiv_bits == pytest.approx(bits / total_w)
    assert 4.0 < rep.equiv_bits < 4.0 + 16 * 0.05 * P / total_w + 2.0
    d = rep.to_dict()
    for key in ("adapter_fraction", "equiv_bits", "iterations", "calib_images", "search_seconds", "ranks"):
        assert key in d
    # a working model, close to the float one
    x = calib[0][:8]
    with torch.no_grad():
        yq, yf = q(x), resnet8(x)
    assert yq.shape == yf.shape and torch.isfinite(yq).all()
    assert not torch.equal(yq, yf)


def test_original_model_untouched_and_bn_kept(resnet8, converted):
    before, models = converted
    after = resnet8.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert all(type(m) is not CoRaConv2d for m in resnet8.modules())
    assert not resnet8.training
    for method, q in models.items():
        qs = q.state_dict()
        for k, v in before.items():
            if any(s in k for s in ("running_mean", "running_var", "num_batches_tracked", "bn")):
                assert torch.equal(qs[k], v), (method, k)
        assert not q.training


def test_adapters_help(resnet8, calib, converted):
    """On the same base ("none" = the same GPTQ/MSE codes, no adapters) adapters cut the output error."""
    _, models = converted
    for n, m in models["none"].named_modules():
        if isinstance(m, CoRaConv2d):  # same codes in all three: only the adapters differ
            assert torch.equal(m.codes(), models["search"].get_submodule(n).codes())
            assert torch.equal(m.codes(), models["uniform"].get_submodule(n).codes())
    x = calib[0]
    with torch.no_grad():
        ref = resnet8(x)
        errs = {m: float((models[m](x) - ref).pow(2).mean()) for m in models}
    assert errs["search"] < errs["none"] and errs["uniform"] < errs["none"], errs


def test_same_seed_same_result(resnet8, calib, converted):
    _, models = converted
    again = convert(resnet8, calib, _cfg(method="search"))
    assert again.cora_report.ranks == models["search"].cora_report.ranks
    x = calib[0][:4]
    with torch.no_grad():
        assert torch.equal(again(x), models["search"](x))


def test_skip_patterns_and_layer_bits(resnet8, calib):
    cfg = _cheap(method="uniform", skip=("conv1", "layer2.*"), layer_bits=(("layer1.0.conv1", 8), ("linear", 2)))
    q = convert(resnet8, calib, cfg)
    rep = q.cora_report
    assert type(q.conv1) is nn.Conv2d
    assert torch.equal(q.conv1.weight, resnet8.conv1.weight)
    for n, m in q.named_modules():
        if n.startswith("layer2.") and n.count(".") == 2 and "conv" in n:
            assert type(m) is nn.Conv2d, n
    for n in ("conv1", "layer2.0.conv1", "layer2.0.conv2"):
        assert "config" in rep.skipped[n]
        assert n not in rep.quantized
    assert q.get_submodule("layer1.0.conv1").bits == 8
    assert q.get_submodule("layer1.0.conv2").bits == 4
    lin = [n for n, m in q.named_modules() if isinstance(m, QuantLinear)]
    assert lin == ["linear"] and q.linear.bits == 2
    assert rep.adapter_fraction <= 0.05


def test_grouped_bits_widen_the_grouped_convs_only():
    """grouped_bits sets the width of depthwise / grouped convs (no adapter there); a layer_bits pattern wins."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(8, 6, 1),
    ).eval()
    x = torch.randn(16, 3, 8, 8)
    base = dict(method="uniform", calib_images=16, rounding="nearest", tune_iterations=0, progress=False)
    q = convert(model, x, CoRaConfig(bits=4, grouped_bits=8, **base))
    assert [q.get_submodule(n).bits for n in ("0", "2", "4", "6")] == [4, 8, 8, 4]
    assert q.get_submodule("2").rank == 0 and q.get_submodule("6").rank > 0
    same = convert(model, x, CoRaConfig(bits=4, grouped_bits=None, **base))
    assert q.cora_report.equiv_bits > same.cora_report.equiv_bits  # counted at their real width
    with torch.no_grad():
        ref = model(x)
        assert (q(x) - ref).norm() < (same(x) - ref).norm()
    first = convert(model, x, CoRaConfig(bits=4, grouped_bits=8, layer_bits={"4": 3}, **base))
    assert [first.get_submodule(n).bits for n in ("2", "4")] == [8, 3]


def test_quantize_linear_off(resnet8, calib):
    """quantize_linear=False: linears stay float, get no adapter and are not counted in the budget."""
    q = convert(resnet8, calib, _cheap(method="uniform", quantize_linear=False))
    rep = q.cora_report
    assert type(q.linear) is nn.Linear
    assert "linear" in rep.skipped and "linear" not in rep.ranks
    P_conv = sum(m.weight.numel() for m in resnet8.modules() if isinstance(m, nn.Conv2d))
    adapter = sum(m.adapter_params for m in q.modules() if isinstance(m, CoRaConv2d))
    assert rep.adapter_fraction == pytest.approx(adapter / P_conv) and 0.03 < rep.adapter_fraction <= 0.05


class ConvMLP(nn.Module):
    """A small conv stem and an MLP that holds most of the weights (as convnext's MLPs do)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 96)
        self.fc2 = nn.Linear(96, 10)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("method", ["uniform", "search"])
def test_linear_layers_get_adapters_under_the_budget(method):
    """Where linears carry most weights they get ranks; P counts them; the budget holds; the adapters help."""
    torch.manual_seed(0)
    model = ConvMLP().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)
    cfg = CoRaConfig(bits=2, method=method, budget=0.1, iterations=5, calib_images=32, batch_size=16, tune_iterations=0,
                     progress=False)
    q = convert(model, (x, y), cfg)
    rep = q.cora_report
    P = 8 * 3 * 9 + 128 * 96 + 96 * 10  # by hand: the linears are 95 % of it
    assert isinstance(q.fc1, QuantLinear) and isinstance(q.fc2, QuantLinear)
    assert rep.ranks["fc1"] > 0 and q.fc1.rank == rep.ranks["fc1"] and q.fc2.rank == rep.ranks["fc2"]
    params = {n: q.get_submodule(n).adapter_params for n in ("conv", "fc1", "fc2")}
    assert sum(params.values()) <= 0.1 * P and rep.adapter_fraction == pytest.approx(sum(params.values()) / P)
    assert rep.budget_share == pytest.approx({n: p / P for n, p in params.items()})
    bits = sum(m.storage_bits() for m in q.modules() if isinstance(m, (CoRaConv2d, QuantLinear)))
    assert rep.equiv_bits == pytest.approx(bits / P)  # every weight is quantized here
    none = convert(model, (x, y), CoRaConfig(bits=2, method="none", calib_images=32, tune_iterations=0, progress=False))
    with torch.no_grad():
        ref = model(x)
        assert (q(x) - ref).pow(2).mean() < (none(x) - ref).pow(2).mean()


def test_paper_config_per_tensor(resnet8, calib):
    q = convert(resnet8, calib, CoRaConfig.paper(3, iterations=3, calib_images=N_CALIB, batch_size=16, progress=False))
    rep = q.cora_report
    assert rep.adapter_fraction <= 0.05
    for m in q.modules():
        if isinstance(m, (CoRaConv2d, QuantLinear)):
            assert (m.scale == m.scale[0]).all() and (m.zero == m.zero[0]).all()
            assert m.bits == 3


def test_inplace(resnet8, calib):
    import copy

    m = copy.deepcopy(resnet8)
    q = convert(m, calib, _cheap(method="none"), inplace=True)
    assert q is m and isinstance(m.conv1, CoRaConv2d)


# The default base (MSE range grid + GPTQ + activation-aware SVD) costs ~80 s for ResNet-18 on one CPU
# thread (the MSE grid alone ~13 s for one 512x4608 weight), so the fast tests use the cheap base for the
# big models and the full data-aware path (Hessians, GPTQ, activation SVD, depthwise skip) on MobileNetV2.
_CHEAP = dict(range_method="minmax", rounding="nearest", factorization="weight")
_DATA_AWARE = dict(range_method="minmax", rounding="gptq", factorization="activation")


@pytest.mark.parametrize(
    "name,kw",
    [
        ("resnet18", _CHEAP),
        ("mobilenet_v2", _DATA_AWARE),
        pytest.param("resnet50", _CHEAP, marks=pytest.mark.slow),
        # the defaults on a real model (ResNet-18 with them: ~160 s here; the CLI tests run them on ResNet-20)
        pytest.param("mobilenet_v2", {}, marks=pytest.mark.slow, id="mobilenet_v2-defaults"),
    ],
)
def test_torchvision_models_convert(name, kw):
    torch.manual_seed(0)
    model = build_model(name)
    x = torch.randn(8, 3, 64, 64)
    cfg = CoRaConfig(iterations=3, calib_images=8, batch_size=8, tune_iterations=2, tune_loss="kl", progress=False, **kw)
    q = convert(model, x, cfg)
    rep = q.cora_report
    assert rep.adapter_fraction <= 0.05
    assert rep.tune_loss == "kl" and rep.tune_iterations == 2  # the tuning runs on these models too
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in q.modules())
    if name == "mobilenet_v2":
        dw = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
        assert dw
        for n in dw:
            assert "depthwise" in rep.no_adapter[n] and n in rep.quantized and n not in rep.skipped  # listed once
            assert q.get_submodule(n).rank == 0
            assert n not in rep.ranks or rep.ranks[n] == 0
    with torch.no_grad():
        y = q(x[:2])
    assert y.shape == (2, 1000) and torch.isfinite(y).all()


# ---------------------------------------------------------------------------------- bad input
def test_empty_calibration_raises(resnet8):
    with pytest.raises(ValueError, match="empty"):
        convert(resnet8, [], _cfg())
    with pytest.raises(ValueError, match="empty"):
        convert(resnet8, torch.empty(0, 3, 32, 32), _cfg())


def test_ce_without_labels_raises(resnet8, calib):
    with pytest.raises(ValueError, match="label"):
        convert(resnet8, calib[0], _cfg(method="search", loss="ce"))


def test_model_without_layers_raises(calib):
    m = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())
    with pytest.raises(ValueError, match="no Conv2d or Linear"):
        convert(m, calib, _cfg())


def test_nan_weight_raises_with_layer_name(resnet8, calib):
    import copy

    m = copy.deepcopy(resnet8)
    with torch.no_grad():
        m.layer2[0].conv2.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer2\.0\.conv2"):
        convert(m, calib, _cfg())


def test_already_converted_raises(converted, calib):
    _, models = converted
    with pytest.raises(ValueError, match="already quantized"):
        convert(models["none"], calib, _cfg())


def test_nan_calibration_raises(resnet8):
    x = torch.randn(8, 3, 32, 32)
    x[3, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        convert(resnet8, x, _cfg(calib_images=8))


def test_layer_never_called_is_quantized_without_statistics():
    """A conv the forward pass never reaches still converts (nearest rounding, weight-space SVD)."""

    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.unused = nn.Conv2d(8, 8, 3)
            self.b = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    for method in ("uniform", "search"):
        cfg = CoRaConfig(bits=4, method=method, iterations=3, budget=0.5, tune_iterations=3, tune_loss="kl", progress=False)
        q = convert(WithUnused(), torch.randn(16, 3, 8, 8), cfg)
        assert isinstance(q.unused, CoRaConv2d)
        assert q.cora_report.adapter_fraction <= 0.5


def test_bn_reestimate_only_when_asked(resnet8, calib):
    """bn_reestimate=True: BatchNorm statistics become those of the quantized model on the calibration
    images (one batch of 64 here: exactly its mean and unbiased variance); the original keeps its own."""
    before = _snapshot(resnet8)
    q = convert(resnet8, calib, _cheap(method="uniform", bn_reestimate=True, tune_batch_size=N_CALIB))
    x = calib[0]
    with torch.no_grad():
        h = q.conv1(x)  # the first BatchNorm's input, the quantized stem conv's output
    assert torch.allclose(q.bn1.running_mean, h.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-4)
    assert torch.allclose(q.bn1.running_var, h.transpose(0, 1).flatten(1).var(dim=1, unbiased=True), atol=1e-5, rtol=1e-4)
    assert q.bn1.momentum == resnet8.bn1.momentum and not q.training
    for k, v in before.items():
        assert torch.equal(resnet8.state_dict()[k], v), k
    kept = convert(resnet8, calib, _cheap(method="uniform"))
    assert torch.equal(kept.bn1.running_mean, resnet8.bn1.running_mean)
    assert not torch.equal(q.bn1.running_mean, resnet8.bn1.running_mean)
    with pytest.raises(ValueError, match="bn_reestimate"):
        CoRaConfig(bn_reestimate=1)
