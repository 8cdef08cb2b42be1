"""The ``kv_cache`` field of a recipe (and ``--kv-cache``): how keys and values are stored in the
cache while a model generates, and the named presets of the flag."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, field_validator, model_validator

from lowbit.calibration.observers import MinMax, Observer
from lowbit.codecs.activations import ActivationQuantizer
from lowbit.codecs.kv import KVQuantizer
from lowbit.errors import LowbitError


class KVCodec(BaseModel):
    """One side of the cache (keys or values): ``int`` (2, 4 or 8 bits, asymmetric by default) or
    ``fp8_e4m3`` / ``fp8_e5m2``; grouped per ``token`` (``group_size`` values of a head, the whole
    head when None) or per ``channel`` (over ``group_size`` tokens); fp8 scales are per group
    (fitted to each token as it enters the cache) or ``static``: one per layer for its keys (values),
    measured by ``observer`` on calibration data when the model is quantized, vLLM's ``k_scale`` /
    ``v_scale``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["int", "fp8_e4m3", "fp8_e5m2"] = "int"
    bits: int = Field(8, description="2, 4 or 8 (int); 8 (fp8)")
    axis: Literal["token", "channel"] = "token"
    group_size: int | None = Field(None, gt=0)
    symmetric: bool = Field(False, description="int only: codes around zero, no zero point")
    static: bool = Field(False, description="fp8 only: one scale per layer, calibrated when the model is quantized")
    observer: SerializeAsAny[Observer] | None = Field(None, description="static scales: how the range of the "
                                                      "keys (values) is measured (default minmax)")

    @field_validator("observer", mode="before")
    @classmethod
    def _observer(cls, v: Any) -> Any:
        from lowbit.recipes.recipe import _dispatch

        return None if v is None else _dispatch({"name": v} if isinstance(v, str) else v, Observer, "observer")

    @model_validator(mode="before")
    @classmethod
    def _fp8_is_symmetric(cls, data: Any) -> Any:
        if isinstance(data, dict) and str(data.get("format", "int")).startswith("fp8"):
            data = {"symmetric": True, **data}
        return data

    @model_validator(mode="after")
    def _valid(self) -> "KVCodec":
        if self.static:
            if self.format == "int":
                raise ValueError("static (calibrated) scales are for fp8 KV caches")
            if self.observer is None:
                object.__setattr__(self, "observer", MinMax())
            self.observer.start(False, self.scale_quantizer())  # type: ignore[union-attr]  # ValueError if unfit
        elif self.observer is not None:
            raise ValueError("an observer measures static scales: set static: true, or drop the observer")
        self.layout()
        return self

    def quantizer(self, scale: float | None = None) -> KVQuantizer:
        """The codec; a static one takes the layer's calibrated ``scale``."""
        if self.static and scale is None:
            raise ValueError("a static KV codec needs its calibrated scale")
        try:
            return KVQuantizer(self.format, self.bits, self.axis, self.group_size, self.symmetric,
                               scale if self.static else None)
        except ValueError as e:
            raise ValueError(str(e)) from None

    def layout(self) -> KVQuantizer:
        """The codec's layout: bits, head-size checks, names. None of them depend on a static codec's
        scale, which is per layer and calibrated later, so any value stands in for it here (1.0)."""
        return self.quantizer(1.0 if self.static else None)

    def scale_quantizer(self) -> ActivationQuantizer:
        """The per-tensor quantizer whose scale a static codec's observer fits."""
        return ActivationQuantizer(self.format, "tensor")  # type: ignore[arg-type]


class KVCache(BaseModel):
    """Keys and values codecs, and ``residual``: how many of the most recent tokens stay in full
    precision (KIVI's window; a token leaves it once ``residual`` newer ones are there, and per-channel
    groups leave it whole). Keys are quantized after rotary embedding, as transformers caches them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    keys: KVCodec
    values: KVCodec
    residual: int = Field(0, ge=0, description="most recent tokens kept in full precision")
    rope: Literal["post"] = Field("post", description="keys are quantized after rotary embedding")

    @property
    def static(self) -> bool:
        """Whether a side takes calibrated per-layer scales."""
        return self.keys.static or self.values.static

    def check_head_dim(self, head_dim: int, context: int | None = None) -> None:
        """LowbitError when a codec does not fit heads of ``head_dim`` values, or the residual window
        is longer than the model's context."""
        for side, codec in (("keys", self.keys), ("values", self.values)):
            try:
                codec.layout().check_head_dim(head_dim)
            except ValueError as e:
                raise LowbitError(f"kv_cache.{side}: {e}") from None
        if context is not None and self.residual > context:
            raise LowbitError(f"kv_cache.residual: a window of {self.residual} tokens is longer than the model's "
                              f"context ({context} tokens)")

    def check_model(self, model: Any) -> None:
        """LowbitError when the cache does not fit ``model`` (a transformers model): its head size,
        its context, layers that are not all full attention."""
        from transformers.cache_utils import DynamicCache, DynamicLayer

        from lowbit.models.architectures import attention_head_dim, context_length

        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.check_head_dim(attention_head_dim(model), context_length(model))
        if not all(type(layer) is DynamicLayer for layer in DynamicCache(config=cfg).layers):
            raise LowbitError(f"a quantized KV cache needs full attention in every layer; {cfg.model_type} has "
                              "sliding-window or other layers")

    def bits_per_value(self, head_dim: int) -> float:
        """Average stored bits per cached value of keys and values (without the window)."""
        return (self.keys.layout().bits_per_value(head_dim) + self.values.layout().bits_per_value(head_dim)) / 2

    def describe(self) -> str:
        window = f", last {self.residual} tokens full precision" if self.residual else ""
        return (f"{self.name + ': ' if self.name else ''}keys {self.keys.layout().describe()}, values "
                f"{self.values.layout().describe()}{window}")


def _int(bits: int, axis: str, group: int | None, symmetric: bool = False) -> dict[str, Any]:
    return {"format": "int", "bits": bits, "axis": axis, "group_size": group, "symmetric": symmetric}


# the presets of --kv-cache: (help, fields)
KV_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "int8": ("int8 keys and values per token, asymmetric groups of 32", {
        "keys": _int(8, "token", 32), "values": _int(8, "token", 32)}),
    "int4": ("KIVI int4: keys per channel, values per token, asymmetric groups of 32, the last 64 tokens in full "
             "precision", {"keys": _int(4, "channel", 32), "values": _int(4, "token", 32), "residual": 64}),
    "int2": ("KIVI int2: keys per channel, values per token, asymmetric groups of 32, the last 128 tokens in full "
             "precision", {"keys": _int(2, "channel", 32), "values": _int(2, "token", 32), "residual": 128}),
    "fp8": ("FP8 E4M3 keys and values, a scale per token and head", {
        "keys": {"format": "fp8_e4m3"}, "values": {"format": "fp8_e4m3"}}),
    "fp8-static": ("vLLM's FP8 cache: E4M3 keys and values, one calibrated scale per layer (k_scale, v_scale; "
                   "from quantize)", {"keys": {"format": "fp8_e4m3", "static": True},
                                      "values": {"format": "fp8_e4m3", "static": True}}),
    # llama.cpp's q8_0 cache type (its rounding, up to ties), for side-by-side numbers
    "q8_0": ("llama.cpp's q8_0 cache: int8 symmetric per 32 values of a head, a fp16 scale", {
        "keys": _int(8, "token", 32, True), "values": _int(8, "token", 32, True)}),
}


def kv_cache_spec(spec: str | dict[str, Any] | KVCache) -> KVCache:
    """A preset name (``int8``, ``int4``, ``int2``, ``fp8``, ``q8_0``), a YAML/JSON file
    or a mapping of the fields; LowbitError naming what is wrong."""
    if isinstance(spec, KVCache):
        return spec
    if isinstance(spec, str):
        if spec in KV_PRESETS:
            return KVCache.model_validate({"name": spec, **KV_PRESETS[spec][1]})
        from pathlib import Path

        path = Path(spec)
        if not path.is_file():
            raise LowbitError(f"unknown KV cache {spec!r}: not a preset ({', '.join(KV_PRESETS)}) nor a file")
        import yaml

        try:
            spec = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise LowbitError(f"cannot read KV cache spec {path}: {e}") from None
    from pydantic import ValidationError

    from lowbit.errors import validation_message

    try:
        return KVCache.model_validate(spec)
    except ValidationError as e:
        raise LowbitError(f"invalid kv_cache: {validation_message(e)}") from None
