"""Codes packed into int32 words, as the GPTQ, AWQ and compressed-tensors layouts store them.

All three pack a run of ``n`` unsigned codes of ``bits`` bits into ``n * bits / 32`` int32
words as one little-endian bit stream: code ``k`` occupies stream bits ``[k*bits, (k+1)*bits)``
and stream bit ``i`` is bit ``i % 32`` of word ``i // 32``. That is lowbit's own dense packing
(:mod:`lowbit.codecs.packing`) read four bytes at a time, so it is done through it.

* 2, 4 and 8 bits: ``32 / bits`` codes per word, code ``j`` at ``word >> (j * bits)``.
* 3 bits: 32 codes fill three words; codes 10 and 21 straddle a word boundary::

      word 0: c0..c9 at bits 0..29, c10 bits 0-1 at bits 30-31
      word 1: c10 bit 2 at bit 0, c11..c20 at bits 1..30, c21 bit 0 at bit 31
      word 2: c21 bits 1-2 at bits 0-1, c22..c31 at bits 2..31

  (AutoGPTQ's and GPTQModel's ``pack``; their unpack reads it with a table of shifts and two
  fix-ups for codes 10 and 21).

AWQ's GEMM layout (4 bits) additionally interleaves each word: nibble ``j`` holds code
``AWQ_ORDER[j]`` of its eight, i.e. the eight codes go in as ``c0 c2 c4 c6 c1 c3 c5 c7``.

A run must fill whole words (``n * bits`` a multiple of 32); the callers check that first
(compressed-tensors' rows, which end mid-word, are padded to whole words and cut back:
:func:`lowbit.io.compressed_tensors.pack_rows`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from lowbit.codecs.packing import pack_codes, unpack_codes

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble j of an AWQ word holds code AWQ_ORDER[j] of its eight

if sys.byteorder != "little":  # the int32 views below reinterpret little-endian bytes
    raise ImportError("lowbit's int32 packing (GPTQ, AWQ, compressed-tensors) assumes a little-endian machine")


def fills_words(n: int, bits: int) -> bool:
    """Whether ``n`` codes of ``bits`` bits fill whole int32 words."""
    return n * bits % 32 == 0


def pack_int32(codes: torch.Tensor, bits: int, order: Sequence[int] | None = None) -> torch.Tensor:
    """Pack ``codes`` ``(rows, n)`` (unsigned, < 2**bits) along their last dimension into int32
    ``(rows, n * bits / 32)``; with ``order`` (a permutation of each word's codes, e.g.
    :data:`AWQ_ORDER`) slot ``j`` of a word holds code ``order[j]`` of its run."""
    rows, n = codes.shape
    if not fills_words(n, bits):
        raise ValueError(f"{n} codes of {bits} bits do not fill whole int32 words")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"values {int(codes.min())}..{int(codes.max())} do not fit {bits}-bit fields")
    if order is not None:
        per_word = len(order)
        codes = codes.reshape(rows, n // per_word, per_word)[:, :, list(order)]
    packed = pack_codes(codes.reshape(-1).to(torch.uint8), bits)
    return packed.view(torch.int32).reshape(rows, n * bits // 32)


def unpack_int32(words: torch.Tensor, bits: int, order: Sequence[int] | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: uint8 codes ``(rows, words * 32 / bits)``."""
    if words.dtype != torch.int32 or words.dim() != 2:
        raise ValueError(f"expected a 2-D int32 tensor, got {words.dtype} of shape {tuple(words.shape)}")
    rows, width = words.shape
    if width * 32 % bits:
        raise ValueError(f"{width} int32 words do not hold whole {bits}-bit codes")
    n = width * 32 // bits
    raw = words.contiguous().view(torch.uint8).reshape(-1)
    codes = unpack_codes(raw, bits, rows * n).view(rows, n)
    if order is not None:
        per_word = len(order)
        inverse = [list(order).index(j) for j in range(per_word)]
        codes = codes.view(rows, n // per_word, per_word)[:, :, inverse].reshape(rows, n)
    return codes
