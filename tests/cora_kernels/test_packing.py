"""Packed weight format: exact round trips, padding, plane shapes, and the Triton unpack helpers."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cora_kernels.packing import (
    PACK_FORMAT_VERSION,
    SUPPORTED_BITS,
    from_gemm_layout,
    pack_codes,
    plane_bits,
    to_gemm_layout,
    unpack_codes,
)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(SUPPORTED_BITS), c_out=st.integers(1, 9), k=st.integers(1, 130),
       seed=st.integers(0, 2**31 - 1))
def test_round_trip_exact(bits, c_out, k, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (c_out, k), generator=g)
    planes = pack_codes(codes, bits)
    assert len(planes) == len(plane_bits(bits))
    for p, nb in zip(planes, plane_bits(bits)):
        assert p.dtype == torch.int32 and p.shape == (-(-k // (32 // nb)), c_out)
    back = unpack_codes(planes, bits, k)
    assert back.dtype == torch.uint8
    assert torch.equal(back.to(torch.int64), codes)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_extreme_codes_and_sign_bit(bits):
    # all-ones codes set bit 31 of every word: the signed int32 storage must still round-trip
    k = 3 * 32 + 5
    for val in (0, 2**bits - 1):
        codes = torch.full((4, k), val, dtype=torch.int64)
        assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, k).long(), codes)


def test_int3_is_exactly_three_bits():
    k, c_out = 320, 8
    planes = pack_codes(torch.randint(0, 8, (c_out, k)), 3)
    total_bits = sum(p.numel() * 32 for p in planes)
    assert total_bits == 3 * k * c_out
    assert [p.shape[0] for p in planes] == [k // 16, k // 32]


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_padding_not_truncation(bits):
    # K not a multiple of the word size: padded with zero codes, never truncated
    k = 27
    codes = torch.randint(1, 2**bits, (5, k))
    planes = pack_codes(codes, bits)
    for p, nb in zip(planes, plane_bits(bits)):
        assert p.shape[0] * (32 // nb) >= k
    full = unpack_codes(planes, bits, max(p.shape[0] * (32 // nb) for p, nb in zip(planes, plane_bits(bits))))
    assert torch.equal(full[:, :k].long(), codes)
    assert (full[:, k:] == 0).all()
    with pytest.raises(ValueError):
        unpack_codes(planes, bits, k + 40)  # wrong K for these planes is refused


def test_gemm_layout_round_trip():
    w = torch.randn(6, 5, 3, 2)
    m = to_gemm_layout(w)
    assert m.shape == (6, 3 * 2 * 5)
    # C_in fastest: element (o, kh, kw, c) at column (kh*kw_size + kw)*C_in + c
    assert m[2, (1 * 2 + 1) * 5 + 3] == w[2, 3, 1, 1]
    assert torch.equal(from_gemm_layout(m, tuple(w.shape)), w)


def test_bad_inputs():
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([[16]]), 4)
    with pytest.raises(TypeError):
        pack_codes(torch.zeros(2, 2), 4)
    with pytest.raises(ValueError):
        plane_bits(5)
    assert PACK_FORMAT_VERSION >= 1


# --- the @triton.jit helpers, under the interpreter on CPU ----------------------------------------

import triton  # noqa: E402  (conftest has set TRITON_INTERPRET=1 on CPU-only machines)
import triton.language as tl  # noqa: E402

from cora_kernels.packing_jit import load_codes_aligned, load_codes_gather  # noqa: E402


@triton.jit
def _unpack_test_kernel(w0, w1, out, K, C_out, k_start, BITS: tl.constexpr, ALIGNED: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    n_mask = offs_n < C_out
    kk = k_start + tl.arange(0, BLOCK_K)
    if ALIGNED:
        q = load_codes_aligned(w0, w1, k_start, K, offs_n, n_mask, C_out, BITS, BLOCK_K)
    else:
        q = load_codes_gather(w0, w1, kk, offs_n, (kk < K)[:, None] & n_mask[None, :], C_out, BITS)
    tl.store(out + tl.arange(0, BLOCK_K)[:, None] * C_out + offs_n[None, :], q,
             mask=(kk < K)[:, None] & n_mask[None, :])


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("aligned", [False, True])
def test_triton_unpack_helpers(bits, aligned):
    kern = _unpack_test_kernel
    c_out, k = 5, 64 + 32 + 7
    codes = torch.randint(0, 2**bits, (c_out, k))
    planes = pack_codes(codes, bits)
    w1 = planes[1] if len(planes) > 1 else planes[0]
    starts = (0, 32, 64) if aligned else (0, 3, 45, 70)
    for k_start in starts:
        out = torch.full((32, c_out), -1, dtype=torch.int32)
        kern[(1,)](planes[0], w1, out, k, c_out, k_start, BITS=bits, ALIGNED=aligned, BLOCK_K=32, BLOCK_N=8)
        n = min(32, k - k_start)
        assert torch.equal(out[:n].t().long(), codes[:, k_start:k_start + n]), (bits, aligned, k_start)
