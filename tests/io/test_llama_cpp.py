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
