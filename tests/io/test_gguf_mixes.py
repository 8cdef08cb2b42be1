"""llama-quantize's type mixes: lowbit's tables against llama.cpp's own choices (stored by
scripts/make_mix_fixture.py from llama-quantize on SmolLM2's F32 GGUF), their resolution into
recipe rules, and the quantized token embedding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf

from lowbit.errors import LowbitError
from lowbit.io.gguf_mixes import fit_type, plan_gguf_mix, resolve_gguf_mix
from lowbit.io.gguf_writer import tensor_name_map
from lowbit.modules import QuantEmbedding, QuantLinear, quantize_embeddings
from lowbit.recipes import Recipe, get_preset

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "llama_quantize_types.json"
MIX_OF = {"Q2_K": "q2_k", "Q3_K_M": "q3_k_m", "Q4_K_S": "q4_k_s", "Q4_K_M": "q4_k_m", "Q5_K_M": "q5_k_m",
          "Q6_K": "q6_k", "Q8_0": "q8_0", "Q4_0": "q4_0"}


@pytest.fixture(scope="module")
def smollm2_shaped() -> tuple[torch.nn.Module, dict]:
    data = json.loads(FIXTURE.read_text())
    with torch.device("meta"):  # shapes only: no weights are needed to choose types
        model = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(**data["config"]))
    return model, data["types"]


@pytest.mark.parametrize("mix", list(MIX_OF))
def test_types_equal_llama_quantizes(mix: str, smollm2_shaped) -> None:  # type: ignore[no-untyped-def]
    model, types = smollm2_shaped
    names = tensor_name_map(model, "llama")
    plan = plan_gguf_mix(model, MIX_OF[mix], imatrix=False)
    ours = {names.get_name(f"{n}.weight", try_suffixes=(".weight",)): (t or "f16").upper() for n, t in plan.linears.items()}
    ours["token_embd.weight"] = (plan.embedding or "f16").upper()
    theirs = {k: v for k, v in types[mix].items() if k.endswith(".weight") and "norm" not in k}
    assert ours == theirs


def test_fallback_types() -> None:
    assert [fit_type(t, 576) for t in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0")] == \
        ["q4_0", "q4_0", "q5_0", "q5_1", "q8_0", "q8_0"]
    assert fit_type("q4_k", 1536) == "q4_k"
    assert fit_type("q4_k", 48) is None  # no 32-block type fits either: F16


def test_resolved_recipe_keeps_user_rules_and_falls_back(tiny_model) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                       num_attention_heads=4, num_key_value_heads=1)
    recipe = Recipe.from_dict({"codec": {"name": "q4_k"}, "gguf_mix": "q4_k_m",
                               "rules": [{"match": "*.layers.3.mlp.down_proj", "codec": {"name": "q8_0"}},
                                         {"match": "*.layers.4.*", "codec": {"name": "q6_k"}}]})
    r = resolve_gguf_mix(recipe, model)
    # untied: the embedding in the default type, the LM head (256 columns) in Q6_K
    assert resolve_gguf_mix(r, model) == r  # resolving again changes nothing
    assert r.embedding.name == "q4_k" and r.lm_head.name == "q6_k"  # type: ignore[union-attr]
    name = lambda n: r.assignment(n)[0].name  # type: ignore[index]  # noqa: E731
    # use_more_bits(i, 8): layers 0, 3, 6, 7 -> Q6_K for attn_v and ffn_down
    assert [name(f"model.layers.{i}.self_attn.v_proj") for i in range(8)] == \
        ["q6_k", "q4_k", "q4_k", "q6_k", "q6_k", "q4_k", "q6_k", "q6_k"]  # layer 4: the user's q6_k
    assert name("model.layers.3.mlp.down_proj") == "q8_0"  # user rule wins
    assert name("model.layers.1.self_attn.q_proj") == "q4_k"
    # a plain k-quant recipe on rows that are not whole super-blocks: llama.cpp's fallback
    narrow = tiny_model("llama")  # 64 wide
    plain = resolve_gguf_mix(Recipe.from_dict({"codec": {"name": "q4_k"}}), narrow)
    assert plain.assignment("model.layers.0.self_attn.q_proj")[0].name == "q5_0"  # type: ignore[index]


def test_unknown_mix_is_refused() -> None:
    with pytest.raises(LowbitError, match="unknown GGUF mix 'q9_k'"):
        Recipe.from_dict({"codec": {"name": "q4_k"}, "gguf_mix": "q9_k"})


def test_mix_presets_exist() -> None:
    for m in ("q2_k", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_m", "q6_k"):
        for suffix in ("", "-imatrix", "-gptq"):
            assert get_preset(f"gguf-{m}{suffix}").gguf_mix == m
    assert get_preset("gguf-q4_k_m-gptq").algorithm.name == "gptq"


def test_quantized_tied_embedding_shares_its_codes_with_the_head(tiny_model) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama", tie_word_embeddings=True)
    model.tie_weights()
    ids = torch.tensor([[1, 5, 9, 200]])
    emb = Recipe.from_dict({"codec": {"name": "q8_0"}, "embedding": {"name": "q8_0"}}).embedding
    before = model.get_input_embeddings().weight.detach().clone()
    quantize_embeddings(model, emb, None)
    e, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(e, QuantEmbedding) and isinstance(head, QuantLinear)
    decoded = e.qweight.dequantize()
    assert torch.equal(head.qweight.dequantize(), decoded)
    assert torch.equal(e(ids)[0], decoded[ids[0]])
    assert 0 < float((decoded - before).abs().max()) < 0.01 * float(before.abs().max())
    assert torch.isfinite(model(ids).logits).all()


def test_mix_preset_end_to_end_reads_back_exactly(tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """gguf-q4_k_m on a model with 256-wide rows: every k-quant and legacy type of the mix in one
    file, which lowbit's reader gives back block for block with equal logits."""
    from conftest import make_byte_level_tokenizer

    from lowbit.io.gguf_reader import read_gguf_model
    from lowbit.io.gguf_writer import save_gguf
    from lowbit.models import LoadedModel
    from lowbit.pipeline import quantize_model

    model = tiny_model("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
                       head_dim=64, num_key_value_heads=1, vocab_size=260, max_position_embeddings=64)
    report = quantize_model(model, get_preset("gguf-q4_k_m"), progress=False)
    assert report.recipe.gguf_mix == "q4_k_m" and report.recipe.lm_head is not None
    path = save_gguf(LoadedModel(model, make_byte_level_tokenizer(), "tiny", None), tmp_path / "m.gguf")
    from gguf import GGUFReader, LlamaFileType

    assert int(GGUFReader(path).get_field("general.file_type").contents()) == LlamaFileType.MOSTLY_Q4_K_M
    back = read_gguf_model(path).model
    written = {n: m.qweight for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    read = {n: m.qweight for n, m in back.named_modules() if isinstance(m, QuantLinear)}
    codecs = {qt.codec["name"] for n, qt in written.items() if n.startswith("model.layers")}
    assert codecs == {"q4_k", "q6_k"}
    for n, qt in read.items():
        assert qt.codec == written[n].codec and all(torch.equal(qt.data[k], written[n].data[k]) for k in qt.data), n
    assert isinstance(back.get_input_embeddings(), QuantEmbedding) and "lm_head" in read
    ids = torch.tensor([[1, 40, 90, 200, 7]])
    torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0)
    # everything stays as stored: lowbit's size of the model read back is the file's tensor bytes
    from lowbit.bench.compare import block_linear_names
    from lowbit.evaluation import model_size

    stored = sum(int(t.n_bytes) for t in GGUFReader(path).tensors)
    assert model_size(back, block_linear_names(back)).model_bytes == stored


def test_cli_refuses_a_mix_into_a_folder(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from lowbit.cli import main

    assert main(["quantize", "smollm2-135m", "--recipe", "gguf-q4_k_m", "--out", str(tmp_path / "folder")]) != 0
    assert "GGUF type mix" in capsys.readouterr().err
    assert not (tmp_path / "folder").exists()
