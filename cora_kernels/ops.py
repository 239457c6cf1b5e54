"""The op boundary: ``cora::conv2d`` as a ``torch.library`` custom op, and the one backend decision.

``torch.compile(fullgraph=True)`` sees one opaque op (its fake implementation gives the output's
shape, dtype and strides), not a graph break.

Backends (:class:`Backend`), chosen per call by :func:`resolve_backend`:

* ``reference`` -- the pure-torch reference (:mod:`cora_kernels.reference`);
* ``triton``    -- the Triton kernels, also for CPU tensors (which then need ``TRITON_INTERPRET=1``
  set before Triton is imported): ``groups == 1`` the fused implicit-GEMM kernel
  (:func:`cora_kernels.conv_fused.cora_conv2d_triton`), ``groups > 1`` (depthwise and grouped, no
  adapter) the direct kernel (:func:`cora_kernels.conv_depthwise.cora_conv2d_grouped_triton`);
* ``auto``      -- Triton on CUDA, the reference elsewhere.

The default comes from the environment variable ``CORA_BACKEND`` (:func:`default_backend`), read
when the op runs, so it can be changed between calls, also for a compiled model.  Anything that
needs gradients (the op has no autograd) always takes the reference.

Validation happens in :func:`cora_conv2d` before the op is called, so bad inputs fail with a clear
message and no launch.

The epilogue's activation: the schema keeps ``relu: bool`` (graphs and callers from before) and has
a trailing ``activation: Optional[str] = None`` (a name of
:data:`cora_kernels.geometry.ACTIVATIONS`).  :func:`cora_conv2d` passes ReLU as ``relu=True``, any
other activation by name, and the op normalises a direct call the same way (``activation="relu"``
works too); the launchers turn the pair into the kernels' one ``ACT`` code
(:func:`cora_kernels.geometry.activation_code`).
"""
import enum
import os
from typing import List, Optional

import torch

from .geometry import ACTIVATIONS, activation_code, check_conv_args, conv_output_size, out_memory_format, pair

__all__ = ["Backend", "default_backend", "resolve_backend", "cora_conv2d"]


class Backend(str, enum.Enum):
    """Where ``cora::conv2d`` runs.  ``Backend(name)`` accepts any case and surrounding spaces, and
    raises ValueError listing the choices for anything else."""

    AUTO = "auto"
    TRITON = "triton"
    REFERENCE = "reference"

    @classmethod
    def _missing_(cls, value):
        if isinstance(value, str):
            for member in cls:
                if member.value == value.strip().lower():
                    return member
        raise ValueError(f"backend must be one of {tuple(m.value for m in cls)}, got {value!r}")


_CHOICES = tuple(b.value for b in Backend)


def default_backend() -> Backend:
    """The backend named by ``CORA_BACKEND`` (read now; unset or empty: AUTO; case-insensitive).

    The one reader of ``CORA_BACKEND``; a bad value raises ValueError naming it and the choices.
    """
    choice = os.environ.get("CORA_BACKEND", "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"CORA_BACKEND must be one of {_CHOICES}, got {choice!r}")
    return Backend(choice)


def _as_backend(backend) -> Backend:
    """``backend`` (a Backend or its value, any case) as a Backend; ValueError listing the choices."""
    return backend if isinstance(backend, Backend) else Backend(backend)


def resolve_backend(backend, x: torch.Tensor, *, groups: int = 1, needs_grad: bool = False) -> Backend:
    """The backend that runs this call: ``Backend.TRITON`` or ``Backend.REFERENCE``.

    ``backend`` is a :class:`Backend`, its string value, or None for :func:`default_backend`.
    ``needs_grad`` (the op has no autograd) forces the reference; AUTO means Triton for CUDA tensors
    and the reference elsewhere.  ``groups`` does not change the answer (``groups > 1`` has its own
    kernel, :mod:`cora_kernels.conv_depthwise`); it is kept so callers can pass the whole call.
    """
    choice = default_backend() if backend is None else _as_backend(backend)
    if needs_grad:
        return Backend.REFERENCE
    if choice is Backend.AUTO:
        return Backend.TRITON if x.is_cuda else Backend.REFERENCE
    return choice


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
    backend: Optional[str],
    a_scale: Optional[torch.Tensor] = None,
    b_scale: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
) -> torch.Tensor:
    # backend: a Backend value, or None for CORA_BACKEND read here, when the op runs.
    # a_scale / b_scale (int8 adapters) and activation come last with defaults: callers of the older
    # schemas keep working.  A direct torch.ops call is not validated by cora_conv2d: check here too.
    # Normalised like cora_conv2d does: ReLU as relu=True, any other activation by name.
    code = activation_code(activation, relu)
    kw = dict(bits=bits, kernel_size=tuple(kernel_size), stride=tuple(stride), padding=tuple(padding),
              dilation=tuple(dilation), out_scale=out_scale, out_shift=out_shift, residual=residual,
              relu=code == 1, activation=ACTIVATIONS[code - 1] if code > 1 else None, groups=groups,
              a_scale=a_scale, b_scale=b_scale)
    if resolve_backend(backend, x, groups=groups) is Backend.TRITON:
        if groups > 1:
            from . import conv_depthwise  # imports triton on first use only

            return conv_depthwise.cora_conv2d_grouped_triton(x, list(qweight), scale, zero, a, b, bias, **kw)
        from . import conv_fused

        return conv_fused.cora_conv2d_triton(x, list(qweight), scale, zero, a, b, bias, **kw)
    from .reference import cora_conv2d_reference

    return cora_conv2d_reference(x, list(qweight), scale, zero, a, b, bias, **kw)


@_cora_conv2d_op.register_fake
def _cora_conv2d_fake(x, qweight, scale, zero, a, b, bias, bits, kernel_size, stride, padding, dilation,
                      out_scale, out_shift, residual, relu, groups, backend, a_scale=None, b_scale=None,
                      activation=None):
    n, _, h, w = x.shape
    oh, ow = conv_output_size(h, w, kernel_size, stride, padding, dilation)
    return torch.empty((n, scale.shape[0], oh, ow), dtype=x.dtype, device=x.device,
                       memory_format=out_memory_format(x))


def cora_conv2d(x, qweight, scale, zero, a=None, b=None, bias=None, *, bits, kernel_size, stride=1, padding=0,
                dilation=1, out_scale=None, out_shift=None, residual=None, relu=False, groups=1,
                in_channels=None, backend=None, a_scale=None, b_scale=None, activation=None):
    """One CoRa layer: ``act((conv(x; scale*(q-zero)) + conv1x1(conv_kxk(x; A); B) + bias) * out_scale
    + out_shift + residual)``, each optional step skipped when its argument is None / False.

    Args:
        x: ``[N, C_in, H, W]`` float32 / float16 / bfloat16, NCHW-contiguous or channels_last.
        qweight: packed planes of the codes ``[C_out, K]`` (``K = kh*kw*C_in`` in (kh, kw, C_in)
            order), from :func:`cora_kernels.packing.pack_codes`.
        scale, zero: ``[C_out]``; the weight is ``scale * (q - zero)``.
        a, b: adapter ``[r, K]`` (same K order) and ``[C_out, r]``, or None (rank 0); floating, or
            int8 with ``a_scale``/``b_scale``.
        bias, out_scale, out_shift: ``[C_out]`` or None (out_scale/out_shift: folded BatchNorm).
        residual: ``[N, C_out, OH, OW]`` or None, added after the BatchNorm step.
        relu: True is the same as ``activation="relu"`` (kept for existing callers).
        activation: applied last, on the fp32 result before the rounding to x's dtype: None, or one
            of :data:`cora_kernels.geometry.ACTIVATIONS`: ``"relu"``, ``"relu6"``, ``"silu"``,
            ``"hardswish"``, ``"gelu"`` (exact erf form, ``F.gelu``'s default).  ValueError for
            another name, or for ``relu=True`` with an activation other than "relu".
        kernel_size, stride, padding, dilation: ints or pairs (symmetric zero padding; see
            :func:`cora_kernels.geometry.pad_input` for the rest).
        groups: > 1 (depthwise, grouped) takes no adapter; on the Triton backend it runs the direct
            grouped kernel (:mod:`cora_kernels.conv_depthwise`).
        in_channels: optional, checked against x (the packed planes alone cannot always tell).
        backend: a :class:`Backend` or its value; None (default) follows ``CORA_BACKEND``.
        a_scale, b_scale: only with int8 ``a``/``b``: one symmetric scale per row, ``[r]`` and
            ``[C_out]`` (floating, fp32 as stored by ``CoRaConv2d``); ``A = a_scale[:, None] * a``,
            ``B = b_scale[:, None] * b``.

    Returns ``[N, C_out, OH, OW]`` in x's dtype and memory format.
    """
    check_conv_args(x, qweight, scale, zero, a, b, bias, bits=bits, kernel_size=kernel_size, stride=stride,
                    padding=padding, dilation=dilation, out_scale=out_scale, out_shift=out_shift,
                    residual=residual, groups=groups, in_channels=in_channels, a_scale=a_scale, b_scale=b_scale,
                    relu=relu, activation=activation)
    code = activation_code(activation, relu)
    # ReLU keeps the older form (relu=True, no name): graphs recorded before the activation argument stay the same
    act_name = ACTIVATIONS[code - 1] if code > 1 else None
    backend = None if backend is None else _as_backend(backend).value
    if a is not None and a.shape[0] == 0:
        a = b = a_scale = b_scale = None
    return torch.ops.cora.conv2d(
        x, list(qweight), scale, zero, a, b, bias, bits,
        list(pair(kernel_size, "kernel_size")), list(pair(stride, "stride")), list(pair(padding, "padding")),
        list(pair(dilation, "dilation")), out_scale, out_shift, residual, code == 1, int(groups), backend,
        a_scale, b_scale, act_name,
    )
