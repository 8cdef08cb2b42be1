"""The ``activations`` field of a recipe: how the inputs of its linears are quantized."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, field_validator, model_validator

from lowbit.calibration.observers import MinMax, Observer
from lowbit.codecs.activations import ActivationFormat, ActivationQuantizer


class Activations(BaseModel):
    """Quantization of a linear's input: a number format (int8, FP8 E4M3/E5M2), a granularity
    (``token``, ``tensor``, ``group`` of ``group_size`` features, or ``channel``: per input
    feature), symmetric or not; scales ``dynamic`` (fitted to each input at run time: per token,
    per tensor or per group) or static (fitted once from calibration data by ``observer``: per
    tensor or per channel). ``outlier_threshold`` (LLM.int8(), dynamic int8 per token only): input
    columns where some token's ``|x|`` exceeds it are kept in 16-bit, the rest quantized.
    ``outlier_channels`` (symmetric int8, per token or per tensor, dynamic or static): that many input
    features of each linear, those with the largest ``|x|`` on the calibration data, are kept in
    16-bit for every input; the rest are quantized, a static scale observed without them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: ActivationFormat = "int8"
    granularity: Literal["token", "tensor", "group", "channel"] | None = Field(
        None, description="default: token when dynamic, tensor when static")
    group_size: int | None = Field(None, gt=0, description="features per group (granularity group)")
    symmetric: bool = True
    dynamic: bool = Field(True, description="scales fitted to each input at run time (else static, from calibration)")
    observer: SerializeAsAny[Observer] | None = Field(None, description="static scales: how the input range is "
                                                      "measured (default minmax)")
    outlier_threshold: float | None = Field(None, gt=0, description="LLM.int8(): |x| above it keeps its column in 16-bit")
    outlier_channels: int | None = Field(None, gt=0, description="input features per linear kept in 16-bit, fixed: "
                                         "those with the largest |x| on the calibration data")

    @field_validator("observer", mode="before")
    @classmethod
    def _observer(cls, v: Any) -> Any:
        from lowbit.recipes.recipe import _dispatch

        return None if v is None else _dispatch({"name": v} if isinstance(v, str) else v, Observer, "observer")

    @model_validator(mode="after")
    def _consistent(self) -> "Activations":
        if self.granularity is None:
            object.__setattr__(self, "granularity", "token" if self.dynamic else "tensor")
        if self.granularity == "group" and self.group_size is None:
            raise ValueError("granularity 'group' needs a group_size")
        if self.dynamic:
            if self.granularity == "channel":
                raise ValueError("per-channel input scales are static: set dynamic: false")
            if self.observer is not None:
                raise ValueError("an observer measures static scales: set dynamic: false, or drop the observer")
        else:
            if self.granularity not in ("tensor", "channel"):
                raise ValueError(f"static input scales are per tensor or per channel, not per {self.granularity}")
            if self.observer is None:
                object.__setattr__(self, "observer", MinMax())
        if self.outlier_threshold is not None and not (self.dynamic and self.format == "int8" and self.granularity == "token"
                                                       and self.symmetric):
            raise ValueError("outlier_threshold (LLM.int8()) needs dynamic symmetric int8 per-token inputs")
        self.quantizer()  # the format's own checks (FP8 is symmetric)
        if not self.dynamic:
            self.observer.start(self.granularity == "channel", self.quantizer())  # type: ignore[union-attr]
        return self

    def quantizer(self) -> ActivationQuantizer:
        try:
            return ActivationQuantizer(self.format, self.granularity or "token", self.group_size, self.symmetric,
                                       self.outlier_threshold, self.outlier_channels)
        except ValueError as e:
            raise ValueError(str(e)) from None

    def describe(self) -> str:
        how = "dynamic" if self.dynamic else f"static ({self.observer.name})"  # type: ignore[union-attr]
        return f"{self.quantizer().describe()} {how}"
