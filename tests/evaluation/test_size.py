"""model_size: exact bytes and bits per weight of a model as lowbit stores it."""

from __future__ import annotations

import pytest

from lowbit.bench.compare import block_linear_names
from lowbit.evaluation import model_size
from lowbit.modules import QuantLinear
from lowbit.pipeline import quantize_model
from lowbit.recipes import Recipe, resolve_recipe


def test_unquantized(tiny_model) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama")
    names = block_linear_names(model)
    assert len(names) == 14
    size = model_size(model, names)
    n_params = sum(p.numel() for p in model.parameters())
    assert size.model_bytes == 4 * n_params
    assert size.bits_per_weight == 32.0
    lin = sum(model.get_submodule(n).weight.numel() for n in names)
    assert size.linear_params == lin and size.linear_bytes == 4 * lin


@pytest.mark.parametrize("tied", [False, True])
def test_quantized(tiny_model, tied: bool) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama", tie_word_embeddings=tied)
    model.tie_weights()
    names = block_linear_names(model)
    lin = sum(model.get_submodule(n).weight.numel() for n in names)
    quantize_model(model, resolve_recipe("w4a16", group_size=32), progress=False)
    size = model_size(model, names)
    # 4-bit codes + one fp16 scale per 32 weights
    assert size.bits_per_weight == pytest.approx(4.5, abs=1e-12)
    assert size.linear_params == lin and size.linear_bytes == lin * 9 // 16
    dense = sum(p.numel() for p in model.parameters()) * 2  # fp16 storage, a tied tensor once
    quant = sum(m.qweight.nbytes for m in model.modules() if isinstance(m, QuantLinear))
    assert size.model_bytes == dense + quant
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied


def test_partly_quantized(tiny_model) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama")
    names = block_linear_names(model)
    recipe = Recipe.from_dict({"codec": {"name": "int", "bits": 8, "granularity": "channel"},
                               "targets": ["model.layers.0.*"], "dense_dtype": "bfloat16"})
    quantize_model(model, recipe, progress=False)
    size = model_size(model, names)
    q = [n for n in names if n.startswith("model.layers.0.")]
    d = [n for n in names if n.startswith("model.layers.1.")]
    q_params = sum(model.get_submodule(n).in_features * model.get_submodule(n).out_features for n in q)
    q_bytes = sum(model.get_submodule(n).qweight.nbytes for n in q)
    d_params = sum(model.get_submodule(n).weight.numel() for n in d)
    assert size.linear_params == q_params + d_params
    assert size.linear_bytes == q_bytes + 2 * d_params  # the dense linears in bf16
    assert size.bits_per_weight == pytest.approx(8 * (q_bytes + 2 * d_params) / (q_params + d_params))
