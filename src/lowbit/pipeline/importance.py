"""Importance matrices in the pipeline: collect one on the unquantized model (what
``llama-imatrix`` does), check a supplied one against a model and recipe, and gather the one a
quantization run collected.

Two collections differ: :func:`collect_importance` runs the float model, as llama.cpp does,
while the quantizing runner (``RTN(importance=True)``) measures each linear's input with the
earlier linears already quantized, so that each linear is weighted by the activations it will
actually see. Block 0's q/k/v inputs agree exactly; later inputs differ by the upstream
quantization error.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.calibration.samples import CalibrationSet
from lowbit.calibration.statistics import StatsRequest
from lowbit.errors import LowbitError
from lowbit.io.imatrix import ImportanceMatrix
from lowbit.models import Architecture, architecture_of
from lowbit.modules import linear_weight
from lowbit.pipeline.linears import LinearResult, supplied_importance, takes_importance
from lowbit.pipeline.passes import capture_block_inputs, collect_step_statistics, run_block
from lowbit.recipes import Recipe


def collect_importance(
    model: nn.Module,
    calibration: CalibrationSet,
    batch_size: int = 8,
    compute_dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> ImportanceMatrix:
    """Each decoder-block linear's mean ``x^2`` per input column on ``calibration``'s tokens,
    with the model unchanged (module docstring). ``model`` must be fully in memory."""
    arch = architecture_of(model)
    blocks = arch.block_list(model)
    imatrix = empty_importance(calibration)
    with torch.no_grad():
        inputs = capture_block_inputs(model, blocks[0], calibration.tokens, batch_size, compute_dtype)
        for i, block in enumerate(tqdm(blocks, desc="importance", unit="block", disable=not progress)):
            names = [n for step in arch.block_steps(block) for n in step]
            stats = collect_step_statistics(block, names, inputs, StatsRequest(means=True), compute_dtype)
            for n in names:
                st = stats[n]
                if st.n_tokens:  # an MoE expert no token was routed to has no statistics
                    imatrix.values[f"{arch.blocks}.{i}.{n}"] = st.mean_square  # type: ignore[assignment]
                    imatrix.counts[f"{arch.blocks}.{i}.{n}"] = st.n_tokens
            inputs = run_block(block, inputs, compute_dtype)
    return imatrix


def record_importance(imatrix: ImportanceMatrix, results: list[LinearResult]) -> None:
    """Add to ``imatrix`` the importance each linear of a quantization run was measured with."""
    for r in results:
        if r.importance is not None:
            imatrix.values[r.name] = r.importance.cpu()
            imatrix.counts[r.name] = r.tokens


def empty_importance(calibration: CalibrationSet) -> ImportanceMatrix:
    """An importance matrix with no entry yet, to be collected on ``calibration``."""
    n, length = calibration.tokens.shape
    return ImportanceMatrix({}, {}, [calibration.source], chunk_count=n, chunk_size=length)


def calibration_users(recipe: Recipe, importance: ImportanceMatrix | None) -> list[str]:
    """What in ``recipe`` needs calibration passes when ``importance`` is supplied (or not), as
    ``algorithm NAME`` / ``transform NAME`` / ``static ...``: a supplied importance matrix is all that RTN with
    importance needs; every transform measures the block's inputs."""
    supplied = importance is not None
    users = [f"algorithm {a.name}" for a in recipe.algorithms
             if a.needs_calibration and not (supplied and takes_importance(a))]
    static = [f"static input scales ({a.observer.name})" for a in recipe.all_activations if not a.dynamic]  # type: ignore[union-attr]
    static += [f"fixed outlier channels ({a.outlier_channels})" for a in recipe.all_activations if a.outlier_channels]
    return list(dict.fromkeys(users + [f"transform {t.name}" for t in recipe.transforms] + static + kv_calibration(recipe)))


def kv_calibration(recipe: Recipe) -> list[str]:
    """``static KV cache scales (OBSERVER)`` when the recipe's KV cache takes calibrated scales
    (measured by a forward pass of the quantized model, after the layer-wise work)."""
    kv = recipe.kv_cache
    if kv is None or not kv.static:
        return []
    names = [c.observer.name for c in (kv.keys, kv.values) if c.static]  # type: ignore[union-attr]
    return [f"static KV cache scales ({', '.join(dict.fromkeys(names))})"]


def check_importance(model: nn.Module, arch: Architecture, recipe: Recipe, importance: ImportanceMatrix) -> None:
    """LowbitError, before anything is quantized, when no algorithm of ``recipe`` takes a supplied
    importance matrix, or when ``importance`` lacks a linear that one will quantize or has the
    wrong width for it (MoE experts are checked when they are reached)."""
    if not any(takes_importance(a) for a in recipe.algorithms):
        raise LowbitError(f"an importance matrix was given, but {recipe.label()} does not use one "
                          "(use a gguf-*-imatrix preset, or algorithm rtn with importance: true)")
    for full, block, n in arch.dense_block_linears(model):
        plan = recipe.assignment(full)
        if plan is None or not takes_importance(plan[1]):
            continue
        v = supplied_importance(importance.values, full)
        try:
            width = linear_weight(block.get_submodule(n))[0].shape[1]
        except AttributeError:
            raise LowbitError(f"{arch.family}: block has no module {n}") from None
        if tuple(v.shape) != (width,):
            raise LowbitError(f"the importance matrix entry for {full} has shape {tuple(v.shape)}, "
                              f"but the linear has {width} inputs")
