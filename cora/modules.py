"""``CoRaConv2d`` (drop-in for ``nn.Conv2d``) and ``QuantLinear`` (drop-in for ``nn.Linear``).

Stored state (all buffers, so ``state_dict()`` round-trips exactly):

* ``qweight_p0`` (and ``qweight_p1`` for 3 bits): int32 planes of the packed integer codes, in the
  layout of :mod:`cora_kernels.packing` (GEMM order ``[C_out, kh*kw*C_in/groups]``, stored
  ``[n_words, C_out]``; int3 as a 2-bit plus a 1-bit plane).
* ``scale`` float16 ``[C_out]`` and ``zero`` uint8 ``[C_out]``: ``W_q = scale * (q - zero)``
  (per-tensor quantization repeats one value).
* ``adapter_a`` ``[r, kh*kw*C_in]`` (GEMM order, like the codes) and ``adapter_b`` ``[C_out, r]``,
  float16 by default: the low-rank residual branch ``conv1x1(conv_kxk(x; A); B)``.
* with ``adapter_dtype="int8"`` those two are int8 codes in ``[-127, 127]`` plus one symmetric
  float32 scale per row, ``adapter_a_scale`` ``[r]`` and ``adapter_b_scale`` ``[C_out]``:
  ``A = adapter_a_scale[:, None] * adapter_a`` (:func:`cora_kernels.packing.quantize_adapter`).
  For float adapters the two scale buffers are None (not in the state dict).
* ``bias`` float32 ``[C_out]`` or ``None``.
* an extra state with the format version and bit width, checked on load.

``QuantLinear`` stores the same buffers under the same names (``K = in_features``, ``A`` ``[r, in]``,
branch ``linear(linear(x; A); B)``); its adapter buffers are saved only at rank > 0, so a rank-0
layer saves exactly what a ``QuantLinear`` saved before linear layers had adapters.

:class:`QuantLinear` lives in :mod:`cora.quant_linear` and the storage both share in
:mod:`cora.layer_storage`; both classes are importable from here.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from cora_kernels.geometry import PADDING_MODES, explicit_padding, pad_input
from cora_kernels.ops import Backend, resolve_backend
from cora_kernels.packing import dequantize_adapter, from_gemm_layout, quantize_adapter, to_gemm_layout

from .config import LAYER_DEFAULTS
from .layer_storage import (
    MODULE_FORMAT_VERSION,
    _AdapterStateMixin,
    _check_input,
    _int_arg,
    _PackedWeightMixin,
    base_storage_bits,
    from_float_layer,
)
from .quant_linear import QuantLinear
from .residual import full_rank

__all__ = ["CoRaConv2d", "QuantLinear", "MODULE_FORMAT_VERSION", "base_storage_bits"]


class CoRaConv2d(_PackedWeightMixin, _AdapterStateMixin, nn.Module):
    """A quantized conv plus its low-rank residual adapter; same forward as ``nn.Conv2d``.

    ``y = conv(x; Q(W)) + conv1x1(conv_kxk(x; A); B) + bias``. Input ``[N, C_in, H, W]`` or
    ``[C_in, H, W]`` in float32/float16/bfloat16; the output has the input's dtype and the shape
    ``nn.Conv2d`` would give. ``padding`` may be ints or ``'same'``/``'valid'``; every
    ``padding_mode`` is handled by padding the input first. ``groups > 1`` is supported for the
    quantized conv without an adapter (rank 0).

    Build with :meth:`from_conv`. :meth:`effective_weight` returns ``Q(W) + B·A`` for checks and
    :meth:`reference_forward` is the plain-PyTorch path (differentiable w.r.t. the input).

    ``backend`` (``"auto"``, ``"triton"``, ``"reference"`` or a :class:`cora_kernels.Backend`; None:
    ``CORA_BACKEND``, read at call time) picks the forward: the fused op (:meth:`op_forward`) when
    :func:`cora_kernels.resolve_backend` says Triton (on CUDA, for ``auto``), else
    :meth:`reference_forward`. Anything that needs gradients takes the reference path. The backend
    is a runtime choice, not saved with the layer.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        bits: int = LAYER_DEFAULTS.conv_bits,
        rank: int = 0,
        adapter_dtype: str | torch.dtype = LAYER_DEFAULTS.adapter_dtype,
        backend: Backend | str | None = None,
    ) -> None:
        super().__init__()
        for arg, value, low in (("in_channels", in_channels, 1), ("out_channels", out_channels, 1), ("groups", groups, 1),
                                ("bits", bits, 1), ("rank", rank, 0)):
            _int_arg(f"CoRaConv2d {arg}", value, low)
        if not isinstance(bias, bool):
            raise TypeError(f"CoRaConv2d bias must be True or False, got {bias!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels {in_channels} and out_channels {out_channels} must be divisible by groups {groups}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"unsupported padding_mode {padding_mode!r}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.padding_mode = padding_mode
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding string must be 'same' or 'valid', got {padding!r}")
            if padding == "same" and any(s != 1 for s in self.stride):
                raise ValueError("padding='same' is not supported for strided convolutions")
        self.bits = int(bits)
        self.weight_shape = (out_channels, in_channels // groups, *self.kernel_size)
        self.k_gemm = (in_channels // groups) * self.kernel_size[0] * self.kernel_size[1]
        self._pad_lrtb = explicit_padding(self.padding, self.kernel_size, self.dilation)
        max_rank = full_rank(self.weight_shape)
        if not 0 <= rank <= max_rank:
            raise ValueError(f"rank {rank} outside [0, {max_rank}] for weight shape {self.weight_shape}")
        if rank and groups != 1:
            raise ValueError("adapters are only supported for groups=1 convolutions")
        self._register_quant_buffers(self.bits, out_channels, self.k_gemm)
        self._register_adapter_buffers(rank, self.k_gemm, out_channels, adapter_dtype)
        self.register_buffer("bias", torch.zeros(out_channels) if bias else None)
        self.backend = None if backend is None else Backend(backend)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bits: int = LAYER_DEFAULTS.conv_bits, rank: int = 0, **options) -> "CoRaConv2d":
        """Quantize ``conv`` and attach a rank-``rank`` residual adapter.

        ``options`` (keywords): ``per_channel``, ``range_method``, ``std_k``, ``codes`` (integer ``[C_out,
        C_in/groups, kh, kw]``), ``scale``, ``zero``, ``factorization``, ``hessian`` (``[K, K]``, K in
        PyTorch order), ``adapter`` (``(A [r, C_in, kh, kw], B [C_out, r])``), ``adapter_dtype``; see
        :class:`cora.layer_storage.LayerBuild`. By default the codes are round-to-nearest and the adapter
        factorizes the weight-space residual ``W - Q(W)``: a layer built without calibration data.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv expects nn.Conv2d, got {type(conv).__name__}")
        geometry = (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None, conv.padding_mode)
        return from_float_layer(
            conv, "conv", lambda r, dt: cls(*geometry, bits=bits, rank=r, adapter_dtype=dt), rank, options
        )

    def set_adapter(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Set the adapter from ``A`` ``[r, C_in, kh, kw]`` and ``B`` ``[C_out, r]`` (or ``[C_out, r, 1, 1]``).

        Float storage casts them; int8 storage rounds each row of ``A`` (GEMM order) and of ``B`` to
        nearest on its own symmetric scale (:func:`cora_kernels.packing.quantize_adapter`), both
        factors independently (re-fitting ``B`` to the rounded ``A`` was measured and gains nothing).
        """
        b = b.reshape(b.shape[0], -1)
        r = a.shape[0]
        if tuple(a.shape[1:]) != self.weight_shape[1:] or b.shape != (self.out_channels, r):
            raise ValueError(f"adapter shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit weight {self.weight_shape}")
        if r and self.groups != 1:
            raise ValueError("adapters are only supported for groups=1 convolutions")
        dt, dev = self.adapter_a.dtype, self.adapter_a.device
        a = to_gemm_layout(a.detach())
        if self.adapter_int8:
            (a, sa), (b, sb) = quantize_adapter(a), quantize_adapter(b)
            self.adapter_a_scale, self.adapter_b_scale = sa.to(dev), sb.to(dev)
        self.adapter_a = a.to(dev, dt).contiguous()
        self.adapter_b = b.detach().to(dev, dt).contiguous()

    # ------------------------------------------------------------------ views
    def adapter_conv_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A`` ``[r, C_in, kh, kw]`` and ``B`` ``[C_out, r, 1, 1]`` as conv weights: the storage dtype
        for float adapters, float32 ``scale * q`` for int8 ones."""
        a, b = self.adapter_a, self.adapter_b
        if self.adapter_int8:
            a, b = dequantize_adapter(a, self.adapter_a_scale), dequantize_adapter(b, self.adapter_b_scale)
        return from_gemm_layout(a, (self.rank, *self.weight_shape[1:])), b[:, :, None, None]

    def effective_weight(self) -> torch.Tensor:
        """``Q(W) + B·A`` float32 ``[C_out, C_in/groups, kh, kw]``: the conv this layer computes."""
        w = self.dequantized_weight()
        if self.rank:
            a, b = self.adapter_conv_weights()
            w = w + (b.float().flatten(1) @ a.float().flatten(1)).reshape(w.shape)
        return w

    def storage_bits(self) -> int:
        """Bits stored for this layer (codes, scale/zero, adapters); the bias is not counted."""
        return self._storage_bits(self.adapter_bits())

    # ------------------------------------------------------------------ forward
    def _padded_input(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Pad ``x`` where the conv cannot (non-zero modes, asymmetric 'same'); returns the conv padding."""
        return pad_input(x, self._pad_lrtb, self.padding_mode)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Plain-PyTorch forward (dequantize, conv, two adapter convs, bias); autograd-friendly.

        The adapters enter as :meth:`adapter_conv_weights` (int8 ones dequantized in float32) cast
        to the input's dtype."""
        x, pad = self._padded_input(x)
        w = self.dequantized_weight().to(x.dtype)
        y = F.conv2d(x, w, None, self.stride, pad, self.dilation, self.groups)
        if self.rank:
            a, b = self.adapter_conv_weights()
            t = F.conv2d(x, a.to(x.dtype), None, self.stride, pad, self.dilation)
            y = y + F.conv2d(t, b.to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(x.dtype).view(1, -1, 1, 1)
        return y

    def op_forward(
        self,
        x: torch.Tensor,
        *,
        zero: torch.Tensor | None = None,
        out_scale: torch.Tensor | None = None,
        out_shift: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
        relu: bool = False,
        backend: Backend | str | None = None,
        activation: str | None = None,
    ) -> torch.Tensor:
        """This layer through the ``cora::conv2d`` op, with an optional fused epilogue (no autograd).

        The one builder of the op's arguments (the deployed conv calls it too): packed planes, fp16
        ``scale``, ``zero`` as float16 (pass a cached copy, or None to convert ``self.zero``; uint8
        values are exact in float16), adapters (int8 ones with their scales), bias and geometry;
        non-zero padding modes are applied to ``x`` first. ``out_scale``/``out_shift`` ``[C_out]``
        (folded BatchNorm), ``residual`` ``[N, C_out, OH, OW]`` and ``relu`` (or ``activation``, one of
        :data:`cora_kernels.ACTIVATIONS`) are applied after the bias, in that order. ``backend``: None uses
        this layer's (and then ``CORA_BACKEND``).
        """
        from cora_kernels import cora_conv2d

        x, pad = self._padded_input(x)
        a, b = (self.adapter_a, self.adapter_b) if self.rank else (None, None)
        sa, sb = (self.adapter_a_scale, self.adapter_b_scale) if self.rank else (None, None)
        return cora_conv2d(
            x, self.packed_planes(), self.scale, self.zero.to(torch.float16) if zero is None else zero, a, b, self.bias,
            bits=self.bits, kernel_size=self.kernel_size, stride=self.stride, padding=pad, dilation=self.dilation,
            out_scale=out_scale, out_shift=out_shift, residual=residual, relu=relu, groups=self.groups,
            in_channels=self.in_channels, backend=self.backend if backend is None else backend, a_scale=sa, b_scale=sb,
            activation=activation,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input("CoRaConv2d", x, self.in_channels, self.scale)
        if x.dim() not in (3, 4):
            raise ValueError(f"CoRaConv2d: expected a 3-D or 4-D input, got shape {tuple(x.shape)}")
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.adapter_a.requires_grad)
        if resolve_backend(self.backend, x, groups=self.groups, needs_grad=needs_grad) is Backend.TRITON:
            y = self.op_forward(x, backend=Backend.TRITON)
        else:
            y = self.reference_forward(x)
        return y.squeeze(0) if unbatched else y

    # ------------------------------------------------------------------ state
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # The adapter rank is data, not architecture: take it from the checkpoint (shapes still checked).
        a, b = state_dict.get(prefix + "adapter_a"), state_dict.get(prefix + "adapter_b")
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            r = a.shape[0] if a.dim() == 2 else -1
            if a.dim() == 2 and a.shape[1] == self.k_gemm and tuple(b.shape) == (self.out_channels, r):
                if r and self.groups != 1:
                    error_msgs.append(f"{prefix}adapter_a: adapters need groups=1")
                else:
                    self.adapter_a = torch.zeros(r, self.k_gemm, dtype=self.adapter_a.dtype, device=self.adapter_a.device)
                    self.adapter_b = torch.zeros(self.out_channels, r, dtype=self.adapter_b.dtype, device=self.adapter_b.device)
                    if self.adapter_a_scale is not None:
                        sa = self.adapter_a_scale
                        self.adapter_a_scale = torch.zeros(r, dtype=sa.dtype, device=sa.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}"
        )
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        s += f", bias={self.bias is not None}, bits={self.bits}, rank={self.rank}"
        return s + (", adapter_dtype=int8" if self.adapter_int8 else "")
