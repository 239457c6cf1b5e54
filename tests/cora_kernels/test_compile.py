"""Every autotune config of every kernel compiles for sm_80 and sm_90 (no GPU needed), and every tile
of the grouped / depthwise kernel too.

Runs the whole Triton compiler to PTX and a cubin (ptxas), checks for tensor-core instructions,
records REG / STACK / SHARED (``cuobjdump --dump-resource-usage``) and fails on spills (STACK > 0).
The compilation runs in subprocesses with ``TRITON_INTERPRET`` unset (``gpu_compile.py``), one
per target, in parallel.  See the numbers with ``pytest tests/cora_kernels/test_compile.py -s``.
"""
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import triton

from cora_kernels import tuning

HERE = os.path.dirname(os.path.abspath(__file__))
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
pytestmark = pytest.mark.skipif(not os.path.exists(CUOBJDUMP), reason="triton's bundled CUDA tools are missing")

TARGETS = (80, 90)
CONFIGS = list(tuning.CONV_CONFIGS) + [tuning.FALLBACK_CONFIG]


def _cfg(c):
    return c.name  # gpu_compile.py looks it up with tuning.config_named


def _conv(cc, cfg, **kw):
    return {"kind": "conv", "cc": cc, "cfg": _cfg(cfg), **kw}


# The dequantize strategy's kernel: every width, fp16 / bf16 / fp32 outputs, int8 adapters, rank pads 0-128.
DEQUANT_VARIANTS = [dict(bits=4), dict(bits=3), dict(bits=2), dict(bits=8), dict(bits=4, dtype="bf16"),
                    dict(bits=3, dtype="fp32"), dict(bits=4, adapter="int8"), dict(bits=3, r_pad=0, bn=False),
                    dict(bits=4, r_pad=128)]


def _dequant_jobs():
    return [{"kind": "dequant", "cc": cc, **v} for cc in TARGETS for v in DEQUANT_VARIANTS]


def _default_jobs():
    jobs = [_conv(cc, cfg, bits=bits) for cc in TARGETS for cfg in CONFIGS for bits in (4, 3, 2, 16)]
    jobs += [_conv(cc, cfg, bits=bits, adapter="int8") for cc in TARGETS for cfg in CONFIGS for bits in (4, 3, 2)]
    jobs += [{"kind": "reduce", "cc": cc} for cc in TARGETS]
    for cc in TARGETS:
        jobs += _variant_jobs(cc)
    return jobs


def _grouped_jobs():
    return [_grouped(cc, cfg, **kw) for cc in TARGETS for cfg in tuning.DEPTHWISE_CONFIGS for kw in GROUPED_VARIANTS
            if _chosen(cfg, kw)]


def _chosen(cfg, variant) -> bool:
    """Whether depthwise_config can pick ``cfg`` for ``variant`` (a channel multiplier never gets the
    tiles of tuning.DEPTHWISE_MULTIPLIER_EXCLUDED)."""
    return not (variant.get("mode") == 1 and cfg.name in tuning.DEPTHWISE_MULTIPLIER_EXCLUDED)


def _grouped(cc, cfg, **kw):
    return {"kind": "grouped", "cc": cc, "cfg": cfg.name, **kw}


# Per tile of the grouped kernel: depthwise at int4/3/2/8 (fp16, every epilogue option), the channel
# multiplier and the general grouped loop (int3: two planes), bf16 and fp32 activations, no epilogue.
GROUPED_VARIANTS = [dict(bits=4), dict(bits=3), dict(bits=2), dict(bits=8), dict(bits=3, mode=1), dict(bits=3, mode=2),
                    dict(bits=4, dtype="bf16", mode=1), dict(bits=4, dtype="fp32", mode=2), dict(bits=4, epilogue=False)]


def _variant_jobs(cc):
    cfg = tuning.config_named("mid_m_64n")
    return [_conv(cc, cfg, bits=4, dtype="bf16"), _conv(cc, cfg, bits=3, split_k=4),
            _conv(cc, cfg, bits=3, aligned=False), _conv(cc, cfg, bits=4, r_pad=0, epilogue=False),
            _conv(cc, cfg, bits=4, dtype="bf16", adapter="int8"), _conv(cc, cfg, bits=3, split_k=4, adapter="int8")]


# The fused activations that add instructions to the epilogue (geometry.activation_code: 4 hardswish,
# 5 exact gelu, erf; 6 sigmoid, exp): sm_90 only, one fused config (fp16 and bf16), the split-K reduction and
# one tile of the grouped kernel; relu (1) is in every other job, relu6 / silu / hardsigmoid are no costlier.
ACT_CODES = (4, 5, 6)


def _act_jobs():
    cfg, dw = tuning.config_named("mid_m_64n"), tuning.DEPTHWISE_CONFIGS[0]
    jobs = []
    for act in ACT_CODES:
        jobs += [_conv(90, cfg, bits=4, act=act), _conv(90, cfg, bits=4, dtype="bf16", adapter="int8", act=act),
                 {"kind": "reduce", "cc": 90, "act": act}, _grouped(90, dw, bits=4, act=act)]
    return jobs


def _slow_jobs():
    # the gather (unaligned) path only ever gets BLOCK_K <= 64 (see tuning.prune_configs)
    # and BLOCK_K <= 64 whenever r_pad > 16
    jobs = [_conv(cc, cfg, bits=4, dtype="bf16", r_pad=16 if cfg.BLOCK_K > 64 else 32, aligned=cfg.BLOCK_K > 64)
            for cc in TARGETS for cfg in CONFIGS]
    jobs += [_conv(cc, cfg, bits=b, dtype="fp32", r_pad=16, aligned=False, **ad)
             for cc in TARGETS for cfg in tuning.FP32_CONFIGS for b in (3, 4) for ad in ({}, {"adapter": "int8"})
             if not (ad and cfg.name in tuning.INT8_ADAPTER_SPILLS)]  # never chosen for int8 adapters
    return jobs


_CACHE: dict = {}


def _key(job):
    return json.dumps(job, sort_keys=True)


def _run_batch(jobs):
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(jobs, f)
        path = f.name
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        out = subprocess.run([sys.executable, os.path.join(HERE, "gpu_compile.py"), path], capture_output=True,
                             text=True, env=env, timeout=900)
    finally:
        os.unlink(path)
    got = {}
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            d = json.loads(line[7:])
            got[_key(d["job"])] = d["res"]
    for job in jobs:
        got.setdefault(_key(job), {"ok": False, "error": f"no result (rc={out.returncode}): {out.stderr[-2000:]}"})
    return got


def _result(job, group):
    if _key(job) not in _CACHE:
        jobs = group()
        by_cc = [b for b in ([j for j in jobs if j["cc"] == cc] for cc in TARGETS) if b]
        with ThreadPoolExecutor(len(by_cc)) as ex:
            for got in ex.map(_run_batch, by_cc):
                _CACHE.update(got)
    return _CACHE[_key(job)]


def _check(res, record_property, need_mma=True):
    assert res["ok"], res["error"]
    line = (f"sm_{res['cc']} {res['name']:<44} REG={res['reg']:<4} STACK={res['stack']:<4} "
            f"SHARED={res['shared']:<5} dyn_smem={res['ptx_shared']:<6} "
            f"{'wgmma' if res['has_wgmma'] else ('mma' if res['has_mma'] else 'no-mma')}")
    print(line)
    record_property(f"sm{res['cc']} {res['name']}", line)
    assert res["reg"] > 0, "could not read the resource usage"
    assert res["stack"] == 0, f"spills: {line}"
    if need_mma:
        assert res["has_mma"] or res["has_wgmma"], f"no tensor-core instructions in the PTX: {line}"


@pytest.mark.parametrize("bits", [4, 3, 2, 16], ids=["int4", "int3", "int2", "fp16w"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("cc", TARGETS, ids=lambda c: f"sm{c}")
def test_conv_config_compiles(cc, cfg, bits, record_property):
    _check(_result(_conv(cc, cfg, bits=bits), _default_jobs), record_property)


INT8_CONFIGS = [c for c in CONFIGS if c.name not in tuning.INT8_ADAPTER_SPILLS]  # what the launcher may pick for int8


@pytest.mark.parametrize("bits", [4, 3, 2], ids=["int4", "int3", "int2"])
@pytest.mark.parametrize("cfg", INT8_CONFIGS, ids=str)
@pytest.mark.parametrize("cc", TARGETS, ids=lambda c: f"sm{c}")
def test_conv_config_compiles_int8_adapter(cc, cfg, bits, record_property):
    """int8 adapters with fp32 per-row scales (the scales applied to the fp32 t and adapter tiles), for
    every config the tuner may choose for them (tuning.INT8_ADAPTER_SPILLS are pruned: they spill)."""
    _check(_result(_conv(cc, cfg, bits=bits, adapter="int8"), _default_jobs), record_property)


@pytest.mark.parametrize("variant", GROUPED_VARIANTS, ids=lambda v: "-".join(f"{k}{w}" for k, w in v.items()))
@pytest.mark.parametrize("cfg", tuning.DEPTHWISE_CONFIGS, ids=str)
@pytest.mark.parametrize("cc", TARGETS, ids=lambda c: f"sm{c}")
def test_grouped_config_compiles(cc, cfg, variant, record_property):
    """Every tile of the direct grouped / depthwise kernel that can be chosen for the variant, no spills
    (CUDA-core FMAs: no mma expected)."""
    if not _chosen(cfg, variant):
        pytest.skip(f"{cfg.name} is never chosen with a channel multiplier (tuning.DEPTHWISE_MULTIPLIER_EXCLUDED)")
    _check(_result(_grouped(cc, cfg, **variant), _grouped_jobs), record_property, need_mma=False)


@pytest.mark.parametrize("variant", DEQUANT_VARIANTS, ids=lambda v: "-".join(f"{k}{w}" for k, w in v.items()))
@pytest.mark.parametrize("cc", TARGETS, ids=lambda c: f"sm{c}")
def test_dequant_kernel_compiles(cc, variant, record_property):
    """The dequantize strategy's weight kernel: no spills; the adapter product on tensor cores (3xTF32)."""
    _check(_result({"kind": "dequant", "cc": cc, **variant}, _dequant_jobs), record_property,
           need_mma=variant.get("r_pad", 16) > 0)


@pytest.mark.parametrize("cc", TARGETS, ids=lambda c: f"sm{c}")
def test_splitk_epilogue_compiles(cc, record_property):
    _check(_result({"kind": "reduce", "cc": cc}, _default_jobs), record_property, need_mma=False)


@pytest.mark.parametrize("cc", TARGETS, ids=lambda c: f"sm{c}")
def test_variants_compile(cc, record_property):
    """One config per variant: bf16, split-K partials, the unaligned (gather) unpack path, rank 0, and
    int8 adapters with bf16 and split-K."""
    for job in _variant_jobs(cc):
        _check(_result(job, _default_jobs), record_property)


@pytest.mark.parametrize("act", ACT_CODES, ids=lambda a: f"act{a}")
def test_activations_compile(act, record_property):
    """hardswish, exact gelu (tl.math.erf) and sigmoid in the fused kernel's epilogue (fp16; bf16 with int8
    adapters), the split-K reduction and the grouped kernel, for sm_90: compile, no spills."""
    for job in _act_jobs():
        if job["act"] == act:
            _check(_result(job, _act_jobs), record_property, need_mma=job["kind"] == "conv")


@pytest.mark.slow
@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("cc", TARGETS, ids=lambda c: f"sm{c}")
def test_conv_config_compiles_bf16(cc, cfg, record_property):
    _check(_result(_conv(cc, cfg, bits=4, dtype="bf16", r_pad=16 if cfg.BLOCK_K > 64 else 32,
                         aligned=cfg.BLOCK_K > 64), _slow_jobs), record_property)


@pytest.mark.parametrize("cfg", tuning.FP32_CONFIGS, ids=str)
@pytest.mark.parametrize("cc", TARGETS, ids=lambda c: f"sm{c}")
def test_fp32_configs_compile(cc, cfg, record_property):
    # fp32 activations: 3xTF32 dots, gather unpack path (what the launcher uses for fp32)
    for job in _slow_jobs():
        if job["cc"] == cc and job.get("dtype") == "fp32" and job["cfg"] == _cfg(cfg):
            _check(_result(job, _slow_jobs), record_property)
