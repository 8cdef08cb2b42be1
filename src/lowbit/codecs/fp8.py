"""FP8 codec: E4M3 (``fn``) or E5M2 elements with a float32 scale per tensor / channel / group.

A value ``x`` of a group with scale ``s`` is stored as the fp8 code of ``x / s``, cast to
``torch.float8_e4m3fn`` / ``torch.float8_e5m2`` after clamping to ``[-max, max]`` (saturating,
see :mod:`lowbit.codecs.minifloat`), and decodes as ``fp8_value * s``. This is the weight
convention of compressed-tensors and vLLM (``weight`` in fp8, ``weight_scale`` in float32):

* ``s = (absmax * shrink) / max`` in float32 (``max`` = 448 for E4M3, 57344 for E5M2), so the
  largest value of a group maps onto the largest fp8 value; ``shrink < 1`` clips the largest
  values to gain resolution for the rest (the scale search of :meth:`Codec.fit_group_scales`).
* A scale is kept at or above the smallest normal float32 (2**-126): an all-zero group then
  gets a finite scale and encodes to zeros (compressed-tensors replaces a zero scale by
  float32 eps instead; the decoded values are the same zeros).

Codes are bytes, one per weight; scales float32 ``(R, G)``. E4M3 per channel therefore costs
``8 + 32/in_features`` bits per weight (8.0208 for 1536 inputs).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from lowbit.codecs.base import GroupedCodec, ScaleData
from lowbit.codecs.grouping import Granularity
from lowbit.codecs.minifloat import FP8_MAX, Fp8Format, fp8_decode, fp8_encode

_MIN_SCALE = 2.0**-126


class FP8Codec(GroupedCodec):
    """FP8 weights with float32 scales (see module docstring for the exact mapping)."""

    name: Literal["fp8"] = "fp8"
    fmt: Fp8Format = Field("e4m3", description="element format: e4m3 (fn, max 448) or e5m2 (max 57344)")
    granularity: Granularity = Field("channel", description="tensor, channel (per output row) or group")
    group_size: int | None = Field(None, gt=0, description="values per group along the input dimension")

    @property
    def code_bits(self) -> int:
        return 8

    def scale_dtypes(self) -> dict[str, torch.dtype]:
        return {"scale": torch.float32}

    def fit(self, groups: torch.Tensor, shrink: float | torch.Tensor = 1.0) -> ScaleData:
        absmax = groups.to(torch.float32).abs().amax(dim=-1) * shrink
        # A one-element tensor, not a Python number: CUDA divides by a scalar through its
        # reciprocal, one ulp off the exact quotient (which the CPU gives) for about half the rows.
        fmax = absmax.new_full((1,), FP8_MAX[self.fmt])
        return {"scale": (absmax / fmax).clamp(min=_MIN_SCALE)}

    def encode(self, values: torch.Tensor, scale: ScaleData) -> torch.Tensor:
        s = scale["scale"].to(torch.float32).unsqueeze(-1)
        return fp8_encode(values.to(torch.float32) / s, self.fmt)

    def decode(self, codes: torch.Tensor, scale: ScaleData) -> torch.Tensor:
        return fp8_decode(codes, self.fmt) * scale["scale"].to(torch.float32).unsqueeze(-1)

    def describe(self) -> str:
        kind = self.granularity_label()
        return f"fp8 {self.fmt} {kind}"
