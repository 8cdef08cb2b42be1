"""NF4 codec: the QLoRA NormalFloat 4-bit code book, absmax per block, optional double quantization.

Code book (QLoRA, Dettmers et al. 2023, section 3 and appendix E): the 16 values are
quantiles of N(0, 1) normalised to [-1, 1], with an exact zero and one more positive than
negative value. :func:`derive_nf4_table` computes them as bitsandbytes' ``create_normal_map``
does: 8 positive quantiles ``ndtri(linspace(delta, 1/2, 9)[:-1])`` and 7 negative ones
``-ndtri(linspace(delta, 1/2, 8)[:-1])`` (quantile points in float32, the inverse normal CDF in
float64), plus 0, in float32, divided by the largest. ``delta = 0.9677083`` is the paper's
``1 - (1/2)(1/30 + 1/32)`` as bitsandbytes writes it (to 7 digits); the result equals the
published table bit for bit. Code ``c`` (0..15) decodes to ``NF4_TABLE[c]`` (ascending order,
code 7 is 0.0), the order bitsandbytes stores.

Layout, as bitsandbytes stores it (``quant_type="nf4"``):

* blocks of ``block_size`` (default 64) consecutive values along the input dimension, each
  with its ``absmax`` (float32). A value ``x`` is encoded as bitsandbytes does:
  ``n = clamp(x * (1 / max(absmax, 1e-38)), -1, 1)``, then the index of the nearest code-book
  value, the boundaries being the float32 midpoints of neighbouring values and a value on a
  boundary taking the lower code. It decodes as ``NF4_TABLE[c] * absmax`` (float32).
  ``shrink`` scales ``absmax`` (values beyond it clip to +-1).
* codes packed two per byte in bitsandbytes' order: the *first* value in the *high* nibble,
  ``byte = c0 << 4 | c1``, over the row-major stream of all codes (a last odd code is padded
  with a zero low nibble). Rows are whole blocks when ``in_features % block_size == 0`` (every
  transformer linear); then the layout equals bitsandbytes' flat one. Otherwise each row ends
  with a short block, scaled by its own absmax (the grouped view's padding never changes an
  absmax and is not stored): valid here, but not a layout bitsandbytes can load.

Double quantization (QLoRA section 3, ``compress_statistics=True`` in bitsandbytes): the
block absmaxes of the whole tensor, in row-major order, are stored as

* ``absmax_offset``: their float32 mean (one per tensor);
* ``absmax_scale``: per run of 256 consecutive blocks, ``max |absmax - offset|`` (float32);
* ``absmax_q``: per block, the uint8 index of ``(absmax - offset) / absmax_scale`` (float32
  division) in bitsandbytes' signed 8-bit dynamic map (:func:`dynamic_map`, the same values
  as ``create_dynamic_map()``), the nearest value, exactly, ties to the lower index.

and the absmax used to encode and decode a block is
``dynamic_map[absmax_q] * absmax_scale + absmax_offset`` (float32), the value bitsandbytes'
``dequantize_4bit`` reconstructs. Two deliberate differences from bitsandbytes' quantizer:
lowbit encodes the 4-bit codes with that reconstructed absmax (what a reader decodes), where
bitsandbytes encodes with the raw absmax, so a few codes per tensor can differ; and the 8-bit
index is the exact nearest, where bitsandbytes' current CPU kernel looks it up in a
65536-entry table (it can pick a neighbouring, farther index). bitsandbytes decodes lowbit's
stored values bit for bit. The two code books are constants and are not stored per tensor.
Cost at block 64: ``4 + 8/64 + 32/(64*256)`` bits per weight plus 4 bytes per tensor
(about 4.127); without double quantization ``4 + 32/64 = 4.5``.

Double quantization is a whole-tensor step (the mean and the 256-block scales span rows), so
the scale data of :meth:`fit` with ``double_quant`` carries ``absmax_scale`` and
``absmax_offset`` repeated to ``(R, G)``; fit the whole weight at once (as
:meth:`Codec.quantize` does); :meth:`pack` raises ValueError when they are not one consistent
state. The shrink/importance search runs on the raw absmax, and the chosen absmaxes are then
double-quantized together.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator

from lowbit.codecs.base import Codec, GroupHessian, ScaleData
from lowbit.codecs.grouping import Grouping
from lowbit.codecs.quantized_tensor import QuantizedTensor

NF4_DELTA = 0.9677083
DQ_BLOCK = 256
BNB_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_MIN_ABSMAX = 1e-38


def derive_nf4_table(delta: float = NF4_DELTA) -> torch.Tensor:
    """The 16 NF4 values (float32, ascending) from normal quantiles (see module docstring)."""
    pos = torch.special.ndtri(torch.linspace(delta, 0.5, 9, dtype=torch.float32)[:-1].to(torch.float64))
    neg = -torch.special.ndtri(torch.linspace(delta, 0.5, 8, dtype=torch.float32)[:-1].to(torch.float64))
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).to(torch.float32).sort().values
    return v / v.max()


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic quantization map (256 float32 values, ascending).

    Dettmers' dynamic tree type: for exponent ``i`` in 0..6, ``2**i`` fraction values, the
    midpoints of ``linspace(0.1, 1, 2**i + 1)`` times ``10**(i - 6)``, both signs; plus 0 and 1.
    """
    data: list[float] = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


NF4_TABLE = derive_nf4_table()
# Float32 midpoints, as bitsandbytes' quantizer computes them.
_NF4_BOUNDS = (NF4_TABLE[:-1] + NF4_TABLE[1:]) / 2
DYNAMIC_MAP = dynamic_map()
# Midpoints of float32 neighbours are exact in float64: an exact nearest search.
_DYN_BOUNDS64 = (DYNAMIC_MAP[:-1].to(torch.float64) + DYNAMIC_MAP[1:].to(torch.float64)) / 2


def pack_nibbles_high_first(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (any shape, row-major) -> 1-D uint8, ``byte = c0 << 4 | c1`` (bitsandbytes)."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return (pairs[:, 0] << 4 | pairs[:, 1]).contiguous()


def unpack_nibbles_high_first(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles_high_first`: ``numel`` codes as 1-D uint8."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError("packed NF4 codes must be a 1-D uint8 tensor")
    if packed.numel() != (numel + 1) // 2:
        raise ValueError(f"{packed.numel()} packed bytes cannot hold {numel} NF4 codes ({(numel + 1) // 2} needed)")
    out = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)
    return out[:numel].clone()


class NF4Codec(Codec):
    """NormalFloat-4 with bitsandbytes' layout (see module docstring)."""

    name: Literal["nf4"] = "nf4"
    block_size: int = Field(64, description="values per absmax block along the input dimension (bitsandbytes' sizes)")
    double_quant: bool = Field(False, description="8-bit double quantization of the block absmaxes (QLoRA)")

    @field_validator("block_size")
    @classmethod
    def _bnb_block_size(cls, v: int) -> int:
        if v not in BNB_BLOCK_SIZES:
            raise ValueError(f"block_size must be one of bitsandbytes' {BNB_BLOCK_SIZES}, got {v}")
        return v

    @property
    def grouping(self) -> Grouping:
        return Grouping("group", self.block_size)

    @property
    def code_bits(self) -> int:
        return 4

    @property
    def whole_tensor_fit(self) -> bool:
        return self.double_quant

    def scale_dtypes(self) -> dict[str, torch.dtype]:
        if self.double_quant:
            return {"absmax_q": torch.uint8, "absmax_scale": torch.float32, "absmax_offset": torch.float32}
        return {"absmax": torch.float32}

    # -- scale data ---------------------------------------------------------------------
    def fit(self, groups: torch.Tensor, shrink: float | torch.Tensor = 1.0) -> ScaleData:
        absmax = groups.to(torch.float32).abs().amax(dim=-1) * shrink
        if self.double_quant:
            return double_quantize(absmax)
        return {"absmax": absmax}

    def fit_group_scales(
        self,
        groups: torch.Tensor,
        weights: "torch.Tensor | GroupHessian",
        shrink_grid: torch.Tensor | None = None,
    ) -> ScaleData:
        if not self.double_quant:
            return super().fit_group_scales(groups, weights, shrink_grid)
        # Per-group selection would mix double-quantization states: search on the raw absmax,
        # then double-quantize the chosen absmaxes together.
        raw = NF4Codec(block_size=self.block_size).fit_group_scales(groups, weights, shrink_grid)
        return double_quantize(raw["absmax"])

    def absmax(self, scale: ScaleData) -> torch.Tensor:
        """Float32 absmax ``(R, G)`` that encodes and decodes each block."""
        if not self.double_quant:
            return scale["absmax"].to(torch.float32)
        q = DYNAMIC_MAP.to(scale["absmax_q"].device)[scale["absmax_q"].to(torch.long)]
        return q * scale["absmax_scale"].to(torch.float32) + scale["absmax_offset"].to(torch.float32)

    # -- codes --------------------------------------------------------------------------
    def encode(self, values: torch.Tensor, scale: ScaleData) -> torch.Tensor:
        a = self.absmax(scale)
        # bitsandbytes clamps absmax at 1e-38; a reconstructed absmax may be <= 0, kept by sign.
        inv = 1.0 / torch.where(a.abs() < _MIN_ABSMAX, _MIN_ABSMAX, a)
        n = torch.clamp(values.to(torch.float32) * inv.unsqueeze(-1), -1, 1)
        return torch.bucketize(n, _NF4_BOUNDS.to(n.device), right=False).to(torch.uint8)

    def decode(self, codes: torch.Tensor, scale: ScaleData) -> torch.Tensor:
        return NF4_TABLE.to(codes.device)[codes.to(torch.long)] * self.absmax(scale).unsqueeze(-1)

    # -- storage ------------------------------------------------------------------------
    def pack(self, codes: torch.Tensor, scale: ScaleData, shape: tuple[int, int]) -> QuantizedTensor:
        data = {"codes": pack_nibbles_high_first(codes)}
        if not self.double_quant:
            data["absmax"] = scale["absmax"].to(torch.float32).contiguous()
        else:
            data.update(_compress_dq_state(scale))
        return QuantizedTensor(codec=self.model_dump(), shape=shape, data=data)

    def unpack(self, qt: QuantizedTensor) -> tuple[torch.Tensor, ScaleData]:
        rows, cols = qt.shape
        codes = unpack_nibbles_high_first(qt.data["codes"], rows * cols).view(rows, cols)
        if not self.double_quant:
            return self.grouping.split(codes), {"absmax": qt.data["absmax"]}
        q = qt.data["absmax_q"]
        flat_idx = torch.arange(q.numel(), device=q.device) // DQ_BLOCK
        scale = {
            "absmax_q": q,
            "absmax_scale": qt.data["absmax_scale"].to(torch.float32)[flat_idx].view(q.shape),
            "absmax_offset": qt.data["absmax_offset"].to(torch.float32).reshape(()).expand(q.shape),
        }
        return self.grouping.split(codes), scale

    def stored_parts(self, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        R, G, _ = self.grouping.grid(shape)
        parts = {"codes": (((shape[0] * shape[1] + 1) // 2,), torch.uint8)}
        if not self.double_quant:
            return {**parts, "absmax": ((R, G), torch.float32)}
        return {**parts, "absmax_q": ((R, G), torch.uint8), "absmax_scale": ((-(-(R * G) // DQ_BLOCK),), torch.float32),
                "absmax_offset": ((1,), torch.float32)}

    def describe(self) -> str:
        return f"nf4 b{self.block_size}{' dq' if self.double_quant else ''}"


def double_quantize(absmax: torch.Tensor) -> ScaleData:
    """QLoRA double quantization of float32 block absmaxes ``(R, G)`` (see module docstring).

    Returns ``absmax_q`` uint8 and ``absmax_scale`` / ``absmax_offset`` float32 repeated to
    ``(R, G)``.
    """
    shape = absmax.shape
    flat = absmax.to(torch.float32).contiguous().reshape(-1)
    offset = flat.mean()
    v = flat - offset
    n = v.numel()
    nb = -(-n // DQ_BLOCK)
    padded = torch.nn.functional.pad(v, (0, nb * DQ_BLOCK - n)).view(nb, DQ_BLOCK)
    scale2 = padded.abs().amax(dim=1)
    per_block = scale2.repeat_interleave(DQ_BLOCK)[:n]
    normed = torch.where(per_block > 0, v / torch.where(per_block > 0, per_block, 1.0), 0.0)
    q = torch.bucketize(normed.to(torch.float64), _DYN_BOUNDS64.to(normed.device), right=False).to(torch.uint8)
    return {
        "absmax_q": q.view(shape),
        "absmax_scale": per_block.view(shape),
        "absmax_offset": offset.expand(shape).contiguous(),
    }


def _compress_dq_state(scale: ScaleData) -> dict[str, torch.Tensor]:
    """The stored double-quantization tensors, or ValueError if ``scale`` is not one state."""
    q = scale["absmax_q"].to(torch.uint8).contiguous()
    s = scale["absmax_scale"].to(torch.float32).reshape(-1)
    off = scale["absmax_offset"].to(torch.float32).reshape(-1)
    n = s.numel()
    firsts = s[::DQ_BLOCK]
    if not bool((off == off[0]).all()) or not bool((s == firsts.repeat_interleave(DQ_BLOCK)[:n]).all()):
        raise ValueError(
            "NF4 double-quantization state differs between groups that share it: fit the whole "
            "weight at once (Codec.fit_group_scales on the full grouped view) before encoding slices"
        )
    return {"absmax_q": q, "absmax_scale": firsts.clone(), "absmax_offset": off[:1].clone()}
