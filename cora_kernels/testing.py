"""Helpers shared by the tests and the benchmarks: the error measure and random packed layers.

* :func:`rel_err` -- ``||y - y_ref|| / ||y_ref||`` in float64 (the tolerance policy that uses it
  lives in ``tests/tolerances.py``);
* :func:`random_packed_weights` -- random codes packed for ``bits``, per-channel ``scale`` /
  ``zero`` and an optional adapter, at realistic magnitudes (the conv output is O(1) for unit
  inputs, the adapter adds about a quarter of that);
* :class:`Case` / :func:`random_layer` -- one layer call described as data, and fresh random
  arguments for it (``args, kwargs`` for :func:`cora_kernels.cora_conv2d`, the reference and the
  Triton launcher).

Imports only torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch

from .geometry import conv_output_size
from .packing import pack_codes, quantize_adapter

__all__ = ["rel_err", "PackedWeights", "random_packed_weights", "Case", "random_layer", "DEFAULT_DEVICE"]

DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: through the interpreter


def rel_err(y: torch.Tensor, y_ref: torch.Tensor) -> float:
    """``||y - y_ref|| / ||y_ref||`` in float64; the reference must not be all zeros."""
    y = y.detach().to(torch.float64)
    y_ref = y_ref.detach().to(torch.float64)
    den = y_ref.norm().item()
    if den == 0.0:
        raise AssertionError("reference is all zeros: the comparison would be meaningless")
    return (y - y_ref).norm().item() / den


class PackedWeights(NamedTuple):
    """A random quantized layer's parameters (CPU, float32 unless noted)."""

    planes: list             # packed int32 planes of the codes [C_out, K] (pack_codes)
    scale: torch.Tensor      # [C_out]
    zero: torch.Tensor       # [C_out], integer-valued
    a: Optional[torch.Tensor]  # [r, K] or None (rank 0)
    b: Optional[torch.Tensor]  # [C_out, r] or None


def random_packed_weights(c_out: int, k_gemm: int, bits: int, rank: int, generator: torch.Generator) -> PackedWeights:
    """Random ``bits``-bit codes ``[c_out, k_gemm]`` (packed), ``scale``, ``zero`` and a rank-``rank``
    adapter, drawn from ``generator`` in that order (the adapter only when ``rank > 0``).

    ``scale`` keeps ``conv(x; scale*(q - zero))`` O(1) for unit-variance inputs; the adapter is
    residual-sized, about a quarter of the main branch's output.
    """
    qmax = 2**bits - 1
    codes = torch.randint(0, qmax + 1, (c_out, k_gemm), generator=generator)
    planes = pack_codes(codes, bits)
    scale = (torch.rand(c_out, generator=generator) + 0.5) / (qmax * k_gemm**0.5)
    zero = torch.randint(0, qmax + 1, (c_out,), generator=generator).to(torch.float32)
    a = b = None
    if rank > 0:
        a = torch.randn(rank, k_gemm, generator=generator) / k_gemm**0.5
        b = torch.randn(c_out, rank, generator=generator) * (0.25 / rank**0.5)
    return PackedWeights(planes, scale, zero, a, b)


@dataclass
class Case:
    """One layer call: geometry, quantization, adapter rank, dtype, epilogue options, layout."""

    N: int = 2
    C_in: int = 5
    C_out: int = 7
    H: int = 7
    W: int = 6
    k: tuple = (3, 3)
    stride: tuple = (1, 1)
    padding: tuple = (1, 1)
    dilation: tuple = (1, 1)
    bits: int = 4
    rank: str | int = "odd"  # 0, 1, "odd", "full" or an int
    dtype: torch.dtype = torch.float32
    bias: bool = False
    bn: bool = False
    res: bool = False
    relu: bool = False
    channels_last: bool = False
    split_k: int | None = None
    adapter: str = "float"  # "float" (float32 A/B) or "int8" (int8 A/B plus a_scale/b_scale)
    groups: int = 1  # > 1: grouped / depthwise (use rank 0: no adapter with groups)
    extra: dict = field(default_factory=dict)

    @property
    def K(self):
        """The GEMM reduction length ``kh*kw*C_in/groups`` (the packed codes' row length)."""
        return self.k[0] * self.k[1] * (self.C_in // self.groups)

    def out_hw(self):
        return conv_output_size(self.H, self.W, self.k, self.stride, self.padding, self.dilation)

    def r(self) -> int:
        full = min(self.C_out, self.K)
        return {"odd": min(3, full), "full": full}.get(self.rank, self.rank)

    def __str__(self):
        return (f"N{self.N} C{self.C_in}->{self.C_out} {self.H}x{self.W} k{self.k} s{self.stride} p{self.padding} "
                f"d{self.dilation} b{self.bits} r{self.r()} {str(self.dtype)[6:]} bias{int(self.bias)} "
                f"bn{int(self.bn)} res{int(self.res)} relu{int(self.relu)} cl{int(self.channels_last)} "
                f"sk{self.split_k}" + (f" {self.adapter}" if self.adapter != "float" else "")
                + (f" g{self.groups}" if self.groups != 1 else ""))


def random_layer(c: Case, seed: int | None = None, device=DEFAULT_DEVICE):
    """Fresh random arguments for the layer ``c``: ``(args, kwargs)`` for ``cora_conv2d`` and
    ``cora_conv2d_reference`` (``args = (x, planes, scale, zero, a, b, bias)``).

    ``seed`` None draws a new seed from torch's global generator.  Values: weights from
    :func:`random_packed_weights` (for ``c.adapter == "int8"`` the adapter is rounded with
    :func:`cora_kernels.packing.quantize_adapter` and ``kwargs`` carries ``a_scale``/``b_scale``),
    ``x`` standard normal, ``bias`` / BatchNorm shift ~0.1, BatchNorm
    scale in [0.5, 1.5), ``residual`` standard normal.  ``kwargs`` carries ``groups`` when it is not 1.
    """
    g = torch.Generator().manual_seed(seed if seed is not None else torch.randint(0, 2**31 - 1, ()).item())
    planes, scale, zero, a, b = random_packed_weights(c.C_out, c.K, c.bits, c.r(), g)
    x = torch.randn(c.N, c.C_in, c.H, c.W, generator=g).to(c.dtype)
    if c.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    oh, ow = c.out_hw()
    kw = dict(bits=c.bits, kernel_size=c.k, stride=c.stride, padding=c.padding, dilation=c.dilation, relu=c.relu)
    if c.groups != 1:
        kw["groups"] = c.groups
    bias = torch.randn(c.C_out, generator=g) * 0.1 if c.bias else None
    if c.bn:
        kw["out_scale"] = torch.rand(c.C_out, generator=g) + 0.5
        kw["out_shift"] = torch.randn(c.C_out, generator=g) * 0.1
    if c.res:
        kw["residual"] = torch.randn(c.N, c.C_out, oh, ow, generator=g).to(c.dtype)
    if c.adapter == "int8" and a is not None:
        a, kw["a_scale"] = quantize_adapter(a)
        b, kw["b_scale"] = quantize_adapter(b)
    elif c.adapter not in ("float", "int8"):
        raise ValueError(f"Case.adapter must be 'float' or 'int8', got {c.adapter!r}")
    mv = lambda t: t.to(device) if t is not None else None  # noqa: E731
    args = (mv(x), [mv(p) for p in planes], mv(scale), mv(zero), mv(a), mv(b), mv(bias))
    kw = {k: (mv(v) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    return args, kw
