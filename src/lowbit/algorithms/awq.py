"""AWQ (Lin et al., 2023): activation-aware per-channel scaling, then a clipping search.

For each sub-step whose input is the output of a module that can absorb a per-channel scale
(the norm before q/k/v or gate/up, v_proj before o_proj, up_proj before down_proj; see
:class:`lowbit.models.Architecture`), AWQ searches ``s = mean|x|^a / mean|w|^(1-a)`` over ``grid``
exponents ``a`` in ``[0, 1)`` (and no scaling), keeping the one whose quantized linears
``Q(W diag(s)) diag(s)^-1`` give the smallest error on the concatenated outputs of the
sub-step's linears over all calibration tokens (computed from ``X^T X``). ``mean|w|`` is the
mean over output rows of ``|W|`` normalized by each group's maximum, as in the reference
implementation. The scale is then folded: ``W <- W diag(s)``
and the source's output divided by ``s`` (norm weight and bias, or the source linear's rows), so
the unquantized block computes the same function.

The clipping search then picks, per group, the shrink factor of the codec's range that minimizes
the group's share of the layer's output error, ``d^T H_g d`` with ``H_g`` the group's block of
``X^T X / n`` (the reference implementation evaluates the same quantity on sampled tokens).
Everything goes through the codec interface, so AWQ works with every codec.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from lowbit.algorithms.base import ClipSearch, LayerStats, StepContext
from lowbit.calibration.statistics import StatsRequest
from lowbit.codecs import Codec, QuantizedTensor
from lowbit.codecs.base import GroupHessian
from lowbit.errors import LowbitError
from lowbit.modules import linear_weight, set_linear_weight


class AWQ(ClipSearch):
    name: Literal["awq"] = "awq"
    grid: int = Field(20, ge=2, description="exponents tried for the activation-aware scale")
    clip_search: bool = Field(True, description="search each group's clipping after scaling")
    clip_steps: int = Field(20, ge=2, description="number of shrink factors tried, from clip_min to 1")

    @property
    def needs_calibration(self) -> bool:
        return True

    @property
    def transforms_block(self) -> bool:
        return True

    def stats_request(self) -> StatsRequest:
        return StatsRequest(hessian=self.clip_search)

    def transform_request(self) -> StatsRequest:
        return StatsRequest(hessian=True, means=True)

    def transform_step(self, ctx: StepContext) -> None:
        hessian = ctx.stats.hessian
        if ctx.source is None or hessian is None:
            return
        source = ctx.block.get_submodule(ctx.source)
        weights = [linear_weight(ctx.block.get_submodule(n))[0].to(torch.float32) for n in ctx.names]
        cols = weights[0].shape[1]
        if not _can_absorb(source, cols):
            return
        s = search_scale(weights, [ctx.codecs[n] for n in ctx.names], hessian.to(torch.float32), ctx.stats.mean_abs, self.grid)
        fold_scale(source, s, ctx.norm_plus_one, f"{ctx.prefix}.{ctx.source}")
        for n, w in zip(ctx.names, weights):
            set_linear_weight(ctx.block.get_submodule(n), w * s)
        ctx.stats.scale_columns(s)

    def quantize(self, weight: torch.Tensor, codec: Codec, stats: LayerStats | None = None) -> QuantizedTensor:
        if not self.clip_search or stats is None or stats.hessian is None:
            return codec.quantize(weight)
        w = codec.check_weight(weight)
        grouping = codec.grouping
        if grouping.granularity == "tensor":
            return codec.quantize(w, importance=stats.importance, shrink_grid=self.shrink_grid())
        groups = grouping.split(w)
        scale = codec.fit_group_scales(groups, GroupHessian(stats.hessian, grouping, w.shape[1]), self.shrink_grid())
        return codec.pack(grouping.merge(codec.encode(groups, scale), tuple(w.shape)), scale, tuple(w.shape))


def _can_absorb(source: nn.Module, cols: int) -> bool:
    """Whether ``source``'s output has ``cols`` channels and a weight that can take a scale."""
    w = getattr(source, "weight", None)
    if w is None or not isinstance(w, torch.Tensor):
        return False
    if isinstance(source, nn.Linear) or type(source).__name__ == "Conv1D":
        return linear_weight(source)[0].shape[0] == cols
    return w.dim() == 1 and w.shape[0] == cols


def mean_normalized_weight(weights: list[torch.Tensor], codecs: list[Codec]) -> torch.Tensor:
    """``(in,)``: mean over all output rows of ``|W|`` divided by its group's max."""
    parts = []
    for w, codec in zip(weights, codecs):
        g = codec.grouping
        if g.granularity == "tensor":
            g = type(g)("channel")
        groups = g.split(w.abs())
        normed = groups / groups.amax(dim=-1, keepdim=True).clamp(min=1e-12)
        parts.append(g.merge(normed, tuple(w.shape)))
    return torch.cat(parts).mean(0)


def search_scale(
    weights: list[torch.Tensor], codecs: list[Codec], hessian: torch.Tensor, x_mean: torch.Tensor, grid: int
) -> torch.Tensor:
    """The per-input-channel scale ``(in,)`` of the best exponent (module docstring). The error of
    a candidate is the sub-step's output error over all calibration tokens,
    ``sum((Q - W) H (Q - W)^T)`` with ``H = X^T X / n``: exact, and cheaper than re-running the
    tokens."""
    w_mean = mean_normalized_weight(weights, codecs)
    w_cat = torch.cat(weights)

    def error(s: torch.Tensor) -> float:
        d = torch.cat([c.fake_quantize(w * s) / s for w, c in zip(weights, codecs)]) - w_cat
        return float(((d @ hessian) * d).sum())

    best = torch.ones_like(x_mean)  # no scaling is always a candidate: AWQ never does worse than RTN here
    best_err = error(best)
    for k in range(grid):
        a = k / grid
        s = (x_mean.clamp(min=1e-8).pow(a) / w_mean.clamp(min=1e-8).pow(1 - a)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = error(s)
        if err < best_err:
            best_err, best = err, s
    return best


def fold_scale(source: nn.Module, s: torch.Tensor, norm_plus_one: bool, name: str) -> None:
    """Divide ``source``'s output channels by ``s`` exactly (a norm's weight and bias, or a
    linear's output rows and bias)."""
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise LowbitError(f"AWQ produced an invalid scale for {name}")
    if isinstance(source, nn.Linear) or type(source).__name__ == "Conv1D":
        w, bias = linear_weight(source)
        set_linear_weight(source, w.to(torch.float32) / s.unsqueeze(1))
    else:
        w = source.weight
        bias = getattr(source, "bias", None)
        if norm_plus_one:
            w.data = ((1 + w.data.to(torch.float32)) / s - 1).to(w.dtype)
        else:
            w.data = (w.data.to(torch.float32) / s).to(w.dtype)
    if bias is not None:
        bias.data = (bias.data.to(torch.float32) / s).to(bias.dtype)
