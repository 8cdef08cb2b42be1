"""ggml's byte layout of the legacy block types, to and from lowbit's quantized tensors.

Per block of 32 values (little-endian, as in ggml-common.h):

* Q4_0 ``[d f16][qs 16]``, Q4_1 ``[d f16][m f16][qs 16]``: byte ``j`` of ``qs`` holds value
  ``j`` in its low nibble and value ``j + 16`` in its high nibble.
* Q5_0 ``[d f16][qh u32][qs 16]``, Q5_1 ``[d f16][m f16][qh u32][qs 16]``: ``qs`` holds the
  low four bits as above; bit ``j`` of ``qh`` is the fifth bit of value ``j``.
* Q8_0 ``[d f16][qs 32 x int8]``.

The k-quants (per super-block of 256 values; ``L`` the 256 codes, ``d``/``dmin`` fp16):

* Q2_K ``[scales 16][qs 64][d][dmin]``: scale byte ``j`` is ``sc | mn << 4``; ``qs`` holds two
  bits per code: byte ``32 h + l`` bits ``2 k`` hold ``L[128 h + 32 k + l]``.
* Q3_K ``[hmask 32][qs 64][scales 12][d]``: the low two bits of ``L`` as Q2_K's ``qs``; bit
  ``j / 32`` of ``hmask[j % 32]`` is bit 2 of ``L[j]``; the 6-bit ``sc + 32``: low nibbles in
  bytes 0-7 (sub-blocks 0-7 low, 8-15 high nibble), top two bits of sub-block ``4 k + i`` at bits
  ``2 k`` of byte ``8 + i``.
* Q4_K ``[d][dmin][scales 12][qs 128]``, Q5_K ``[d][dmin][scales 12][qh 32][qs 128]``: the 6-bit
  ``sc``/``mn`` of sub-blocks 0-3 in the low six bits of bytes 0-3 / 4-7; those of sub-blocks 4-7
  as nibbles of bytes 8-11 (``sc`` low, ``mn`` high) with their top two bits in bits 6-7 of bytes
  0-3 / 4-7; ``qs`` byte ``32 c + l`` holds ``L[64 c + l]`` low and ``L[64 c + 32 + l]`` high;
  Q5_K's fifth bits: bit ``2 c + h`` of ``qh[l]`` for ``L[64 c + 32 h + l]``.
* Q6_K ``[ql 128][qh 64][scales 16 x int8][d]``: per half ``n`` of 128 values, ``ql[64 n + l]``
  holds the low nibbles of ``L[128 n + l]`` and ``L[128 n + 64 + l]``, ``ql[64 n + 32 + l]``
  those of ``+ 32`` and ``+ 96``; ``qh[32 n + l]`` bits ``2 k`` hold the top two bits of
  ``L[128 n + 32 k + l]``.

A tensor of shape ``(rows, cols)`` is ``rows`` rows of ``cols / 32`` (``cols / 256``)
consecutive blocks.
"""

from __future__ import annotations

import torch

from lowbit.codecs import QuantizedTensor
from lowbit.codecs.ggml_kquants import KQUANT_BLOCK_BYTES, QK_K, GGMLKQuantCodec
from lowbit.codecs.ggml_legacy import GGML_BLOCK, GGMLBlockCodec
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34, **KQUANT_BLOCK_BYTES}


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


def block_size(ggml_type: str) -> int:
    """Values per block of a ggml type lowbit knows (32, or 256 for the k-quants)."""
    return QK_K if ggml_type in KQUANT_BLOCK_BYTES else GGML_BLOCK


def to_ggml_blocks(qt: QuantizedTensor, codec: GGMLBlockCodec) -> torch.Tensor:
    """The ggml bytes ``(rows, cols / block * block_bytes)`` uint8 of a tensor stored by ``codec``."""
    if qt.data.get("g_idx") is not None:
        raise ValueError("ggml block types have no g_idx: quantize without act-order or with static groups")
    if isinstance(codec, GGMLKQuantCodec):
        return _kquant_to_blocks(qt, codec)
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


def from_ggml_blocks(raw: torch.Tensor, codec: GGMLBlockCodec, shape: tuple[int, int]) -> QuantizedTensor:
    """A :class:`QuantizedTensor` from ggml bytes of ``codec``'s type for a weight of ``shape``
    ``(rows, cols)``; ValueError when the byte count does not fit."""
    rows, cols = shape
    bb = BLOCK_BYTES[codec.ggml_type]
    blk = block_size(codec.ggml_type)
    if cols % blk:
        raise ValueError(f"{codec.ggml_type}: rows of {cols} values are not whole blocks of {blk}")
    nb = cols // blk
    if raw.numel() != rows * nb * bb:
        raise ValueError(f"{codec.ggml_type} tensor of shape {shape} needs {rows * nb * bb} bytes, got {raw.numel()}")
    b = raw.reshape(rows, nb, bb).to(torch.uint8)
    if isinstance(codec, GGMLKQuantCodec):
        return _kquant_from_blocks(b, codec, shape)
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


def _bits_fields(parts: torch.Tensor, shifts: list[int]) -> torch.Tensor:
    """``parts`` ``(..., k, n)`` small codes -> ``(..., n)`` bytes ``sum_k parts[k] << shifts[k]``."""
    sh = torch.tensor(shifts, dtype=torch.int32).view(-1, 1)
    return (parts.to(torch.int32) << sh).sum(-2).to(torch.uint8)


def _fields(b: torch.Tensor, shifts: list[int], mask: int) -> torch.Tensor:
    """``b`` ``(..., n)`` bytes -> ``(..., k, n)`` fields ``(b >> shifts[k]) & mask``."""
    sh = torch.tensor(shifts, dtype=torch.int32).view(-1, 1)
    return ((b.to(torch.int32).unsqueeze(-2) >> sh) & mask).to(torch.uint8)


def _kquant_to_blocks(qt: QuantizedTensor, codec: GGMLKQuantCodec) -> torch.Tensor:
    codes, scale = codec.unpack(qt)
    rows, cols = qt.shape
    ns, ps = cols // QK_K, codec.per_super
    L = codes.reshape(rows, ns, QK_K).to(torch.int32)
    sc = scale["sc"].reshape(rows, ns, ps).to(torch.int32)
    d = _f16_bytes(scale["d"][:, ::ps])
    t = codec.ggml_type
    if t == "Q2_K":
        mn = scale["mn"].reshape(rows, ns, ps).to(torch.int32)
        qs = _bits_fields(L.view(rows, ns, 2, 4, 32), [0, 2, 4, 6]).reshape(rows, ns, 64)
        parts = [(sc | mn << 4).to(torch.uint8), qs, d, _f16_bytes(scale["dmin"][:, ::ps])]
    elif t == "Q3_K":
        hmask = _bits_fields((L >> 2).view(rows, ns, 8, 32), list(range(8)))
        qs = _bits_fields((L & 3).view(rows, ns, 2, 4, 32), [0, 2, 4, 6]).reshape(rows, ns, 64)
        u = sc + 32
        low = (u[..., :8] & 0xF) | ((u[..., 8:] & 0xF) << 4)
        high = _bits_fields((u >> 4).view(rows, ns, 4, 4), [0, 2, 4, 6])
        parts = [hmask, qs, low.to(torch.uint8), high, d]
    elif t in ("Q4_K", "Q5_K"):
        mn = scale["mn"].reshape(rows, ns, ps).to(torch.int32)
        packed = torch.cat([sc[..., :4] | (sc[..., 4:] >> 4) << 6, mn[..., :4] | (mn[..., 4:] >> 4) << 6,
                            (sc[..., 4:] & 0xF) | (mn[..., 4:] & 0xF) << 4], dim=-1).to(torch.uint8)
        Lv = L.view(rows, ns, 4, 2, 32)
        qs = ((Lv[:, :, :, 0] & 0xF) | (Lv[:, :, :, 1] & 0xF) << 4).to(torch.uint8).reshape(rows, ns, 128)
        parts = [d, _f16_bytes(scale["dmin"][:, ::ps]), packed]
        if t == "Q5_K":
            parts.append(_bits_fields((L >> 4).view(rows, ns, 8, 32), list(range(8))))
        parts.append(qs)
    else:  # Q6_K
        Lv = L.view(rows, ns, 2, 4, 32)
        ql = torch.cat([(Lv[:, :, :, 0] & 0xF) | (Lv[:, :, :, 2] & 0xF) << 4,
                        (Lv[:, :, :, 1] & 0xF) | (Lv[:, :, :, 3] & 0xF) << 4], dim=-1).to(torch.uint8)
        qh = _bits_fields(Lv >> 4, [0, 2, 4, 6])
        parts = [ql.reshape(rows, ns, 128), qh.reshape(rows, ns, 64), sc.to(torch.int8).view(torch.uint8), d]
    return torch.cat(parts, dim=-1).reshape(rows, -1)


def _kquant_from_blocks(b: torch.Tensor, codec: GGMLKQuantCodec, shape: tuple[int, int]) -> QuantizedTensor:
    rows, cols = shape
    ns, ps = cols // QK_K, codec.per_super
    t = codec.ggml_type

    def f16(at: int) -> torch.Tensor:
        return b[..., at:at + 2].contiguous().view(torch.float16).reshape(rows, ns)

    scale: dict[str, torch.Tensor] = {}
    if t == "Q2_K":
        s = b[..., :16].to(torch.int32)
        sc, mn = s & 0xF, s >> 4
        L = _fields(b[..., 16:80].reshape(rows, ns, 2, 32), [0, 2, 4, 6], 3)  # (R, ns, 2, 4, 32)
        scale.update(d=f16(80), dmin=f16(82), mn=mn)
    elif t == "Q3_K":
        high = _fields(b[..., :32], list(range(8)), 1)  # (R, ns, 8, 32)
        low = _fields(b[..., 32:96].reshape(rows, ns, 2, 32), [0, 2, 4, 6], 3)
        L = low.reshape(rows, ns, 256) | (high.reshape(rows, ns, 256) << 2)
        s = b[..., 96:108].to(torch.int32)
        low4 = torch.cat([s[..., :8] & 0xF, s[..., :8] >> 4], dim=-1)
        top = _fields(s[..., 8:12], [0, 2, 4, 6], 3).reshape(rows, ns, 16).to(torch.int32)
        sc = (low4 | top << 4) - 32
        scale.update(d=f16(108))
    elif t in ("Q4_K", "Q5_K"):
        s = b[..., 4:16].to(torch.int32)
        sc = torch.cat([s[..., 0:4] & 63, (s[..., 8:12] & 0xF) | (s[..., 0:4] >> 6) << 4], dim=-1)
        mn = torch.cat([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | (s[..., 4:8] >> 6) << 4], dim=-1)
        qs = b[..., -128:].reshape(rows, ns, 4, 32)
        L = torch.stack([qs & 0xF, qs >> 4], dim=3).reshape(rows, ns, 256)
        if t == "Q5_K":
            L = L | (_fields(b[..., 16:48], list(range(8)), 1).reshape(rows, ns, 256) << 4)
        scale.update(d=f16(0), dmin=f16(2), mn=mn)
    else:  # Q6_K
        ql = b[..., :128].reshape(rows, ns, 2, 2, 32)
        high = _fields(b[..., 128:192].reshape(rows, ns, 2, 32), [0, 2, 4, 6], 3)  # (R, ns, 2, 4, 32)
        low = torch.stack([ql[:, :, :, 0] & 0xF, ql[:, :, :, 1] & 0xF, ql[:, :, :, 0] >> 4, ql[:, :, :, 1] >> 4], dim=3)
        L = low | (high << 4)
        sc = b[..., 192:208].contiguous().view(torch.int8).to(torch.int32)
        scale.update(d=f16(208))
    scale["sc"] = sc.reshape(rows, ns * ps)
    if "mn" in scale:
        scale["mn"] = scale["mn"].reshape(rows, ns * ps).to(torch.uint8)
    scale["d"] = scale["d"].repeat_interleave(ps, dim=1)
    if "dmin" in scale:
        scale["dmin"] = scale["dmin"].repeat_interleave(ps, dim=1)
    dtypes = codec.scale_dtypes()
    return codec.pack(L.reshape(rows, cols).to(torch.uint8), {k: v.to(dtypes[k]) for k, v in scale.items()}, shape)


def reencode_counts(path: str, ggml_type: str = "Q4_1") -> list[tuple[str, int, int]]:
    """For each ``ggml_type`` tensor of the GGUF file at ``path``: (name, blocks, blocks that
    come out byte for byte identical when lowbit decodes the tensor and quantizes the decoded
    values again with its codec of that type)."""
    from gguf import GGMLQuantizationType, GGUFReader

    from lowbit.codecs import codec_from_dict

    codec = codec_from_dict({"name": ggml_type.lower()})
    assert isinstance(codec, GGMLBlockCodec)
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
