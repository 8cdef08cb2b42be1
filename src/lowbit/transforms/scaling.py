"""Per-channel scales folded exactly into a block: ``W <- W diag(s)`` for the linears that read an
input, and ``1 / s`` into the module that produces it (a norm's weight and bias, or a linear's
output rows and bias), so the unquantized block computes the same function. Shared by every
scaling transform (AWQ, SmoothQuant)."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.modules import linear_weight, set_linear_weight
from lowbit.transforms.base import StepContext


def can_absorb(source: nn.Module, cols: int) -> bool:
    """Whether ``source``'s output has ``cols`` channels and a weight that can take a scale."""
    w = getattr(source, "weight", None)
    if w is None or not isinstance(w, torch.Tensor):
        return False
    if isinstance(source, nn.Linear) or type(source).__name__ == "Conv1D":
        return linear_weight(source)[0].shape[0] == cols
    return w.dim() == 1 and w.shape[0] == cols


def step_weights(ctx: StepContext) -> list[torch.Tensor]:
    """The sub-step's weights ``(out_i, in)`` in float32."""
    return [linear_weight(ctx.block.get_submodule(n))[0].to(torch.float32) for n in ctx.names]


def scalable_source(ctx: StepContext) -> nn.Module | None:
    """The module that can absorb a scale of this sub-step's input, or None when there is none."""
    if ctx.source is None:
        return None
    source = ctx.block.get_submodule(ctx.source)
    cols = linear_weight(ctx.block.get_submodule(ctx.names[0]))[0].shape[1]
    return source if can_absorb(source, cols) else None


def fold_scale(source: nn.Module, s: torch.Tensor, norm_plus_one: bool, name: str) -> None:
    """Divide ``source``'s output channels by ``s`` exactly (a norm's weight and bias, or a
    linear's output rows and bias)."""
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise LowbitError(f"invalid scale for {name}: every factor must be finite and positive")
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


def apply_scale(ctx: StepContext, source: nn.Module, weights: list[torch.Tensor], s: torch.Tensor) -> None:
    """Fold ``s`` ``(in,)``: the source's output divided by it, each linear's weight (``weights``,
    their float32 values) multiplied by it, the input statistics made those of the new input."""
    fold_scale(source, s, ctx.norm_plus_one, f"{ctx.prefix}.{ctx.source}")
    for n, w in zip(ctx.names, weights):
        set_linear_weight(ctx.block.get_submodule(n), w * s)
    ctx.stats.scale_columns(s)
