"""SmoothQuant (Xiao et al., 2023): move the activations' outlier channels into the weights.

For each sub-step whose input comes from a module that can absorb a per-channel scale (the norm
before q/k/v or gate/up, v_proj before o_proj, up_proj before down_proj; Gemma's ``1 + w`` norms
included), ``s_j = max|X_j|^a / max|W_j|^(1 - a)`` per input channel ``j`` (``max|W_j|`` over the
rows of every linear that reads the input), folded exactly: ``W <- W diag(s)`` and the source's
output divided by ``s`` (:mod:`lowbit.transforms.scaling`). The input's large channels shrink by
``s``, the weights' columns grow by it: per-token int8 activations then lose less, at a small cost
to the weights, which per-channel int8 absorbs easily.

``alpha`` is fixed (0.5, the paper's default) or, with ``alpha: null``, searched per sub-step over
``alpha_grid + 1`` values in ``[0, 1]``: the one whose quantized sub-step (the recipe's weight
codec after scaling, its activation codec on the scaled input) gives the smallest output error on
``rows`` calibration input rows sampled evenly from every batch. A sub-step with no module to fold
into (post-LN OPT's attention and fc1, fused or grouped-query projections, MoE experts that do
not share one input) is left as it is and reported by the pipeline.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from lowbit.calibration.statistics import StatsRequest
from lowbit.transforms.base import StepContext, Transform
from lowbit.transforms.scaling import apply_scale, scalable_source, step_weights


class SmoothQuant(Transform):
    name: Literal["smoothquant"] = "smoothquant"
    alpha: float | None = Field(0.5, ge=0, le=1, description="migration strength a; null: searched per sub-step")
    alpha_grid: int = Field(20, ge=1, description="with alpha null: a tried at 0, 1/grid, ..., 1")
    rows: int = Field(512, ge=16, description="with alpha null: calibration input rows the search measures")

    def request(self) -> StatsRequest:
        return StatsRequest(absmax=True, input_rows=self.rows if self.alpha is None else 0)

    def apply(self, ctx: StepContext) -> bool:
        source = scalable_source(ctx)
        x_max = ctx.stats.abs_max
        if source is None or x_max is None:
            return False
        weights = step_weights(ctx)
        w_max = torch.cat(weights).abs().amax(0)
        alpha = self.alpha if self.alpha is not None else self._search(ctx, weights, x_max, w_max)
        apply_scale(ctx, source, weights, smoothing_scale(x_max, w_max, alpha))
        return True

    def _search(self, ctx: StepContext, weights: list[torch.Tensor], x_max: torch.Tensor, w_max: torch.Tensor) -> float:
        rows = ctx.stats.rows
        if rows is None:
            return 0.5
        reference = rows @ torch.cat(weights).t()
        best, best_err = 0.5, float("inf")
        for k in range(self.alpha_grid + 1):
            a = k / self.alpha_grid
            s = smoothing_scale(x_max, w_max, a)
            out = []
            for name, w in zip(ctx.names, weights):
                act = ctx.activations.get(name)
                x = rows / s if act is None else act.fake_quantize(rows / s)
                out.append(x @ ctx.codecs[name].fake_quantize(w * s).t())
            err = float((torch.cat(out, dim=1) - reference).square().sum())
            if err < best_err:
                best, best_err = a, err
        return best


def smoothing_scale(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = max|X|^a / max|W|^(1-a)`` ``(in,)``; 1 for a channel that never saw a non-zero input
    or has an all-zero weight column (nothing to migrate), and never below 1e-5."""
    x, w = x_max.to(torch.float32), w_max.to(torch.float32)
    s = x.clamp(min=1e-5).pow(alpha) / w.clamp(min=1e-5).pow(1 - alpha)
    return torch.where((x > 0) & (w > 0), s.clamp(min=1e-5), torch.ones_like(s))
