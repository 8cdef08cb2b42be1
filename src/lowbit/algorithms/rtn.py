"""RTN: round to nearest on the codec's grid, with an optional clipping search.

The clipping search (as in GPTQ's ``mse`` option and llama.cpp's weighted scale search) tries
``clip_steps`` shrink factors evenly spaced in ``[clip_min, 1]`` for each group's range and keeps
the one with the lowest squared error, weighted per input column by ``stats.importance`` when
calibration statistics are given.
"""

from __future__ import annotations

from typing import Literal

import torch

from lowbit.algorithms.base import ClipSearch, LayerStats
from lowbit.codecs import Codec, QuantizedTensor


class RTN(ClipSearch):
    name: Literal["rtn"] = "rtn"

    def quantize(self, weight: torch.Tensor, codec: Codec, stats: LayerStats | None = None) -> QuantizedTensor:
        importance = stats.importance if stats is not None else None
        return codec.quantize(weight, importance=importance, shrink_grid=self.shrink_grid())
