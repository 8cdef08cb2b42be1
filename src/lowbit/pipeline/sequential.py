"""The sequential (layer-wise) runner for recipes that need calibration data: one decoder block
at a time.

1. The caller captures what block 0 receives (:func:`lowbit.pipeline.passes.capture_block_inputs`).
2. For each block (:func:`quantize_block_sequential`), under its :class:`~lowbit.pipeline.plan.BlockPlan`:
   the transforms of its sub-steps run first, from one pass over the unquantized block; then for
   each sub-step (q/k/v, then o, then gate/up, then down): run the block on the calibration
   inputs with the sub-steps already quantized, stopping as soon as the sub-step's linears have
   seen their input; collect the statistics the algorithms ask for (one ``X^T X`` product per
   batch and per distinct input) and quantize the sub-step's linears
   (:mod:`lowbit.pipeline.linears`). Then run the quantized block once more to produce the next
   block's inputs. Once a module's output depends only on quantized weights (attention after
   o_proj, the MLP after down_proj) later passes replay it from its last linear's recorded
   inputs (:mod:`lowbit.pipeline.replay`).

Forward passes may run in bfloat16 (``compute_dtype``) through CPU autocast (AMX); statistics
are always accumulated in float32 or wider, and weights are quantized from their float32 values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.calibration.observers import ObserverState, WithoutChannels
from lowbit.calibration.statistics import InputStatistics, StatsRequest
from lowbit.codecs.activations import ActivationQuantizer
from lowbit.errors import LowbitError
from lowbit.models import Architecture
from lowbit.modules import QuantLinear
from lowbit.modules.experts import UnfusedExperts
from lowbit.pipeline.linears import (
    LinearResult,
    merge_requests,
    quantize_linears,
    shared_runs,
    step_requantizer,
    supplied_importance,
    takes_importance,
)
from lowbit.pipeline.passes import collect_step_statistics, run_block
from lowbit.pipeline.plan import BlockPlan, StepPlan
from lowbit.pipeline.replay import LinearReplay, plan_replays
from lowbit.pipeline.resume import BlockInputs
from lowbit.recipes import Recipe
from lowbit.transforms import StepContext


@dataclass
class SequentialStats:
    linears: list[LinearResult] = field(default_factory=list)
    resumed_blocks: int = 0
    calibration_tokens: int = 0
    forward_seconds: float = 0.0  # calibration passes, statistics included

    def summary(self) -> str:
        if not self.linears:
            return "no linear quantized"
        by_kind: dict[str, list[float]] = {}
        for r in self.linears:
            by_kind.setdefault(r.name.rsplit(".", 1)[-1], []).append(r.error)
        parts = [f"{k} {sum(v) / len(v):.4f}" for k, v in by_kind.items()]
        notes = [f"{r.name}: {r.note}" for r in self.linears if r.note]
        text = "mean relative output error per linear: " + ", ".join(parts)
        text += (f"\n{sum(r.seconds for r in self.linears):.1f}s choosing codes, {self.forward_seconds:.1f}s in "
                 f"calibration passes over {self.calibration_tokens} tokens")
        if notes:
            text += "\n" + "\n".join(notes)
        return text


def quantize_block_sequential(
    block: nn.Module,
    plan: BlockPlan,
    arch: Architecture,
    recipe: Recipe,
    inputs: BlockInputs,
    compute_dtype: torch.dtype,
    importance: Mapping[str, torch.Tensor] | None = None,
) -> tuple[list[LinearResult], BlockInputs]:
    """Quantize the linears ``plan`` selects in one block, sub-step by sub-step (module
    docstring); returns the per-linear results and the quantized block's outputs (the next
    block's inputs). ``importance``: supplied per-linear importances (full names) for the
    algorithms that take one.

    When sub-steps are transformed (AWQ's scaling, SmoothQuant), one pass over the unquantized
    block first gives every one of them its input statistics and the transforms are applied, all
    before any linear is quantized (a transform may rescale a linear of an earlier sub-step)."""
    prefix = plan.prefix
    if plan.transforming:
        apply_transforms(block, plan, arch, inputs, compute_dtype)
    experts = block.get_submodule(arch.experts) if arch.experts else None
    if isinstance(experts, UnfusedExperts):
        experts.all_experts = recipe.calibration_config().all_experts
    results: list[LinearResult] = []
    replays = plan_replays(block, arch, plan.block_steps, plan.quantized)
    try:
        for step in plan.steps:
            names, assigned = step.names, step.assignments
            recording = [r for r in replays if r.linear_name in names]
            for r in recording:
                r.record()  # before the statistics hooks, which stop the pass at this linear
            request = merge_requests(a.stats_request() for _, a in assigned.values())
            quantizers = step.input_quantizers()
            stats, observers, channels = observe_step(block, step, quantizers, inputs, request, compute_dtype, prefix,
                                                      recording)
            for run in shared_runs(names, assigned, stats, importance is not None):
                codec, algorithm = assigned[run[0]]
                full = [f"{prefix}.{n}" for n in run]
                given = None
                if importance is not None and takes_importance(algorithm):
                    given = supplied_importance(importance, full[0])
                done = quantize_linears([block.get_submodule(n) for n in run], full, codec, algorithm, stats[run[0]], given)
                for n, (q, result) in zip(run, done):
                    set_input_quantization(q, quantizers[n], observers.get(n), result, channels.get(n))
                    block.set_submodule(n, q)
                    results.append(result)
            for r in recording:
                r.start()
        if isinstance(experts, UnfusedExperts):
            experts.all_experts = False  # same outputs, less work
        next_inputs = run_block(block, inputs, compute_dtype)
    finally:
        for r in replays:
            r.close()
    return results, next_inputs


def observe_step(block: nn.Module, step: StepPlan, quantizers: dict[str, ActivationQuantizer | None],
                 inputs: BlockInputs, request: StatsRequest, compute_dtype: torch.dtype, prefix: str,
                 recording: list[LinearReplay],
                 ) -> tuple[dict[str, InputStatistics], dict[str, ObserverState], dict[str, torch.Tensor]]:
    """One sub-step's calibration pass: the statistics ``request`` asks of its linears' inputs, the
    observers of their static input scales and, for ``quantizers`` (per linear) with fixed outlier channels, the
    channels (the largest ``|x|``); static scales of such inputs then observe the other features in
    a second pass (the channels must be known first; ``recording`` replays record the first only)."""
    names = step.names
    kept = [n for n in names if quantizers[n] is not None and quantizers[n].outlier_channels]  # type: ignore[union-attr]
    if kept:
        request = request.merge(StatsRequest(absmax=True))
    observers = {n: a.observer.start(a.granularity == "channel", quantizers[n])  # type: ignore[union-attr, arg-type]
                 for n, a in step.static.items()}
    stats = collect_step_statistics(block, names, inputs, request, compute_dtype,
                                    {n: o for n, o in observers.items() if n not in kept})
    channels = {n: choose_channels(quantizers[n], stats[n], f"{prefix}.{n}") for n in kept}  # type: ignore[arg-type]
    second = [n for n in kept if n in observers]
    if second:
        for r in recording:
            r.stop_recording()
        observers.update({n: WithoutChannels(observers[n], channels[n], stats[n].n_features) for n in second})
        collect_step_statistics(block, second, inputs, StatsRequest(), compute_dtype, observers)
    return stats, observers, channels


def choose_channels(quantizer: ActivationQuantizer, stats: InputStatistics, name: str) -> torch.Tensor:
    """The input features a linear keeps in 16-bit (``quantizer.outlier_channels`` of them): those
    with the largest ``|x|`` in ``stats``."""
    assert stats.abs_max is not None
    try:
        return quantizer.choose_channels(stats.abs_max.cpu())
    except ValueError as e:
        raise LowbitError(f"{name}: {e}") from None


def set_input_quantization(q: QuantLinear, quantizer: ActivationQuantizer | None, observer: ObserverState | None,
                           result: LinearResult, channels: torch.Tensor | None = None) -> None:
    """Give a freshly quantized linear its input quantization: dynamic, or static with the scales
    its observer's range gives (dynamic, with a note, when no calibration token reached it), and
    the input features it keeps in 16-bit (``channels``), if any."""
    if quantizer is None:
        return
    scale = None
    if observer is not None:
        if observer.n:
            scale = quantizer.from_range(*observer.range())
        else:
            result.note = (result.note + "; " if result.note else "") + "no calibration token reached it: dynamic input scales"
    q.set_input_quant(quantizer, scale, channels)


def apply_transforms(block: nn.Module, plan: BlockPlan, arch: Architecture, inputs: BlockInputs,
                     compute_dtype: torch.dtype) -> None:
    """Every transforming sub-step's transforms, in order, from one statistics pass over the
    unquantized block (a sub-step whose linears do not read one input tensor, MoE experts, is
    left alone)."""
    steps = plan.transforming
    names = [n for s in steps for n in s.names]
    request = merge_requests(t.request() for s in steps for t in s.transforms)
    first = collect_step_statistics(block, names, inputs, request, compute_dtype)
    for step in steps:
        if len({id(first[n]) for n in step.names}) != 1:
            continue
        source = arch.scale_sources[step.index] if arch.scale_sources else None
        stats = first[step.names[0]]
        ctx = StepContext(block, plan.prefix, step.names, {n: c for n, (c, _) in step.assignments.items()},
                          stats, source, arch.norm_plus_one, step.input_quantizers(),
                          step_requantizer(step.names, step.assignments, stats))
        for transform in step.transforms:
            transform.apply(ctx)


@contextlib.contextmanager
def progress_bar(total: int, desc: str, enabled: bool, initial: int) -> Iterator[tqdm]:
    bar = tqdm(total=total, desc=desc, unit="block", disable=not enabled, initial=initial)
    try:
        yield bar
    finally:
        bar.close()

