"""MX codecs (OCP Microscaling Formats v1.0): MXFP4 (E2M1 elements) and MXFP8 (E4M3 / E5M2).

Each block of ``k = 32`` consecutive values along the input dimension shares one E8M0 scale
``X = 2**(c - 127)`` (stored as its uint8 code ``c``). The scale is chosen as the spec's
conversion algorithm (section 6.3) says::

    shared_exp = floor(log2(max_i |V_i|)) - emax_elem      (emax_elem: 2 for E2M1,
    X          = 2**shared_exp                              8 for E4M3, 15 for E5M2)
    P_i        = quantize_to_element_format(V_i / X)        (round to nearest even, saturating)

so the block's largest value lands in ``[2**emax_elem, 2**(emax_elem+1))`` and the part of that
range above the element format's max normal (6 for E2M1, 448 for E4M3) saturates to it.
``shared_exp`` is clamped to the E8M0 range ``[-127, 127]``; an all-zero block takes
``floor(log2(smallest normal float32)) - emax_elem``, clamped, as the OCP reference
implementation (microxcaling) does; its elements are zeros under any scale. Elements decode as
``element_value * X``.

The scale is fixed by the spec, so :meth:`fit` ignores ``shrink`` and the shrink/importance
search of :meth:`Codec.fit_group_scales` does not apply (it returns the spec's scale).
compressed-tensors' MX scale generation rounds the block max to the nearest power of two first;
lowbit follows the OCP spec (floor) instead.

A row whose length is not a multiple of 32 ends with a short block whose scale comes from its
own values (the grouped view's padding never changes a block max), and only real elements are
stored; the reference implementation (microxcaling) pads the same way. MXFP4 codes pack two
per byte, first value in the low nibble; MXFP8 codes are bytes (fp8 bit patterns). Cost:
MXFP4 4.25, MXFP8 8.25 bits per weight.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Literal

import torch
from pydantic import Field

from lowbit.codecs.base import Codec, GroupHessian, ScaleData
from lowbit.codecs.grouping import Grouping
from lowbit.codecs.minifloat import (
    E2M1_EMAX,
    E8M0_BIAS,
    FP8_EMAX,
    Fp8Format,
    e2m1_decode,
    e2m1_encode,
    e8m0_decode,
    floor_log2,
    fp8_decode,
    fp8_encode,
    pow2,
)

MX_BLOCK = 32
# floor(log2(smallest normal float32)): the exponent microxcaling gives an all-zero block.
_ZERO_BLOCK_EXP = -126


class _MXCodec(Codec):
    """Shared MX machinery: E8M0 scale per 32-block, elements defined by the subclass."""

    @property
    def grouping(self) -> Grouping:
        return Grouping("group", MX_BLOCK)

    @property
    @abstractmethod
    def emax_elem(self) -> int:
        """Exponent of the element format's largest power of two (2 for E2M1, 8 for E4M3)."""

    def scale_dtypes(self) -> dict[str, torch.dtype]:
        return {"scale": torch.uint8}

    def fit(self, groups: torch.Tensor, shrink: float | torch.Tensor = 1.0) -> ScaleData:
        """E8M0 scale codes ``(R, G)`` of the spec; ``shrink`` is ignored (the spec fixes the scale)."""
        amax = groups.to(torch.float32).abs().amax(dim=-1)
        e = torch.where(amax > 0, floor_log2(amax), torch.full_like(amax, _ZERO_BLOCK_EXP, dtype=torch.int32))
        shared = (e - self.emax_elem).clamp(-E8M0_BIAS, E8M0_BIAS)
        return {"scale": (shared + E8M0_BIAS).to(torch.uint8)}

    def fit_group_scales(
        self,
        groups: torch.Tensor,
        weights: "torch.Tensor | GroupHessian",
        shrink_grid: torch.Tensor | None = None,
    ) -> ScaleData:
        """The spec's scale: no search (see module docstring)."""
        return self.fit(groups)

    def _scaled(self, values: torch.Tensor, scale: ScaleData) -> torch.Tensor:
        # V / X as an exact multiplication by 2**(127 - c), a power of two in float32's range.
        c = scale["scale"].to(torch.long).unsqueeze(-1)
        if bool((c == 255).any()):
            raise ValueError("E8M0 scale code 255 is NaN; cannot encode with it")
        return values.to(torch.float32) * pow2(E8M0_BIAS - c)

    def _scale_value(self, scale: ScaleData) -> torch.Tensor:
        return e8m0_decode(scale["scale"]).unsqueeze(-1)


class MXFP4Codec(_MXCodec):
    """MXFP4: E2M1 elements, E8M0 scale per block of 32 (see module docstring)."""

    name: Literal["mxfp4"] = "mxfp4"

    @property
    def code_bits(self) -> int:
        return 4

    @property
    def emax_elem(self) -> int:
        return E2M1_EMAX

    def encode(self, values: torch.Tensor, scale: ScaleData) -> torch.Tensor:
        return e2m1_encode(self._scaled(values, scale))

    def decode(self, codes: torch.Tensor, scale: ScaleData) -> torch.Tensor:
        return e2m1_decode(codes) * self._scale_value(scale)

    def describe(self) -> str:
        return "mxfp4 (e2m1, b32 e8m0)"


class MXFP8Codec(_MXCodec):
    """MXFP8: E4M3 (or E5M2) elements, E8M0 scale per block of 32 (see module docstring)."""

    name: Literal["mxfp8"] = "mxfp8"
    element: Fp8Format = Field("e4m3", description="element format: e4m3 (max 448) or e5m2 (max 57344)")

    @property
    def code_bits(self) -> int:
        return 8

    @property
    def emax_elem(self) -> int:
        return FP8_EMAX[self.element]

    def encode(self, values: torch.Tensor, scale: ScaleData) -> torch.Tensor:
        return fp8_encode(self._scaled(values, scale), self.element)

    def decode(self, codes: torch.Tensor, scale: ScaleData) -> torch.Tensor:
        return fp8_decode(codes, self.element) * self._scale_value(scale)

    def describe(self) -> str:
        return f"mxfp8 ({self.element}, b32 e8m0)"
