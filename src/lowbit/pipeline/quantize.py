"""The layer-wise runner: walk the decoder blocks and let the recipe's algorithm quantize
each selected linear, step by step in execution order.

Calibration-based algorithms (GPTQ, AWQ, ...) will extend the loop here: capture the inputs of
block 0, then per block collect statistics, quantize, and run the quantized block to produce
the next block's inputs. RTN needs no statistics, so each block is quantized in place.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.models import Architecture, architecture_of
from lowbit.modules import QuantLinear, dense_tensors
from lowbit.recipes import Recipe


@dataclass
class QuantizationReport:
    recipe: Recipe
    seconds: float
    quantized: list[str] = field(default_factory=list)  # full module names
    skipped: list[str] = field(default_factory=list)


def check_finite(model: nn.Module) -> None:
    """LowbitError naming the first parameter that holds NaN or Inf."""
    for name, p in model.named_parameters():
        if p.dtype.is_floating_point and not torch.isfinite(p).all():
            raise LowbitError(f"weight {name} contains NaN or Inf")


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight ``(out, in)`` and bias of an ``nn.Linear`` or transformers ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.weight.detach(), module.bias
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: weight (in, out)
        return module.weight.detach().t(), module.bias
    raise LowbitError(f"cannot quantize a {type(module).__name__}: not a linear layer")


def quantize_model(model: nn.Module, recipe: Recipe, progress: bool = True) -> QuantizationReport:
    """Quantize ``model`` in place per ``recipe``; returns what was done and how long it took."""
    arch = architecture_of(model)
    if recipe.algorithm.needs_calibration:
        raise LowbitError(f"algorithm {recipe.algorithm.name!r} needs calibration, which this runner cannot do yet")
    check_finite(model)
    report = QuantizationReport(recipe=recipe, seconds=0.0)
    t0 = time.perf_counter()
    blocks = arch.block_list(model)
    with torch.no_grad():
        for i, block in enumerate(tqdm(blocks, desc=f"quantize {recipe.label()}", unit="block", disable=not progress)):
            _quantize_block(block, f"{arch.blocks}.{i}", arch, recipe, report)
        round_dense_tensors(model, getattr(torch, recipe.dense_dtype))
    model.lowbit_recipe = recipe
    report.seconds = time.perf_counter() - t0
    return report


def _quantize_block(block: nn.Module, prefix: str, arch: Architecture, recipe: Recipe, report: QuantizationReport) -> None:
    for step in arch.steps:
        for name in step:
            full = f"{prefix}.{name}"
            if not recipe.selects(full):
                report.skipped.append(full)
                continue
            try:
                module = block.get_submodule(name)
            except AttributeError:
                raise LowbitError(f"{arch.family}: block has no module {name}") from None
            weight, bias = linear_weight(module)
            try:
                qt = recipe.algorithm.quantize(weight, recipe.codec, None)
            except ValueError as e:
                raise LowbitError(f"cannot quantize {full}: {e}") from None
            block.set_submodule(name, QuantLinear(qt, bias))
            report.quantized.append(full)


def round_dense_tensors(model: nn.Module, dtype: torch.dtype) -> None:
    """Round every floating parameter and persistent buffer (quantized parts aside) to the values
    that ``dtype`` storage keeps, so the in-memory model equals the saved-and-reloaded one."""
    for _, _, _, t in dense_tensors(model):
        if t.dtype.is_floating_point:
            t.data = t.data.to(dtype).to(t.dtype)
