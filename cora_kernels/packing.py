"""Packed storage of b-bit integer weight codes.

Layout, shared by the host code here and the Triton kernels:

* A conv weight ``[C_out, C_in, kh, kw]`` is reordered to ``[C_out, kh, kw, C_in]`` and flattened to
  a GEMM matrix ``[C_out, K]`` with ``K = kh * kw * C_in`` (C_in fastest), so one K-tile at a fixed
  tap reads contiguous channels of an NHWC activation.  A linear weight ``[C_out, C_in]`` is already
  ``[C_out, K]``.
* Codes are unsigned integers in ``[0, 2**bits)``.  They are packed along K into int32 words and
  stored **transposed**, ``[n_words, C_out]`` (C_out contiguous), so a K-row of a tile loads coalesced.
  Code ``k`` sits in word ``k // per_word`` at bit offset ``(k % per_word) * plane_bits``.
* bits 2, 4, 8: one plane of ``plane_bits = bits`` (16, 8, 4 codes per int32).
* bits 3: exactly 3 bits per weight as two planes, a 2-bit plane (16 per int32) holding ``q & 3``
  and a 1-bit plane (32 per int32) holding ``q >> 2``; ``q = lo | (hi << 2)``.
* K that is not a multiple of a plane's codes-per-word is zero-padded up to a whole word; ``K`` is
  always passed to :func:`unpack_codes` so nothing is truncated or invented.

The format is versioned by :data:`PACK_FORMAT_VERSION`; saved states record it.

int8 adapter factors (``A`` ``[r, K]`` in the same GEMM order, ``B`` ``[C_out, r]``) are stored as
int8 codes in ``[-127, 127]`` with one symmetric fp32 scale per row: ``A = scale[:, None] * q``
(:func:`quantize_adapter` rounds to nearest, :func:`dequantize_adapter` inverts it).
"""
from __future__ import annotations

import torch

__all__ = [
    "PACK_FORMAT_VERSION",
    "SUPPORTED_BITS",
    "plane_bits",
    "to_gemm_layout",
    "from_gemm_layout",
    "pack_codes",
    "unpack_codes",
    "ADAPTER_QMAX",
    "quantize_adapter",
    "dequantize_adapter",
]

PACK_FORMAT_VERSION = 1
SUPPORTED_BITS = (2, 3, 4, 8)
ADAPTER_QMAX = 127  # symmetric int8: -128 is never used, so -q is always representable


def plane_bits(bits: int) -> tuple[int, ...]:
    """Bit widths of the planes that store ``bits``-bit codes, low plane first."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits}; supported: {SUPPORTED_BITS}")
    return (2, 1) if bits == 3 else (bits,)


def to_gemm_layout(weight: torch.Tensor) -> torch.Tensor:
    """``[C_out, C_in, kh, kw]`` (or ``[C_out, C_in]``) -> ``[C_out, kh*kw*C_in]``, C_in fastest."""
    if weight.dim() == 2:
        return weight
    if weight.dim() != 4:
        raise ValueError(f"expected a 2-D or 4-D weight, got shape {tuple(weight.shape)}")
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def from_gemm_layout(mat: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`to_gemm_layout` for a weight of the given original ``shape``."""
    if len(shape) == 2:
        return mat.reshape(shape)
    c_out, c_in, kh, kw = shape
    return mat.reshape(c_out, kh, kw, c_in).permute(0, 3, 1, 2).contiguous()


def _pack_plane(values: torch.Tensor, nbits: int) -> torch.Tensor:
    """Pack ``[C_out, K]`` values < 2**nbits into int32 words ``[ceil(K/per), C_out]``."""
    per = 32 // nbits
    c_out, k = values.shape
    n_words = -(-k // per)
    padded = torch.zeros(c_out, n_words * per, dtype=torch.int64, device=values.device)
    padded[:, :k] = values.to(torch.int64)
    shifts = torch.arange(per, device=values.device, dtype=torch.int64) * nbits
    words = (padded.view(c_out, n_words, per) << shifts).sum(dim=-1)  # < 2**32, exact in int64
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as signed int32
    return words.to(torch.int32).t().contiguous()


def _unpack_plane(words: torch.Tensor, nbits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`_pack_plane`: int32 ``[n_words, C_out]`` -> int64 ``[C_out, k]``."""
    per = 32 // nbits
    shifts = torch.arange(per, device=words.device, dtype=torch.int64) * nbits
    w = words.t().to(torch.int64) & 0xFFFFFFFF  # unsigned view of each word
    vals = (w.unsqueeze(-1) >> shifts) & ((1 << nbits) - 1)
    return vals.reshape(w.shape[0], -1)[:, :k]


def pack_codes(codes: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """Pack integer codes ``[C_out, K]`` (any integer dtype, values in ``[0, 2**bits)``).

    Returns the planes, low plane first: one int32 ``[ceil(K/(32/bits)), C_out]`` tensor for
    bits 2/4/8, or ``[2-bit plane [ceil(K/16), C_out], 1-bit plane [ceil(K/32), C_out]]`` for bits 3.
    """
    pbits = plane_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"codes must be [C_out, K], got shape {tuple(codes.shape)}")
    if codes.is_floating_point() or codes.is_complex():
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits: [{int(codes.min())}, {int(codes.max())}]")
    if bits == 3:
        c = codes.to(torch.int64)
        return [_pack_plane(c & 3, 2), _pack_plane(c >> 2, 1)]
    return [_pack_plane(codes, pbits[0])]


def unpack_codes(planes: list[torch.Tensor] | tuple[torch.Tensor, ...], bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: returns uint8 codes ``[C_out, k]``."""
    pbits = plane_bits(bits)
    if len(planes) != len(pbits):
        raise ValueError(f"{bits}-bit codes need {len(pbits)} plane(s), got {len(planes)}")
    for plane, nb in zip(planes, pbits):
        need = -(-k // (32 // nb))
        if plane.dtype != torch.int32 or plane.dim() != 2 or plane.shape[0] != need:
            raise ValueError(
                f"bad {nb}-bit plane: expected int32 [{need}, C_out], got {plane.dtype} {tuple(plane.shape)}"
            )
    if bits == 3:
        lo = _unpack_plane(planes[0], 2, k)
        hi = _unpack_plane(planes[1], 1, k)
        return (lo | (hi << 2)).to(torch.uint8)
    return _unpack_plane(planes[0], pbits[0], k).to(torch.uint8)


def quantize_adapter(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round an adapter factor ``[rows, cols]`` to int8, one symmetric scale per row.

    Returns ``(q, scale)``: ``q`` int8 ``[rows, cols]`` in ``[-127, 127]``, ``scale`` float32
    ``[rows]`` = ``max_j |t[i, j]| / 127`` (0 for an all-zero row, whose codes are 0); ``q`` is
    ``t / scale`` rounded to nearest (ties to even), computed in float32 on ``t``'s device.  A
    non-finite row gives a non-finite scale, so the dequantized factor is non-finite too.
    """
    t = t.detach().float()
    scale = t.abs().amax(dim=1) / ADAPTER_QMAX if t.shape[1] else t.new_zeros(t.shape[0])
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # zero rows: codes 0, no 0/0
    q = torch.round(t / safe[:, None]).clamp_(-ADAPTER_QMAX, ADAPTER_QMAX)
    return torch.nan_to_num(q).to(torch.int8), scale


def dequantize_adapter(q: torch.Tensor, scale: torch.Tensor | None, dtype=torch.float32) -> torch.Tensor:
    """An adapter factor as floats in ``dtype``: ``scale[:, None] * q`` for int8 ``q`` ``[rows, cols]``
    with one scale per row (``[rows]``), computed in fp32 (fp64 when asked for); a float ``q`` with
    ``scale`` None is only cast."""
    if scale is None:
        return q.to(dtype)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    return (scale.to(cdt)[:, None] * q.to(cdt)).to(dtype)
