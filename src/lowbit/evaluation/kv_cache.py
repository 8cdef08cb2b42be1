"""A recipe's or ``--kv-cache``'s KV cache applied to a model: the cache generation runs with, and
the same quantization emulated over whole sequences for evaluation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from lowbit.codecs.kv import KVQuantizer
from lowbit.errors import LowbitError
from lowbit.modules.kv_cache import QuantizedKVCache, attention_modules, emulate_kv_cache, kv_scales
from lowbit.recipes.kv_cache import KVCache, kv_cache_spec


def resolve_kv_cache(model: nn.Module, spec: str | None) -> KVCache | None:
    """The KV cache to run ``model`` with: ``spec`` (a preset, a file; ``none``: the model's dtype),
    else the one of the recipe the model was quantized with (or of the checkpoint it was read from:
    a compressed-tensors ``kv_cache_scheme``), else None; LowbitError when it does not fit the
    model (its head size, its context, a cache layout it cannot take, static scales it lacks)."""
    if spec == "none":
        return None
    if spec is not None:
        kv = kv_cache_spec(spec)
    else:
        kv = getattr(getattr(model, "lowbit_recipe", None), "kv_cache", None) or getattr(model, "lowbit_kv_cache", None)
    if kv is None:
        return None
    kv.check_model(model)
    layer_quantizers(model, kv)
    return kv


def layer_quantizers(model: nn.Module, kv: KVCache) -> list[tuple[KVQuantizer, KVQuantizer]]:
    """Keys' and values' quantizers per decoder layer: static codecs take the layer's calibrated
    scales; LowbitError when the model has none."""
    attentions = attention_modules(model)
    scales = kv_scales(model)
    if kv.static and len(scales) != len(attentions):
        raise LowbitError(f"{kv.name or 'this KV cache'} takes static scales calibrated for the model, and "
                          f"{'it has none' if not scales else f'only {len(scales)} of {len(attentions)} layers have them'}"
                          ": quantize the model with a recipe whose kv_cache has static: true")
    out = []
    for name in attentions:
        k, v = scales.get(name, (None, None))
        out.append((kv.keys.quantizer(k if kv.keys.static else None), kv.values.quantizer(v if kv.values.static else None)))
    return out


def new_cache(model: nn.Module, kv: KVCache) -> QuantizedKVCache:
    """An empty quantized cache for one generation."""
    return QuantizedKVCache(layer_quantizers(model, kv), kv.residual)


@contextlib.contextmanager
def emulated(model: nn.Module, kv: KVCache | None) -> Iterator[None]:
    """Within the block, whole-sequence forwards of ``model`` read keys and values as generation with
    ``kv`` would (nothing changes when ``kv`` is None)."""
    if kv is None:
        yield
        return
    try:
        with emulate_kv_cache(model, layer_quantizers(model, kv), kv.residual):
            yield
    except ValueError as e:
        raise LowbitError(f"--kv-cache: {e}") from None


def kv_cache_args(parser: Any) -> None:
    from lowbit.recipes.kv_cache import KV_PRESETS

    parser.add_argument("--kv-cache", metavar="PRESET|FILE",
                        help="store keys and values quantized: " + ", ".join(f"{n} ({h})" for n, (h, _) in KV_PRESETS.items())
                        + "; a YAML file of the fields; none: in the model's dtype (default: the recipe's, else none)")
