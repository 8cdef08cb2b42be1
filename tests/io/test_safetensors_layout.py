"""The header check of a safetensors file: what the library writes passes; each kind of damage
is named with the tensor it is in."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit import LowbitError
from lowbit.io.safetensors_layout import DTYPE_BITS, check_safetensors


@pytest.fixture
def st_file(tmp_path: Path) -> Path:
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.randn(4, 8), "b": torch.arange(6, dtype=torch.int32), "c": torch.ones(3, dtype=torch.uint8)},
              str(path), metadata={"format": "pt"})
    return path


def test_what_the_library_writes_passes(tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.zeros(3, 5, dtype=d) for i, d in enumerate(
        (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2, torch.int8, torch.uint8,
         torch.int16, torch.int32, torch.int64, torch.float64, torch.bool))}
    tensors["empty"] = torch.zeros(0, 4)
    tensors["scalar"] = torch.tensor(1.5)
    path = tmp_path / "all.safetensors"
    save_file(tensors, str(path))
    check_safetensors(path)
    header = json.loads(path.read_bytes()[8:8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])
    assert {e["dtype"] for k, e in header.items() if k != "__metadata__"} <= set(DTYPE_BITS)
    assert set(load_file(str(path))) == set(tensors)


def _rewrite(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    header, body = edit(header, body)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def _set(key: str, field: str, value):  # type: ignore[no-untyped-def]
    def edit(h, body):  # type: ignore[no-untyped-def]
        h[key][field] = value
        return h, body
    return edit


@pytest.mark.parametrize("edit, match", [
    (_set("a", "dtype", "F99"), r"tensor a: unknown dtype 'F99'"),
    (_set("a", "dtype", ["F32"]), r"tensor a: unknown dtype"),
    (_set("a", "shape", [4, -8]), r"tensor a: shape \[4, -8\] is not a list of sizes"),
    (_set("a", "shape", [4, 9]), r"tensor a: F32 \[4, 9\] needs 144 bytes, its data_offsets \[0, 128\] hold 128"),
    (_set("a", "dtype", "F16"), r"tensor a: F16 \[4, 8\] needs 64 bytes"),
    (_set("b", "data_offsets", [128, 10**12]), r"tensor b: data_offsets \[128, 1000000000000\] are not a range within"),
    (_set("b", "data_offsets", [130, 154]), r"tensor b begins at byte 130 of the data, the tensor before it ends at 128"),
    (lambda h, b: ({**h, "d": {"dtype": "U8", "shape": [1], "data_offsets": [156, 157]}}, b + b"\0\0"),
     r"tensor d begins at byte 156 of the data, the tensor before it ends at 155 \(overlapping or missing data\)"),
    (lambda h, b: (h, b + b"\0\0"), r"its tensors hold 155 bytes of data, the file has 157 after the header"),
    (lambda h, b: ({**h, "__metadata__": {"format": 1}}, b), r"__metadata__ is not a mapping of text to text"),
    (lambda h, b: ({**h, "x": [1, 2]}, b), r"tensor x is not an entry of dtype, shape and data_offsets"),
    (lambda h, b: ([h], b), r"its header is not a JSON object"),
])
def test_damage_is_named(st_file: Path, edit, match: str) -> None:  # type: ignore[no-untyped-def]
    check_safetensors(st_file)
    _rewrite(st_file, edit)
    with pytest.raises(LowbitError, match=f"t.safetensors: corrupt safetensors file: {match}"):
        check_safetensors(st_file)


def test_length_text_and_truncation(st_file: Path) -> None:
    data = st_file.read_bytes()
    for raw, match in ((data[:5], "5 bytes, too short"), (struct.pack("<Q", 1 << 40) + data[8:], "a header of 1099511627776 bytes"),
                       (data[:8] + b"\xff" + data[9:], "its header is not UTF-8 text \\(byte 8\\)"),
                       (data[:8] + b"[" + data[9:], "its header is not valid JSON \\(line 1, column"),
                       (data[:-1], r"tensor c: data_offsets \[152, 155\] are not a range within the 154 bytes")):
        st_file.write_bytes(raw)
        with pytest.raises(LowbitError, match=f"corrupt safetensors file: {match}"):
            check_safetensors(st_file)
