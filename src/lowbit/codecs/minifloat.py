"""Minifloat element and scale formats shared by the FP8, FP4, MX and NVFP4 codecs.

Element formats (OCP 8-bit Floating Point Specification and OCP Microscaling Formats v1.0):

* **E4M3** (``fn``: no infinities, one NaN per sign, max normal 448 = 1.75 * 2**8) and
  **E5M2** (IEEE-like, max normal 57344 = 1.75 * 2**15). A value is encoded by torch's cast to
  ``torch.float8_e4m3fn`` / ``torch.float8_e5m2`` (round to nearest, ties to even) of the value
  first clamped to ``[-max, max]``: encoding *saturates*, so finite input never gives NaN or
  Inf. The code is the fp8 bit pattern, stored as a byte.
* **E2M1** (FP4): sign bit 3, exponent bits 2..1 (bias 1), mantissa bit 0. Code ``c`` decodes to
  ``E2M1_VALUES[c]``: ``0, 0.5, 1, 1.5, 2, 3, 4, 6`` for codes 0..7 and the same values negated
  for codes 8..15 (code 8 is -0). Encoding rounds to nearest, ties to the even code (mantissa
  bit 0), saturates at +-6, and keeps the sign of values that round to zero (code 8 for a small
  negative value), as the OCP spec, compressed-tensors and vLLM do.

Scale formats:

* **fp16** (integer and FP4 scales): :func:`fp16_scale` rounds a float32 scale to its stored
  value, clamped to ``[2**-24, 65504]`` so that an all-zero group keeps a finite, non-zero scale.
* **E8M0** (MX shared scale): an unsigned biased exponent, code ``c`` in 0..254 decodes to
  ``2**(c - 127)``; code 255 is NaN.
"""

from __future__ import annotations

from typing import Literal

import torch

Fp8Format = Literal["e4m3", "e5m2"]

FP8_DTYPES: dict[str, torch.dtype] = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_MAX: dict[str, float] = {"e4m3": 448.0, "e5m2": 57344.0}
# Exponent of the largest power of two not above max normal: emax_elem of the MX spec.
FP8_EMAX: dict[str, int] = {"e4m3": 8, "e5m2": 15}

FP16_MAX = 65504.0
FP16_MIN_SCALE = 2.0**-24  # smallest fp16 subnormal

E2M1_MAX = 6.0
E2M1_EMAX = 2
E2M1_VALUES = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=torch.float32,
)

E8M0_BIAS = 127
E8M0_NAN = 255

# 2**k for k in [-149, 127], every one exact in float32 (k < -126 are subnormal).
_POW2_MIN = -149
_POW2 = torch.tensor([2.0**k for k in range(_POW2_MIN, 128)], dtype=torch.float32)


def fp8_encode(values: torch.Tensor, fmt: Fp8Format) -> torch.Tensor:
    """uint8 codes (fp8 bit patterns) of float ``values`` (any shape), saturating at +-max."""
    fmax = FP8_MAX[fmt]
    return values.to(torch.float32).clamp(-fmax, fmax).to(FP8_DTYPES[fmt]).view(torch.uint8)


def fp8_decode(codes: torch.Tensor, fmt: Fp8Format) -> torch.Tensor:
    """Float32 values of uint8 fp8 bit patterns ``codes`` (any shape)."""
    return codes.to(torch.uint8).view(FP8_DTYPES[fmt]).to(torch.float32)


def e2m1_encode(values: torch.Tensor) -> torch.Tensor:
    """uint8 E2M1 codes (0..15) of float ``values`` (any shape): nearest, ties to even, +-6 max."""
    a = values.to(torch.float32).abs()
    # The thresholds are the midpoints of the grid; at a tie ">" keeps the lower (even-mantissa)
    # neighbour and ">=" takes the upper one, whichever has mantissa bit 0.
    m = (
        (a > 0.25).to(torch.uint8)
        + (a >= 0.75).to(torch.uint8)
        + (a > 1.25).to(torch.uint8)
        + (a >= 1.75).to(torch.uint8)
        + (a > 2.5).to(torch.uint8)
        + (a >= 3.5).to(torch.uint8)
        + (a > 5.0).to(torch.uint8)
    )
    return m | (torch.signbit(values).to(torch.uint8) << 3)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """Float32 values of E2M1 ``codes`` (uint8, any shape)."""
    return E2M1_VALUES.to(codes.device)[codes.to(torch.long)]


def pow2(exponent: torch.Tensor) -> torch.Tensor:
    """Exact float32 ``2**exponent`` for integer ``exponent`` in [-149, 127] (any shape)."""
    e = exponent.to(torch.long)
    if e.numel() and (int(e.min()) < _POW2_MIN or int(e.max()) > 127):
        raise ValueError("power-of-two exponent outside float32's range [-149, 127]")
    return _POW2.to(e.device)[e - _POW2_MIN]


def floor_log2(x: torch.Tensor) -> torch.Tensor:
    """Exact ``floor(log2(x))`` (int32) of positive finite float32 ``x``, subnormals included."""
    _, e = torch.frexp(x.to(torch.float32))
    return e - 1


def e8m0_decode(codes: torch.Tensor) -> torch.Tensor:
    """Float32 ``2**(code - 127)`` of E8M0 ``codes`` (uint8, any shape); NaN for code 255."""
    c = codes.to(torch.long)
    v = pow2(c.clamp(max=254) - E8M0_BIAS)
    return torch.where(c == E8M0_NAN, float("nan"), v)


def fp16_value(v: torch.Tensor) -> torch.Tensor:
    """A float32 value (either sign, e.g. an offset) as fp16, clamped to fp16's finite range."""
    return v.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)


def fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """A float32 scale rounded to its fp16 storage value, kept away from 0 and Inf."""
    return scale.clamp(FP16_MIN_SCALE, FP16_MAX).to(torch.float16)
