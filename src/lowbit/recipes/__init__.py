"""Typed, validated, serializable recipes and the named presets."""

from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError
from lowbit.recipes.presets import PRESET_HELP, get_preset, preset_names
from lowbit.recipes.recipe import Recipe


def resolve_recipe(spec: str, clip_search: bool | None = None, **overrides: Any) -> Recipe:
    """A preset name or a YAML/JSON recipe file, with codec field overrides applied
    (e.g. ``group_size=64``; ``None`` values are ignored) and optionally RTN's clipping search."""
    if spec in preset_names():
        recipe = get_preset(spec)
    elif Path(spec).suffix in (".yaml", ".yml", ".json") or Path(spec).exists():
        if not Path(spec).is_file():
            raise LowbitError(f"recipe file not found: {spec}")
        recipe = Recipe.from_file(spec)
    else:
        raise LowbitError(f"unknown preset {spec!r} (and no such recipe file); presets: {', '.join(preset_names())}")
    codec_over = {k: v for k, v in overrides.items() if v is not None}
    if clip_search is None and not codec_over:
        return recipe
    data = recipe.to_dict()
    if clip_search is not None:
        if "clip_search" not in type(recipe.algorithm).model_fields:
            raise LowbitError(f"algorithm {recipe.algorithm.name!r} has no clipping search")
        data["algorithm"]["clip_search"] = clip_search
    if "group_size" in codec_over and data["codec"].get("granularity") in ("channel", "tensor"):
        data["codec"]["granularity"] = "group"
    data["codec"].update(codec_over)
    return Recipe.from_dict(data, source="recipe with overrides")


__all__ = ["PRESET_HELP", "Recipe", "get_preset", "preset_names", "resolve_recipe"]
