"""``QuantLinear``: a b-bit weight-only drop-in for ``nn.Linear`` with an optional low-rank residual adapter.

It stores the buffers of :class:`cora.modules.CoRaConv2d` under the same names (``K = in_features``,
``A`` ``[r, in]``; see :mod:`cora.modules` for the layout) and runs in plain PyTorch; its adapter buffers
are saved only at rank > 0, so a rank-0 layer saves exactly what a ``QuantLinear`` saved before linear
layers had adapters.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cora_kernels.packing import dequantize_adapter, quantize_adapter

from .config import LAYER_DEFAULTS
from .layer_storage import _ADAPTER_BUFFERS, _AdapterStateMixin, _check_input, _int_arg, _PackedWeightMixin, from_float_layer

__all__ = ["QuantLinear"]


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
        self._register_adapter_buffers(rank, in_features, out_features, adapter_dtype)
        self._sync_adapter_persistence()
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = LAYER_DEFAULTS.linear_bits, rank: int = 0,
                    **options) -> "QuantLinear":
        """Quantize ``linear`` and attach a rank-``rank`` residual adapter.

        ``options`` are those of ``CoRaConv2d.from_conv`` (:class:`cora.layer_storage.LayerBuild`), with
        ``codes`` ``[out, in]``, ``hessian`` ``[in, in]`` (the inputs' second moment) and ``adapter``
        ``(A [r, in], B [out, r])``.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects nn.Linear, got {type(linear).__name__}")
        shape = (linear.in_features, linear.out_features, linear.bias is not None)
        return from_float_layer(
            linear, "linear", lambda r, dt: cls(*shape, bits=bits, rank=r, adapter_dtype=dt), rank, options
        )

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
