"""Load models and know their architectures."""

from lowbit.models.architectures import ARCHITECTURES, Architecture, architecture_of, check_context, context_length
from lowbit.models.builtin import BUILTIN_MODELS, builtin_model_path, cache_dir
from lowbit.models.loading import LoadedModel, load_model

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
]
