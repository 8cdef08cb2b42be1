"""Attention for one query token (a decode step), under an attention name of lowbit's own that
transformers' models look up per call.

torch's fused SDPA kernel on a CPU has a large fixed cost per call for one query over a short cache
(BENCHMARKS.md, the decode-operator table of ``scripts/benchmark_speed.py``). lowbit's compiled operator
(``torch.ops.lowbit.one_query_attention``, :mod:`lowbit.modules.native`) computes every head in
float32 in one pass over the cache; where it is not built (or for an additive mask), two small
matmuls and a softmax, the numerics of transformers' ``eager`` attention (scores in the model's
dtype, the softmax in float32, its weights rounded to the model's dtype). A whole float32 causal window
(evaluation, a prompt without padding) takes ``torch.ops.lowbit.causal_attention`` (``native_prefill.cpp``:
1.5x torch's flash kernel on SmolLM2's 512-token windows here); any other query block goes to
transformers' SDPA path unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.modules.native import row_products

#: the attention implementation name lowbit registers with transformers
NAME = "lowbit_decode"
_registered: list[bool] = []
# whether the compiled operator is here, asked once when a model switches (not per call: asking
# calls into the extension module, which torch.compile cannot trace)
_operator_here: list[bool] = [False]


def one_query_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        **kwargs: object) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: ``query (B, H, q, D)``, ``key``/``value`` ``(B, Hkv, L, D)``,
    a boolean (True: attend) or additive mask broadcastable to ``(B, H, q, L)``; returns ``(B, q, H, D)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _causal_native(module, query, key, value, attention_mask, dropout, kwargs):
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        return torch.ops.lowbit.causal_attention(query, key, value, scale), None
    if query.shape[2] != 1 or dropout or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None \
            or key.shape[1] == 0 or query.shape[1] % key.shape[1]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    scale = dim ** -0.5 if scaling is None else scaling
    mask = None if attention_mask is None else attention_mask[:, :, -1:, : key.shape[2]]
    if _native(query, key, value, mask):
        rows = None if mask is None else mask.reshape(mask.shape[0], key.shape[2])
        return torch.ops.lowbit.one_query_attention(query.reshape(batch, heads, dim).contiguous(), key, value, rows,
                                                    scale), None
    # query heads grouped by their key/value head (h -> h // groups, as transformers' repeat_kv)
    q = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(q, key.transpose(2, 3)) * scale  # (B, Hkv, groups, L)
    if mask is not None:
        mask = mask.reshape(mask.shape[0], -1, 1, key.shape[2])
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    out = torch.matmul(weights, value)  # (B, Hkv, groups, D)
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def _native(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether lowbit's compiled operator takes this call: vectorized here, CPU tensors of one dtype
    (float32 or bf16), a boolean mask shared by the heads (or none)."""
    if query.device.type != "cpu" or query.dtype not in (torch.float32, torch.bfloat16) \
            or key.dtype != query.dtype or value.dtype != query.dtype or key.shape[-1] != value.shape[-1] \
            or key.stride(-1) != 1 or value.stride(-1) != 1:
        return False
    if mask is not None and (mask.dtype != torch.bool or mask.shape[1] != 1 or mask.shape[0] not in (1, query.shape[0])):
        return False
    return _operator_here[0]


def _causal_native(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   mask: torch.Tensor | None, dropout: float, kwargs: dict) -> bool:
    """Whether ``lowbit::causal_attention`` takes this call: a whole causal window (as many queries as keys, no
    mask: SDPA's ``is_causal`` case), float32 CPU tensors, no softcap / bias / dropout / sliding window."""
    if not _operator_here[0] or mask is not None or dropout or query.shape[2] < 2 or query.shape[2] != key.shape[2] \
            or not (kwargs["is_causal"] if kwargs.get("is_causal") is not None else getattr(module, "is_causal", True)) \
            or kwargs.get("softcap") is not None \
            or kwargs.get("position_bias") is not None or kwargs.get("sliding_window") is not None:
        return False
    return (query.device.type == "cpu" and query.dtype == key.dtype == value.dtype == torch.float32
            and key.shape[1] > 0 and query.shape[1] % key.shape[1] == 0 and key.shape == value.shape
            and query.stride(-1) == key.stride(-1) == value.stride(-1) == 1)


def _register() -> None:
    if _registered:
        return
    _operator_here[0] = row_products()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, one_query_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered.append(True)


def use_one_query_attention(model: nn.Module) -> bool:
    """Switch a model that runs transformers' SDPA attention to :func:`one_query_attention` (its
    prompts and windows still take SDPA); returns whether it did."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    _register()
    config._attn_implementation = NAME
    return True
