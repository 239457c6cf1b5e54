"""Pure-torch ground truth for the CoRa kernels (tests, benchmarks, and the CPU path).

:func:`cora_conv2d_reference` takes the arguments of :func:`cora_kernels.cora_conv2d` (x
``[N, C_in, H, W]``, packed planes of the codes ``[C_out, K]``, ``scale``/``zero`` ``[C_out]``,
adapter ``a`` ``[r, K]`` / ``b`` ``[C_out, r]``, ...) and computes, with ``F.conv2d`` in
``compute_dtype`` (float32 by default; tests pass float64):

    y = conv(x; scale * (q - zero)) + conv1x1(conv_kxk(x; A); B) + bias
    y = y * out_scale + out_shift        (folded BatchNorm, optional)
    y = y + residual                     (optional)
    y = act(y)                           (optional: relu, relu6, silu, hardswish or exact gelu)

and returns ``y`` in x's dtype (or ``out_dtype``, tests ask for float64) and memory format.

int8 adapters (``a``/``b`` int8 with ``a_scale`` ``[r]`` and ``b_scale`` ``[C_out]``) are dequantized
first, ``A = a_scale[:, None] * a`` and ``B = b_scale[:, None] * b`` in ``compute_dtype``
(:func:`cora_kernels.packing.dequantize_adapter`); mathematically the same as the kernel, which applies ``a_scale`` to the
fp32 ``t`` tile and ``b_scale`` to the fp32 adapter term.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .geometry import ACTIVATIONS, activation_code, check_conv_args, out_memory_format
from .packing import dequantize_adapter, from_gemm_layout, unpack_codes

__all__ = ["TORCH_ACTIVATIONS", "dequantize_gemm", "dequantize_weight", "cora_conv2d_reference"]

# torch's own function for each name of geometry.ACTIVATIONS (F.gelu's default is the exact erf form)
TORCH_ACTIVATIONS = {"relu": torch.relu, "relu6": F.relu6, "silu": F.silu, "hardswish": F.hardswish, "gelu": F.gelu,
                     "sigmoid": torch.sigmoid, "hardsigmoid": F.hardsigmoid}


def dequantize_gemm(qweight, scale, zero, bits: int, K: int, dtype=torch.float32) -> torch.Tensor:
    """``[C_out, K]`` weights ``scale * (q - zero)`` in ``dtype`` (computed in fp32, or fp64)."""
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    q = unpack_codes(qweight, bits, K).to(cdt)
    return (scale.to(cdt)[:, None] * (q - zero.to(cdt)[:, None])).to(dtype)


def dequantize_weight(qweight, scale, zero, bits: int, shape, dtype=torch.float32) -> torch.Tensor:
    """Dequantized conv weight ``[C_out, C_in, kh, kw]`` from the packed GEMM layout."""
    c_out, c_in, kh, kw = shape
    return from_gemm_layout(dequantize_gemm(qweight, scale, zero, bits, c_in * kh * kw, dtype), tuple(shape))


def cora_conv2d_reference(x, qweight, scale, zero, a, b, bias, *, bits, kernel_size, stride=1, padding=0,
                          dilation=1, out_scale=None, out_shift=None, residual=None, relu=False, groups=1,
                          in_channels=None, a_scale=None, b_scale=None, compute_dtype=torch.float32,
                          out_dtype=None, activation=None):
    g = check_conv_args(x, qweight, scale, zero, a, b, bias, bits=bits, kernel_size=kernel_size, stride=stride,
                        padding=padding, dilation=dilation, out_scale=out_scale, out_shift=out_shift,
                        residual=residual, groups=groups, in_channels=in_channels, a_scale=a_scale,
                        b_scale=b_scale, relu=relu, activation=activation)
    act = activation_code(activation, relu)
    cdt = compute_dtype
    xc = x.to(cdt)
    shape = (g.C_out, g.C_in // g.groups, g.KH, g.KW)
    w = dequantize_weight(qweight, scale, zero, bits, shape, dtype=cdt)
    conv = dict(stride=g.stride, padding=g.padding, dilation=g.dilation)
    y = F.conv2d(xc, w, None, groups=g.groups, **conv)
    if g.rank > 0:
        a4 = from_gemm_layout(dequantize_adapter(a, a_scale, cdt), (g.rank, g.C_in, g.KH, g.KW))
        t = F.conv2d(xc, a4, None, **conv)
        y = y + F.conv2d(t, dequantize_adapter(b, b_scale, cdt)[:, :, None, None])
    if bias is not None:
        y = y + bias.to(cdt)[None, :, None, None]
    if out_scale is not None:
        y = y * out_scale.to(cdt)[None, :, None, None] + out_shift.to(cdt)[None, :, None, None]
    if residual is not None:
        y = y + residual.to(cdt)
    if act:
        y = TORCH_ACTIVATIONS[ACTIVATIONS[act - 1]](y)
    return y.to(out_dtype or x.dtype).contiguous(memory_format=out_memory_format(x))
