"""The typed recipe: which codec and algorithm for which modules, and what to leave alone.

A recipe is saved next to every quantized model (``recipe.json``) so a result can always be
reproduced. Validation names the bad field: ``codec.bits: Input should be less than or equal
to 8``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from lowbit.algorithms import Algorithm
from lowbit.calibration.samples import CalibrationConfig
from lowbit.codecs import Codec
from lowbit.errors import LowbitError, validation_message
from lowbit.recipes.activations import Activations
from lowbit.recipes.kv_cache import KV_PRESETS, KVCache, kv_cache_spec
from lowbit.transforms import Transform

DenseDType = Literal["float16", "bfloat16", "float32"]


def matches(pattern: str, name: str) -> bool:
    """``re:REGEX`` (``re.fullmatch``) or an fnmatch glob, over a full module name."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _check_pattern(p: str) -> str:
    if p.startswith("re:"):
        try:
            re.compile(p[3:])
        except re.error as e:
            raise ValueError(f"bad regular expression {p[3:]!r}: {e}") from None
    return p


class Rule(BaseModel):
    """Per-module override: linears matching ``match`` use this codec and/or algorithm."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    match: str = Field(description="glob, or re:REGEX, over full module names")
    codec: SerializeAsAny[Codec] | None = None
    algorithm: SerializeAsAny[Algorithm] | None = None
    activations: Activations | Literal[False] | None = Field(
        None, description="input quantization of the matching linears (false: none; default: the recipe's)")

    @field_validator("match")
    @classmethod
    def _match(cls, v: str) -> str:
        return _check_pattern(v)

    @field_validator("codec", mode="before")
    @classmethod
    def _codec(cls, v: Any) -> Any:
        return None if v is None else _dispatch(v, Codec, "codec")

    @field_validator("algorithm", mode="before")
    @classmethod
    def _algorithm(cls, v: Any) -> Any:
        return None if v is None else _dispatch(v, Algorithm, "algorithm")


class Recipe(BaseModel):
    """How to quantize a model.

    ``targets``/``ignore`` are fnmatch globs (or ``re:REGEX``) over the full module names of the
    linears of the decoder blocks (e.g. ``model.layers.3.mlp.down_proj``); a linear is quantized
    when it matches a target and no ignore pattern, with the codec and algorithm of the first
    ``rules`` entry that matches it (each field defaulting to the recipe's). Embeddings, norms
    and the LM head stay dense, stored in ``dense_dtype``. ``calibration`` is used by algorithms
    that need calibration data.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    name: str | None = Field(None, description="preset name or a label for reports")
    codec: SerializeAsAny[Codec] | None = Field(None, description="the codec of the quantized linears (required "
                                                "unless targets is [], a file of dense weights only)")
    algorithm: SerializeAsAny[Algorithm] = Field(default_factory=lambda: Algorithm.registry["rtn"]())
    targets: list[str] = Field(default_factory=lambda: ["*"], description="fnmatch patterns of linears to quantize")
    ignore: list[str] = Field(default_factory=list, description="fnmatch patterns of linears to keep dense")
    rules: list[Rule] = Field(default_factory=list, description="per-module codec/algorithm overrides, first match wins")
    activations: Activations | None = Field(None, description="how the inputs of the quantized linears are "
                                            "quantized (default: not at all, weight-only)")
    kv_cache: KVCache | None = Field(None, description="how generation stores keys and values (default: in the "
                                     "model's dtype); a preset name (int8, int4, int2, fp8) or the fields")
    transforms: list[SerializeAsAny[Transform]] = Field(
        default_factory=list, description="equivalence transforms of each block before codes are chosen, in order "
        "(smoothquant, awq); an algorithm's own (AWQ's scaling) follow them")
    calibration: CalibrationConfig | None = Field(None, description="calibration data (default: CalibrationConfig())")
    dense_dtype: DenseDType = Field("float16", description="storage dtype of everything not quantized")
    gguf_mix: str | None = Field(None, description="a llama-quantize type mix (q4_k_m, q3_k_m, ...), resolved "
                                 "against the model when quantizing (lowbit.io.gguf_mixes)")
    embedding: SerializeAsAny[Codec] | None = Field(
        None, description="codec of the token embedding (and a tied LM head), RTN; GGUF files and lowbit folders")
    lm_head: SerializeAsAny[Codec] | None = Field(None, description="codec of an untied LM head, RTN; GGUF files and "
                                                  "lowbit folders")

    @field_validator("targets", "ignore")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        return [_check_pattern(p) for p in v]

    @field_validator("codec", mode="before")
    @classmethod
    def _codec(cls, v: Any) -> Any:
        return None if v is None else _dispatch(v, Codec, "codec")

    @model_validator(mode="after")
    def _codec_needed(self) -> "Recipe":
        if self.codec is None and self.targets:
            raise ValueError("codec: Field required (only a recipe with targets: [] quantizes nothing)")
        return self

    @field_validator("algorithm", mode="before")
    @classmethod
    def _algorithm(cls, v: Any) -> Any:
        return _dispatch(v, Algorithm, "algorithm")

    @field_validator("kv_cache", mode="before")
    @classmethod
    def _kv_cache(cls, v: Any) -> Any:
        if isinstance(v, str):
            if v not in KV_PRESETS:
                raise ValueError(f"unknown KV cache preset {v!r}; known: {', '.join(KV_PRESETS)}")
            return {"name": v, **KV_PRESETS[v][1]}
        return v

    @field_validator("transforms", mode="before")
    @classmethod
    def _transforms(cls, v: Any) -> Any:
        if not isinstance(v, list):
            raise ValueError(f"must be a list of transforms, got {_kind(v)}")
        return [_dispatch({"name": t} if isinstance(t, str) else t, Transform, "transform") for t in v]

    @model_validator(mode="after")
    def _no_transform_twice(self) -> "Recipe":
        for algorithm in self.algorithms:
            for t in algorithm.implied_transforms():
                if any(own.name == t.name for own in self.transforms):
                    raise ValueError(f"transforms: {t.name!r} is already part of algorithm {algorithm.name!r} (it would "
                                     "be applied twice); drop one of them")
        return self

    @field_validator("embedding", "lm_head", mode="before")
    @classmethod
    def _dense_codec(cls, v: Any) -> Any:
        return None if v is None else _dispatch(v, Codec, "codec")

    @field_validator("gguf_mix")
    @classmethod
    def _mix(cls, v: str | None) -> str | None:
        from lowbit.recipes.gguf_mix_table import MIXES

        if v is not None and v not in MIXES:
            raise ValueError(f"unknown GGUF mix {v!r}; known: {', '.join(MIXES)}")
        return v

    def selects(self, module_name: str) -> bool:
        hit = any(matches(p, module_name) for p in self.targets)
        return hit and not any(matches(p, module_name) for p in self.ignore)

    def assignment(self, module_name: str) -> tuple[Codec, Algorithm] | None:
        """The codec and algorithm of a linear, or None when it stays dense."""
        if not self.selects(module_name) or self.codec is None:
            return None
        for rule in self.rules:
            if matches(rule.match, module_name):
                return rule.codec or self.codec, rule.algorithm or self.algorithm
        return self.codec, self.algorithm

    def activations_for(self, module_name: str) -> Activations | None:
        """How the input of a quantized linear is quantized: the first matching rule that says,
        else the recipe's ``activations``."""
        for rule in self.rules:
            if rule.activations is not None and matches(rule.match, module_name):
                return rule.activations or None
        return self.activations

    @property
    def all_activations(self) -> list[Activations]:
        return [a for a in (self.activations, *(r.activations for r in self.rules)) if a]

    @property
    def algorithms(self) -> list[Algorithm]:
        return [self.algorithm, *(r.algorithm for r in self.rules if r.algorithm is not None)]

    @property
    def needs_calibration(self) -> bool:
        static = any(not a.dynamic or a.outlier_channels for a in self.all_activations) or (self.kv_cache is not None and self.kv_cache.static)
        return static or bool(self.transforms) or any(a.needs_calibration for a in self.algorithms)

    def with_kv_cache(self, spec: str) -> "Recipe":
        """This recipe with the KV cache ``spec`` (a preset, a YAML file; ``none``: without one)."""
        data = self.to_dict()
        kv = None if spec == "none" else kv_cache_spec(spec)
        data["kv_cache"] = None if kv is None else kv.model_dump(mode="json")
        if self.name and kv is not None:
            data["name"] = f"{self.name.split('+kv-')[0]}+kv-{kv.name or 'custom'}"
        return Recipe.from_dict(data)

    def calibration_config(self) -> CalibrationConfig:
        return self.calibration or CalibrationConfig()

    def to_dict(self) -> dict[str, Any]:
        optional = ("rules", "activations", "kv_cache", "transforms", "calibration", "gguf_mix", "embedding", "lm_head")
        return self.model_dump(mode="json", exclude_defaults=False, exclude={k for k in optional if not getattr(self, k)})

    def digest(self) -> str:
        """Short stable hash of everything that changes the result."""
        d = self.to_dict()
        d.pop("name", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def label(self) -> str:
        if self.name:
            return self.name
        if self.codec is None:
            return "dense (nothing quantized)"
        acts = f", inputs {self.activations.describe()}" if self.activations else ""
        return f"{self.codec.describe()} {'+'.join([*(t.name for t in self.transforms), self.algorithm.name])}{acts}"

    @classmethod
    def from_dict(cls, data: Any, source: str = "recipe") -> "Recipe":
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise LowbitError(f"invalid {source}: {validation_message(e)}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "Recipe":
        p = Path(path)
        try:
            raw = p.read_bytes()
        except OSError as e:
            raise LowbitError(f"cannot read recipe {p}: {e.strerror}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise LowbitError(f"recipe {p} is not UTF-8 text (byte {e.start} is {raw[e.start]:#04x}): "
                              "a recipe is a YAML or JSON file") from None
        kind = "JSON" if p.suffix == ".json" else "YAML"
        try:
            data = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
        except json.JSONDecodeError as e:
            raise LowbitError(f"recipe {p} is not valid JSON: line {e.lineno}, column {e.colno}: {e.msg}") from None
        except yaml.YAMLError as e:
            raise LowbitError(f"recipe {p} is not valid YAML: {_yaml_problem(e)}") from None
        except RecursionError:
            raise LowbitError(f"recipe {p} nests too deeply to be a recipe") from None
        if not isinstance(data, dict):
            raise LowbitError(f"recipe {p} must be a mapping of fields, got {_kind(data)}")
        return cls.from_dict(data, source=f"recipe {p}")


def _yaml_problem(e: "yaml.YAMLError") -> str:
    """A YAML error in one line: where (line and column, 1-based) and what."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or getattr(e, "context", None) or str(e).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(problem).split())


def _kind(value: Any) -> str:
    return "nothing" if value is None else f"a {type(value).__name__} ({str(value)[:40]!r})"


def _dispatch(v: Any, base: type[BaseModel], field: str) -> Any:
    """Turn ``{"name": ..., ...}`` into the registered subclass of ``base`` of that name."""
    if isinstance(v, base):
        return v
    if not isinstance(v, dict):
        raise ValueError(f"must be a mapping with a 'name', got {_kind(v)}")
    registry: dict[str, type[BaseModel]] = base.registry  # type: ignore[attr-defined]
    name = v.get("name")
    if not isinstance(name, str) or name not in registry:
        raise ValueError(f"unknown {field} name {name!r}; known: {', '.join(sorted(registry))}")
    return registry[name].model_validate(v)
