"""Convolution geometry: the facts about shapes and padding, and the validation of a layer call.

No Triton here: the reference, the op and the ``cora`` package import this module.

Conventions used throughout ``cora_kernels``:

* activations ``x`` are ``[N, C_in, H, W]`` (NCHW indexing; the storage may be NCHW-contiguous or
  channels_last), in one of :data:`ACT_DTYPES`;
* the output is ``[N, C_out, OH, OW]`` with ``OH, OW`` from :func:`conv_output_size`;
* the GEMM view of the conv has ``M = N*OH*OW`` rows, ``C_out`` columns and a reduction of
  ``K = KH*KW*C_in/groups`` in ``(kh, kw, c_in)`` order (see :mod:`cora_kernels.packing`);
* the kernels and the reference only do symmetric zero padding ``(pad_h, pad_w)``.  Anything else
  (``padding="same"`` with an even kernel, reflect / replicate / circular modes) is done on the
  input first: :func:`explicit_padding` gives the four sides, :func:`pad_input` pads what the conv
  cannot and returns the padding the conv should still apply.

The fused activation (the epilogue's last step, after BatchNorm and the residual add) is named by
one of :data:`ACTIVATIONS` or None; :func:`activation_code` turns a name (and the older ``relu``
flag) into the integer ``ACT`` the kernels take.

Every check in :func:`check_conv_args` raises before any launch, with a message that names the
offending argument.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .packing import plane_bits

__all__ = [
    "cdiv",
    "next_power_of_2",
    "rank_pad",
    "ACT_DTYPES",
    "ACTIVATIONS",
    "PADDING_MODES",
    "ConvGeometry",
    "pair",
    "conv_output_size",
    "explicit_padding",
    "pad_input",
    "out_memory_format",
    "activation_code",
    "check_conv_args",
]

ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The padding modes of ``nn.Conv2d``; only "zeros" can be left to the conv itself.
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

# The fused activations; the kernels' ``ACT`` code is the position here plus one (0: none).  gelu is
# the exact erf form (``F.gelu(approximate="none")``).  The kernels' ``_activation`` and the
# reference's table follow this order.
ACTIVATIONS = ("relu", "relu6", "silu", "hardswish", "gelu", "sigmoid", "hardsigmoid")


def activation_code(activation=None, relu: bool = False) -> int:
    """The kernels' ``ACT`` for ``activation`` (None or one of :data:`ACTIVATIONS`) and the older
    ``relu`` flag: 0 none, 1 relu, 2 relu6, 3 silu, 4 hardswish, 5 gelu, 6 sigmoid, 7 hardsigmoid.

    ``relu=True`` means ``activation="relu"`` (kept for existing callers); together with another
    activation it is ambiguous and raises ValueError, as does a name outside :data:`ACTIVATIONS`.
    """
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or one of {ACTIVATIONS}, got {activation!r}")
    if relu and activation not in (None, "relu"):
        raise ValueError(f"relu=True conflicts with activation={activation!r}; pass only activation")
    if activation is None:
        return 1 if relu else 0
    return ACTIVATIONS.index(activation) + 1


def pair(v, name: str) -> tuple[int, int]:
    """``v`` as an ``(h, w)`` pair of ints: an int is used for both, a 1-sequence too."""
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(e) for e in v)
    if len(v) == 1:
        return (v[0], v[0])
    if len(v) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v}")
    return v


def conv_output_size(h, w, kernel_size, stride, padding, dilation) -> tuple[int, int]:
    """``(OH, OW)`` of a conv over an ``h x w`` input with symmetric padding (ints or pairs).

    ``out = (in + 2*pad - dil*(k - 1) - 1) // stride + 1`` per dimension, as ``F.conv2d``.  ``h``
    and ``w`` may be symbolic sizes (the op's fake implementation); the result may then be < 1,
    which :func:`check_conv_args` rejects.
    """
    kh, kw = pair(kernel_size, "kernel_size")
    sh, sw = pair(stride, "stride")
    ph, pw = pair(padding, "padding")
    dh, dw = pair(dilation, "dilation")
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return oh, ow


def explicit_padding(padding, kernel_size, dilation) -> tuple[int, int, int, int]:
    """``(left, right, top, bottom)`` padding that reproduces a conv's ``padding`` argument.

    ``padding`` is ``"valid"`` (none), ``"same"`` or an ``(h, w)`` pair (an int is used for both).
    ``"same"`` pads ``d*(k - 1)`` in total per dimension, ``total // 2`` before and the rest after
    (so an even kernel pads one more on the right / bottom), as ``nn.Conv2d(padding="same")``.
    The order is width first, like ``F.pad``.
    """
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding != "same":
            raise ValueError(f"padding must be 'valid', 'same' or an (h, w) pair, got {padding!r}")
        kh, kw = pair(kernel_size, "kernel_size")
        dh, dw = pair(dilation, "dilation")
        out = []
        for d, k in ((dw, kw), (dh, kh)):  # width first, like F.pad
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return tuple(out)
    ph, pw = pair(padding, "padding")
    return (pw, pw, ph, ph)


def pad_input(x: torch.Tensor, lrtb, padding_mode: str = "zeros") -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad ``x`` ``[N, C, H, W]`` where a conv cannot; returns ``(x, (pad_h, pad_w))``.

    ``lrtb`` is ``(left, right, top, bottom)`` (:func:`explicit_padding`).  Zero padding that is
    symmetric per dimension is left to the conv: ``x`` comes back unchanged with ``(top, left)``.
    Anything else (asymmetric "same" padding, or a mode other than ``"zeros"``) is applied here
    with ``F.pad`` and the conv gets ``(0, 0)``.
    """
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    left, right, top, bottom = lrtb
    if padding_mode == "zeros" and left == right and top == bottom:
        return x, (top, left)
    mode = "constant" if padding_mode == "zeros" else padding_mode
    return F.pad(x, tuple(lrtb), mode=mode), (0, 0)


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints, in plain Python: on the host path of every launch (``triton.cdiv`` is a
    ``@triton.jit`` function, whose call from Python costs about a microsecond)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), in plain Python like :func:`cdiv`."""
    return 1 << max(0, (int(n) - 1).bit_length())


def rank_pad(r: int) -> int:
    """An adapter rank padded for ``tl.dot``: 0 (no adapter) or a power of two >= 16."""
    if r <= 0:
        return 0
    return max(16, 1 << (int(r) - 1).bit_length())


def out_memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x is channels_last and not also plain contiguous, else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


@dataclass(frozen=True)
class ConvGeometry:
    """The normalised geometry of one validated layer call (from :func:`check_conv_args`).

    Input ``[N, C_in, H, W]``, weight ``[C_out, C_in/groups, KH, KW]``, output
    ``[N, C_out, OH, OW]``; ``stride``, ``padding`` (symmetric zeros) and ``dilation`` are
    ``(h, w)`` pairs.  ``K = KH*KW*C_in/groups`` is the GEMM reduction length, ``rank`` the
    adapter rank (0: no adapter) and :attr:`M` ``= N*OH*OW`` the GEMM rows.
    """

    N: int
    C_in: int
    H: int
    W: int
    C_out: int
    KH: int
    KW: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    OH: int
    OW: int
    K: int
    rank: int
    groups: int

    @property
    def M(self) -> int:
        return self.N * self.OH * self.OW


def _check_adapter_dtypes(a, b, a_scale, b_scale, rank: int, C_out: int, on_dev) -> None:
    """Float adapters (a dtype of :data:`ACT_DTYPES`, no scales) or int8 ones with their scales:
    ``a_scale`` ``[r]`` and ``b_scale`` ``[C_out]``, floating."""
    quantized = a.dtype == torch.int8
    for t, name in ((a, "a"), (b, "b")):
        if t.dtype not in ACT_DTYPES + (torch.int8,):
            raise TypeError(f"{name} has unsupported dtype {t.dtype}")
        if (t.dtype == torch.int8) != quantized:
            raise TypeError(f"a and b must both be int8 or both floating, got {a.dtype} and {b.dtype}")
    if not quantized:
        if a_scale is not None or b_scale is not None:
            raise ValueError("a_scale / b_scale are only for int8 adapters")
        return
    for t, name, n in ((a_scale, "a_scale", rank), (b_scale, "b_scale", C_out)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (n,) or not t.is_floating_point():
            raise ValueError(f"int8 adapters need {name} as a floating tensor [{n}], got "
                             f"{getattr(t, 'dtype', None)} {tuple(getattr(t, 'shape', ()))}")
        on_dev(t, name)


def check_conv_args(x, qweight, scale, zero, a, b, bias, *, bits, kernel_size, stride, padding,
                    dilation, out_scale=None, out_shift=None, residual=None, groups=1,
                    in_channels=None, a_scale=None, b_scale=None, relu=False, activation=None) -> ConvGeometry:
    """Validate a ``cora_conv2d`` call (see :func:`cora_kernels.ops.cora_conv2d` for the
    arguments); returns the normalised geometry.  The activation is checked by
    :func:`activation_code` (its code is not part of the geometry)."""
    activation_code(activation, relu)
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D tensor [N, C_in, H, W], got {getattr(x, 'shape', type(x))}")
    if x.dtype not in ACT_DTYPES:
        raise TypeError(f"x has unsupported dtype {x.dtype}; supported: float32, float16, bfloat16")
    dev = x.device
    kh, kw = pair(kernel_size, "kernel_size")
    sh, sw = pair(stride, "stride")
    ph, pw = pair(padding, "padding")
    dh, dw = pair(dilation, "dilation")
    if min(kh, kw, sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"bad conv geometry: kernel_size={kernel_size} stride={stride} padding={padding} "
                         f"dilation={dilation}")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    N, C_in, H, W = x.shape
    if in_channels is not None and in_channels != C_in:
        raise ValueError(f"x has {C_in} input channels, the layer expects {in_channels}")
    if C_in % groups:
        raise ValueError(f"C_in={C_in} is not divisible by groups={groups}")
    OH, OW = conv_output_size(H, W, (kh, kw), (sh, sw), (ph, pw), (dh, dw))
    if OH < 1 or OW < 1:
        raise ValueError(f"output would be empty: input {H}x{W}, kernel {kh}x{kw}, padding {ph},{pw}, "
                         f"dilation {dh},{dw}")
    K = kh * kw * (C_in // groups)

    def _on_dev(t, name):
        if t is not None and t.device != dev:
            raise ValueError(f"{name} is on {t.device} but x is on {dev}; all tensors must share one device")

    if not isinstance(scale, torch.Tensor) or scale.dim() != 1:
        raise ValueError("scale must be a 1-D tensor [C_out]")
    C_out = scale.shape[0]
    if C_out % groups:
        raise ValueError(f"C_out={C_out} is not divisible by groups={groups}")
    pb = plane_bits(bits)  # raises on unsupported bits
    if not isinstance(qweight, (list, tuple)) or len(qweight) != len(pb):
        n = len(qweight) if isinstance(qweight, (list, tuple)) else type(qweight).__name__
        raise ValueError(f"{bits}-bit weights need {len(pb)} packed plane(s), got {n}")
    for i, (p, nb) in enumerate(zip(qweight, pb)):
        _on_dev(p, f"qweight[{i}]")
        need = -(-K // (32 // nb))
        if p.dtype != torch.int32 or p.dim() != 2 or p.shape[1] != C_out:
            raise ValueError(f"qweight[{i}] ({nb}-bit plane) must be int32 [{need}, C_out={C_out}], "
                             f"got {p.dtype} {tuple(p.shape)}")
        if p.shape[0] != need:
            raise ValueError(
                f"qweight[{i}] ({nb}-bit plane) has {p.shape[0]} words per channel but x with C_in={C_in} "
                f"and kernel {kh}x{kw} gives K={K}, which needs {need} (wrong C_in or kernel_size?)")
    for t, name in ((scale, "scale"), (zero, "zero")):
        _on_dev(t, name)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (C_out,) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor [C_out={C_out}], got "
                             f"{getattr(t, 'dtype', None)} {tuple(getattr(t, 'shape', ()))}")
    rank = 0
    if (a is None) != (b is None):
        raise ValueError("a and b must both be given or both be None")
    if a is not None:
        _on_dev(a, "a")
        _on_dev(b, "b")
        if a.dim() != 2 or b.dim() != 2:
            raise ValueError(f"a must be [r, K] and b [C_out, r], got {tuple(a.shape)} and {tuple(b.shape)}")
        rank = a.shape[0]
        if a.shape[1] != K:
            raise ValueError(f"a has K={a.shape[1]} but x with C_in={C_in} and kernel {kh}x{kw} gives K={K}")
        if tuple(b.shape) != (C_out, rank):
            raise ValueError(f"b must be [C_out={C_out}, r={rank}], got {tuple(b.shape)}")
        _check_adapter_dtypes(a, b, a_scale, b_scale, rank, C_out, _on_dev)
        if rank > 0 and groups > 1:
            raise ValueError("low-rank adapters are not supported with groups > 1")
    elif a_scale is not None or b_scale is not None:
        raise ValueError("a_scale / b_scale given without an adapter")
    for t, name in ((bias, "bias"), (out_scale, "out_scale"), (out_shift, "out_shift")):
        if t is not None:
            _on_dev(t, name)
            if tuple(t.shape) != (C_out,) or not t.is_floating_point():
                raise ValueError(f"{name} must be a floating tensor [C_out={C_out}], got {t.dtype} {tuple(t.shape)}")
    if (out_scale is None) != (out_shift is None):
        raise ValueError("out_scale and out_shift must both be given or both be None")
    if residual is not None:
        _on_dev(residual, "residual")
        if tuple(residual.shape) != (N, C_out, OH, OW):
            raise ValueError(f"residual must be [N, C_out, OH, OW] = {(N, C_out, OH, OW)}, got {tuple(residual.shape)}")
        if not residual.is_floating_point():
            raise TypeError(f"residual has unsupported dtype {residual.dtype}")
    return ConvGeometry(N, C_in, H, W, C_out, kh, kw, (sh, sw), (ph, pw), (dh, dw), OH, OW, K, rank, groups)
