"""``@triton.jit`` unpack helpers for the packed layout of :mod:`cora_kernels.packing`.

Kept apart from ``packing.py`` so that importing the host format (and ``cora_kernels``) does not
import Triton.  The layout is the one documented in ``packing.py``: codes along K are packed
``32 // plane_bits`` per int32 word, words stored ``[n_words, C_out]`` (C_out contiguous); bits 3
is a 2-bit plane (``q & 3``) plus a 1-bit plane (``q >> 2``).

Two ways to turn a K-tile of words into a ``[BLOCK_K, BLOCK_N]`` tile of codes:

* :func:`load_codes_gather` -- any K offset (the tile may start in the middle of a word, which
  happens when ``C_in`` is not a multiple of the codes-per-word).  Row ``k`` reads word
  ``k // per`` (the same word is fetched ``per`` times; those loads coalesce and hit L1).
* :func:`load_codes_aligned` -- the tile starts on a word boundary and ``BLOCK_K`` is a multiple of
  the codes-per-word of every plane: it loads ``BLOCK_K // per`` words per column once and expands
  them in registers (``[words, per, N]`` then a row-major reshape to ``[BLOCK_K, N]``), so the
  shared-memory / load traffic is the packed size, not 32 bits per code.
* :func:`load_codes_row` -- one K index (a scalar) for a vector of columns: the direct grouped /
  depthwise kernel (:mod:`cora_kernels.conv_depthwise`), whose K is only ``kh*kw*C_in/groups``.

All shifts are arithmetic on signed int32 words; masking after the shift gives the right field
for every bit offset, including the sign bit.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["unpack_field", "load_codes_gather", "load_codes_aligned", "load_codes_row"]


@triton.jit
def unpack_field(words, kk, NBITS: tl.constexpr):
    """Code of global K index ``kk`` (``[BLOCK_K]``) from its word (``[BLOCK_K, BLOCK_N]`` int32)."""
    PER: tl.constexpr = 32 // NBITS
    shift = (kk % PER) * NBITS
    return (words >> shift[:, None]) & ((1 << NBITS) - 1)


@triton.jit
def load_codes_gather(w0_ptr, w1_ptr, kk, offs_n, mask, ld, BITS: tl.constexpr):
    """Integer codes ``[BLOCK_K, BLOCK_N]`` for global K indices ``kk`` and columns ``offs_n``.

    ``ld`` is the row stride of the planes (``C_out``).  ``mask`` masks rows (K past the end of
    the tap / of K) and columns; masked codes read as 0.
    """
    if BITS == 3:
        lo_w = tl.load(w0_ptr + (kk // 16)[:, None] * ld + offs_n[None, :], mask=mask, other=0)
        hi_w = tl.load(w1_ptr + (kk // 32)[:, None] * ld + offs_n[None, :], mask=mask, other=0)
        q = unpack_field(lo_w, kk, 2) | (unpack_field(hi_w, kk, 1) << 2)
    else:
        PER: tl.constexpr = 32 // BITS
        w = tl.load(w0_ptr + (kk // PER)[:, None] * ld + offs_n[None, :], mask=mask, other=0)
        q = unpack_field(w, kk, BITS)
    return q


@triton.jit
def _expand_plane(w_ptr, k0, kmax, offs_n, n_mask, ld, NBITS: tl.constexpr, BLOCK_K: tl.constexpr):
    # words covering K indices [k0, k0 + BLOCK_K); k0 is a multiple of 32 // NBITS
    PER: tl.constexpr = 32 // NBITS
    NW: tl.constexpr = BLOCK_K // PER
    rows = k0 // PER + tl.arange(0, NW)
    row_ok = rows * PER < kmax
    words = tl.load(w_ptr + rows[:, None] * ld + offs_n[None, :],
                    mask=row_ok[:, None] & n_mask[None, :], other=0)
    shifts = tl.arange(0, PER) * NBITS
    q = (words[:, None, :] >> shifts[None, :, None]) & ((1 << NBITS) - 1)
    return tl.reshape(q, (BLOCK_K, words.shape[1]))


@triton.jit
def load_codes_aligned(w0_ptr, w1_ptr, k0, kmax, offs_n, n_mask, ld,
                       BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Codes ``[BLOCK_K, BLOCK_N]`` for K indices ``k0 + arange(BLOCK_K)``.

    Requires ``k0`` on a word boundary of every plane and ``BLOCK_K`` a multiple of the
    codes-per-word (32 for bits 3, whose 1-bit plane holds 32 codes per word).  Words that start
    at or past ``kmax`` read as 0.
    """
    if BITS == 3:
        lo = _expand_plane(w0_ptr, k0, kmax, offs_n, n_mask, ld, 2, BLOCK_K)
        hi = _expand_plane(w1_ptr, k0, kmax, offs_n, n_mask, ld, 1, BLOCK_K)
        q = lo | (hi << 2)
    else:
        q = _expand_plane(w0_ptr, k0, kmax, offs_n, n_mask, ld, BITS, BLOCK_K)
    return q


@triton.jit
def load_codes_row(w0_ptr, w1_ptr, k, offs_n, n_mask, ld, BITS: tl.constexpr):
    """Integer codes ``[BLOCK_N]`` (int32) of the one K index ``k`` (a scalar) for columns ``offs_n``.

    ``ld`` is the row stride of the planes (``C_out``); masked columns read as 0.  Each column
    loads one word per plane (coalesced along C_out) and shifts the field out of it.
    """
    if BITS == 3:
        lo = tl.load(w0_ptr + (k // 16) * ld + offs_n, mask=n_mask, other=0)
        hi = tl.load(w1_ptr + (k // 32) * ld + offs_n, mask=n_mask, other=0)
        q = ((lo >> ((k % 16) * 2)) & 3) | (((hi >> (k % 32)) & 1) << 2)
    else:
        PER: tl.constexpr = 32 // BITS
        w = tl.load(w0_ptr + (k // PER) * ld + offs_n, mask=n_mask, other=0)
        q = (w >> ((k % PER) * BITS)) & ((1 << BITS) - 1)
    return q
