"""The layer-wise runner: input checks, module selection, dense rounding."""

from __future__ import annotations

import copy
from typing import Literal

import pytest
import torch
from torch import nn

from lowbit import LowbitError
from lowbit.algorithms import Algorithm
from lowbit.modules import QuantLinear
from lowbit.pipeline import check_finite, quantize_model
from lowbit.recipes import Recipe, resolve_recipe


def _recipe(**fields) -> Recipe:  # type: ignore[no-untyped-def]
    return Recipe.from_dict({"codec": {"name": "int", "bits": 4, "group_size": 32}, **fields})


@pytest.mark.parametrize(
    ("tensor", "value"),
    [
        ("model.layers.1.mlp.up_proj.weight", float("nan")),
        ("model.layers.0.self_attn.k_proj.weight", float("inf")),
        ("model.layers.0.input_layernorm.weight", float("-inf")),
        ("model.embed_tokens.weight", float("nan")),
    ],
)
def test_non_finite_weight_is_named(tiny_model, tensor: str, value: float) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama")
    with torch.no_grad():
        p = model.get_parameter(tensor)
        p.view(-1)[p.numel() // 2] = value
    with pytest.raises(LowbitError, match=f"weight {tensor} contains NaN or Inf"):
        quantize_model(model, resolve_recipe("w4a16"), progress=False)
    # checked before anything is touched
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    with pytest.raises(LowbitError, match=tensor):
        check_finite(model)


def test_finite_model_passes_check(tiny_model) -> None:  # type: ignore[no-untyped-def]
    check_finite(tiny_model("gpt2"))


def test_targets_and_ignore(tiny_model) -> None:  # type: ignore[no-untyped-def]
    original = tiny_model("llama")
    model = copy.deepcopy(original)
    recipe = _recipe(targets=["model.layers.0.*", "*.o_proj"], ignore=["*.down_proj", "*.k_proj"])
    report = quantize_model(model, recipe, progress=False)
    expected = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.1.self_attn.o_proj",
    ]
    assert report.quantized == expected
    assert set(report.skipped) == {
        "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj",
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj",
    }
    quantized = sorted(n for n, m in model.named_modules() if isinstance(m, QuantLinear))
    assert quantized == sorted(expected)
    for name in report.skipped:
        m = model.get_submodule(name)
        assert type(m) is nn.Linear
        # left dense, rounded through the recipe's dense dtype
        assert torch.equal(m.weight, original.get_submodule(name).weight.half().float())
    assert report.seconds > 0 and model.lowbit_recipe is recipe


@pytest.mark.parametrize("fields", [{"targets": ["nothing.*"]}, {"ignore": ["*"]}])
def test_a_recipe_that_quantizes_nothing_is_refused(tiny_model, fields: dict) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LowbitError, match="quantizes none of the model's 14 linears .*: nothing to do"):
        quantize_model(model, _recipe(**fields), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_patterns_that_match_no_linear_warn(tiny_model) -> None:  # type: ignore[no-untyped-def]
    recipe = Recipe.from_dict({"codec": {"name": "int", "bits": 4, "group_size": 32}, "ignore": ["*.mlp.donw_proj"],
                               "rules": [{"match": "*.self_attn.q_proj", "codec": {"name": "int", "bits": 8}},
                                         {"match": "re:.*attn\\.qproj", "codec": {"name": "int", "bits": 8}}]})
    with pytest.warns(UserWarning) as record:
        report = quantize_model(tiny_model("llama"), recipe, progress=False)
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 2
    assert "ignore[0] '*.mlp.donw_proj' matches no linear of the model (they are named like model.layers.0." in messages[0]
    assert "rules[1] 're:.*attn\\\\.qproj' matches no linear" in messages[1]
    assert len(report.quantized) == 14


@pytest.mark.parametrize("dense_dtype", ["float16", "bfloat16", "float32"])
def test_dense_tensors_rounded_to_dense_dtype(tiny_model, dense_dtype: str) -> None:  # type: ignore[no-untyped-def]
    original = tiny_model("qwen2")
    model = copy.deepcopy(original)
    quantize_model(model, _recipe(dense_dtype=dense_dtype), progress=False)
    dt = getattr(torch, dense_dtype)
    dense = {n: p for n, p in model.named_parameters()}
    assert "model.embed_tokens.weight" in dense and "lm_head.weight" in dense
    assert "model.layers.0.self_attn.q_proj.bias" in dense  # bias of a quantized linear
    n_changed = 0
    for name, p in dense.items():
        src = original.get_parameter(name).detach()
        assert p.dtype == torch.float32  # the values are rounded, the compute dtype stays
        assert torch.equal(p.detach(), src.to(dt).float()), name
        n_changed += not torch.equal(p.detach(), src)
    assert (n_changed > 0) == (dense_dtype != "float32")
    # non-persistent buffers (rotary inv_freq) are not stored, so not rounded
    for name, b in model.named_buffers():
        if "inv_freq" in name:
            assert torch.equal(b, dict(original.named_buffers())[name])
    # quantized parts keep their storage dtypes
    q = model.model.layers[0].self_attn.q_proj
    assert q.qweight_codes.dtype == torch.uint8 and q.qweight_scale.dtype == torch.float16


def test_not_a_linear(tiny_model) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama")
    model.model.layers[0].mlp.up_proj = nn.Identity()
    with pytest.raises(LowbitError, match="cannot quantize a Identity: not a linear layer"):
        quantize_model(model, _recipe(), progress=False)


def test_calibration_algorithms_refused(tiny_model) -> None:  # type: ignore[no-untyped-def]
    class NeedsData(Algorithm):
        name: Literal["needs-data-test"] = "needs-data-test"

        @property
        def needs_calibration(self) -> bool:
            return True

        def quantize(self, weight, codec, stats=None):  # type: ignore[no-untyped-def]
            raise AssertionError("not reached")

    try:
        recipe = Recipe(codec=resolve_recipe("w4a16").codec, algorithm=NeedsData())
        with pytest.raises(LowbitError, match="needs calibration"):
            quantize_model(tiny_model("llama"), recipe, progress=False)
    finally:
        Algorithm.registry.pop("needs-data-test", None)
