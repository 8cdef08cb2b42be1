"""Importance-matrix files: lowbit's GGUF imatrix reads back, a legacy ``.dat`` built byte by byte
per llama.cpp's layout reads, bad files are named, and (with llama.cpp's tools) ``llama-imatrix``
on a lowbit GGUF gives what lowbit's own collection gives."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_byte_level_tokenizer

from lowbit import LowbitError
from lowbit.bench.llama_cpp import llama_cpp_bin, llama_cpp_imatrix, llama_cpp_token_ids, run_tool
from lowbit.calibration.samples import CalibrationSet
from lowbit.io.gguf_writer import save_gguf
from lowbit.io.imatrix import ImportanceMatrix, linear_gguf_names, read_imatrix, read_imatrix_file, write_imatrix
from lowbit.models import LoadedModel
from lowbit.pipeline import collect_importance


def random_imatrix(model: torch.nn.Module, seed: int = 0) -> ImportanceMatrix:
    gen = torch.Generator().manual_seed(seed)
    values, counts = {}, {}
    for i, (hf, (_, width)) in enumerate(linear_gguf_names(model).items()):
        values[hf] = torch.rand(width, generator=gen) ** 3 + 1e-4
        counts[hf] = 256 + 13 * i
    return ImportanceMatrix(values, counts, ["pydoc-calib"], chunk_count=8, chunk_size=32)


def test_linear_names_follow_llama_cpp(tiny_model) -> None:  # type: ignore[no-untyped-def]
    names = linear_gguf_names(tiny_model("llama"))
    assert len(names) == 14
    assert names["model.layers.0.self_attn.q_proj"] == ("blk.0.attn_q.weight", 64)
    assert names["model.layers.1.mlp.down_proj"] == ("blk.1.ffn_down.weight", 128)


def test_write_read_round_trip(tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from gguf import GGUFReader

    model = tiny_model("llama")
    imatrix = random_imatrix(model)
    path = write_imatrix(tmp_path / "m.imatrix.gguf", imatrix, model)
    assert [p.name for p in tmp_path.iterdir()] == ["m.imatrix.gguf"]  # no .tmp left

    # what llama.cpp's loader looks at
    r = GGUFReader(str(path))
    assert r.fields["general.type"].contents() == "imatrix"
    assert r.fields["imatrix.datasets"].contents() == ["pydoc-calib"]
    assert r.fields["imatrix.chunk_count"].contents() == 8 and r.fields["imatrix.chunk_size"].contents() == 32
    tensors = {t.name: t for t in r.tensors}
    assert list(tensors["blk.0.attn_q.weight.in_sum2"].shape) == [64, 1]  # ggml order: (in, n_mat)
    assert list(tensors["blk.0.attn_q.weight.counts"].shape) == [1, 1]
    np.testing.assert_allclose(tensors["blk.0.attn_q.weight.in_sum2"].data[0] / 256,
                               imatrix.values["model.layers.0.self_attn.q_proj"].numpy(), rtol=1e-6)

    back = read_imatrix(path, model)
    assert back.values.keys() == imatrix.values.keys() and back.counts == imatrix.counts
    assert (back.datasets, back.chunk_count, back.chunk_size) == (["pydoc-calib"], 8, 32)
    for name, v in imatrix.values.items():
        assert back.values[name].dtype == torch.float32
        # the file stores sums (mean * count) in float32: the means come back within one ulp
        torch.testing.assert_close(back.values[name], v, rtol=1.2e-7, atol=0)
    assert "blk.1.ffn_up.weight" in read_imatrix_file(path).values  # the file's own names

    with pytest.raises(LowbitError, match="exists"):
        write_imatrix(path, imatrix, model)


def legacy_dat(entries: dict[str, tuple[int, np.ndarray]], trailer: tuple[int, str] | None) -> bytes:
    """llama.cpp's legacy imatrix layout (tools/imatrix/imatrix.cpp, save_imatrix_legacy):
    int32 n_entries; per entry int32 len, name, int32 ncall, int32 nval, float32 values[nval]
    (mean x^2 * ncall); then optionally int32 chunk count, int32 len, dataset name."""
    out = struct.pack("<i", len(entries))
    for name, (ncall, values) in entries.items():
        out += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, values.size)
        out += values.astype("<f4").tobytes()
    if trailer is not None:
        out += struct.pack("<ii", trailer[0], len(trailer[1])) + trailer[1].encode()
    return out


@pytest.mark.parametrize("trailer", [(10, "wiki.train.raw"), None])
def test_reads_a_legacy_dat(tiny_model, tmp_path: Path, trailer) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama")
    means = {"blk.0.attn_q.weight": np.linspace(0.1, 2.0, 64), "blk.1.ffn_down.weight": np.linspace(3, 1, 128),
             "output.weight": np.ones(64)}  # llama-imatrix --process-output: no block linear
    ncalls = {"blk.0.attn_q.weight": 10, "blk.1.ffn_down.weight": 7, "output.weight": 10}
    path = tmp_path / "imatrix.dat"
    path.write_bytes(legacy_dat({k: (ncalls[k], (v * ncalls[k]).astype(np.float32)) for k, v in means.items()},
                                trailer))
    raw = read_imatrix_file(path)
    assert raw.values.keys() == means.keys() and raw.counts == {}  # tokens are not stored
    assert raw.chunk_count == (10 if trailer else 0) and raw.datasets == (["wiki.train.raw"] if trailer else [])
    back = read_imatrix(path, model)
    assert back.values.keys() == {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"}
    np.testing.assert_allclose(back.values["model.layers.0.self_attn.q_proj"].numpy(), means["blk.0.attn_q.weight"],
                               rtol=1e-6)
    np.testing.assert_allclose(back.values["model.layers.1.mlp.down_proj"].numpy(), means["blk.1.ffn_down.weight"],
                               rtol=1e-6)


def test_bad_files_are_named(tiny_model, tiny_gguf, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama")
    good = write_imatrix(tmp_path / "good.gguf", random_imatrix(model), model)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(LowbitError, match="cut.gguf: corrupt GGUF file: tensor .* run past the end of the file"):
        read_imatrix(cut, model)

    dat = legacy_dat({"blk.0.attn_q.weight": (1, np.ones(64, np.float32))}, (1, "x"))
    for n, what in ((len(dat) - 100, "values"), (20, "name")):
        bad = tmp_path / "cut.dat"
        bad.write_bytes(dat[:n])
        with pytest.raises(LowbitError, match=f"cut.dat: truncated or corrupt importance matrix.*{what}"):
            read_imatrix(bad, model)
    (tmp_path / "extra.dat").write_bytes(dat + b"junk")
    with pytest.raises(LowbitError, match="4 unexpected bytes"):
        read_imatrix(tmp_path / "extra.dat", model)
    (tmp_path / "text.txt").write_text("not an importance matrix at all\n")
    with pytest.raises(LowbitError, match="neither a GGUF nor a legacy"):
        read_imatrix(tmp_path / "text.txt", model)
    with pytest.raises(LowbitError, match="is a GGUF file but not an importance matrix"):
        read_imatrix(tiny_gguf(), model)
    with pytest.raises(LowbitError, match="cannot read importance matrix"):
        read_imatrix(tmp_path / "missing.gguf", model)
    nan = tmp_path / "nan.dat"
    nan.write_bytes(legacy_dat({"blk.0.attn_q.weight": (1, np.full(64, np.nan, np.float32))}, None))
    with pytest.raises(LowbitError, match="blk.0.attn_q.weight holds NaN"):
        read_imatrix(nan, model)


def test_file_of_a_different_model_is_refused(tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    small = tiny_model("llama")
    path = write_imatrix(tmp_path / "m.gguf", random_imatrix(small), small)
    with pytest.raises(LowbitError, match="blk.0.ffn_down.weight has 128 columns, but model.layers.0.mlp.down_proj "
                                          "has 96 inputs"):
        read_imatrix(path, tiny_model("llama", intermediate_size=96))
    with pytest.raises(LowbitError, match="for block 1, but the model has 1 blocks"):
        read_imatrix(path, tiny_model("llama", num_hidden_layers=1))


@pytest.mark.skipif(llama_cpp_bin() is None, reason="llama.cpp's tools are not built (scripts/peers/setup_llamacpp.sh)")
def test_llama_imatrix_equals_lowbits_collection_on_the_float_model(tiny_model, text_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """llama.cpp collects on the float model; so does :func:`collect_importance`. (A quantizing
    run with ``RTN(importance=True)`` instead measures each linear with the earlier linears
    already quantized: only block 0's q/k/v inputs would agree.)"""
    n_ctx, chunks = 32, 8
    model = tiny_model("llama", vocab_size=260, max_position_embeddings=64)
    path = save_gguf(LoadedModel(model, make_byte_level_tokenizer(), "tiny", None), tmp_path / "m.gguf", dense="f32")
    text = tmp_path / "t.txt"
    text.write_text(text_factory(3000, seed=2))
    out = tmp_path / "imatrix.gguf"
    # flash attention and an F16 KV cache round the attention's output to F16 (5e-4 relative on
    # o_proj's input): off, the two agree to float32 rounding
    llama_cpp_imatrix(path, text, out, n_ctx, chunks, 1, "-b", str(n_ctx), "--no-ppl", "-fa", "off", "-ctk", "f32",
                      "-ctv", "f32")
    theirs = read_imatrix(out, model)

    ids = torch.tensor(llama_cpp_token_ids(path, text)[: chunks * n_ctx]).view(chunks, n_ctx)
    ours = collect_importance(model, CalibrationSet(ids, "t.txt"))
    assert theirs.values.keys() == ours.values.keys() and len(ours.values) == 14
    assert theirs.counts == ours.counts == {k: chunks * n_ctx for k in ours.values}
    assert (theirs.chunk_count, theirs.chunk_size) == (chunks, n_ctx)
    for name, v in ours.values.items():
        torch.testing.assert_close(theirs.values[name], v, rtol=1e-5, atol=1e-8, msg=name)


@pytest.mark.skipif(llama_cpp_bin() is None, reason="llama.cpp's tools are not built (scripts/peers/setup_llamacpp.sh)")
def test_llama_quantize_reads_lowbits_imatrix(tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama", vocab_size=260)
    path = save_gguf(LoadedModel(model, make_byte_level_tokenizer(), "tiny", None), tmp_path / "m.gguf", dense="f32")
    imatrix = write_imatrix(tmp_path / "m.imatrix.gguf", random_imatrix(model), model)
    out = run_tool("llama-quantize", "--imatrix", str(imatrix), str(path), str(tmp_path / "q.gguf"), "Q4_0")
    assert "loaded 14 importance matrix entries" in out and "computed on 8 chunks" in out, out[-2000:]
