"""Triton kernels for CoRa layers (imports only torch and triton; no device work at import)."""
from .packing import PACK_FORMAT_VERSION, SUPPORTED_BITS, from_gemm_layout, pack_codes, to_gemm_layout, unpack_codes

__all__ = ["PACK_FORMAT_VERSION", "SUPPORTED_BITS", "pack_codes", "unpack_codes", "to_gemm_layout", "from_gemm_layout"]
