"""Every architecture in the table quantizes end to end on a tiny random-weight model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lowbit import LowbitError
from lowbit.models import ARCHITECTURES, architecture_of
from lowbit.modules import QuantLinear
from lowbit.pipeline import quantize_model
from lowbit.recipes import Recipe, resolve_recipe

FAMILIES = ["llama", "mistral", "qwen2", "gpt2", "opt", "phi3", "gemma"]


def _ids(n: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 256, (2, n), generator=torch.Generator().manual_seed(seed))


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D"


def _as_out_in(m: nn.Module) -> torch.Tensor:
    return m.weight.detach().t() if _is_conv1d(m) else m.weight.detach()


def dequantized_reference(original: nn.Module, quantized: nn.Module, names: list[str], dense_dtype: torch.dtype) -> nn.Module:
    """``original`` with each quantized linear's weight replaced by ``qt.dequantize()`` in the
    module's own layout, and every other tensor rounded through ``dense_dtype`` as lowbit stores it."""
    ref = copy.deepcopy(original)
    with torch.no_grad():
        for p in ref.parameters():
            p.data = p.data.to(dense_dtype).float()
        for name in names:
            qt = quantized.get_submodule(name).qweight
            m = ref.get_submodule(name)
            w = qt.dequantize()
            m.weight.data = w.t().contiguous() if _is_conv1d(m) else w
    return ref


@pytest.mark.parametrize("family", FAMILIES)
def test_family_quantizes_and_matches_dequantized_reference(family: str, tiny_model) -> None:  # type: ignore[no-untyped-def]
    original = tiny_model(family)
    model = copy.deepcopy(original)
    arch = architecture_of(model)
    assert arch is ARCHITECTURES[family]
    recipe = resolve_recipe("w4a16-asym", group_size=32)
    report = quantize_model(model, recipe, progress=False)

    n_blocks = len(arch.block_list(model))
    expected = [f"{arch.blocks}.{i}.{n}" for i in range(n_blocks) for n in arch.linear_names()]
    assert report.quantized == expected and report.skipped == []
    quant_names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert sorted(quant_names) == sorted(expected)  # every table linear, nothing else (lm_head stays dense)
    assert model.lowbit_recipe == recipe

    for name in expected:
        q = model.get_submodule(name)
        o = original.get_submodule(name)
        w = _as_out_in(o)
        # logical shape (out, in) -- for GPT-2's Conv1D the stored weight is (in, out)
        assert (q.out_features, q.in_features) == tuple(w.shape)
        # orientation and values: within half a step of the original weight, element by element
        # (a missing or extra transpose of a square Conv1D weight fails here)
        qt = q.qweight
        step = qt.data["scale"].float().repeat_interleave(32, dim=1)[:, : w.shape[1]]
        # (half a step, plus the fp16 rounding of the scale at the clamped ends of the range)
        assert torch.all((qt.dequantize() - w).abs() <= step * 0.51), name
        if getattr(o, "bias", None) is not None:
            assert torch.equal(q.bias, o.bias.detach().half().float()), name
        else:
            assert q.bias is None

    ref = dequantized_reference(original, model, expected, torch.float16)
    ids = _ids()
    with torch.no_grad():
        got = model(input_ids=ids).logits
        want = ref(input_ids=ids).logits
        orig = original(input_ids=ids).logits
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-4), (got - want).abs().max()
    # and quantization did change the model (the comparison above is not vacuous)
    assert (got - orig).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama"])
def test_int8_stays_close_to_the_original(family: str, tiny_model) -> None:  # type: ignore[no-untyped-def]
    original = tiny_model(family)
    model = copy.deepcopy(original)
    quantize_model(model, resolve_recipe("int8"), progress=False)
    ids = _ids(seed=1)
    with torch.no_grad():
        got = torch.log_softmax(model(input_ids=ids).logits, -1)
        want = torch.log_softmax(original(input_ids=ids).logits, -1)
    kld = (want.exp() * (want - got)).sum(-1).mean()
    assert kld < 1e-3
    # a wrong orientation or a lost bias would be far off
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_tied_embeddings_stay_tied(tiny_model) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama", tie_word_embeddings=True)
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    quantize_model(model, resolve_recipe("w4a16-g64"), progress=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert isinstance(model.lm_head, nn.Linear)


def test_unknown_architecture(tiny_model) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama")
    model.config.model_type = "bert"
    with pytest.raises(LowbitError, match="unsupported architecture 'bert'") as ei:
        architecture_of(model)
    assert "llama" in str(ei.value) and "gpt2" in str(ei.value)
    with pytest.raises(LowbitError, match="unsupported architecture"):
        quantize_model(model, resolve_recipe("w4a16"), progress=False)
    with pytest.raises(LowbitError, match="unsupported architecture None"):
        architecture_of(nn.Linear(2, 2))


def test_block_list_must_be_a_module_list(tiny_model) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama")
    model.model.layers = nn.Sequential(*model.model.layers)
    with pytest.raises(LowbitError, match="not a list of blocks"):
        ARCHITECTURES["llama"].block_list(model)


def test_missing_linear_is_reported(tiny_model) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama")
    del model.model.layers[1].mlp.up_proj
    with pytest.raises(LowbitError, match="block has no module mlp.up_proj"):
        quantize_model(model, Recipe.from_dict({"codec": {"name": "int", "bits": 4, "group_size": 32}}), progress=False)


def test_steps_cover_every_block_linear(tiny_model) -> None:  # type: ignore[no-untyped-def]
    # the table lists every nn.Linear/Conv1D inside a block, so nothing is silently left dense
    for family in FAMILIES:
        model = tiny_model(family)
        arch = architecture_of(model)
        block = arch.block_list(model)[0]
        linears = {n for n, m in block.named_modules() if isinstance(m, nn.Linear) or _is_conv1d(m)}
        assert linears == set(arch.linear_names()), family
