"""The algorithm interface: which codes are chosen.

An algorithm is a small pure kernel over ``(weight, codec, statistics)``; it never sees a byte
layout (it only calls the codec) nor a model (the pipeline walks the model and hands it the
statistics it asked for). Algorithms are pydantic models: their fields are their options and a
recipe stores them as is. A subclass declares ``name: Literal["..."]`` and is registered.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from lowbit.codecs import Codec, QuantizedTensor


@dataclass
class LayerStats:
    """Calibration statistics of one linear's input, as collected by the pipeline.

    ``importance``: ``(in,)`` per-input-column weight of the error (e.g. mean squared
    activation), or None for unweighted.
    """

    importance: torch.Tensor | None = None


class Algorithm(BaseModel, ABC):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    registry: ClassVar[dict[str, type["Algorithm"]]] = {}

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: object) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        field = cls.model_fields.get("name")
        if field is not None and isinstance(field.default, str):
            Algorithm.registry[field.default] = cls

    @property
    def needs_calibration(self) -> bool:
        """Whether the pipeline must run calibration data to collect :class:`LayerStats`."""
        return False

    @abstractmethod
    def quantize(self, weight: torch.Tensor, codec: Codec, stats: LayerStats | None = None) -> QuantizedTensor:
        """Quantize a 2-D weight ``(out, in)`` with ``codec``."""
