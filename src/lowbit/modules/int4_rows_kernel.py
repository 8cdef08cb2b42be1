"""lowbit's own int4 kernel: ``torch.ops.lowbit.int4_rows`` (``native_int4.cpp``) on 4-bit codes in its
"planes" layout, where a decode step reads the weight at this machine's memory bandwidth (torch's packed int4
operator reaches about two thirds of it: BENCHMARKS.md, decode-operator table).

Layout: each row's codes, padded to a multiple of 64 columns, in chunks of 128 columns stored as 32 16-bit
words (word ``j``: columns ``j``, ``32 + j``, ``64 + j``, ``96 + j`` in its nibbles, lowest first) and a last
half chunk of 64 columns as 32 bytes (byte ``j``: columns ``j`` and ``32 + j``). The weight is
``w = scale * (q - 8) + zero`` per group, ``scale`` and ``zero`` float32 (the codec's own affine form, not
rounded to bf16); ``zero`` is dropped where every group's is 0 (symmetric codecs). The input is rounded to
bf16 at each linear, as with torch's operator, and the products are summed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: input rows up to which the row operator runs; above it, a dense bf16 copy of the weight (made by
#: ``lowbit::int4_dense`` for the call) and ``F.linear`` (the crossover table of benchmark_speed.py)
INT4_ROWS_MAX_ROWS = 24
_CHUNK = 128


def _padded(cols: int) -> int:
    return -(-cols // 64) * 64


def layer_columns(t: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """``(N, K)`` columns in an operator's order (column ``j`` is the layer's ``order[j]``) back in the layer's."""
    if order is None:
        return t
    out = torch.empty_like(t)
    out[:, order] = t
    return out


def pack_planes(codes: torch.Tensor) -> torch.Tensor:
    """``(N, K)`` codes 0..15 -> ``(N, Kp / 2)`` uint8 in the planes layout (``Kp``: ``K`` rounded up to 64;
    padded columns hold code 8, a zero weight)."""
    rows, cols = codes.shape
    kp = _padded(cols)
    c = F.pad(codes.to(torch.int32), (0, kp - cols), value=8)
    full = kp // _CHUNK
    a = c[:, : full * _CHUNK].reshape(rows, full, 4, 32)
    words = a[:, :, 0] | (a[:, :, 1] << 4) | (a[:, :, 2] << 8) | (a[:, :, 3] << 12)
    # int32 -> int16 keeps the low 16 bits (two's complement), the word as stored little-endian
    parts = [words.to(torch.int16).contiguous().view(torch.uint8).reshape(rows, full * 64)]
    if kp % _CHUNK:
        half = c[:, full * _CHUNK:].reshape(rows, 2, 32)
        parts.append((half[:, 0] | (half[:, 1] << 4)).to(torch.uint8))
    return torch.cat(parts, dim=1).contiguous()


def unpack_planes(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """The inverse of :func:`pack_planes`: ``(N, cols)`` uint8 codes."""
    rows, kp = packed.shape[0], packed.shape[1] * 2
    full = kp // _CHUNK
    words = packed[:, : full * 64].contiguous().view(torch.int16).to(torch.int32).reshape(rows, full, 1, 32)
    shifts = torch.tensor([0, 4, 8, 12], dtype=torch.int32).view(1, 1, 4, 1)
    parts = [((words >> shifts) & 15).reshape(rows, full * _CHUNK)]
    if kp % _CHUNK:
        half = packed[:, full * 64:].to(torch.int32).view(rows, 1, 32)
        parts.append(((half >> shifts[0, 0, :2].view(1, 2, 1)) & 15).reshape(rows, 64))
    return torch.cat(parts, dim=1)[:, :cols].to(torch.uint8)


class Int4RowsKernel:
    """``torch.ops.lowbit.int4_rows`` for up to :data:`INT4_ROWS_MAX_ROWS` input rows, a dense bf16 copy of the
    weight and ``F.linear`` above. ``codes`` ``(N, K)`` in the operator's column order (``order``: the layer's
    columns in that order, act-order), ``scale`` / ``offset`` ``(N, G)`` with ``w = scale * q + offset`` per
    group of ``group_size`` (32, 64, 128 or 256) columns, the last group possibly shorter."""

    name = "int4-rows-cpu"
    quantizes_input = False

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int,
                 order: torch.Tensor | None) -> None:
        rows, cols = codes.shape
        self.shape = (rows, cols)
        self.group_size = group_size
        groups = -(-_padded(cols) // group_size)  # the operator's groups: the padded columns' too
        self.packed = pack_planes(codes)
        scale = scale.to(torch.float32)
        zero = offset.to(torch.float32) + 8 * scale
        self.scale = F.pad(scale, (0, groups - scale.shape[1])).contiguous()
        self.zero = None if bool((zero == 0).all()) else F.pad(zero, (0, groups - zero.shape[1])).contiguous()
        self.order = order

    @property
    def nbytes(self) -> int:
        parts = [t for t in (self.packed, self.scale, self.zero, self.order) if t is not None]
        return sum(t.numel() * t.element_size() for t in parts)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``(M, K)`` input, contiguous, float32 or bf16, in the operator's column order."""
        if x.dtype not in (torch.float32, torch.bfloat16):
            x = x.to(torch.float32)
        if self.order is not None:
            x = x.index_select(-1, self.order)
        return x.contiguous()

    def packed_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x (M, K) @ W.T`` through the row operator, in x's dtype (float32 or bf16)."""
        return torch.ops.lowbit.int4_rows(self._prepare(x), self.packed, self.scale, self.zero, self.group_size)

    def dequantized_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x (M, K) @ W.T`` in bf16 through a dense bf16 copy of the weight, made for this call."""
        w = torch.ops.lowbit.int4_dense(self.packed, self.scale, self.zero, self.group_size, self.shape[1],
                                        torch.bfloat16)
        return F.linear(self._prepare(x).to(torch.bfloat16), w)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.shape[1])
        y = self.dequantized_matmul(flat) if flat.shape[0] > INT4_ROWS_MAX_ROWS else self.packed_matmul(flat)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.view(*x.shape[:-1], self.shape[0])

    def codes(self) -> torch.Tensor:
        """The ``(N, K)`` codes in the layer's column order."""
        return layer_columns(unpack_planes(self.packed, self.shape[1]), self.order)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The ``(N, K)`` weight as the operator computes with it, in ``dtype`` and the layer's column order."""
        w = torch.ops.lowbit.int4_dense(self.packed, self.scale, self.zero, self.group_size, self.shape[1],
                                        torch.float32).to(dtype)
        return layer_columns(w, self.order)
