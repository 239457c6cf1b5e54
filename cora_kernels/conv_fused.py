"""The fused CoRa convolution: ``_cora_conv2d_kernel`` and its launcher :func:`cora_conv2d`.

One launch computes

    y = conv(x; scale * (q - zero)) + conv1x1(conv_kxk(x; A); B) + bias
        -> y * out_scale + out_shift -> + residual -> relu

as an implicit GEMM over NHWC: rows ``M = N*OH*OW``, columns ``C_out``, reduction
``K = kh*kw*C_in`` in ``(kh, kw, C_in)`` order (the packed layout of :mod:`.packing`).

Per K step (one tap, ``BLOCK_K`` input channels) the kernel gathers the activation tile (zero
padding, stride and dilation live in the load mask), unpacks the weight tile and feeds the *same*
activation tile to two tensor-core products: ``acc += x @ (q - zero)`` and ``t += x @ A^T``.
The epilogue applies ``acc * scale[n] + t @ B^T`` and the rest.  The input is read once.

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
* Split-K (small M): each split writes ``scale * acc + t @ B^T`` of its K range to an fp32
  workspace (the adapter is linear, so each split applies B to its own partial t);
  ``_splitk_epilogue_kernel`` sums the splits and applies bias, BatchNorm, residual and ReLU.

An fp16-weight control variant of the same kernel (``BITS = 16``: a dense ``[K, C_out]`` weight in
the activation dtype, no scale/zero) separates "Triton conv vs cuDNN" from "fewer weight bytes".
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import configs as _cfgs
from ._common import check_conv_args, out_memory_format
from .packing import plane_bits
from .packing_jit import load_codes_aligned, load_codes_gather

__all__ = ["cora_conv2d", "dense_gemm_weight", "rank_pad", "is_interpreting"]


def is_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def rank_pad(r: int) -> int:
    """Rank padded for ``tl.dot``: 0 (no adapter) or a power of two >= 16."""
    if r <= 0:
        return 0
    return max(16, triton.next_power_of_2(r))


@triton.jit
def _mma(a, b, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: the triton 3.8 interpreter multiplies the raw bits of bf16 operands (np.matmul on
    # their uint16 storage); bf16 -> fp32 is exact, so upcasting there keeps the same numerics.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _cast(v, dt: tl.constexpr, UPCAST: tl.constexpr):
    # Under the interpreter (UPCAST) fp32 -> bf16 truncates; round to nearest even by hand there.
    if UPCAST and dt == tl.bfloat16:
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dt)


@triton.jit
def _epilogue_store(y, offs_m, offs_n, m_mask, n_mask, OH, OW,
                    bias_ptr, oscale_ptr, oshift_ptr, res_ptr, out_ptr,
                    son, soh, sow, soc, srn, srh, srw, src,
                    HAS_BIAS: tl.constexpr, HAS_BN: tl.constexpr, HAS_RES: tl.constexpr,
                    RELU: tl.constexpr, UPCAST: tl.constexpr):
    """bias -> folded BN -> residual -> ReLU on an fp32 tile, then store in out's dtype."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        y = y + bias[None, :]
    if HAS_BN:
        osc = tl.load(oscale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        osh = tl.load(oshift_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        y = y * osc[None, :] + osh[None, :]
    ow = offs_m % OW
    tmp = offs_m // OW
    oh = tmp % OH
    nb = (tmp // OH).to(tl.int64)
    mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RES:
        r_off = nb * srn + oh * srh + ow * srw
        res = tl.load(res_ptr + r_off[:, None] + offs_n[None, :] * src, mask=mask, other=0.0)
        y = y + res.to(tl.float32)
    if RELU:
        y = tl.maximum(y, 0.0)
    o_off = nb * son + oh * soh + ow * sow
    tl.store(out_ptr + o_off[:, None] + offs_n[None, :] * soc, _cast(y, out_ptr.dtype.element_ty, UPCAST), mask=mask)


@triton.jit
def _cora_conv2d_kernel(
    x_ptr, w0_ptr, w1_ptr, scale_ptr, zero_ptr, a_ptr, b_ptr,
    bias_ptr, oscale_ptr, oshift_ptr, res_ptr, out_ptr, ws_ptr,
    M, C_in, H, W, C_out, OH, OW, KW, R,
    n_cblk, total_steps, steps_per_split,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sxn, sxh, sxw, sxc,
    sar, sak, sbn, sbr,
    son, soh, sow, soc,
    srn, srh, srw, src,
    BITS: tl.constexpr, ALIGNED: tl.constexpr, R_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BN: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
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
        acc = _mma(xt, wt, acc, DOT_PREC, UPCAST)
        if R_PAD > 0:
            at = tl.load(a_ptr + offs_r[None, :] * sar + kk[:, None] * sak,
                         mask=c_ok[:, None] & r_mask[None, :], other=0.0)
            t = _mma(xt, _cast(at, dt, UPCAST), t, DOT_PREC, UPCAST)

    if BITS != 16:
        sc = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc = acc * sc[None, :]
    if R_PAD > 0:
        bt = tl.load(b_ptr + offs_n[None, :] * sbn + offs_r[:, None] * sbr,
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        acc = _mma(_cast(t, dt, UPCAST), _cast(bt, dt, UPCAST), acc, DOT_PREC, UPCAST)

    if SPLIT_K == 1:
        _epilogue_store(acc, offs_m, offs_n, m_mask, n_mask, OH, OW,
                        bias_ptr, oscale_ptr, oshift_ptr, res_ptr, out_ptr,
                        son, soh, sow, soc, srn, srh, srw, src,
                        HAS_BIAS, HAS_BN, HAS_RES, RELU, UPCAST)
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
    HAS_BIAS: tl.constexpr, HAS_BN: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
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
    _epilogue_store(y, offs_m, offs_n, m_mask, n_mask, OH, OW,
                    bias_ptr, oscale_ptr, oshift_ptr, res_ptr, out_ptr,
                    son, soh, sow, soc, srn, srh, srw, src,
                    HAS_BIAS, HAS_BN, HAS_RES, RELU, UPCAST)


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------

def dense_gemm_weight(qweight, scale, zero, bits: int, K: int, dtype) -> torch.Tensor:
    """The fp16-weight control's weight: dequantized ``[K, C_out]`` in ``dtype`` (contiguous)."""
    from .reference import dequantize_gemm

    return dequantize_gemm(qweight, scale, zero, bits, K, torch.float32).t().contiguous().to(dtype)


_TUNED: dict = {}


def _nhwc_strides(t: torch.Tensor):
    sn, sc, sh, sw = t.stride()
    return sn, sh, sw, sc


def _pick_config(key, g, r_pad, elem, launch_for, device):
    # key[-1]: whether the aligned unpack path applies (C_in a multiple of the codes per word)
    """(config, split_k) for this shape: fixed under the interpreter, timed once per key on CUDA."""
    if is_interpreting() or device.type != "cuda":
        return _cfgs.INTERPRETER_CONFIG, 1
    if key in _TUNED:
        return _TUNED[key]
    major, _ = torch.cuda.get_device_capability(device)
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count
    steps_of = lambda cfg: g.KH * g.KW * triton.cdiv(g.C_in, cfg.BLOCK_K)  # noqa: E731
    if torch.cuda.is_current_stream_capturing() or os.environ.get("CORA_AUTOTUNE", "1") == "0":
        cfg = _cfgs.heuristic_config(M=g.M, C_in=g.C_in, C_out=g.C_out, r_pad=r_pad, elem_bytes=elem)
        return cfg, _cfgs.choose_split_k(M=g.M, C_out=g.C_out, steps=steps_of(cfg), cfg=cfg, n_sm=n_sm)
    cands = _cfgs.prune_configs(_cfgs.CONV_CONFIGS, M=g.M, C_in=g.C_in, C_out=g.C_out, r_pad=r_pad,
                                elem_bytes=elem, capability_major=major, aligned=key[-1])
    best, best_t = None, float("inf")
    for cfg in cands:
        splits = {1, _cfgs.choose_split_k(M=g.M, C_out=g.C_out, steps=steps_of(cfg), cfg=cfg, n_sm=n_sm)}
        for split in sorted(splits):
            try:
                ms = triton.testing.do_bench(lambda: launch_for(cfg, split), warmup=3, rep=15)
            except Exception:  # e.g. out of resources on this device: skip the candidate
                continue
            if ms < best_t:
                best, best_t = (cfg, split), ms
    if best is None:
        cfg = _cfgs.heuristic_config(M=g.M, C_in=g.C_in, C_out=g.C_out, r_pad=r_pad, elem_bytes=elem)
        best = (cfg, 1)
    _TUNED[key] = best
    return best


def cora_conv2d(x, qweight, scale, zero, a=None, b=None, bias=None, *, bits, kernel_size, stride=1, padding=0,
                dilation=1, out_scale=None, out_shift=None, residual=None, relu=False, groups=1,
                in_channels=None, dense_weight=None, config=None, split_k=None):
    """Fused CoRa conv through the Triton kernel (see the module docstring).

    Shapes: x ``[N, C_in, H, W]`` (fp32/fp16/bf16, NCHW or channels_last); ``qweight`` the packed
    planes of codes ``[C_out, K]`` (:func:`cora_kernels.packing.pack_codes`); ``scale``, ``zero``
    ``[C_out]``; ``a`` ``[r, K]``, ``b`` ``[C_out, r]`` or None; ``bias``, ``out_scale``,
    ``out_shift`` ``[C_out]`` or None; ``residual`` ``[N, C_out, OH, OW]`` or None.
    Returns ``[N, C_out, OH, OW]`` in x's dtype and memory format.

    Test / benchmark hooks: ``dense_weight`` (``[K, C_out]`` in x's dtype) selects the fp16-weight
    control variant; ``config`` (:class:`~cora_kernels.configs.ConvConfig`) and ``split_k`` bypass
    the tuner.  ``groups > 1`` is not handled by the kernel (the op routes it to the reference).
    """
    g = check_conv_args(x, qweight, scale, zero, a, b, bias, bits=bits, kernel_size=kernel_size, stride=stride,
                        padding=padding, dilation=dilation, out_scale=out_scale, out_shift=out_shift,
                        residual=residual, groups=groups, in_channels=in_channels)
    if g.groups != 1:
        raise NotImplementedError("the fused kernel supports groups == 1 only; use the reference path")
    dev = x.device
    out = torch.empty((g.N, g.C_out, g.OH, g.OW), device=dev, dtype=x.dtype,
                      memory_format=out_memory_format(x))
    # the gather reads C_in-contiguous rows: give the kernel NHWC (a copy for NCHW input)
    xk = x.contiguous(memory_format=torch.channels_last) if g.C_in > 1 else x
    r = g.rank
    r_pad = rank_pad(r)
    if dense_weight is not None:
        if tuple(dense_weight.shape) != (g.K, g.C_out) or dense_weight.device != dev:
            raise ValueError(f"dense_weight must be [K={g.K}, C_out={g.C_out}] on {dev}")
        BITS = 16
        w0 = dense_weight.to(x.dtype).contiguous()
        w1 = w0
        per = 1
    else:
        BITS = bits
        w0 = qweight[0].contiguous()
        w1 = qweight[1].contiguous() if len(qweight) > 1 else w0
        per = max(32 // pb for pb in plane_bits(bits))
    sc = scale.contiguous()
    zp = zero.contiguous()
    dummy = out
    a_t = a if r > 0 else dummy
    b_t = b if r > 0 else dummy
    sar, sak = (a.stride(0), a.stride(1)) if r > 0 else (0, 0)
    sbn, sbr = (b.stride(0), b.stride(1)) if r > 0 else (0, 0)
    res = residual if residual is not None else dummy
    srn, srh, srw, src = _nhwc_strides(residual) if residual is not None else (0, 0, 0, 0)
    son, soh, sow, soc = _nhwc_strides(out)
    sxn, sxh, sxw, sxc = _nhwc_strides(xk)
    has_bn = out_scale is not None
    flags = dict(HAS_BIAS=bias is not None, HAS_BN=has_bn, HAS_RES=residual is not None, RELU=bool(relu))
    # fp32: 3xTF32 on the GPU (tensor cores, ~fp32 accuracy); the interpreter computes in fp32 anyway
    dot_prec = ("ieee" if is_interpreting() else "tf32x3") if x.dtype == torch.float32 else "tf32"
    upcast = x.dtype == torch.bfloat16 and is_interpreting()
    M = g.M

    def launch(cfg, split):
        n_cblk = triton.cdiv(g.C_in, cfg.BLOCK_K)
        total = g.KH * g.KW * n_cblk
        split = max(1, min(int(split), total))
        per_split = triton.cdiv(total, split)
        split = triton.cdiv(total, per_split)  # no empty splits
        # fp32 keeps the gather unpack: the register expansion of the aligned path spills with 3xTF32
        aligned = (BITS != 16 and g.C_in % per == 0 and cfg.BLOCK_K % per == 0
                   and (x.dtype != torch.float32 or is_interpreting()))
        ws = torch.empty((split, M, g.C_out), device=dev, dtype=torch.float32) if split > 1 else out
        grid = (triton.cdiv(M, cfg.BLOCK_M) * triton.cdiv(g.C_out, cfg.BLOCK_N), split)
        _cora_conv2d_kernel[grid](
            xk, w0, w1, sc, zp, a_t, b_t,
            bias if bias is not None else dummy, out_scale if has_bn else dummy,
            out_shift if has_bn else dummy, res, out, ws,
            M, g.C_in, g.H, g.W, g.C_out, g.OH, g.OW, g.KW, r,
            n_cblk, total, per_split,
            g.stride[0], g.stride[1], g.padding[0], g.padding[1], g.dilation[0], g.dilation[1],
            sxn, sxh, sxw, sxc, sar, sak, sbn, sbr,
            son, soh, sow, soc, srn, srh, srw, src,
            BITS=BITS, ALIGNED=aligned, R_PAD=r_pad, SPLIT_K=split, DOT_PREC=dot_prec, UPCAST=upcast,
            BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            **(flags if split == 1 else dict(HAS_BIAS=False, HAS_BN=False, HAS_RES=False, RELU=False)),
        )
        if split > 1:
            rc = _cfgs.REDUCE_CONFIG
            grid2 = (triton.cdiv(M, rc.BLOCK_M), triton.cdiv(g.C_out, rc.BLOCK_N))
            _splitk_epilogue_kernel[grid2](
                ws, bias if bias is not None else dummy, out_scale if has_bn else dummy,
                out_shift if has_bn else dummy, res, out,
                M, g.C_out, g.OH, g.OW, split, son, soh, sow, soc, srn, srh, srw, src,
                UPCAST=upcast, BLOCK_M=rc.BLOCK_M, BLOCK_N=rc.BLOCK_N, num_warps=rc.num_warps,
                **flags,
            )
        return out

    if config is None:
        key = (g.C_in, g.C_out, g.KH, g.KW, g.stride, g.dilation, g.padding, BITS, r_pad, x.dtype,
               triton.next_power_of_2(M), flags["HAS_RES"], str(dev), BITS == 16 or g.C_in % per == 0)
        config, tuned_split = _pick_config(key, g, r_pad, x.element_size(), launch, dev)
        if split_k is None:
            split_k = tuned_split
    return launch(config, split_k or 1)
