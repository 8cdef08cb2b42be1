"""NVFP4 codec: E2M1 elements, an FP8 E4M3 scale per block of 16, one FP32 tensor scale.

Conventions of NVIDIA ModelOpt / compressed-tensors / vLLM (compressed-tensors names in
brackets), all arithmetic in float32:

* tensor scale [``weight_global_scale``]: ``g = 448 * 6 / amax(tensor)`` (amax kept at or above
  the smallest normal float32; a non-finite result, i.e. an all-zero tensor, becomes 1.0).
  ModelOpt stores its reciprocal as ``weight_scale_2``.
* block scale [``weight_scale``], per 16 consecutive values along the input dimension:
  ``b = fp8_e4m3(clamp(g * ((block_amax * shrink) / 6), -448, 448))``; a block scale that is
  zero in fp8 is replaced by 0.125, as compressed-tensors does to avoid dividing by zero.
* element: ``q = e2m1(x / (b / g))`` (nearest, ties to even, saturating at +-6), decoding as
  ``E2M1_VALUES[q] * (b / g)``.

``shrink`` scales each block's range before the FP8 rounding (the tensor scale does not
depend on it), so the shrink/importance search of :meth:`Codec.fit_group_scales` applies.

Stored: codes packed two per byte, first value in the low nibble (compressed-tensors'
``pack_fp4_to_uint8``), ``block_scale`` float8_e4m3fn ``(R, G)`` and ``global_scale`` float32
``(1,)``: ``4 + 8/16 = 4.5`` bits per weight plus 4 bytes per tensor. In :meth:`fit` /
:meth:`encode` / :meth:`decode` the tensor scale travels as a ``(R, G)`` tensor of one repeated
value, so every slice of the scale data is self-contained; it is a whole-tensor quantity,
so fit the whole weight (as :meth:`Codec.quantize` does) before encoding slices of it;
:meth:`pack` raises ValueError when the tensor scale is not one value.

A row whose length is not a multiple of 16 ends with a short block scaled by its own values
(the grouped view's padding never changes a block max and is not stored); vLLM's kernels need
``in_features % 16 == 0``, which every transformer linear satisfies.
"""

from __future__ import annotations

from typing import Literal

import torch

from lowbit.codecs.base import Codec, ScaleData
from lowbit.codecs.grouping import Grouping
from lowbit.codecs.minifloat import E2M1_MAX, FP8_MAX, e2m1_decode, e2m1_encode
from lowbit.codecs.packing import pack_codes, packed_nbytes, unpack_codes
from lowbit.codecs.quantized_tensor import QuantizedTensor

NVFP4_BLOCK = 16
_ZERO_SCALE_REPLACEMENT = 0.125
_FP32_TINY = torch.finfo(torch.float32).tiny


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """Float32 tensor scale ``448 * 6 / amax`` (1.0 where that is not finite); shape of ``amax``."""
    g = (FP8_MAX["e4m3"] * E2M1_MAX) / amax.to(torch.float32).clamp(min=_FP32_TINY)
    return torch.nan_to_num(g, nan=1.0, posinf=1.0, neginf=1.0)


class NVFP4Codec(Codec):
    """NVFP4 (see module docstring for the exact mapping and layout)."""

    name: Literal["nvfp4"] = "nvfp4"

    @property
    def grouping(self) -> Grouping:
        return Grouping("group", NVFP4_BLOCK)

    @property
    def code_bits(self) -> int:
        return 4

    @property
    def whole_tensor_fit(self) -> bool:
        return True

    def scale_dtypes(self) -> dict[str, torch.dtype]:
        return {"block_scale": torch.float8_e4m3fn, "global_scale": torch.float32}

    def fit(self, groups: torch.Tensor, shrink: float | torch.Tensor = 1.0) -> ScaleData:
        groups = groups.to(torch.float32)
        block_amax = groups.abs().amax(dim=-1)
        g = nvfp4_global_scale(block_amax.amax()).expand_as(block_amax)
        fmax = FP8_MAX["e4m3"]
        b = (g * ((block_amax * shrink) / E2M1_MAX)).clamp(-fmax, fmax).to(torch.float8_e4m3fn)
        b = torch.where(b.to(torch.float32) == 0, _ZERO_SCALE_REPLACEMENT, b.to(torch.float32))
        return {"block_scale": b.to(torch.float8_e4m3fn), "global_scale": g.contiguous()}

    def _step(self, scale: ScaleData) -> torch.Tensor:
        b = scale["block_scale"].to(torch.float32)
        return (b / scale["global_scale"].to(torch.float32)).unsqueeze(-1)

    def encode(self, values: torch.Tensor, scale: ScaleData) -> torch.Tensor:
        return e2m1_encode((values.to(torch.float32) / self._step(scale)).clamp(-E2M1_MAX, E2M1_MAX))

    def decode(self, codes: torch.Tensor, scale: ScaleData) -> torch.Tensor:
        return e2m1_decode(codes) * self._step(scale)

    # -- storage: one float32 tensor scale ------------------------------------------------
    def pack(self, codes: torch.Tensor, scale: ScaleData, shape: tuple[int, int]) -> QuantizedTensor:
        g = scale["global_scale"].to(torch.float32)
        if g.numel() == 0 or not bool((g == g.reshape(-1)[0]).all()):
            raise ValueError(
                "NVFP4 global_scale differs between groups: fit the whole weight at once "
                "(Codec.fit_group_scales on the full grouped view) before encoding slices"
            )
        data = {
            "codes": pack_codes(codes, 4),
            "block_scale": scale["block_scale"].to(torch.float8_e4m3fn).contiguous(),
            "global_scale": g.reshape(-1)[:1].clone(),
        }
        return QuantizedTensor(codec=self.model_dump(), shape=shape, data=data)

    def unpack(self, qt: QuantizedTensor) -> tuple[torch.Tensor, ScaleData]:
        rows, cols = qt.shape
        codes = unpack_codes(qt.data["codes"], 4, rows * cols).view(rows, cols)
        b = qt.data["block_scale"]
        g = qt.data["global_scale"].to(torch.float32).reshape(())
        scale = {"block_scale": b, "global_scale": g.expand(b.shape)}
        return self.grouping.split(codes), scale

    def stored_parts(self, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        R, G, _ = self.grouping.grid(shape)
        return {"codes": ((packed_nbytes(shape[0] * shape[1], 4),), torch.uint8),
                "block_scale": ((R, G), torch.float8_e4m3fn), "global_scale": ((1,), torch.float32)}

    def describe(self) -> str:
        return "nvfp4 (e2m1, b16 e4m3, fp32 tensor scale)"
