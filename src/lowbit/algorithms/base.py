"""The algorithm interface: which codes are chosen.

An algorithm is a small pure kernel over ``(weight, codec, statistics)``; it never sees a byte
layout (it only calls the codec) nor a model (the pipeline walks the model and hands it the
statistics it asked for). Algorithms are pydantic models: their fields are their options and a
recipe stores them as is. A subclass declares ``name: Literal["..."]`` and is registered.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from pydantic import Field

from lowbit.calibration.statistics import StatsRequest
from lowbit.codecs import Codec, QuantizedTensor
from lowbit.registry import Registered

if TYPE_CHECKING:
    from lowbit.transforms import Transform


@dataclass
class LayerStats:
    """Calibration statistics of one linear's input, as collected by the pipeline.

    ``importance``: ``(in,)`` per-input-column weight of the error (mean squared activation),
    or None for unweighted. ``hessian``: ``X^T X / n`` ``(in, in)`` when requested. ``rows``:
    sampled input rows ``(n, in)`` when requested. ``n_tokens``: calibration tokens seen.
    """

    importance: torch.Tensor | None = None
    hessian: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    n_tokens: int = 0


class Algorithm(Registered, ABC):
    registry: ClassVar[dict[str, type["Algorithm"]]] = {}

    @property
    def needs_calibration(self) -> bool:
        """Whether the pipeline must run calibration data to collect :class:`LayerStats`."""
        return False

    def stats_request(self) -> StatsRequest:
        """Which statistics the pipeline must collect for each linear's input."""
        return StatsRequest()

    def implied_transforms(self) -> "list[Transform]":
        """Transforms of the block this algorithm applies before choosing codes (AWQ's scaling),
        after the recipe's own ``transforms``."""
        return []

    @abstractmethod
    def quantize(self, weight: torch.Tensor, codec: Codec, stats: LayerStats | None = None) -> QuantizedTensor:
        """Quantize a 2-D weight ``(out, in)`` with ``codec``."""

    def quantize_stacked(
        self, weights: list[torch.Tensor], codec: Codec, stats: LayerStats | None = None
    ) -> list[QuantizedTensor]:
        """Quantize weights ``(out_i, in)`` that read the same input (``stats`` is theirs, shared),
        each as :meth:`quantize` would; an algorithm may do them together when that is faster."""
        return [self.quantize(w, codec, stats) for w in weights]


class ClipSearch(Algorithm):
    """An algorithm with a search over shrink factors of each group's range: ``clip_steps``
    factors evenly spaced in ``[clip_min, 1]`` (RTN, GPTQ and AWQ share these options)."""

    clip_search: bool = Field(False, description="search a shrink factor of each group's range")
    clip_min: float = Field(0.5, gt=0, le=1, description="smallest shrink factor tried")
    clip_steps: int = Field(26, ge=2, description="number of shrink factors tried, from clip_min to 1")

    def shrink_grid(self) -> torch.Tensor | None:
        """The shrink factors to try, or None without the search."""
        if not self.clip_search:
            return None
        return torch.linspace(self.clip_min, 1.0, self.clip_steps)
