"""Triton kernels for CoRa layers: low-bit packed conv weights plus a low-rank adapter, one launch.

Modules (imports only torch and triton; no device work at import):

* :mod:`.packing` -- the packed weight format and the int8 adapter format (host side);
  :mod:`.packing_jit` its Triton unpackers;
* :mod:`.geometry` -- conv shapes and padding, the fused activations (:data:`ACTIVATIONS`),
  validation of a layer call;
* :mod:`.reference` -- the pure-torch ground truth;
* :mod:`.records` -- the typed records a layer travels in (:class:`~.records.PackedWeight`,
  :class:`~.records.Epilogue`); :mod:`.environment` -- the environment variables the kernels read;
* :mod:`.conv_fused` -- the fused Triton kernel and its launcher :func:`cora_conv2d_triton`, which
  picks one of two strategies per call: the fused kernel, or :mod:`.dequantize` (the effective weight
  written into :mod:`.scratch`, then the vendor conv);
* :mod:`.conv_depthwise` -- the direct kernel for grouped and depthwise convs (``groups > 1``) and
  its launcher :func:`cora_conv2d_grouped_triton`;
* :mod:`.prepared` -- a layer validated once and planned per input shape (what deployed convs call);
* :mod:`.tuning` -- launch configurations, the autotuner and its cache (:func:`save_tuning`,
  :func:`load_tuning`), shipped tables, the tuning budget; :mod:`.cost_model` -- its untimed estimates;
* :mod:`.ops` -- the ``cora::conv2d`` op (:func:`cora_conv2d`) and the backend choice
  (:class:`Backend`, :func:`resolve_backend`, env ``CORA_BACKEND``);
* :mod:`.testing` -- random layers and the error measure shared by tests and benchmarks.

Importing this package is light: it loads the packed format and the geometry helpers only.  The
other names are loaded on first access, and Triton is imported only when the Triton backend first
runs (or :func:`cora_conv2d_triton` / :func:`cora_conv2d_grouped_triton` is first accessed).
"""
from .geometry import ACTIVATIONS, PADDING_MODES, conv_output_size, explicit_padding, pad_input
from .packing import (
    PACK_FORMAT_VERSION,
    SUPPORTED_BITS,
    dequantize_adapter,
    from_gemm_layout,
    pack_codes,
    plane_bits,
    quantize_adapter,
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
    "quantize_adapter",
    "dequantize_adapter",
    "ACTIVATIONS",
    "PADDING_MODES",
    "conv_output_size",
    "explicit_padding",
    "pad_input",
    "Backend",
    "resolve_backend",
    "cora_conv2d",
    "cora_conv2d_reference",
    "cora_conv2d_triton",
    "cora_conv2d_grouped_triton",
    "dequantize_weight",
    "save_tuning",
    "load_tuning",
]

# name -> (module, attribute), imported on first access
_LAZY = {
    "Backend": ("ops", "Backend"),
    "resolve_backend": ("ops", "resolve_backend"),
    "cora_conv2d": ("ops", "cora_conv2d"),
    "cora_conv2d_reference": ("reference", "cora_conv2d_reference"),
    "cora_conv2d_triton": ("conv_fused", "cora_conv2d_triton"),  # imports triton
    "cora_conv2d_grouped_triton": ("conv_depthwise", "cora_conv2d_grouped_triton"),  # imports triton
    "dequantize_weight": ("reference", "dequantize_weight"),
    "save_tuning": ("tuning", "save_tuning"),
    "load_tuning": ("tuning", "load_tuning"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{mod}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
