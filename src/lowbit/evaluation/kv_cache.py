"""A recipe's or ``--kv-cache``'s KV cache applied to a model: the cache generation runs with, and
the same quantization emulated over whole sequences for evaluation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from lowbit.errors import LowbitError
from lowbit.models import context_length
from lowbit.modules.kv_cache import QuantizedKVCache, emulate_kv_cache
from lowbit.recipes.kv_cache import KVCache, kv_cache_spec


def head_dim(model: nn.Module) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def resolve_kv_cache(model: nn.Module, spec: str | None) -> KVCache | None:
    """The KV cache to run ``model`` with: ``spec`` (a preset, a file; ``none``: the model's dtype),
    else the one of the recipe the model was quantized with, else None; LowbitError when it does not
    fit the model (its head size, its context, a cache layout it cannot take)."""
    if spec == "none":
        return None
    kv = kv_cache_spec(spec) if spec is not None else getattr(getattr(model, "lowbit_recipe", None), "kv_cache", None)
    if kv is None:
        return None
    kv.check_head_dim(head_dim(model), context_length(model))
    from transformers.cache_utils import DynamicCache, DynamicLayer

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if not all(type(layer) is DynamicLayer for layer in DynamicCache(config=cfg).layers):
        raise LowbitError(f"a quantized KV cache needs full attention in every layer; {cfg.model_type} has sliding-window "
                          "or other layers")
    return kv


def new_cache(model: nn.Module, kv: KVCache) -> QuantizedKVCache:
    """An empty quantized cache for one generation."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return QuantizedKVCache(cfg.num_hidden_layers, kv.keys.quantizer(), kv.values.quantizer(), kv.residual)


@contextlib.contextmanager
def emulated(model: nn.Module, kv: KVCache | None) -> Iterator[None]:
    """Within the block, whole-sequence forwards of ``model`` read keys and values as generation with
    ``kv`` would (nothing changes when ``kv`` is None)."""
    if kv is None:
        yield
        return
    try:
        with emulate_kv_cache(model, kv.keys.quantizer(), kv.values.quantizer(), kv.residual):
            yield
    except ValueError as e:
        raise LowbitError(f"--kv-cache: {e}") from None


def kv_cache_args(parser: Any) -> None:
    from lowbit.recipes.kv_cache import KV_PRESETS

    parser.add_argument("--kv-cache", metavar="PRESET|FILE",
                        help="store keys and values quantized: " + ", ".join(f"{n} ({h})" for n, (h, _) in KV_PRESETS.items())
                        + "; a YAML file of the fields; none: in the model's dtype (default: the recipe's, else none)")
