"""The header of a safetensors file, checked entry by entry before the safetensors library reads it.

The library refuses a damaged header as "invalid shape, data type, or offset for tensor" without
saying which tensor; :func:`check_safetensors` says which, and what is wrong. Layout::

    header length N u64 (little-endian) | N bytes of JSON | tensor data
    JSON: {"NAME": {"dtype": "F16", "shape": [rows, cols], "data_offsets": [begin, end]}, ...,
           "__metadata__": {"key": "text", ...}}

Offsets are relative to the data, and the tensors tile it: sorted by offset, each begins where
the previous ends, and the last ends at the end of the file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from lowbit.errors import LowbitError

MAX_HEADER = 100_000_000  # the library's own limit
# dtype -> bits per value (the sub-byte float types of the MX formats included)
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
              "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "F64": 64, "I64": 64, "U64": 64, "C64": 64, "F4": 4,
              "F6_E2M3": 6, "F6_E3M2": 6}


def _shown(name: str) -> str:
    from lowbit.io.gguf_layout import shown

    return shown(name)


def check_safetensors(file: Path) -> None:
    """LowbitError naming the tensor or field when the safetensors ``file``'s header is damaged
    (module docstring): its length, JSON, a dtype, a shape, offsets that do not hold the shape's
    bytes, do not tile the data, or run past the end of the file."""
    file = Path(file)
    bad = f"{file}: corrupt safetensors file:"
    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise LowbitError(f"{bad} {size} bytes, too short for its header length (truncated?)")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER, size - 8):
                raise LowbitError(f"{bad} a header of {n} bytes in a file of {size} (truncated?)")
            raw = f.read(n)
    except OSError as e:
        raise LowbitError(f"cannot read {file}: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise LowbitError(f"{bad} its header is not UTF-8 text (byte {8 + e.start})") from None
    except (json.JSONDecodeError, RecursionError) as e:
        where = f" (line {e.lineno}, column {e.colno}: {e.msg})" if isinstance(e, json.JSONDecodeError) else ""
        raise LowbitError(f"{bad} its header is not valid JSON{where}") from None
    if not isinstance(header, dict):
        raise LowbitError(f"{bad} its header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise LowbitError(f"{bad} __metadata__ is not a mapping of text to text")
    data_len = size - 8 - n
    spans = []
    for name, entry in header.items():
        what = f"{bad} tensor {_shown(name)}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise LowbitError(f"{what} is not an entry of dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise LowbitError(f"{what}: unknown dtype {str(dtype)[:20]!r}")
        if not _ints(shape):
            raise LowbitError(f"{what}: shape {str(shape)[:40]} is not a list of sizes")
        if not (_ints(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1] <= data_len):
            raise LowbitError(f"{what}: data_offsets {str(offsets)[:40]} are not a range within the "
                              f"{data_len} bytes of data")
        numel = 1
        for d in shape:
            numel *= d
        need = numel * DTYPE_BITS[dtype]
        if need % 8 or need // 8 != offsets[1] - offsets[0]:
            raise LowbitError(f"{what}: {dtype} {shape} needs {need / 8:g} bytes, its data_offsets {offsets} hold "
                              f"{offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise LowbitError(f"{bad} tensor {_shown(name)} begins at byte {begin} of the data, the tensor before it "
                              f"ends at {end} (overlapping or missing data)")
        end = stop
    if end != data_len:
        raise LowbitError(f"{bad} its tensors hold {end} bytes of data, the file has {data_len} after the header")


def _ints(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)
