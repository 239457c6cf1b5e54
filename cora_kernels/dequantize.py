"""The second strategy for a ``groups == 1`` CoRa conv: dequantize the weight, then the vendor conv.

Where compute dominates (large batches, early layers) a fused low-bit kernel has to match cuDNN's own
tuned convolution, which is hard; the bytes it saves hardly matter there.  This strategy pays one small
memory-bound kernel instead:

1. ``_dequant_weight_kernel`` writes the layer's effective weight, BatchNorm scale folded in,

       W_eff[n, k] = out_scale[n] * (scale[n] * (q[n, k] - zero[n]) + sum_j B[n, j] A[j, k])

   in fp32 (the adapter product on tensor cores as 3xTF32, about fp32 accuracy) and rounds it once to the
   activation dtype, into the shared scratch buffer
   (:mod:`cora_kernels.scratch`) as a ``[C_out, C_in, kh, kw]`` weight in channels_last order (which is
   the packed GEMM order ``[C_out, kh*kw*C_in]``, so tiles read and write contiguously); the programs of
   the first K tile also write the effective bias ``out_scale * bias + out_shift``;
2. ``F.conv2d`` (cuDNN on CUDA, channels_last input) with that weight and bias;
3. the residual add and the activation, in place on the conv's output.

The math is the reference's (:func:`cora_kernels.reference.cora_conv2d_reference`): the adapter is folded
into the weight (exact in fp32; ``conv(x; W) + conv1x1(conv(x; A); B) = conv(x; W + B·A)``), so the
result differs from the fused kernel only by where the activation dtype's roundings fall (the weight
and bias rounded to fp16 / bf16 once; the residual add and activation in that dtype).  fp32
activations keep fp32 weights (cuDNN may use TF32 only where ``torch.backends.cudnn.allow_tf32`` says so).

int8 adapters are dequantized in the kernel (``A = a_scale[:, None] * a``, ``B = b_scale[:, None] * b``).
Which strategy runs is decided per call in :func:`cora_kernels.conv_fused.cora_conv2d_triton`
(:func:`cora_kernels.tuning.select_config`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .environment import is_interpreting
from .geometry import ACTIVATIONS, ConvGeometry, cdiv, out_memory_format, rank_pad
from .jit_common import cast_to
from .packing_jit import load_codes_gather
from .records import Epilogue, PackedWeight
from .reference import TORCH_ACTIVATIONS
from .scratch import scratch_tensor

__all__ = ["DEQUANT_BLOCK_K", "DEQUANT_BLOCK_N", "effective_weight", "cora_conv2d_dequant"]

# One fixed tile (memory-bound: a tile reads BLOCK_K*BLOCK_N codes, writes them in 16 bits); compiled for
# sm_80 / sm_90 by tests/cora_kernels/test_compile.py like the conv configs.
DEQUANT_BLOCK_K = 64
DEQUANT_BLOCK_N = 64
DEQUANT_WARPS = 4


@triton.jit
def _dequant_weight_kernel(
    w0_ptr, w1_ptr, scale_ptr, zero_ptr, a_ptr, b_ptr, sa_ptr, sb_ptr,
    bias_ptr, oscale_ptr, oshift_ptr, out_w_ptr, out_b_ptr,
    K, C_out, R, sar, sak, sbn, sbr,
    BITS: tl.constexpr, R_PAD: tl.constexpr, ADAPTER_Q: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BN: tl.constexpr, WRITE_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask = offs_k < K
    n_mask = offs_n < C_out
    mask = k_mask[:, None] & n_mask[None, :]
    dt = out_w_ptr.dtype.element_ty

    q = load_codes_gather(w0_ptr, w1_ptr, offs_k, offs_n, mask, C_out, BITS)
    sc = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    zp = tl.load(zero_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    w = (q.to(tl.float32) - zp[None, :]) * sc[None, :]          # [BLOCK_K, BLOCK_N], fp32
    if R_PAD > 0:
        # the rank in chunks of 16 in a dynamic loop: whole fp32 operand tiles spilled at rank pad 128 (8.5 KB on
        # sm_80), and so did an unrolled loop of chunks (sm_80 with chunks of 32, sm_90 with 16)
        R_CHUNK: tl.constexpr = 16
        if ADAPTER_Q:
            sb = tl.load(sb_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        for r0 in range(0, R_PAD, R_CHUNK):  # a dynamic loop: one chunk live at a time
            offs_r = r0 + tl.arange(0, R_CHUNK)
            r_mask = offs_r < R
            at = tl.load(a_ptr + offs_r[None, :] * sar + offs_k[:, None] * sak,
                         mask=k_mask[:, None] & r_mask[None, :], other=0).to(tl.float32)   # A^T [BLOCK_K, R_CHUNK]
            bt = tl.load(b_ptr + offs_n[None, :] * sbn + offs_r[:, None] * sbr,
                         mask=r_mask[:, None] & n_mask[None, :], other=0).to(tl.float32)   # B^T [R_CHUNK, BLOCK_N]
            if ADAPTER_Q:
                sa = tl.load(sa_ptr + offs_r, mask=r_mask, other=0.0).to(tl.float32)
                at = at * sa[None, :]
                bt = bt * sb[None, :]
            # fp32 operands: 3xTF32 on the GPU (tensor cores at about fp32 accuracy; an FMA dot needed ~250
            # registers), exact fp32 under the interpreter
            w = tl.dot(at, bt, w, input_precision=DOT_PREC)
    if HAS_BN:
        osc = tl.load(oscale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        w = w * osc[None, :]
    # W_eff[n, k] at n * K + k: the [C_out, kh*kw*C_in] GEMM order = a channels_last [C_out, C_in, kh, kw]
    tl.store(out_w_ptr + offs_n[None, :].to(tl.int64) * K + offs_k[:, None], cast_to(w, dt, UPCAST), mask=mask)
    if WRITE_BIAS:
        if pid_k == 0:
            if HAS_BIAS:
                bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            else:
                bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
            if HAS_BN:
                osc_b = tl.load(oscale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                osh = tl.load(oshift_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                bias = bias * osc_b + osh
            tl.store(out_b_ptr + offs_n, cast_to(bias, dt, UPCAST), mask=n_mask)


def effective_weight(w: PackedWeight, ep: Epilogue, g: ConvGeometry, dtype: torch.dtype):
    """``(weight, bias)`` of the layer ``w`` with its adapter and the BatchNorm of ``ep`` folded in, in ``dtype``.

    ``weight`` is ``[C_out, C_in, kh, kw]`` in channels_last order and ``bias`` ``[C_out]`` (None when
    the layer has neither a bias nor a folded BatchNorm); both are views of the scratch buffer
    (:func:`cora_kernels.scratch.scratch_tensor`), valid until the next layer of this thread and stream
    is dequantized.  ``g``: the call's validated geometry.
    """
    K, C_out = g.K, g.C_out
    r_pad = rank_pad(g.rank)
    write_bias = w.bias is not None or ep.has_bn
    shapes = [(C_out, K)] + ([(C_out,)] if write_bias else [])
    views = scratch_tensor(shapes, dtype, w.scale.device)
    w_flat = views[0]
    b_out = views[1] if write_bias else w_flat
    has_ad = r_pad > 0
    adapter_q = has_ad and w.int8_adapter
    w0 = w.planes[0].contiguous()
    w1 = w.planes[1].contiguous() if len(w.planes) > 1 else w0
    fill = w.scale  # never read: its flag is off
    grid = (cdiv(K, DEQUANT_BLOCK_K), cdiv(C_out, DEQUANT_BLOCK_N))
    _dequant_weight_kernel[grid](
        w0, w1, w.scale, w.zero, w.a if has_ad else fill, w.b if has_ad else fill,
        w.a_scale if adapter_q else fill, w.b_scale if adapter_q else fill,
        w.bias if w.bias is not None else fill, ep.out_scale if ep.has_bn else fill,
        ep.out_shift if ep.has_bn else fill, w_flat, b_out,
        K, C_out, g.rank, *(w.a.stride() if has_ad else (0, 0)), *(w.b.stride() if has_ad else (0, 0)),
        BITS=w.bits, R_PAD=r_pad, ADAPTER_Q=adapter_q, HAS_BIAS=w.bias is not None, HAS_BN=ep.has_bn,
        WRITE_BIAS=write_bias, UPCAST=dtype == torch.bfloat16 and is_interpreting(),
        DOT_PREC="ieee" if is_interpreting() else "tf32x3",
        BLOCK_K=DEQUANT_BLOCK_K, BLOCK_N=DEQUANT_BLOCK_N, num_warps=DEQUANT_WARPS,
    )
    # [C_out, K] in (kh, kw, C_in) order is the channels_last layout of [C_out, C_in, kh, kw]
    weight = w_flat.as_strided((C_out, g.C_in, g.KH, g.KW), (K, 1, g.KW * g.C_in, g.C_in))
    return weight, (b_out if write_bias else None)


def cora_conv2d_dequant(x: torch.Tensor, w: PackedWeight, ep: Epilogue, residual, g: ConvGeometry) -> torch.Tensor:
    """One ``groups == 1`` CoRa conv by the dequantize strategy (see the module docstring): the layer ``w``
    and epilogue ``ep`` on ``x`` (validated by the caller, ``g`` its geometry), plus ``residual`` (or None).
    Returns ``[N, C_out, OH, OW]`` in x's dtype and memory format.
    """
    weight, b_eff = effective_weight(w, ep, g, x.dtype)
    fmt = out_memory_format(x)
    xin = x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x  # cuDNN's fast layout
    y = F.conv2d(xin, weight, b_eff, stride=g.stride, padding=g.padding, dilation=g.dilation)
    if residual is not None:
        y.add_(residual)
    if ep.act:
        y = TORCH_ACTIVATIONS[ACTIVATIONS[ep.act - 1]](y)
    return y.contiguous(memory_format=fmt)
