"""Codec registry: every codec class registers itself under its ``name``."""

from __future__ import annotations

from typing import Any

from lowbit.codecs.base import Codec


def codec_names() -> list[str]:
    return sorted(Codec.registry)


def codec_from_dict(params: dict[str, Any]) -> Codec:
    """Rebuild a codec from its ``model_dump()``; ValueError for an unknown name."""
    name = params.get("name")
    cls = Codec.registry.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown codec {name!r}; known: {', '.join(codec_names())}")
    return cls.model_validate(params)
