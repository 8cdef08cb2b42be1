"""llama-quantize's type mixes (Q4_K_M, Q3_K_M, ...) as data: a default type and per-tensor rules
by llama.cpp role and layer (``llama_tensor_get_type`` for dense models). A recipe names a mix;
:mod:`lowbit.io.gguf_mixes` resolves it against a model's GGUF tensors."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TypeRule:
    """Tensors of ``role`` in the layers ``layers`` selects get ``type``; ``when`` is "" (always),
    ``"gqa>=4"`` (at least 4 query heads per KV head) or ``"imatrix"`` (a calibrated recipe)."""

    role: str
    type: str
    layers: str = "all"  # all | more_bits | first_8th | first_16th | first_2 | first_4
    when: str = ""


@dataclass(frozen=True)
class Mix:
    default: str
    rules: tuple[TypeRule, ...] = ()


MIXES: dict[str, Mix] = {
    "q2_k": Mix("q2_k", (TypeRule("attn_v", "q4_k", when="gqa>=4"), TypeRule("attn_v", "q3_k"),
                         TypeRule("ffn_down", "q3_k"), TypeRule("attn_output", "q3_k"))),
    "q3_k_m": Mix("q3_k", (TypeRule("attn_v", "q5_k", "first_2"), TypeRule("attn_v", "q4_k"),
                           TypeRule("ffn_down", "q5_k", "first_16th"), TypeRule("ffn_down", "q4_k"),
                           TypeRule("attn_output", "q4_k"), TypeRule("attn_qkv", "q4_k"))),
    "q4_k_s": Mix("q4_k", (TypeRule("attn_v", "q5_k", "first_4"), TypeRule("ffn_down", "q5_k", "first_8th"))),
    "q4_k_m": Mix("q4_k", (TypeRule("attn_v", "q6_k", "more_bits"), TypeRule("ffn_down", "q6_k", "more_bits"),
                           TypeRule("attn_qkv", "q5_k"))),
    "q5_k_m": Mix("q5_k", (TypeRule("attn_v", "q6_k", "more_bits"), TypeRule("ffn_down", "q6_k", "more_bits"),
                           TypeRule("attn_qkv", "q6_k"))),
    "q6_k": Mix("q6_k"),
    "q8_0": Mix("q8_0"),
    "q4_0": Mix("q4_0", (TypeRule("ffn_down", "q4_1", "first_8th", when="imatrix"),)),
}

# llama.cpp's tensor_type_fallback for rows that are not whole super-blocks
FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
