"""llama.cpp's legacy block types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Each row is cut into blocks of 32 values; a block stores an fp16 scale ``d`` (plus an fp16
minimum ``m`` for the ``_1`` types) and one code per value:

* ``q4_0`` / ``q5_0``: codes ``q`` in ``[0, 2**b - 1]``, value ``d * (q - 2**(b-1))``. The
  scale maps the block's value of largest magnitude, with its sign, onto code 0:
  ``d = max / -2**(b-1)`` (so the other side reaches ``2**(b-1) - 1`` steps).
* ``q4_1`` / ``q5_1``: value ``d * q + m`` with ``m`` the block's minimum and
  ``d = (max - min) / (2**b - 1)``.
* ``q8_0``: value ``d * (q - 128)`` with ``d = absmax / 127`` (codes are stored offset by 128;
  ggml stores the signed byte ``q - 128``).

These are the fits of ggml's reference quantizers (``quantize_row_q4_0_ref`` and friends).
When a search is asked for (a shrink grid, e.g. RTN's ``clip_search`` or an importance-weighted
run), the candidates are llama.cpp's own instead (its ``make_qx_quants`` inverse scales
``-(nmax + 0.1 k) / max`` for the symmetric types, ``(nmax + rmin + rdelta k) / (max - min)``
for the ``_1`` types), each refitted by weighted least squares (the scale, and the minimum, that
minimize the weighted error for the candidate's codes), then re-rounded to the nearest codes
of the stored scale; per block the best of these and of the reference fit is kept, so the
result is never worse than the reference under the given weights. An importance matrix ``qw``
weighs each value as llama.cpp's ``quantize_row_<type>_impl`` does, ``qw * sqrt(sigma^2 + x^2)``
with ``sigma^2`` the row's mean square (:meth:`GGMLBlockCodec.importance_weights`): on
Qwen2.5-Coder-0.5B, ``qw`` alone made RTN with llama.cpp's imatrix worse than RTN without one.
Codes are then chosen by rounding to the nearest step of the *stored* (fp16) scale, which can
differ from ggml's rounding with the float32 scale only where that one rounds to the farther
step. Stored sizes equal ggml's block sizes: 18, 20, 22, 24 and 34 bytes per 32 values. The
byte layout itself is :mod:`lowbit.io.ggml_blocks`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from lowbit.codecs.base import Codec, GroupHessian, ScaleData
from lowbit.codecs.grouping import Grouping
from lowbit.codecs.minifloat import fp16_scale, fp16_value

GGML_BLOCK = 32


class GGMLBlockCodec(Codec):
    """A ggml block type: ``bits`` per code, affine (a stored minimum) or symmetric."""

    bits: ClassVar[int]
    affine: ClassVar[bool]
    ggml_type: ClassVar[str]  # ggml's name of the type, e.g. "Q4_0"
    # How llama.cpp weighs a value's error under an imatrix (its quantize_row_<type>_impl):
    # qw * sqrt(factor * mean(x^2) + x^2), the mean over the whole row ("row") or over the
    # value's 256-value super-block ("super"); None: the imatrix as is.
    imatrix_sigma: ClassVar[tuple[Literal["row", "super"], float] | None] = ("row", 1.0)

    def importance_weights(self, groups: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """llama.cpp's error weights under an imatrix (``imatrix_sigma``): each value's own size
        damps the importance's range, so that columns of small importance (next to a column with
        massive activations) still count. ``groups`` ``(R, G, g)``, no padding."""
        if self.imatrix_sigma is None:
            return weights
        span, factor = self.imatrix_sigma
        rows, n_groups, g = groups.shape
        per = n_groups if span == "row" else 256 // g  # groups per span
        x2 = groups.to(torch.float32).square().reshape(rows, n_groups // per, per, g)
        return weights * torch.sqrt(factor * x2.mean(dim=(-2, -1), keepdim=True) + x2).reshape(rows, n_groups, g)

    @property
    def code_bits(self) -> int:
        return self.bits

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def zero(self) -> int:
        """The code of the value 0 (symmetric types)."""
        return 1 << (self.bits - 1)


class GGMLLegacyCodec(GGMLBlockCodec):
    """One of ggml's 32-value block types (see the module docstring); no parameters."""

    @property
    def grouping(self) -> Grouping:
        return Grouping("group", GGML_BLOCK)

    def scale_dtypes(self) -> dict[str, torch.dtype]:
        return {"d": torch.float16, "m": torch.float16} if self.affine else {"d": torch.float16}

    def check_weight(self, weight: torch.Tensor) -> torch.Tensor:
        w = super().check_weight(weight)
        if w.shape[1] % GGML_BLOCK:
            raise ValueError(f"{self.ggml_type} needs rows that are a multiple of {GGML_BLOCK} values, "
                             f"got {w.shape[1]}")
        return w

    def fit(self, groups: torch.Tensor, shrink: float | torch.Tensor = 1.0) -> ScaleData:
        groups = groups.to(torch.float32)
        if self.affine:
            lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
            mid = (lo + hi) / 2
            # shrink toward the middle; shrink == 1 keeps lo and hi exactly
            lo, hi = lo + (mid - lo) * (1 - shrink), hi - (hi - mid) * (1 - shrink)
            return {"d": fp16_scale((hi - lo) / self.qmax), "m": fp16_value(lo)}
        if self.bits == 8:
            return {"d": fp16_scale(groups.abs().amax(dim=-1) * shrink / 127)}
        idx = groups.abs().argmax(dim=-1, keepdim=True)
        signed_max = groups.gather(-1, idx).squeeze(-1)
        return {"d": _signed_fp16(signed_max * shrink / -self.zero)}

    def fit_group_scales(
        self,
        groups: torch.Tensor,
        weights: "torch.Tensor | GroupHessian",
        shrink_grid: torch.Tensor | None = None,
    ) -> ScaleData:
        """The reference fit; with a (non-empty) ``shrink_grid``, llama.cpp's candidate search
        with least-squares refits under ``weights`` instead (module docstring)."""
        best = self.fit(groups)
        if shrink_grid is None or shrink_grid.numel() == 0:
            return best
        x = groups.to(torch.float32)
        w = weights.blocks.diagonal(dim1=-2, dim2=-1).unsqueeze(0) if isinstance(weights, GroupHessian) else weights
        w = torch.broadcast_to(w.to(torch.float32), x.shape)
        best_err = self._group_error(groups, weights, best)
        for cand in self._candidates(x, w):
            err = self._group_error(groups, weights, cand)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = {k: torch.where(better, cand[k], best[k]) for k in best}
        return best

    def _candidates(self, x: torch.Tensor, w: torch.Tensor) -> "list[ScaleData]":
        """llama.cpp's candidates for blocks ``x`` ``(R, G, 32)`` under weights ``w``, refitted."""
        if self.affine:
            return self._affine_candidates(x, w)
        idx = x.abs().argmax(dim=-1, keepdim=True)
        signed_max = x.gather(-1, idx)
        safe_max = torch.where(signed_max == 0, 1.0, signed_max)
        nmax = 127 if self.bits == 8 else self.zero
        out = []
        for k in range(-9, 10):  # make_qx_quants: inverse scales -(nmax + 0.1 k) / max
            q = torch.round(-(nmax + 0.1 * k) / safe_max * x).clamp(-nmax, nmax - 1 if self.bits < 8 else nmax)
            swl2, swxl = (w * q * q).sum(-1), (w * x * q).sum(-1)
            d = torch.where(swl2 > 0, swxl / torch.where(swl2 > 0, swl2, 1.0), 0.0)
            out.append({"d": _signed_fp16(d)})
        return out

    def _affine_candidates(self, x: torch.Tensor, w: torch.Tensor) -> "list[ScaleData]":
        # make_qkx3_quants as llama.cpp calls it for Q4_1/Q5_1: min clamped to <= 0, inverse
        # scales (nmax - 0.9 + 0.05 k) / (max - min) for k = 0..36, a weighted least-squares
        # (scale, min) for each candidate's codes (here the min is left free: never worse)
        lo = x.amin(dim=-1, keepdim=True).clamp(max=0)
        hi = x.amax(dim=-1, keepdim=True)
        span = hi - lo
        flat = span.squeeze(-1) <= 0
        safe_span = torch.where(span > 0, span, 1.0)
        sw, swx = w.sum(-1), (w * x).sum(-1)
        out = [{"d": fp16_scale(span.squeeze(-1) / self.qmax), "m": fp16_value(lo.squeeze(-1))}]
        for k in range(37):
            q = torch.round((self.qmax - 0.9 + 0.05 * k) / safe_span * (x - lo)).clamp(0, self.qmax)
            swl, swl2, swxl = (w * q).sum(-1), (w * q * q).sum(-1), (w * x * q).sum(-1)
            det = sw * swl2 - swl * swl
            ok = (det > 0) & ~flat
            safe = torch.where(ok, det, 1.0)
            d = torch.where(ok, (sw * swxl - swx * swl) / safe, span.squeeze(-1) / self.qmax)
            m = torch.where(ok, (swl2 * swx - swl * swxl) / safe, lo.squeeze(-1))
            out.append({"d": fp16_scale(d.clamp_min(0)), "m": fp16_value(m)})
        return out

    def encode(self, values: torch.Tensor, scale: ScaleData) -> torch.Tensor:
        d = scale["d"].to(torch.float32).unsqueeze(-1)
        safe = torch.where(d == 0, 1.0, d)
        if self.affine:
            q = torch.floor((values.to(torch.float32) - scale["m"].to(torch.float32).unsqueeze(-1)) / safe + 0.5)
        else:
            q = torch.floor(values.to(torch.float32) / safe + 0.5) + self.zero
            q = torch.where(d == 0, float(self.zero), q)
        lowest = 1 if self.bits == 8 else 0  # Q8_0 codes are symmetric: -127..127
        return q.clamp(lowest, self.qmax).to(torch.uint8)

    def decode(self, codes: torch.Tensor, scale: ScaleData) -> torch.Tensor:
        d = scale["d"].to(torch.float32).unsqueeze(-1)
        if self.affine:
            return d * codes.to(torch.float32) + scale["m"].to(torch.float32).unsqueeze(-1)
        return d * (codes.to(torch.float32) - self.zero)


def _signed_fp16(d: torch.Tensor) -> torch.Tensor:
    """``d`` (either sign) as fp16, its magnitude kept in fp16's finite, nonzero range."""
    return (fp16_scale(d.abs()).to(torch.float32) * torch.where(d < 0, -1.0, 1.0)).to(torch.float16)


class Q4_0Codec(GGMLLegacyCodec):
    name: Literal["q4_0"] = "q4_0"
    bits: ClassVar[int] = 4
    affine: ClassVar[bool] = False
    ggml_type: ClassVar[str] = "Q4_0"


class Q4_1Codec(GGMLLegacyCodec):
    name: Literal["q4_1"] = "q4_1"
    bits: ClassVar[int] = 4
    affine: ClassVar[bool] = True
    ggml_type: ClassVar[str] = "Q4_1"


class Q5_0Codec(GGMLLegacyCodec):
    name: Literal["q5_0"] = "q5_0"
    bits: ClassVar[int] = 5
    affine: ClassVar[bool] = False
    ggml_type: ClassVar[str] = "Q5_0"


class Q5_1Codec(GGMLLegacyCodec):
    name: Literal["q5_1"] = "q5_1"
    bits: ClassVar[int] = 5
    affine: ClassVar[bool] = True
    ggml_type: ClassVar[str] = "Q5_1"


class Q8_0Codec(GGMLLegacyCodec):
    name: Literal["q8_0"] = "q8_0"
    bits: ClassVar[int] = 8
    affine: ClassVar[bool] = False
    ggml_type: ClassVar[str] = "Q8_0"
    imatrix_sigma: ClassVar[tuple[Literal["row", "super"], float] | None] = None  # llama.cpp ignores an imatrix for Q8_0
