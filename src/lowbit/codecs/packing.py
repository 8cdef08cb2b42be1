"""Dense bit packing of unsigned codes.

Layout: one little-endian bit stream. Code ``i`` (of ``bits`` bits) occupies stream bits
``[i*bits, (i+1)*bits)``, least significant bit first; stream bit ``k`` is bit ``k % 8`` of byte
``k // 8``. So two 4-bit codes share a byte as ``c0 | c1 << 4``, and eight 3-bit codes fill
exactly three bytes::

    byte 0: c0[0:3] c1[0:3] c2[0:2]     byte 1: c2[2] c3 c4 c5[0]     byte 2: c5[1:3] c6 c7

The packed length is ``ceil(n * bits / 8)`` bytes: no padding between rows or groups, so the
byte size of a tensor is exact.
"""

from __future__ import annotations

import torch


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits occupy when packed densely."""
    return (numel * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (any shape, values < 2**bits) into a 1-D uint8 tensor."""
    _check_bits(bits)
    flat = codes.reshape(-1)
    n = flat.numel()
    if bits == 8:
        return flat.to(torch.uint8).clone()
    # Eight codes of `bits` bits fill exactly `bits` bytes; pack them through one int64.
    pad = (-n) % 8
    c = torch.nn.functional.pad(flat.to(torch.int64), (0, pad)).view(-1, 8)
    shifts = torch.arange(8, dtype=torch.int64, device=c.device) * bits
    word = (c << shifts).sum(dim=1, dtype=torch.int64)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=c.device) * 8
    out = ((word.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return out[: packed_nbytes(n, bits)].clone()


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``numel`` codes as a 1-D uint8 tensor."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError("packed codes must be a 1-D uint8 tensor")
    need = packed_nbytes(numel, bits)
    if packed.numel() != need:
        raise ValueError(f"{packed.numel()} packed bytes cannot hold {numel} codes of {bits} bits ({need} needed)")
    if bits == 8:
        return packed.clone()
    pad = (-need) % bits
    b = torch.nn.functional.pad(packed.to(torch.int64), (0, pad)).view(-1, bits)
    word = (b << (torch.arange(bits, dtype=torch.int64, device=b.device) * 8)).sum(dim=1, dtype=torch.int64)
    shifts = torch.arange(8, dtype=torch.int64, device=b.device) * bits
    codes = (word.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:numel].to(torch.uint8)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
