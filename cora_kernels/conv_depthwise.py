"""Grouped and depthwise CoRa convolutions: ``_cora_conv2d_grouped_kernel`` and its launcher
:func:`cora_conv2d_grouped_triton`.

A conv with ``groups > 1`` (no adapter: grouped convs get none in this project) computes

    y = conv(x; scale * (q - zero), groups) + bias -> y * out_scale + out_shift -> + residual -> activation

Depthwise convs (``groups == C_in``, ``C_out = mult * C_in``) are not a GEMM: each output channel
reads one input channel.  The kernel is a direct conv over tiles of ``[BLOCK_M output pixels x
BLOCK_C output channels]`` of the NHWC output: for each of the ``kh*kw`` taps (a loop) it loads
the input tile (zero padding, stride and dilation in the load mask), the codes of the tile's
channels for that tap (one int32 word per channel and plane, coalesced along C_out), subtracts
the zero point and accumulates ``x * (q - zero)`` in fp32 on the CUDA cores.  The epilogue is the
fused kernel's (:func:`cora_kernels.jit_common.epilogue_store`): ``scale[c]``, bias, folded
BatchNorm, residual, the activation (the same ``ACT`` codes), one store in the output's dtype and
memory format.

General grouped convs (``1 < groups < C_in``, ResNeXt / RegNet) run through the same kernel: output
channel ``c`` of group ``c // (C_out/groups)`` loops over the group's ``C_in/groups`` input channels
inside each tap (a dynamic loop; ``MODE`` removes it when there is one channel per group).
That is a direct conv without tensor cores, fine for the narrow groups of those models; a grouped
implicit GEMM would be the next step for wide groups.

Weights: the packed layout of :mod:`cora_kernels.packing` as the layer stores it, GEMM order
``[C_out, kh*kw*C_in/groups]`` with ``(kh, kw, c)`` order and C fastest; for depthwise ``K =
kh*kw`` (2 int32 words per channel for a 3x3 kernel at int4).  int2/3/4/8 codes.

Numerics: ``q - zero`` is exact in fp32, the input is converted to fp32 (exact), products and sums
are fp32 (FMA), ``scale`` multiplies the sum once in the epilogue, the output is rounded once.  A
single nonzero input pixel of value 1 therefore reproduces ``scale * (q - zero)`` bit for bit.

The launcher runs check -> prepare -> launch like :mod:`cora_kernels.conv_fused`: NCHW inputs are
copied to channels_last (the tile reads contiguous channels), the output has x's memory format,
and the tile comes from :func:`cora_kernels.tuning.depthwise_config` (fixed per shape, no timing).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import tuning
from .environment import is_interpreting
from .geometry import ConvGeometry, activation_code, cdiv, check_conv_args, out_memory_format
from .jit_common import epilogue_store, nhwc_strides
from .packing_jit import load_codes_row
from .records import Epilogue, PackedWeight

__all__ = ["cora_conv2d_grouped_triton", "layer_args", "choose_config"]


@triton.jit
def _tap_fma(acc, x_tap, row_ok, ci, offs_c, c_mask, sxc, w0_ptr, w1_ptr, k, zp, C_out, BITS: tl.constexpr):
    """``acc + x[pixel, ci[c]] * (q[c, k] - zero[c])`` for one tap and one input channel per column.

    ``acc`` fp32 ``[BLOCK_M, BLOCK_C]``; ``x_tap`` ``[BLOCK_M]`` pointers to the tap's input pixels
    (``row_ok`` masks padding and rows past M); ``ci`` ``[BLOCK_C]`` the input channel that each
    output channel ``offs_c`` reads; ``k`` the K index (tap, channel in the group); ``zp`` fp32
    ``[BLOCK_C]`` zero points.
    """
    q = load_codes_row(w0_ptr, w1_ptr, k, offs_c, c_mask, C_out, BITS)
    w = q.to(tl.float32) - zp
    xt = tl.load(x_tap[:, None] + ci[None, :] * sxc, mask=row_ok[:, None] & c_mask[None, :], other=0.0)
    return acc + xt.to(tl.float32) * w[None, :]


@triton.jit
def _cora_conv2d_grouped_kernel(
    x_ptr, w0_ptr, w1_ptr, scale_ptr, zero_ptr,
    bias_ptr, oscale_ptr, oshift_ptr, res_ptr, out_ptr,
    M, H, W, C_out, OH, OW, CIG, COG, KH, KW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sxn, sxh, sxw, sxc,
    son, soh, sow, soc,
    srn, srh, srw, src,
    BITS: tl.constexpr, MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BN: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One ``[BLOCK_M, BLOCK_C]`` output tile.  ``CIG``/``COG``: input/output channels per group;
    strides in (n, h, w, c) order.  ``MODE`` (see :func:`_mode`): 0 depthwise with one output channel
    per input channel (output channel c reads input channel c: contiguous, vectorised loads), 1
    depthwise with a channel multiplier (c reads c // COG), 2 grouped (a loop over the group's CIG
    input channels)."""
    # axis 0 (fastest) walks the pixels: neighbouring programs share the channel tile's codes and
    # the halo rows of their inputs in L2
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_mask = offs_m < M
    c_mask = offs_c < C_out

    # output pixel -> (image, oh, ow) -> top-left input pixel
    ow = offs_m % OW
    tmp = offs_m // OW
    oh = tmp % OH
    nb = tmp // OH
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_rows = x_ptr + nb.to(tl.int64) * sxn
    if MODE == 0:
        ci0 = offs_c  # keeps the channel contiguity visible to the compiler (vector loads)
    else:
        ci0 = (offs_c // COG) * CIG  # first input channel of each output channel's group

    zp = tl.load(zero_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    # A dynamic tap loop: unrolled, the compiler hoists every tap's input tile ahead of the FMAs
    # (64x64 tile, 4 warps, 3x3: 255 registers and 296 B of spills on sm_90, triton 3.8).
    for tap in range(0, KH * KW):
        kh = tap // KW
        kw = tap - kh * KW
        ih = ih0 + kh * dil_h
        iw = iw0 + kw * dil_w
        row_ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_tap = x_rows + ih * sxh + iw * sxw
        if MODE < 2:
            acc = _tap_fma(acc, x_tap, row_ok, ci0, offs_c, c_mask, sxc, w0_ptr, w1_ptr, tap, zp, C_out, BITS)
        else:
            for j in range(0, CIG):  # K order (kh, kw, c): tap * CIG + j
                acc = _tap_fma(acc, x_tap, row_ok, ci0 + j, offs_c, c_mask, sxc, w0_ptr, w1_ptr,
                               tap * CIG + j, zp, C_out, BITS)

    sc = tl.load(scale_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    epilogue_store(acc * sc[None, :], offs_m, offs_c, m_mask, c_mask, OH, OW,
                   bias_ptr, oscale_ptr, oshift_ptr, res_ptr, out_ptr,
                   son, soh, sow, soc, srn, srh, srw, src,
                   HAS_BIAS, HAS_BN, HAS_RES, ACT, UPCAST)


# ----------------------------------------------------------------------------------------------
# launcher: check -> prepare -> launch
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class _LayerArgs:
    """The weight side of a launch (the same for every call of a layer at one activation dtype); missing
    optional tensors are ``scale`` (never read: their flag is off)."""

    w0: torch.Tensor              # first packed plane int32 [words, C_out]
    w1: torch.Tensor              # second plane (bits 3), else w0
    scale: torch.Tensor           # [C_out]
    zero: torch.Tensor            # [C_out]
    bias: torch.Tensor            # [C_out] or scale
    out_scale: torch.Tensor       # [C_out] or scale
    out_shift: torch.Tensor       # [C_out] or scale
    bits: int                     # 2, 3, 4 or 8
    has_bias: bool
    has_bn: bool
    act: int                      # ACT code (geometry.activation_code)
    upcast: bool                  # bf16 under the interpreter: round the output by hand (jit_common.cast_to)


def layer_args(w: PackedWeight, ep: Epilogue, dtype: torch.dtype) -> _LayerArgs:
    """The weight side of the grouped kernel's launch for ``w`` / ``ep`` at activation ``dtype``."""
    w0 = w.planes[0].contiguous()
    fill = w.scale
    return _LayerArgs(
        w0=w0, w1=w.planes[1].contiguous() if len(w.planes) > 1 else w0,
        scale=w.scale.contiguous(), zero=w.zero.contiguous(),
        bias=w.bias if w.bias is not None else fill,
        out_scale=ep.out_scale if ep.has_bn else fill, out_shift=ep.out_shift if ep.has_bn else fill,
        bits=w.bits, has_bias=w.bias is not None, has_bn=ep.has_bn, act=ep.act,
        upcast=dtype == torch.bfloat16 and is_interpreting(),
    )


def _mode(cig: int, cog: int) -> int:
    """The kernel's ``MODE``: 0 depthwise (``cig == cog == 1``), 1 depthwise with a channel
    multiplier (``cig == 1``), 2 general grouped."""
    return 0 if cig == cog == 1 else (1 if cig == 1 else 2)


def _launch(L: _LayerArgs, g: ConvGeometry, x: torch.Tensor, out: torch.Tensor, residual,
            cfg: tuning.DepthwiseConfig) -> torch.Tensor:
    """Run the kernel with one tile config on ``x`` (NHWC storage: a tile reads contiguous channels) into
    ``out`` (``[N, C_out, OH, OW]``, x's dtype); returns ``out``."""
    cig, cog = g.C_in // g.groups, g.C_out // g.groups
    has_res = residual is not None
    grid = (cdiv(g.M, cfg.BLOCK_M), cdiv(g.C_out, cfg.BLOCK_C))
    _cora_conv2d_grouped_kernel[grid](
        x, L.w0, L.w1, L.scale, L.zero, L.bias, L.out_scale, L.out_shift, residual if has_res else out, out,
        g.M, g.H, g.W, g.C_out, g.OH, g.OW, cig, cog, g.KH, g.KW,
        g.stride[0], g.stride[1], g.padding[0], g.padding[1], g.dilation[0], g.dilation[1],
        *nhwc_strides(x), *nhwc_strides(out), *(nhwc_strides(residual) if has_res else (0, 0, 0, 0)),
        BITS=L.bits, MODE=_mode(cig, cog),
        HAS_BIAS=L.has_bias, HAS_BN=L.has_bn, HAS_RES=has_res, ACT=L.act, UPCAST=L.upcast,
        BLOCK_M=cfg.BLOCK_M, BLOCK_C=cfg.BLOCK_C, num_warps=cfg.num_warps, num_stages=1,
    )
    return out


def choose_config(g: ConvGeometry, device: torch.device) -> tuning.DepthwiseConfig:
    """The tile for this geometry (:func:`cora_kernels.tuning.depthwise_config`; a small one off the GPU)."""
    cig, cog = g.C_in // g.groups, g.C_out // g.groups
    return tuning.depthwise_config(M=g.M, C_out=g.C_out, interpreting=is_interpreting() or device.type != "cuda",
                                   multiplier=_mode(cig, cog) == 1)


def cora_conv2d_grouped_triton(x, qweight, scale, zero, a=None, b=None, bias=None, *, bits, kernel_size, stride=1,
                               padding=0, dilation=1, out_scale=None, out_shift=None, residual=None, relu=False,
                               groups=1, in_channels=None, config=None, a_scale=None, b_scale=None, activation=None):
    """A grouped (``groups > 1``) CoRa conv through the direct Triton kernel (see the module docstring).

    The arguments of :func:`cora_kernels.cora_conv2d`: x ``[N, C_in, H, W]`` (fp32/fp16/bf16, NCHW or
    channels_last); ``qweight`` the packed planes of the codes ``[C_out, kh*kw*C_in/groups]``;
    ``scale``, ``zero`` ``[C_out]``; ``bias``, ``out_scale``, ``out_shift`` ``[C_out]`` or None;
    ``residual`` ``[N, C_out, OH, OW]`` or None; ``activation`` None or a name of
    :data:`cora_kernels.geometry.ACTIVATIONS` (``relu=True`` means "relu").  ``a``/``b`` must be
    None or rank 0 (validation refuses an adapter with ``groups > 1``).  Returns ``[N, C_out, OH, OW]``
    in x's dtype and memory format.  ``config`` (:class:`~cora_kernels.tuning.DepthwiseConfig`) bypasses the shape rule
    (tests).  ``groups == 1`` raises NotImplementedError: that is the fused kernel's
    (:func:`cora_kernels.conv_fused.cora_conv2d_triton`).
    """
    g = check_conv_args(x, qweight, scale, zero, a, b, bias, bits=bits, kernel_size=kernel_size, stride=stride,
                        padding=padding, dilation=dilation, out_scale=out_scale, out_shift=out_shift,
                        residual=residual, groups=groups, in_channels=in_channels, a_scale=a_scale,
                        b_scale=b_scale, relu=relu, activation=activation)
    if g.groups == 1:
        raise NotImplementedError("groups == 1 runs the fused kernel (cora_conv2d_triton)")
    w = PackedWeight(tuple(qweight), scale, zero, bits, (g.KH, g.KW), g.stride, g.padding, g.dilation, g.groups,
                     bias=bias, in_channels=g.C_in)
    L = layer_args(w, Epilogue(out_scale, out_shift, activation_code(activation, relu)), x.dtype)
    out = torch.empty((g.N, g.C_out, g.OH, g.OW), device=x.device, dtype=x.dtype, memory_format=out_memory_format(x))
    return _launch(L, g, x.contiguous(memory_format=torch.channels_last), out, residual,
                   config or choose_config(g, x.device))
