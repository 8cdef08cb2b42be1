"""llama.cpp runs lowbit's GGUF files (needs its tools: scripts/peers/setup_llamacpp.sh; skipped
with that reason otherwise). Its perplexity of a file must equal lowbit's computation of the
same protocol on the same weights and token ids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_byte_level_tokenizer

from lowbit.bench.llama_cpp import (
    llama_cpp_bin,
    llama_cpp_generate,
    llama_cpp_perplexity,
    llama_cpp_token_ids,
    perplexity_like_llama_cpp,
)
from lowbit.io.gguf_writer import save_gguf
from lowbit.models import LoadedModel
from lowbit.pipeline import quantize_model
from lowbit.recipes import Recipe

pytestmark = pytest.mark.skipif(llama_cpp_bin() is None,
                                reason="llama.cpp's tools are not built (scripts/peers/setup_llamacpp.sh)")


@pytest.mark.parametrize("codec", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"])
def test_llama_cpp_perplexity_equals_lowbits(tiny_model, text_factory, tmp_path: Path, codec: str) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama", vocab_size=260, max_position_embeddings=64)
    quantize_model(model, Recipe.from_dict({"codec": {"name": codec}}), progress=False)
    path = save_gguf(LoadedModel(model, make_byte_level_tokenizer(), "tiny", None), tmp_path / "m.gguf")
    text = tmp_path / "t.txt"
    text.write_text(text_factory(2000, seed=1))
    ids = llama_cpp_token_ids(path, text)
    assert ids == make_byte_level_tokenizer()(text.read_text(), add_special_tokens=False)["input_ids"]
    ours = perplexity_like_llama_cpp(model, torch.tensor(ids), n_ctx=32, chunks=8)
    theirs = llama_cpp_perplexity(path, text, n_ctx=32, chunks=8, threads=1)
    # llama.cpp rounds the activations to 8 bits (Q8_0/Q8_1) for its quantized dot products, so
    # the two agree closely but not exactly
    assert abs(theirs - ours) / ours < 1e-2, (theirs, ours)
    # llama-completion runs the file (its logger may cut the echoed text short at exit)
    out = llama_cpp_generate(path, "Hello", 4, threads=1)
    assert out and (out.startswith("Hello") or "Hello".startswith(out)), out


@pytest.mark.parametrize("mix", ["Q4_K_M", "Q2_K", "Q6_K"])
def test_mix_has_llama_quantizes_types_and_runs(tiny_model, text_factory, tmp_path: Path, mix: str) -> None:  # type: ignore[no-untyped-def]
    """On 256-wide rows (real k-quants, not fallbacks): lowbit's gguf-<mix> file holds the types
    llama-quantize gives the same model, llama.cpp's own dequantization of it (llama-quantize to
    F32) is lowbit's values exactly, and llama.cpp runs it to lowbit's perplexity. The k-quant
    dot products round the activations to 8 bits per 256 values (Q8_K), coarser than the legacy
    types' per 32: on this random model that moves llama.cpp's perplexity by up to ~2%, while an
    F32 file of the same values agrees to 0.02%."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from lowbit.bench.llama_cpp import run_tool
    from lowbit.recipes import get_preset

    model = tiny_model("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
                       head_dim=64, num_key_value_heads=1, vocab_size=260, max_position_embeddings=64)
    tok = make_byte_level_tokenizer()
    f32 = save_gguf(LoadedModel(model, tok, "tiny", None), tmp_path / "f32.gguf", dense="f32")
    theirs_path = tmp_path / "theirs.gguf"
    run_tool("llama-quantize", str(f32), str(theirs_path), mix)
    quantize_model(model, get_preset(f"gguf-{mix.lower()}"), progress=False)
    path = save_gguf(LoadedModel(model, tok, "tiny", None), tmp_path / "m.gguf")
    types = lambda p: {t.name: t.tensor_type.name for t in GGUFReader(p).tensors}  # noqa: E731
    assert types(path) == types(theirs_path)
    run_tool("llama-quantize", "--allow-requantize", str(path), str(tmp_path / "deq.gguf"), "F32")
    deq = {t.name: torch.from_numpy(np.array(t.data)) for t in GGUFReader(tmp_path / "deq.gguf").tensors}
    for t in GGUFReader(path).tensors:
        ours = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
        assert torch.equal(ours.reshape(-1), deq[t.name].reshape(-1).to(ours.dtype)), t.name
    text = tmp_path / "t.txt"
    text.write_text(text_factory(2000, seed=1))
    ids = llama_cpp_token_ids(path, text)
    ours = perplexity_like_llama_cpp(model, torch.tensor(ids), n_ctx=32, chunks=8)
    theirs = llama_cpp_perplexity(path, text, n_ctx=32, chunks=8, threads=1)
    assert abs(theirs - ours) / ours < 3e-2, (theirs, ours)


def _family_model(family: str) -> torch.nn.Module:
    """A tiny random model of ``family`` with the byte-level tokenizer's 260 tokens."""
    import transformers as tf

    from conftest import build_tiny_model

    if family not in ("mixtral", "qwen3_moe", "olmoe"):
        extra = {"gpt2": {"n_positions": 64}, "gemma2": {"query_pre_attn_scalar": 16}}.get(family, {})  # as real Gemma 2
        return build_tiny_model(family, vocab_size=260, **extra)
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=260,
                  max_position_embeddings=256, bos_token_id=1, eos_token_id=1, pad_token_id=0, num_experts_per_tok=2)
    cfg = {"mixtral": lambda: tf.MixtralConfig(intermediate_size=96, num_local_experts=4, **common),
           "qwen3_moe": lambda: tf.Qwen3MoeConfig(moe_intermediate_size=64, num_experts=4, head_dim=16, norm_topk_prob=True,
                                                  decoder_sparse_step=1, mlp_only_layers=[], **common),
           "olmoe": lambda: tf.OlmoeConfig(intermediate_size=64, num_experts=4, **{**common, "num_key_value_heads": 4}),
           }[family]()  # each as its released models are (renormalized experts or not, OLMoE without GQA)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "mixtral", "qwen3_moe", "olmoe"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_runs_in_llama_cpp_with_lowbits_numbers(family: str, text_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Each family lowbit writes as GGUF: llama.cpp loads the file and its perplexity equals
    lowbit's on the same weights and token ids: the F32 file to float rounding (seen: 2e-5 to
    7e-5; 1e-3 for Mixtral), the Q8_0 one (every linear, experts included) within llama.cpp's
    8-bit rounding of the activations (seen: up to 3e-3)."""
    from lowbit.io.gguf_architectures import GGUF_ARCHITECTURES

    assert family in GGUF_ARCHITECTURES
    # the MoE routers' near ties may pick other experts for a token or two
    _runs_with_lowbits_numbers(_family_model(family), tmp_path, text_factory(3000, seed=2),
                               2e-3 if family in ("mixtral", "qwen3_moe", "olmoe") else 2e-4)


ROPE_VARIANTS = {
    # Llama 3.1's rope scaling: rope_freqs.weight divides the frequencies (at every position)
    "llama3": ("llama", dict(max_position_embeddings=256, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    # Phi-3's longrope: chunks of 32 tokens are past the original 16 (long factors in both tools)...
    "phi3-long": ("phi3", dict(max_position_embeddings=128, original_max_position_embeddings=16, rope_scaling={
        "rope_type": "longrope", "long_factor": [1.0 + 0.5 * i for i in range(8)], "short_factor": [1.0] * 8})),
    # ... or within the original 256 (short factors). llama.cpp picks the factors by its context size (at
    # least 256 here), transformers by the sequence's length: only a context within the original one and a
    # sequence longer than it make the two agree
    "phi3-short": ("phi3", dict(max_position_embeddings=1024, original_max_position_embeddings=256, rope_scaling={
        "rope_type": "longrope", "long_factor": [1.0] * 8, "short_factor": [1.0 + 0.5 * i for i in range(8)]})),
}


@pytest.mark.parametrize("variant", sorted(ROPE_VARIANTS))
def test_rope_scaling_runs_in_llama_cpp_with_lowbits_numbers(variant: str, text_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from conftest import build_tiny_model

    family, extra = ROPE_VARIANTS[variant]
    model = build_tiny_model(family, vocab_size=260, **extra)
    content = text_factory(3000, seed=2)
    ids = torch.tensor(make_byte_level_tokenizer()(content, add_special_tokens=False)["input_ids"])
    scaled = perplexity_like_llama_cpp(model, ids, n_ctx=32, chunks=8)
    plain = perplexity_like_llama_cpp(_family_model(family), ids, n_ctx=32, chunks=8)  # same weights, no scaling
    assert abs(plain - scaled) / scaled > 1e-3  # the scaling is exercised, not a no-op on these chunks
    _runs_with_lowbits_numbers(model, tmp_path, content, 2e-4)


def _runs_with_lowbits_numbers(model: torch.nn.Module, tmp_path: Path, content: str, f32_tolerance: float) -> None:
    tok = make_byte_level_tokenizer()
    text = tmp_path / "t.txt"
    text.write_text(content)
    family = model.config.model_type
    f32 = save_gguf(LoadedModel(model, tok, "tiny", None), tmp_path / "f32.gguf", dense="f32")
    ids = llama_cpp_token_ids(f32, text)
    assert ids == tok(text.read_text(), add_special_tokens=False)["input_ids"]
    ours = perplexity_like_llama_cpp(model, torch.tensor(ids), n_ctx=32, chunks=8)
    theirs = llama_cpp_perplexity(f32, text, n_ctx=32, chunks=8, threads=1)
    assert abs(theirs - ours) / ours < f32_tolerance, (family, theirs, ours)
    quantize_model(model, Recipe.from_dict({"codec": {"name": "q8_0"}}), progress=False)
    q8 = save_gguf(LoadedModel(model, tok, "tiny", None), tmp_path / "q8.gguf")
    ours = perplexity_like_llama_cpp(model, torch.tensor(ids), n_ctx=32, chunks=8)
    theirs = llama_cpp_perplexity(q8, text, n_ctx=32, chunks=8, threads=1)
    assert abs(theirs - ours) / ours < 2e-2, (family, theirs, ours)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_sentencepiece_tokenizers_tokenize_and_run_as_in_transformers(family: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A SentencePiece BPE tokenizer (Llama 2's layout, with a ``▁`` prepended; Gemma's, without):
    llama.cpp reads the GGUF vocabulary lowbit writes and tokenizes as transformers does, byte
    fallback included, and runs the model to lowbit's perplexity. (Text that starts with a space
    is left out: llama.cpp, like SentencePiece, prepends ``▁`` to it anyway, transformers'
    Metaspace does not: a difference between the two tokenizers, not of the file.)"""
    from pydoc_data.topics import topics

    from conftest import build_tiny_model, make_sentencepiece_tokenizer

    tok, sp = make_sentencepiece_tokenizer(tmp_path, dummy_prefix=family == "llama")
    model = build_tiny_model(family, vocab_size=sp.get_piece_size())
    content = topics[sorted(topics)[-1]][:3000] + "\nnaïve ∑ 漢字 🙂  two  spaces\n\n"  # held out of its training
    text = tmp_path / "t.txt"
    text.write_text(content)
    f32 = save_gguf(LoadedModel(model, tok, "tiny", None), tmp_path / "f32.gguf", dense="f32")
    ids = llama_cpp_token_ids(f32, text)
    assert ids == tok(content, add_special_tokens=False)["input_ids"] == sp.encode(content)
    assert any(sp.is_byte(i) for i in ids)
    ours = perplexity_like_llama_cpp(model, torch.tensor(ids), n_ctx=32, chunks=8)
    theirs = llama_cpp_perplexity(f32, text, n_ctx=32, chunks=8, threads=1)
    assert abs(theirs - ours) / ours < 2e-4, (theirs, ours)
