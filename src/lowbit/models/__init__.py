"""Models: the per-architecture facts (imported eagerly: every layer above codecs may use them)
and loading a model from anywhere (imported on first use: it reads files through lowbit.io,
which sits above the facts)."""

from typing import Any

from lowbit.models.architectures import ARCHITECTURES, Architecture, architecture_of, check_context, context_length
from lowbit.models.fingerprint import model_fingerprint
from lowbit.models.loaded import LoadedModel

_LOADING = {"load_model": "lowbit.models.loading", "BUILTIN_MODELS": "lowbit.models.builtin",
            "builtin_model_path": "lowbit.models.builtin", "cache_dir": "lowbit.models.builtin"}


def __getattr__(name: str) -> Any:
    if name in _LOADING:
        import importlib

        return getattr(importlib.import_module(_LOADING[name]), name)
    raise AttributeError(f"module 'lowbit.models' has no attribute {name!r}")


__all__ = [
    "ARCHITECTURES",
    "BUILTIN_MODELS",
    "Architecture",
    "LoadedModel",
    "architecture_of",
    "builtin_model_path",
    "cache_dir",
    "check_context",
    "context_length",
    "load_model",
    "model_fingerprint",
]
