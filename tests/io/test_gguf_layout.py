"""The bounds-checked walk of a GGUF file: it finds what gguf-py finds in a sound file, and names
the field or tensor, its byte offset and the damage in a broken one (before gguf-py loops or
fails in numpy's words)."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import write_tiny_gguf

from lowbit import LowbitError
from lowbit.io.gguf_layout import check_model_fields, read_gguf_layout


@pytest.fixture
def gguf_file(tmp_path: Path) -> Path:
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path)
    return path


def test_layout_matches_gguf_py(gguf_file: Path) -> None:
    from gguf import GGUFReader

    lay = read_gguf_layout(gguf_file)
    r = GGUFReader(gguf_file)
    fields = [f for f in r.fields.values() if not f.name.startswith("GGUF.")]
    assert [f.key for f in lay.fields] == [f.name for f in fields]
    assert [f.at for f in lay.fields] == [f.offset for f in fields]
    assert lay.data_offset == r.data_offset
    assert [(t.name, list(t.dims), t.type_name, t.data_begin, t.data_end - t.data_begin) for t in lay.tensors] == [
        (t.name, t.shape.tolist(), t.tensor_type.name, t.data_offset, t.n_bytes) for t in r.tensors]
    tokens = lay.field("tokenizer.ggml.tokens")
    assert tokens is not None and tokens.count == 64 and lay.field("llama.block_count").value == 1  # type: ignore[union-attr]


def test_big_endian_file(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "be.gguf"
    w = gguf.GGUFWriter(str(path), "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_block_count(3)
    w.add_tensor("t.weight", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    lay = read_gguf_layout(path)
    assert lay.byte_order == ">" and lay.field("llama.block_count").value == 3  # type: ignore[union-attr]
    assert [(t.name, t.dims) for t in lay.tensors] == [("t.weight", (32, 2))]


def _at(data: bytearray, offset: int, fmt: str, value: int) -> bytearray:
    struct.pack_into("<" + fmt, data, offset, value)
    return data


def _key_offset(path: Path, key: str) -> tuple[int, int]:
    """(offset of the entry, offset of its value) of field ``key``."""
    f = read_gguf_layout(path).field(key)
    assert f is not None
    return f.at, f.value_at


def _tensor_at(path: Path, name: str) -> int:
    """Offset of the tensor's n_dims field."""
    t = next(t for t in read_gguf_layout(path).tensors if t.name == name)
    return t.at + 8 + len(name)


def _damaged(path: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(edit(data)))
    return path


@pytest.mark.parametrize("edit, match", [
    (lambda p, d: _at(d, 4, "I", 7), r"the version at byte 4: GGUF version 7; lowbit reads versions 2, 3"),
    (lambda p, d: _at(d, 16, "Q", 1 << 40), r"the field count at byte 16: 1099511627776 fields cannot fit"),
    (lambda p, d: _at(d, 8, "Q", 1 << 40), r"the tensor count at byte 8: .* tensors cannot fit"),
    (lambda p, d: _at(d, _key_offset(p, "general.name")[0], "Q", 1 << 50),
     r"the key of field 1 at byte \d+: a string of 1125899906842624 bytes runs past the end"),
    (lambda p, d: _at(d, _key_offset(p, "general.name")[1], "Q", 1 << 50),
     r"field 1 \(general.name\) at byte \d+: a string of 1125899906842624 bytes runs past the end"),
    (lambda p, d: _at(d, _key_offset(p, "llama.block_count")[1] - 4, "I", 99),
     r"field \d+ \(llama.block_count\) at byte \d+: unknown value type id 99"),
    (lambda p, d: _at(d, _key_offset(p, "tokenizer.ggml.tokens")[1] + 4, "Q", 1 << 62),
     r"tokenizer.ggml.tokens\) at byte \d+: an array of 4611686018427387904 string values runs past the end"),
    (lambda p, d: _at(d, _key_offset(p, "tokenizer.ggml.scores")[1], "I", 42),
     r"tokenizer.ggml.scores\) at byte \d+: array of unknown value type id 42"),
    (lambda p, d: _at(d, _tensor_at(p, "output_norm.weight"), "I", 9),
     r"tensor output_norm.weight at byte \d+: 9 dimensions \(ggml holds 1 to 4\)"),
    (lambda p, d: _at(d, _tensor_at(p, "output_norm.weight") + 4, "Q", 0),
     r"tensor output_norm.weight at byte \d+: shape \[0\] has an empty dimension"),
    (lambda p, d: _at(d, _tensor_at(p, "output_norm.weight") + 12, "I", 250),
     r"tensor output_norm.weight at byte \d+: unknown GGML tensor type id 250"),
    (lambda p, d: _at(d, _tensor_at(p, "output_norm.weight") + 12, "I", 12),  # Q4_K: 256 per block
     r"tensor output_norm.weight at byte \d+: rows of 32 values are not whole Q4_K blocks of 256"),
    (lambda p, d: _at(d, _tensor_at(p, "output_norm.weight") + 16, "Q", 4),
     r"output_norm.weight at byte \d+: data offset 4 is not a multiple of the alignment 32"),
    (lambda p, d: _at(d, _tensor_at(p, "output_norm.weight") + 16, "Q", 1 << 20),
     r"output_norm.weight at byte \d+: its 128 bytes of F32 data at bytes \d+..\d+ run past the end of the file"),
    (lambda p, d: d[:-100], r"blk.0.ffn_down.weight at byte \d+: its 8192 bytes .* past the end .*truncated"),
    (lambda p, d: d[:_key_offset(p, "tokenizer.ggml.scores")[0] + 4], r"the length of the key of field 14 at byte \d+: needs \d+ bytes, the file ends \d+ bytes later \(truncated\?\)"),
    (lambda p, d: d.replace(b"general.name", b"general.\xffame"), r"the key of field 1 at byte \d+: not UTF-8 text"),
])
def test_damage_is_named(gguf_file: Path, edit, match: str) -> None:  # type: ignore[no-untyped-def]
    _damaged(gguf_file, lambda d: edit(gguf_file, d))
    t0 = time.perf_counter()
    with pytest.raises(LowbitError, match=match) as ei:
        read_gguf_layout(gguf_file)
    assert "m.gguf: corrupt GGUF file: " in str(ei.value) and "\n" not in str(ei.value)
    assert time.perf_counter() - t0 < 1.0  # refused by the bounds, never by walking a huge count


def test_duplicate_key_and_alignment(tmp_path: Path) -> None:
    import gguf

    def write(name: str, alignment: int | None) -> Path:
        path = tmp_path / name
        w = gguf.GGUFWriter(str(path), "llama")
        if alignment is not None:
            w.add_custom_alignment(alignment)
        w.add_uint32("aaaa.x", 1)
        w.add_uint32("bbbb.x", 2)
        w.add_tensor("t.weight", np.zeros((2, 32), dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    lay = read_gguf_layout(write("a64.gguf", 64))
    assert lay.alignment == 64 and lay.data_offset % 64 == 0
    a48 = write("a48.gguf", 64)
    _set_field(a48, "general.alignment", "I", 48)
    with pytest.raises(LowbitError, match=r"field general.alignment at byte \d+: 48 is not a power of two"):
        read_gguf_layout(a48)
    path = write("dup.gguf", None)
    path.write_bytes(path.read_bytes().replace(b"bbbb.x", b"aaaa.x"))
    with pytest.raises(LowbitError, match=r"field 2 \(aaaa.x\) at byte \d+: a second one of this name"):
        read_gguf_layout(path)


def _set_field(path: Path, key: str, fmt: str, value: int) -> None:
    f = read_gguf_layout(path).field(key)
    assert f is not None
    data = bytearray(path.read_bytes())
    struct.pack_into("<" + fmt, data, f.value_at, value)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("key, fmt, value, match", [
    ("llama.block_count", "I", 8388609, r"llama.block_count at byte \d+: 8388609 blocks, but the tensors are of blocks 0..0"),
    ("llama.block_count", "I", 0, r"llama.block_count at byte \d+: 0, must be positive"),
    ("llama.embedding_length", "I", 48, r"llama.embedding_length at byte \d+: 48, but token_embd.weight holds rows of 32"),
    ("llama.attention.head_count_kv", "I", 3, r"3 key/value heads do not divide the 4 attention heads"),
    ("tokenizer.ggml.eos_token_id", "I", 131074, r"eos_token_id at byte \d+: token id 131074 is outside the vocabulary"),
    ("tokenizer.ggml.unknown_token_id", "I", 64, r"token id 64 is outside the vocabulary of 64 tokens"),
])
def test_model_fields_that_cannot_describe_the_tensors(gguf_file: Path, key: str, fmt: str, value: int,
                                                       match: str) -> None:
    check_model_fields(read_gguf_layout(gguf_file))  # the sound file passes
    _set_field(gguf_file, key, fmt, value)
    with pytest.raises(LowbitError, match=f"m.gguf: corrupt GGUF file: field .*{match}"):
        check_model_fields(read_gguf_layout(gguf_file))


def test_tokenizer_arrays_of_other_lengths_and_types(tmp_path: Path) -> None:
    import gguf

    def write(scores: list, merges: list | None = None) -> Path:
        path = tmp_path / "t.gguf"
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_token_list(["a", "b", "c"])
        w.add_token_scores(scores)
        if merges is not None:
            w.add_array("tokenizer.ggml.merges", merges)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
        return path

    check_model_fields(read_gguf_layout(write([0.0, 1.0, 2.0], ["a b"])))
    with pytest.raises(LowbitError, match=r"tokenizer.ggml.scores at byte \d+: 2 entries for 3 tokens"):
        check_model_fields(read_gguf_layout(write([0.0, 1.0])))
    with pytest.raises(LowbitError, match=r"tokenizer.ggml.merges at byte \d+: must be an array of strings"):
        check_model_fields(read_gguf_layout(write([0.0, 1.0, 2.0], [1, 2])))
