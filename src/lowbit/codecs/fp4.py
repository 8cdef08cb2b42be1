"""FP4 codec: OCP E2M1 elements with an fp16 scale per tensor / channel / group.

A value ``x`` of a group with scale ``s`` is stored as the E2M1 code of ``x / s`` (nearest,
ties to even, saturating at +-6; see :mod:`lowbit.codecs.minifloat` for the 16 values) and
decodes as ``E2M1_VALUES[code] * s``.

* ``s = (absmax * shrink) / 6``, rounded to fp16 (kept within ``[2**-24, 65504]`` so an
  all-zero group stays finite), so the largest value of a group maps onto +-6.
* Codes are packed two per byte, first value in the low nibble (``c0 | c1 << 4``, as
  compressed-tensors' ``pack_fp4_to_uint8`` and :func:`lowbit.codecs.packing.pack_codes`).

This is the free-scale sibling of MXFP4 (power-of-two E8M0 scale, blocks of 32) and NVFP4
(E4M3 scale, blocks of 16): 32-wide groups cost ``4 + 16/32 = 4.5`` bits per weight.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from lowbit.codecs.base import GroupedCodec, ScaleData
from lowbit.codecs.grouping import Granularity
from lowbit.codecs.minifloat import E2M1_MAX, e2m1_decode, e2m1_encode, fp16_scale


class FP4Codec(GroupedCodec):
    """E2M1 weights with fp16 scales (see module docstring for the exact mapping)."""

    name: Literal["fp4"] = "fp4"
    granularity: Granularity = Field("group", description="tensor, channel (per output row) or group")
    group_size: int | None = Field(32, gt=0, description="values per group along the input dimension")

    @property
    def code_bits(self) -> int:
        return 4

    def scale_dtypes(self) -> dict[str, torch.dtype]:
        return {"scale": torch.float16}

    def fit(self, groups: torch.Tensor, shrink: float | torch.Tensor = 1.0) -> ScaleData:
        absmax = groups.to(torch.float32).abs().amax(dim=-1) * shrink
        return {"scale": fp16_scale(absmax / E2M1_MAX)}

    def encode(self, values: torch.Tensor, scale: ScaleData) -> torch.Tensor:
        s = scale["scale"].to(torch.float32).unsqueeze(-1)
        return e2m1_encode(values.to(torch.float32) / s)

    def decode(self, codes: torch.Tensor, scale: ScaleData) -> torch.Tensor:
        return e2m1_decode(codes) * scale["scale"].to(torch.float32).unsqueeze(-1)

    def describe(self) -> str:
        kind = self.granularity_label()
        return f"fp4 e2m1 {kind}"
