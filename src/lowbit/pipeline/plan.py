"""What a recipe does to one decoder block, worked out once: for each sub-step of the
architecture (linears that read one input, in execution order), which of its linears are
quantized, with which codec and algorithm, how their inputs are quantized, and which transforms
run on it first."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from lowbit.algorithms import Algorithm
from lowbit.codecs import Codec
from lowbit.codecs.activations import ActivationQuantizer
from lowbit.errors import LowbitError
from lowbit.models import Architecture
from lowbit.recipes import Activations, Recipe
from lowbit.transforms import Transform


@dataclass
class StepPlan:
    index: int  # the sub-step's position in the block's steps (and in ``Architecture.scale_sources``)
    names: list[str]  # block-relative names of its quantized linears, in the architecture's order
    assignments: dict[str, tuple[Codec, Algorithm]]
    transforms: list[Transform] = field(default_factory=list)  # applied in order before codes are chosen
    activations: dict[str, Activations | None] = field(default_factory=dict)  # input quantization per linear

    def input_quantizers(self) -> dict[str, ActivationQuantizer | None]:
        return {n: (a.quantizer() if a is not None else None) for n, a in self.activations.items()}

    @property
    def static(self) -> dict[str, Activations]:
        """The linears whose input scales come from calibration, with their activations."""
        return {n: a for n, a in self.activations.items() if a is not None and not a.dynamic}


@dataclass
class BlockPlan:
    prefix: str  # the block's full name, e.g. model.layers.3
    block_steps: list[tuple[str, ...]]  # every sub-step's linears (MoE experts expanded)
    steps: list[StepPlan]  # the sub-steps with at least one quantized linear
    skipped: list[str]  # full names of the linears left dense

    @property
    def quantized(self) -> set[str]:
        return {n for s in self.steps for n in s.names}

    @property
    def transforming(self) -> list[StepPlan]:
        return [s for s in self.steps if s.transforms]


def step_transforms(recipe: Recipe, algorithms: set[Algorithm]) -> list[Transform]:
    """The transforms of a sub-step: the recipe's, then those of its algorithm when all its
    quantized linears share one (AWQ's scaling needs every linear that reads the input)."""
    implied = next(iter(algorithms)).implied_transforms() if len(algorithms) == 1 else []
    return [*recipe.transforms, *implied]


def plan_block(block: nn.Module, prefix: str, arch: Architecture, recipe: Recipe) -> BlockPlan:
    """The :class:`BlockPlan` of ``block`` (full name ``prefix``) under ``recipe``; LowbitError when
    the block lacks a linear its architecture names."""
    block_steps = arch.block_steps(block)
    steps, skipped = [], []
    for s, step in enumerate(block_steps):
        assignments = {n: recipe.assignment(f"{prefix}.{n}") for n in step}
        skipped.extend(f"{prefix}.{n}" for n in step if assignments[n] is None)
        names = [n for n in step if assignments[n] is not None]
        for n in names:
            try:
                block.get_submodule(n)
            except AttributeError:
                raise LowbitError(f"{arch.family}: block has no module {n}") from None
        if names:
            chosen = {n: assignments[n] for n in names}
            # a scale folded into the input would need every linear that reads it rescaled: a step
            # with a dense linear beside its quantized ones is not transformed
            transforms = step_transforms(recipe, {a for _, a in chosen.values()}) if len(names) == len(step) else []
            activations = {n: recipe.activations_for(f"{prefix}.{n}") for n in names}
            steps.append(StepPlan(s, names, chosen, transforms, activations))  # type: ignore[misc]
    return BlockPlan(prefix, block_steps, steps, skipped)


def transform_reach(block: nn.Module, arch: Architecture, plan: BlockPlan) -> tuple[list[str], list[str]]:
    """Which transforming sub-steps of a block a scale can fold into (the names of their first
    linears), and why each other one cannot."""
    from lowbit.modules import linear_weight
    from lowbit.transforms.scaling import can_absorb

    reach, why = [], []
    for step in plan.transforming:
        first = step.names[0]
        source = arch.scale_sources[step.index] if arch.scale_sources else None
        if "{e}" in "".join(arch.steps[step.index]):
            why.append(f"{first}: MoE experts do not read one input tensor")
        elif source is None:
            why.append(f"{first}: no module produces its input alone (a fused projection, a non-linearity before it, "
                       "or a post-LN block)")
        elif not can_absorb(block.get_submodule(source), int(linear_weight(block.get_submodule(first))[0].shape[1])):
            why.append(f"{first}: {source}'s outputs are not its input's channels (grouped-query attention?)")
        else:
            reach.append(first)
    return reach, why


def check_transforms(model: nn.Module, arch: Architecture, recipe: Recipe) -> list[str]:
    """Before any work: LowbitError when the recipe's transforms can fold into no sub-step of the
    model (naming why); else the sub-steps they leave alone, and why (o_proj under grouped-query
    attention, as llm-compressor's SmoothQuant mappings skip it too)."""
    if not recipe.transforms:
        return []
    block = arch.block_list(model)[0]
    reach, why = transform_reach(block, arch, plan_block(block, f"{arch.blocks}.0", arch, recipe))
    if not reach and why:
        names = "+".join(t.name for t in recipe.transforms)
        raise LowbitError(f"{names} cannot fold into any sub-step of this {arch.family} model: {'; '.join(why)}")
    return why
