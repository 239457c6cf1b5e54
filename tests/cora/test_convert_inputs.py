"""``convert`` with bad or unusual input: validated up front with one clear message, and nothing of the
caller's changed (model, per-module training flags, requires_grad, global RNG)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from cora import CoRaConfig, CoRaConv2d, QuantLinear, convert
from cora.experiments.models import cifar_resnet
from tests.helpers import randomise_bn

torch.set_num_threads(1)

N = 32


@pytest.fixture(scope="module")
def resnet8():
    torch.manual_seed(10)
    return randomise_bn(cifar_resnet(8), seed=11)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(12)
    return torch.randn(N, 3, 32, 32, generator=g), torch.randint(0, 10, (N,), generator=g)


def _cfg(**kw):
    base = dict(calib_images=N, stats_images=N, iterations=3, batch_size=8, progress=False, range_method="minmax",
                rounding="nearest", tune_iterations=0)
    base.update(kw)
    return CoRaConfig(**base)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------- nothing of the caller's changes
def test_caller_model_flags_grads_and_rng_are_left_alone(resnet8, data):
    m = copy.deepcopy(resnet8).train()
    m.layer1[0].bn1.eval()  # a BatchNorm frozen inside a model in train mode
    m.conv1.weight.requires_grad_(False)
    modes = {n: x.training for n, x in m.named_modules()}
    grads = {n: p.requires_grad for n, p in m.named_parameters()}
    state = _state(m)
    torch.manual_seed(1234)
    rng = torch.get_rng_state()
    q = convert(m, data, _cfg(method="search", tune_iterations=2))  # the search seeds torch's RNG inside
    assert torch.equal(torch.get_rng_state(), rng)
    assert {n: x.training for n, x in m.named_modules()} == modes
    assert {n: p.requires_grad for n, p in m.named_parameters()} == grads
    assert _same_state(_state(m), state)
    # the converted model keeps the caller's per-module flags too
    got = {n: x.training for n, x in q.named_modules()}
    assert all(got[n] == flag for n, flag in modes.items() if n in got)
    assert q.training and not q.layer1[0].bn1.training and q.layer1[0].bn2.training


# ---------------------------------------------------------------------------------- patterns and unsupported layers
def test_one_string_is_one_skip_pattern(resnet8, data):
    q = convert(resnet8, data, _cfg(method="none", skip="conv1"))
    assert isinstance(q.conv1, nn.Conv2d) and not isinstance(q.conv1, CoRaConv2d)
    assert q.cora_report.skipped["conv1"] == "skipped by the config"
    assert isinstance(q.layer1[0].conv1, CoRaConv2d)


@pytest.mark.parametrize("field,value", [("skip", ("conv_typo",)), ("layer_bits", (("layer9.*", 8),)),
                                         ("layer_bits", {"fc": 8})])
def test_a_pattern_matching_nothing_is_an_error(resnet8, data, field, value):
    pattern = value[0][0] if field == "layer_bits" and not isinstance(value, dict) else (
        next(iter(value)) if isinstance(value, dict) else value[0])
    with pytest.raises(ValueError, match=f"{field} pattern '{pattern}'.*matches no"):
        convert(resnet8, data, _cfg(**{field: value}))


class _Mixed(nn.Module):
    """A Conv1d and a Conv3d (not supported: they stay float) next to a Conv2d and a Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.c1 = nn.Conv1d(4, 4, 3, padding=1)
        self.c3 = nn.Conv3d(1, 1, 1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        y = self.conv(x)
        n, c, h, w = y.shape
        y = self.c1(y.flatten(2)).reshape(n, c, h, w)
        y = self.c3(y.unsqueeze(1)).squeeze(1)
        return self.fc(y.mean((2, 3)))


def test_unsupported_conv_types_are_reported_as_skipped():
    torch.manual_seed(3)
    q = convert(_Mixed().eval(), torch.randn(8, 3, 6, 6), _cfg(calib_images=8, stats_images=8, method="uniform", budget=0.3))
    rep = q.cora_report
    assert isinstance(q.conv, CoRaConv2d) and isinstance(q.fc, QuantLinear)
    assert type(q.c1) is nn.Conv1d and type(q.c3) is nn.Conv3d
    assert "Conv1d is not supported" in rep.skipped["c1"] and "Conv3d is not supported" in rep.skipped["c3"]
    assert set(rep.quantized) == {"conv", "fc"}


class _PlainLinear(nn.Linear):
    """Like timm's Linear: a subclass that keeps nn.Linear's forward (converted)."""


class _PlainConv(nn.Conv2d):
    """A subclass that keeps nn.Conv2d's forward (converted)."""


class _ScaledConv(nn.Conv2d):
    """A subclass with its own forward (left in float, listed as skipped)."""

    def forward(self, x):
        return 2.0 * super().forward(x)


def test_subclasses_are_converted_only_when_their_forward_is_the_plain_one():
    torch.manual_seed(4)
    model = nn.Sequential(_PlainConv(3, 6, 3, padding=1), nn.ReLU(), _ScaledConv(6, 6, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(6, 6, 3, padding=1), nn.Flatten(), _PlainLinear(6 * 36, 5)).eval()
    q = convert(model, torch.randn(8, 3, 6, 6), _cfg(calib_images=8, stats_images=8, method="uniform", budget=0.3))
    rep = q.cora_report
    assert isinstance(q[0], CoRaConv2d) and isinstance(q[6], QuantLinear) and type(q[2]) is _ScaledConv
    assert set(rep.quantized) == {"0", "4", "6"} and "own forward" in rep.skipped["2"]
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        rel = ((q(x) - model(x)).norm() / model(x).norm()).item()
    assert rel < 0.2  # a W4 model of the same function, not a different one


# ---------------------------------------------------------------------------------- dtypes, devices, values
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_convert_through_float32_and_keep_their_dtype(resnet8, data, dtype):
    x, y = data
    m = copy.deepcopy(resnet8).to(dtype)
    before = _state(m)
    q = convert(m, (x.to(dtype), y), _cfg(method="uniform", budget=0.2))
    assert _same_state(_state(m), before)  # the caller's model is untouched
    # the float32 conversion of the same values (calibration images included) gives the same CoRa layers
    ref = convert(copy.deepcopy(m).float(), (x.to(dtype).float(), y), _cfg(method="uniform", budget=0.2))
    for name, mod in q.named_modules():
        if isinstance(mod, (CoRaConv2d, QuantLinear)):
            other = ref.get_submodule(name)
            assert all(torch.equal(a, b) for a, b in zip(mod.state_dict().values(), other.state_dict().values()) if
                       isinstance(a, torch.Tensor))
    # the float layers keep their exact values and dtype
    for k, v in q.state_dict().items():
        if "bn" in k and v.is_floating_point():
            assert v.dtype == dtype and torch.equal(v, before[k]), k
    with torch.no_grad():
        out = q(x[:4].to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_inplace_keeps_the_dtype_too(resnet8, data):
    m = copy.deepcopy(resnet8).half()
    q = convert(m, data[0].half(), _cfg(method="none"), inplace=True)
    assert q is m and isinstance(m.conv1, CoRaConv2d) and m.bn1.weight.dtype == torch.float16


def test_meta_device_and_non_finite_tensors_are_named(resnet8, data):
    with torch.device("meta"):
        meta = cifar_resnet(8)
    with pytest.raises(ValueError, match="meta device"):
        convert(meta, data, _cfg())
    m = copy.deepcopy(resnet8)
    with torch.no_grad():
        m.layer1[0].bn2.running_var[1] = float("nan")
    with pytest.raises(ValueError, match=r"layer1\.0\.bn2\.running_var contains NaN"):
        convert(m, data, _cfg(rounding="gptq"))
    m = copy.deepcopy(resnet8)
    with torch.no_grad():
        m.linear.bias[0] = float("inf")
    with pytest.raises(ValueError, match=r"linear\.bias contains NaN or Inf"):
        convert(m, data, _cfg())


# ---------------------------------------------------------------------------------- labels and outputs
def test_one_hot_labels_give_the_same_conversion(resnet8, data):
    x, y = data
    cfg = _cfg(method="search", loss="ce", iterations=2)
    a = convert(resnet8, (x, y), cfg)
    b = convert(resnet8, (x, nn.functional.one_hot(y, 10)), cfg)
    assert a.cora_report.ranks == b.cora_report.ranks and _same_state(_state(a), _state(b))


def test_labels_out_of_range_are_refused_before_any_work(resnet8, data):
    x, y = data
    with pytest.raises(ValueError, match="labels go up to 12 but the model has 10 outputs"):
        convert(resnet8, (x, y.clamp(max=9).index_fill(0, torch.tensor([3]), 12)), _cfg(method="search", loss="ce"))


class _TupleNet(nn.Module):
    def __init__(self, as_dict=False):
        super().__init__()
        torch.manual_seed(4)
        self.net = cifar_resnet(8).eval()
        self.as_dict = as_dict

    def forward(self, x):
        logits = self.net(x)
        return {"logits": logits, "features": x.mean()} if self.as_dict else (logits, x.mean())


@pytest.mark.parametrize("as_dict,selector", [(False, 0), (True, "logits")])
def test_models_returning_tuples_or_dicts(data, as_dict, selector):
    model = _TupleNet(as_dict).eval()
    kind = "dict" if as_dict else "tuple"
    with pytest.raises(ValueError, match=f"returns a {kind}.*output="):
        convert(model, data, _cfg(method="search"))
    q = convert(model, data, _cfg(method="search", tune_iterations=2, output=selector))
    assert q.cora_report.iterations == 3 and q.cora_report.tune_iterations == 2
    # without losses on the outputs (uniform ranks, no tuning) no selector is needed
    convert(model, data[0], _cfg(method="uniform"))


# ---------------------------------------------------------------------------------- tuning that goes wrong
def test_non_finite_tuned_adapters_are_not_kept(resnet8, data):
    """One Adam step of size 1e6 overflows the float16 adapters: the untuned ones stay, with a warning."""
    untuned = convert(resnet8, data, _cfg(method="uniform", budget=0.3))
    q = convert(resnet8, data, _cfg(method="uniform", budget=0.3, tune_iterations=1, tune_loss="kl", tune_lr=1e6))
    rep = q.cora_report
    assert rep.tune_loss is None and rep.tune_iterations == 0
    assert any("untuned adapters are kept" in w for w in rep.warnings), rep.warnings
    assert _same_state(_state(q), _state(untuned))
    with torch.no_grad():
        assert torch.isfinite(q(data[0][:4])).all()


# ---------------------------------------------------------------------------------- memory: very wide layers
def test_layers_too_wide_for_statistics_are_rounded_to_nearest_with_a_note(resnet8, data):
    """Decided before allocating: K above quantizer.max_stats_features gets no [K, K] statistics."""
    limit = 100  # conv1 (K = 27) and the linear (K = 64) keep statistics; every 3x3 conv of 16+ channels does not
    q = convert(resnet8, data, _cfg(method="uniform", budget=0.1, rounding="gptq", factorization="activation",
                                    max_stats_features=limit))
    nearest = convert(resnet8, data, _cfg(method="none", rounding="nearest"))
    rep = q.cora_report
    wide = [n for n, m in q.named_modules() if isinstance(m, CoRaConv2d) and m.weight_shape[1] * 9 > limit]
    assert wide and all(any(w.startswith(f"{n}:") and "no input statistics" in w for w in rep.warnings) for n in wide)
    for n in wide:  # the same codes as plain rounding to nearest
        assert torch.equal(q.get_submodule(n).codes(), nearest.get_submodule(n).codes()), n
    assert not any(w.startswith("conv1:") for w in rep.warnings)


# ---------------------------------------------------------------------------------- the layer's own checks
def test_layer_argument_checks():
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(TypeError, match="rank must be an int"):
        CoRaConv2d.from_conv(conv, 4, rank=2.0)
    with pytest.raises(ValueError, match="adapter_dtype='int4' not supported"):
        CoRaConv2d(3, 4, 3, adapter_dtype="int4")
    with pytest.raises(ValueError, match="adapter_dtype=torch.uint8 not supported"):
        CoRaConv2d(3, 4, 3, adapter_dtype=torch.uint8)
    with pytest.raises(TypeError, match="in_channels must be an int"):
        CoRaConv2d(3.0, 4, 3)
    with pytest.raises(TypeError, match="bias must be True or False"):
        QuantLinear(3, 4, bias="no")
    layer = CoRaConv2d.from_conv(conv, 4, rank=1)
    with pytest.raises(ValueError, match="3-D .* or 4-D"):
        layer(torch.randn(3, 5))
