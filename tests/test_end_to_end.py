"""End to end on the real SmolLM2-135M-Instruct (the built-in model, cached after first use).

The CI test quantizes three decoder blocks only, to stay fast; the `slow` test runs the whole
CLI on the whole model (``pytest -m slow``).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lowbit.calibration import load_text
from lowbit.codecs import IntCodec
from lowbit.evaluation import evaluate, tokenize
from lowbit.io import load_quantized, save_quantized
from lowbit.models import LoadedModel, architecture_of, cache_dir, load_model
from lowbit.modules import QuantLinear
from lowbit.pipeline import quantize_model
from lowbit.recipes import Recipe, get_preset

FIRST_BLOCKS = ["model.layers.0.*", "model.layers.1.*", "model.layers.2.*"]


@pytest.fixture(scope="module")
def smollm() -> LoadedModel:
    return load_model("smollm2-135m")


def _first_blocks(preset: str) -> Recipe:
    return Recipe.from_dict({**get_preset(preset).to_dict(), "targets": FIRST_BLOCKS})


@pytest.mark.model
def test_smollm2_first_blocks(smollm: LoadedModel, tmp_path) -> None:  # type: ignore[no-untyped-def]
    base = smollm
    assert base.model.config.model_type == "llama"
    text = load_text("pydoc")
    results = {}
    quantized = {}
    for preset in ("w4a16", "int8"):
        model = copy.deepcopy(base.model)
        report = quantize_model(model, _first_blocks(preset), progress=False)
        assert len(report.quantized) == 3 * 7
        assert all(name.split(".")[2] in "012" for name in report.quantized)
        assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 21
        results[preset] = evaluate(model, base.tokenizer, text, ref=base.model, seq_len=128, max_windows=3,
                                   cache_dir=cache_dir(), progress=False)
        quantized[preset] = model

    w4, w8 = results["w4a16"], results["int8"]
    assert w4.tokens == w8.tokens == 3 * 127
    assert w8.ref_ppl == w4.ref_ppl and 1 < w4.ref_ppl < 100
    assert 0 < w8.kld < w4.kld
    assert w8.top1 > 0.9
    assert w8.top1 >= w4.top1

    # save and reload: bit-identical logits
    loaded = LoadedModel(quantized["w4a16"], base.tokenizer, "smollm2-135m", None)
    out = save_quantized(loaded, tmp_path / "q")
    back = load_quantized(out)
    ids = tokenize(base.tokenizer, text)[:96].unsqueeze(0)
    with torch.no_grad():
        want = quantized["w4a16"](input_ids=ids).logits
        got = back.model(input_ids=ids).logits
    assert torch.equal(got, want)


@pytest.mark.model
def test_smollm2_linears_lie_on_a_q4_1_grid(smollm: LoadedModel) -> None:
    # the built-in model ships as Q4_1: int4 asymmetric, groups of 32, float offset reproduces
    # every decoder linear exactly, as DESIGN.md says
    codec = IntCodec(bits=4, symmetric=False, zero_point="float", group_size=32)
    arch = architecture_of(smollm.model)
    blocks = arch.block_list(smollm.model)
    assert len(blocks) == 30
    for block in blocks:
        for name in arch.linear_names():
            w = block.get_submodule(name).weight.detach()
            assert torch.equal(codec.quantize(w).dequantize(), w), name
    # while a 4-bit integer-zero codec does not
    w = blocks[0].self_attn.q_proj.weight.detach()
    assert not torch.equal(IntCodec(bits=4, symmetric=False, group_size=32).quantize(w).dequantize(), w)


@pytest.mark.slow
@pytest.mark.model
def test_cli_whole_model(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from lowbit.cli import main

    out = tmp_path / "smollm2-w4a16"
    assert main(["quantize", "smollm2-135m", "--recipe", "w4a16", "--out", str(out), "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    assert "quantized 210 linears with w4a16" in stdout
    assert main(["eval", str(out), "--max-windows", "4", "--json", "--no-progress"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["ref"] == "smollm2-135m"
    assert r["tokens"] == 4 * 511
    # RTN int4 g128 symmetric on a 135M model that already lies on a Q4_1 grid costs a lot
    # (KLD about 0.57 nats, top-1 about 0.66 on these windows); the bounds only catch breakage
    assert 0.05 < r["kld"] < 1.5 and 0.5 < r["top1"] < 0.99
    # g128 on 576-wide rows is 5 groups (the last one short), on 1536-wide rows 12
    assert r["bits_per_weight"] == pytest.approx(4 + (80 * 4608 + 192 * 576) / (576 * 4608 + 1536 * 576), abs=1e-9)
    assert r["delta_ppl"] > 0


@pytest.mark.model
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_smollm2_compiled_greedy_decode_gives_the_eager_tokens(smollm: LoadedModel) -> None:
    # issue 19: the compiled decode path (static cache, torch.compile) and lowbit's decode operators (the
    # row products of dense linears, one-query attention) change speed, never the tokens (float32)
    from lowbit.evaluation.compiled_decode import generate_kwargs
    from lowbit.modules.decode_attention import use_one_query_attention
    from lowbit.modules.rows_linear import enable_row_products

    model = copy.deepcopy(smollm.model).eval()
    fast = copy.deepcopy(smollm.model).eval()
    native = enable_row_products(fast) > 0
    assert use_one_query_attention(fast)
    prompts = ["def fibonacci(n):", "The capital of France is", "Quantization maps each weight to"]
    outputs = []
    for m, kw in ((model, {}), (model, generate_kwargs(model)), (fast, {}), (fast, generate_kwargs(fast))):
        tokens = []
        for prompt in prompts:
            ids = smollm.tokenizer(prompt, return_tensors="pt").input_ids
            with torch.inference_mode():
                out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                 top_p=None, top_k=None, temperature=None, **kw)
            tokens.append(out[0, ids.shape[1]:].tolist())
        outputs.append(tokens)
    assert all(len(t) == 16 for t in outputs[0])  # no prompt stops at once
    assert outputs[1] == outputs[0] and outputs[2] == outputs[0] and outputs[3] == outputs[0]
    assert getattr(fast, "_compiled_call", None) is not None
    if native:  # the row operator ran in the compiled step (a graph break would not show here; a failure would)
        assert any(type(mod).__name__ == "RowsLinear" for mod in fast.modules())
    assert getattr(model, "_compiled_call", None) is not None  # the compiled step did run
