"""llama.cpp's k-quants: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

Rows are cut into super-blocks of 256 values, each cut into sub-blocks of 16 or 32 values. A
super-block stores fp16 scales ``d`` (and ``dmin`` for the affine types) and, per sub-block, an
integer scale code ``sc`` (and min code ``mn``) of 4, 6 or 8 bits; a sub-block's values are

* affine (Q2_K, Q4_K, Q5_K): ``(d * sc) * q - dmin * mn`` with codes ``q`` in ``[0, 2**b - 1]``
  (the sub-block's minimum ``-dmin * mn`` is never above 0);
* symmetric (Q3_K, Q6_K): ``(d * sc) * (q - 2**(b-1))`` with signed ``sc``.

=========  ====  =========  ==========================  ========================
type       bits  sub-block  sub-block scale codes        bytes per 256 values
=========  ====  =========  ==========================  ========================
``q2_k``   2     16         ``sc``, ``mn`` in 0..15       84
``q3_k``   3     16         ``sc`` in -32..31            110
``q4_k``   4     32         ``sc``, ``mn`` in 0..63       144
``q5_k``   5     32         ``sc``, ``mn`` in 0..63       176
``q6_k``   6     16         ``sc`` in -128..127          210
=========  ====  =========  ==========================  ========================

In lowbit's grouped view a group is a sub-block: scale data is ``(R, G)`` per sub-block, with
``d``/``dmin`` repeated over the sub-blocks of their super-block (stored once per super-block,
and the scale codes packed at their bit width, so the stored bytes equal ggml's).

Quantizer (:meth:`GGMLKQuantCodec.fit_group_scales`, vectorized over all sub-blocks). It always
searches, as llama.cpp's own k-quant quantizers do, and every step keeps the best candidate
under the given per-value weights (uniform, or an importance matrix weighed per value as
llama.cpp's ``quantize_row_<type>_impl`` does: ``qw * sqrt(k * sigma^2 + x^2)``, ``sigma^2`` the
super-block's mean square, ``k`` 1 for Q2_K and 2 for Q3_K/Q4_K/Q5_K; Q6_K takes ``qw`` as is):

1. each sub-block's float scale (and min) from llama.cpp's candidates (``make_qkx2/3_quants``
   inverse scales ``(nmax + rmin + k rdelta) / (max - min)`` for the affine types,
   ``make_qx_quants``' ``-(nmax + 0.1 k) / max`` for the symmetric ones), each refitted by
   weighted least squares;
2. the super-block's ``d`` (and ``dmin``) from ``max / (code_max + 0.1 t)``, ``t`` in -4..4
   (``t = 0`` is llama.cpp's reference; the others are ``make_qp_quants``' candidates), with
   sub-block codes rounded to them;
3. each sub-block's scale codes nudged by -1, 0, +1 where that lowers the error.

Codes are then the nearest steps of the stored scales (ggml's ``nearest_int`` rounding).
"""

from __future__ import annotations

import itertools
from typing import ClassVar, Literal

import torch

from lowbit.codecs.base import GroupHessian, ScaleData
from lowbit.codecs.ggml_legacy import GGMLBlockCodec
from lowbit.codecs.grouping import Grouping
from lowbit.codecs.minifloat import fp16_value
from lowbit.codecs.quantized_tensor import QuantizedTensor

QK_K = 256
KQUANT_BLOCK_BYTES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


class GGMLKQuantCodec(GGMLBlockCodec):
    """One of ggml's 256-value super-block types (module docstring); no parameters."""

    sub: ClassVar[int]  # values per sub-block
    scale_bits: ClassVar[int]  # bits of each sub-block scale (and min) code
    # sub-block search candidates (llama.cpp's widest: make_qkx3's rmin -0.9, rdelta 0.05, 36
    # steps, widened to -1..+1 to cover make_qkx2's Q4_K range too)
    rmin: ClassVar[float] = -1.0
    rdelta: ClassVar[float] = 0.05
    nstep: ClassVar[int] = 40

    @property
    def grouping(self) -> Grouping:
        return Grouping("group", self.sub)

    @property
    def whole_tensor_fit(self) -> bool:
        # a sub-block's scale is only meaningful with its super-block's d: fit whole rows
        return True

    @property
    def rows_independent(self) -> bool:
        return True  # super-blocks lie inside a row

    @property
    def per_super(self) -> int:
        return QK_K // self.sub

    @property
    def sc_range(self) -> tuple[int, int]:
        """Inclusive range of the sub-block scale codes."""
        if self.affine:
            return 0, (1 << self.scale_bits) - 1
        half = 1 << (self.scale_bits - 1)
        return -half, half - 1

    def scale_dtypes(self) -> dict[str, torch.dtype]:
        if self.affine:
            return {"d": torch.float16, "dmin": torch.float16, "sc": torch.uint8, "mn": torch.uint8}
        return {"d": torch.float16, "sc": torch.int8}

    def check_weight(self, weight: torch.Tensor) -> torch.Tensor:
        w = super().check_weight(weight)
        if w.shape[1] % QK_K:
            raise ValueError(f"{self.ggml_type} needs rows that are a multiple of {QK_K} values, got {w.shape[1]} "
                             "(llama.cpp falls back to a 32-block type for such tensors)")
        return w

    # -- values <-> codes ---------------------------------------------------------------
    def _step_offset(self, scale: ScaleData) -> tuple[torch.Tensor, torch.Tensor | None]:
        step = scale["d"].to(torch.float32) * scale["sc"].to(torch.float32)
        if not self.affine:
            return step.unsqueeze(-1), None
        return step.unsqueeze(-1), (scale["dmin"].to(torch.float32) * scale["mn"].to(torch.float32)).unsqueeze(-1)

    def encode(self, values: torch.Tensor, scale: ScaleData) -> torch.Tensor:
        step, offset = self._step_offset(scale)
        safe = torch.where(step == 0, 1.0, step)
        x = values.to(torch.float32)
        if offset is not None:
            q = torch.round((x + offset) / safe).clamp(0, self.qmax)
            return torch.where(step == 0, 0.0, q).to(torch.uint8)
        q = torch.round(x / safe).clamp(-self.zero, self.zero - 1) + self.zero
        return torch.where(step == 0, float(self.zero), q).to(torch.uint8)

    def decode(self, codes: torch.Tensor, scale: ScaleData) -> torch.Tensor:
        step, offset = self._step_offset(scale)
        if offset is not None:
            return step * codes.to(torch.float32) - offset
        return step * (codes.to(torch.float32) - self.zero)

    # -- fitting ------------------------------------------------------------------------
    def fit(self, groups: torch.Tensor, shrink: float | torch.Tensor = 1.0) -> ScaleData:
        """The plain fit (no search): each sub-block's range, shrunk by ``shrink``, mapped onto
        the codes; the super-block scales from the largest sub-block scale (llama.cpp's
        reference second step)."""
        x = groups.to(torch.float32)
        shrink_t = torch.as_tensor(shrink, dtype=torch.float32, device=x.device)
        if self.affine:
            lo = x.amin(-1).clamp(max=0) * shrink_t
            hi = x.amax(-1) * shrink_t
            return self._quantize_sub_scales(((hi - lo) / self.qmax).clamp_min(0), -lo, t_d=0, t_m=0)
        idx = x.abs().argmax(-1, keepdim=True)
        signed_max = x.gather(-1, idx).squeeze(-1) * shrink_t
        return self._quantize_sub_scales(signed_max / -self.zero, None, t_d=0, t_m=0)

    def fit_group_scales(
        self,
        groups: torch.Tensor,
        weights: "torch.Tensor | GroupHessian",
        shrink_grid: torch.Tensor | None = None,
    ) -> ScaleData:
        """The search of the module docstring under ``weights`` (a GroupHessian counts by its
        diagonal); ``shrink_grid`` is not used: the search has its own candidates."""
        x = groups.to(torch.float32)
        if isinstance(weights, GroupHessian):
            weights = weights.blocks.diagonal(dim1=-2, dim2=-1).unsqueeze(0)
        w = torch.broadcast_to(weights.to(torch.float32), x.shape)
        if x.shape[1] % self.per_super:
            raise ValueError(f"{self.ggml_type} fits whole super-blocks of {QK_K} values")
        if self.affine:
            s, m = self._affine_sub_scales(x, w)
        else:
            s, m = self._symmetric_sub_scales(x, w), None
        best = self._quantize_sub_scales(s, m, 0, 0)
        best_err = self._super_error(x, w, best)
        steps = range(-4, 5)
        for t_d, t_m in itertools.product(steps, steps if self.affine else [0]):
            if t_d == 0 and t_m == 0:
                continue
            cand = self._quantize_sub_scales(s, m, t_d, t_m)
            best, best_err = self._keep_better(x, w, best, best_err, cand)
        return self._nudge_codes(x, w, best)

    def _affine_sub_scales(self, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sub-block (scale >= 0, min >= 0) minimizing the weighted error of ``scale * l - min``."""
        lo = x.amin(-1, keepdim=True).clamp(max=0)
        span = x.amax(-1, keepdim=True) - lo
        safe_span = torch.where(span > 0, span, 1.0)
        sw, swx = w.sum(-1), (w * x).sum(-1)
        best_s = (span / self.qmax).squeeze(-1)
        best_m = -lo.squeeze(-1)
        best_err = self._affine_error(x, w, best_s, best_m)
        for k in range(self.nstep + 1):
            iscale = (self.qmax + self.rmin + self.rdelta * k) / safe_span
            q = torch.round(iscale * (x - lo)).clamp(0, self.qmax)
            swl, swl2, swxl = (w * q).sum(-1), (w * q * q).sum(-1), (w * x * q).sum(-1)
            det = sw * swl2 - swl * swl
            ok = det > 0
            safe = torch.where(ok, det, 1.0)
            s = (sw * swxl - swx * swl) / safe
            mn = (swl2 * swx - swl * swxl) / safe
            # a positive minimum cannot be stored: pin it at 0 and refit the scale alone
            pos = mn > 0
            s = torch.where(pos, swxl / torch.where(swl2 > 0, swl2, 1.0), s)
            mn = torch.where(pos, 0.0, mn)
            s = s.clamp_min(0)
            err = torch.where(ok, self._affine_error(x, w, s, -mn), torch.inf)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s, best_m = torch.where(better, s, best_s), torch.where(better, -mn, best_m)
        return best_s, best_m

    def _affine_error(self, x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        s_, m_ = s.unsqueeze(-1), m.unsqueeze(-1)
        q = torch.round((x + m_) / torch.where(s_ > 0, s_, 1.0)).clamp(0, self.qmax)
        return (w * (s_ * q - m_ - x).square()).sum(-1)

    def _symmetric_sub_scales(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Per sub-block signed scale minimizing the weighted error of ``scale * l``, ``l`` in
        ``[-zero, zero - 1]``."""
        idx = x.abs().argmax(-1, keepdim=True)
        signed_max = x.gather(-1, idx)
        safe_max = torch.where(signed_max == 0, 1.0, signed_max)
        nmax = self.zero
        best_s = torch.zeros(x.shape[:-1], device=x.device)
        best_err = (w * x.square()).sum(-1)
        for k in range(-9, 10):
            q = torch.round(-(nmax + 0.1 * k) / safe_max * x).clamp(-nmax, nmax - 1)
            swl2, swxl = (w * q * q).sum(-1), (w * x * q).sum(-1)
            s = torch.where(swl2 > 0, swxl / torch.where(swl2 > 0, swl2, 1.0), 0.0)
            s_ = s.unsqueeze(-1)
            ql = torch.round(x / torch.where(s_ == 0, 1.0, s_)).clamp(-nmax, nmax - 1)
            err = (w * (s_ * ql - x).square()).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
        return best_s

    def _quantize_sub_scales(self, s: torch.Tensor, m: torch.Tensor | None, t_d: int, t_m: int) -> ScaleData:
        """Scale data for float sub-block scales ``s`` (and mins ``m``) ``(R, G)``: super-block
        scales ``max / (code_max + 0.1 t)`` rounded to fp16, codes the nearest multiples."""
        R, G = s.shape
        lo, hi = self.sc_range
        sup = s.view(R, G // self.per_super, self.per_super)
        if self.affine:
            d = fp16_value(sup.amax(-1) / (hi + 0.1 * t_d))
        else:
            idx = sup.abs().argmax(-1, keepdim=True)
            d = fp16_value(sup.gather(-1, idx).squeeze(-1) / (lo - 0.1 * t_d))
        out = {"d": d.repeat_interleave(self.per_super, dim=1)}
        out["sc"] = _codes_for(s, out["d"], lo, hi)
        if self.affine:
            assert m is not None
            dmin = fp16_value(m.view(R, G // self.per_super, self.per_super).amax(-1) / (hi + 0.1 * t_m))
            out["dmin"] = dmin.repeat_interleave(self.per_super, dim=1)
            out["mn"] = _codes_for(m, out["dmin"], lo, hi)
        return {k: v.to(self.scale_dtypes()[k]) for k, v in out.items()}

    def _sub_error(self, x: torch.Tensor, w: torch.Tensor, scale: ScaleData) -> torch.Tensor:
        return (w * (self.quantize_dequantize(x, scale) - x).square()).sum(-1)

    def _super_error(self, x: torch.Tensor, w: torch.Tensor, scale: ScaleData) -> torch.Tensor:
        e = self._sub_error(x, w, scale)
        return e.view(e.shape[0], -1, self.per_super).sum(-1).repeat_interleave(self.per_super, dim=1)

    def _keep_better(self, x, w, best: ScaleData, best_err: torch.Tensor, cand: ScaleData):  # type: ignore[no-untyped-def]
        err = self._super_error(x, w, cand)
        better = err < best_err
        return {k: torch.where(better, cand[k], best[k]) for k in best}, torch.where(better, err, best_err)

    def _nudge_codes(self, x: torch.Tensor, w: torch.Tensor, scale: ScaleData) -> ScaleData:
        """Each sub-block's scale (and min) code moved by -1, 0 or +1, whichever errs least."""
        lo, hi = self.sc_range
        best, best_err = dict(scale), self._sub_error(x, w, scale)
        keys = ["sc", "mn"] if self.affine else ["sc"]
        for delta in itertools.product((-1, 0, 1), repeat=len(keys)):
            if not any(delta):
                continue
            cand = dict(scale)
            for k, dk in zip(keys, delta):
                cand[k] = (scale[k].to(torch.int32) + dk).clamp(lo, hi).to(scale[k].dtype)
            err = self._sub_error(x, w, cand)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = {k: torch.where(better, cand[k], best[k]) for k in best}
        return best

    # -- storage ------------------------------------------------------------------------
    def pack(self, codes: torch.Tensor, scale: ScaleData, shape: tuple[int, int]) -> QuantizedTensor:
        """Codes packed at ``bits``, ``d``/``dmin`` once per super-block, scale codes packed at
        ``scale_bits`` (signed ones offset to unsigned): exactly ggml's byte count."""
        from lowbit.codecs.packing import pack_codes

        lo, _ = self.sc_range
        data = {"codes": pack_codes(codes, self.code_bits)}
        data["d"] = scale["d"][:, :: self.per_super].to(torch.float16).contiguous()
        data["sc"] = pack_codes((scale["sc"].to(torch.int32) - lo).to(torch.uint8), self.scale_bits)
        if self.affine:
            data["dmin"] = scale["dmin"][:, :: self.per_super].to(torch.float16).contiguous()
            data["mn"] = pack_codes(scale["mn"], self.scale_bits)
        return QuantizedTensor(codec=self.model_dump(), shape=shape, data=data)

    def unpack(self, qt: QuantizedTensor) -> tuple[torch.Tensor, ScaleData]:
        from lowbit.codecs.packing import unpack_codes

        rows, cols = qt.shape
        G = cols // self.sub
        lo, _ = self.sc_range
        codes = unpack_codes(qt.data["codes"], self.code_bits, rows * cols).view(rows, cols)
        sc = unpack_codes(qt.data["sc"], self.scale_bits, rows * G).view(rows, G).to(torch.int32) + lo
        scale = {"d": qt.data["d"].repeat_interleave(self.per_super, dim=1), "sc": sc.to(self.scale_dtypes()["sc"])}
        if self.affine:
            scale["dmin"] = qt.data["dmin"].repeat_interleave(self.per_super, dim=1)
            scale["mn"] = unpack_codes(qt.data["mn"], self.scale_bits, rows * G).view(rows, G)
        return self.grouping.split(codes), scale

    def stored_parts(self, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Codes and sub-block scale codes packed, ``d``/``dmin`` per super-block: ggml's bytes."""
        from lowbit.codecs.packing import packed_nbytes

        rows, cols = shape
        G = -(-cols // self.sub)
        parts = {"codes": ((packed_nbytes(rows * cols, self.code_bits),), torch.uint8),
                 "d": ((rows, -(-G // self.per_super)), torch.float16),
                 "sc": ((packed_nbytes(rows * G, self.scale_bits),), torch.uint8)}
        if self.affine:
            parts["dmin"] = parts["d"]
            parts["mn"] = parts["sc"]
        return parts


def _codes_for(s: torch.Tensor, d: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """The nearest codes ``round(s / d)`` in ``[lo, hi]`` (0 where ``d`` is 0)."""
    df = d.to(torch.float32)
    q = torch.round(s / torch.where(df == 0, 1.0, df)).clamp(lo, hi)
    return torch.where(df == 0, 0.0, q).to(torch.int32)


class Q2_KCodec(GGMLKQuantCodec):
    name: Literal["q2_k"] = "q2_k"
    bits: ClassVar[int] = 2
    sub: ClassVar[int] = 16
    affine: ClassVar[bool] = True
    scale_bits: ClassVar[int] = 4
    ggml_type: ClassVar[str] = "Q2_K"
    imatrix_sigma: ClassVar[tuple[Literal["row", "super"], float] | None] = ("super", 1.0)


class Q3_KCodec(GGMLKQuantCodec):
    name: Literal["q3_k"] = "q3_k"
    bits: ClassVar[int] = 3
    sub: ClassVar[int] = 16
    affine: ClassVar[bool] = False
    scale_bits: ClassVar[int] = 6
    ggml_type: ClassVar[str] = "Q3_K"
    imatrix_sigma: ClassVar[tuple[Literal["row", "super"], float] | None] = ("super", 2.0)


class Q4_KCodec(GGMLKQuantCodec):
    name: Literal["q4_k"] = "q4_k"
    bits: ClassVar[int] = 4
    sub: ClassVar[int] = 32
    affine: ClassVar[bool] = True
    scale_bits: ClassVar[int] = 6
    ggml_type: ClassVar[str] = "Q4_K"
    imatrix_sigma: ClassVar[tuple[Literal["row", "super"], float] | None] = ("super", 2.0)


class Q5_KCodec(GGMLKQuantCodec):
    name: Literal["q5_k"] = "q5_k"
    bits: ClassVar[int] = 5
    sub: ClassVar[int] = 32
    affine: ClassVar[bool] = True
    scale_bits: ClassVar[int] = 6
    ggml_type: ClassVar[str] = "Q5_K"
    imatrix_sigma: ClassVar[tuple[Literal["row", "super"], float] | None] = ("super", 2.0)


class Q6_KCodec(GGMLKQuantCodec):
    name: Literal["q6_k"] = "q6_k"
    bits: ClassVar[int] = 6
    sub: ClassVar[int] = 16
    affine: ClassVar[bool] = False
    scale_bits: ClassVar[int] = 8
    ggml_type: ClassVar[str] = "Q6_K"
    imatrix_sigma: ClassVar[tuple[Literal["row", "super"], float] | None] = None  # quantize_row_q6_K_impl uses the imatrix as is
