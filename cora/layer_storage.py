"""What :class:`cora.modules.CoRaConv2d` and :class:`cora.quant_linear.QuantLinear` share: the packed
b-bit codes with their scale and zero point, the adapter buffers and their views, the input checks,
and the one builder of a layer from its float counterpart (:func:`from_float_layer`, behind
``CoRaConv2d.from_conv`` and ``QuantLinear.from_linear``). The layout of the buffers is described
in :mod:`cora.modules`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from cora_kernels.packing import (
    PACK_FORMAT_VERSION,
    from_gemm_layout,
    pack_codes,
    plane_bits,
    to_gemm_layout,
    unpack_codes,
)

from .config import LAYER_DEFAULTS
from .quantizer import compute_qparams, dequantize, quantize
from .residual import adapter_from_factors, factorize_residual

__all__ = ["MODULE_FORMAT_VERSION", "base_storage_bits", "LayerBuild", "from_float_layer"]

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

    def _register_adapter_buffers(self, rank: int, k: int, c_out: int, adapter_dtype: str | torch.dtype) -> None:
        """Zero ``adapter_a`` ``[rank, k]``, ``adapter_b`` ``[c_out, rank]`` in ``adapter_dtype``, and for
        int8 their float32 scales (None for float storage: such buffers stay out of the state dict, so
        float layers save what they always did)."""
        dt = _dtype(adapter_dtype)
        q = dt == torch.int8
        self.register_buffer("adapter_a", torch.zeros(rank, k, dtype=dt))
        self.register_buffer("adapter_b", torch.zeros(c_out, rank, dtype=dt))
        self.register_buffer("adapter_a_scale", torch.zeros(rank) if q else None)
        self.register_buffer("adapter_b_scale", torch.zeros(c_out) if q else None)

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


@dataclass(frozen=True)
class LayerBuild:
    """How ``CoRaConv2d.from_conv`` / ``QuantLinear.from_linear`` build a layer from its float one (their
    keyword options; the defaults are those of a layer built without calibration data,
    :class:`cora.config.LayerDefaults` says why they differ from :class:`cora.CoRaConfig`'s).

    Codes: round to nearest on ranges from ``range_method`` (``per_channel``, ``std_k``), unless
    ``codes`` (integer, the float weight's shape), ``scale`` and ``zero`` (``[C_out]``) are given (another
    rounding, e.g. GPTQ). Adapter: the residual ``W - Q(W)`` factorized (``factorization`` ``"weight"``,
    or ``"activation"`` with ``hessian`` ``[K, K]``, K in PyTorch weight order), or given directly as
    ``adapter=(A, B)`` (its rank then wins over ``rank``), stored as ``adapter_dtype``.
    """

    per_channel: bool = LAYER_DEFAULTS.per_channel
    range_method: str = LAYER_DEFAULTS.range_method
    std_k: float = LAYER_DEFAULTS.std_k
    codes: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    factorization: str = LAYER_DEFAULTS.factorization
    hessian: torch.Tensor | None = None
    adapter: tuple[torch.Tensor, torch.Tensor] | None = None
    adapter_dtype: str | torch.dtype = LAYER_DEFAULTS.adapter_dtype


def from_float_layer(layer: nn.Module, what: str, shell: Callable[[int, str | torch.dtype], nn.Module], rank: int,
                     options: dict) -> nn.Module:
    """The quantized layer of float ``layer`` (a conv or linear, ``what`` names it in errors), the one
    builder behind ``from_conv`` and ``from_linear``.

    ``shell(rank, adapter_dtype)`` makes the empty quantized layer of ``layer``'s geometry; ``options``
    are :class:`LayerBuild`'s keywords. The codes are stored, the adapter set, the bias copied, and the
    result moved to ``layer``'s device. ``ValueError`` for a weight with NaN or Inf.
    """
    try:
        o = LayerBuild(**options)
    except TypeError as e:
        raise TypeError(f"from_{what}: {e} (options: {', '.join(LayerBuild.__dataclass_fields__)})") from None
    w = layer.weight.detach().float().cpu()
    if not torch.isfinite(w).all():
        raise ValueError(f"{what} weight contains NaN or Inf")
    if o.adapter is not None:
        rank = o.adapter[0].shape[0]
    m = shell(rank, o.adapter_dtype)
    m._quantize_from(w, o.codes, o.scale, o.zero, o.per_channel, o.range_method, o.std_k)
    if rank:
        adapter = o.adapter
        if adapter is None:
            factors = factorize_residual(w - m.dequantized_weight(), method=o.factorization, hessian=o.hessian)
            adapter = adapter_from_factors(factors, rank)
        m.set_adapter(*adapter)
    if layer.bias is not None:
        m.bias.copy_(layer.bias.detach().float())
    return m.to(layer.weight.device)
