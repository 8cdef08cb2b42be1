"""The transform interface: equivalence transforms of a decoder block, applied before any code is
chosen.

A transform rewrites one sub-step's linears together with the module that produces their input
(``W <- W diag(s)``, the source's output divided by ``s``) so that the unquantized block computes
the same function in a form that quantizes with less error: AWQ's activation-aware scales,
SmoothQuant's migration of activation outliers into the weights; rotations later. Transforms are
pydantic models, registered by name like codecs and algorithms, so that a recipe lists them as
data (``transforms: [smoothquant, awq]``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from lowbit.calibration.statistics import InputStatistics, StatsRequest
from lowbit.codecs import Codec
from lowbit.registry import Registered

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lowbit.codecs.activations import ActivationQuantizer


@dataclass
class StepContext:
    """One sub-step of a decoder block, as the pipeline hands it to a transform: the linears
    ``names`` (block-relative) that read one input, their weight codecs, that input's ``stats``
    (collected on the unquantized block), and ``source``: the block-relative name of the module
    whose output is that input and can absorb a per-channel scale (None when there is none);
    ``norm_plus_one``: norms compute ``x * (1 + w)``; ``activations``: the quantizer of each
    linear's input, where the recipe quantizes activations; ``requantize``: the step's algorithm
    as a function ``(weights of names, hessian) -> weights`` its codes decode to for that input's
    Hessian ``(in, in)`` (None where it fails, e.g. a singular Hessian), for a transform that
    scores a candidate by the codes the algorithm will choose."""

    block: "nn.Module"
    prefix: str
    names: list[str]
    codecs: dict[str, Codec]
    stats: InputStatistics
    source: str | None
    norm_plus_one: bool
    activations: dict[str, "ActivationQuantizer | None"] = field(default_factory=dict)
    requantize: Callable[[list["torch.Tensor"], "torch.Tensor"], list["torch.Tensor"] | None] | None = None


class Transform(Registered, ABC):
    registry: ClassVar[dict[str, type["Transform"]]] = {}

    def request(self) -> StatsRequest:
        """Which statistics of each sub-step's input :meth:`apply` needs."""
        return StatsRequest()

    @abstractmethod
    def apply(self, ctx: StepContext) -> bool:
        """Transform the sub-step (in place, an exact equivalence of the unquantized block);
        whether anything changed. ``ctx.stats`` is updated to the statistics of the new input."""
