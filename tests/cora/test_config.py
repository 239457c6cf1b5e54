"""The configuration (cora/config.py): sections, flat aliases, validation, versioned dicts, method names."""
from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cora import AdapterConfig, CoRaConfig, QuantizerConfig, SearchConfig, TuneConfig
from cora.config import (
    CONFIG_VERSION, DEPRECATED_METHODS, FLAT_FIELDS, LABEL_FREE_BLOCKS_MAX_BITS, LABELLED_BLOCKS_MAX_BITS, LAYER_DEFAULTS,
    METHODS, SUPPORTED_BITS, TWO_BIT_MSE_MIN_BUDGET,
)
from cora_kernels.packing import SUPPORTED_BITS as PACKED_BITS


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("budget", [0.0, -0.1, 1.5, float("nan"), True])
def test_bad_budget_raises(budget):
    with pytest.raises(ValueError, match="budget"):
        CoRaConfig(budget=budget)


@pytest.mark.parametrize("field,value", [
    ("bits", 5), ("bits", True), ("method", "svd"), ("loss", "mse"), ("iterations", 0), ("iterations", 2.0),
    ("calib_images", 0), ("layer_bits", (("conv1", 6),)),
    ("grouped_bits", 5), ("grouped_bits", True), ("order", 0), ("gamma", float("nan")),
    ("grad_clip", float("nan")), ("gptq_damp", -1.0), ("rho_init", 1.5), ("refine", "no"), ("progress", 1),
    ("adapter_dtype", "int4"), ("adapter_dtype", "float8"), ("tune_iterations", -1), ("tune_lr", 0.0), ("version", 1),
])
def test_bad_config_raises(field, value):
    with pytest.raises(ValueError, match="invalid CoRaConfig"):
        CoRaConfig(**{field: value})


def test_unknown_field_and_bad_section_raise():
    with pytest.raises(TypeError, match="unknown field"):
        CoRaConfig(iteration=3)
    with pytest.raises(ValueError, match="SearchConfig"):
        CoRaConfig(search=TuneConfig())


# ---------------------------------------------------------------------------------- sections and aliases
def test_sections_hold_the_defaults():
    c = CoRaConfig()
    assert c.quantizer == QuantizerConfig() and c.adapter == AdapterConfig()
    assert c.search == SearchConfig() and c.tune == TuneConfig()
    assert c.version == CONFIG_VERSION and c.method == "auto" and c.bits == 4


# a valid value other than the default, for every flat alias
ALTERNATIVES = {
    "granularity": "tensor", "range_method": "std", "std_k": 3.0, "rounding": "nearest", "gptq_damp": 0.1,
    "gptq_act_order": False, "sequential": False, "stats_images": 64, "max_stats_features": 100, "factorization": "weight",
    "refine": False,
    "adapter_dtype": "float32", "loss": "kl", "budget_mode": "penalty", "optimizer": "sgd", "iterations": 7,
    "batch_size": 8, "lr": 0.5, "order": 2, "gamma": 2.0, "grad_clip": 0.5, "rho_init": None, "search_bn": "eval",
    "tune_iterations": 3, "tune_loss": "ce", "tune_lr": 0.1, "tune_batch_size": 8, "tune_norms": False,
}


def test_alternatives_cover_every_alias():
    assert set(ALTERNATIVES) == set(FLAT_FIELDS)


@pytest.mark.parametrize("flat", sorted(FLAT_FIELDS))
def test_every_flat_alias_sets_and_reads_its_section(flat):
    section, name = FLAT_FIELDS[flat]
    default = getattr(getattr(CoRaConfig(), section), name)
    value = ALTERNATIVES[flat]
    assert value != default
    c = CoRaConfig(**{flat: value})
    assert getattr(getattr(c, section), name) == value
    assert getattr(c, flat) == value  # flat read
    assert c != CoRaConfig() and c.replace(**{flat: default}) == CoRaConfig()


def test_sections_as_objects_or_dicts_and_flat_on_top():
    a = CoRaConfig(search=SearchConfig(iterations=7), tune={"iterations": 0})
    assert a.search.iterations == 7 and a.tune.iterations == 0
    b = CoRaConfig(search=SearchConfig(iterations=7, lr=0.5), iterations=9)  # the flat keyword wins
    assert b.search.iterations == 9 and b.search.lr == 0.5


def test_frozen_and_hashable():
    c = CoRaConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.bits = 3
    assert hash(c) == hash(CoRaConfig()) and c == CoRaConfig()


def test_skip_and_layer_bits_normalised():
    c = CoRaConfig(skip=["conv1"], layer_bits=[["fc", 8]])
    assert c.skip == ("conv1",) and c.layer_bits == (("fc", 8),)


# ---------------------------------------------------------------------------------- one source of facts
def test_supported_bits_come_from_the_packed_format():
    assert SUPPORTED_BITS is PACKED_BITS
    for b in PACKED_BITS:
        assert CoRaConfig(bits=b).bits == b


def test_layer_defaults_documented_against_the_config():
    """from_conv's data-free defaults: what is shared is the config's, what differs is said in LayerDefaults."""
    c = CoRaConfig()
    assert LAYER_DEFAULTS.std_k == c.quantizer.std_k and LAYER_DEFAULTS.adapter_dtype == c.adapter.dtype
    assert LAYER_DEFAULTS.per_channel == (c.quantizer.granularity == "channel")
    assert (LAYER_DEFAULTS.range_method, LAYER_DEFAULTS.factorization) == ("minmax", "weight")
    assert "calibration data" in type(LAYER_DEFAULTS).__doc__


# ---------------------------------------------------------------------------------- method names
@pytest.mark.parametrize("old,new", sorted(DEPRECATED_METHODS.items()))
def test_old_method_names_warn_and_map(old, new):
    with pytest.warns(DeprecationWarning, match=new):
        c = CoRaConfig(method=old)
    assert c.method == new and c.method in METHODS


def test_new_method_names_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for m in METHODS:
            CoRaConfig(method=m).replace(bits=3)


# ---------------------------------------------------------------------------------- resolution
def test_resolved_choices_and_label_checks():
    c = CoRaConfig()
    assert (c.resolved(True).method, c.resolved(True).search.loss, c.resolved(True).tune.loss) == ("search", "ce", "ce")
    for bits in SUPPORTED_BITS:  # labelled: the block reconstruction before the cross-entropy at 2 bits only
        r = CoRaConfig(bits=bits).resolved(True)
        assert r.tune.loss == ("blocks+ce" if bits <= LABELLED_BLOCKS_MAX_BITS else "ce"), bits
        assert (r.tune.iterations, r.tune.lr) == (250, 1e-3)  # the ce phase's; the blocks phase has its own
    r = c.resolved(False)
    assert (r.method, r.search.loss, r.tune.loss, r.tune.iterations) == ("uniform", "kl", "kl", 0)
    for bits in SUPPORTED_BITS:  # label-free: block reconstruction up to 3 bits (what the held-back images chose)
        r = CoRaConfig(bits=bits).resolved(False)
        want = ("blocks", 100, 3e-3) if bits <= LABEL_FREE_BLOCKS_MAX_BITS else ("kl", 0, 1e-3)
        assert (r.tune.loss, r.tune.iterations, r.tune.lr) == want, bits
    explicit = CoRaConfig(bits=2, tune_iterations=7).resolved(False)  # a user's own steps stay; the rate is the loss's
    assert (explicit.tune.loss, explicit.tune.iterations, explicit.tune.lr) == ("blocks", 7, 3e-3)
    with pytest.raises(ValueError, match="loss='ce' needs labelled"):
        CoRaConfig(method="search", loss="ce").resolved(False)
    with pytest.raises(ValueError, match="tune_loss='ce' needs labelled"):
        CoRaConfig(tune_loss="ce").resolved(False)
    with pytest.raises(ValueError, match="tune_loss='blocks\\+ce' needs labelled"):
        CoRaConfig(tune_loss="blocks+ce").resolved(False)
    # no adapters: the tuning loss does not matter
    assert CoRaConfig(method="none", tune_loss="ce").resolved(False).method == "none"
    # auto search without labels becomes uniform, so an explicit CE search loss is not an error
    assert CoRaConfig(loss="ce").resolved(False).method == "uniform"


# ---------------------------------------------------------------------------------- dicts
_config_fields = dict(
    bits=st.sampled_from(SUPPORTED_BITS),
    method=st.sampled_from(METHODS),
    budget=st.floats(1e-4, 1.0),
    seed=st.integers(0, 2**31),
    skip=st.lists(st.sampled_from(["conv1", "layer*.conv2", "fc"]), max_size=3).map(tuple),
    layer_bits=st.lists(st.tuples(st.sampled_from(["conv1", "fc"]), st.sampled_from(SUPPORTED_BITS)), max_size=2).map(tuple),
    grouped_bits=st.one_of(st.none(), st.sampled_from(SUPPORTED_BITS)),
    iterations=st.integers(1, 500),
    rho_init=st.one_of(st.none(), st.floats(0.01, 1.0)),
    tune_loss=st.sampled_from(["auto", "kl", "ce"]),
    tune_lr=st.floats(1e-6, 1.0),
    range_method=st.sampled_from(["mse", "minmax", "std"]),
)
# target_bits is refused with int8 adapters: float adapters with or without a target, int8 ones without
configs = st.one_of(
    st.builds(CoRaConfig, **_config_fields, target_bits=st.one_of(st.none(), st.floats(1.0, 16.0)),
              adapter_dtype=st.sampled_from(["float16", "bfloat16", "float32"])),
    st.builds(CoRaConfig, **_config_fields, adapter_dtype=st.just("int8")),
)


@settings(max_examples=60, deadline=None)
@given(config=configs)
def test_to_dict_from_dict_round_trip_through_json(config):
    d = json.loads(json.dumps(config.to_dict()))
    assert d["version"] == CONFIG_VERSION
    assert CoRaConfig.from_dict(d) == config


def test_from_dict_reads_version_1_flat_dicts():
    """What cora 0.1.0 wrote into checkpoints and result files (flat, old method names) still loads."""
    old = {"bits": 3, "method": "heuristic", "budget": 0.05, "granularity": "channel", "range_method": "mse", "std_k": 5.0,
           "rounding": "gptq", "gptq_damp": 0.01, "gptq_act_order": True, "factorization": "activation", "sequential": True,
           "refine": True, "loss": "kl", "budget_mode": "project", "optimizer": "adam", "iterations": 250, "batch_size": 32,
           "lr": 0.01, "order": 4, "gamma": 1.0, "grad_clip": 0.2, "rho_init": 0.9, "search_bn": "train",
           "tune_iterations": 0, "tune_loss": "kl", "tune_lr": 0.001, "tune_batch_size": 64, "bn_reestimate": False,
           "calib_images": 1600, "stats_images": 512, "seed": 0, "skip": [], "layer_bits": [["fc", 8]],
           "quantize_linear": True, "adapter_dtype": "float16", "progress": True}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # old files load without a warning
        c = CoRaConfig.from_dict(old)
    assert c == CoRaConfig(bits=3, method="uniform", loss="kl", tune_iterations=0, tune_loss="kl", layer_bits=(("fc", 8),),
                           range_method="mse", refine=True,
                           tune_lr=1e-3)  # what old files recorded stays (the default is now auto)


def test_from_dict_of_a_config_written_before_norms_were_tuned_says_they_were_not():
    d = CoRaConfig(bits=2).to_dict()
    assert d["tune"]["norms"] is True
    del d["tune"]["norms"]  # what a checkpoint written before TuneConfig.norms holds
    assert CoRaConfig.from_dict(d).tune.norms is False
    assert CoRaConfig(tune_norms=False).tune.norms is False  # the flat alias
    with pytest.raises((TypeError, ValueError), match="tune_norms"):
        CoRaConfig(tune_norms="yes")


def test_from_dict_rejects_unknown_versions_and_fields():
    with pytest.raises(ValueError, match="version"):
        CoRaConfig.from_dict({"version": 99})
    with pytest.raises(TypeError, match="unknown field"):
        CoRaConfig.from_dict({"version": CONFIG_VERSION, "colour": "red"})
    with pytest.raises(TypeError, match="dict"):
        CoRaConfig.from_dict("bits=4")


def test_paper_recipe():
    p = CoRaConfig.paper(3)
    q = p.quantizer
    assert (p.bits, p.method, q.granularity, q.range_method, q.rounding) == (3, "search", "tensor", "std", "nearest")
    assert (p.adapter.factorization, p.adapter.refine) == ("weight", False)
    assert (p.search.loss, p.search.budget_mode, p.tune.iterations) == ("ce", "penalty", 0)
    assert CoRaConfig.paper(4, iterations=10).search.iterations == 10


def test_copy_and_pickle_round_trip():
    import copy
    import pickle

    c = CoRaConfig(bits=3, iterations=7, tune_loss="kl", skip=("fc",))
    assert copy.deepcopy(c) == c and pickle.loads(pickle.dumps(c)) == c
    assert pickle.loads(pickle.dumps(c)).iterations == 7


def test_auto_range_is_minmax_for_2_bit_gptq_below_the_adapter_budget_threshold_only():
    q = QuantizerConfig()
    assert q.range_method == "auto"
    assert [q.range_for(b, adapter_budget=0.0) for b in (2, 3, 4, 8)] == ["minmax", "mse", "mse", "mse"]
    assert [q.range_for(b, adapter_budget=0.025) for b in (2, 3, 4, 8)] == ["minmax", "mse", "mse", "mse"]
    assert [q.range_for(b, adapter_budget=TWO_BIT_MSE_MIN_BUDGET) for b in (2, 3, 4, 8)] == ["mse"] * 4
    assert [q.range_for(b) for b in (2, 3, 4, 8)] == ["mse"] * 4
    assert QuantizerConfig(rounding="nearest").range_for(2, adapter_budget=0.0) == "mse"
    assert QuantizerConfig(range_method="std").range_for(2, adapter_budget=0.0) == "std"  # an explicit choice is kept
