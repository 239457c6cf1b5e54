"""Explicit values win: every "auto" of the config is ``"auto"`` or ``None`` and decided by ``resolved``;
a value the user set comes back from ``resolved`` unchanged, or the config is refused with one message."""
from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cora.config import (
    BLOCKS_ITERATIONS, BLOCKS_LR, CONFIG_VERSION, END_TO_END_ITERATIONS, END_TO_END_LR, FLAT_FIELDS, METHODS, SUPPORTED_BITS,
    TUNE_LOSSES, CoRaConfig,
)

_bits = st.sampled_from(SUPPORTED_BITS)
_rate = st.floats(1e-6, 1.0)
# one strategy of explicit (non-"auto") values per field, top level and flat alias; "auto" / None where None
# means "auto" are left out on purpose
EXPLICIT = {
    "bits": _bits,
    "method": st.sampled_from([m for m in METHODS if m != "auto"]),
    "budget": st.floats(1e-4, 1.0),
    "calib_images": st.integers(1, 5000),
    "seed": st.integers(0, 2**31),
    "skip": st.lists(st.sampled_from(["conv1", "layer*.conv2", "fc"]), max_size=3, unique=True).map(tuple),
    "layer_bits": st.lists(st.tuples(st.sampled_from(["conv1", "fc"]), _bits), max_size=2).map(tuple),
    "grouped_bits": st.one_of(st.none(), _bits),  # None: the layer's width, not an "auto"
    "target_bits": st.one_of(st.none(), st.floats(1.0, 16.0)),
    "quantize_linear": st.booleans(),
    "bn_reestimate": st.booleans(),
    "output": st.one_of(st.none(), st.integers(0, 3), st.sampled_from(["logits", "out"])),
    "progress": st.booleans(),
    "version": st.just(CONFIG_VERSION),
    # quantizer
    "granularity": st.sampled_from(["channel", "tensor"]),
    "range_method": st.sampled_from(["mse", "minmax", "std"]),
    "std_k": st.floats(0.5, 10.0),
    "rounding": st.sampled_from(["gptq", "nearest"]),
    "gptq_damp": st.floats(0.0, 1.0),
    "gptq_act_order": st.booleans(),
    "sequential": st.booleans(),
    "stats_images": st.integers(1, 4096),
    "max_stats_features": st.integers(1, 2**20),
    # adapter
    "factorization": st.sampled_from(["activation", "weight"]),
    "refine": st.booleans(),
    "adapter_dtype": st.sampled_from(["float16", "bfloat16", "float32", "int8"]),
    # search
    "loss": st.sampled_from(["kl", "ce"]),
    "budget_mode": st.sampled_from(["project", "penalty"]),
    "optimizer": st.sampled_from(["adam", "sgd"]),
    "iterations": st.integers(1, 1000),
    "batch_size": st.integers(1, 256),
    "lr": _rate,
    "order": st.integers(1, 8),
    "gamma": st.floats(0.0, 10.0),
    "grad_clip": st.floats(0.01, 10.0),
    "rho_init": st.one_of(st.none(), st.floats(0.01, 1.0)),  # None: the uniform start, not an "auto"
    "search_bn": st.sampled_from(["train", "eval"]),
    # tune
    "tune_iterations": st.integers(0, 1000),
    "tune_loss": st.sampled_from(TUNE_LOSSES),
    "tune_lr": _rate,
    "tune_batch_size": st.integers(1, 256),
    "tune_norms": st.booleans(),
}


def test_every_field_has_explicit_values():
    top = {f.name for f in dataclasses.fields(CoRaConfig)} - {"quantizer", "adapter", "search", "tune"}
    assert set(EXPLICIT) == top | set(FLAT_FIELDS)


def _value(config: CoRaConfig, name: str):
    return getattr(config, name)  # top-level fields and flat aliases alike


@settings(max_examples=300, deadline=None)
@given(data=st.data(), has_labels=st.booleans())
def test_an_explicit_value_survives_resolution_or_is_refused(data, has_labels):
    names = data.draw(st.lists(st.sampled_from(sorted(EXPLICIT)), min_size=1, max_size=8, unique=True), label="fields")
    chosen = {name: data.draw(EXPLICIT[name], label=name) for name in names}
    try:
        resolved = CoRaConfig(**chosen).resolved(has_labels)
    except ValueError as e:
        assert str(e) and "\n" not in str(e)  # refused, with one message
        return
    for name, value in chosen.items():
        assert _value(resolved, name) == value, (name, value, _value(resolved, name))
    # and nothing is left to decide
    assert "auto" not in (resolved.method, resolved.search.loss, resolved.tune.loss)
    assert None not in (resolved.tune.iterations, resolved.tune.lr, resolved.adapter.refine)
    assert resolved.resolved(has_labels) == resolved  # resolving twice changes nothing


@pytest.mark.parametrize("name", sorted(EXPLICIT))
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_each_field_alone_survives_resolution(name, data):
    value = data.draw(EXPLICIT[name], label=name)
    for has_labels in (True, False):
        try:
            resolved = CoRaConfig(**{name: value}).resolved(has_labels)
        except ValueError:
            continue
        assert _value(resolved, name) == value


def test_the_overrides_that_were_silent():
    """The cases the review found: label-free at <= 3 bits an explicit 250 steps (or lr 1e-3) became the
    blocks' 100 (3e-3); label-free above 3 bits explicit steps were turned off. Now they stay."""
    r = CoRaConfig(bits=3, tune_iterations=END_TO_END_ITERATIONS).resolved(False)
    assert (r.tune.loss, r.tune.iterations, r.tune.lr) == ("blocks", END_TO_END_ITERATIONS, BLOCKS_LR)
    r = CoRaConfig(bits=3, tune_lr=END_TO_END_LR).resolved(False)
    assert (r.tune.iterations, r.tune.lr) == (BLOCKS_ITERATIONS, END_TO_END_LR)
    r = CoRaConfig(bits=4, tune_iterations=50).resolved(False)
    assert (r.tune.loss, r.tune.iterations) == ("blocks", 50)
    assert CoRaConfig(bits=4).resolved(False).tune.iterations == 0  # left to auto: still off above 3 bits
    # refine with weight-space adapters was silently not done; now refused, and auto follows the factorization
    with pytest.raises(ValueError, match="refine=True .* factorization='activation'"):
        CoRaConfig(factorization="weight", refine=True)
    assert CoRaConfig(factorization="weight").resolved(True).adapter.refine is False
    assert CoRaConfig().resolved(True).adapter.refine is True


def test_auto_values_are_auto_until_resolved():
    c = CoRaConfig()
    assert (c.tune.iterations, c.tune.lr, c.adapter.refine) == (None, None, None)
    assert (c.method, c.search.loss, c.tune.loss, c.quantizer.range_method) == ("auto",) * 4
    r = CoRaConfig(tune_loss="blocks").resolved(False)
    assert (r.tune.iterations, r.tune.lr) == (BLOCKS_ITERATIONS, BLOCKS_LR)
    r = CoRaConfig(tune_loss="kl").resolved(False)
    assert (r.tune.iterations, r.tune.lr) == (END_TO_END_ITERATIONS, END_TO_END_LR)


def test_from_dict_records_what_was_done_with_refine_and_weight_adapters():
    d = CoRaConfig(factorization="weight", refine=False).to_dict()
    d["adapter"]["refine"] = True  # what a checkpoint of a conversion with factorization='weight' recorded
    assert CoRaConfig.from_dict(d).adapter.refine is False
