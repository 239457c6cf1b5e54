"""Argument normalisation and validation shared by the launcher, the reference and the op.

No Triton here (imported by the reference and the op boundary).  Every check raises before
any launch, with a message that names the offending argument.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import plane_bits

__all__ = ["ConvArgs", "pair", "check_conv_args", "out_memory_format", "ACT_DTYPES"]

ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(e) for e in v)
    if len(v) == 1:
        return (v[0], v[0])
    if len(v) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v}")
    return v


def out_memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x is channels_last and not also plain contiguous, else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


@dataclass(frozen=True)
class ConvArgs:
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


def check_conv_args(x, qweight, scale, zero, a, b, bias, *, bits, kernel_size, stride, padding,
                    dilation, out_scale=None, out_shift=None, residual=None, groups=1,
                    in_channels=None) -> ConvArgs:
    """Validate a ``cora_conv2d`` call; returns the normalised geometry."""
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
    OH = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    OW = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
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
        for t, name in ((a, "a"), (b, "b")):
            if t.dtype not in ACT_DTYPES:
                raise TypeError(f"{name} has unsupported dtype {t.dtype}")
        if rank > 0 and groups > 1:
            raise ValueError("low-rank adapters are not supported with groups > 1")
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
    return ConvArgs(N, C_in, H, W, C_out, kh, kw, (sh, sw), (ph, pw), (dh, dw), OH, OW, K, rank, groups)
