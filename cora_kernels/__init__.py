"""Triton kernels for CoRa layers (imports only torch and triton; no device work at import).

Importing this package is light: it loads the packed-format helpers only.  ``cora_conv2d`` (the op,
``torch.ops.cora.conv2d``) and ``cora_conv2d_reference`` are loaded on first access, and Triton is
imported only when the Triton backend first runs.
"""
from .packing import (
    PACK_FORMAT_VERSION,
    SUPPORTED_BITS,
    from_gemm_layout,
    pack_codes,
    plane_bits,
    to_gemm_layout,
    unpack_codes,
)

__all__ = [
    "PACK_FORMAT_VERSION",
    "SUPPORTED_BITS",
    "plane_bits",
    "pack_codes",
    "unpack_codes",
    "to_gemm_layout",
    "from_gemm_layout",
    "cora_conv2d",
    "cora_conv2d_reference",
    "dequantize_weight",
]

_LAZY = {
    "cora_conv2d": ("ops", "cora_conv2d"),
    "cora_conv2d_reference": ("reference", "cora_conv2d_reference"),
    "dequantize_weight": ("reference", "dequantize_weight"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{mod}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
