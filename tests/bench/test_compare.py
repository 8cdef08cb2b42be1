"""compare_recipes: one model, several recipes, one yardstick."""

from __future__ import annotations

import json

import pytest
import torch

from lowbit.bench import compare_recipes, format_table
from lowbit.bench.compare import block_linear_names
from lowbit.calibration import Text
from lowbit.cli import main
from lowbit.models import LoadedModel
from lowbit.recipes import resolve_recipe


@pytest.fixture
def base(tiny_model, char_tokenizer) -> LoadedModel:  # type: ignore[no-untyped-def]
    return LoadedModel(tiny_model("llama"), char_tokenizer, "tiny-llama", None)


def test_rows(base, text_factory, lowbit_cache, tmp_path) -> None:  # type: ignore[no-untyped-def]
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    texts = [Text("a", text_factory(500, seed=0)), Text("b", text_factory(400, seed=1))]
    recipes = [resolve_recipe("int8"), resolve_recipe("w2a16")]
    seen = []
    rows = compare_recipes(base, recipes, texts, seq_len=64, save_dir=tmp_path / "saved", progress=False,
                           on_row=seen.append)
    assert seen == rows
    assert [(r.recipe, r.text) for r in rows] == [
        ("unquantized", "a"), ("unquantized", "b"), ("int8", "a"), ("int8", "b"), ("w2a16", "a"), ("w2a16", "b")]
    ref_a, ref_b, i8a, i8b, w2a, w2b = rows
    assert ref_a.kld < 1e-6 and ref_a.top1 == 1 and ref_a.bits_per_weight == 32 and ref_a.recipe_digest is None
    assert 0 < i8a.kld < w2a.kld and 0 < i8b.kld < w2b.kld
    assert i8a.ppl != w2a.ppl and i8a.tokens == ref_a.tokens == 500 - 8
    # int8 per channel: one fp16 scale per output row; rows per block 448 (in=64) + 64 (down_proj, in=128)
    assert i8a.bits_per_weight == pytest.approx(8 + 16 * (448 + 64) / (64 * 448 + 128 * 64))
    assert w2a.bits_per_weight == pytest.approx(2.25)
    assert i8a.recipe_digest == recipes[0].digest()
    assert i8a.disk_bytes is not None and w2a.disk_bytes < i8a.disk_bytes
    saved = sorted((tmp_path / "saved").iterdir())
    assert len(saved) == 2 and all((p / "lowbit.json").is_file() for p in saved)
    # the base model is left as it was (each recipe quantizes a copy)
    after = base.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    table = format_table(rows)
    assert table.count("\n") == 1 + len(rows) and "| a | int8 |" in table
    assert json.loads(json.dumps([r.to_dict() for r in rows]))[0]["model"] == "tiny-llama"


def test_other_dtype_never_casts_the_reference(base, text_factory, lowbit_cache) -> None:  # type: ignore[no-untyped-def]
    rows = compare_recipes(base, [resolve_recipe("int8")], [Text("a", text_factory(300))], seq_len=64,
                           dtype=torch.bfloat16, progress=False)
    assert next(base.model.parameters()).dtype == torch.float32
    assert rows[0].dtype == "bfloat16" and rows[0].kld > 0  # bf16 itself costs something


def test_block_linear_names(tiny_model) -> None:  # type: ignore[no-untyped-def]
    names = block_linear_names(tiny_model("gpt2"))
    assert names[:4] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
                         "transformer.h.0.mlp.c_proj"]
    assert len(names) == 8


def test_bench_cli(hf_folder, text_factory, tmp_path, lowbit_cache, capsys) -> None:  # type: ignore[no-untyped-def]
    folder = hf_folder("llama")
    text = tmp_path / "t.txt"
    text.write_text(text_factory(600))
    code = main(["bench", str(folder), "--recipes", "int8,w4a16", "--text", str(text), "--seq-len", "64",
                 "--max-windows", "3", "--json", "--no-progress"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["recipe"] for r in rows] == ["unquantized", "int8", "w4a16"]
    assert all(r["tokens"] == 3 * 63 for r in rows)
    code = main(["bench", str(folder), "--recipes", "int8,bogus", "--text", str(text), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("lowbit: error: unknown preset 'bogus'") and err.count("\n") == 1
