"""Integer codec: INT2..INT8, symmetric or asymmetric, per tensor / channel / group.

Codes are unsigned ``q`` in ``[0, 2**bits - 1]`` and decode as ``x = scale * (q - zero)``.

* asymmetric, ``zero_point="integer"`` (GPTQ, AWQ, compressed-tensors): the range
  ``[min(x, 0), max(x, 0)]`` (times ``shrink``) maps onto the codes;
  ``scale = (hi - lo) / (2**bits - 1)``, ``zero = round(-lo / scale)``. ``scale`` and the
  integer ``zero`` are both stored as fp16 (every integer up to 2048 is exact in fp16), so
  4-bit with 128-wide groups costs ``4 + 32/128 = 4.25`` bits per weight.
* asymmetric, ``zero_point="float"`` (llama.cpp Q4_1/Q5_1, HQQ): ``x = scale * q + offset``
  with ``offset = lo`` and ``lo, hi`` the group's own min and max (zero need not be in range),
  both stored as fp16 (``zero`` holds ``offset``). Same size; it reproduces a Q4_1 grid exactly
  at 32-wide groups.
* symmetric: ``zero = 2**(bits-1)`` is implied, not stored, and
  ``scale = absmax / ((2**bits - 1) / 2)``, the convention of GPTQ and compressed-tensors:
  codes reach ``-2**(bits-1)`` steps below zero and ``2**(bits-1) - 1`` above, so the largest
  positive value clips by half a step. 4-bit g128 symmetric costs 4.125 bits per weight.
  With ``restricted`` (activations) ``scale = absmax / (2**(bits-1) - 1)``: a fitted input's
  codes stay within int8 ``[-127, 127]``, nothing clips, as vLLM's, bitsandbytes' and torchao's
  dynamic int8 quantization of activations. Values beyond a fixed (static) scale's range saturate
  at the codes' own ends, ``[-128, 127]``, as vLLM's static int8 input kernel and compressed-tensors do.

``scale_dtype`` (default fp16) is the storage dtype of ``scale`` and ``zero``: bf16 or fp32
checkpoints of other tools (llm-compressor keeps a float32 model's scales in float32) are read
exactly with theirs.

Rounding is round-half-to-even in float32 (``torch.round``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from lowbit.codecs.base import GroupedCodec, ScaleData
from lowbit.codecs.grouping import Granularity
from lowbit.codecs.minifloat import fp16_scale, fp16_value



class IntCodec(GroupedCodec):
    """Uniform integer quantization (see module docstring for the exact mapping)."""

    name: Literal["int"] = "int"
    bits: int = Field(4, ge=2, le=8, description="bits per code, 2..8")
    symmetric: bool = Field(True, description="zero point fixed at 2**(bits-1) (not stored)")
    granularity: Granularity = Field("group", description="tensor, channel (per output row) or group")
    group_size: int | None = Field(128, gt=0, description="values per group along the input dimension")
    zero_point: Literal["integer", "float"] = Field(
        "integer", description="asymmetric only: integer zero point (GPTQ) or float offset (Q4_1)"
    )
    scale_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="storage dtype of the scales and zero points")
    late_fields = frozenset({"restricted"})
    restricted: bool = Field(
        False, description="symmetric only: scale absmax / (2**(bits-1) - 1), so a fitted tensor's codes stay "
        "within +-(2**(bits-1) - 1) steps of zero and nothing clips: the activation convention of vLLM, bitsandbytes "
        "and torchao")

    @model_validator(mode="after")
    def _restricted_is_symmetric(self) -> "IntCodec":
        if self.restricted and not self.symmetric:
            raise ValueError("restricted: only a symmetric codec has a restricted range")
        return self

    @property
    def code_bits(self) -> int:
        return self.bits

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def _storage(self) -> torch.dtype:
        return getattr(torch, self.scale_dtype)

    def scale_dtypes(self) -> dict[str, torch.dtype]:
        dtype = self._storage
        if self.symmetric:
            return {"scale": dtype}
        return {"scale": dtype, "zero": dtype}

    def _scale(self, scale: torch.Tensor) -> torch.Tensor:
        """A float32 scale rounded to its storage value, kept away from 0 and Inf."""
        if self.scale_dtype == "float16":
            return fp16_scale(scale)
        info = torch.finfo(self._storage)
        return scale.clamp(info.tiny, info.max).to(self._storage)

    def _value(self, v: torch.Tensor) -> torch.Tensor:
        if self.scale_dtype == "float16":
            return fp16_value(v)
        info = torch.finfo(self._storage)
        return v.clamp(-info.max, info.max).to(self._storage)

    def fit(self, groups: torch.Tensor, shrink: float | torch.Tensor = 1.0) -> ScaleData:
        groups = groups.to(torch.float32)
        if self.symmetric:
            absmax = groups.abs().amax(dim=-1) * shrink
            scale = absmax / ((1 << (self.bits - 1)) - 1 if self.restricted else self.qmax / 2)
            return {"scale": self._scale(scale)}
        lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
        if self.zero_point == "float":
            mid = (lo + hi) / 2
            # shrink toward the middle; written so that shrink == 1 keeps lo and hi exactly
            lo, hi = lo + (mid - lo) * (1 - shrink), hi - (hi - mid) * (1 - shrink)
            scale = self._scale((hi - lo) / self.qmax)
            return {"scale": scale, "zero": self._value(lo)}
        lo, hi = lo.clamp(max=0) * shrink, hi.clamp(min=0) * shrink
        scale = self._scale((hi - lo) / self.qmax)
        zero = torch.round(-lo / scale.to(torch.float32)).clamp(0, self.qmax)
        return {"scale": scale, "zero": zero.to(self._storage)}

    @property
    def _float_zero(self) -> bool:
        return not self.symmetric and self.zero_point == "float"

    def _zero(self, scale: ScaleData) -> torch.Tensor | float:
        return float(1 << (self.bits - 1)) if self.symmetric else scale["zero"].to(torch.float32).unsqueeze(-1)

    def encode(self, values: torch.Tensor, scale: ScaleData) -> torch.Tensor:
        s = scale["scale"].to(torch.float32).unsqueeze(-1)
        if self._float_zero:
            q = torch.round((values.to(torch.float32) - scale["zero"].to(torch.float32).unsqueeze(-1)) / s)
            return q.clamp(0, self.qmax).to(torch.uint8)
        q = torch.round(values.to(torch.float32) / s) + self._zero(scale)
        return q.clamp(0, self.qmax).to(torch.uint8)

    def decode(self, codes: torch.Tensor, scale: ScaleData) -> torch.Tensor:
        s = scale["scale"].to(torch.float32).unsqueeze(-1)
        if self._float_zero:
            return codes.to(torch.float32) * s + scale["zero"].to(torch.float32).unsqueeze(-1)
        return (codes.to(torch.float32) - self._zero(scale)) * s

    def describe(self) -> str:
        kind = self.granularity_label()
        mode = ("sym127" if self.restricted else "sym") if self.symmetric else ("asym-f" if self._float_zero else "asym")
        scales = {"float16": "", "bfloat16": " bf16 scales", "float32": " fp32 scales"}[self.scale_dtype]
        return f"int{self.bits} {kind} {mode}{scales}"
