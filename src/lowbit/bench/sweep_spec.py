"""The sweep file (``lowbit sweep SWEEP.yaml``): models x recipes x evaluations, typed and
validated before anything runs, and the cells it expands to.

Example::

    models: [smollm2-135m]
    recipes: [unquantized, bf16, int8, w4a16, w4a16-gptq, w4a16-awq, nf4, gguf-q4_k_m]
    evaluations:
      texts: [pydoc]
      max_windows: 8
      speed: {prompt_tokens: 128, new_tokens: 32}
      humaneval: {limit: 20}

A recipe entry is a preset name, a recipe file, ``unquantized`` (the model as it is, float32),
``bf16`` (the same weights computed in bfloat16), or ``{name: LABEL, recipe: PRESET_OR_FILE_OR_MAPPING,
format: LAYOUT}``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lowbit.errors import LowbitError
from lowbit.evaluation.humaneval import DEFAULT_BATCH

DENSE_ROWS = {"unquantized": "float32", "bf16": "bfloat16"}  # rows without a quantization step: their dtype


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SpeedSpec(_Strict):
    batch: int = Field(1, ge=1, description="batch size of the timed run")
    prompt_tokens: int = Field(128, ge=1)
    new_tokens: int = Field(32, ge=1)
    repeats: int = Field(3, ge=1, description="timed runs, median")


class HumanEvalSpec(_Strict):
    limit: int | None = Field(None, ge=1, le=164, description="first N problems (default all 164)")
    max_new_tokens: int = Field(384, ge=1)
    chat: bool = False
    batch_size: int = Field(DEFAULT_BATCH, ge=1)


class EvaluationsSpec(_Strict):
    texts: list[str] = Field(default_factory=lambda: ["pydoc"], min_length=1)
    seq_len: int = Field(512, ge=2)
    max_windows: int | None = Field(8, ge=1)
    speed: SpeedSpec | None = Field(default_factory=SpeedSpec, description="null: no speed and memory")
    humaneval: HumanEvalSpec | None = None
    layers: bool = Field(True, description="per-linear weight error (the report's heat map)")
    llama_bench: bool = Field(True, description="llama.cpp's own speed for GGUF rows, when llama.cpp is built")


class ResourcesSpec(_Strict):
    cpus: int | None = Field(None, ge=1, description="threads per cell (default: the machine's CPUs / --jobs)")
    gpus: float = Field(0, ge=0, description="GPUs per cell (Ray)")
    memory_gb: float | None = Field(None, gt=0, description="kill a cell whose processes hold more resident memory")
    timeout_minutes: float | None = Field(None, gt=0, description="kill a cell that runs longer")


class RecipeEntry(_Strict):
    name: str = Field(min_length=1)
    recipe: str | dict[str, Any] | None = None  # None: the name is the preset or file
    format: Literal["native", "compressed-tensors", "gptq", "gptq_v2", "awq", "gguf"] | None = None


class SweepSpec(_Strict):
    version: Literal[1] = 1
    name: str | None = None
    models: list[str] = Field(min_length=1)
    recipes: list[str | RecipeEntry] = Field(min_length=1)
    evaluations: EvaluationsSpec = Field(default_factory=EvaluationsSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)

    @field_validator("recipes")
    @classmethod
    def _unique(cls, v: list[str | RecipeEntry]) -> list[str | RecipeEntry]:
        names = [e if isinstance(e, str) else e.name for e in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"recipe names must be unique; repeated: {', '.join(dup)}")
        return v


class Cell(BaseModel):
    """One model x recipe with the sweep's evaluations: what a worker runs."""

    cell: str
    model: str
    recipe: str  # the sweep's name for it
    recipe_data: dict[str, Any] | None  # the resolved recipe (None for the dense rows)
    recipe_digest: str | None
    format: str | None  # output layout; None for the dense rows
    dense: Literal["float32", "bfloat16"] | None = None  # a dense row's compute dtype; None when quantized
    evaluations: EvaluationsSpec
    resources: ResourcesSpec

    @property
    def timed(self) -> bool:
        return self.evaluations.speed is not None


def load_sweep(path: Path) -> SweepSpec:
    """The validated sweep file; LowbitError naming the file and the bad field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LowbitError(f"sweep file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise LowbitError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise LowbitError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise LowbitError(f"{path}: expected a mapping with models, recipes and evaluations")
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise LowbitError(f"{path}: {where}: {msg}{more}") from None


def expand_cells(spec: SweepSpec, base_dir: Path | None = None) -> list[Cell]:
    """Every model x recipe cell, each recipe resolved and each model checked, so that an
    unknown one is named before anything runs. Relative recipe files are read from ``base_dir``."""
    for model in spec.models:
        check_model_spec(model)
    entries = [_entry(e) for e in spec.recipes]
    resolved = [(e, _resolve(e, base_dir)) for e in entries]
    cells = []
    for model in spec.models:
        for entry, recipe in resolved:
            data = None if recipe is None else recipe.to_dict()
            digest = None if recipe is None else recipe.digest()
            layout = None if recipe is None else (entry.format or _default_layout(recipe))
            dense = DENSE_ROWS[_source(entry)] if recipe is None else None
            key = json.dumps({"model": model, "recipe": entry.name, "digest": digest, "format": layout, "dense": dense,
                              "evaluations": spec.evaluations.model_dump()}, sort_keys=True)
            cid = f"{_slug(model)}__{_slug(entry.name)}__{hashlib.sha256(key.encode()).hexdigest()[:10]}"
            cells.append(Cell(cell=cid, model=model, recipe=entry.name, recipe_data=data, recipe_digest=digest,
                              format=layout, dense=dense, evaluations=spec.evaluations, resources=spec.resources))
    return cells


def check_model_spec(model: str) -> None:
    """LowbitError unless ``model`` is a built-in name, an existing path, or a hub id."""
    from lowbit.models.builtin import BUILTIN_MODELS

    if model in BUILTIN_MODELS or Path(model).exists():
        return
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model) and not model.endswith((".gguf", ".yaml")):
        return  # a hub id: resolved (or refused) when the cell loads it
    raise LowbitError(f"unknown model {model!r}: not a built-in ({', '.join(BUILTIN_MODELS)}), "
                      "an existing path or a hub id")


def _entry(e: str | RecipeEntry) -> RecipeEntry:
    return RecipeEntry(name=e) if isinstance(e, str) else e


def _source(entry: RecipeEntry) -> str | dict[str, Any]:
    return entry.recipe if entry.recipe is not None else entry.name


def _resolve(entry: RecipeEntry, base_dir: Path | None):  # type: ignore[no-untyped-def]
    from lowbit.recipes import Recipe, resolve_recipe

    source = _source(entry)
    if isinstance(source, dict):
        return Recipe.from_dict({**source, "name": source.get("name", entry.name)}, source=f"recipe {entry.name!r}")
    if source in DENSE_ROWS:
        if entry.format is not None:
            raise LowbitError(f"recipe {entry.name!r}: {source} writes no file; drop its format")
        return None
    if base_dir is not None and not Path(source).is_absolute() and (base_dir / source).exists():
        source = str(base_dir / source)
    try:
        return resolve_recipe(source)
    except LowbitError as e:
        raise LowbitError(f"recipe {entry.name!r}: {e}") from None


def _default_layout(recipe) -> str:  # type: ignore[no-untyped-def]
    return "gguf" if recipe.gguf_mix is not None or (recipe.name or "").startswith("gguf-") else "native"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(text).name if "/" in text else text).strip("-")[:40] or "x"
