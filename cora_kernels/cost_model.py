"""Untimed estimates that order launch choices: which strategy, and which fused configs are worth timing.

Two strategies run a ``groups == 1`` CoRa conv (:mod:`cora_kernels.conv_fused`, :mod:`cora_kernels.dequantize`):

* ``fused``: one implicit-GEMM kernel reads the packed codes (``bits/8`` bytes per weight) and the
  activations once; its tensor-core efficiency is below cuDNN's own tuned convolutions;
* ``dequant``: a small kernel writes the effective weight in 16 bits (read packed, write 2 bytes, and the
  conv reads those 2 bytes again), one more launch, then cuDNN at its own efficiency.

With ``F = 2·M·K·C_out`` the multiply-adds (``M`` = batch × output pixels, ``K = kh·kw·C_in``) and
``E = K·C_out`` the weights, the estimated times are

    fused   = max(F / (P · e_fused) + E · bits/8 / BW,  waves · steps · t_step)
    dequant = t_launch + E · (bits/8 + 2 + 2) / BW + max(F / (P · e_vendor), t_vendor_min)

so the fused kernel wins where the arithmetic intensity ``F / E = 2·M`` is low (small batches, late layers:
the weight bytes dominate), the dequantize strategy where it is high. The second term of the fused estimate is
its latency: a tile's K loop runs ``steps = kh·kw·ceil(C_in / 64)`` dependent steps, and ``waves = ceil(tiles
· split / SMs)`` rounds of 64×64 tiles run one after the other, each over ``steps / split`` of them (split-K
as :func:`cora_kernels.tuning.choose_split_k` picks it, plus the reduction's launch; the 7×7 stem with C_in =
3 is 49 short steps per tile); ``t_vendor_min`` is the shortest cuDNN conv seen. The constants below are
*estimates* for a Hopper-class GPU (fp16 dense ``P`` and copy bandwidth ``BW`` of the H100 / H200 class; the
efficiencies from the first H200 run, where the untuned fused kernel reached 0.43-1.46x cuDNN on ResNet-18
layers at batch 1, and an extra launch inside a CUDA graph costs a few microseconds). They only decide when
nothing was timed: with tuning on, both strategies are timed and the faster one is kept.

:func:`rank_fused_candidates` orders fused (config, split-K) pairs by a wave model of the same kind, so
that only a handful per shape are compiled and timed.
"""
from __future__ import annotations

import math

__all__ = ["FUSED", "DEQUANT", "STRATEGIES", "estimate_seconds", "untimed_strategy", "rank_fused_candidates",
           "MAX_TIMED_FUSED"]

FUSED = "fused"
DEQUANT = "dequant"
STRATEGIES = (FUSED, DEQUANT)

# Estimates (see the module docstring); 16-bit activations.
PEAK_FLOPS = 700e12        # dense fp16 tensor-core FLOP/s reachable by a tuned GEMM (H100 / H200 class)
BANDWIDTH = 3.0e12         # bytes/s, what a streaming kernel reaches (H100 SXM ~3.0, H200 ~4.3 measured copy)
FUSED_EFFICIENCY = 0.35    # the fused kernel's share of PEAK_FLOPS (untuned H200 run: 0.43-1.46x cuDNN at batch 1)
VENDOR_EFFICIENCY = 0.70   # cuDNN's share
EXTRA_LAUNCH_S = 3e-6      # one more kernel inside a CUDA graph (the dequantize kernel)
STEP_LATENCY_S = 0.35e-6   # one K step of a fused tile (H200, the 7x7 stem: ~3 waves x 49 steps in 49.9 us)
VENDOR_MIN_S = 10e-6       # the shortest cuDNN fp16 conv of the H200 run (10.9-24.6 us per layer, batch 1, graphs)
NOMINAL_SMS = 132          # H100 SXM / H200
FP32_SLOWDOWN = 3.0        # fp32 activations: the fused kernel's 3xTF32 dots against cuDNN's fp32 path

MAX_TIMED_FUSED = 4        # fused (config, split) pairs timed per shape, best estimates first


def estimate_seconds(strategy: str, *, M: int, K: int, C_out: int, bits: int, elem_bytes: int = 2,
                     taps: int = 1) -> float:
    """The estimated time of one call by ``strategy`` (module docstring); only its order matters.
    ``taps`` = kh·kw (so that ``K / taps`` is C_in)."""
    flops = 2.0 * M * K * C_out
    weights = float(K) * C_out
    if strategy == FUSED:
        slow = FP32_SLOWDOWN if elem_bytes == 4 else 1.0
        throughput = flops * slow / (PEAK_FLOPS * FUSED_EFFICIENCY) + weights * bits / 8 / BANDWIDTH
        steps = taps * math.ceil(K / taps / 64)
        tiles = math.ceil(M / 64) * math.ceil(C_out / 64)
        split = 1 if tiles >= NOMINAL_SMS // 2 or steps < 8 else min(-(-NOMINAL_SMS // tiles), steps // 4, 16)
        waves = math.ceil(tiles * split / NOMINAL_SMS)
        latency = waves * math.ceil(steps / split) * STEP_LATENCY_S + (EXTRA_LAUNCH_S if split > 1 else 0.0)
        return max(throughput, latency)
    if strategy == DEQUANT:
        return (EXTRA_LAUNCH_S + weights * (bits / 8 + 2 * elem_bytes) / BANDWIDTH
                + max(flops / (PEAK_FLOPS * VENDOR_EFFICIENCY), VENDOR_MIN_S))
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")


def untimed_strategy(*, M: int, K: int, C_out: int, bits: int, elem_bytes: int = 2, taps: int = 1) -> str:
    """The strategy whose :func:`estimate_seconds` is lower (ties: fused, which needs no scratch)."""
    kw = dict(M=M, K=K, C_out=C_out, bits=bits, elem_bytes=elem_bytes, taps=taps)
    return DEQUANT if estimate_seconds(DEQUANT, **kw) < estimate_seconds(FUSED, **kw) else FUSED


def _fused_estimate(cfg, split: int, *, M: int, K: int, C_out: int, bits: int, elem_bytes: int, n_sm: int) -> float:
    """A wave model of one fused launch: tiles run ``n_sm`` at a time; a tile's K loop costs the larger of its
    MMA time and its load time (activation tile + packed weight tile); small tiles reuse less, so each tile's
    MMA rate is scaled by ``BM·BN / (BM·BN + 64·(BM + BN))``; split-K adds the fp32 partials' round trip."""
    tiles = math.ceil(M / cfg.BLOCK_M) * math.ceil(C_out / cfg.BLOCK_N)
    waves = math.ceil(tiles * split / n_sm)
    k_per_split = math.ceil(K / split)
    area = cfg.BLOCK_M * cfg.BLOCK_N
    reuse = area / (area + 64 * (cfg.BLOCK_M + cfg.BLOCK_N))
    mma = 2.0 * area * k_per_split / (PEAK_FLOPS / n_sm * reuse)
    loads = k_per_split * (cfg.BLOCK_M * elem_bytes + cfg.BLOCK_N * bits / 8) / (BANDWIDTH / n_sm)
    t = waves * max(mma, loads)
    if split > 1:
        t += EXTRA_LAUNCH_S + 2.0 * split * M * C_out * 4 / BANDWIDTH
    return t


def rank_fused_candidates(pairs, *, M: int, K: int, C_out: int, bits: int, elem_bytes: int, n_sm: int,
                          keep: int = MAX_TIMED_FUSED, must_keep=None) -> list:
    """The ``keep`` (config, split) pairs of ``pairs`` with the lowest :func:`_fused_estimate`, best first;
    ``must_keep`` (e.g. the untimed choice) is always among them, so timing never does worse than not timing."""
    kw = dict(M=M, K=K, C_out=C_out, bits=bits, elem_bytes=elem_bytes, n_sm=n_sm)
    ranked = sorted(dict.fromkeys(pairs), key=lambda p: _fused_estimate(p[0], p[1], **kw))
    out = ranked[:keep]
    if must_keep is not None and must_keep not in out:
        out = out[: max(0, keep - 1)] + [must_keep]
    return out
