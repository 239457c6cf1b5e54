"""Launch configurations, the untimed choice, the tuning cache and its JSON files, the selection policy."""
import json
import random
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import cora_kernels
from cora_kernels import tuning
from cora_kernels.geometry import ConvGeometry
from cora_kernels.tuning import (
    CONV_CONFIGS,
    FALLBACK_CONFIG,
    FP32_CONFIGS,
    INTERPRETER_CONFIG,
    REDUCE_CONFIG,
    ConvConfig,
    TuneChoice,
    TuneKey,
    TuningCache,
    autotune_enabled,
    choose_split_k,
    config_named,
    prune_configs,
    untimed_config,
)

ALL = list(CONV_CONFIGS) + [FALLBACK_CONFIG] + list(FP32_CONFIGS) + [INTERPRETER_CONFIG, REDUCE_CONFIG]


# --- the configs -----------------------------------------------------------------------------------

def test_config_tables_unchanged():
    """The tuned candidates, in order, with their tiles (names are labels; the tiles are what runs)."""
    got = [(c.name, c.BLOCK_M, c.BLOCK_N, c.BLOCK_K, c.num_warps, c.num_stages, c.GROUP_M) for c in CONV_CONFIGS]
    assert got == [
        ("large_m_large_n", 128, 128, 64, 8, 3, 8),
        ("large_m_64n", 128, 64, 64, 8, 3, 8),
        ("mid_m_large_n", 64, 128, 64, 8, 3, 8),
        ("mid_m_64n", 64, 64, 64, 4, 4, 8),
        ("small_m", 32, 64, 128, 4, 4, 8),
        ("small_m_wide_rank", 32, 64, 64, 4, 4, 8),
        ("tiny_cin", 64, 32, 32, 4, 4, 8),
    ]
    assert str(FALLBACK_CONFIG) == "32x64x32_w4_s2" and FP32_CONFIGS[0] is FALLBACK_CONFIG
    assert [str(c) for c in FP32_CONFIGS[1:]] == ["64x64x32_w4_s2", "128x64x32_w8_s3"]
    assert str(INTERPRETER_CONFIG) == "32x32x32_w4_s1" and str(REDUCE_CONFIG) == "64x64x32_w4_s1"


def test_config_names_unique_and_lookup():
    by_name = {}
    for c in ALL:
        assert by_name.setdefault(c.name, c) is c, f"two configs named {c.name}"
    assert len(by_name) == len(CONV_CONFIGS) + 1 + 2 + 2
    for name, c in by_name.items():
        assert config_named(name) is c
    with pytest.raises(KeyError, match="small_m"):  # the message lists the known names
        config_named("huge")


# untimed_config picks by name what the index-based heuristic picked: CONV_CONFIGS[6] for C_in < 32,
# [4] / [5] for M <= 1024 (r_pad <= 16 / > 16), [1] for C_out <= 64, else [0]; FALLBACK for r_pad >= 128
# or fp32.
UNTIMED = [
    # (M, C_in, C_out, r_pad, elem_bytes) -> name
    ((12544, 3, 64, 16, 2), "tiny_cin"),
    ((50, 31, 512, 0, 2), "tiny_cin"),
    ((49, 512, 512, 16, 2), "small_m"),
    ((1024, 64, 64, 0, 2), "small_m"),
    ((196, 256, 256, 32, 2), "small_m_wide_rank"),
    ((1024, 32, 128, 64, 2), "small_m_wide_rank"),
    ((1025, 64, 64, 16, 2), "large_m_64n"),
    ((200704, 64, 64, 32, 2), "large_m_64n"),
    ((1025, 64, 65, 16, 2), "large_m_large_n"),
    ((50176, 128, 128, 0, 2), "large_m_large_n"),
    ((50176, 128, 128, 128, 2), "fallback"),
    ((49, 3, 64, 256, 2), "fallback"),
    ((50176, 128, 128, 16, 4), "fallback"),
    ((49, 512, 512, 0, 4), "fallback"),
]


@pytest.mark.parametrize("shape, name", UNTIMED, ids=lambda v: str(v))
def test_untimed_config_choices(shape, name):
    M, c_in, c_out, r_pad, elem = shape
    assert untimed_config(M=M, C_in=c_in, C_out=c_out, r_pad=r_pad, elem_bytes=elem) is config_named(name)


def test_prune_configs_never_empty():
    kw = dict(M=49, C_in=512, C_out=512, r_pad=16)
    assert prune_configs([], **kw) == [untimed_config(**kw)]
    assert prune_configs(CONV_CONFIGS, **kw, elem_bytes=4) == list(FP32_CONFIGS)
    unaligned = prune_configs(CONV_CONFIGS, M=4096, C_in=257, C_out=256, r_pad=16, aligned=False)
    assert unaligned and all(c.BLOCK_K <= 64 for c in unaligned)


@pytest.mark.parametrize("M, c_out", [(49, 512), (1024, 64), (65536, 512), (65536, 64)])
def test_int8_adapters_never_get_a_spilling_config(M, c_out):
    kw = dict(M=M, C_in=256, C_out=c_out, r_pad=16, int8_adapter=True)
    assert not {c.name for c in prune_configs(CONV_CONFIGS, **kw)} & set(tuning.INT8_ADAPTER_SPILLS)
    assert untimed_config(**kw).name not in tuning.INT8_ADAPTER_SPILLS
    float_names = {c.name for c in prune_configs(CONV_CONFIGS, **{**kw, "int8_adapter": False})}
    assert {c.name for c in prune_configs(CONV_CONFIGS, **kw)} == float_names - set(tuning.INT8_ADAPTER_SPILLS) or \
        float_names <= set(tuning.INT8_ADAPTER_SPILLS)


def test_key_without_int8_field_reads_as_float_adapter():
    key = _random_key(random.Random(int(torch.randint(0, 2**31 - 1, ()))))
    doc = key.to_json()
    del doc["int8_adapter"]  # a cache saved before the field existed
    assert TuneKey.from_json(doc) == replace(key, int8_adapter=False)


# --- the cache and its files ---------------------------------------------------------------------

def _random_key(rng: random.Random) -> TuneKey:
    p = lambda lo, hi: (rng.randint(lo, hi), rng.randint(lo, hi))  # noqa: E731
    return TuneKey(C_in=rng.randint(1, 2048), C_out=rng.randint(1, 2048), KH=rng.randint(1, 7), KW=rng.randint(1, 7),
                   stride=p(1, 3), dilation=p(1, 3), padding=p(0, 3), bits=rng.choice([2, 3, 4, 8, 16]),
                   r_pad=rng.choice([0, 16, 32, 64, 128]), dtype=rng.choice(["float16", "bfloat16", "float32"]),
                   m_bucket=2 ** rng.randint(0, 20), has_residual=rng.random() < 0.5,
                   device=rng.choice(["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB", "NVIDIA H200"]),
                   aligned=rng.random() < 0.5, int8_adapter=rng.random() < 0.5)


def _random_choices(n):
    rng = random.Random(torch.randint(0, 2**31 - 1, ()).item())  # fresh each run
    out = {}
    while len(out) < n:
        out[_random_key(rng)] = TuneChoice(rng.choice(ALL), rng.randint(1, 16))
    return out


def test_cache_json_round_trip(tmp_path):
    choices = _random_choices(25)
    cache = TuningCache()
    for k, c in choices.items():
        cache.put(k, c)
    assert len(cache) == 25
    path = tmp_path / "tuned.json"
    cache.save(path)
    doc = json.loads(path.read_text())
    assert doc["version"] == tuning.TUNING_FORMAT_VERSION and len(doc["entries"]) == 25
    assert set(doc["entries"][0]) == {"key", "config", "split_k"} and isinstance(doc["entries"][0]["config"], str)
    back = TuningCache()
    assert back.load(path) == 25
    assert len(back) == 25
    for k, c in choices.items():
        got = back.get(k)
        assert got == c and got.config is config_named(c.config.name)
    assert back.get(replace(next(iter(choices)), C_in=99999)) is None
    back.clear()
    assert len(back) == 0


def test_cache_load_merges(tmp_path):
    a, b = list(_random_choices(2).items())
    cache = TuningCache()
    cache.put(*a)
    other = TuningCache()
    other.put(*b)
    other.put(a[0], TuneChoice(config_named("tiny_cin"), 7))  # the file wins for a key held twice
    other.save(tmp_path / "t.json")
    cache.load(tmp_path / "t.json")
    assert len(cache) == 2
    assert cache.get(b[0]) == b[1]
    assert cache.get(a[0]) == TuneChoice(config_named("tiny_cin"), 7)


def test_save_and_load_tuning_helpers(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "TUNING_CACHE", TuningCache())
    choices = _random_choices(3)
    for k, c in choices.items():
        tuning.TUNING_CACHE.put(k, c)
    cora_kernels.save_tuning(tmp_path / "t.json")
    tuning.TUNING_CACHE.clear()
    assert cora_kernels.load_tuning(tmp_path / "t.json") == 3
    assert {k: tuning.TUNING_CACHE.get(k) for k in choices} == choices


def _good_doc():
    k, c = next(iter(_random_choices(1).items()))
    return {"format": "cora-kernels-tuning", "version": 1,
            "entries": [{"key": k.to_json(), "config": c.config.name, "split_k": c.split_k}]}


def _set(path, *keys):
    def edit(doc):
        d = doc
        for k in path[:-1]:
            d = d[k]
        if keys and keys[0] is _DEL:
            del d[path[-1]]
        else:
            d[path[-1]] = keys[0]
        return doc
    return edit


_DEL = object()

BAD = [
    ("not json", "{not json", "not a JSON file"),
    ("a list", "[]", "not a cora_kernels tuning file"),
    ("no format", _set(["format"], _DEL), "not a cora_kernels tuning file"),
    ("other format", _set(["format"], "something-else"), "not a cora_kernels tuning file"),
    ("future version", _set(["version"], 2), "version 2"),
    ("no version", _set(["version"], _DEL), "version None"),
    ("entries not a list", _set(["entries"], {}), "entries"),
    ("entry not an object", _set(["entries", 0], [1, 2]), "entry 0"),
    ("entry without split_k", _set(["entries", 0, "split_k"], _DEL), "split_k"),
    ("unknown config", _set(["entries", 0, "config"], "256x256_huge"), "unknown config name '256x256_huge'"),
    ("split_k zero", _set(["entries", 0, "split_k"], 0), "split_k must be a positive int"),
    ("split_k string", _set(["entries", 0, "split_k"], "2"), "split_k must be a positive int"),
    ("split_k bool", _set(["entries", 0, "split_k"], True), "split_k must be a positive int"),
    ("key missing field", _set(["entries", 0, "key", "m_bucket"], _DEL), r"missing \['m_bucket'\]"),
    ("key extra field", _set(["entries", 0, "key", "colour"], "red"), r"unknown \['colour'\]"),
    ("key not an object", _set(["entries", 0, "key"], "C_in=3"), "key must be a JSON object"),
    ("stride of 3", _set(["entries", 0, "key", "stride"], [1, 1, 1]), "'stride'"),
    ("bool as int", _set(["entries", 0, "key", "C_in"], True), "'C_in'"),
    ("float as int", _set(["entries", 0, "key", "KH"], 3.0), "'KH'"),
    ("dtype not a string", _set(["entries", 0, "key", "dtype"], 16), "'dtype'"),
    ("flag not a bool", _set(["entries", 0, "key", "aligned"], 1), "'aligned'"),
]


@pytest.mark.parametrize("name, edit, msg", BAD, ids=[b[0] for b in BAD])
def test_bad_files_rejected(tmp_path, name, edit, msg):
    path = tmp_path / "bad.json"
    path.write_text(edit if isinstance(edit, str) else json.dumps(edit(_good_doc())))
    cache = TuningCache()
    held = next(iter(_random_choices(1).items()))
    cache.put(*held)
    with pytest.raises(ValueError, match=msg):
        cache.load(path)
    assert len(cache) == 1 and cache.get(held[0]) == held[1]  # unchanged


def test_good_doc_loads(tmp_path):  # the base of the bad-file cases is itself valid
    path = tmp_path / "good.json"
    path.write_text(json.dumps(_good_doc()))
    assert TuningCache().load(path) == 1


# --- the policy ----------------------------------------------------------------------------------

@pytest.mark.parametrize("env, on", [(None, True), ("1", True), ("", True), ("yes", True), ("0", False)])
def test_autotune_enabled(monkeypatch, env, on):
    if env is None:
        monkeypatch.delenv("CORA_AUTOTUNE", raising=False)
    else:
        monkeypatch.setenv("CORA_AUTOTUNE", env)
    assert autotune_enabled() is on


def _geom(N=4, C_in=64, C_out=64, OH=28, OW=28, KH=3, KW=3):
    return ConvGeometry(N=N, C_in=C_in, H=OH, W=OW, C_out=C_out, KH=KH, KW=KW, stride=(1, 1), padding=(1, 1),
                        dilation=(1, 1), OH=OH, OW=OW, K=KH * KW * C_in, rank=3, groups=1)


def _key(g, r_pad=16):
    return TuneKey(C_in=g.C_in, C_out=g.C_out, KH=g.KH, KW=g.KW, stride=g.stride, dilation=g.dilation,
                   padding=g.padding, bits=4, r_pad=r_pad, dtype="float16", m_bucket=4096, has_residual=False,
                   device="Fake GPU", aligned=True)


def test_select_config_interpreter_or_cpu(monkeypatch):
    cache = TuningCache()
    monkeypatch.setattr(tuning, "TUNING_CACHE", cache)
    g = _geom()

    def never(cfg, split):
        raise AssertionError("nothing is timed here")

    monkeypatch.setattr(tuning, "is_interpreting", lambda: False)
    assert tuning.select_config(_key(g), g, 16, 2, never, torch.device("cpu")) == TuneChoice(INTERPRETER_CONFIG, 1)
    monkeypatch.setattr(tuning, "is_interpreting", lambda: True)
    assert tuning.select_config(_key(g), g, 16, 2, never, torch.device("cuda")) == TuneChoice(INTERPRETER_CONFIG, 1)
    assert len(cache) == 0


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device as select_config sees it (capability 9.0, 132 SMs) and a do_bench that calls the
    candidate once and reports the time ``fake_gpu.times`` gives for ``(config name, split)``."""
    import triton.testing

    state = SimpleNamespace(times={}, timed=[], capturing=False, cache=TuningCache())
    monkeypatch.setattr(tuning, "is_interpreting", lambda: False)
    monkeypatch.setattr(tuning, "TUNING_CACHE", state.cache)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: SimpleNamespace(multi_processor_count=132))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state.capturing)
    monkeypatch.delenv("CORA_AUTOTUNE", raising=False)

    def do_bench(fn, warmup=25, rep=100, **kw):
        cfg, split = fn()
        state.timed.append((cfg.name, split))
        t = state.times.get((cfg.name, split), 1.0)
        if t is None:
            raise RuntimeError("out of resources")
        return t

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    return state


def test_select_config_times_pruned_candidates_and_caches(fake_gpu):
    g = _geom(N=1, C_in=256, C_out=256, OH=14, OW=14)
    key = _key(g)
    cands = prune_configs(CONV_CONFIGS, M=g.M, C_in=g.C_in, C_out=g.C_out, r_pad=16, elem_bytes=2,
                          capability_major=9, aligned=True)
    want = []
    for c in cands:
        split = choose_split_k(M=g.M, C_out=g.C_out, steps=g.KH * g.KW * -(-g.C_in // c.BLOCK_K), cfg=c, n_sm=132)
        want += [(c.name, s) for s in sorted({1, split})]
    assert any(s > 1 for _, s in want)  # a small-M shape: split-K candidates are timed too
    fastest = want[-1]
    fake_gpu.times = {want[0]: None, fastest: 0.5}  # the first candidate fails: skipped
    choice = tuning.select_config(key, g, 16, 2, lambda cfg, split: (cfg, split), torch.device("cuda"))
    assert fake_gpu.timed == want
    assert (choice.config.name, choice.split_k) == fastest
    assert fake_gpu.cache.get(key) == choice
    fake_gpu.timed.clear()
    assert tuning.select_config(key, g, 16, 2, lambda cfg, split: (cfg, split), torch.device("cuda")) == choice
    assert fake_gpu.timed == []  # cached: not timed again


def test_select_config_untimed_when_disabled_or_capturing(fake_gpu, monkeypatch):
    g = _geom(N=1, C_in=512, C_out=512, OH=7, OW=7)
    cfg = untimed_config(M=g.M, C_in=g.C_in, C_out=g.C_out, r_pad=16, elem_bytes=2)
    assert cfg.name == "small_m"
    split = choose_split_k(M=g.M, C_out=g.C_out, steps=9 * 4, cfg=cfg, n_sm=132)
    monkeypatch.setenv("CORA_AUTOTUNE", "0")
    choice = tuning.select_config(_key(g), g, 16, 2, lambda c, s: (c, s), torch.device("cuda"))
    assert choice == TuneChoice(cfg, split) and split > 1
    monkeypatch.delenv("CORA_AUTOTUNE")
    fake_gpu.capturing = True
    assert tuning.select_config(_key(g), g, 16, 2, lambda c, s: (c, s), torch.device("cuda")) == choice
    assert fake_gpu.timed == [] and len(fake_gpu.cache) == 0  # untimed choices are not cached
    loaded = TuneChoice(config_named("mid_m_64n"), 3)
    fake_gpu.cache.put(_key(g), loaded)  # e.g. from load_tuning: used even during capture
    assert tuning.select_config(_key(g), g, 16, 2, lambda c, s: (c, s), torch.device("cuda")) == loaded


def test_all_candidates_fail_falls_back_to_untimed(fake_gpu):
    g = _geom(N=8, C_in=3, C_out=64, OH=112, OW=112, KH=7, KW=7)
    key = replace(_key(g), aligned=False)
    fake_gpu.times = {(c.name, s): None for c in ALL for s in range(1, 17)}
    choice = tuning.select_config(key, g, 16, 2, lambda c, s: (c, s), torch.device("cuda"))
    assert choice == TuneChoice(config_named("tiny_cin"), 1) and fake_gpu.timed
    assert fake_gpu.cache.get(key) == choice


def test_launcher_key_and_tuner_wiring(monkeypatch):
    """cora_conv2d_triton builds the TuneKey the tuner sees and launches with its choice."""
    import cora_kernels.conv_fused as cf
    from cora_kernels.testing import Case, random_layer

    seen = []
    real_select = tuning.select_config

    def spy(key, g, r_pad, elem, time_candidate, device):
        seen.append((key, r_pad, elem))
        return real_select(key, g, r_pad, elem, time_candidate, device)

    monkeypatch.setattr(tuning, "select_config", spy)
    c = Case(N=1, C_in=8, C_out=6, H=5, W=5, bits=3, rank=2, dtype=torch.float16, res=True)
    args, kw = random_layer(c, device="cpu")
    cf.cora_conv2d_triton(*args, **kw)
    key, r_pad, elem = seen[0]
    assert key == TuneKey(C_in=8, C_out=6, KH=3, KW=3, stride=(1, 1), dilation=(1, 1), padding=(1, 1), bits=3,
                          r_pad=16, dtype="float16", m_bucket=32, has_residual=True, device="cpu", aligned=False)
    assert (r_pad, elem) == (16, 2)
    cf.cora_conv2d_triton(*args, **kw, config=config_named("mid_m_64n"), split_k=2)  # hooks bypass the tuner
    assert len(seen) == 1


def test_conv_config_is_frozen_and_named():
    c = ConvConfig("x", 32, 32, 32, 4, 2)
    assert c.GROUP_M == 8 and c.as_meta() == {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8}
    with pytest.raises(Exception):
        c.name = "y"
