"""The GGUF reader on tiny Llamas written by lowbit's GGUF writer: the blocks come back as
they were stored (no float round trip), logits equal the written model's, and equal those of
transformers' own GGUF loader; bad files are one LowbitError."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import make_byte_level_tokenizer

from lowbit import LowbitError
from lowbit.io import gguf_reader
from lowbit.io.gguf_reader import known_ggml_codecs, read_gguf_model, unpermute_rows
from lowbit.io.gguf_writer import _permute_rows, save_gguf
from lowbit.models import LoadedModel, load_model
from lowbit.models.loading import load_gguf
from lowbit.modules import QuantEmbedding, QuantLinear
from lowbit.pipeline import quantize_model
from lowbit.recipes import Recipe

VOCAB = 260
LEGACY = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]


def written(tiny_model, path: Path, codec: str | None, dense: str = "f32", **rules: str) -> LoadedModel:  # type: ignore[no-untyped-def]
    """A tiny Llama quantized with ``codec`` on every linear (``rules``: glob -> codec), saved
    as the GGUF ``path``; None leaves it float."""
    model = tiny_model("llama", vocab_size=VOCAB)
    if codec is not None:
        recipe = {"codec": {"name": codec}, "rules": [{"match": k, "codec": {"name": v}} for k, v in rules.items()]}
        quantize_model(model, Recipe.from_dict(recipe), progress=False)
    loaded = LoadedModel(model, make_byte_level_tokenizer(), "tiny", None)
    save_gguf(loaded, path, dense=dense)
    return loaded


def logits(model: nn.Module) -> torch.Tensor:
    tokens = torch.randint(2, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=tokens).logits


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("codec", LEGACY)
def test_blocks_and_logits_come_back_exactly(tiny_model, tmp_path: Path, codec: str) -> None:  # type: ignore[no-untyped-def]
    src = written(tiny_model, tmp_path / "m.gguf", codec, **{"*.mlp.down_proj": "q8_0"})
    back = read_gguf_model(tmp_path / "m.gguf")
    ours, theirs = quant_linears(src.model), quant_linears(back.model)
    assert sorted(theirs) == sorted(ours) and len(ours) == 14
    for name, q in ours.items():
        want, got = q.qweight, theirs[name].qweight
        assert got.codec == want.codec and got.shape == want.shape, name
        assert sorted(got.data) == sorted(want.data), name
        for part, t in want.data.items():
            assert got.data[part].dtype == t.dtype and torch.equal(got.data[part], t), (name, part)
    assert type(back.model.lm_head) is nn.Linear and type(back.model.model.embed_tokens) is nn.Embedding
    assert torch.equal(logits(back.model), logits(src.model))


def test_logits_equal_transformers_gguf_loader(tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    written(tiny_model, tmp_path / "m.gguf", "q4_0", dense="f16",
            **{"*.mlp.down_proj": "q8_0", "*.self_attn.v_proj": "q5_1", "*.self_attn.k_proj": "q4_1"})
    ours = read_gguf_model(tmp_path / "m.gguf")
    theirs = load_gguf(tmp_path / "m.gguf")  # transformers dequantizes with gguf-py
    assert len(quant_linears(ours.model)) == 14 and not quant_linears(theirs.model)
    torch.testing.assert_close(logits(ours.model), logits(theirs.model), rtol=1e-5, atol=1e-5)
    # the same weights, q/k un-permuted the same way
    k_ours = ours.model.model.layers[1].self_attn.k_proj.weight
    torch.testing.assert_close(k_ours, theirs.model.model.layers[1].self_attn.k_proj.weight, rtol=0, atol=0)
    assert ours.tokenizer("a tea")["input_ids"] == theirs.tokenizer("a tea")["input_ids"]


def test_float_gguf_reads_as_plain_linears(tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = written(tiny_model, tmp_path / "m.gguf", None, dense="f32")
    back = read_gguf_model(tmp_path / "m.gguf")
    assert not quant_linears(back.model)
    for name, p in src.model.named_parameters():
        assert torch.equal(back.model.get_parameter(name), p), name
    assert torch.equal(logits(back.model), logits(src.model))
    half = read_gguf_model(tmp_path / "m.gguf", dtype=torch.bfloat16)
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}


def test_dtype_applies_to_dense_tensors_only(tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = written(tiny_model, tmp_path / "m.gguf", "q4_1")
    back = read_gguf_model(tmp_path / "m.gguf", dtype=torch.bfloat16)
    q = back.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear)
    assert torch.equal(q.qweight.data["d"], src.model.model.layers[0].self_attn.q_proj.qweight.data["d"])
    assert back.model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_type_without_codec_is_dequantized_with_a_warning(tiny_model, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    src = written(tiny_model, tmp_path / "m.gguf", "q4_0", **{"*.mlp.down_proj": "q8_0"})
    known = known_ggml_codecs()
    monkeypatch.setattr(gguf_reader, "known_ggml_codecs", lambda: {k: v for k, v in known.items() if k != "Q8_0"})
    with pytest.warns(UserWarning, match=r"no codec for ggml type\(s\) Q8_0 \(2\)"):
        back = read_gguf_model(tmp_path / "m.gguf")
    down = back.model.model.layers[0].mlp.down_proj
    assert type(down) is nn.Linear
    assert torch.equal(down.weight, src.model.model.layers[0].mlp.down_proj.weight)  # gguf-py decodes lowbit's values
    assert len(quant_linears(back.model)) == 12
    assert torch.equal(logits(back.model), logits(src.model))


def test_known_codecs_follow_ggml_blocks() -> None:
    from lowbit.io.ggml_blocks import BLOCK_BYTES

    codecs = known_ggml_codecs()
    assert set(codecs) == set(BLOCK_BYTES) and {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"} <= set(codecs)
    assert all(c.name == t.lower() for t, c in codecs.items())


def test_unpermute_rows_inverts_the_writer() -> None:
    t = torch.arange(64 * 3).reshape(64, 3)
    for n_head in (1, 2, 4, 8):
        assert torch.equal(unpermute_rows(_permute_rows(t, n_head), n_head), t)
        assert not torch.equal(_permute_rows(t, n_head), t)


@pytest.mark.parametrize("cut", [20, 300, -100, -1])
def test_truncated_file(tiny_model, tmp_path: Path, cut: int) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "m.gguf"
    written(tiny_model, path, "q4_1")
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(LowbitError, match="truncated"):
        read_gguf_model(path)


def _type_id_offset(path: Path, tensor: str) -> int:
    """Byte offset of ``tensor``'s type id in the tensor-info table."""
    from gguf import GGUFReader

    t = next(t for t in GGUFReader(path).tensors if t.name == tensor)
    # tensor info: name length u64, name, n_dims u32, dims u64 x n_dims, type u32, data offset u64
    return t.field.offset + 8 + len(tensor.encode()) + 4 + 8 * len(t.shape)


def _set_type_id(path: Path, tensor: str, type_id: int) -> None:
    data = bytearray(path.read_bytes())
    at = _type_id_offset(path, tensor)
    data[at:at + 4] = struct.pack("<I", type_id)
    path.write_bytes(bytes(data))


def test_unknown_type_id(tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "m.gguf"
    written(tiny_model, path, "q4_1")
    _set_type_id(path, "blk.0.attn_q.weight", 250)
    with pytest.raises(LowbitError, match="unknown GGML tensor type id 250") as ei:
        read_gguf_model(path)
    assert "\n" not in str(ei.value)


def test_type_that_nothing_decodes(tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from gguf import GGMLQuantizationType

    path = tmp_path / "m.gguf"
    written(tiny_model, path, "q4_1")
    _set_type_id(path, "blk.0.attn_norm.weight", int(GGMLQuantizationType.I32))  # same bytes as F32
    with pytest.raises(LowbitError, match="blk.0.attn_norm.weight is stored as ggml type I32"):
        read_gguf_model(path)


def test_cli_eval_keeps_gguf_packed_and_quantize_reads_it_as_float(tiny_model, tmp_path: Path, capsys,  # type: ignore[no-untyped-def]
                                                                   text_factory, lowbit_cache) -> None:
    from lowbit.cli import main

    path = tmp_path / "m.gguf"
    written(tiny_model, path, "q4_1")
    text = tmp_path / "eval.txt"
    text.write_text(text_factory(1500))
    code = main(["eval", str(path), "--text", str(text), "--seq-len", "64", "--max-windows", "2", "--json",
                 "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    r = json.loads(out)
    assert r["bits_per_weight"] == 5.0 and r["ref"] is None
    # re-quantizing starts from the dequantized float weights
    code = main(["quantize", str(path), "--recipe", "gguf-q8_0", "--out", str(tmp_path / "q8"), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    again, first = load_model(str(tmp_path / "q8")).model, read_gguf_model(path).model
    layers = quant_linears(again)
    assert len(layers) == 14 and {q.codec["name"] for q in layers.values()} == {"q8_0"}
    q8, q4 = layers["model.layers.0.mlp.up_proj"].weight, first.model.layers[0].mlp.up_proj.weight
    assert 0 < (q8 - q4).abs().max() <= q4.abs().max() / 127


@pytest.mark.model
def test_smollm2_q4_1_file_reads_packed_with_the_float_models_logits() -> None:
    from lowbit.models.builtin import BUILTIN_MODELS, find_gguf

    path = find_gguf(BUILTIN_MODELS["smollm2-135m"])
    packed = load_gguf(path, keep_quantized=True)
    dense = load_gguf(path)
    layers = {n: q for n, q in quant_linears(packed.model).items() if n.startswith("model.layers.")}
    assert len(layers) == 210 and {q.codec["name"] for q in layers.values()} == {"q4_1"}
    # the file's Q8_0 token embedding stays packed; the tied head shares its codes
    emb, head = packed.model.model.embed_tokens, packed.model.lm_head
    assert isinstance(emb, QuantEmbedding) and emb.codec["name"] == "q8_0"
    assert head.qweight_codes.data_ptr() == emb.qweight_codes.data_ptr()
    ids = packed.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    assert ids.tolist() == dense.tokenizer("The capital of France is", return_tensors="pt")["input_ids"].tolist()
    torch.testing.assert_close(logits_of(packed.model, ids), logits_of(dense.model, ids), rtol=0, atol=0)


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma2", "phi3"])
def test_every_readable_family_comes_back_with_the_same_logits(tiny_model, tmp_path: Path, family: str) -> None:  # type: ignore[no-untyped-def]
    """lowbit's GGUF of each family it reads packed: the blocks come back exactly, and the model
    built from the file (transformers' GGUF config; Gemma's norms read back - 1) computes the
    written model's logits."""
    extra = {"gemma2": {"query_pre_attn_scalar": 16}}.get(family, {})
    model = tiny_model(family, vocab_size=VOCAB, **extra)
    quantize_model(model, Recipe.from_dict({"codec": {"name": "q8_0"}, "rules": [
        {"match": "*.mlp.down_proj", "codec": {"name": "q4_0"}}]}), progress=False)
    save_gguf(LoadedModel(model, make_byte_level_tokenizer(), "tiny", None), tmp_path / "m.gguf", dense="f32")
    back = read_gguf_model(tmp_path / "m.gguf")
    assert type(back.model) is type(model)
    ours, theirs = quant_linears(model), quant_linears(back.model)
    assert sorted(theirs) == sorted(ours)
    for name, q in ours.items():
        assert all(torch.equal(q.qweight.data[k], theirs[name].qweight.data[k]) for k in q.qweight.data), name
    torch.testing.assert_close(logits(back.model), logits(model), rtol=1e-5, atol=1e-5)
