"""The op boundary: ``cora::conv2d`` as a ``torch.library`` custom op (the only torch.library code).

``torch.compile(fullgraph=True)`` sees one opaque op (its fake implementation gives the output's
shape, dtype and strides), not a graph break.  Dispatch, decided at *call* time:

* ``CORA_BACKEND=reference`` -- the pure-torch reference (:mod:`cora_kernels.reference`);
* ``CORA_BACKEND=triton``    -- the Triton kernel, also for CPU tensors (which then need
  ``TRITON_INTERPRET=1`` set before Triton is imported);
* unset / ``auto``           -- Triton on CUDA, the reference elsewhere.

``groups > 1`` always goes to the reference.  Validation happens in :func:`cora_conv2d` before the
op is called, so bad inputs fail with a clear message and no launch.
"""
import os
from typing import List, Optional

import torch

from ._common import check_conv_args, out_memory_format, pair

__all__ = ["cora_conv2d", "backend_for"]

_BACKENDS = ("auto", "triton", "reference")


def backend_for(x: torch.Tensor, groups: int = 1) -> str:
    """``"triton"`` or ``"reference"`` for this input, honouring ``CORA_BACKEND`` (read now)."""
    choice = os.environ.get("CORA_BACKEND", "auto").strip().lower() or "auto"
    if choice not in _BACKENDS:
        raise ValueError(f"CORA_BACKEND must be one of {_BACKENDS}, got {choice!r}")
    if groups != 1 or choice == "reference":
        return "reference"
    if choice == "triton":
        return "triton"
    return "triton" if x.is_cuda else "reference"


@torch.library.custom_op("cora::conv2d", mutates_args=())
def _cora_conv2d_op(
    x: torch.Tensor,
    qweight: List[torch.Tensor],
    scale: torch.Tensor,
    zero: torch.Tensor,
    a: Optional[torch.Tensor],
    b: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    bits: int,
    kernel_size: List[int],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    out_scale: Optional[torch.Tensor],
    out_shift: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    relu: bool,
    groups: int,
) -> torch.Tensor:
    kw = dict(bits=bits, kernel_size=tuple(kernel_size), stride=tuple(stride), padding=tuple(padding),
              dilation=tuple(dilation), out_scale=out_scale, out_shift=out_shift, residual=residual,
              relu=relu, groups=groups)
    if backend_for(x, groups) == "triton":
        from .conv_fused import cora_conv2d as _triton_conv2d  # imports triton on first use only

        return _triton_conv2d(x, list(qweight), scale, zero, a, b, bias, **kw)
    from .reference import cora_conv2d_reference

    return cora_conv2d_reference(x, list(qweight), scale, zero, a, b, bias, **kw)


@_cora_conv2d_op.register_fake
def _cora_conv2d_fake(x, qweight, scale, zero, a, b, bias, bits, kernel_size, stride, padding, dilation,
                      out_scale, out_shift, residual, relu, groups):
    n, _, h, w = x.shape
    kh, kw = kernel_size
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return torch.empty((n, scale.shape[0], oh, ow), dtype=x.dtype, device=x.device,
                       memory_format=out_memory_format(x))


def cora_conv2d(x, qweight, scale, zero, a=None, b=None, bias=None, *, bits, kernel_size, stride=1, padding=0,
                dilation=1, out_scale=None, out_shift=None, residual=None, relu=False, groups=1,
                in_channels=None):
    """One CoRa layer: ``relu((conv(x; scale*(q-zero)) + conv1x1(conv_kxk(x; A); B) + bias) * out_scale
    + out_shift + residual)``, each optional step skipped when its argument is None / False.

    Args:
        x: ``[N, C_in, H, W]`` float32 / float16 / bfloat16, NCHW-contiguous or channels_last.
        qweight: packed planes of the codes ``[C_out, K]`` (``K = kh*kw*C_in`` in (kh, kw, C_in)
            order), from :func:`cora_kernels.packing.pack_codes`.
        scale, zero: ``[C_out]``; the weight is ``scale * (q - zero)``.
        a, b: adapter ``[r, K]`` (same K order) and ``[C_out, r]``, or None (rank 0).
        bias, out_scale, out_shift: ``[C_out]`` or None (out_scale/out_shift: folded BatchNorm).
        residual: ``[N, C_out, OH, OW]`` or None, added after the BatchNorm step.
        relu: applied last.
        kernel_size, stride, padding, dilation: ints or pairs (symmetric zero padding).
        groups: > 1 runs the reference (no adapter allowed).
        in_channels: optional, checked against x (the packed planes alone cannot always tell).

    Returns ``[N, C_out, OH, OW]`` in x's dtype and memory format.
    """
    check_conv_args(x, qweight, scale, zero, a, b, bias, bits=bits, kernel_size=kernel_size, stride=stride,
                    padding=padding, dilation=dilation, out_scale=out_scale, out_shift=out_shift,
                    residual=residual, groups=groups, in_channels=in_channels)
    if a is not None and a.shape[0] == 0:
        a = b = None
    return torch.ops.cora.conv2d(
        x, list(qweight), scale, zero, a, b, bias, bits,
        list(pair(kernel_size, "kernel_size")), list(pair(stride, "stride")), list(pair(padding, "padding")),
        list(pair(dilation, "dilation")), out_scale, out_shift, residual, bool(relu), int(groups),
    )
