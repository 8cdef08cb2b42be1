"""Dense bit packing against a pure-Python LSB-first bit-stream packer."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.codecs import pack_codes, packed_nbytes, unpack_codes


def ref_pack(codes: list[int], bits: int) -> bytes:
    """Code i occupies stream bits [i*bits, (i+1)*bits), LSB first; stream bit k is bit k%8 of byte k//8."""
    out = bytearray((len(codes) * bits + 7) // 8)
    for i, c in enumerate(codes):
        for b in range(bits):
            k = i * bits + b
            if (c >> b) & 1:
                out[k // 8] |= 1 << (k % 8)
    return bytes(out)


def ref_unpack(data: bytes, bits: int, n: int) -> list[int]:
    codes = []
    for i in range(n):
        c = 0
        for b in range(bits):
            k = i * bits + b
            c |= ((data[k // 8] >> (k % 8)) & 1) << b
        codes.append(c)
    return codes


@st.composite
def codes_and_bits(draw):  # type: ignore[no-untyped-def]
    bits = draw(st.integers(1, 8))
    codes = draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=0, max_size=70))
    return codes, bits


@settings(max_examples=300, deadline=None)
@given(codes_and_bits())
def test_pack_matches_bit_stream_reference(cb):  # type: ignore[no-untyped-def]
    codes, bits = cb
    packed = pack_codes(torch.tensor(codes, dtype=torch.uint8), bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert bytes(packed.tolist()) == ref_pack(codes, bits)
    assert packed.numel() == packed_nbytes(len(codes), bits)
    back = unpack_codes(packed, bits, len(codes))
    assert back.dtype == torch.uint8
    assert back.tolist() == codes


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 9, 15, 17, 63, 1001])
def test_every_bits_and_odd_lengths(bits: int, n: int) -> None:
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert bytes(packed.tolist()) == ref_pack(codes.tolist(), bits)
    # unpack against the reference unpacker on arbitrary bytes too (not only on our own output)
    assert unpack_codes(packed, bits, n).tolist() == ref_unpack(bytes(packed.tolist()), bits, n)


@pytest.mark.parametrize("bits", range(1, 9))
def test_unpack_arbitrary_bytes(bits: int) -> None:
    n = 37
    nbytes = packed_nbytes(n, bits)
    raw = torch.randint(0, 256, (nbytes,), generator=torch.Generator().manual_seed(bits), dtype=torch.int64)
    raw = raw.to(torch.uint8)
    assert unpack_codes(raw, bits, n).tolist() == ref_unpack(bytes(raw.tolist()), bits, n)


def test_documented_layouts() -> None:
    # two 4-bit codes share a byte as c0 | c1 << 4
    assert pack_codes(torch.tensor([0x3, 0xA], dtype=torch.uint8), 4).tolist() == [0xA3]
    # eight 3-bit codes fill exactly three bytes
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    assert pack_codes(codes, 3).tolist() == list(ref_pack(codes.tolist(), 3))
    assert pack_codes(codes, 3).numel() == 3
    # 2-D input packs in row-major order
    m = torch.tensor([[1, 0], [3, 2]], dtype=torch.uint8)
    assert pack_codes(m, 2).tolist() == [1 | 0 << 2 | 3 << 4 | 2 << 6]


@pytest.mark.parametrize(
    ("numel", "bits", "expected"),
    [(0, 4, 0), (1, 1, 1), (8, 1, 1), (9, 1, 2), (3, 3, 2), (8, 3, 3), (576 * 3, 4, 864), (5, 8, 5), (7, 7, 7)],
)
def test_packed_nbytes(numel: int, bits: int, expected: int) -> None:
    assert packed_nbytes(numel, bits) == expected


def test_errors() -> None:
    with pytest.raises(ValueError):
        pack_codes(torch.zeros(4, dtype=torch.uint8), 0)
    with pytest.raises(ValueError):
        pack_codes(torch.zeros(4, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, 8)
    with pytest.raises(ValueError):
        unpack_codes(torch.zeros(4, dtype=torch.int32), 4, 8)
