"""RTN: round to nearest on the codec's grid, with an optional clipping search.

The clipping search (as in GPTQ's ``mse`` option and llama.cpp's weighted scale search) tries
``clip_steps`` shrink factors evenly spaced in ``[clip_min, 1]`` for each group's range and keeps
the one with the lowest squared error, weighted per input column by ``stats.importance`` when
calibration statistics are given.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from lowbit.algorithms.base import Algorithm, LayerStats
from lowbit.codecs import Codec, QuantizedTensor


class RTN(Algorithm):
    name: Literal["rtn"] = "rtn"
    clip_search: bool = Field(False, description="search a shrink factor of each group's range")
    clip_min: float = Field(0.5, gt=0, le=1, description="smallest shrink factor tried")
    clip_steps: int = Field(26, ge=2, description="number of shrink factors tried, from clip_min to 1")

    def shrink_grid(self) -> torch.Tensor | None:
        if not self.clip_search:
            return None
        return torch.linspace(self.clip_min, 1.0, self.clip_steps)

    def quantize(self, weight: torch.Tensor, codec: Codec, stats: LayerStats | None = None) -> QuantizedTensor:
        importance = stats.importance if stats is not None else None
        return codec.quantize(weight, importance=importance, shrink_grid=self.shrink_grid())
