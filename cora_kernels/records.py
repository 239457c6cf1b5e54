"""Two small typed records that carry a layer between the launchers, instead of a score of positional arguments.

* :class:`PackedWeight` -- what a quantized conv stores: the packed planes of its b-bit codes, the
  per-channel ``scale`` and ``zero``, the adapter ``a`` / ``b`` (float, or int8 with ``a_scale`` /
  ``b_scale``), the bias, and the conv's geometry (kernel size, stride, padding, dilation, groups);
* :class:`Epilogue` -- what is applied after the conv: the folded BatchNorm (``out_scale``,
  ``out_shift``) and the activation code (:func:`cora_kernels.geometry.activation_code`).

The residual is not in either: it is an input of each call, like ``x``.  Validation is not done here
(:func:`cora_kernels.geometry.check_conv_args` does it, once per call on the op path, once per layer and
input shape on the prepared path, :mod:`cora_kernels.prepared`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PackedWeight", "Epilogue"]


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A quantized conv as stored (shapes as :func:`cora_kernels.cora_conv2d` documents them).

    ``planes``: int32 ``[n_words, C_out]`` per plane (two for bits 3); ``scale``, ``zero`` floating
    ``[C_out]``; ``a`` ``[r, K]`` and ``b`` ``[C_out, r]`` or None; ``a_scale`` ``[r]`` / ``b_scale``
    ``[C_out]`` only for int8 adapters; ``bias`` ``[C_out]`` or None; the geometry as ``(h, w)`` pairs
    (symmetric zero padding); ``in_channels`` (C_in: the packed planes alone cannot always tell it; None
    where the call's input gives it).
    """

    planes: tuple[torch.Tensor, ...]
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    a_scale: torch.Tensor | None = None
    b_scale: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    in_channels: int | None = None

    @property
    def rank(self) -> int:
        return 0 if self.a is None else int(self.a.shape[0])

    @property
    def int8_adapter(self) -> bool:
        return self.a is not None and self.a.dtype == torch.int8


@dataclass(frozen=True, eq=False)
class Epilogue:
    """After the conv and its bias: ``act(y * out_scale + out_shift + residual)``; ``act`` is the code of
    :func:`cora_kernels.geometry.activation_code` (0: none)."""

    out_scale: torch.Tensor | None = None
    out_shift: torch.Tensor | None = None
    act: int = 0

    @property
    def has_bn(self) -> bool:
        return self.out_scale is not None
