"""lowbit's own checkpoint folder: exact round trips, atomic writes, and broken folders."""

from __future__ import annotations

import errno
import os

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lowbit.io.lowbit_format as fmt
from lowbit import LowbitError
from lowbit.io import load_quantized, save_quantized
from lowbit.models import LoadedModel, load_model
from lowbit.modules import QuantLinear
from lowbit.pipeline import quantize_model
from lowbit.recipes import Recipe, resolve_recipe

IDS = torch.randint(2, 99, (2, 20), generator=torch.Generator().manual_seed(0))


def _quantized(tiny_model, char_tokenizer, family: str = "llama", recipe: str = "w4a16-asym", **cfg) -> LoadedModel:  # type: ignore[no-untyped-def]
    model = tiny_model(family, **cfg)
    model.tie_weights()
    quantize_model(model, resolve_recipe(recipe, group_size=32), progress=False)
    return LoadedModel(model, char_tokenizer, f"tiny-{family}", None)


def _logits(model) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}")]


@pytest.mark.parametrize(
    ("family", "cfg"),
    [("llama", {"tie_word_embeddings": True}), ("qwen2", {}), ("gpt2", {}), ("opt", {})],
    ids=["llama-tied", "qwen2-bias", "gpt2", "opt"],
)
def test_round_trip_exact_logits(tiny_model, char_tokenizer, tmp_path, family: str, cfg: dict) -> None:  # type: ignore[no-untyped-def]
    loaded = _quantized(tiny_model, char_tokenizer, family, **cfg)
    want = _logits(loaded.model)
    out = save_quantized(loaded, tmp_path / "q")
    assert out == tmp_path / "q"
    names = {p.name for p in out.iterdir()}
    assert {"lowbit.json", "recipe.json", "config.json", "model.safetensors", "tokenizer.json"} <= names
    assert _leftovers(tmp_path, "q") == []

    back = load_quantized(out)
    assert torch.equal(_logits(back.model), want)
    assert back.model.lowbit_recipe == loaded.model.lowbit_recipe
    assert back.source == f"tiny-{family}" and back.path == out
    assert back.tokenizer("Hi", add_special_tokens=False)["input_ids"] == [42, 75]
    # the same through load_model's dispatch on the marker file
    assert torch.equal(_logits(load_model(str(out)).model), want)
    # quantized parts come back bit-identical, in their storage dtypes
    q_before = {n: m for n, m in loaded.model.named_modules() if isinstance(m, QuantLinear)}
    q_after = {n: m for n, m in back.model.named_modules() if isinstance(m, QuantLinear)}
    assert q_before.keys() == q_after.keys()
    assert len(q_after) == {"llama": 14, "qwen2": 14, "gpt2": 8, "opt": 12}[family]
    for n, m in q_before.items():
        for part in m.parts:
            a, b = getattr(m, f"qweight_{part}"), getattr(q_after[n], f"qweight_{part}")
            assert a.dtype == b.dtype and torch.equal(a, b)
        assert (m.bias is None) == (q_after[n].bias is None)
        if m.bias is not None:
            assert torch.equal(m.bias, q_after[n].bias)


def test_folder_contents(tiny_model, char_tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    loaded = _quantized(tiny_model, char_tokenizer, "llama", tie_word_embeddings=True)
    recipe = loaded.model.lowbit_recipe
    out = save_quantized(loaded, tmp_path / "q", source="my-source")
    marker = json.loads((out / "lowbit.json").read_text())
    assert marker["format"] == "lowbit" and marker["format_version"] == 1
    assert marker["source"] == "my-source"
    assert marker["recipe_digest"] == recipe.digest()
    assert marker["quantized_modules"] == 14
    assert Recipe.from_file(out / "recipe.json") == recipe
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    tensors = load_file(str(out / "model.safetensors"))
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        headers = json.loads(f.metadata()["lowbit.quantized"])
    assert len(headers) == 14 and "model.layers.1.mlp.down_proj" in headers
    assert tensors["model.layers.0.self_attn.q_proj.weight.codes"].dtype == torch.uint8
    assert tensors["model.layers.0.self_attn.q_proj.weight.scale"].dtype == torch.float16
    assert tensors["model.layers.0.self_attn.q_proj.weight.zero"].dtype == torch.float16
    assert "model.layers.0.self_attn.q_proj.weight" not in tensors  # no dense copy of a quantized weight
    # tied: stored once, under the embedding
    assert "model.embed_tokens.weight" in tensors and "lm_head.weight" not in tensors
    # dense tensors in the recipe's dense dtype
    assert tensors["model.embed_tokens.weight"].dtype == torch.float16
    assert tensors["model.norm.weight"].dtype == torch.float16
    assert not any("inv_freq" in k for k in tensors)  # non-persistent buffers are not stored


def test_bfloat16_dense_dtype_round_trip(tiny_model, char_tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("qwen2")
    recipe = Recipe.from_dict({"codec": {"name": "int", "bits": 3, "group_size": 32}, "dense_dtype": "bfloat16"})
    quantize_model(model, recipe, progress=False)
    loaded = LoadedModel(model, char_tokenizer, "x", None)
    want = _logits(model)
    out = save_quantized(loaded, tmp_path / "q")
    assert load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert torch.equal(_logits(load_quantized(out).model), want)
    # loading in bf16 casts dense tensors only
    half = load_quantized(out, dtype=torch.bfloat16).model
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16
    assert half.model.layers[0].self_attn.q_proj.qweight_scale.dtype == torch.float16


def test_existing_folder_needs_overwrite(tiny_model, char_tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    loaded = _quantized(tiny_model, char_tokenizer)
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(LowbitError, match="exists"):
        save_quantized(loaded, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    assert _leftovers(tmp_path, "q") == []
    save_quantized(loaded, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "lowbit.json").is_file()
    assert _leftovers(tmp_path, "q") == []
    assert torch.equal(_logits(load_quantized(out).model), _logits(loaded.model))


def test_failed_save_leaves_nothing(tiny_model, char_tokenizer, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    loaded = _quantized(tiny_model, char_tokenizer)

    def broken_save_file(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fmt, "save_file", broken_save_file)
    with pytest.raises(LowbitError, match=r"cannot write .*/q: No space left on device \(nothing was written\)$"):
        save_quantized(loaded, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a hidden temp folder

    # a failed overwrite keeps the old model
    monkeypatch.setattr(fmt, "save_file", save_file)
    save_quantized(loaded, tmp_path / "q")
    before = {p.name: p.read_bytes() for p in (tmp_path / "q").iterdir()}
    monkeypatch.setattr(fmt, "save_file", broken_save_file)
    with pytest.raises(LowbitError, match="No space left"):
        save_quantized(loaded, tmp_path / "q", overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "q").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


def test_unquantized_model_is_refused(tiny_model, char_tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(LowbitError, match="not quantized"):
        save_quantized(LoadedModel(tiny_model("llama"), char_tokenizer, "x", None), tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def saved(tiny_model, char_tokenizer, tmp_path) -> Path:  # type: ignore[no-untyped-def]
    return save_quantized(_quantized(tiny_model, char_tokenizer, "qwen2"), tmp_path / "q")


def test_truncated_safetensors(saved: Path) -> None:
    st = saved / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size - 1000])
    with pytest.raises(LowbitError, match="corrupt safetensors") as ei:
        load_model(str(saved))
    assert "\n" not in str(ei.value)


def test_missing_safetensors(saved: Path) -> None:
    (saved / "model.safetensors").unlink()
    with pytest.raises(LowbitError, match="missing model.safetensors"):
        load_quantized(saved)


@pytest.mark.parametrize("marker", ["{broken", '{"format": "lowbit", "format_version": 99}', '{"format": "other"}'])
def test_bad_marker(saved: Path, marker: str) -> None:
    (saved / "lowbit.json").write_text(marker)
    with pytest.raises(LowbitError, match="lowbit"):
        load_quantized(saved)


def test_bad_recipe_file(saved: Path) -> None:
    data = json.loads((saved / "recipe.json").read_text())
    data["codec"]["bits"] = 12
    (saved / "recipe.json").write_text(json.dumps(data))
    with pytest.raises(LowbitError, match=r"codec\.bits"):
        load_quantized(saved)


def _rewrite(saved: Path, edit) -> None:  # type: ignore[no-untyped-def]
    st = saved / "model.safetensors"
    with safe_open(str(st), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(st))
    edit(tensors, meta)
    save_file(tensors, str(st), metadata=meta)


def test_tampered_codes(saved: Path) -> None:
    def edit(t, meta):  # type: ignore[no-untyped-def]
        t["model.layers.0.mlp.up_proj.weight.codes"] = t["model.layers.0.mlp.up_proj.weight.codes"][:-3].clone()

    _rewrite(saved, edit)
    with pytest.raises(LowbitError, match="bad quantized tensor model.layers.0.mlp.up_proj"):
        load_quantized(saved)


def test_missing_bias(saved: Path) -> None:
    _rewrite(saved, lambda t, meta: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(LowbitError, match="missing model.layers.1.self_attn.k_proj.bias"):
        load_quantized(saved)


def test_missing_and_unexpected_dense_tensors(saved: Path) -> None:
    _rewrite(saved, lambda t, meta: t.pop("model.norm.weight"))
    with pytest.raises(LowbitError, match="missing tensors.*model.norm.weight"):
        load_quantized(saved)


def test_unexpected_tensor(saved: Path) -> None:
    _rewrite(saved, lambda t, meta: t.__setitem__("model.extra.weight", torch.zeros(3)))
    with pytest.raises(LowbitError, match="unexpected tensors.*model.extra.weight"):
        load_quantized(saved)


def test_corrupt_quantized_metadata(saved: Path) -> None:
    _rewrite(saved, lambda t, meta: meta.__setitem__("lowbit.quantized", "{nope"))
    with pytest.raises(LowbitError, match="corrupt lowbit.quantized"):
        load_quantized(saved)


@pytest.mark.parametrize("tied", [True, False], ids=["tied-head", "untied-head"])
def test_a_quantized_embedding_round_trips(tiny_model, char_tokenizer, tmp_path, tied: bool) -> None:  # type: ignore[no-untyped-def]
    """int8-e8: the token embedding int8 per row; a tied head shares its codes (stored once), an untied
    one is quantized on its own."""
    from lowbit.modules import QuantEmbedding

    loaded = _quantized(tiny_model, char_tokenizer, "llama", recipe="int8-e8", tie_word_embeddings=tied)
    emb, head = loaded.model.get_input_embeddings(), loaded.model.get_output_embeddings()
    assert isinstance(emb, QuantEmbedding) and isinstance(head, QuantLinear)
    assert (head.qweight_codes is emb.qweight_codes) == tied
    want = _logits(loaded.model)
    out = save_quantized(loaded, tmp_path / "q")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight.codes" in keys and ("lm_head.weight.codes" in keys) == (not tied)
    assert "model.embed_tokens.weight" not in keys and "lm_head.weight" not in keys
    back = load_quantized(out).model
    emb2, head2 = back.get_input_embeddings(), back.get_output_embeddings()
    assert isinstance(emb2, QuantEmbedding) and isinstance(head2, QuantLinear)
    assert (head2.qweight_codes is emb2.qweight_codes) == tied
    assert torch.equal(emb2.qweight_codes, emb.qweight_codes)
    assert torch.equal(_logits(back), want)


def test_a_compressed_tensors_export_refuses_a_quantized_embedding(tiny_model, char_tokenizer) -> None:  # type: ignore[no-untyped-def]
    from lowbit.io.formats import check_layout

    model = tiny_model("llama")
    for layout, ok in (("native", True), ("gguf", True), ("compressed-tensors", False), ("gptq", False)):
        if ok:
            check_layout(layout, resolve_recipe("int8-e8"), model)
        else:
            with pytest.raises(LowbitError, match="token embedding or LM head"):
                check_layout(layout, resolve_recipe("int8-e8"), model)
