"""Mixed precision under a target of equivalent bits (cora.precision, CoRaConfig(target_bits=...))."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from cora import CoRaConfig, convert
from cora.precision import choose_widths, layer_cost_bits, sensitivities, width_choices
from tests.helpers import randomise_bn
from tests.tolerances import assert_close_rel

torch.set_num_threads(1)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return randomise_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    ), seed=1).eval()


def _images(n=32):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(2))


def _cfg(**kw) -> CoRaConfig:
    base = dict(bits=4, method="none", calib_images=32, tune_iterations=0, progress=False)
    return CoRaConfig(**{**base, **kw})


# ---------------------------------------------------------------------------------- the greedy choice
def test_choose_widths_spends_bits_where_they_remove_the_most_error_and_stays_within_budget():
    layers = {"small": nn.Linear(10, 10), "big": nn.Linear(100, 10)}  # 100 and 1,000 weights
    errors = {"small": {2: 1.0, 3: 0.2, 4: 0.05}, "big": {2: 1.0, 3: 0.5, 4: 0.3}}
    cost = lambda w: sum(layer_cost_bits(layers[n], b, True) for n, b in w.items())  # noqa: E731
    narrow = cost({"small": 2, "big": 2})
    # room for one step of the small layer only (100 codes and 10 zero points one bit wider: 110 bits); it
    # removes 0.8 for those, the big one would remove 0.5 for 1,010
    assert choose_widths(layers, errors, narrow + 110, True) == {"small": 3, "big": 2}
    assert choose_widths(layers, errors, narrow + 109, True) == {"small": 2, "big": 2}
    wide = choose_widths(layers, errors, cost({"small": 4, "big": 4}), True)
    assert wide == {"small": 4, "big": 4}
    for budget in (narrow, narrow + 150, narrow + 1100, narrow + 1250, cost({"small": 4, "big": 4}) - 1):
        assert cost(choose_widths(layers, errors, budget, True)) <= budget
    with pytest.raises(ValueError, match="narrowest"):
        choose_widths(layers, errors, narrow - 1, True)


def test_width_choices_are_the_two_around_the_bits_left_for_codes():
    assert width_choices(4, 2.85) == [2, 3] and width_choices(4, 3.05) == [3, 4] and width_choices(4, 1.7) == [2, 3]
    assert width_choices(4, 4.6) == [4] and width_choices(3, 3.5) == [3] and width_choices(8, 5.0) == [4, 8]


def test_sensitivities_fall_with_width_and_leave_the_model_as_it_was():
    model, images = _net(), _images()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = sensitivities(model, layers, [2, 3, 4], _cfg(), images)
    for n, e in losses.items():
        assert e[2] > e[3] > e[4] > 0, (n, e)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------- through convert
@pytest.mark.parametrize("target", [2.3, 2.7, 3.4])
def test_target_bits_is_held_and_mixes_the_widths(target):
    q = convert(_net(), _images(), _cfg(target_bits=target))
    rep = q.cora_report
    assert rep.equiv_bits <= target
    assert set(rep.widths) == set(rep.quantized)
    assert sorted(set(rep.widths.values())) == [int(target), int(target) + 1]  # the two widths around it, mixed
    assert all(q.get_submodule(n).bits == b for n, b in rep.widths.items())
    assert rep.equiv_bits > target - 0.5  # the target is used, not just respected


def test_target_bits_with_adapters_counts_them_and_a_wide_target_keeps_bits():
    q = convert(_net(), _images(), _cfg(method="uniform", budget=0.1, target_bits=4.4))
    rep = q.cora_report
    assert rep.adapter_fraction > 0 and rep.equiv_bits <= 4.4 and min(rep.widths.values()) < 4
    wide = convert(_net(), _images(), _cfg(target_bits=16.0)).cora_report
    assert set(wide.widths.values()) == {4}
    plain = convert(_net(), _images(), _cfg()).cora_report
    assert set(plain.widths.values()) == {4}


def test_fixed_layers_keep_their_width_and_a_target_too_low_is_refused():
    rep = convert(_net(), _images(), _cfg(target_bits=3.0, layer_bits={"0": 8})).cora_report
    assert rep.widths["0"] == 8 and rep.equiv_bits <= 3.0
    with pytest.raises(ValueError, match="below what this model can store"):
        convert(_net(), _images(), _cfg(target_bits=1.5))


def test_target_bits_config():
    for bad in (0.0, -1.0, float("nan"), float("inf"), True, "3"):
        with pytest.raises(ValueError, match="target_bits"):
            CoRaConfig(target_bits=bad)
    with pytest.raises(ValueError, match="int8"):
        CoRaConfig(target_bits=3.0, adapter_dtype="int8")
    c = CoRaConfig(bits=4, target_bits=2.85)
    assert c.typical_bits == 2 and CoRaConfig(bits=4).typical_bits == 4 and CoRaConfig(bits=3, target_bits=7.0).typical_bits == 3
    assert c.resolved(has_labels=False).tune.loss == "blocks"  # the label-free default of a ~2-bit model
    assert CoRaConfig.from_dict(c.to_dict()) == c


def test_a_mixed_width_model_saves_loads_and_deploys_as_it_computes(tmp_path):
    import cora

    model = _net()
    q = convert(model, _images(), _cfg(target_bits=2.7))
    assert len(set(q.cora_report.widths.values())) == 2
    path = tmp_path / "mixed.safetensors"
    cora.save(q, path)
    back = cora.load(path, model=_net())
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
        assert_close_rel(cora.deploy(back)(x), q(x))
    assert back.cora_report.widths == q.cora_report.widths


def test_the_width_choice_shows_progress(capsys):
    convert(_net(), _images(), _cfg(target_bits=2.7, progress=True))
    err = capsys.readouterr().err
    assert "widths" in err and "widths 4/4" in err  # one step per free layer (three convs and the head)
