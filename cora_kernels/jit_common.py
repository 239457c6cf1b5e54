"""The Triton helpers that the kernels share, and the one host helper for their strides.

* :func:`mma` -- ``tl.dot`` with the dot precision of the call, upcasting bf16 under the interpreter;
* :func:`cast_to` -- a cast to the output dtype that rounds to nearest even under the interpreter too;
* :func:`apply_activation` -- the fused activation on an fp32 tile (``ACT`` as
  :func:`cora_kernels.geometry.activation_code`);
* :func:`epilogue_store` -- bias, folded BatchNorm, residual, activation, then the store;
* :func:`nhwc_strides` -- a 4-D tensor's strides in (n, h, w, c) order.

Used by :mod:`.conv_fused`, :mod:`.conv_depthwise` and :mod:`.dequantize`; imports only Triton.
"""
from __future__ import annotations

import triton  # noqa: F401  (the decorator)
import triton.language as tl

__all__ = ["mma", "cast_to", "apply_activation", "epilogue_store", "nhwc_strides"]


@triton.jit
def mma(a, b, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: the triton 3.8 interpreter multiplies the raw bits of bf16 operands (np.matmul on
    # their uint16 storage); bf16 -> fp32 is exact, so upcasting there keeps the same numerics.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def cast_to(v, dt: tl.constexpr, UPCAST: tl.constexpr):
    # Under the interpreter (UPCAST) fp32 -> bf16 truncates; round to nearest even by hand there.
    if UPCAST and dt == tl.bfloat16:
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dt)


@triton.jit
def apply_activation(y, ACT: tl.constexpr):
    """The fused activation on an fp32 tile; ``ACT`` as :func:`cora_kernels.geometry.activation_code`."""
    if ACT == 1:  # relu
        y = tl.maximum(y, 0.0)
    elif ACT == 2:  # relu6
        y = tl.minimum(tl.maximum(y, 0.0), 6.0)
    elif ACT == 3:  # silu: y * sigmoid(y); exp(-y) = inf for very negative y gives -0, not NaN
        y = y / (1.0 + tl.exp(-y))
    elif ACT == 4:  # hardswish
        y = y * (tl.minimum(tl.maximum(y + 3.0, 0.0), 6.0) / 6.0)
    elif ACT == 5:  # gelu, exact: tl.math.erf is in triton 3.6 (GPU machine) and 3.8, also interpreted
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACT == 6:  # sigmoid (the gate of squeeze-and-excitation blocks)
        y = 1.0 / (1.0 + tl.exp(-y))
    elif ACT == 7:  # hardsigmoid: relu6(y + 3) / 6
        y = tl.minimum(tl.maximum(y + 3.0, 0.0), 6.0) / 6.0
    return y


@triton.jit
def epilogue_store(y, offs_m, offs_n, m_mask, n_mask, OH, OW,
                   bias_ptr, oscale_ptr, oshift_ptr, res_ptr, out_ptr,
                   son, soh, sow, soc, srn, srh, srw, src,
                   HAS_BIAS: tl.constexpr, HAS_BN: tl.constexpr, HAS_RES: tl.constexpr,
                   ACT: tl.constexpr, UPCAST: tl.constexpr):
    """bias -> folded BN -> residual -> activation on an fp32 tile, then store in out's dtype."""
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
    y = apply_activation(y, ACT)
    o_off = nb * son + oh * soh + ow * sow
    tl.store(out_ptr + o_off[:, None] + offs_n[None, :] * soc, cast_to(y, out_ptr.dtype.element_ty, UPCAST), mask=mask)


def nhwc_strides(t) -> tuple[int, int, int, int]:
    """Strides of a 4-D ``[N, C, H, W]`` tensor in (n, h, w, c) order, whatever its memory format."""
    sn, sc, sh, sw = t.stride()
    return sn, sh, sw, sc
