"""GPTQ (Frantar et al., 2022): choose codes column by column, pushing each column's rounding
error onto the columns not yet quantized through the inverse Hessian of the layer's input.

The fast blocked form: columns are processed in blocks of ``block_size``; inside a block each
column's error updates only the block (rank-1 updates), and the rest of the matrix receives the
block's errors in one matrix product ("lazy batch" updates). The Hessian ``H = X^T X / n`` is
dampened by ``dampening * mean(diag H)``, raised tenfold (up to ``damp_retries`` times) while its
Cholesky factorization fails. Input columns that never saw a non-zero activation ("dead") are
zeroed and ignored.

Codecs are used only through ``fit_group_scales`` / ``encode`` / ``decode``, so GPTQ works on
every codec. Scale data is fitted once on the whole original weight up front (``static_groups``,
the default, as llm-compressor does; always for per-channel/per-tensor scales and for codecs
whose scale data has a whole-tensor state such as NF4 with double quantization and NVFP4), or per
group when GPTQ reaches the group's first column, on the already-updated weights (the original
paper's code). Static fits lose less here: at 2-3 bits the updated weights drift outward and
inflate the late scales (``tests/algorithms/test_gptq.py`` and BENCHMARKS.md show both). With ``act_order``
columns are processed in order of decreasing Hessian diagonal; without static groups the groups
are then formed in that order and stored with a ``g_idx`` (the group of each column). Act-order
with static groups is the default, as llm-compressor's ``actorder: static``: every format stores
it (no ``g_idx``), and it lost less than column order in every int4 row measured (BENCHMARKS.md,
"GPTQ's defaults").
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from lowbit.algorithms.base import ClipSearch, LayerStats
from lowbit.calibration.statistics import StatsRequest
from lowbit.codecs import Codec, QuantizedTensor
from lowbit.codecs.base import ScaleData
from lowbit.codecs.grouping import Grouping


STACK_LIMIT = 1 << 22  # weights (elements) up to which CPU GPTQ stacks linears that share an input


class SingularHessianError(ValueError):
    """The Hessian stays not positive definite even after the largest dampening."""


class GPTQ(ClipSearch):
    """GPTQ; the clipping search (``clip_*``, off by default) weights each column by diag(H)."""

    name: Literal["gptq"] = "gptq"
    block_size: int = Field(128, gt=0, description="columns per lazy-update block")
    dampening: float = Field(0.01, gt=0, description="diagonal dampening, relative to the mean of diag(H)")
    damp_retries: int = Field(4, ge=0, description="times the dampening is raised tenfold if Cholesky fails")
    act_order: bool = Field(True, description="quantize columns in order of decreasing Hessian diagonal")
    static_groups: bool = Field(
        True, description="fit every group's scale data up front on the original weight (else when GPTQ reaches it)"
    )
    hessian_dtype: Literal["float32", "float64"] = Field("float32", description="accumulation dtype of X^T X")

    @property
    def needs_calibration(self) -> bool:
        return True

    def stats_request(self) -> StatsRequest:
        return StatsRequest(hessian=True, hessian_dtype=getattr(torch, self.hessian_dtype))

    def quantize(self, weight: torch.Tensor, codec: Codec, stats: LayerStats | None = None) -> QuantizedTensor:
        return self.quantize_stacked([weight], codec, stats)[0]

    def quantize_stacked(
        self, weights: list[torch.Tensor], codec: Codec, stats: LayerStats | None = None
    ) -> list[QuantizedTensor]:
        """Linears that read one input (q/k/v, gate/up) share its Hessian: with a codec whose
        rows are independent they go through one column loop, stacked row-wise (the same codes
        as one loop each, in fewer and larger steps). On the CPU only while the stack is small
        (``STACK_LIMIT`` weights): there each column's fixed cost dominates, while a large stack
        gains little and doubles GPTQ's copies of the weight in memory; on a GPU, where each
        column's kernel launches dominate at any size, always."""
        if stats is None or stats.hessian is None:
            raise ValueError("GPTQ needs the Hessian of the layer's input (calibration statistics)")
        options = dict(block_size=self.block_size, dampening=self.dampening, damp_retries=self.damp_retries,
                       act_order=self.act_order, static_groups=self.static_groups, shrink_grid=self.shrink_grid())
        small = sum(w.numel() for w in weights) <= STACK_LIMIT or weights[0].device.type == "cuda"
        if len(weights) > 1 and codec.rows_independent and small:
            return gptq_quantize_stacked(weights, stats.hessian, codec, **options)[0]  # type: ignore[arg-type]
        return [gptq_quantize(w, stats.hessian, codec, **options)[0] for w in weights]  # type: ignore[arg-type]


def inverse_hessian_factor(hessian: torch.Tensor, dampening: float, retries: int) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + d * mean(diag H) * I)^-1`` and the dampening ``d`` that
    made it exist (raised tenfold per failed try)."""
    mean_diag = hessian.diagonal().mean()
    damp = dampening
    for _ in range(retries + 1):
        h = hessian.clone()
        h.diagonal().add_(damp * mean_diag)
        lower, info = torch.linalg.cholesky_ex(h)
        del h  # (in, in) temporaries dominate GPTQ's memory on wide layers: free each at once
        if info == 0:
            inv = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            del inv
            if info == 0 and torch.isfinite(upper).all():
                return upper, damp
        damp *= 10
    raise SingularHessianError(f"Hessian not positive definite even with dampening {damp / 10:g}")


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, codec: Codec, **options: object,
                  ) -> tuple[QuantizedTensor, float]:
    """GPTQ of a weight ``(out, in)`` given ``hessian`` ``(in, in)`` (``options``: those of
    :func:`gptq_quantize_stacked`); returns the quantized tensor and the dampening used."""
    qts, damp = gptq_quantize_stacked([weight], hessian, codec, **options)  # type: ignore[arg-type]
    return qts[0], damp


def gptq_quantize_stacked(
    weights: list[torch.Tensor],
    hessian: torch.Tensor,
    codec: Codec,
    block_size: int = 128,
    dampening: float = 0.01,
    damp_retries: int = 4,
    act_order: bool = False,
    static_groups: bool = False,
    shrink_grid: torch.Tensor | None = None,
) -> tuple[list[QuantizedTensor], float]:
    """GPTQ of weights ``(out_i, in)`` that share ``hessian``, as one ``(sum out_i, in)`` matrix
    (more than one needs ``codec.rows_independent``); returns one quantized tensor per weight and
    the dampening used."""
    if len(weights) > 1 and not codec.rows_independent:
        raise ValueError(f"{codec.describe()}: rows share scale data, so stacked weights would change it")
    checked = [codec.check_weight(w) for w in weights]
    stacked = checked[0] if len(checked) == 1 else torch.cat(checked)
    codes, scale, g_idx, damp = _gptq_codes(stacked, hessian, codec, block_size, dampening, damp_retries,
                                            act_order, static_groups, shrink_grid)
    out, r0 = [], 0
    for w in weights:
        r1 = r0 + w.shape[0]
        part = {k: v[r0:r1] for k, v in scale.items()}
        out.append(_packed(codec, codes[r0:r1], part, None if g_idx is None else g_idx.clone()))
        r0 = r1
    return out, damp


def _packed(codec: Codec, codes: torch.Tensor, scale: ScaleData, g_idx: torch.Tensor | None) -> QuantizedTensor:
    qt = codec.pack(codes, scale, tuple(codes.shape))  # type: ignore[arg-type]
    if g_idx is not None:
        qt.data["g_idx"] = g_idx
    return qt


def _gptq_codes(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    codec: Codec,
    block_size: int,
    dampening: float,
    damp_retries: int,
    act_order: bool,
    static_groups: bool,
    shrink_grid: torch.Tensor | None,
) -> tuple[torch.Tensor, ScaleData, torch.Tensor | None, float]:
    """GPTQ's codes ``(out, in)`` (original column order), scale data, ``g_idx`` (act-order with
    groups formed in that order, else None) and the dampening used, for a checked weight."""
    w = weight.clone()
    rows, cols = w.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"Hessian of shape {tuple(hessian.shape)} for a weight with {cols} input columns")
    h = hessian.clone()
    if not torch.isfinite(h).all():
        raise ValueError("Hessian contains NaN or Inf")
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    importance = h.diagonal().to(torch.float32).clone()
    importance[dead] = 0

    grouping = codec.grouping
    dynamic = grouping.granularity == "group" and not static_groups and not codec.whole_tensor_fit
    static_scale: ScaleData | None = None
    if not dynamic:
        static_scale = codec.fit_group_scales(grouping.split(w), grouping.weights((rows, cols), importance), shrink_grid)

    perm = torch.argsort(h.diagonal(), descending=True) if act_order else None
    if perm is not None:
        w = w[:, perm]
        h = h[perm][:, perm]
        importance = importance[perm]
    hinv, damp = inverse_hessian_factor(h, dampening, damp_retries)
    del h
    hinv = hinv.to(torch.float32)

    # Work on the transpose so that a column of W is a contiguous row and the rank-1 updates
    # touch contiguous memory.
    wt = w.t().contiguous()  # (cols, rows)
    codes_t = torch.empty(cols, rows, dtype=torch.uint8, device=wt.device)
    gs = grouping.group_size or cols
    group_cols = Grouping("group", gs)
    dyn_scale: dict[str, torch.Tensor] = {}
    col_scale: ScaleData = {}
    view = (1, 1, rows) if grouping.granularity == "tensor" else (rows, 1, 1)
    fast = None if dynamic else _int_columns(codec, static_scale, grouping, perm, cols)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = wt[i1:i2].clone()
        err1 = torch.empty(i2 - i1, rows, device=wt.device)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if fast is not None:  # the int codec's encode and decode, with the column's scale ready
                col = w1[i]
                s_j, z_j, qmax = fast[0][j], fast[1][j], fast[2]
                q = torch.round(col / s_j).add_(z_j).clamp_(0, qmax)
                codes_t[j] = q.to(torch.uint8)
                e = (col - (q - z_j) * s_j) / hinv1[i, i]
                w1[i:].addr_(hinv1[i, i:], e, alpha=-1)
                err1[i] = e
                continue
            if dynamic:
                if j % gs == 0:
                    vals = w1[i : i + gs]
                    if vals.shape[0] < gs and i2 < cols:  # the group runs past this block
                        vals = torch.cat([vals, wt[i2 : j + gs]])
                    wts = group_cols.weights((1, vals.shape[0]), importance[j : j + vals.shape[0]])
                    col_scale = codec.fit_group_scales(group_cols.split(vals.t()), wts, shrink_grid)
                    _store_group(dyn_scale, col_scale, j // gs, -(-cols // gs))
            else:
                col_scale = _column_scale(static_scale, grouping, int(perm[j]) if perm is not None else j)
            col = w1[i]
            c = codec.encode(col.view(view), col_scale)
            codes_t[j] = c.reshape(rows)
            e = (col - codec.decode(c, col_scale).reshape(rows)) / hinv1[i, i]
            w1[i:].addr_(hinv1[i, i:], e, alpha=-1)
            err1[i] = e
        if i2 < cols:
            wt[i2:].addmm_(hinv[i1:i2, i2:].t(), err1, alpha=-1)
    codes = codes_t.t()

    g_idx = None
    if perm is not None:
        unpermuted = torch.empty_like(codes)
        unpermuted[:, perm] = codes
        codes = unpermuted
        if dynamic:
            g_idx = torch.empty(cols, dtype=torch.int32, device=codes.device)
            g_idx[perm] = (torch.arange(cols, device=codes.device) // gs).to(torch.int32)
    scale = dyn_scale if dynamic else static_scale
    assert scale is not None
    return codes, scale, g_idx, damp


def _int_columns(codec: Codec, scale: ScaleData | None, grouping: Grouping, perm: torch.Tensor | None,
                 cols: int) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """For the ``int`` codec with an integer (or implied) zero point and scales fixed before the
    column loop: each column's ``(scale, zero)`` as ``(cols, rows)`` float32 tensors in the loop's
    column order, and ``qmax``; None for any other codec (the loop then calls the codec)."""
    if scale is None or codec.name != "int" or grouping.granularity == "tensor":
        return None
    bits, symmetric = codec.bits, codec.symmetric  # type: ignore[attr-defined]
    if not symmetric and codec.zero_point != "integer":  # type: ignore[attr-defined]
        return None
    order = perm if perm is not None else torch.arange(cols, device=scale["scale"].device)
    group = order // grouping.group_size if grouping.granularity == "group" else torch.zeros_like(order)
    s = scale["scale"].to(torch.float32)[:, group].t().contiguous()
    if symmetric:
        z = torch.full_like(s, float(1 << (bits - 1)))
    else:
        z = scale["zero"].to(torch.float32)[:, group].t().contiguous()
    return s, z, (1 << bits) - 1


def _column_scale(scale: ScaleData | None, grouping: Grouping, column: int) -> ScaleData:
    """The scale data that covers input ``column`` (original order)."""
    assert scale is not None
    if grouping.granularity == "group":
        assert grouping.group_size is not None
        g = column // grouping.group_size
        return {k: v[:, g : g + 1] for k, v in scale.items()}
    return scale


def _store_group(out: dict[str, torch.Tensor], scale: ScaleData, g: int, n_groups: int) -> None:
    for k, v in scale.items():
        if k not in out:
            out[k] = torch.empty(v.shape[0], n_groups, dtype=v.dtype, device=v.device)
        out[k][:, g : g + 1] = v
