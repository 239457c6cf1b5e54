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
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from cora_kernels.geometry import PADDING_MODES, explicit_padding, pad_input
from cora_kernels.ops import Backend, resolve_backend
from cora_kernels.packing import (
    PACK_FORMAT_VERSION,
    dequantize_adapter,
    from_gemm_layout,
    pack_codes,
    plane_bits,
    quantize_adapter,
    to_gemm_layout,
    unpack_codes,
)

from .config import LAYER_DEFAULTS
from .quantizer import compute_qparams, dequantize, quantize
from .residual import adapter_from_factors, factorize_residual, full_rank

__all__ = ["CoRaConv2d", "QuantLinear", "MODULE_FORMAT_VERSION", "base_storage_bits"]

MODULE_FORMAT_VERSION = 1
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "int8": torch.int8}
_SCALE_BITS = 32  # the int8 adapters' per-row scales are float32
_FLOAT_INPUTS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_ADAPTER_BUFFERS = ("adapter_a", "adapter_b", "adapter_a_scale", "adapter_b_scale")


def base_storage_bits(bits: int, weights: int, channels: int) -> int:
    """Bits a ``bits``-wide base quantization of ``weights`` weights stores: the codes, and an fp16 scale
    and a b-bit zero point for each of its ``channels`` ranges (1 per tensor, ``C_out`` per channel)."""
    return bits * weights + (16 + bits) * channels


def _dtype(d: str | torch.dtype) -> torch.dtype:
    """The adapter storage dtype from its name or itself; ``ValueError`` for anything else."""
    if isinstance(d, str) and d in _DTYPES:
        return _DTYPES[d]
    if isinstance(d, torch.dtype) and d in _DTYPES.values():
        return d
    raise ValueError(f"adapter_dtype={d!r} not supported; choose one of {tuple(_DTYPES)}")


def _int_arg(name: str, value, low: int = 0) -> int:
    """``value`` as an int >= ``low``; ``TypeError``/``ValueError`` naming ``name`` (no silent ``int(2.7)``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


class _PackedWeightMixin:
    """Shared storage of packed codes, scale and zero point (see the module docstring)."""

    bits: int
    k_gemm: int
    weight_shape: tuple[int, ...]

    def _register_quant_buffers(self, bits: int, c_out: int, k: int) -> None:
        for i, nb in enumerate(plane_bits(bits)):
            self.register_buffer(f"qweight_p{i}", torch.zeros(-(-k // (32 // nb)), c_out, dtype=torch.int32))
        self.register_buffer("scale", torch.ones(c_out, dtype=torch.float16))
        self.register_buffer("zero", torch.zeros(c_out, dtype=torch.uint8))

    def packed_planes(self) -> list[torch.Tensor]:
        return [getattr(self, f"qweight_p{i}") for i in range(len(plane_bits(self.bits)))]

    def _store_codes(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """``codes``: integer ``[C_out, ...]`` in PyTorch weight order."""
        planes = pack_codes(to_gemm_layout(codes.to(torch.int64)), self.bits)
        for i, p in enumerate(planes):
            getattr(self, f"qweight_p{i}").copy_(p)
        self.scale.copy_(scale.to(torch.float16))
        self.zero.copy_(zero.to(torch.uint8))

    def _quantize_from(self, w, codes, scale, zero, per_channel: bool, range_method: str, std_k: float) -> None:
        """Store ``codes``/``scale``/``zero`` if given, else round ``w`` to nearest on computed ranges."""
        if codes is None:
            if scale is None or zero is None:
                scale, zero = compute_qparams(w, self.bits, per_channel=per_channel, method=range_method, std_k=std_k)
            codes = quantize(w, scale, zero, self.bits)
        elif scale is None or zero is None:
            raise ValueError("codes given without scale and zero")
        if tuple(codes.shape) != tuple(self.weight_shape):
            raise ValueError(f"codes shape {tuple(codes.shape)} does not match the weight {tuple(self.weight_shape)}")
        self._store_codes(codes, scale, zero)

    def codes(self) -> torch.Tensor:
        """Integer codes, uint8, in PyTorch weight layout ``weight_shape``."""
        gemm = unpack_codes(self.packed_planes(), self.bits, self.k_gemm)
        return from_gemm_layout(gemm, self.weight_shape)

    def dequantized_weight(self) -> torch.Tensor:
        """``Q(W)`` float32 in PyTorch weight layout."""
        return dequantize(self.codes(), self.scale.float(), self.zero.float())

    def get_extra_state(self) -> dict:
        return {"format_version": MODULE_FORMAT_VERSION, "pack_format": PACK_FORMAT_VERSION, "bits": self.bits}

    def set_extra_state(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise RuntimeError(f"{type(self).__name__}: extra state is not a dict (corrupt checkpoint?)")
        if state.get("format_version") != MODULE_FORMAT_VERSION or state.get("pack_format") != PACK_FORMAT_VERSION:
            raise RuntimeError(
                f"{type(self).__name__}: checkpoint format {state.get('format_version')}/pack "
                f"{state.get('pack_format')} is not the supported {MODULE_FORMAT_VERSION}/{PACK_FORMAT_VERSION}"
            )
        if state.get("bits") != self.bits:
            raise RuntimeError(f"{type(self).__name__}: checkpoint has {state.get('bits')}-bit codes, module expects {self.bits}")

    def _storage_bits(self, adapter_bits: int) -> int:
        """Bits this layer stores: codes + fp16 scale and b-bit zero per channel + ``adapter_bits``."""
        n = 1
        for d in self.weight_shape:
            n *= d
        per_tensor = bool((self.scale == self.scale[0]).all() and (self.zero == self.zero[0]).all())
        return base_storage_bits(self.bits, n, 1 if per_tensor else self.weight_shape[0]) + adapter_bits


def _check_input(name: str, x: torch.Tensor, channels: int, ref: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_INPUTS:
        raise TypeError(f"{name}: unsupported input dtype {x.dtype}; use float32, float16 or bfloat16")
    if x.device != ref.device:
        raise RuntimeError(f"{name}: input is on {x.device} but the layer is on {ref.device}")
    if name == "CoRaConv2d" and x.dim() not in (3, 4):
        raise ValueError(f"CoRaConv2d: expected a 3-D [C, H, W] or 4-D [N, C, H, W] input, got shape {tuple(x.shape)}")
    if x.dim() < 1 or x.shape[-1 if name == "QuantLinear" else -3] != channels:
        where = "last" if name == "QuantLinear" else "channel"
        raise ValueError(f"{name}: expected {channels} input features in the {where} dimension, got shape {tuple(x.shape)}")


class _AdapterStateMixin:
    """The adapter buffers' views and save/restore, for a layer that stores ``adapter_a`` ``[r, K]``,
    ``adapter_b`` ``[C_out, r]`` and, for int8 storage, ``adapter_a_scale`` ``[r]`` and
    ``adapter_b_scale`` ``[C_out]`` (shared by :class:`CoRaConv2d` and :class:`QuantLinear`)."""

    @property
    def rank(self) -> int:
        return int(self.adapter_a.shape[0])

    @property
    def adapter_int8(self) -> bool:
        """Whether the adapters are stored as int8 codes with per-row float32 scales."""
        return self.adapter_a.dtype == torch.int8

    @property
    def adapter_params(self) -> int:
        return self.adapter_a.numel() + self.adapter_b.numel()

    def adapter_bits(self) -> int:
        """Bits the adapter stores: each parameter at its storage width, plus for int8 the float32
        scales (``r + C_out`` of them; none without an adapter)."""
        if not self.adapter_int8:
            return torch.finfo(self.adapter_a.dtype).bits * self.adapter_params
        scales = self.adapter_a_scale.numel() + self.adapter_b_scale.numel() if self.rank else 0
        return 8 * self.adapter_params + _SCALE_BITS * scales

    def adapter_state(self) -> dict[str, torch.Tensor | None]:
        """The adapter buffers by name (``adapter_a``, ``adapter_b`` and their scales, None for float
        storage), to put back later with :meth:`restore_adapter_state`."""
        return {k: getattr(self, k) for k in _ADAPTER_BUFFERS}

    def restore_adapter_state(self, state: dict[str, torch.Tensor | None]) -> None:
        """Put back what :meth:`adapter_state` returned (the same tensors, not copies)."""
        for k, v in state.items():
            setattr(self, k, v)


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
        dt = _dtype(adapter_dtype)
        self.register_buffer("adapter_a", torch.zeros(rank, self.k_gemm, dtype=dt))
        self.register_buffer("adapter_b", torch.zeros(out_channels, rank, dtype=dt))
        q = dt == torch.int8  # None buffers stay out of the state dict: float layers save what they always did
        self.register_buffer("adapter_a_scale", torch.zeros(rank) if q else None)
        self.register_buffer("adapter_b_scale", torch.zeros(out_channels) if q else None)
        self.register_buffer("bias", torch.zeros(out_channels) if bias else None)
        self.backend = None if backend is None else Backend(backend)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        bits: int = LAYER_DEFAULTS.conv_bits,
        rank: int = 0,
        *,
        per_channel: bool = LAYER_DEFAULTS.per_channel,
        range_method: str = LAYER_DEFAULTS.range_method,
        std_k: float = LAYER_DEFAULTS.std_k,
        codes: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
        zero: torch.Tensor | None = None,
        factorization: str = LAYER_DEFAULTS.factorization,
        hessian: torch.Tensor | None = None,
        adapter: tuple[torch.Tensor, torch.Tensor] | None = None,
        adapter_dtype: str | torch.dtype = LAYER_DEFAULTS.adapter_dtype,
    ) -> "CoRaConv2d":
        """Quantize ``conv`` and attach a rank-``rank`` residual adapter.

        By default the codes come from round-to-nearest with ranges from ``range_method``; pass
        ``codes`` (integer ``[C_out, C_in/groups, kh, kw]``), ``scale`` and ``zero`` (``[C_out]``) to
        use another rounding (e.g. GPTQ). The adapter factorizes the residual ``W - Q(W)``
        (``factorization`` ``"weight"`` or ``"activation"`` with ``hessian`` ``[K, K]``, K in PyTorch
        order), or is given directly as ``adapter=(A [r, C_in, kh, kw], B [C_out, r])``. The defaults
        are those of a layer built without calibration data (:class:`cora.config.LayerDefaults` says
        why they differ from :class:`cora.CoRaConfig`'s).
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv expects nn.Conv2d, got {type(conv).__name__}")
        w = conv.weight.detach().float().cpu()
        if not torch.isfinite(w).all():
            raise ValueError("conv weight contains NaN or Inf")
        if adapter is not None:
            rank = adapter[0].shape[0]
        m = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            bits=bits,
            rank=rank,
            adapter_dtype=adapter_dtype,
        )
        m._quantize_from(w, codes, scale, zero, per_channel, range_method, std_k)
        if rank:
            if adapter is None:
                residual = w - m.dequantized_weight()
                factors = factorize_residual(residual, method=factorization, hessian=hessian)
                adapter = adapter_from_factors(factors, rank)
            m.set_adapter(*adapter)
        if conv.bias is not None:
            m.bias.copy_(conv.bias.detach().float())
        return m.to(conv.weight.device)

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


class QuantLinear(_PackedWeightMixin, _AdapterStateMixin, nn.Module):
    """A b-bit weight-only ``nn.Linear`` plus an optional low-rank residual adapter.

    ``y = linear(x; Q(W)) + linear(linear(x; A); B) + bias``, with ``A`` ``[r, in_features]`` and
    ``B`` ``[out_features, r]`` stored as :class:`CoRaConv2d` stores its adapters (``adapter_a``,
    ``adapter_b``; float16 by default, bfloat16, float32, or int8 with float32 per-row scales
    ``adapter_a_scale`` / ``adapter_b_scale``). Input ``[..., in_features]`` in float32/float16/bfloat16
    (any leading dimensions); the output has the input's dtype. Plain PyTorch (no fused kernel).

    Rank 0 (the default) keeps the adapter buffers out of the state dict (non-persistent, empty), so a
    layer without an adapter saves exactly what a ``QuantLinear`` saved before adapters existed and
    such state dicts still load; the rank of a loaded state dict is the rank it holds.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        bits: int = LAYER_DEFAULTS.linear_bits,
        rank: int = 0,
        adapter_dtype: str | torch.dtype = LAYER_DEFAULTS.adapter_dtype,
    ) -> None:
        super().__init__()
        for arg, value in (("in_features", in_features), ("out_features", out_features), ("bits", bits)):
            _int_arg(f"QuantLinear {arg}", value, 1)
        _int_arg("QuantLinear rank", rank, 0)
        if not isinstance(bias, bool):
            raise TypeError(f"QuantLinear bias must be True or False, got {bias!r}")
        if rank > min(in_features, out_features):
            raise ValueError(f"rank {rank} outside [0, {min(in_features, out_features)}] for weight shape "
                             f"{(out_features, in_features)}")
        self.in_features, self.out_features, self.bits = in_features, out_features, int(bits)
        self.weight_shape = (out_features, in_features)
        self.k_gemm = in_features
        self._register_quant_buffers(self.bits, out_features, in_features)
        dt = _dtype(adapter_dtype)
        q = dt == torch.int8
        self.register_buffer("adapter_a", torch.zeros(rank, in_features, dtype=dt))
        self.register_buffer("adapter_b", torch.zeros(out_features, rank, dtype=dt))
        self.register_buffer("adapter_a_scale", torch.zeros(rank) if q else None)
        self.register_buffer("adapter_b_scale", torch.zeros(out_features) if q else None)
        self._sync_adapter_persistence()
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        bits: int = LAYER_DEFAULTS.linear_bits,
        rank: int = 0,
        *,
        per_channel: bool = LAYER_DEFAULTS.per_channel,
        range_method: str = LAYER_DEFAULTS.range_method,
        std_k: float = LAYER_DEFAULTS.std_k,
        codes: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
        zero: torch.Tensor | None = None,
        factorization: str = LAYER_DEFAULTS.factorization,
        hessian: torch.Tensor | None = None,
        adapter: tuple[torch.Tensor, torch.Tensor] | None = None,
        adapter_dtype: str | torch.dtype = LAYER_DEFAULTS.adapter_dtype,
    ) -> "QuantLinear":
        """Quantize ``linear`` (round to nearest unless ``codes``/``scale``/``zero`` are given) and
        attach a rank-``rank`` residual adapter.

        The adapter factorizes ``W - Q(W)`` ``[out, in]`` (``factorization`` ``"weight"``, or
        ``"activation"`` with ``hessian`` ``[in, in]``, the inputs' second moment), or is given directly
        as ``adapter=(A [r, in], B [out, r])`` (its rank then wins over ``rank``).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach().float().cpu()
        if not torch.isfinite(w).all():
            raise ValueError("linear weight contains NaN or Inf")
        if adapter is not None:
            rank = adapter[0].shape[0]
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, bits=bits, rank=rank,
                adapter_dtype=adapter_dtype)
        m._quantize_from(w, codes, scale, zero, per_channel, range_method, std_k)
        if rank:
            if adapter is None:
                factors = factorize_residual(w - m.dequantized_weight(), method=factorization, hessian=hessian)
                adapter = adapter_from_factors(factors, rank)
            m.set_adapter(*adapter)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().float())
        return m.to(linear.weight.device)

    # ------------------------------------------------------------------ adapter
    def _sync_adapter_persistence(self) -> None:
        """Adapter buffers are saved only at rank > 0 (rank 0 saves what adapter-free layers always did)."""
        names = {k for k in _ADAPTER_BUFFERS if getattr(self, k) is not None}
        # a new set, not an in-place edit: a copied module's snapshot keeps its own
        keep = set(self._non_persistent_buffers_set) - names
        self._non_persistent_buffers_set = keep if self.rank else keep | names

    def set_adapter(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Set the adapter from ``A`` ``[r, in_features]`` and ``B`` ``[out_features, r]``.

        Float storage casts them; int8 storage rounds each row of ``A`` and of ``B`` to nearest on its
        own symmetric scale (:func:`cora_kernels.packing.quantize_adapter`), as :class:`CoRaConv2d` does.
        """
        r = a.shape[0]
        if a.dim() != 2 or a.shape[1] != self.in_features or tuple(b.shape) != (self.out_features, r):
            raise ValueError(f"adapter shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit weight {self.weight_shape}")
        if r > min(self.weight_shape):
            raise ValueError(f"rank {r} outside [0, {min(self.weight_shape)}] for weight shape {self.weight_shape}")
        dt, dev = self.adapter_a.dtype, self.adapter_a.device
        a, b = a.detach(), b.detach()
        if self.adapter_int8:
            (a, sa), (b, sb) = quantize_adapter(a), quantize_adapter(b)
            self.adapter_a_scale, self.adapter_b_scale = sa.to(dev), sb.to(dev)
        self.adapter_a = a.to(dev, dt).contiguous()
        self.adapter_b = b.to(dev, dt).contiguous()
        self._sync_adapter_persistence()

    def restore_adapter_state(self, state: dict[str, torch.Tensor | None]) -> None:
        """Put back what :meth:`adapter_state` returned (the same tensors, not copies)."""
        super().restore_adapter_state(state)
        self._sync_adapter_persistence()

    def adapter_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A`` ``[r, in_features]`` and ``B`` ``[out_features, r]``: the storage dtype for float
        adapters, float32 ``scale * q`` for int8 ones."""
        a, b = self.adapter_a, self.adapter_b
        if self.adapter_int8:
            a, b = dequantize_adapter(a, self.adapter_a_scale), dequantize_adapter(b, self.adapter_b_scale)
        return a, b

    # ------------------------------------------------------------------ views
    def effective_weight(self) -> torch.Tensor:
        """``Q(W) + B·A`` float32 ``[out_features, in_features]``: the linear map this layer computes."""
        w = self.dequantized_weight()
        if self.rank:
            a, b = self.adapter_weights()
            w = w + b.float() @ a.float()
        return w

    def storage_bits(self) -> int:
        """Bits stored for this layer (codes, scale/zero, adapters); the bias is not counted."""
        return self._storage_bits(self.adapter_bits())

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input("QuantLinear", x, self.in_features, self.scale)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = F.linear(x, self.dequantized_weight().to(x.dtype), bias)
        if self.rank:  # the adapters enter in the input's dtype (int8 ones dequantized in float32 first)
            a, b = self.adapter_weights()
            y = y + F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))
        return y

    # ------------------------------------------------------------------ state
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # The adapter rank is data: take it from the state dict; none there (rank 0, or a file from before
        # linear adapters existed) is rank 0. Shapes that do not fit are left for the base class to report.
        a, b = state_dict.get(prefix + "adapter_a"), state_dict.get(prefix + "adapter_b")
        if a is None and b is None:
            self._resize_adapter(0)
        elif isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == 2:
            r = a.shape[0]
            if a.shape[1] == self.in_features and tuple(b.shape) == (self.out_features, r) and r <= min(self.weight_shape):
                self._resize_adapter(r)
                if not r:  # empty adapters given explicitly: read them (not "unexpected"), then save none again
                    self._non_persistent_buffers_set = set(self._non_persistent_buffers_set) - set(_ADAPTER_BUFFERS)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._sync_adapter_persistence()

    def _resize_adapter(self, r: int) -> None:
        """Zero adapter buffers of rank ``r`` in the current dtype and device (the values are loaded next)."""
        a, b = self.adapter_a, self.adapter_b
        self.adapter_a = torch.zeros(r, self.in_features, dtype=a.dtype, device=a.device)
        self.adapter_b = torch.zeros(self.out_features, r, dtype=b.dtype, device=b.device)
        if self.adapter_a_scale is not None:
            sa = self.adapter_a_scale
            self.adapter_a_scale = torch.zeros(r, dtype=sa.dtype, device=sa.device)
        self._sync_adapter_persistence()

    def extra_repr(self) -> str:
        s = f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, bits={self.bits}"
        if self.rank:
            s += f", rank={self.rank}"
        return s + (", adapter_dtype=int8" if self.adapter_int8 else "")
