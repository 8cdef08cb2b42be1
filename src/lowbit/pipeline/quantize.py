"""The layer-wise runner: walk the decoder blocks and let the recipe's algorithms quantize
each selected linear, step by step in execution order.

Algorithms that need calibration (GPTQ, AWQ, RTN with importance) go through
:mod:`lowbit.pipeline.sequential`; plain RTN needs no statistics, nor does RTN with importance
when an importance matrix is supplied, so each block is quantized in place (loaded from disk
first when the model is lazy).
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms import LayerStats
from lowbit.calibration.samples import CalibrationSet
from lowbit.errors import LowbitError
from lowbit.io.gguf_mixes import resolve_gguf_mix
from lowbit.io.imatrix import ImportanceMatrix
from lowbit.models import Architecture, architecture_of, check_context
from lowbit.models.lazy import LazyWeights
from lowbit.modules import QuantLinear, dense_tensors, linear_weight, quantize_embeddings
from lowbit.modules.kv_cache import set_kv_scales
from lowbit.pipeline.importance import (calibration_users, check_importance, empty_importance, kv_calibration,
                                        record_importance)
from lowbit.pipeline.kv_scales import calibrate_kv_scales
from lowbit.pipeline.resume import ResumeState
from lowbit.pipeline.linears import release_dense_weights, supplied_importance, takes_importance
from lowbit.pipeline.passes import capture_block_inputs, to_device
from lowbit.pipeline.plan import BlockPlan, check_transforms, plan_block
from lowbit.pipeline.sequential import SequentialStats, progress_bar, quantize_block_sequential
from lowbit.recipes import Recipe


@dataclass
class QuantizationReport:
    recipe: Recipe
    seconds: float
    quantized: list[str] = field(default_factory=list)  # full module names
    skipped: list[str] = field(default_factory=list)
    sequential: SequentialStats | None = None  # per-linear errors of a calibrated run
    # mean x^2 per input column of the linears whose statistics a calibrated run collected (as
    # each saw its input: earlier linears quantized); blocks restored by a resume are absent
    importance: ImportanceMatrix | None = None
    untransformed: list[str] = field(default_factory=list)  # sub-steps of every block the transforms leave alone, why


def check_finite(model: nn.Module, prefix: str = "") -> None:
    """LowbitError naming the first parameter that holds NaN or Inf (``prefix``: the module's
    full name, to name the parameter in full)."""
    for name, p in model.named_parameters():
        if p.dtype.is_floating_point and not torch.isfinite(p).all():
            raise LowbitError(f"weight {prefix + '.' if prefix else ''}{name} contains NaN or Inf")


def check_selection(model: nn.Module, arch: Architecture, recipe: Recipe, warn: bool = True) -> list[str]:
    """Full names of the decoder-block linears ``recipe`` quantizes in ``model``; LowbitError
    when it quantizes none (nothing to do; ``targets: []`` says so by intent), and with ``warn`` a warning for each ``targets``/
    ``ignore`` pattern or ``rules`` entry that matches no linear at all (a typo: what was meant
    to stay dense is quantized, or a rule never applies)."""
    from lowbit.recipes.recipe import matches

    names = [f"{arch.blocks}.{i}.{n}" for i, block in enumerate(arch.block_list(model))
             for step in arch.block_steps(block) for n in step]
    chosen = [n for n in names if recipe.assignment(n) is not None]
    if not recipe.targets:  # a dense file by intent (the gguf-f16 ... presets)
        return chosen
    if not chosen:
        raise LowbitError(f"{recipe.label()} quantizes none of the model's {len(names)} linears (targets "
                          f"{recipe.targets}, ignore {recipe.ignore}): nothing to do")
    for field_name, patterns in (("targets", recipe.targets), ("ignore", recipe.ignore),
                                 ("rules", [r.match for r in recipe.rules])) if warn else ():
        for i, p in enumerate(patterns):
            if not any(matches(p, n) for n in names):
                warnings.warn(f"{recipe.label()}: {field_name}[{i}] {p!r} matches no linear of the model "
                              f"(they are named like {names[0]})", stacklevel=3)
    return chosen


MIN_OBSERVED_TOKENS = 64  # calibration tokens below which a static input range means little


def check_observed_tokens(recipe: Recipe, calibration: CalibrationSet, width: int) -> None:
    """LowbitError, before any work, when static input scales would rest on too little calibration
    data: fewer than MIN_OBSERVED_TOKENS tokens, or for a percentile ``q`` of a per-tensor input
    of ``width`` features (the narrowest quantized linear's) fewer than ``100 / (100 - q)`` values."""
    tokens = calibration.n_tokens
    for act in recipe.all_activations:
        if act.dynamic:
            continue
        q = getattr(act.observer, "q", None)
        values = math.ceil(100 / (100 - q)) if q is not None and q < 100 else 0
        need = max(MIN_OBSERVED_TOKENS, math.ceil(values / width))
        if tokens < need:
            what = f"{act.observer.name}{'' if q is None else f' {q:g}'}"  # type: ignore[union-attr]
            raise LowbitError(f"static input scales ({what}) from {tokens} calibration tokens: at least {need} are "
                              "needed (raise --calib-samples or --calib-seq-len)")


def check_outlier_channels(model: nn.Module, arch: Architecture, names: list[str], recipe: Recipe) -> None:
    """LowbitError, before any work, naming the first linear of ``names`` (full names) whose input
    features would all be kept in 16-bit by the recipe's ``outlier_channels``."""
    for name in names:
        act = recipe.activations_for(name)
        if act is None or act.outlier_channels is None:
            continue
        try:
            module = model.get_submodule(name)
        except AttributeError:  # a fused MoE expert's linear: checked when its block is reached
            continue
        width = int(linear_weight(module)[0].shape[1])
        if act.outlier_channels >= width:
            raise LowbitError(f"{name}: outlier_channels {act.outlier_channels} keeps all of its {width} input features "
                              "in 16-bit (none left to quantize)")


def planned_bytes(model: nn.Module, recipe: Recipe) -> int:
    """About how many bytes ``model`` takes once quantized by ``recipe`` (resolved against it, see
    :func:`lowbit.io.gguf_mixes.resolve_gguf_mix`): each selected linear at its codec's exact
    size, every other stored tensor dense in the recipe's ``dense_dtype``, the token embedding
    and LM head at theirs. Works on a model whose parameters are on ``meta``."""
    dense = torch.empty((), dtype=getattr(torch, recipe.dense_dtype)).element_size()
    arch = architecture_of(model)
    linears = {f"{arch.blocks}.{i}.{n}" for i, block in enumerate(arch.block_list(model))
               for step in arch.block_steps(block) for n in step}
    tables = {id(model.get_input_embeddings()): recipe.embedding}
    head = model.get_output_embeddings()
    if head is not None and id(head) not in tables:
        tables[id(head)] = recipe.lm_head
    total = 0
    for mod_name, module, name, t in dense_tensors(model):
        plan = recipe.assignment(mod_name) if mod_name in linears and name == "weight" else None
        codec = plan[0] if plan is not None else tables.get(id(module)) if name == "weight" else None
        if codec is not None:
            weight, _ = linear_weight(module) if plan is not None else (t, None)
            total += codec.nbytes((int(weight.shape[0]), int(weight.shape[1])))
        else:
            total += t.numel() * (dense if t.dtype.is_floating_point else t.element_size())
    return total


def quantize_model(
    model: nn.Module,
    recipe: Recipe,
    progress: bool = True,
    calibration: CalibrationSet | None = None,
    weights: LazyWeights | None = None,
    resume: ResumeState | None = None,
    compute_dtype: torch.dtype = torch.float32,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    importance: ImportanceMatrix | None = None,
) -> QuantizationReport:
    """Quantize ``model`` in place per ``recipe``; returns what was done and how long it took.

    Algorithms that need calibration run through the sequential runner on ``calibration``'s
    tokens (forward passes in ``compute_dtype``, ``batch_size`` samples at a time: by default 8 on
    the CPU, 32 on a GPU, where smaller batches leave it waiting on Python). With
    ``weights`` the decoder blocks are on ``meta`` and are loaded from disk one at a time. With
    ``resume`` finished blocks are saved as they complete, and an earlier interrupted run with
    the same fingerprint is continued. With ``device`` (e.g. ``"cuda"``) the calibration
    activations live there and each block is moved there for its passes and its quantization,
    then back to the CPU; by default everything runs where the model is (the CPU). With
    ``importance`` (HF module names, e.g. from :func:`lowbit.io.imatrix.read_imatrix`) RTN with
    importance uses it instead of collecting one, and needs no calibration data; a linear it
    lacks is a LowbitError, raised before anything is quantized. A recipe naming a GGUF type mix
    is first resolved against the model (:func:`lowbit.io.gguf_mixes.resolve_gguf_mix`; the
    report and ``model.lowbit_recipe`` hold the resolved recipe), and its token embedding / LM
    head codecs are applied last.
    """
    arch = architecture_of(model)
    recipe = resolve_gguf_mix(recipe, model)
    calibrating = calibration_users(recipe, importance)
    kv_calibrating = kv_calibration(recipe)
    needs = bool(set(calibrating) - set(kv_calibrating))  # the layer-wise passes
    if calibrating and calibration is None:
        raise LowbitError(f"{', '.join(calibrating)} {'needs' if len(calibrating) == 1 else 'need'} calibration data")
    if calibrating:
        check_context(model, int(calibration.tokens.shape[1]), "calibration seq_len")  # type: ignore[union-attr]
    if recipe.kv_cache is not None:
        recipe.kv_cache.check_model(model)
    check_outlier_channels(model, arch, check_selection(model, arch, recipe), recipe)
    untransformed = check_transforms(model, arch, recipe)
    if calibration is not None and needs:
        widths = [linear_weight(block.get_submodule(n))[0].shape[1] for block in arch.block_list(model)[:1]
                  for step in arch.block_steps(block) for n in step if recipe.assignment(f"{arch.blocks}.0.{n}")]
        check_observed_tokens(recipe, calibration, min(widths, default=1))
    if importance is not None:
        check_importance(model, arch, recipe, importance)
    supplied = importance.values if importance is not None else None
    if weights is None:
        check_finite(model)
    report = QuantizationReport(recipe=recipe, seconds=0.0, untransformed=untransformed)
    t0 = time.perf_counter()
    blocks = arch.block_list(model)
    with torch.no_grad():
        if needs:
            assert calibration is not None
            dev = _compute_device(device)
            if batch_size is None:
                batch_size = 32 if dev is not None and dev.type == "cuda" else 8
            _run_sequential(model, arch, blocks, recipe, calibration, weights, resume, compute_dtype, batch_size, report,
                            progress, dev, supplied)
        else:
            for i, block in enumerate(tqdm(blocks, desc=f"quantize {recipe.label()}", unit="block", disable=not progress)):
                prefix = f"{arch.blocks}.{i}"
                if weights is not None:
                    weights.materialize(block, prefix)
                    check_finite(block, prefix)
                _quantize_block(block, plan_block(block, prefix, arch, recipe), report, supplied)
        if recipe.embedding is not None or recipe.lm_head is not None:
            quantize_embeddings(model, recipe.embedding, recipe.lm_head)
        round_dense_tensors(model, getattr(torch, recipe.dense_dtype))
        if kv_calibrating:
            assert calibration is not None and recipe.kv_cache is not None
            scales = calibrate_kv_scales(model, recipe.kv_cache, calibration.tokens, batch_size or 8, progress)
            set_kv_scales(model, scales)
    model.lowbit_recipe = recipe
    report.seconds = time.perf_counter() - t0
    return report


def _run_sequential(
    model: nn.Module,
    arch: Architecture,
    blocks: nn.ModuleList,
    recipe: Recipe,
    calibration: CalibrationSet,
    weights: LazyWeights | None,
    resume: ResumeState | None,
    compute_dtype: torch.dtype,
    batch_size: int,
    report: QuantizationReport,
    progress: bool,
    device: torch.device | None,
    importance: Mapping[str, torch.Tensor] | None,
) -> None:
    seq = report.sequential = SequentialStats(calibration_tokens=calibration.n_tokens)
    report.importance = empty_importance(calibration)
    done = resume.finished_blocks() if resume is not None else 0
    for i in range(done):
        resume.restore_block(blocks[i], i, recipe, f"{arch.blocks}.{i}")  # type: ignore[union-attr]
        # restored linears count among the quantized ones: the report speaks of the whole model
        report.quantized.extend(f"{arch.blocks}.{i}.{n}" for n, m in blocks[i].named_modules() if isinstance(m, QuantLinear))
    seq.resumed_blocks = done
    if done == len(blocks):
        return
    if done:
        inputs = resume.load_inputs()  # type: ignore[union-attr]
    else:
        inputs = capture_block_inputs(model, blocks[0], calibration.tokens, batch_size, compute_dtype)
    if device is not None:
        inputs = to_device(inputs, device)  # type: ignore[assignment]
    t_start = time.perf_counter()
    desc = f"quantize {recipe.label()}"
    with progress_bar(len(blocks), desc, progress, done) as bar:
        for i in range(done, len(blocks)):
            block, prefix = blocks[i], f"{arch.blocks}.{i}"
            if weights is not None:
                weights.materialize(block, prefix)
                check_finite(block, prefix)
            first = next(block.parameters(), None)
            home = first.device if first is not None else torch.device("cpu")
            if device is not None:
                block.to(device)
            plan = plan_block(block, prefix, arch, recipe)
            report.skipped.extend(plan.skipped)
            results, inputs = quantize_block_sequential(block, plan, arch, recipe, inputs, compute_dtype, importance)
            # bounded memory is the point of loading blocks from disk; a model held whole in
            # memory keeps its working set mapped (see release_dense_weights)
            release_dense_weights(block, trim_heap=weights is not None)
            block.to(home)
            if not all(torch.isfinite(h).all() for h, _ in inputs):
                raise LowbitError(f"block {prefix} produced NaN or Inf on the calibration data")
            seq.linears.extend(results)
            record_importance(report.importance, results)
            report.quantized.extend(r.name for r in results)
            if resume is not None:
                resume.save(block, i, inputs)
            if progress and results:
                errs = " ".join(f"{r.name.rsplit('.', 1)[-1]}={r.error:.4f}" for r in results)
                # beside the bar, on stderr: stdout carries a command's table or JSON
                bar.write(f"block {i:3d}: relative output error {errs}", file=sys.stderr)
            bar.update(1)
    seq.forward_seconds = time.perf_counter() - t_start - sum(r.seconds for r in seq.linears)


def _quantize_block(block: nn.Module, plan: BlockPlan, report: QuantizationReport,
                    importance: Mapping[str, torch.Tensor] | None) -> None:
    """Quantize the linears ``plan`` selects, each from its weight alone (RTN, or RTN weighted by
    a supplied importance)."""
    report.skipped.extend(plan.skipped)
    for step in plan.steps:
        for name in step.names:
            full = f"{plan.prefix}.{name}"
            codec, algorithm = step.assignments[name]
            weight, bias = linear_weight(block.get_submodule(name))
            stats = None
            if importance is not None and takes_importance(algorithm):
                stats = LayerStats(importance=supplied_importance(importance, full).to(weight.device))
            try:
                qt = algorithm.quantize(weight, codec, stats)
            except ValueError as e:
                raise LowbitError(f"cannot quantize {full}: {e}") from None
            act = step.activations.get(name)
            block.set_submodule(name, QuantLinear(qt, bias, act.quantizer() if act is not None else None))
            report.quantized.append(full)


def _compute_device(device: torch.device | str | None) -> torch.device | None:
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise LowbitError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LowbitError(f"device {device!r} requested, but this torch build sees no CUDA GPU")
    if dev.type not in ("cpu", "cuda"):
        raise LowbitError(f"device {device!r}: only cpu and cuda are supported")
    return dev


def round_dense_tensors(model: nn.Module, dtype: torch.dtype) -> None:
    """Round every floating parameter and persistent buffer (quantized parts aside) to the values
    that ``dtype`` storage keeps, so the in-memory model equals the saved-and-reloaded one."""
    for _, _, _, t in dense_tensors(model):
        if t.dtype.is_floating_point:
            t.data = t.data.to(dtype).to(t.dtype)
