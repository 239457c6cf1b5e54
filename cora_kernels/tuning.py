"""Choosing a launch configuration for the fused conv kernel, in one module.

The data:

* :class:`ConvConfig` -- one tile shape (``BLOCK_M x BLOCK_N x BLOCK_K``, warps, pipeline stages),
  with a short descriptive ``name``;
* :data:`CONV_CONFIGS` -- the candidates that the autotuner times for 16-bit activations;
  :data:`FALLBACK_CONFIG` (large adapter ranks), :data:`FP32_CONFIGS` (fp32 activations),
  :data:`INTERPRETER_CONFIG` (``TRITON_INTERPRET=1``, never tuned) and :data:`REDUCE_CONFIG` (the
  split-K reduction, memory-bound, not tuned); :func:`config_named` looks any of them up by name;
* :class:`DepthwiseConfig` / :data:`DEPTHWISE_CONFIGS` -- the tiles of the direct grouped /
  depthwise kernel (:mod:`cora_kernels.conv_depthwise`), chosen by shape with
  :func:`depthwise_config` (never timed; :data:`DEPTHWISE_INTERPRETER_CONFIG` under the interpreter).

The decisions:

* :func:`prune_configs` -- drops configs that cannot pay off for a shape (tiles much larger than
  the problem, shared memory over the device limit, accumulators that would spill);
* :func:`untimed_config` -- a config chosen without timing (CUDA-graph capture, or
  ``CORA_AUTOTUNE=0``, see :func:`autotune_enabled`);
* :func:`choose_split_k` -- split factor of the K loop that fills the GPU when there are too few
  output tiles;
* :func:`select_config` -- the whole policy for one launch: fixed under the interpreter, otherwise
  looked up in :data:`TUNING_CACHE` or timed once per :class:`TuneKey` and stored there.

The cache maps a :class:`TuneKey` (the layer's shape class, dtype, GPU model) to a
:class:`TuneChoice` (config, split-K).  :func:`save_tuning` / :func:`load_tuning` write and read it
as JSON, so that choices timed once can be shipped to other machines with the same GPU.

Register / shared-memory budget: every config below is compiled for sm_80 and sm_90 by
``tests/cora_kernels/test_compile.py``, which records REG / STACK / SHARED and fails on any spill.
Measured with triton 3.8 (fp16, bits 4, rank pad 16; sm_80 / sm_90), see the test output
(``pytest tests/cora_kernels/test_compile.py -s``); the configs that spilled are listed below and
left out.

Imports only torch (Triton is imported when a candidate is first timed).
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch

from .cost_model import DEQUANT, FUSED, STRATEGIES, rank_fused_candidates, untimed_strategy
from .environment import autotune_enabled, is_interpreting, strategy_override, tune_seconds

__all__ = [
    "ConvConfig",
    "CONV_CONFIGS",
    "FALLBACK_CONFIG",
    "FP32_CONFIGS",
    "INTERPRETER_CONFIG",
    "REDUCE_CONFIG",
    "config_named",
    "DepthwiseConfig",
    "DEPTHWISE_CONFIGS",
    "DEPTHWISE_INTERPRETER_CONFIG",
    "DEPTHWISE_MULTIPLIER_EXCLUDED",
    "depthwise_config",
    "prune_configs",
    "untimed_config",
    "choose_split_k",
    "TuneKey",
    "TuneChoice",
    "TuningCache",
    "TUNING_CACHE",
    "TUNING_FORMAT_VERSION",
    "save_tuning",
    "load_tuning",
    "autotune_enabled",
    "device_name",
    "select_config",
    "candidate_errors",
    "precompile",
    "DEQUANT_CHOICE",
    "TuningBudget",
    "tuning_budget",
    "TABLES_DIR",
    "table_path",
    "load_shipped_tuning",
]


# ----------------------------------------------------------------------------------------------
# configurations
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConvConfig:
    """One launch configuration: tile sizes (constexprs of the kernel), warps and pipeline stages."""

    name: str
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int
    GROUP_M: int = 8

    def as_meta(self) -> dict:
        return {"BLOCK_M": self.BLOCK_M, "BLOCK_N": self.BLOCK_N, "BLOCK_K": self.BLOCK_K, "GROUP_M": self.GROUP_M}

    def __str__(self) -> str:
        return f"{self.BLOCK_M}x{self.BLOCK_N}x{self.BLOCK_K}_w{self.num_warps}_s{self.num_stages}"


# BLOCK_K is a multiple of 32 everywhere so that the aligned unpack path (bits 3 needs 32 codes per
# word of the 1-bit plane) is available whenever C_in % 32 == 0.
CONV_CONFIGS: tuple[ConvConfig, ...] = (
    ConvConfig("large_m_large_n", 128, 128, 64, 8, 3),  # large M, large C_out (batch >= 64)
    ConvConfig("large_m_64n", 128, 64, 64, 8, 3),       # C_out = 64 layers, large M
    ConvConfig("mid_m_large_n", 64, 128, 64, 8, 3),
    ConvConfig("mid_m_64n", 64, 64, 64, 4, 4),
    ConvConfig("small_m", 32, 64, 128, 4, 4),            # batch 1 / small M (with split-K), weight-bound
                                                         # late layers, r_pad 16
    ConvConfig("small_m_wide_rank", 32, 64, 64, 4, 4),   # the same for r_pad >= 32 (32x64x128 spills
                                                         # there: 16-24 B)
    ConvConfig("tiny_cin", 64, 32, 32, 4, 4),            # tiny C_in (the 7x7 stem, C_in = 3)
)
# Pruned because they spill (triton 3.8, all epilogue options on, rank pad 16; STACK bytes):
#   128x256x64 w8 s3 (sm_80 16-32, sm_90 736-808), 256x128x64 w8 s3 (sm_80 48-128, sm_90 96-112),
#   128x256x64 w4 (256 fp32 accumulators per thread), 128x64x64 w4 s2-s4 (sm_80 16-88),
#   64x128x64 w4 s3-s4 (sm_80 8, bits 3).

# Large adapter ranks (r_pad >= 128): small tiles keep the [BLOCK_M, r_pad] accumulator in registers.
FALLBACK_CONFIG = ConvConfig("fallback", 32, 64, 32, 4, 2)

# fp32 activations: 3xTF32 dots (tensor cores, ~fp32 accuracy) and the gather unpack path; the
# 16-bit tiles spill there (ieee FMA dots at 128x128x64 w8: 10.7 KB of stack on sm_80; 3xTF32 with
# the aligned unpack: 80-1192 B), so fp32 has its own tiles.
FP32_CONFIGS: tuple[ConvConfig, ...] = (
    FALLBACK_CONFIG,
    ConvConfig("fp32_mid", 64, 64, 32, 4, 2),
    ConvConfig("fp32_large", 128, 64, 32, 8, 3),
)

INTERPRETER_CONFIG = ConvConfig("interpreter", 32, 32, 32, 4, 1)
REDUCE_CONFIG = ConvConfig("splitk_reduce", 64, 64, 32, 4, 1)  # BLOCK_K unused by the reduction


def _all_configs() -> dict[str, ConvConfig]:
    out: dict[str, ConvConfig] = {}
    for cfg in (*CONV_CONFIGS, FALLBACK_CONFIG, *FP32_CONFIGS, INTERPRETER_CONFIG, REDUCE_CONFIG):
        if out.setdefault(cfg.name, cfg) != cfg:
            raise AssertionError(f"two different configs are named {cfg.name!r}")
    return out


_BY_NAME = _all_configs()


def config_named(name: str) -> ConvConfig:
    """The config called ``name`` (any of the configs above); KeyError listing the names otherwise."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise KeyError(f"no launch config named {name!r}; known: {sorted(_BY_NAME)}") from None


# ----------------------------------------------------------------------------------------------
# the direct grouped / depthwise kernel: a few fixed tiles, chosen by shape (no timing)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DepthwiseConfig:
    """A tile of the grouped kernel: ``BLOCK_M`` output pixels x ``BLOCK_C`` output channels."""

    name: str
    BLOCK_M: int
    BLOCK_C: int
    num_warps: int

    def __str__(self) -> str:
        return f"dw{self.BLOCK_M}x{self.BLOCK_C}_w{self.num_warps}"


# One large-M tile per channel width and a small-M one (batch 1, late 7x7 / 14x14 stages) that
# makes more programs; all hold 16 fp32 accumulators per thread.  At 32 per thread (4096-element
# tiles at 4 warps) the general grouped variant spilled on sm_80 (16 B, 64x64 and 128x32, triton
# 3.8); at 16 every variant takes 70-100 registers (see tests/cora_kernels/test_compile.py -s).
# No software pipelining (num_stages 1): the kernel has no dot to feed.
DEPTHWISE_CONFIGS: tuple[DepthwiseConfig, ...] = (
    DepthwiseConfig("dw_c32", 128, 32, 8),
    DepthwiseConfig("dw_c64", 64, 64, 8),
    DepthwiseConfig("dw_c128", 32, 128, 8),
    DepthwiseConfig("dw_c32_small_m", 32, 32, 2),
    DepthwiseConfig("dw_c64_small_m", 16, 64, 2),
    DepthwiseConfig("dw_c128_small_m", 16, 128, 4),
)
DEPTHWISE_INTERPRETER_CONFIG = DepthwiseConfig("dw_interpreter", 32, 16, 4)
DEPTHWISE_MIN_PROGRAMS = 256  # below this many large-M tiles (about 2 per SM), take the small-M tile
# Tiles never chosen for a depthwise conv with a channel multiplier (the kernel's MODE 1, whose per-column
# input channel c // COG keeps more live): the 32x128 tile spilled 8 B there on sm_90 with int3 codes under
# triton 3.6 (128 registers at 8 warps), the GPU machines' version; such layers take the 64-channel tiles.
DEPTHWISE_MULTIPLIER_EXCLUDED = ("dw_c128",)


def depthwise_config(*, M: int, C_out: int, interpreting: bool = False, multiplier: bool = False) -> DepthwiseConfig:
    """The grouped kernel's tile for ``M = N*OH*OW`` output pixels and ``C_out`` channels.

    The channel tile is the widest of 128 / 64 / 32 that pads ``C_out`` by at most 1/8 (MobileNet
    and EfficientNet widths such as 96 or 144 get 32, 384 or 960 get 128); then the large-M tile of
    that width, or its small-M one when the large one would give fewer than
    :data:`DEPTHWISE_MIN_PROGRAMS` programs.  ``multiplier`` (depthwise with a channel multiplier): at most
    64 channels per tile (:data:`DEPTHWISE_MULTIPLIER_EXCLUDED`).  ``interpreting``:
    :data:`DEPTHWISE_INTERPRETER_CONFIG`.
    """
    if interpreting:
        return DEPTHWISE_INTERPRETER_CONFIG
    block_c = 32
    for bc in (64,) if multiplier else (128, 64):
        if -(-C_out // bc) * bc * 8 <= C_out * 9:
            block_c = bc
            break
    large, small = (c for c in DEPTHWISE_CONFIGS if c.BLOCK_C == block_c)
    programs = -(-M // large.BLOCK_M) * -(-C_out // block_c)
    return large if programs >= DEPTHWISE_MIN_PROGRAMS else small


# ----------------------------------------------------------------------------------------------
# decisions without timing
# ----------------------------------------------------------------------------------------------

# Rough per-device shared memory limits (bytes per block, opt-in maximum).
_SMEM_LIMIT = {8: 163 * 1024, 9: 227 * 1024}


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _smem_bytes(cfg: ConvConfig, elem: int, r_pad: int) -> int:
    """Upper bound on the pipelined tiles (x tile, weight tile after unpacking, A tile)."""
    per_stage = (cfg.BLOCK_M * cfg.BLOCK_K + cfg.BLOCK_K * cfg.BLOCK_N + cfg.BLOCK_K * r_pad) * elem
    return per_stage * max(1, cfg.num_stages - 1)


# int8 adapters (their fp32 row scales in the epilogue) tip these over the register limit: 8 B of stack
# (triton 3.8: small_m on sm_80 at int4/int2, large_m_large_n on sm_90 at int3/int2); never chosen then.
INT8_ADAPTER_SPILLS = ("small_m", "large_m_large_n", "fp32_mid")  # fp32_mid: sm_80, fp32 activations, 8 B


def prune_configs(configs, *, M: int, C_in: int, C_out: int, r_pad: int, elem_bytes: int = 2,
                  capability_major: int = 8, aligned: bool = True, int8_adapter: bool = False) -> list[ConvConfig]:
    """Configs worth timing for this shape (never empty).

    ``aligned=False`` (C_in not a multiple of the codes per word: the gather unpack path, which
    stages 32 bits per code) drops BLOCK_K > 64: 32x64x128 spills there (sm_80, bf16, r 32).
    ``int8_adapter`` drops :data:`INT8_ADAPTER_SPILLS`.
    """
    if elem_bytes == 4:
        return [c for c in FP32_CONFIGS if not (int8_adapter and c.name in INT8_ADAPTER_SPILLS)] or [FALLBACK_CONFIG]
    out = []
    limit = _SMEM_LIMIT.get(capability_major, _SMEM_LIMIT[8])
    for cfg in configs:
        if int8_adapter and cfg.name in INT8_ADAPTER_SPILLS:
            continue
        if cfg.BLOCK_M > max(32, 2 * _next_pow2(M)):
            continue
        if cfg.BLOCK_N > max(32, 2 * _next_pow2(C_out)):
            continue
        if cfg.BLOCK_K > max(32, _next_pow2(C_in)):
            continue
        if (not aligned or r_pad > 16) and cfg.BLOCK_K > 64:
            continue
        # fp32 accumulators per thread: main tile plus the low-rank tile
        regs = (cfg.BLOCK_M * cfg.BLOCK_N + cfg.BLOCK_M * r_pad) / (32 * cfg.num_warps)
        if regs > 160:
            continue
        if _smem_bytes(cfg, elem_bytes, r_pad) > limit:
            continue
        out.append(cfg)
    if not out:
        out = [untimed_config(M=M, C_in=C_in, C_out=C_out, r_pad=r_pad, int8_adapter=int8_adapter)]
    return out


def untimed_config(*, M: int, C_in: int, C_out: int, r_pad: int = 0, elem_bytes: int = 2,
                   int8_adapter: bool = False) -> ConvConfig:
    """A reasonable config without timing (CUDA-graph capture, or tuning disabled)."""
    if r_pad >= 128 or elem_bytes == 4:
        return FALLBACK_CONFIG
    if C_in < 32:
        return config_named("tiny_cin")
    if M <= 1024:
        return config_named("small_m" if r_pad <= 16 and not int8_adapter else "small_m_wide_rank")
    if C_out <= 64:
        return config_named("large_m_64n")
    return config_named("mid_m_large_n" if int8_adapter else "large_m_large_n")


def choose_split_k(*, M: int, C_out: int, steps: int, cfg: ConvConfig, n_sm: int) -> int:
    """Split the K loop when the output tiles alone cannot fill ``n_sm`` multiprocessors.

    The low-rank branch is linear, so each split applies B to its own partial ``t``; the splits
    are summed (and the non-linear epilogue applied) by the reduction kernel.
    """
    tiles = -(-M // cfg.BLOCK_M) * -(-C_out // cfg.BLOCK_N)
    if tiles >= n_sm // 2 or steps < 8:
        return 1
    split = min(-(-n_sm // tiles), steps // 4, 16)
    return max(1, split)


# ----------------------------------------------------------------------------------------------
# the cache of timed choices
# ----------------------------------------------------------------------------------------------

_DEVICE_NAMES: dict[int, str] = {}


def device_name(device: torch.device) -> str:
    """The GPU model (``torch.cuda.get_device_name``, cached per device index) for a CUDA device,
    ``str(device)`` otherwise.  Tuned choices are keyed by it, not by the device index."""
    device = torch.device(device)
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _DEVICE_NAMES:
        _DEVICE_NAMES[index] = torch.cuda.get_device_name(index)
    return _DEVICE_NAMES[index]


@dataclass(frozen=True)
class TuneKey:
    """What a tuned choice depends on: the layer's shape class, its variant, dtype and the GPU.

    ``bits`` is 16 for the dense-weight control variant; ``r_pad`` the padded adapter rank
    (0: none); ``dtype`` the activation dtype's name (``"float16"``); ``m_bucket`` the GEMM rows
    ``N*OH*OW`` rounded up to a power of two; ``device`` the GPU model (:func:`device_name`);
    ``aligned`` whether C_in is a multiple of the codes per int32 word (the aligned unpack path
    can apply); ``int8_adapter`` whether the adapter is stored in int8 (other configs: see
    :func:`prune_configs`; absent from caches saved before it existed, read as False).
    """

    C_in: int
    C_out: int
    KH: int
    KW: int
    stride: tuple[int, int]
    dilation: tuple[int, int]
    padding: tuple[int, int]
    bits: int
    r_pad: int
    dtype: str
    m_bucket: int
    has_residual: bool
    device: str
    aligned: bool
    int8_adapter: bool = False

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d) -> "TuneKey":
        """Inverse of :meth:`to_json`; ValueError naming the field on anything malformed."""
        if not isinstance(d, dict):
            raise ValueError(f"a key must be a JSON object, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        d = {"int8_adapter": False, **d}  # caches saved before the field existed
        missing = [n for n in names if n not in d]
        extra = [n for n in d if n not in names]
        if missing or extra:
            raise ValueError(f"key fields: missing {missing}, unknown {extra}")
        vals = {}
        for f in fields(cls):
            v = d[f.name]
            if f.name in ("stride", "dilation", "padding"):
                ok = isinstance(v, list) and len(v) == 2 and all(_is_int(e) for e in v)
                v = tuple(v) if ok else v
            elif f.name in ("dtype", "device"):
                ok = isinstance(v, str)
            elif f.name in ("has_residual", "aligned", "int8_adapter"):
                ok = isinstance(v, bool)
            else:
                ok = _is_int(v)
            if not ok:
                raise ValueError(f"key field {f.name!r} has a bad value {v!r}")
            vals[f.name] = v
        return cls(**vals)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class TuneChoice:
    """The launch choice for one :class:`TuneKey`: the strategy (``"fused"``: the fused kernel with
    ``config`` and ``split_k``; ``"dequant"``: dequantize then the vendor conv, :mod:`.dequantize`, whose
    own tile is fixed: ``config`` None, ``split_k`` 1)."""

    config: ConvConfig | None
    split_k: int
    strategy: str = FUSED

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if (self.config is None) != (self.strategy == DEQUANT):
            raise ValueError("a fused choice needs a config; a dequant choice has none")


TUNING_FORMAT_VERSION = 2  # 2: entries carry "strategy"; version 1 files (all fused) are still read
_FORMAT = "cora-kernels-tuning"
_READABLE_VERSIONS = (1, 2)


class TuningCache:
    """``TuneKey -> TuneChoice`` for this process; JSON files carry it between machines.

    File format: ``{"format": "cora-kernels-tuning", "version": 2, "entries": [{"key": {...},
    "strategy": "fused" | "dequant", "config": "<config name>" | null, "split_k": n}, ...]}``
    (version 1 entries have no ``"strategy"`` and are fused).
    """

    def __init__(self):
        self._choices: dict[TuneKey, TuneChoice] = {}

    def get(self, key: TuneKey) -> TuneChoice | None:
        return self._choices.get(key)

    def put(self, key: TuneKey, choice: TuneChoice) -> None:
        self._choices[key] = choice

    def clear(self) -> None:
        self._choices.clear()

    def __len__(self) -> int:
        return len(self._choices)

    def __contains__(self, key) -> bool:
        return key in self._choices

    def items(self):
        return list(self._choices.items())

    def save(self, path) -> None:
        """Write every choice to ``path`` as JSON (overwrites the file)."""
        entries = [{"key": k.to_json(), "strategy": c.strategy, "config": c.config.name if c.config else None,
                    "split_k": c.split_k} for k, c in self._choices.items()]
        doc = {"format": _FORMAT, "version": TUNING_FORMAT_VERSION, "entries": entries}
        Path(path).write_text(json.dumps(doc, indent=1) + "\n")

    def load(self, path) -> int:
        """Merge the choices of a file written by :meth:`save` (they win over the ones held);
        returns how many were read.  A malformed file raises ValueError naming the problem and
        leaves the cache unchanged."""
        try:
            doc = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a JSON file ({e})") from None
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a cora_kernels tuning file (no \"format\": {_FORMAT!r})")
        version = doc.get("version")
        if version not in _READABLE_VERSIONS:
            raise ValueError(f"{path}: tuning format version {version!r}, this code reads versions "
                             f"{_READABLE_VERSIONS}")
        entries = doc.get("entries")
        if not isinstance(entries, list):
            raise ValueError(f"{path}: \"entries\" must be a list")
        read = {}
        for i, e in enumerate(entries):
            where = f"{path}: entry {i}"
            fields_ = {"key", "config", "split_k"} | ({"strategy"} if version >= 2 else set())
            if not isinstance(e, dict) or set(e) != fields_:
                raise ValueError(f"{where}: expected an object with the fields {sorted(fields_)}")
            try:
                key = TuneKey.from_json(e["key"])
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
            strategy = e.get("strategy", FUSED)
            if strategy not in STRATEGIES:
                raise ValueError(f"{where}: unknown strategy {strategy!r}; known: {list(STRATEGIES)}")
            if strategy == FUSED and e["config"] not in _BY_NAME:
                raise ValueError(f"{where}: unknown config name {e['config']!r}; known: {sorted(_BY_NAME)}")
            if strategy == DEQUANT and e["config"] is not None:
                raise ValueError(f"{where}: a dequant entry has \"config\": null, got {e['config']!r}")
            if not _is_int(e["split_k"]) or e["split_k"] < 1 or (strategy == DEQUANT and e["split_k"] != 1):
                raise ValueError(f"{where}: split_k must be a positive int (1 for dequant), got {e['split_k']!r}")
            read[key] = TuneChoice(_BY_NAME[e["config"]] if strategy == FUSED else None, e["split_k"], strategy)
        self._choices.update(read)
        return len(read)


TUNING_CACHE = TuningCache()


def save_tuning(path) -> None:
    """Save the tuned launch choices of this process (:data:`TUNING_CACHE`) to a JSON file."""
    TUNING_CACHE.save(path)


def load_tuning(path) -> int:
    """Merge tuned launch choices from a JSON file written by :func:`save_tuning`; returns the
    number of entries read.  They are used for the GPU model they were timed on."""
    return TUNING_CACHE.load(path)


# ----------------------------------------------------------------------------------------------
# tables measured on known GPUs, shipped inside the package
# ----------------------------------------------------------------------------------------------

TABLES_DIR = Path(__file__).with_name("tuned")
_TABLES_TRIED: set[str] = set()


def table_path(device_name: str) -> Path:
    """Where the shipped table for a GPU model lives: ``cora_kernels/tuned/<model, lower case, [a-z0-9_]>.json``."""
    slug = "".join(c if c.isalnum() else "_" for c in device_name.lower()).strip("_")
    return TABLES_DIR / f"{slug}.json"


def load_shipped_tuning(device_name: str) -> int:
    """Merge the shipped table of ``device_name`` (once per process and GPU model) into
    :data:`TUNING_CACHE` without replacing what is there (choices timed here or loaded by the user win).
    Returns how many entries were added (0 when no table ships for that GPU)."""
    if device_name in _TABLES_TRIED:
        return 0
    _TABLES_TRIED.add(device_name)
    path = table_path(device_name)
    if not path.is_file():
        return 0
    shipped = TuningCache()
    shipped.load(path)
    added = 0
    for key, choice in shipped.items():
        if key.device == device_name and key not in TUNING_CACHE:
            TUNING_CACHE.put(key, choice)
            added += 1
    return added


# ----------------------------------------------------------------------------------------------
# the tuning budget
# ----------------------------------------------------------------------------------------------

class TuningBudget:
    """Seconds of candidate timing (compilation included) allowed; past them the untimed rules decide."""

    def __init__(self, seconds: float):
        if not seconds >= 0:
            raise ValueError(f"a tuning budget is a number of seconds >= 0, got {seconds!r}")
        self.seconds = float(seconds)
        self.spent = 0.0

    def exhausted(self) -> bool:
        return self.spent >= self.seconds


_BUDGETS: list[TuningBudget] = []


@contextlib.contextmanager
def tuning_budget(seconds: float | None = None):
    """Bound the timing done inside the block (``with tuning_budget(60): warm up the model``): once
    ``seconds`` (None: ``CORA_TUNE_SECONDS``, default 60) are spent timing candidates, launches that are
    not tuned yet use the untimed choice (not cached, so a later budget can still time them).  Yields the
    :class:`TuningBudget` (``spent`` tells the time used).  Outside any budget, timing is unbounded."""
    budget = TuningBudget(tune_seconds() if seconds is None else seconds)
    _BUDGETS.append(budget)
    try:
        yield budget
    finally:
        _BUDGETS.remove(budget)


def _budget_left() -> bool:
    return not any(b.exhausted() for b in _BUDGETS)


def _spend(seconds: float) -> None:
    for b in _BUDGETS:
        b.spent += seconds


# ----------------------------------------------------------------------------------------------
# the policy
# ----------------------------------------------------------------------------------------------

DEQUANT_CHOICE = TuneChoice(None, 1, DEQUANT)
# the fastest fused choice timed per key (a key whose winner is dequant keeps its best fused one here,
# for CORA_STRATEGY=fused runs that report the fused kernel alone)
_FUSED_BEST: dict[TuneKey, TuneChoice] = {}


def candidate_errors() -> tuple[type[BaseException], ...]:
    """What a candidate that cannot run on this GPU raises (compilation, registers or shared memory
    over the limit, ptxas): such a candidate is skipped.  Anything else, a CUDA error included, propagates."""
    import triton.compiler.errors as cerr
    import triton.runtime.errors as rerr

    names = [(rerr, "OutOfResources"), (rerr, "PTXASError"), (cerr, "CompilationError"), (rerr, "TritonError")]
    return tuple({getattr(m, n) for m, n in names if isinstance(getattr(m, n, None), type)})


COMPILE_THREADS = 8  # parallel compilations of candidates (Triton's front end holds the GIL; ptxas does not)


def precompile(choices: list[TuneChoice], compile_candidate: Callable[[ConvConfig, int], object]) -> int:
    """Compile the fused ``choices`` in parallel with Triton's ``AsyncCompileMode`` (a thread pool; where this
    Triton has no such mode, or one is already active, nothing is done and each candidate compiles when it is
    first timed).  A candidate that does not compile is left for the timing loop to skip.  Returns how many
    were submitted."""
    import triton

    mode = getattr(triton, "AsyncCompileMode", None)
    if mode is None or len(choices) < 2:
        return 0
    from triton.runtime import _async_compile

    if _async_compile.active_mode.get() is not None:
        return 0
    from concurrent.futures import ThreadPoolExecutor

    skip = candidate_errors()
    with ThreadPoolExecutor(max_workers=min(COMPILE_THREADS, len(choices))) as pool, mode(pool, ignore_errors=True):
        for c in choices:
            try:
                compile_candidate(c.config, c.split_k)
            except skip:  # e.g. a specialisation error at submission: the timing loop meets it again
                pass
    return len(choices)


def _untimed_choice(key: TuneKey, g, r_pad: int, elem_bytes: int, n_sm: int, allow_dequant: bool) -> TuneChoice:
    if allow_dequant and untimed_strategy(M=g.M, K=g.K, C_out=g.C_out, bits=key.bits, elem_bytes=elem_bytes,
                                          taps=g.KH * g.KW) == DEQUANT:
        return DEQUANT_CHOICE
    cfg = untimed_config(M=g.M, C_in=g.C_in, C_out=g.C_out, r_pad=r_pad, elem_bytes=elem_bytes,
                         int8_adapter=key.int8_adapter)
    return TuneChoice(cfg, _split_for(g, cfg, n_sm))


def _split_for(g, cfg: ConvConfig, n_sm: int) -> int:
    steps = g.KH * g.KW * -(-g.C_in // cfg.BLOCK_K)
    return choose_split_k(M=g.M, C_out=g.C_out, steps=steps, cfg=cfg, n_sm=n_sm)


def _timed_candidates(key: TuneKey, g, r_pad: int, elem_bytes: int, major: int, n_sm: int,
                      allow_dequant: bool) -> list[TuneChoice]:
    """What is timed, in order: the untimed choice first (so a budget that runs out mid-way still keeps
    something at least as good), then the dequantize strategy, then the best-estimated fused pairs."""
    cfgs = prune_configs(CONV_CONFIGS, M=g.M, C_in=g.C_in, C_out=g.C_out, r_pad=r_pad, elem_bytes=elem_bytes,
                         capability_major=major, aligned=key.aligned, int8_adapter=key.int8_adapter)
    pairs = [(c, s) for c in cfgs for s in sorted({1, _split_for(g, c, n_sm)})]
    untimed = _untimed_choice(key, g, r_pad, elem_bytes, n_sm, allow_dequant=False)
    first = (untimed.config, untimed.split_k)
    ranked = rank_fused_candidates(pairs, M=g.M, K=g.K, C_out=g.C_out, bits=key.bits, elem_bytes=elem_bytes,
                                   n_sm=n_sm, must_keep=first if first in pairs else None)
    out = [TuneChoice(c, s) for c, s in ranked]
    out.sort(key=lambda ch: (ch.config, ch.split_k) != first)  # stable: the untimed pair first
    if allow_dequant:
        out.insert(1, DEQUANT_CHOICE)
    return out


def select_config(key: TuneKey, geometry, r_pad: int, elem_bytes: int,
                  time_candidate: Callable[[ConvConfig, int], object], device: torch.device,
                  time_dequant: Callable[[], object] | None = None, fused_only: bool = False,
                  compile_candidate: Callable[[ConvConfig, int], object] | None = None) -> TuneChoice:
    """The launch choice for one ``groups == 1`` call: the strategy, and for the fused kernel its config
    and split-K.  ``time_dequant`` (None where the dequantize strategy does not apply, e.g. the
    dense-weight control) runs the call by the dequantize strategy.  ``fused_only`` (or
    ``CORA_STRATEGY=fused``): the fused kernel alone is wanted (benchmarks); what is timed for it then is
    kept apart and does not replace the cached choice of ``key``.  ``compile_candidate(cfg, split)``
    compiles a fused candidate without running it: the candidates are then compiled in parallel before
    they are timed (:func:`precompile`).

    * ``CORA_STRATEGY=dequant`` (:func:`cora_kernels.environment.strategy_override`): the dequantize strategy;
    * under the Triton interpreter, or for a non-CUDA device: the fused kernel with :data:`INTERPRETER_CONFIG`;
    * a choice cached for ``key`` (timed earlier, loaded with :func:`load_tuning`, or shipped with the
      package for this GPU model, :func:`load_shipped_tuning`); where the dequantize strategy is not
      allowed (``CORA_STRATEGY=fused``, ``time_dequant`` None) the best fused choice timed for ``key``;
    * during CUDA-graph capture, with autotuning disabled or a :func:`tuning_budget` spent: the untimed
      rules, :func:`cora_kernels.cost_model.untimed_strategy` then :func:`untimed_config` and
      :func:`choose_split_k` (not cached);
    * otherwise the candidates of :func:`_timed_candidates` (a handful: pruned, ordered by the cost model)
      run under ``triton.testing.do_bench`` (``time_candidate(cfg, split)`` or ``time_dequant()``); one
      that cannot run on this GPU (:func:`candidate_errors`) is skipped; the fastest is cached under ``key``.

    ``geometry`` is the call's :class:`~cora_kernels.geometry.ConvGeometry`.
    """
    g = geometry
    if time_dequant is not None and not fused_only:
        forced = strategy_override()
        if forced == DEQUANT:
            return DEQUANT_CHOICE
        fused_only = forced == FUSED
    if is_interpreting() or device.type != "cuda":
        return TuneChoice(INTERPRETER_CONFIG, 1)
    load_shipped_tuning(key.device)
    allow_dequant = time_dequant is not None and not fused_only
    cached = TUNING_CACHE.get(key)
    if fused_only and (cached is None or cached.strategy == DEQUANT):
        cached = _FUSED_BEST.get(key)
    if cached is not None:
        return cached
    major, _ = torch.cuda.get_device_capability(device)
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count
    if torch.cuda.is_current_stream_capturing() or not autotune_enabled() or not _budget_left():
        return _untimed_choice(key, g, r_pad, elem_bytes, n_sm, allow_dequant)

    import triton.testing

    skip = candidate_errors()
    candidates = _timed_candidates(key, g, r_pad, elem_bytes, major, n_sm, allow_dequant)
    if compile_candidate is not None:
        t0 = time.perf_counter()
        precompile([c for c in candidates if c.strategy == FUSED], compile_candidate)
        _spend(time.perf_counter() - t0)
    best, best_t, best_fused, best_fused_t = None, float("inf"), None, float("inf")
    for choice in candidates:
        if best is not None and not _budget_left():
            break
        fn = time_dequant if choice.strategy == DEQUANT else (lambda c=choice: time_candidate(c.config, c.split_k))
        t0 = time.perf_counter()
        try:
            ms = triton.testing.do_bench(fn, warmup=3, rep=15)
        except skip:  # cannot run on this GPU: skip the candidate
            continue
        finally:
            _spend(time.perf_counter() - t0)
        if ms < best_t:
            best, best_t = choice, ms
        if choice.strategy == FUSED and ms < best_fused_t:
            best_fused, best_fused_t = choice, ms
    if best is None:
        best = best_fused = _untimed_choice(key, g, r_pad, elem_bytes, n_sm, allow_dequant=False)
    if best_fused is not None:
        _FUSED_BEST[key] = best_fused
    if fused_only:
        return best_fused or best
    TUNING_CACHE.put(key, best)
    return best
