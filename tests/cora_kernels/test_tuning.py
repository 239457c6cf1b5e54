"""Launch configurations, the untimed choice, the tuning cache and its JSON files, the selection policy."""
import json
import random
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import cora_kernels
from cora_kernels import cost_model, tuning
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
        dequant = rng.random() < 0.3
        out[_random_key(rng)] = tuning.DEQUANT_CHOICE if dequant else TuneChoice(rng.choice(ALL), rng.randint(1, 16))
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
    assert all(set(e) == {"key", "strategy", "config", "split_k"} for e in doc["entries"])
    assert all(isinstance(e["config"], str) == (e["strategy"] == "fused") for e in doc["entries"])
    back = TuningCache()
    assert back.load(path) == 25
    assert len(back) == 25
    for k, c in choices.items():
        got = back.get(k)
        assert got == c and (got.config is None if c.strategy == "dequant" else got.config is config_named(c.config.name))
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
    k = next(iter(_random_choices(1)))
    return {"format": "cora-kernels-tuning", "version": 2,
            "entries": [{"key": k.to_json(), "strategy": "fused", "config": "small_m", "split_k": 3}]}


def test_version_1_files_read_as_fused(tmp_path):
    k = next(iter(_random_choices(1)))
    doc = {"format": "cora-kernels-tuning", "version": 1,
           "entries": [{"key": k.to_json(), "config": "mid_m_64n", "split_k": 2}]}
    (tmp_path / "v1.json").write_text(json.dumps(doc))
    cache = TuningCache()
    assert cache.load(tmp_path / "v1.json") == 1
    assert cache.get(k) == TuneChoice(config_named("mid_m_64n"), 2, "fused")


def test_choice_validates_strategy():
    with pytest.raises(ValueError, match="strategy must be one of"):
        TuneChoice(config_named("small_m"), 1, "vendor")
    with pytest.raises(ValueError, match="needs a config"):
        TuneChoice(None, 1, "fused")
    with pytest.raises(ValueError, match="has none"):
        TuneChoice(config_named("small_m"), 1, "dequant")


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
    ("future version", _set(["version"], 3), "version 3"),
    ("v2 entry without strategy", _set(["entries", 0, "strategy"], _DEL), "fields"),
    ("unknown strategy", _set(["entries", 0, "strategy"], "cudnn"), "unknown strategy 'cudnn'"),
    ("dequant with a config", _set(["entries", 0, "strategy"], "dequant"), "config\": null"),
    ("fused without a config", _set(["entries", 0, "config"], None), "unknown config name None"),
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
    candidate once and reports the time ``fake_gpu.times`` gives for ``(config name, split)`` or
    ``"dequant"`` (None: the candidate cannot run, raising Triton's OutOfResources).  Each timing advances
    the tuner's clock by one second (``fake_gpu.clock``)."""
    import triton.runtime.errors
    import triton.testing

    state = SimpleNamespace(times={}, timed=[], capturing=False, cache=TuningCache(), clock=[0.0])
    monkeypatch.setattr(tuning, "is_interpreting", lambda: False)
    monkeypatch.setattr(tuning, "TUNING_CACHE", state.cache)
    monkeypatch.setattr(tuning, "_FUSED_BEST", {})
    monkeypatch.setattr(tuning, "_TABLES_TRIED", set())
    monkeypatch.setattr(tuning, "TABLES_DIR", Path("/nonexistent-cora-tables"))
    monkeypatch.setattr(tuning, "time", SimpleNamespace(perf_counter=lambda: state.clock[0]))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: SimpleNamespace(multi_processor_count=132))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state.capturing)
    monkeypatch.delenv("CORA_AUTOTUNE", raising=False)
    monkeypatch.delenv("CORA_STRATEGY", raising=False)

    def do_bench(fn, warmup=25, rep=100, **kw):
        res = fn()
        name = res if isinstance(res, str) else (res[0].name, res[1])
        state.timed.append(name)
        state.clock[0] += 1.0
        t = state.times.get(name, 1.0)
        if t is None:
            raise triton.runtime.errors.OutOfResources(1, 0, "shared memory")
        if isinstance(t, BaseException):
            raise t
        return t

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    return state


def _timed(cfg, split):
    return cfg, split


def _dequant():
    return "dequant"


def _names(choices):
    return [c.strategy if c.strategy == "dequant" else (c.config.name, c.split_k) for c in choices]


def test_select_config_times_a_handful_and_caches(fake_gpu):
    g = _geom(N=1, C_in=256, C_out=256, OH=14, OW=14)
    key = _key(g)
    want = _names(tuning._timed_candidates(key, g, 16, 2, 9, 132, allow_dequant=True))
    untimed = untimed_config(M=g.M, C_in=g.C_in, C_out=g.C_out, r_pad=16)
    assert want[0][0] == untimed.name and want[1] == "dequant"  # the untimed pair first, then the other strategy
    assert 3 <= len(want) <= cost_model.MAX_TIMED_FUSED + 1  # a handful, not every config
    assert any(s > 1 for _, s in want[2:]) or any(s > 1 for _, s in want[:1])  # a small-M shape: split-K is timed
    fastest = want[-1]
    fake_gpu.times = {want[0]: None, fastest: 0.5}  # the first candidate fails: skipped
    choice = tuning.select_config(key, g, 16, 2, _timed, torch.device("cuda"), time_dequant=_dequant)
    assert fake_gpu.timed == want
    assert (choice.config.name, choice.split_k) == fastest and choice.strategy == "fused"
    assert fake_gpu.cache.get(key) == choice
    fake_gpu.timed.clear()
    assert tuning.select_config(key, g, 16, 2, _timed, torch.device("cuda"), time_dequant=_dequant) == choice
    assert fake_gpu.timed == []  # cached: not timed again


def test_dequant_strategy_chosen_when_faster_and_fused_kept_apart(fake_gpu):
    g = _geom(N=64, C_in=64, C_out=64, OH=56, OW=56)
    key = _key(g)
    fake_gpu.times = {"dequant": 0.2}
    choice = tuning.select_config(key, g, 16, 2, _timed, torch.device("cuda"), time_dequant=_dequant)
    assert choice == tuning.DEQUANT_CHOICE and fake_gpu.cache.get(key) == choice
    # the fused kernel alone (benchmarks): its best timed choice, not re-timed, and the cache keeps dequant
    fake_gpu.timed.clear()
    fused = tuning.select_config(key, g, 16, 2, _timed, torch.device("cuda"), time_dequant=_dequant, fused_only=True)
    assert fused.strategy == "fused" and fake_gpu.timed == [] and fake_gpu.cache.get(key) == choice


def test_fused_only_does_not_fill_the_cache(fake_gpu, monkeypatch):
    g = _geom(N=64, C_in=64, C_out=64, OH=56, OW=56)
    monkeypatch.setenv("CORA_STRATEGY", "fused")
    choice = tuning.select_config(_key(g), g, 16, 2, _timed, torch.device("cuda"), time_dequant=_dequant)
    assert choice.strategy == "fused" and "dequant" not in fake_gpu.timed and len(fake_gpu.cache) == 0
    monkeypatch.setenv("CORA_STRATEGY", "dequant")
    assert tuning.select_config(_key(g), g, 16, 2, _timed, torch.device("cuda"), time_dequant=_dequant) \
        == tuning.DEQUANT_CHOICE
    monkeypatch.setenv("CORA_STRATEGY", "cudnn")
    with pytest.raises(ValueError, match="CORA_STRATEGY"):
        tuning.select_config(_key(g), g, 16, 2, _timed, torch.device("cuda"), time_dequant=_dequant)


def test_a_cuda_error_is_not_swallowed(fake_gpu):
    g = _geom()
    fake_gpu.times = {"dequant": RuntimeError("CUDA error: an illegal memory access was encountered")}
    with pytest.raises(RuntimeError, match="illegal memory access"):
        tuning.select_config(_key(g), g, 16, 2, _timed, torch.device("cuda"), time_dequant=_dequant)
    errors = tuning.candidate_errors()
    assert RuntimeError not in errors and all(issubclass(e, Exception) for e in errors)


def test_select_config_untimed_when_disabled_or_capturing(fake_gpu, monkeypatch):
    g = _geom(N=1, C_in=512, C_out=512, OH=7, OW=7)
    cfg = untimed_config(M=g.M, C_in=g.C_in, C_out=g.C_out, r_pad=16, elem_bytes=2)
    assert cfg.name == "small_m"
    split = choose_split_k(M=g.M, C_out=g.C_out, steps=9 * 4, cfg=cfg, n_sm=132)
    monkeypatch.setenv("CORA_AUTOTUNE", "0")
    choice = tuning.select_config(_key(g), g, 16, 2, _timed, torch.device("cuda"), time_dequant=_dequant)
    assert choice == TuneChoice(cfg, split) and split > 1  # batch 1, weight-bound: the fused kernel
    big = _geom(N=256, C_in=64, C_out=64, OH=56, OW=56)
    assert tuning.select_config(_key(big), big, 16, 2, _timed, torch.device("cuda"), time_dequant=_dequant) \
        == tuning.DEQUANT_CHOICE  # compute-bound: dequantize, then the vendor conv
    assert tuning.select_config(_key(big), big, 16, 2, _timed, torch.device("cuda")).strategy == "fused"  # no dequant
    monkeypatch.delenv("CORA_AUTOTUNE")
    fake_gpu.capturing = True
    assert tuning.select_config(_key(g), g, 16, 2, _timed, torch.device("cuda"), time_dequant=_dequant) == choice
    assert fake_gpu.timed == [] and len(fake_gpu.cache) == 0  # untimed choices are not cached
    loaded = TuneChoice(config_named("mid_m_64n"), 3)
    fake_gpu.cache.put(_key(g), loaded)  # e.g. from load_tuning: used even during capture
    assert tuning.select_config(_key(g), g, 16, 2, _timed, torch.device("cuda"), time_dequant=_dequant) == loaded


def test_all_candidates_fail_falls_back_to_untimed(fake_gpu):
    g = _geom(N=8, C_in=3, C_out=64, OH=112, OW=112, KH=7, KW=7)
    key = replace(_key(g), aligned=False)
    fake_gpu.times = {(c.name, s): None for c in ALL for s in range(1, 17)}
    choice = tuning.select_config(key, g, 16, 2, _timed, torch.device("cuda"))
    assert choice == TuneChoice(config_named("tiny_cin"), 1) and fake_gpu.timed
    assert fake_gpu.cache.get(key) == choice


def test_tuning_budget_bounds_the_timing(fake_gpu):
    shapes = [_geom(N=1, C_in=c, C_out=c, OH=14, OW=14) for c in (64, 128, 256)]
    with tuning.tuning_budget(2.5) as budget:  # each timing costs one second on the fake clock
        first = tuning.select_config(_key(shapes[0]), shapes[0], 16, 2, _timed, torch.device("cuda"),
                                     time_dequant=_dequant)
        assert len(fake_gpu.timed) == 3 and budget.exhausted()  # stopped mid-way, the best so far kept
        assert fake_gpu.cache.get(_key(shapes[0])) == first
        fake_gpu.timed.clear()
        for g in shapes[1:]:
            choice = tuning.select_config(_key(g), g, 16, 2, _timed, torch.device("cuda"), time_dequant=_dequant)
            assert choice == tuning._untimed_choice(_key(g), g, 16, 2, 132, True)
        assert fake_gpu.timed == [] and len(fake_gpu.cache) == 1  # past the budget: untimed, not cached
    assert budget.spent == 3.0
    tuning.select_config(_key(shapes[1]), shapes[1], 16, 2, _timed, torch.device("cuda"), time_dequant=_dequant)
    assert fake_gpu.timed  # outside the budget, timing again
    with pytest.raises(ValueError, match="seconds >= 0"):
        tuning.TuningBudget(-1)


def test_tune_seconds_from_the_environment(monkeypatch):
    from cora_kernels.environment import DEFAULT_TUNE_SECONDS, tune_seconds

    monkeypatch.delenv("CORA_TUNE_SECONDS", raising=False)
    assert tune_seconds() == DEFAULT_TUNE_SECONDS
    monkeypatch.setenv("CORA_TUNE_SECONDS", "12.5")
    assert tune_seconds() == 12.5
    with tuning.tuning_budget() as b:
        assert b.seconds == 12.5
    for bad in ("-1", "soon", "inf", "nan"):
        monkeypatch.setenv("CORA_TUNE_SECONDS", bad)
        with pytest.raises(ValueError, match="CORA_TUNE_SECONDS"):
            tune_seconds()


def test_shipped_table_is_used_by_gpu_name_and_never_overrides(fake_gpu, monkeypatch, tmp_path):
    g = _geom(N=1, C_in=128, C_out=128, OH=28, OW=28)
    key = _key(g)  # device "Fake GPU"
    other = replace(key, C_in=256)
    foreign = replace(key, device="Another GPU")
    table = TuningCache()
    table.put(key, tuning.DEQUANT_CHOICE)
    table.put(other, TuneChoice(config_named("mid_m_64n"), 2))
    table.put(foreign, TuneChoice(config_named("small_m"), 1))
    monkeypatch.setattr(tuning, "TABLES_DIR", tmp_path)
    assert tuning.table_path("Fake GPU") == tmp_path / "fake_gpu.json"
    table.save(tuning.table_path("Fake GPU"))
    held = TuneChoice(config_named("small_m_wide_rank"), 1)
    fake_gpu.cache.put(other, held)  # timed here or loaded by the user: wins over the shipped table
    assert tuning.select_config(key, g, 16, 2, _timed, torch.device("cuda"), time_dequant=_dequant) \
        == tuning.DEQUANT_CHOICE
    assert fake_gpu.timed == [] and fake_gpu.cache.get(other) == held and foreign not in fake_gpu.cache
    assert tuning.load_shipped_tuning("Fake GPU") == 0  # once per process and GPU model


def test_shipped_tables_parse():
    """Every table shipped in the package is a valid tuning file named after the GPU model it holds."""
    for path in sorted(tuning.TABLES_DIR.glob("*.json")):
        cache = TuningCache()
        assert cache.load(path) > 0, path
        assert {tuning.table_path(k.device) for k, _ in cache.items()} == {path}


def test_launcher_key_and_tuner_wiring(monkeypatch):
    """cora_conv2d_triton builds the TuneKey the tuner sees and launches with its choice."""
    import cora_kernels.conv_fused as cf
    from cora_kernels.testing import Case, random_layer

    seen = []
    real_select = tuning.select_config

    def spy(key, g, r_pad, elem, time_candidate, device, **kw):
        seen.append((key, r_pad, elem, kw))
        return real_select(key, g, r_pad, elem, time_candidate, device, **kw)

    monkeypatch.setattr(tuning, "select_config", spy)
    c = Case(N=1, C_in=8, C_out=6, H=5, W=5, bits=3, rank=2, dtype=torch.float16, res=True)
    args, kw = random_layer(c, device="cpu")
    cf.cora_conv2d_triton(*args, **kw)
    key, r_pad, elem, kw_seen = seen[0]
    assert callable(kw_seen["time_dequant"]) and kw_seen["fused_only"] is False
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


def test_precompile_submits_every_candidate_to_tritons_async_mode():
    """Candidates compile in parallel through Triton's AsyncCompileMode: each compile_candidate call runs with
    the mode active (what a kernel's warmup submits to), and every submitted compilation is finished on return."""
    import threading

    from triton.runtime import _async_compile

    choices = [TuneChoice(config_named(n), s) for n, s in (("small_m", 1), ("small_m", 4), ("mid_m_64n", 1))]
    finished, workers = [], set()

    def compile_candidate(cfg, split):
        mode = _async_compile.active_mode.get()
        assert mode is not None

        def compile_fn():
            workers.add(threading.get_ident())
            return (cfg.name, split)

        mode.submit((cfg.name, split), compile_fn, finished.append)

    assert tuning.precompile(choices, compile_candidate) == 3
    assert sorted(finished) == sorted((c.config.name, c.split_k) for c in choices)
    assert threading.get_ident() not in workers and _async_compile.active_mode.get() is None
    assert tuning.precompile(choices[:1], compile_candidate) == 0  # one candidate: nothing to overlap


def test_select_config_precompiles_the_fused_candidates(fake_gpu):
    g = _geom(N=1, C_in=256, C_out=256, OH=14, OW=14)
    compiled = []
    tuning.select_config(_key(g), g, 16, 2, _timed, torch.device("cuda"), time_dequant=_dequant,
                         compile_candidate=lambda cfg, split: compiled.append((cfg.name, split)))
    assert compiled == [t for t in fake_gpu.timed if t != "dequant"]  # every fused candidate, before timing
