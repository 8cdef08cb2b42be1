"""llama-quantize's type mixes (Q4_K_M, Q3_K_M, ...) as data, resolved against a model.

A mix names a default type and per-tensor rules: which tensors get another type, by their
llama.cpp role (``attn_v``, ``ffn_down``, ...) and layer. The rules here are those of llama.cpp's
``llama_tensor_get_type`` for dense models (its MoE, Falcon and 70B special cases are left out),
then its fallback for rows that are not whole blocks (a k-quant on 576-wide rows becomes a
32-block type; a type that still does not fit stays F16). The output tensor (or, for tied
embeddings, the token embedding it shares) gets Q8_0 when its rows are not whole blocks of the
default type or the default is Q8_0, else Q6_K; an untied token embedding gets the default type.

:func:`resolve_gguf_mix` turns a recipe that names a mix into one with an explicit rule per
linear (user rules come first and win, as llama-quantize's ``--tensor-type`` overrides do) and the
embedding / LM head codecs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from lowbit.codecs import codec_from_dict
from lowbit.io.ggml_blocks import block_size
from lowbit.recipes.gguf_mix_table import FALLBACK, MIXES, Mix, TypeRule  # noqa: F401 (the table, re-exported)

if TYPE_CHECKING:
    from lowbit.recipes.recipe import Recipe


def _layer_selected(layers: str, i: int, n: int) -> bool:
    if layers == "all":
        return True
    if layers == "more_bits":
        return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2
    return {"first_8th": i < n // 8, "first_16th": i < n // 16, "first_2": i < 2, "first_4": i < 4}[layers]


def mix_type(mix: Mix, role: str, layer: int, n_layers: int, gqa: int, imatrix: bool) -> str:
    """The type llama-quantize's mix gives a block tensor of ``role`` in ``layer``."""
    for r in mix.rules:
        if r.role != role or not _layer_selected(r.layers, layer, n_layers):
            continue
        if (r.when == "gqa>=4" and gqa < 4) or (r.when == "imatrix" and not imatrix):
            continue
        return r.type
    return mix.default


def output_type(mix: Mix, cols: int) -> str:
    """The type of the output tensor (or of a token embedding tied to it)."""
    if cols % block_size(mix.default.upper()) or mix.default == "q8_0":
        return "q8_0"
    return "q6_k"


def fit_type(ggml_codec: str, cols: int) -> str | None:
    """``ggml_codec``, or llama.cpp's fallback when rows of ``cols`` are not whole blocks of it;
    None (keep F16) when the fallback does not fit either."""
    t = ggml_codec
    if cols % block_size(t.upper()):
        t = FALLBACK.get(t, t)
    return None if cols % block_size(t.upper()) else t


_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


@dataclass(frozen=True)
class ResolvedMix:
    """Per linear (HF module name) its GGUF codec name, or None to keep it F16; the codec names
    of the token embedding and of an untied LM head."""

    linears: dict[str, str | None]
    embedding: str | None
    lm_head: str | None


def plan_gguf_mix(model: nn.Module, mix_name: str, imatrix: bool) -> ResolvedMix:
    """llama-quantize's choice of types for ``model``'s tensors under the mix ``mix_name``."""
    from lowbit.io.gguf_writer import check_gguf_architecture
    from lowbit.io.imatrix import linear_gguf_names

    mix = MIXES[mix_name]
    check_gguf_architecture(model)  # a mix is for a file the writer can write
    cfg = model.config
    n_layers = cfg.num_hidden_layers
    gqa = cfg.num_attention_heads // (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    linears: dict[str, str | None] = {}
    for name, (gguf_name, width) in linear_gguf_names(model).items():
        m = _BLOCK_TENSOR.fullmatch(gguf_name)
        if m is None:
            continue
        t = mix_type(mix, m.group(2), int(m.group(1)), n_layers, gqa, imatrix)
        linears[name] = fit_type(t, width)
    emb = model.get_input_embeddings().weight
    out_t = fit_type(output_type(mix, emb.shape[1]), emb.shape[1])
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    emb_t = out_t if tied else fit_type(mix.default, emb.shape[1])
    return ResolvedMix(linears, emb_t, None if tied else out_t)


def resolve_gguf_mix(recipe: "Recipe", model: nn.Module) -> "Recipe":
    """``recipe`` with its ``gguf_mix`` turned into an explicit rule per linear whose type
    differs from the recipe's codec (``gguf_mix`` stays, as a label; resolving again changes
    nothing), ``embedding`` and ``lm_head`` codecs, and llama.cpp's
    fallback types for GGUF codecs on rows that are not whole blocks (a linear that no GGUF type
    fits is kept F16 through ``ignore``). A linear that one of the user's rules gives a codec
    keeps it (with the fallback), as llama-quantize's ``--tensor-type`` overrides do. Unchanged
    when the recipe names no mix and needs no fallback."""
    from lowbit.codecs.ggml_legacy import GGMLBlockCodec
    from lowbit.recipes.recipe import Rule, matches

    plan = plan_gguf_mix(model, recipe.gguf_mix, recipe.needs_calibration) if recipe.gguf_mix else None
    base = recipe
    rules, dense = [], []
    for name, module in model.named_modules():
        a = base.assignment(name) if isinstance(module, nn.Linear) and name != "lm_head" else None
        if a is None:
            continue
        codec, algorithm = a
        user_codec = any(r.codec is not None and matches(r.match, name) for r in recipe.rules)
        t: str | None = codec.name
        if plan is not None and not user_codec and name in plan.linears:
            t = plan.linears[name]
        elif isinstance(codec, GGMLBlockCodec):
            t = fit_type(codec.name, module.in_features)
        if t == codec.name:
            continue
        exact = "re:" + re.escape(name)
        if t is None:
            dense.append(exact)
        else:
            rules.append(Rule(match=exact, codec=codec_from_dict({"name": t}), algorithm=algorithm))
    if plan is None and not rules and not dense:
        return recipe
    update: dict[str, object] = {"rules": rules + list(recipe.rules), "ignore": list(recipe.ignore) + dense}
    if plan is not None:
        update["embedding"] = None if plan.embedding is None else codec_from_dict({"name": plan.embedding})
        update["lm_head"] = None if plan.lm_head is None else codec_from_dict({"name": plan.lm_head})
    return base.model_copy(update=update)
