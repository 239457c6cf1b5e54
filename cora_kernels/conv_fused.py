"""The fused CoRa convolution: ``_cora_conv2d_kernel`` and its launcher :func:`cora_conv2d_triton`.

One launch computes

    y = conv(x; scale * (q - zero)) + conv1x1(conv_kxk(x; A); B) + bias
        -> y * out_scale + out_shift -> + residual -> activation

as an implicit GEMM over NHWC: rows ``M = N*OH*OW``, columns ``C_out``, reduction
``K = kh*kw*C_in`` in ``(kh, kw, C_in)`` order (the packed layout of :mod:`.packing`).

Per K step (one tap, ``BLOCK_K`` input channels) the kernel gathers the activation tile (zero
padding, stride and dilation live in the load mask), unpacks the weight tile and feeds the *same*
activation tile to two tensor-core products: ``acc += x @ (q - zero)`` and ``t += x @ A^T``.
The epilogue applies ``acc * scale[n] + t @ B^T`` and the rest.  The input is read once.

The activation is the constexpr ``ACT`` (:func:`cora_kernels.geometry.activation_code`: 0 none,
1 relu, 2 relu6, 3 silu, 4 hardswish, 5 exact erf gelu, 6 sigmoid, 7 hardsigmoid), applied last by
:func:`cora_kernels.jit_common.apply_activation` to the fp32 tile, before the one rounding to the output
dtype; the grouped kernel shares it (and the rest of the epilogue, :mod:`cora_kernels.jit_common`).

Numerics (documented choice):

* The zero point is subtracted from the unpacked codes *before* the dot, in fp32, then the tile
  is cast to the activation dtype: ``q - zero`` is exact in fp16/bf16 whenever ``zero`` is an
  integer (what the quantizer produces; |q - zero| <= 255).  The per-channel ``scale`` is applied
  once in the epilogue.  This avoids the row sums ``sum_k x`` that an epilogue-only zero-point
  correction needs, and the cancellation between ``scale * acc_q`` and ``scale * zero * sum_k x``.
* Accumulation is fp32.  fp32 activations use 3xTF32 dots on the GPU (``input_precision="tf32x3"``:
  tensor cores at about fp32 accuracy, no plain TF32) and exact fp32 under the interpreter.
* ``A`` and ``B`` are cast to the activation dtype for the dots; ``t`` is accumulated in fp32 and
  rounded to the activation dtype before the ``B`` product.  (For bf16, splitting ``t``/``B``/``A``
  into bf16 hi + lo parts was tried and dropped: it spilled on sm_80 and the bf16 error is
  dominated by the rounding of the output itself, ~1.6e-3 relative.)
* int8 adapters (``ADAPTER_Q``: ``a``/``b`` int8 with one fp32 scale per row, ``a_scale`` ``[r]``,
  ``b_scale`` ``[C_out]``): the int8 tiles are cast to the activation dtype before the dots (exact:
  |q| <= 127), ``t`` is scaled by ``a_scale`` in fp32 after the K loop (before its cast, so it
  cannot overflow fp16), and the ``B`` product accumulates into ``acc`` divided by ``b_scale``,
  which is multiplied back afterwards (see ``_int8_adapter_term``; an own tile for the adapter
  term spilled on sm_90).  The scales are applied to fp32 tiles only, in the same pass.
* Split-K (small M): each split writes ``scale * acc + t @ B^T`` of its K range to an fp32
  workspace (the adapter is linear, so each split applies B to its own partial t);
  ``_splitk_epilogue_kernel`` sums the splits and applies bias, BatchNorm, residual and the
  activation once, after the sum (the activation is not linear: it cannot run per split).

An fp16-weight control variant of the same kernel (``BITS = 16``: a dense ``[K, C_out]`` weight in
the activation dtype, no scale/zero) separates "Triton conv vs cuDNN" from "fewer weight bytes".

The launcher :func:`cora_conv2d_triton` runs in three steps: :func:`~cora_kernels.geometry.check_conv_args`
validates the call (and :func:`records` turns it into a :class:`~cora_kernels.records.PackedWeight` and an
:class:`~cora_kernels.records.Epilogue`), :func:`select` asks :func:`cora_kernels.tuning.select_config` for
the strategy (this kernel, or :mod:`cora_kernels.dequantize`) and the :class:`~cora_kernels.tuning.ConvConfig`,
then the launch: :func:`layer_args` puts the weight side in the kernel's layout (contiguous planes,
variant flags, dot precision), :func:`kernel_input` gives the input NHWC storage, and :func:`bind_launch`
binds every argument that depends only on the input's shape and layout and starts the kernel (plus the
split-K reduction).  :class:`cora_kernels.prepared.PreparedConv` keeps the first and the bound launch
per layer and input key, so that a deployed conv repeats none of it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import tuning
from .cost_model import DEQUANT, FUSED, STRATEGIES
from .dequantize import cora_conv2d_dequant
from .environment import is_interpreting
from .geometry import ConvGeometry, activation_code, cdiv, check_conv_args, next_power_of_2, out_memory_format, rank_pad
from .jit_common import cast_to, epilogue_store, mma, nhwc_strides
from .packing import plane_bits
from .records import Epilogue, PackedWeight
from .packing_jit import load_codes_aligned, load_codes_gather

__all__ = ["cora_conv2d_triton", "dense_gemm_weight", "rank_pad", "layer_args", "kernel_input", "new_output", "tune_key",
           "records", "select", "bind_launch"]


@triton.jit
def _int8_adapter_term(acc, t, bt, sa_ptr, sb_ptr, offs_r, r_mask, offs_n, n_mask,
                       dt: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + sb[n] * ((t * sa[j]) @ qb^T)`` for int8 ``B`` codes ``bt`` ``[R_PAD, BLOCK_N]``.

    ``sa`` scales the fp32 ``t`` before its cast (no fp16 overflow); the int8 tile is exact in the
    activation dtype.  The product accumulates into ``acc`` itself, as ``sb * (acc / sb + t' @ qb)``:
    a second fp32 [BLOCK_M, BLOCK_N] tile for the adapter term spilled on sm_90 (128x128 tiles),
    and the division costs at most a few fp32 ulps of the main term.  A column whose ``|sb|`` is
    below 1e-30 (zero rows of B, masked columns) has its adapter term dropped and is left as it is.
    """
    sa = tl.load(sa_ptr + offs_r, mask=r_mask, other=0.0).to(tl.float32)
    sb = tl.load(sb_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    b_on = tl.abs(sb) >= 1e-30
    sb = tl.where(b_on, sb, 1.0)
    bt = tl.where(b_on[None, :], bt, 0)
    acc = acc * (1.0 / sb)[None, :]
    acc = mma(cast_to(t * sa[None, :], dt, UPCAST), cast_to(bt, dt, UPCAST), acc, DOT_PREC, UPCAST)
    return acc * sb[None, :]


@triton.jit
def _cora_conv2d_kernel(
    x_ptr, w0_ptr, w1_ptr, scale_ptr, zero_ptr, a_ptr, b_ptr, sa_ptr, sb_ptr,
    bias_ptr, oscale_ptr, oshift_ptr, res_ptr, out_ptr, ws_ptr,
    M, C_in, H, W, C_out, OH, OW, KW, R,
    n_cblk, total_steps, steps_per_split,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sxn, sxh, sxw, sxc,
    sar, sak, sbn, sbr,
    son, soh, sow, soc,
    srn, srh, srw, src,
    BITS: tl.constexpr, ALIGNED: tl.constexpr, R_PAD: tl.constexpr, ADAPTER_Q: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BN: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
    SPLIT_K: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    dt = x_ptr.dtype.element_ty
    # grouped tile order: GROUP_M row tiles share the weight columns while they are in L2
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(C_out, BLOCK_N)
    num_in_group = GROUP_M * num_pid_n
    group_id = pid // num_in_group
    first_m = group_id * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % num_in_group) % group_size)
    pid_n = (pid % num_in_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < C_out

    # output row -> (image, oh, ow) -> top-left input pixel
    ow = offs_m % OW
    tmp = offs_m // OW
    oh = tmp % OH
    nb = tmp // OH
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_rows = x_ptr + nb.to(tl.int64) * sxn

    if BITS != 16:
        zp = tl.load(zero_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if R_PAD > 0:
        offs_r = tl.arange(0, R_PAD)
        r_mask = offs_r < R
        t = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)

    step_lo = pid_k * steps_per_split
    step_hi = tl.minimum(step_lo + steps_per_split, total_steps)
    for step in range(step_lo, step_hi):
        tap = step // n_cblk
        c0 = (step - tap * n_cblk) * BLOCK_K
        kh = tap // KW
        kw = tap - kh * KW
        ih = ih0 + kh * dil_h
        iw = iw0 + kw * dil_w
        row_ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        cc = c0 + offs_k
        c_ok = cc < C_in
        x_off = ih * sxh + iw * sxw
        xt = tl.load(x_rows[:, None] + x_off[:, None] + cc[None, :] * sxc,
                     mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        k0 = tap * C_in + c0
        kk = k0 + offs_k
        if BITS == 16:
            wt = tl.load(w0_ptr + kk[:, None] * C_out + offs_n[None, :],
                         mask=c_ok[:, None] & n_mask[None, :], other=0.0).to(dt)
        else:
            if ALIGNED:
                q = load_codes_aligned(w0_ptr, w1_ptr, k0, tap * C_in + C_in, offs_n, n_mask, C_out,
                                       BITS, BLOCK_K)
            else:
                q = load_codes_gather(w0_ptr, w1_ptr, kk, offs_n, c_ok[:, None] & n_mask[None, :], C_out,
                                      BITS)
            wt = (q.to(tl.float32) - zp[None, :]).to(dt)
        acc = mma(xt, wt, acc, DOT_PREC, UPCAST)
        if R_PAD > 0:
            at = tl.load(a_ptr + offs_r[None, :] * sar + kk[:, None] * sak,
                         mask=c_ok[:, None] & r_mask[None, :], other=0)
            t = mma(xt, cast_to(at, dt, UPCAST), t, DOT_PREC, UPCAST)

    if BITS != 16:
        sc = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc = acc * sc[None, :]
    if R_PAD > 0:
        bt = tl.load(b_ptr + offs_n[None, :] * sbn + offs_r[:, None] * sbr,
                     mask=r_mask[:, None] & n_mask[None, :], other=0)
        if ADAPTER_Q:
            acc = _int8_adapter_term(acc, t, bt, sa_ptr, sb_ptr, offs_r, r_mask, offs_n, n_mask, dt, DOT_PREC, UPCAST)
        else:
            acc = mma(cast_to(t, dt, UPCAST), cast_to(bt, dt, UPCAST), acc, DOT_PREC, UPCAST)

    if SPLIT_K == 1:
        epilogue_store(acc, offs_m, offs_n, m_mask, n_mask, OH, OW,
                       bias_ptr, oscale_ptr, oshift_ptr, res_ptr, out_ptr,
                       son, soh, sow, soc, srn, srh, srw, src,
                       HAS_BIAS, HAS_BN, HAS_RES, ACT, UPCAST)
    else:
        ws = ws_ptr + pid_k * M * C_out  # split-K only runs for small M: int32 offsets suffice
        tl.store(ws + offs_m[:, None] * C_out + offs_n[None, :], acc,
                 mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _splitk_epilogue_kernel(
    ws_ptr, bias_ptr, oscale_ptr, oshift_ptr, res_ptr, out_ptr,
    M, C_out, OH, OW, split_k,
    son, soh, sow, soc,
    srn, srh, srw, src,
    HAS_BIAS: tl.constexpr, HAS_BN: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Sum the fp32 split-K partials ``ws[split, M, C_out]`` and run the epilogue."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < C_out
    mask = m_mask[:, None] & n_mask[None, :]
    ws_tile = ws_ptr + offs_m[:, None] * C_out + offs_n[None, :]  # split-K only runs for small M
    y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(split_k):  # a dynamic loop: one partial tile live at a time
        y += tl.load(ws_tile + s * M * C_out, mask=mask, other=0.0)
    epilogue_store(y, offs_m, offs_n, m_mask, n_mask, OH, OW,
                   bias_ptr, oscale_ptr, oshift_ptr, res_ptr, out_ptr,
                   son, soh, sow, soc, srn, srh, srw, src,
                   HAS_BIAS, HAS_BN, HAS_RES, ACT, UPCAST)


# ----------------------------------------------------------------------------------------------
# launcher: check -> prepare -> (choose a config) -> launch
# ----------------------------------------------------------------------------------------------

def dense_gemm_weight(qweight, scale, zero, bits: int, K: int, dtype) -> torch.Tensor:
    """The fp16-weight control's weight: dequantized ``[K, C_out]`` in ``dtype`` (contiguous)."""
    from .reference import dequantize_gemm

    return dequantize_gemm(qweight, scale, zero, bits, K, torch.float32).t().contiguous().to(dtype)


@dataclass(frozen=True, eq=False)
class _LayerArgs:
    """The weight side of a launch, the same for every call of a layer at one activation dtype: tensors in
    the kernel's layout, the kernel's variant flags.  Missing optional tensors are ``scale`` (never read:
    their flag is off)."""

    w0: torch.Tensor              # first packed plane int32 [words, C_out], or the dense [K, C_out]
    w1: torch.Tensor              # second plane (bits 3), else w0
    scale: torch.Tensor           # [C_out]
    zero: torch.Tensor            # [C_out]
    a: torch.Tensor               # [r, K] (float, or int8 with a_scale) or scale
    b: torch.Tensor               # [C_out, r] (float, or int8 with b_scale) or scale
    a_scale: torch.Tensor         # [r] fp32 (int8 adapters) or scale
    b_scale: torch.Tensor         # [C_out] fp32 (int8 adapters) or scale
    bias: torch.Tensor            # [C_out] or scale
    out_scale: torch.Tensor       # [C_out] or scale
    out_shift: torch.Tensor       # [C_out] or scale
    a_strides: tuple              # (r, k), (0, 0) without adapter
    b_strides: tuple              # (n, r), (0, 0) without adapter
    bits: int                     # 2, 3, 4, 8, or 16 for the dense-weight control
    codes_per_word: int           # most codes per int32 word over the planes (1 for dense)
    r_pad: int                    # adapter rank padded for tl.dot (0: no adapter)
    adapter_q: bool               # int8 adapters with per-row scales
    has_bias: bool
    has_bn: bool
    act: int                      # ACT code (geometry.activation_code)
    dot_prec: str                 # tl.dot input_precision
    upcast: bool                  # bf16 under the interpreter (see mma / cast_to)
    aligned_ok: bool              # the aligned unpack path may apply (also needs BLOCK_K % per == 0)


def layer_args(w: PackedWeight, ep: Epilogue, g: ConvGeometry, dtype: torch.dtype, dense_weight=None) -> _LayerArgs:
    """The weight side of the fused kernel's launch for ``w`` / ``ep`` at activation ``dtype``
    (``dense_weight``: the fp16-weight control's ``[K, C_out]`` instead of the codes)."""
    r = g.rank
    fill = w.scale
    if dense_weight is not None:
        if tuple(dense_weight.shape) != (g.K, g.C_out) or dense_weight.device != w.scale.device:
            raise ValueError(f"dense_weight must be [K={g.K}, C_out={g.C_out}] on {w.scale.device}")
        kbits, per = 16, 1
        w0 = w1 = dense_weight.to(dtype).contiguous()
    else:
        kbits = w.bits
        w0 = w.planes[0].contiguous()
        w1 = w.planes[1].contiguous() if len(w.planes) > 1 else w0
        per = max(32 // pb for pb in plane_bits(w.bits))
    adapter_q = r > 0 and w.int8_adapter
    return _LayerArgs(
        w0=w0, w1=w1, scale=w.scale.contiguous(), zero=w.zero.contiguous(),
        a=w.a if r > 0 else fill, b=w.b if r > 0 else fill,
        a_scale=w.a_scale.contiguous() if adapter_q else fill, b_scale=w.b_scale.contiguous() if adapter_q else fill,
        bias=w.bias if w.bias is not None else fill,
        out_scale=ep.out_scale if ep.has_bn else fill, out_shift=ep.out_shift if ep.has_bn else fill,
        a_strides=(w.a.stride(0), w.a.stride(1)) if r > 0 else (0, 0),
        b_strides=(w.b.stride(0), w.b.stride(1)) if r > 0 else (0, 0),
        bits=kbits, codes_per_word=per, r_pad=rank_pad(r), adapter_q=adapter_q,
        has_bias=w.bias is not None, has_bn=ep.has_bn, act=ep.act,
        # fp32: 3xTF32 on the GPU (tensor cores, ~fp32 accuracy); the interpreter computes in fp32 anyway
        dot_prec=("ieee" if is_interpreting() else "tf32x3") if dtype == torch.float32 else "tf32",
        upcast=dtype == torch.bfloat16 and is_interpreting(),
        # fp32 keeps the gather unpack: the register expansion of the aligned path spills with 3xTF32
        aligned_ok=(kbits != 16 and g.C_in % per == 0 and (dtype != torch.float32 or is_interpreting())),
    )


def kernel_input(x: torch.Tensor, g: ConvGeometry) -> torch.Tensor:
    """x as the kernel reads it: NHWC storage, since the gather reads C_in-contiguous rows (a copy for
    NCHW input; as given when C_in == 1, where both layouts are the same)."""
    return x.contiguous(memory_format=torch.channels_last) if g.C_in > 1 else x


def bind_launch(L: _LayerArgs, g: ConvGeometry, cfg: tuning.ConvConfig, split: int, x_strides, out_strides,
                res_strides=None):
    """Everything of a launch that does not change between calls with the same input key, bound once:
    returns ``run(x, out, residual, compile_only=False) -> out``, which starts the kernel (and the split-K
    reduction when ``split > 1``) with config ``cfg`` on ``x`` (NHWC storage, :func:`kernel_input`) into
    ``out`` (``[N, C_out, OH, OW]``, x's dtype).  ``x_strides``, ``out_strides``, ``res_strides`` are the
    tensors' (n, h, w, c) strides (:func:`~cora_kernels.jit_common.nhwc_strides`; ``res_strides`` None: no
    residual).  ``compile_only`` compiles the kernels the launch needs (Triton's ``warmup``), runs nothing."""
    M = g.M
    n_cblk = cdiv(g.C_in, cfg.BLOCK_K)
    total = g.KH * g.KW * n_cblk
    split = max(1, min(int(split), total))
    per_split = cdiv(total, split)
    split = cdiv(total, per_split)  # no empty splits
    has_res = res_strides is not None
    flags = dict(HAS_BIAS=L.has_bias, HAS_BN=L.has_bn, HAS_RES=has_res, ACT=L.act)
    weights = (L.w0, L.w1, L.scale, L.zero, L.a, L.b, L.a_scale, L.b_scale, L.bias, L.out_scale, L.out_shift)
    res_s = tuple(res_strides) if has_res else (0, 0, 0, 0)
    ints = (M, g.C_in, g.H, g.W, g.C_out, g.OH, g.OW, g.KW, g.rank, n_cblk, total, per_split,
            g.stride[0], g.stride[1], g.padding[0], g.padding[1], g.dilation[0], g.dilation[1],
            *x_strides, *L.a_strides, *L.b_strides, *out_strides, *res_s)
    meta = dict(BITS=L.bits, ALIGNED=L.aligned_ok and cfg.BLOCK_K % L.codes_per_word == 0, R_PAD=L.r_pad,
                ADAPTER_Q=L.adapter_q, SPLIT_K=split, DOT_PREC=L.dot_prec, UPCAST=L.upcast,
                BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                # with split-K the epilogue runs in the reduction kernel, after the splits are summed
                **(flags if split == 1 else dict(HAS_BIAS=False, HAS_BN=False, HAS_RES=False, ACT=0)))
    grid = (cdiv(M, cfg.BLOCK_M) * cdiv(g.C_out, cfg.BLOCK_N), split)
    rc = tuning.REDUCE_CONFIG
    grid2 = (cdiv(M, rc.BLOCK_M), cdiv(g.C_out, rc.BLOCK_N))
    ints2 = (M, g.C_out, g.OH, g.OW, split, *out_strides, *res_s)
    meta2 = dict(UPCAST=L.upcast, BLOCK_M=rc.BLOCK_M, BLOCK_N=rc.BLOCK_N, num_warps=rc.num_warps, **flags)
    main = _cora_conv2d_kernel[grid]

    def run(x, out, residual, compile_only=False):
        res = out if residual is None else residual
        if split == 1 and not compile_only:
            main(x, *weights, res, out, out, *ints, **meta)
            return out
        ws = torch.empty((split, M, g.C_out), device=out.device, dtype=torch.float32) if split > 1 else out
        _start(_cora_conv2d_kernel, grid, compile_only)(x, *weights, res, out, ws, *ints, **meta)
        if split > 1:
            reduce = _start(_splitk_epilogue_kernel, grid2, compile_only)
            reduce(ws, L.bias, L.out_scale, L.out_shift, res, out, *ints2, **meta2)
        return out

    return run


def _launch(L: _LayerArgs, g: ConvGeometry, x: torch.Tensor, out: torch.Tensor, residual, cfg: tuning.ConvConfig,
            split: int, compile_only: bool = False) -> torch.Tensor:
    """One launch with config ``cfg`` (see :func:`bind_launch`, bound and run at once); returns ``out``."""
    bound = bind_launch(L, g, cfg, split, nhwc_strides(x), nhwc_strides(out),
                        None if residual is None else nhwc_strides(residual))
    return bound(x, out, residual, compile_only)


def _start(kernel, grid, compile_only: bool):
    """``kernel[grid]``, or with ``compile_only`` its ``warmup`` (compiles, launches nothing; inside Triton's
    ``AsyncCompileMode`` the compilation goes to that mode's executor)."""
    if compile_only:
        return lambda *args, **meta: kernel.warmup(*args, grid=grid, **meta)
    return kernel[grid]


def new_output(x: torch.Tensor, g: ConvGeometry) -> torch.Tensor:
    """An empty ``[N, C_out, OH, OW]`` in x's dtype, device and memory format."""
    return torch.empty((g.N, g.C_out, g.OH, g.OW), device=x.device, dtype=x.dtype, memory_format=out_memory_format(x))


def tune_key(x, g: ConvGeometry, w: PackedWeight, dense: bool, has_residual: bool) -> tuning.TuneKey:
    """The :class:`~cora_kernels.tuning.TuneKey` of a call (``dense``: the fp16-weight control, bits 16)."""
    per = 1 if dense else max(32 // pb for pb in plane_bits(w.bits))
    return tuning.TuneKey(
        C_in=g.C_in, C_out=g.C_out, KH=g.KH, KW=g.KW, stride=g.stride, dilation=g.dilation, padding=g.padding,
        bits=16 if dense else w.bits, r_pad=rank_pad(g.rank), dtype=str(x.dtype).removeprefix("torch."),
        m_bucket=next_power_of_2(g.M), has_residual=has_residual,
        device=tuning.device_name(x.device), aligned=g.C_in % per == 0, int8_adapter=g.rank > 0 and w.int8_adapter)


def records(qweight, scale, zero, a, b, bias, g: ConvGeometry, *, bits, a_scale, b_scale, out_scale, out_shift,
            act: int) -> tuple[PackedWeight, Epilogue]:
    """The call's arguments (validated: ``g`` from :func:`~cora_kernels.geometry.check_conv_args`) as records;
    a rank-0 adapter is no adapter."""
    if g.rank == 0:
        a = b = a_scale = b_scale = None
    w = PackedWeight(tuple(qweight), scale, zero, bits, (g.KH, g.KW), g.stride, g.padding, g.dilation, g.groups,
                     a, b, a_scale, b_scale, bias, g.C_in)
    return w, Epilogue(out_scale, out_shift, act)


def cora_conv2d_triton(x, qweight, scale, zero, a=None, b=None, bias=None, *, bits, kernel_size, stride=1,
                       padding=0, dilation=1, out_scale=None, out_shift=None, residual=None, relu=False,
                       groups=1, in_channels=None, dense_weight=None, config=None, split_k=None, a_scale=None,
                       b_scale=None, activation=None, strategy=None):
    """A ``groups == 1`` CoRa conv on the Triton backend: the fused kernel (see the module docstring) or
    the dequantize strategy (:mod:`cora_kernels.dequantize`), whichever :func:`cora_kernels.tuning.select_config`
    chooses for the call's shape class, batch bucket, dtype and GPU model.

    Shapes: x ``[N, C_in, H, W]`` (fp32/fp16/bf16, NCHW or channels_last); ``qweight`` the packed
    planes of codes ``[C_out, K]`` (:func:`cora_kernels.packing.pack_codes`); ``scale``, ``zero``
    ``[C_out]``; ``a`` ``[r, K]``, ``b`` ``[C_out, r]`` or None (floating, or int8 with ``a_scale``
    ``[r]`` and ``b_scale`` ``[C_out]``: one symmetric scale per row); ``bias``, ``out_scale``,
    ``out_shift`` ``[C_out]`` or None; ``residual`` ``[N, C_out, OH, OW]`` or None; ``activation``
    None or a name of :data:`cora_kernels.geometry.ACTIVATIONS` (``relu=True`` means "relu").
    Returns ``[N, C_out, OH, OW]`` in x's dtype and memory format.

    Test / benchmark hooks: ``dense_weight`` (``[K, C_out]`` in x's dtype) selects the fp16-weight
    control variant of the fused kernel; ``config`` (:class:`~cora_kernels.tuning.ConvConfig`) and
    ``split_k`` run the fused kernel with them, bypassing the tuner; ``strategy`` (``"fused"`` or
    ``"dequant"``) forces one strategy.  ``groups > 1`` is not handled here: the op routes it to the
    direct grouped kernel (:func:`cora_kernels.conv_depthwise.cora_conv2d_grouped_triton`).
    """
    g = check_conv_args(x, qweight, scale, zero, a, b, bias, bits=bits, kernel_size=kernel_size, stride=stride,
                        padding=padding, dilation=dilation, out_scale=out_scale, out_shift=out_shift,
                        residual=residual, groups=groups, in_channels=in_channels, a_scale=a_scale,
                        b_scale=b_scale, relu=relu, activation=activation)
    if g.groups != 1:
        raise NotImplementedError("the fused kernel supports groups == 1 only; groups > 1 runs "
                                  "cora_conv2d_grouped_triton (conv_depthwise)")
    if strategy not in (None, *STRATEGIES):
        raise ValueError(f"strategy must be None or one of {STRATEGIES}, got {strategy!r}")
    if strategy == DEQUANT and (dense_weight is not None or config is not None):
        raise ValueError("strategy='dequant' takes no dense_weight or config (they are the fused kernel's)")
    w, ep = records(qweight, scale, zero, a, b, bias, g, bits=bits, a_scale=a_scale, b_scale=b_scale,
                    out_scale=out_scale, out_shift=out_shift, act=activation_code(activation, relu))
    if config is None:
        choice = select(x, g, w, ep, residual, dense_weight=dense_weight, fused_only=strategy == FUSED,
                        force_dequant=strategy == DEQUANT)
        if choice.strategy == DEQUANT:
            return cora_conv2d_dequant(x, w, ep, residual, g)
        config = choice.config
        if split_k is None:
            split_k = choice.split_k
    L = layer_args(w, ep, g, x.dtype, dense_weight)
    return _launch(L, g, kernel_input(x, g), new_output(x, g), residual, config, split_k or 1)


def select(x, g: ConvGeometry, w: PackedWeight, ep: Epilogue, residual, *, dense_weight=None, fused_only=False,
           force_dequant=False) -> tuning.TuneChoice:
    """The tuner's choice for this call (:func:`cora_kernels.tuning.select_config`), with the candidates it
    may time: the fused kernel per (config, split) and, unless ``dense_weight`` (the control) or
    ``fused_only``, the dequantize strategy.  ``force_dequant``: :data:`~cora_kernels.tuning.DEQUANT_CHOICE`."""
    if force_dequant:
        return tuning.DEQUANT_CHOICE
    key = tune_key(x, g, w, dense_weight is not None, residual is not None)
    L = None

    def fused(cfg, split):
        nonlocal L
        if L is None:
            L = layer_args(w, ep, g, x.dtype, dense_weight)
        return _launch(L, g, kernel_input(x, g), new_output(x, g), residual, cfg, split)

    def compile_fused(cfg, split):
        nonlocal L
        if L is None:
            L = layer_args(w, ep, g, x.dtype, dense_weight)
        _launch(L, g, kernel_input(x, g), new_output(x, g), residual, cfg, split, compile_only=True)

    def dequant():
        return cora_conv2d_dequant(x, w, ep, residual, g)

    return tuning.select_config(key, g, rank_pad(g.rank), x.element_size(), fused, x.device,
                                time_dequant=dequant if dense_weight is None else None, fused_only=fused_only,
                                compile_candidate=compile_fused)
