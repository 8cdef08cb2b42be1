"""Static KV-cache scales (vLLM's ``k_scale`` / ``v_scale``): the keys and values each attention
layer writes to its cache, observed on calibration data through the quantized model, as generation
will produce them (keys after rotary embedding)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicCache

from lowbit.calibration.observers import ObserverState
from lowbit.models.architectures import cache_argument
from lowbit.modules.kv_cache import attention_modules
from lowbit.recipes.kv_cache import KVCache, KVCodec


class _ObservingCache(DynamicCache):
    """A cache that shows each layer's new keys and values to the observers and keeps nothing: one
    forward over whole sequences sees every token's keys and values exactly once."""

    def __init__(self, observers: list[tuple[ObserverState | None, ObserverState | None]], config: Any) -> None:
        super().__init__(config=config)
        self.observers = observers

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        for state, x in zip(self.observers[layer_idx], (key_states, value_states)):
            if state is not None:
                state.add(x)
        return key_states, value_states


def _scale(codec: KVCodec, state: ObserverState | None) -> float:
    if state is None:
        return 1.0  # a dynamic side: its scale is not read
    lo, hi = state.range()
    scale = codec.scale_quantizer().from_range(lo, hi)["scale"]
    return float(scale.reshape(-1)[0])


def calibrate_kv_scales(model: nn.Module, kv: KVCache, tokens: torch.Tensor, batch_size: int = 8,
                        progress: bool = True) -> dict[str, tuple[float, float]]:
    """Per attention module (by name): the keys' and values' static scales that ``kv``'s observers
    choose for the keys and values ``model`` caches over ``tokens`` ``(samples, seq_len)``; a
    side with dynamic scales gets 1.0 (unused)."""
    attentions = attention_modules(model)
    observers = [tuple(c.observer.start(False, c.scale_quantizer()) if c.static else None  # type: ignore[union-attr]
                       for c in (kv.keys, kv.values)) for _ in attentions]
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    batches = tokens.split(batch_size)
    with torch.no_grad():
        for batch in tqdm(batches, desc="KV cache scales", unit="batch", disable=not progress):
            model(batch, use_cache=True, **{cache_argument(model): _ObservingCache(observers, cfg)})
    return {name: (_scale(kv.keys, k), _scale(kv.values, v)) for name, (k, v) in zip(attentions, observers)}
