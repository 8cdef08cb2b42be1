"""AWQ's scaling (Lin et al., 2023): per sub-step, the activation-aware scale
``s = mean|x|^a / mean|w|^(1-a)`` over ``grid`` exponents ``a`` in ``[0, 1)`` (and no scaling), keeping
the one whose quantized linears ``Q(W diag(s)) diag(s)^-1`` give the smallest error on the
concatenated outputs of the sub-step's linears over all calibration tokens (computed from
``X^T X``). ``mean|w|`` is the mean over output rows of ``|W|`` normalized by each group's
maximum, as in the reference implementation. The scale is then folded
(:mod:`lowbit.transforms.scaling`). Everything goes through the codec interface, so it works
with every codec. The ``awq`` algorithm is this transform followed by AWQ's clipping search; a
recipe may also name it before another algorithm (``transforms: [awq]`` with GPTQ). There AWQ's
RTN score picks a scale for codes GPTQ will not choose; ``score: algorithm`` scores each candidate
by the codes the step's algorithm chooses on the scaled weights for the scaled input's Hessian
``H / (s s^T)`` (one GPTQ run per candidate), so the no-scaling candidate is the algorithm alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field

from lowbit.calibration.statistics import StatsRequest
from lowbit.codecs import Codec
from lowbit.transforms.base import StepContext, Transform
from lowbit.transforms.scaling import apply_scale, scalable_source, step_weights


class AWQScale(Transform):
    name: Literal["awq"] = "awq"
    grid: int = Field(20, ge=2, description="exponents tried for the activation-aware scale")
    score: Literal["rtn", "algorithm"] = Field(
        "rtn", description="score each candidate by RTN codes (AWQ's search) or by the codes the sub-step's algorithm "
        "chooses (GPTQ after AWQ: one GPTQ run per candidate)")

    def request(self) -> StatsRequest:
        return StatsRequest(hessian=True, means=True)

    def apply(self, ctx: StepContext) -> bool:
        hessian = ctx.stats.hessian
        source = scalable_source(ctx)
        if source is None or hessian is None:
            return False
        weights = step_weights(ctx)
        codecs = [ctx.codecs[n] for n in ctx.names]
        h = hessian.to(torch.float32)
        quantize = None
        if self.score == "algorithm" and ctx.requantize is not None:
            requantize = ctx.requantize

            def quantize(scaled: list[torch.Tensor], s: torch.Tensor) -> list[torch.Tensor] | None:
                return requantize(scaled, h / torch.outer(s, s))
        s = search_scale(weights, codecs, h, ctx.stats.mean_abs, self.grid, quantize)
        apply_scale(ctx, source, weights, s)
        return True


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
    weights: list[torch.Tensor], codecs: list[Codec], hessian: torch.Tensor, x_mean: torch.Tensor, grid: int,
    quantize: Callable[[list[torch.Tensor], torch.Tensor], list[torch.Tensor] | None] | None = None,
) -> torch.Tensor:
    """The per-input-channel scale ``(in,)`` of the best exponent (module docstring). The error of
    a candidate is the sub-step's output error over all calibration tokens,
    ``sum((Q - W) H (Q - W)^T)`` with ``H = X^T X / n``: exact, and cheaper than re-running the
    tokens. ``quantize(scaled weights, s)``: the values chosen for ``W diag(s)`` (None: the
    candidate cannot be quantized); default each codec's rounding to nearest."""
    w_mean = mean_normalized_weight(weights, codecs)
    w_cat = torch.cat(weights)
    if quantize is None:
        def quantize(scaled: list[torch.Tensor], s: torch.Tensor) -> list[torch.Tensor] | None:
            return [c.fake_quantize(w) for w, c in zip(scaled, codecs)]

    def error(s: torch.Tensor) -> float:
        chosen = quantize([w * s for w in weights], s)
        if chosen is None:
            return float("inf")
        d = torch.cat([q / s for q in chosen]) - w_cat
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
