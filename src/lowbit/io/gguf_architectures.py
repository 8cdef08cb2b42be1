"""The model families lowbit writes (and reads) as GGUF files, as llama.cpp's own converter
(``convert_hf_to_gguf.py``) writes them: llama.cpp's architecture name, the hyper-parameters it
reads, and how tensors differ from the Hugging Face checkpoint.

One :class:`GGUFArch` per transformers ``model_type``:

* ``permute_qk``: Llama-style rotary halves (llama, mistral, mixtral): q/k rows reordered;
* ``norm_plus_one``: Gemma's RMSNorm scales by ``1 + w``, llama.cpp's by ``w``: norms written ``+ 1``;
* ``conv1d``: GPT-2 stores its linears as ``Conv1D`` ``(in, out)``: written transposed;
* ``hparams``: what the converter's ``set_gguf_parameters`` writes for the family, from the
  config as a dict (``config.to_dict()``, the fields of ``config.json``);
* ``extra_tensors``: what its ``generate_extra_tensors`` adds: Llama 3.1's rope frequency
  factors, Phi-3's long and short rope factors.

OPT is not here: llama.cpp has no OPT architecture.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lowbit.errors import LowbitError

Hparams = dict[str, Any]


def _first(hp: Hparams, *keys: str) -> Any:
    return next((hp[k] for k in keys if hp.get(k) is not None), None)


def _rope(hp: Hparams) -> dict[str, Any]:
    rope = hp.get("rope_parameters") or hp.get("rope_scaling") or {}
    rope = rope.get("full_attention", rope) if isinstance(rope, dict) else {}
    return {"rope_theta": hp.get("rope_theta"), **rope}


def text_hparams(w: Any, hp: Hparams, extra_rope: tuple[str, ...] = ()) -> None:
    """The converter's default (``TextModel.set_gguf_parameters``); ``extra_rope``: rope types
    that the family writes as tensors of rope factors (:attr:`GGUFArch.extra_tensors`)."""
    w.add_block_count(_first(hp, "num_hidden_layers", "n_layer"))
    for add, keys in ((w.add_context_length, ("max_position_embeddings", "n_ctx", "n_positions")),
                      (w.add_embedding_length, ("hidden_size", "n_embd")),
                      (w.add_feed_forward_length, ("intermediate_size", "n_inner")),
                      (w.add_head_count, ("num_attention_heads", "n_head")),
                      (w.add_head_count_kv, ("num_key_value_heads",))):
        if (v := _first(hp, *keys)) is not None:
            add(v)
    rope = _rope(hp)
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        w.add_rope_scaling_type(_gguf().RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif kind == "yarn":
        w.add_rope_scaling_type(_gguf().RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif kind != "default" and kind not in extra_rope:
        raise LowbitError(f"the GGUF writer does not handle rope_type {kind!r} for this family yet")
    if rope.get("rope_theta") is not None:
        w.add_rope_freq_base(float(rope["rope_theta"]))
    if (eps := hp.get("rms_norm_eps")) is not None:
        w.add_layer_norm_rms_eps(float(eps))
    if (eps := _first(hp, "layer_norm_eps", "layer_norm_epsilon")) is not None:
        w.add_layer_norm_eps(float(eps))
    if (n := _first(hp, "num_local_experts", "num_experts")) is not None:
        w.add_expert_count(n)
    if (n := _first(hp, "num_experts_per_tok")) is not None:
        w.add_expert_used_count(n)
    if (head_dim := hp.get("head_dim")) is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)


def _gguf():  # type: ignore[no-untyped-def]
    import gguf

    return gguf


def llama_hparams(w: Any, hp: Hparams) -> None:
    text_hparams(w, hp, extra_rope=("llama3",))
    w.add_vocab_size(hp["vocab_size"])
    w.add_rope_dimension_count(hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"])


def qwen_moe_hparams(w: Any, hp: Hparams) -> None:
    if not hp.get("norm_topk_prob"):
        raise LowbitError("Qwen3-MoE with norm_topk_prob false: llama.cpp renormalizes the chosen experts' weights "
                          "(as every released Qwen3-MoE does), so its GGUF file would compute another model")
    text_hparams(w, hp)
    if hp.get("moe_intermediate_size") is not None:
        w.add_expert_feed_forward_length(hp["moe_intermediate_size"])


def olmoe_hparams(w: Any, hp: Hparams) -> None:
    if hp.get("norm_topk_prob"):
        raise LowbitError("OLMoE with norm_topk_prob true: llama.cpp does not renormalize the chosen experts' weights")
    if (hp.get("num_key_value_heads") or hp["num_attention_heads"]) != hp["num_attention_heads"]:
        raise LowbitError("OLMoE with grouped-query attention: llama.cpp normalizes its keys over the full hidden width "
                          "(one key/value head per attention head, as in the released OLMoE)")
    text_hparams(w, {**hp, "rms_norm_eps": 1e-5})  # the converter writes 1e-5, whatever the config says


def gemma_hparams(w: Any, hp: Hparams) -> None:
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_block_count(hp["num_hidden_layers"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    w.add_head_count_kv(hp.get("num_key_value_heads") or hp["num_attention_heads"])
    w.add_layer_norm_rms_eps(float(hp["rms_norm_eps"]))
    w.add_key_length(hp["head_dim"])
    w.add_value_length(hp["head_dim"])


def gemma2_hparams(w: Any, hp: Hparams) -> None:
    scalar = hp.get("query_pre_attn_scalar")
    if scalar is not None and scalar != hp["head_dim"]:  # as every Gemma 2 but the 27B
        raise LowbitError(f"Gemma 2 with query_pre_attn_scalar {scalar} and head_dim {hp['head_dim']}: llama.cpp scales "
                          "the queries by 1/sqrt(head_dim) (by the hidden size per head for the 27B model only), "
                          "so its GGUF file would compute another model")
    gemma_hparams(w, hp)
    w.add_attn_logit_softcapping(float(hp["attn_logit_softcapping"]))
    w.add_final_logit_softcapping(float(hp["final_logit_softcapping"]))
    w.add_sliding_window(int(hp["sliding_window"]))


def _head_dim(hp: Hparams) -> int:
    return hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]


def llama3_rope_factors(hp: Hparams) -> list[tuple[str, Any]]:
    """``rope_freqs.weight`` ``(head_dim / 2,)`` float32 for Llama 3.1's rope scaling (rope_type
    llama3), as llama.cpp's converter computes it: each rotary frequency's divisor (1 for short
    wavelengths, ``factor`` for long ones, a smooth blend between); none for other rope types."""
    import numpy as np

    rope = _rope(hp)
    if rope.get("rope_type") != "llama3":
        return []
    dim = _head_dim(hp)
    base = rope.get("rope_theta") or 10000.0
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_len = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_len / low, old_len / high
    factors = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return [("rope_freqs.weight", np.array(factors, dtype=np.float32))]


def _phi3_rope(hp: Hparams) -> tuple[dict[str, Any], int, int]:
    """Phi-3's rope parameters, rotary dimensions per head and original context length."""
    rope = _rope(hp)
    rope_dims = int(rope.get("partial_rotary_factor", hp.get("partial_rotary_factor") or 1.0) * hp["hidden_size"]) \
        // hp["num_attention_heads"]
    orig = rope.get("original_max_position_embeddings") or hp["original_max_position_embeddings"]
    return rope, rope_dims, orig


def phi3_rope_factors(hp: Hparams) -> list[tuple[str, Any]]:
    """``rope_factors_long.weight`` and ``rope_factors_short.weight`` ``(rope_dims / 2,)`` float32
    of Phi-3's long-context rope (rope_type longrope), as llama.cpp's converter writes them."""
    import numpy as np

    rope, rope_dims, _ = _phi3_rope(hp)
    if not rope.get("long_factor"):
        return []
    long, short = rope["long_factor"], rope.get("short_factor")
    if short is None or len(long) != len(short) or 2 * len(long) != rope_dims:
        raise LowbitError(f"Phi-3 longrope needs long and short factors of {rope_dims // 2} values each "
                          f"(got {len(long)} and {None if short is None else len(short)})")
    return [("rope_factors_long.weight", np.array(long, dtype=np.float32)),
            ("rope_factors_short.weight", np.array(short, dtype=np.float32))]


def phi3_hparams(w: Any, hp: Hparams) -> None:
    rope, rope_dims, orig = _phi3_rope(hp)
    if rope.get("long_factor"):
        kind = rope.get("rope_type", "")
        if kind not in ("longrope", "su"):
            raise LowbitError(f"Phi-3 with long and short rope factors and rope_type {kind!r}: the GGUF writer "
                              "writes rope_type longrope")
        scale = hp["max_position_embeddings"] / orig
        # the attention factor llama.cpp applies with the long factors (transformers' longrope does the same)
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0)
    n_embd, n_head = hp["hidden_size"], hp["num_attention_heads"]
    w.add_context_length(hp["max_position_embeddings"])
    w.add_rope_scaling_orig_ctx_len(orig)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_block_count(hp["num_hidden_layers"])
    w.add_head_count(n_head)
    w.add_head_count_kv(hp["num_key_value_heads"])
    w.add_layer_norm_rms_eps(float(hp["rms_norm_eps"]))
    w.add_rope_dimension_count(rope_dims)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_sliding_window(hp.get("sliding_window") or 0)


def gpt2_hparams(w: Any, hp: Hparams) -> None:
    w.add_block_count(hp["n_layer"])
    w.add_context_length(hp["n_ctx"] if hp.get("n_ctx") is not None else hp["n_positions"])
    w.add_embedding_length(hp["n_embd"])
    w.add_feed_forward_length(4 * hp["n_embd"])
    w.add_head_count(hp["n_head"])
    w.add_layer_norm_eps(float(hp["layer_norm_epsilon"]))


@dataclass(frozen=True)
class GGUFArch:
    name: str  # llama.cpp's architecture name
    hparams: Callable[[Any, Hparams], None] = text_hparams
    permute_qk: bool = False
    norm_plus_one: bool = False
    conv1d: bool = False
    # tensors the converter adds from the config (rope factors): (GGUF name, float32 array)
    extra_tensors: Callable[[Hparams], list[tuple[str, Any]]] = lambda hp: []


# transformers model_type -> how llama.cpp's converter writes it
GGUF_ARCHITECTURES: dict[str, GGUFArch] = {
    "llama": GGUFArch("llama", llama_hparams, permute_qk=True, extra_tensors=llama3_rope_factors),
    "mistral": GGUFArch("llama", llama_hparams, permute_qk=True),
    "mixtral": GGUFArch("llama", llama_hparams, permute_qk=True),
    "qwen2": GGUFArch("qwen2"),
    "qwen3": GGUFArch("qwen3"),
    "qwen3_moe": GGUFArch("qwen3moe", qwen_moe_hparams),
    "olmoe": GGUFArch("olmoe", olmoe_hparams),
    "gemma": GGUFArch("gemma", gemma_hparams, norm_plus_one=True),
    "gemma2": GGUFArch("gemma2", gemma2_hparams, norm_plus_one=True),
    "phi3": GGUFArch("phi3", phi3_hparams, extra_tensors=phi3_rope_factors),
    "gpt2": GGUFArch("gpt2", gpt2_hparams, conv1d=True),
}
# what llama.cpp cannot run, and why
NOT_IN_LLAMA_CPP = {"opt": "llama.cpp has no OPT architecture"}


def gguf_architecture(model_type: str | None) -> GGUFArch:
    """The :class:`GGUFArch` of a transformers ``model_type``; LowbitError naming the known ones."""
    arch = GGUF_ARCHITECTURES.get(model_type or "")
    if arch is None:
        why = NOT_IN_LLAMA_CPP.get(model_type or "", "the GGUF writer does not know it")
        raise LowbitError(f"cannot write architecture {model_type!r} as GGUF: {why}; GGUF architectures: "
                          f"{', '.join(sorted(GGUF_ARCHITECTURES))}")
    return arch
