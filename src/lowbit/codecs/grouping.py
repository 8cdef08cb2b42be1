"""How a 2-D weight is cut into the groups that share scale data.

A weight of shape ``(rows, cols)`` (``rows`` = output features, ``cols`` = input features) is
viewed as a 3-D tensor ``(R, G, g)``: ``G`` groups of ``g`` values per row, along the input
dimension.

* ``tensor``: one group for the whole tensor, ``(1, 1, rows*cols)``.
* ``channel``: one group per output row, ``(rows, 1, cols)``.
* ``group``: ``G = ceil(cols / group_size)`` groups per row, ``(rows, G, group_size)``. When
  ``group_size`` does not divide ``cols`` the last group is shorter (as the GPTQ layout's
  ``g_idx`` allows); in the 3-D view it is padded by repeating the row's last value, which
  never changes any min/max or absmax fit of the group (zeros would: a float offset is the
  group's own min), carries zero weight in every error and is dropped again by
  :meth:`Grouping.merge`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Granularity = Literal["tensor", "channel", "group"]


@dataclass(frozen=True)
class Grouping:
    granularity: Granularity
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.granularity == "group":
            if self.group_size is None or self.group_size <= 0:
                raise ValueError(f"group_size must be a positive integer, got {self.group_size}")
        elif self.granularity not in ("tensor", "channel"):
            raise ValueError(f"unknown granularity {self.granularity!r}")

    def grid(self, shape: tuple[int, int]) -> tuple[int, int, int]:
        """``(R, G, g)`` of the grouped view of a ``(rows, cols)`` weight."""
        rows, cols = shape
        if self.granularity == "tensor":
            return 1, 1, rows * cols
        if self.granularity == "channel":
            return rows, 1, cols
        g = self.group_size
        assert g is not None
        return rows, -(-cols // g), g

    def whole_groups(self, cols: int) -> tuple[int, torch.Tensor]:
        """For groups whose last one is shorter (``cols`` not a multiple of ``group_size``): the
        size of the largest groups that divide the rows, ``gcd(cols, group_size)``, and for each
        of those the index of the group it lies in (``(cols / size,)`` int64), so that scale data
        ``(R, G)[:, index]`` describes the same weights in whole groups (576 columns in groups of
        128: groups of 64, the fifth 128-group's scale repeated once)."""
        assert self.granularity == "group" and self.group_size is not None
        finer = math.gcd(cols, self.group_size)
        return finer, torch.arange(0, cols, finer) // self.group_size

    def split(self, weight: torch.Tensor, zero_pad: bool = False) -> torch.Tensor:
        """``(rows, cols)`` -> ``(R, G, g)``; a short last group is padded with the row's last
        value (with zeros when ``zero_pad``)."""
        rows, cols = weight.shape
        R, G, g = self.grid((rows, cols))
        if self.granularity != "group":
            return weight.reshape(R, G, g)
        pad = G * g - cols
        if pad:
            fill = torch.zeros_like(weight[:, -1:]) if zero_pad else weight[:, -1:]
            weight = torch.cat([weight, fill.expand(rows, pad)], dim=1)
        return weight.reshape(R, G, g)

    def merge(self, groups: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """Inverse of :meth:`split`: drop padding, back to ``(rows, cols)``."""
        rows, cols = shape
        if self.granularity != "group":
            return groups.reshape(rows, cols)
        return groups.reshape(rows, -1)[:, :cols]

    def weights(
        self, shape: tuple[int, int], importance: torch.Tensor | None, device: torch.device | None = None
    ) -> torch.Tensor:
        """Per-value error weights in the grouped view: the per-column ``importance`` (or 1, on
        ``device``), zero on padding. Shape broadcasts against ``(R, G, g)``."""
        rows, cols = shape
        imp = torch.ones(cols, device=device) if importance is None else importance.detach().to(torch.float32).reshape(-1)
        if imp.numel() != cols:
            raise ValueError(f"importance has {imp.numel()} entries for {cols} columns")
        if self.granularity == "tensor":
            return imp.repeat(rows).reshape(1, 1, rows * cols)
        if self.granularity == "channel":
            return imp.reshape(1, 1, cols)
        return self.split(imp.reshape(1, cols), zero_pad=True)
