"""The GGUF writer on a tiny Llama: what gguf-py reads back, and the model transformers'
own GGUF loader (an independent consumer that dequantizes and un-permutes q/k) rebuilds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_byte_level_tokenizer

from lowbit import LowbitError
from lowbit.io.gguf_writer import save_gguf
from lowbit.models import LoadedModel
from lowbit.pipeline import quantize_model
from lowbit.recipes import Recipe

VOCAB = 260


def quantized_tiny(tiny_model, codec: str = "q4_0") -> LoadedModel:  # type: ignore[no-untyped-def]
    model = tiny_model("llama", vocab_size=VOCAB)
    recipe = Recipe.from_dict({
        "codec": {"name": codec},
        "rules": [{"match": "*.mlp.down_proj", "codec": {"name": "q8_0"}},
                  {"match": "*.self_attn.v_proj", "codec": {"name": "q5_1"}}],
    })
    quantize_model(model, recipe, progress=False)
    return LoadedModel(model, make_byte_level_tokenizer(), "tiny", None)


def test_gguf_py_reads_back_metadata_names_and_types(tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from gguf import GGMLQuantizationType, GGUFReader

    path = save_gguf(quantized_tiny(tiny_model), tmp_path / "m.gguf")
    r = GGUFReader(str(path))
    field = lambda k: r.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == 2 and field("llama.attention.head_count_kv") == 2
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert len(field("tokenizer.ggml.tokens")) == VOCAB and field("tokenizer.ggml.merges") == ["\u0120 t"]
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.Q4_0
    assert types["blk.1.ffn_down.weight"] == GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_v.weight"] == GGMLQuantizationType.Q5_1
    assert types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32
    assert types["token_embd.weight"] == GGMLQuantizationType.F16
    assert not path.with_name("m.gguf.tmp").exists()


def test_transformers_gguf_loader_rebuilds_the_same_model(tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    loaded = quantized_tiny(tiny_model)
    path = save_gguf(loaded, tmp_path / "m.gguf")
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokens = torch.randint(2, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = loaded.model(input_ids=tokens).logits
        theirs = back(input_ids=tokens).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # and the q weight is bit-identical once un-permuted (transformers undoes llama.cpp's order)
    np.testing.assert_array_equal(back.model.layers[0].self_attn.q_proj.weight.detach().numpy(),
                                  loaded.model.model.layers[0].self_attn.q_proj.weight.numpy())


def test_codec_without_a_gguf_type_is_refused_and_nothing_written(tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama", vocab_size=VOCAB)
    quantize_model(model, Recipe.from_dict({"codec": {"name": "int", "bits": 4, "group_size": 32}}), progress=False)
    with pytest.raises(LowbitError, match="has no GGUF type"):
        save_gguf(LoadedModel(model, make_byte_level_tokenizer(), "tiny", None), tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_an_architecture_llama_cpp_cannot_run_is_refused(tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(LowbitError, match="cannot write architecture 'opt' as GGUF: llama.cpp has no OPT architecture"):
        save_gguf(LoadedModel(tiny_model("opt"), make_byte_level_tokenizer(), "tiny", None), tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("preset, dense", [("gguf-f32", "F32"), ("gguf-f16", "F16"), ("gguf-bf16", "BF16")])
def test_unquantized_presets_write_what_llama_cpps_converter_writes(tiny_model, tmp_path: Path, preset: str,  # type: ignore[no-untyped-def]
                                                                   dense: str) -> None:
    """convert_hf_to_gguf.py --outtype f32/f16/bf16: every 2-D weight in that type; norms, biases
    and other 1-D tensors F32; the values are the model's, rounded to the type."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from lowbit.recipes import get_preset

    model = tiny_model("qwen2", vocab_size=VOCAB)  # biases too
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = quantize_model(model, get_preset(preset), progress=False)
    assert report.quantized == []
    path = save_gguf(LoadedModel(model, make_byte_level_tokenizer(), "tiny", None), tmp_path / "m.gguf")
    r = GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == types["output.weight"] == dense
    assert types["blk.0.attn_q.bias"] == types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"
    q = next(t for t in r.tensors if t.name == "blk.1.ffn_down.weight")
    values = torch.from_numpy(np.array(dequantize(q.data, q.tensor_type), dtype=np.float32)).reshape(64, 128)
    torch_dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dense]
    assert torch.equal(values, weights["model.layers.1.mlp.down_proj.weight"].to(torch_dtype).float())
    assert int(r.fields["general.file_type"].contents()) == {"F32": 0, "F16": 1, "BF16": 32}[dense]


def test_llama3_rope_factors_give_transformers_frequencies() -> None:
    """llama.cpp divides each rotary frequency by its ``rope_freqs`` factor: the file's factors
    must turn the plain frequencies into transformers' llama3-scaled ones."""
    import transformers as tf
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from lowbit.io.gguf_architectures import llama3_rope_factors

    cfg = tf.LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=4096, rope_theta=50000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 512})
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    (name, factors), = llama3_rope_factors(cfg.to_dict())
    plain = 1.0 / (50000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    assert name == "rope_freqs.weight" and factors.dtype == np.float32 and factors.shape == (32,)
    assert {1.0, 8.0} < set(factors.tolist())  # short wavelengths kept, long ones divided, some blended
    torch.testing.assert_close(plain / torch.from_numpy(factors), want.float(), rtol=1e-6, atol=0)
    assert llama3_rope_factors(tf.LlamaConfig(hidden_size=256, num_attention_heads=4).to_dict()) == []


def test_phi3_long_rope_factors_are_written_or_refused() -> None:
    import transformers as tf

    from lowbit.io.gguf_architectures import phi3_hparams, phi3_rope_factors

    def cfg(long: list[float], short: list[float]) -> dict:
        return tf.Phi3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                             original_max_position_embeddings=16,
                             rope_scaling={"rope_type": "longrope", "long_factor": long, "short_factor": short}).to_dict()

    hp = cfg([1.0 + i for i in range(8)], [1.0] * 8)
    got = dict(phi3_rope_factors(hp))
    assert got["rope_factors_long.weight"].tolist() == [1.0 + i for i in range(8)]
    assert got["rope_factors_short.weight"].tolist() == [1.0] * 8
    written: dict[str, object] = {}

    class Writer:
        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return lambda *a: written.__setitem__(name, a[0] if a else None)

    phi3_hparams(Writer(), hp)
    # transformers' longrope attention factor for a context 8x the original one
    assert written["add_rope_scaling_attn_factors"] == pytest.approx((1 + np.log(8) / np.log(16)) ** 0.5)
    bad = {**hp, "rope_parameters": {**hp["rope_parameters"], "short_factor": [1.0] * 7}}  # a hand-edited config
    with pytest.raises(LowbitError, match="long and short factors of 8 values"):
        phi3_rope_factors(bad)
