"""RTN: round to nearest on the codec's grid, with an optional clipping search.

The clipping search (as in GPTQ's ``mse`` option and llama.cpp's weighted scale search) tries
``clip_steps`` shrink factors evenly spaced in ``[clip_min, 1]`` for each group's range and keeps
the one with the lowest squared error, weighted per input column by ``stats.importance`` when
calibration statistics are given (llama.cpp's block types weigh each value as llama.cpp does:
``importance * sqrt(sigma^2 + w^2)``, see :meth:`GGMLBlockCodec.importance_weights`). With
``importance`` the pipeline collects those statistics (each input column's mean ``x^2`` on the
calibration data, what llama.cpp calls an importance matrix), block by block with the earlier
linears already quantized, or takes them from a supplied importance matrix
(``quantize_model(importance=...)``, e.g. llama.cpp's imatrix file).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from lowbit.algorithms.base import ClipSearch, LayerStats
from lowbit.calibration.statistics import StatsRequest
from lowbit.codecs import Codec, QuantizedTensor


class RTN(ClipSearch):
    name: Literal["rtn"] = "rtn"
    importance: bool = Field(False, description="weight the clip search by calibration activations (an imatrix)")

    @property
    def needs_calibration(self) -> bool:
        return self.importance

    def stats_request(self) -> StatsRequest:
        return StatsRequest(means=self.importance)

    def quantize(self, weight: torch.Tensor, codec: Codec, stats: LayerStats | None = None) -> QuantizedTensor:
        importance = stats.importance if stats is not None else None
        return codec.quantize(weight, importance=importance, shrink_grid=self.shrink_grid())
