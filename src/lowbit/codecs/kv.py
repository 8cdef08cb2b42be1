"""Codecs for the KV cache: keys and values ``(batch, heads, tokens, head_dim)``, quantized as they
enter the cache and read back at every step, vectorized over the whole cache.

Two groupings (KIVI, Liu et al. 2024):

* ``token``: each token's ``head_dim`` values in groups of ``group_size`` (the whole head when
  None), a scale (and zero) per group: a token can be quantized as soon as it arrives. llama.cpp's
  ``q8_0`` / ``q4_0`` caches are this grouping at 32, symmetric.
* ``channel``: each channel over ``group_size`` consecutive tokens: a chunk is quantized once its
  ``group_size`` tokens are all there (keys have outlier channels, which per-channel scales absorb).

Formats: ``int`` of 2, 4 or 8 bits, asymmetric (``scale = (hi - lo) / (2**bits - 1)`` over the group's
range with zero in it, ``lo = min(min, 0)``, ``hi = max(max, 0)``, so that the integer zero point lies among
the codes: a fp16 scale and the zero point at the codes' width) or symmetric (codes within ``2**(bits-1) - 1`` steps
of zero, ``scale = absmax / (2**(bits-1) - 1)``, fp16); or ``fp8_e4m3`` / ``fp8_e5m2`` with a float32
scale (per group, or one static per-tensor scale from calibration as vLLM's ``k_scale``). Codes are
packed along ``head_dim`` (two 4-bit or four 2-bit codes per byte): the cache's bytes are its
bits per value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lowbit.codecs.minifloat import FP8_MAX, fp8_decode, fp8_encode

KVFormat = Literal["int", "fp8_e4m3", "fp8_e5m2"]
KVAxis = Literal["token", "channel"]


@dataclass(frozen=True)
class KVQuantizer:
    format: KVFormat = "int"
    bits: int = 8
    axis: KVAxis = "token"
    group_size: int | None = None  # values per group along head_dim (token), tokens per group (channel)
    symmetric: bool = False
    static_scale: float | None = None  # fp8 only: one scale for every value (calibrated), else per group

    def __post_init__(self) -> None:
        if self.format == "int" and self.bits not in (2, 4, 8):
            raise ValueError(f"int KV codes are 2, 4 or 8 bits, not {self.bits}")
        if self.format != "int" and (self.bits != 8 or not self.symmetric):
            raise ValueError(f"{self.format} KV values are 8-bit and symmetric")
        if self.static_scale is not None and self.format == "int":
            raise ValueError("a static scale is for fp8 KV caches")
        if self.axis == "channel" and not self.group_size:
            raise ValueError("per-channel KV groups need a group_size (tokens per group)")
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"group_size must be positive, got {self.group_size}")

    # -- layout --------------------------------------------------------------------------------
    @property
    def tokens_per_chunk(self) -> int:
        """Tokens that must be there before they can be quantized together."""
        return self.group_size if self.axis == "channel" else 1  # type: ignore[return-value]

    def check_head_dim(self, head_dim: int) -> None:
        """ValueError when this grouping does not fit heads of ``head_dim`` values."""
        if self.axis == "token" and self.group_size and head_dim % self.group_size:
            raise ValueError(f"per-token groups of {self.group_size} do not divide a head of {head_dim} values")
        if (head_dim * self.bits) % 8:
            raise ValueError(f"{self.bits}-bit codes of a head of {head_dim} values do not fill whole bytes")

    def bits_per_value(self, head_dim: int) -> float:
        """Stored bits per cached value, scales included (a zero point at the codes' width: packed,
        where it fills whole bytes)."""
        if self.static_scale is not None:
            return float(self.bits)
        group = (self.group_size or head_dim) if self.axis == "token" else self.group_size
        if self.format != "int":
            return self.bits + 32 / group  # type: ignore[operator]
        if self.symmetric:
            return self.bits + 16 / group  # type: ignore[operator]
        zeros_per_row = head_dim // group if self.axis == "token" else head_dim  # type: ignore[operator]
        zero_bits = self.bits if zeros_per_row % (8 // self.bits) == 0 else 8
        return self.bits + (16 + zero_bits) / group  # type: ignore[operator]

    def describe(self) -> str:
        fmt = f"int{self.bits}" if self.format == "int" else self.format
        if self.static_scale is not None:
            return f"{fmt} static per-tensor scale"
        group = f" g{self.group_size}" if self.group_size else ""
        return f"{fmt} per-{self.axis}{group}{' sym' if self.symmetric and self.format == 'int' else ''}"

    # -- encode / decode -------------------------------------------------------------------------
    def _grouped(self, x: torch.Tensor, view: bool = False) -> torch.Tensor:
        """``x`` ``(B, H, n, D)`` as ``(..., group)`` with the group last (``view``: a view of ``x``
        to write through, else an error)."""
        B, H, n, D = x.shape
        shape = x.view if view else x.reshape
        if self.axis == "token":
            g = self.group_size or D
            return shape(B, H, n, D // g, g)
        G = self.group_size
        assert G is not None and n % G == 0, (n, G)
        return shape(B, H, n // G, G, D).transpose(-1, -2)  # (B, H, n/G, D, G)

    def _ungrouped(self, g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        if self.axis == "token":
            return g.reshape(shape)
        B, H, n, D = shape
        return g.transpose(-1, -2).reshape(B, H, n, D)

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored form of ``x`` ``(B, H, n, D)`` (``n`` a multiple of ``tokens_per_chunk``):
        ``codes`` uint8 ``(B, H, n, D * bits / 8)`` and the scale data, per group."""
        groups = self._grouped(x.to(torch.float32))
        if self.format != "int":
            fmt = self.format.removeprefix("fp8_")
            if self.static_scale is not None:
                scale = torch.full(groups.shape[:-1], self.static_scale, dtype=torch.float32)
            else:
                scale = (groups.abs().amax(-1) / FP8_MAX[fmt]).clamp(min=2.0**-126)
            codes = fp8_encode(groups / scale.unsqueeze(-1), fmt)
            out = {"scale": scale} if self.static_scale is None else {}
        else:
            qmax = (1 << self.bits) - 1
            if self.symmetric:
                half = (1 << (self.bits - 1)) - 1
                scale = (groups.abs().amax(-1) / half).to(torch.float16).to(torch.float32).clamp(min=2.0**-24)
                codes = (torch.round(groups / scale.unsqueeze(-1)) + (1 << (self.bits - 1))).clamp(1, qmax)
                out = {"scale": scale.to(torch.float16)}
            else:
                # the range holds zero: the integer zero point lies among the codes (a group of one
                # sign, as a key channel over a few tokens often is, would otherwise clamp them all)
                lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
                scale = ((hi - lo) / qmax).to(torch.float16).to(torch.float32).clamp(min=2.0**-24)
                zero = torch.round(-lo / scale).clamp(0, qmax)
                codes = (torch.round(groups / scale.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, qmax)
                # the integer zero point fits the codes' width: packed like them where whole bytes allow
                out = {"scale": scale.to(torch.float16), "zero": self._pack(zero.to(torch.uint8))}
            codes = codes.to(torch.uint8)
        out["codes"] = self._pack(self._ungrouped(codes, x.shape))
        return out

    def decode(self, stored: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(B, H, n, D)`` values of a stored form, in ``dtype``."""
        B, H, n, packed = stored["codes"].shape
        out = torch.empty(B, H, n, packed * 8 // self.bits, dtype=dtype, device=stored["codes"].device)
        self.decode_into(stored, out)
        return out

    def decode_into(self, stored: dict[str, torch.Tensor], out: torch.Tensor, work: torch.Tensor | None = None) -> None:
        """Write the values of a stored form into ``out`` ``(B, H, n, D)`` (any float dtype, a view
        allowed): computed in float32 and rounded once to ``out``'s dtype, with in-place steps (the
        cache reads its whole past at every decode step: this is its cost). ``work``: a flat float32
        buffer of at least ``out.numel()`` values to compute in (a cache reuses one across layers
        and steps rather than allocating its past's size in float32 each time)."""
        codes = self._unpack(stored["codes"])
        groups = self._grouped(codes)
        if self.format != "int":
            values = fp8_decode(groups, self.format.removeprefix("fp8_"))
            values.mul_(self.static_scale if self.static_scale is not None else stored["scale"].unsqueeze(-1))
        else:
            if work is None:
                values = groups.to(torch.float32)
            else:
                values = work[: groups.numel()].view(groups.shape).copy_(groups)
            values.sub_(float(1 << (self.bits - 1)) if self.symmetric else
                        self._unpack(stored["zero"], stored["scale"].shape[-1]).unsqueeze(-1))
            values.mul_(stored["scale"].unsqueeze(-1))
        self._grouped(out, view=True).copy_(values)  # no ungrouped copy in between

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """``decode(encode(x))`` in ``x``'s dtype."""
        return self.decode(self.encode(x), x.dtype)

    def _pack(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(..., n)`` packed ``8 // bits`` per byte along the last dimension (as they are when
        ``n * bits`` is not whole bytes)."""
        per = 8 // self.bits
        if per == 1 or codes.shape[-1] % per:
            return codes
        c = codes.reshape(*codes.shape[:-1], -1, per).to(torch.int32)
        shifts = torch.arange(per, dtype=torch.int32) * self.bits
        return (c << shifts).sum(-1).to(torch.uint8)

    def _unpack(self, packed: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """The codes of :meth:`_pack`; ``n``: their count along the last dimension (default: packed)."""
        per = 8 // self.bits
        if per == 1 or (n is not None and packed.shape[-1] == n):
            return packed
        mask = (1 << self.bits) - 1  # in uint8 throughout: the cache unpacks its whole past every step
        c = torch.stack([(packed >> (i * self.bits)) & mask for i in range(per)], dim=-1)
        return c.reshape(*packed.shape[:-1], -1)

    def nbytes(self, stored: dict[str, torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in stored.values())
