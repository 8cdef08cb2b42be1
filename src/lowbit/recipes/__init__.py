"""Typed, validated, serializable recipes and the named presets."""

from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError
from lowbit.recipes.activations import Activations
from lowbit.recipes.presets import PRESET_HELP, get_preset, preset_names
from lowbit.recipes.recipe import Recipe


def resolve_recipe(
    spec: str, clip_search: bool | None = None, codec: str | None = None, algorithm: str | None = None,
    **overrides: Any,
) -> Recipe:
    """A preset name or a YAML/JSON recipe file, optionally with another codec / algorithm (by
    name, with their default parameters; e.g. ``codec="q4_k", algorithm="gptq"``), codec field
    overrides (e.g. ``group_size=64``; ``None`` values are ignored) and RTN's clipping search."""
    if spec in preset_names():
        recipe = get_preset(spec)
    elif Path(spec).suffix in (".yaml", ".yml", ".json") or Path(spec).exists():
        if not Path(spec).is_file():
            raise LowbitError(f"recipe file not found: {spec}")
        recipe = Recipe.from_file(spec)
    else:
        raise LowbitError(f"unknown preset {spec!r} (and no such recipe file); presets: {', '.join(preset_names())}")
    codec_over = {k: v for k, v in overrides.items() if v is not None}
    if clip_search is None and not codec_over and codec is None and algorithm is None:
        return recipe
    data = recipe.to_dict()
    if codec is not None:
        data["codec"] = {"name": codec}
    if algorithm is not None:
        data["algorithm"] = {"name": algorithm}
    if clip_search is not None:
        from lowbit.algorithms import Algorithm

        algo = Algorithm.registry.get(data["algorithm"]["name"])
        if algo is None or "clip_search" not in algo.model_fields:
            raise LowbitError(f"algorithm {data['algorithm']['name']!r} has no clipping search")
        data["algorithm"]["clip_search"] = clip_search
    if "group_size" in codec_over and data["codec"].get("granularity") in ("channel", "tensor"):
        data["codec"]["granularity"] = "group"
    data["codec"].update(codec_over)
    if codec is not None or algorithm is not None:
        data.pop("name", None)  # no longer the preset it names
    return Recipe.from_dict(data, source="recipe with overrides")


__all__ = ["PRESET_HELP", "Activations", "Recipe", "get_preset", "preset_names", "resolve_recipe"]
