"""ggml's byte layout of the legacy block types, to and from lowbit's quantized tensors.

Per block of 32 values (little-endian, as in ggml-common.h):

* Q4_0 ``[d f16][qs 16]``, Q4_1 ``[d f16][m f16][qs 16]``: byte ``j`` of ``qs`` holds value
  ``j`` in its low nibble and value ``j + 16`` in its high nibble.
* Q5_0 ``[d f16][qh u32][qs 16]``, Q5_1 ``[d f16][m f16][qh u32][qs 16]``: ``qs`` holds the
  low four bits as above; bit ``j`` of ``qh`` is the fifth bit of value ``j``.
* Q8_0 ``[d f16][qs 32 x int8]``.

A tensor of shape ``(rows, cols)`` is ``rows`` rows of ``cols / 32`` consecutive blocks.
"""

from __future__ import annotations

import torch

from lowbit.codecs import QuantizedTensor
from lowbit.codecs.ggml_legacy import GGML_BLOCK, GGMLLegacyCodec

BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34}


def _f16_bytes(t: torch.Tensor) -> torch.Tensor:
    """``(R, nb)`` fp16 -> ``(R, nb, 2)`` uint8, little-endian."""
    return t.to(torch.float16).contiguous().view(torch.uint8).reshape(*t.shape, 2)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """``(R, nb, 32)`` codes -> ``(R, nb, 16)`` bytes: low nibbles of values j and j + 16."""
    q = q.to(torch.uint8)
    return (q[..., :16] & 0x0F) | ((q[..., 16:] & 0x0F) << 4)


def _high_bits(q: torch.Tensor) -> torch.Tensor:
    """``(R, nb, 32)`` 5-bit codes -> ``(R, nb, 4)`` bytes of the little-endian u32 of fifth bits."""
    bits = ((q.to(torch.int64) >> 4) & 1).view(*q.shape[:-1], 4, 8)
    return (bits << torch.arange(8, device=q.device)).sum(-1).to(torch.uint8)


def to_ggml_blocks(qt: QuantizedTensor, codec: GGMLLegacyCodec) -> torch.Tensor:
    """The ggml bytes ``(rows, cols / 32 * block_bytes)`` uint8 of a tensor stored by ``codec``."""
    if qt.data.get("g_idx") is not None:
        raise ValueError("ggml block types have no g_idx: quantize without act-order or with static groups")
    codes, scale = codec.unpack(qt)  # (R, nb, 32)
    parts = [_f16_bytes(scale["d"])]
    if codec.affine:
        parts.append(_f16_bytes(scale["m"]))
    if codec.bits == 8:
        parts.append(codes.to(torch.uint8) ^ 0x80)  # code - 128 as a two's-complement byte
    else:
        if codec.bits == 5:
            parts.append(_high_bits(codes))
        parts.append(_nibbles(codes))
    out = torch.cat(parts, dim=-1)
    rows = qt.shape[0]
    return out.reshape(rows, -1)


def from_ggml_blocks(raw: torch.Tensor, codec: GGMLLegacyCodec, shape: tuple[int, int]) -> QuantizedTensor:
    """A :class:`QuantizedTensor` from ggml bytes of ``codec``'s type for a weight of ``shape``
    ``(rows, cols)``; ValueError when the byte count does not fit."""
    rows, cols = shape
    bb = BLOCK_BYTES[codec.ggml_type]
    if cols % GGML_BLOCK:
        raise ValueError(f"{codec.ggml_type}: rows of {cols} values are not whole blocks of {GGML_BLOCK}")
    nb = cols // GGML_BLOCK
    if raw.numel() != rows * nb * bb:
        raise ValueError(f"{codec.ggml_type} tensor of shape {shape} needs {rows * nb * bb} bytes, got {raw.numel()}")
    b = raw.reshape(rows, nb, bb).to(torch.uint8)
    scale = {"d": b[..., 0:2].contiguous().view(torch.float16).reshape(rows, nb)}
    at = 2
    if codec.affine:
        scale["m"] = b[..., 2:4].contiguous().view(torch.float16).reshape(rows, nb)
        at = 4
    if codec.bits == 8:
        codes = b[..., at:] ^ 0x80
    else:
        qs = b[..., -16:]
        codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1)
        if codec.bits == 5:
            qh = b[..., at:at + 4].to(torch.int64)
            high = ((qh.unsqueeze(-1) >> torch.arange(8)) & 1).reshape(rows, nb, 32).to(torch.uint8)
            codes = codes | (high << 4)
    return codec.pack(codes.reshape(rows, cols), scale, shape)


def reencode_counts(path: str, ggml_type: str = "Q4_1") -> list[tuple[str, int, int]]:
    """For each ``ggml_type`` tensor of the GGUF file at ``path``: (name, blocks, blocks that
    come out byte for byte identical when lowbit decodes the tensor and quantizes the decoded
    values again with its codec of that type)."""
    from gguf import GGMLQuantizationType, GGUFReader

    from lowbit.codecs import codec_from_dict

    codec = codec_from_dict({"name": ggml_type.lower()})
    assert isinstance(codec, GGMLLegacyCodec)
    bb = BLOCK_BYTES[ggml_type]
    out = []
    for t in GGUFReader(path).tensors:
        if t.tensor_type != GGMLQuantizationType[ggml_type]:
            continue
        cols = int(t.shape[0])
        rows = int(t.n_elements) // cols
        raw = torch.from_numpy(t.data.reshape(-1).copy())
        qt = from_ggml_blocks(raw, codec, (rows, cols))
        again = to_ggml_blocks(codec.quantize(codec.dequantize(qt)), codec).reshape(-1, bb)
        same = int((again == raw.view(-1, bb)).all(dim=1).sum())
        out.append((t.name, again.shape[0], same))
    return out
