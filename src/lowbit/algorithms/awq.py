"""AWQ (Lin et al., 2023): activation-aware per-channel scaling, then a clipping search.

The scaling is the ``awq`` transform (:mod:`lowbit.transforms.awq`): for each sub-step whose input
is the output of a module that can absorb a per-channel scale, the best scale of a grid of
exponents is folded into the block before any linear is quantized. This algorithm implies it.

The clipping search then picks, per group, the shrink factor of the codec's range that minimizes
the group's share of the layer's output error, ``d^T H_g d`` with ``H_g`` the group's block of
``X^T X / n`` (the reference implementation evaluates the same quantity on sampled tokens).
Everything goes through the codec interface, so AWQ works with every codec.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from lowbit.algorithms.base import ClipSearch, LayerStats
from lowbit.calibration.statistics import StatsRequest
from lowbit.codecs import Codec, QuantizedTensor
from lowbit.codecs.base import GroupHessian
from lowbit.transforms import AWQScale, Transform


class AWQ(ClipSearch):
    name: Literal["awq"] = "awq"
    grid: int = Field(20, ge=2, description="exponents tried for the activation-aware scale")
    clip_search: bool = Field(True, description="search each group's clipping after scaling")
    clip_steps: int = Field(20, ge=2, description="number of shrink factors tried, from clip_min to 1")

    @property
    def needs_calibration(self) -> bool:
        return True

    def implied_transforms(self) -> list[Transform]:
        return [AWQScale(grid=self.grid)]

    def stats_request(self) -> StatsRequest:
        return StatsRequest(hessian=self.clip_search)

    def quantize(self, weight: torch.Tensor, codec: Codec, stats: LayerStats | None = None) -> QuantizedTensor:
        if not self.clip_search or stats is None or stats.hessian is None:
            return codec.quantize(weight)
        w = codec.check_weight(weight)
        grouping = codec.grouping
        if grouping.granularity == "tensor":
            return codec.quantize(w, importance=stats.importance, shrink_grid=self.shrink_grid())
        groups = grouping.split(w)
        scale = codec.fit_group_scales(groups, GroupHessian(stats.hessian, grouping, w.shape[1]), self.shrink_grid())
        return codec.pack(grouping.merge(codec.encode(groups, scale), tuple(w.shape)), scale, tuple(w.shape))
