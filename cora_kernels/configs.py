"""Launch configurations of the CoRa kernels, as data, in one place.

* :data:`CONV_CONFIGS` -- the candidate tiles of ``_cora_conv2d_kernel`` (autotuned per shape key).
* :data:`INTERPRETER_CONFIG` -- the single config used under ``TRITON_INTERPRET=1`` (no tuning).
* :data:`REDUCE_CONFIG` -- the split-K reduction / epilogue kernel (memory-bound, not tuned).
* :func:`prune_configs` -- drops configs that cannot pay off for a shape (tiles much larger than the
  problem, shared memory over the device limit, accumulators that would spill).
* :func:`choose_split_k` -- split factor that fills the GPU when there are too few output tiles.

Register / shared-memory budget: every config below is compiled for sm_80 and sm_90 by
``tests/cora_kernels/test_compile.py``, which records REG / STACK / SHARED and fails on any spill.
Measured with triton 3.8 (fp16, bits 4, rank pad 16; sm_80 / sm_90), see the test output
(``pytest tests/cora_kernels/test_compile.py -s``); the configs that spilled are listed below and
left out.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ConvConfig",
    "CONV_CONFIGS",
    "INTERPRETER_CONFIG",
    "FALLBACK_CONFIG",
    "FP32_CONFIGS",
    "REDUCE_CONFIG",
    "prune_configs",
    "choose_split_k",
    "heuristic_config",
]


@dataclass(frozen=True)
class ConvConfig:
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
    ConvConfig(128, 128, 64, 8, 3),   # large M, large C_out (batch >= 64)
    ConvConfig(128, 64, 64, 8, 3),    # C_out = 64 layers, large M
    ConvConfig(64, 128, 64, 8, 3),
    ConvConfig(64, 64, 64, 4, 4),
    ConvConfig(32, 64, 128, 4, 4),    # batch 1 / small M (with split-K), weight-bound late layers, r_pad 16
    ConvConfig(32, 64, 64, 4, 4),     # the same for r_pad >= 32 (32x64x128 spills there: 16-24 B)
    ConvConfig(64, 32, 32, 4, 4),     # tiny C_in (the 7x7 stem, C_in = 3)
)
# Pruned because they spill (triton 3.8, all epilogue options on, rank pad 16; STACK bytes):
#   128x256x64 w8 s3 (sm_80 16-32, sm_90 736-808), 256x128x64 w8 s3 (sm_80 48-128, sm_90 96-112),
#   128x256x64 w4 (256 fp32 accumulators per thread), 128x64x64 w4 s2-s4 (sm_80 16-88),
#   64x128x64 w4 s3-s4 (sm_80 8, bits 3).

# Large adapter ranks (r_pad >= 128): small tiles keep the [BLOCK_M, r_pad] accumulator in registers.
FALLBACK_CONFIG = ConvConfig(32, 64, 32, 4, 2)

# fp32 activations: 3xTF32 dots (tensor cores, ~fp32 accuracy) and the gather unpack path; the
# 16-bit tiles spill there (ieee FMA dots at 128x128x64 w8: 10.7 KB of stack on sm_80; 3xTF32 with
# the aligned unpack: 80-1192 B), so fp32 has its own tiles.
FP32_CONFIGS: tuple[ConvConfig, ...] = (FALLBACK_CONFIG, ConvConfig(64, 64, 32, 4, 2), ConvConfig(128, 64, 32, 8, 3))

INTERPRETER_CONFIG = ConvConfig(32, 32, 32, 4, 1)
REDUCE_CONFIG = ConvConfig(64, 64, 32, 4, 1)  # BLOCK_K unused by the reduction

# Rough per-device shared memory limits (bytes per block, opt-in maximum).
_SMEM_LIMIT = {8: 163 * 1024, 9: 227 * 1024}


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _smem_bytes(cfg: ConvConfig, elem: int, r_pad: int) -> int:
    """Upper bound on the pipelined tiles (x tile, weight tile after unpacking, A tile)."""
    per_stage = (cfg.BLOCK_M * cfg.BLOCK_K + cfg.BLOCK_K * cfg.BLOCK_N + cfg.BLOCK_K * r_pad) * elem
    return per_stage * max(1, cfg.num_stages - 1)


def prune_configs(configs, *, M: int, C_in: int, C_out: int, r_pad: int, elem_bytes: int = 2,
                  capability_major: int = 8, aligned: bool = True) -> list[ConvConfig]:
    """Configs worth timing for this shape (never empty).

    ``aligned=False`` (C_in not a multiple of the codes per word: the gather unpack path, which
    stages 32 bits per code) drops BLOCK_K > 64: 32x64x128 spills there (sm_80, bf16, r 32).
    """
    if elem_bytes == 4:
        return list(FP32_CONFIGS)
    out = []
    limit = _SMEM_LIMIT.get(capability_major, _SMEM_LIMIT[8])
    for cfg in configs:
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
        out = [heuristic_config(M=M, C_in=C_in, C_out=C_out, r_pad=r_pad)]
    return out


def heuristic_config(*, M: int, C_in: int, C_out: int, r_pad: int = 0, elem_bytes: int = 2) -> ConvConfig:
    """A reasonable config without timing (CUDA-graph capture, or tuning disabled)."""
    if r_pad >= 128 or elem_bytes == 4:
        return FALLBACK_CONFIG
    if C_in < 32:
        return CONV_CONFIGS[6]
    if M <= 1024:
        return CONV_CONFIGS[4] if r_pad <= 16 else CONV_CONFIGS[5]
    if C_out <= 64:
        return CONV_CONFIGS[1]
    return CONV_CONFIGS[0]


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
