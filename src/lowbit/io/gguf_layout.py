"""The byte layout of a GGUF file, walked with every bound checked before gguf-py reads it.

gguf-py's reader trusts the file: a damaged count or length ends in numpy's words ("index 5 is
out of bounds for axis 0", "cannot reshape array of size ..."), and an array count of 2^40 makes
it loop over the whole file one element at a time. :func:`read_gguf_layout` walks the same
structure first and refuses a damaged file in one line that names the field or tensor, the byte
offset where it starts and what is wrong. Layout (GGUF v2/v3, either byte order)::

    "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x   key: string | value type u32 | value
    n_tensors x  name: string | n_dims u32 | ne[n_dims] u64 | ggml type u32 | offset u64
    padding to general.alignment (default 32) | tensor data, each at data start + offset

A string is ``u64 length | UTF-8 bytes``; an array ``element type u32 | count u64 | elements``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lowbit.errors import LowbitError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 4  # arrays of arrays: gguf allows them, no model file nests deeper than 2

# GGUF value type id -> (name, struct code of a scalar; None for string and array)
VALUE_TYPES: dict[int, tuple[str, str | None]] = {
    0: ("uint8", "B"), 1: ("int8", "b"), 2: ("uint16", "H"), 3: ("int16", "h"), 4: ("uint32", "I"),
    5: ("int32", "i"), 6: ("float32", "f"), 7: ("bool", "?"), 8: ("string", None), 9: ("array", None),
    10: ("uint64", "Q"), 11: ("int64", "q"), 12: ("float64", "d"),
}
STRING, ARRAY, UINT32 = 8, 9, 4


@dataclass(frozen=True)
class FieldInfo:
    key: str
    type_id: int
    at: int  # byte offset of the entry (its key) in the file
    value_at: int  # byte offset of the value
    end: int  # one past its last byte
    value: object = None  # scalars and strings (arrays are not kept: token lists are large)
    elem_type: int | None = None  # arrays: their elements' type id and count
    count: int = 0


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml order: ne[0] (values per row) first
    type_id: int
    type_name: str
    at: int  # byte offset of the tensor's info entry
    offset: int  # the stored offset, relative to the data section
    data_begin: int  # absolute byte offsets of its data
    data_end: int


@dataclass
class GGUFLayout:
    path: Path
    version: int
    byte_order: str  # struct's "<" or ">"
    size: int
    fields: list[FieldInfo] = field(default_factory=list)
    tensors: list[TensorInfo] = field(default_factory=list)
    alignment: int = DEFAULT_ALIGNMENT
    data_offset: int = 0

    def field(self, key: str) -> FieldInfo | None:
        return next((f for f in self.fields if f.key == key), None)


def shown(name: str, limit: int = 60) -> str:
    """``name`` as a message can show it: on one line, printable, at most ``limit`` characters."""
    text = name if name.isprintable() else ascii(name)[1:-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Cursor:
    """Reads little- or big-endian values from ``data``, raising LowbitError past its end."""

    def __init__(self, path: Path, data: bytes | memoryview, order: str) -> None:
        self.path, self.data, self.order, self.pos = path, data, order, 0

    def fail(self, what: str, problem: str, at: int | None = None) -> LowbitError:
        return LowbitError(f"{self.path}: corrupt GGUF file: {what} at byte {self.pos if at is None else at}: {problem}")

    def take(self, n: int, what: str) -> memoryview:
        if n > len(self.data) - self.pos:
            raise self.fail(what, f"needs {n} bytes, the file ends {len(self.data) - self.pos} bytes later "
                            "(truncated?)")
        out = memoryview(self.data)[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, code: str, what: str) -> int | float | bool:
        size = struct.calcsize(code)
        return struct.unpack(self.order + code, self.take(size, what))[0]

    def string(self, what: str) -> str:
        at = self.pos
        n = int(self.scalar("Q", f"the length of {what}"))
        if n > len(self.data) - self.pos:
            raise self.fail(what, f"a string of {n} bytes runs past the end of the file "
                            f"({len(self.data)} bytes)", at)
        raw = bytes(self.take(n, what))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(what, f"not UTF-8 text (byte {e.start} of {n})", at) from None


    def new_name(self, what: str, label: str, seen: set[str]) -> tuple[str, str]:
        """A key or tensor name not in ``seen`` (added to it), and ``label`` filled with it as shown."""
        at = self.pos
        name = self.string(what)
        shown_label = label.format(shown(name))
        if name in seen:
            raise self.fail(shown_label, "a second one of this name", at)
        seen.add(name)
        return name, shown_label


def read_gguf_layout(path: Path | str) -> GGUFLayout:
    """The checked layout of the GGUF file ``path`` (module docstring); LowbitError naming the
    damaged field or tensor and its byte offset when the file is truncated or corrupt."""
    import gguf

    path = Path(path)
    try:
        data = path.read_bytes() if path.stat().st_size < (1 << 20) else _header_bytes(path)
        size = path.stat().st_size
    except OSError as e:
        raise LowbitError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) < 24 or data[:4] != MAGIC:
        raise LowbitError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')"
                          if data[:4] != MAGIC else f"{path}: corrupt GGUF file: {size} bytes, too short for its header (truncated?)")
    little = struct.unpack("<I", data[4:8])[0]
    order = "<" if little & 0xFFFF else ">"  # gguf-py's test: a byte-swapped version has zero low bits
    cur = _Cursor(path, data, order)
    cur.pos = 4
    version = int(cur.scalar("I", "the version"))
    if version not in VERSIONS:
        raise cur.fail("the version", f"GGUF version {version}; lowbit reads versions "
                       f"{', '.join(map(str, VERSIONS))}", 4)
    n_tensors = int(cur.scalar("Q", "the tensor count"))
    n_kv = int(cur.scalar("Q", "the field count"))
    # each field takes at least 8 + 4 bytes, each tensor info 8 + 4 + 8 + 4 + 8
    if n_kv * 12 > size:
        raise cur.fail("the field count", f"{n_kv} fields cannot fit in a file of {size} bytes", 16)
    if n_tensors * 32 > size:
        raise cur.fail("the tensor count", f"{n_tensors} tensors cannot fit in a file of {size} bytes", 8)
    layout = GGUFLayout(path, version, order, size)
    _read_fields(cur, n_kv, layout)
    _read_tensor_infos(cur, n_tensors, layout, gguf.GGML_QUANT_SIZES, gguf.GGMLQuantizationType)
    return layout


def _header_bytes(path: Path) -> memoryview:
    """The whole file, memory-mapped (the header of a model file may be tens of MB: its vocabulary)."""
    import mmap

    with path.open("rb") as f:
        return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))


def _read_fields(cur: _Cursor, n_kv: int, layout: GGUFLayout) -> None:
    seen: set[str] = set()
    for i in range(n_kv):
        at = cur.pos
        key, what = cur.new_name(f"the key of field {i}", f"field {i} ({{}})", seen)
        type_at = cur.pos
        type_id = int(cur.scalar("I", f"the type of {what}"))
        if type_id not in VALUE_TYPES:
            raise cur.fail(what, f"unknown value type id {type_id}", type_at)
        value_at = cur.pos
        value = _read_value(cur, type_id, what, 0)
        elem, count = (None, 0)
        if type_id == ARRAY:
            elem, count = struct.unpack_from(cur.order + "IQ", cur.data, value_at)
        layout.fields.append(FieldInfo(key, type_id, at, value_at, cur.pos, value, elem, count))
    align = layout.field("general.alignment")
    if align is not None:
        if align.type_id != UINT32:
            raise cur.fail("field general.alignment", f"type {VALUE_TYPES[align.type_id][0]}, must be uint32",
                           align.at)
        a = int(align.value)  # type: ignore[arg-type]
        if a == 0 or a & (a - 1):
            raise cur.fail("field general.alignment", f"{a} is not a power of two", align.at)
        layout.alignment = a


def _read_value(cur: _Cursor, type_id: int, what: str, depth: int) -> object:
    name, code = VALUE_TYPES[type_id]
    if code is not None:
        return cur.scalar(code, what)
    if type_id == STRING:
        return cur.string(what)
    at = cur.pos
    elem = int(cur.scalar("I", f"the element type of {what}"))
    if elem not in VALUE_TYPES:
        raise cur.fail(what, f"array of unknown value type id {elem}", at)
    if elem == ARRAY and depth + 1 >= MAX_ARRAY_DEPTH:
        raise cur.fail(what, f"arrays nested more than {MAX_ARRAY_DEPTH} deep", at)
    count = int(cur.scalar("Q", f"the length of {what}"))
    elem_code = VALUE_TYPES[elem][1]
    least = struct.calcsize(elem_code) if elem_code is not None else (8 if elem == STRING else 12)
    left = len(cur.data) - cur.pos
    if count * least > left:
        raise cur.fail(what, f"an array of {count} {VALUE_TYPES[elem][0]} values runs past the end of the "
                       f"file ({left} bytes left)", at)
    if elem_code is not None:  # a block of scalars: checked by its size, not read one by one
        cur.take(count * least, what)
        return None
    for j in range(count):
        _read_value(cur, elem, f"{what} element {j}", depth + 1)
    return None


def _read_tensor_infos(cur: _Cursor, n_tensors: int, layout: GGUFLayout, sizes: dict, types: type) -> None:
    infos = []
    seen: set[str] = set()
    for i in range(n_tensors):
        at = cur.pos
        name, what = cur.new_name(f"the name of tensor {i}", "tensor {}", seen)
        n_dims = int(cur.scalar("I", f"the dimension count of {what}"))
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(what, f"{n_dims} dimensions (ggml holds 1 to {MAX_DIMS})", at)
        dims = tuple(int(cur.scalar("Q", f"dimension {d} of {what}")) for d in range(n_dims))
        if min(dims) < 1:
            raise cur.fail(what, f"shape {list(dims)} has an empty dimension", at)
        type_id = int(cur.scalar("I", f"the ggml type of {what}"))
        try:
            ggml_type = types(type_id)
        except ValueError:
            raise cur.fail(what, f"unknown GGML tensor type id {type_id} (or a type newer than the installed "
                           "gguf package)", at) from None
        block, block_bytes = sizes[ggml_type]
        if dims[0] % block:
            raise cur.fail(what, f"rows of {dims[0]} values are not whole {ggml_type.name} blocks of {block}", at)
        offset = int(cur.scalar("Q", f"the data offset of {what}"))
        n = 1
        for d in dims:
            n *= d
        infos.append((name, dims, type_id, ggml_type.name, at, offset, n // block * block_bytes))
    pad = -cur.pos % layout.alignment
    layout.data_offset = cur.pos + pad
    for name, dims, type_id, type_name, at, offset, nbytes in infos:
        what = f"tensor {shown(name)}"
        if offset % layout.alignment:
            raise cur.fail(what, f"data offset {offset} is not a multiple of the alignment {layout.alignment}", at)
        begin = layout.data_offset + offset
        if begin + nbytes > layout.size:
            raise cur.fail(what, f"its {nbytes} bytes of {type_name} data at bytes {begin}..{begin + nbytes} run "
                           f"past the end of the file ({layout.size} bytes; truncated?)", at)
        layout.tensors.append(TensorInfo(name, dims, type_id, type_name, at, offset, begin, begin + nbytes))


# -- the fields a model file's reader relies on ---------------------------------------------------
INTEGER_TYPES = (0, 1, 2, 3, 4, 5, 10, 11)
# hyper-parameters that are counts or sizes: a positive integer where present (some families
# store per-layer arrays, which are left to the model's own reader)
SIZE_KEYS = ("context_length", "block_count", "embedding_length", "feed_forward_length", "vocab_size",
             "attention.head_count", "attention.head_count_kv", "attention.key_length", "attention.value_length",
             "rope.dimension_count", "expert_count", "expert_used_count")
TOKEN_ID_KEYS = ("bos", "eos", "unknown", "padding", "seperator", "cls", "mask", "eot", "eom")


def check_model_fields(layout: GGUFLayout) -> None:
    """LowbitError naming the field when a model file's metadata cannot describe its tensors:
    the architecture, sizes that are not positive integers, a block count or embedding width the
    tensor table disagrees with, tokenizer arrays of other types or lengths, token ids outside the
    vocabulary. These are what a model is built from before any tensor is read: a damaged block
    count of 8,388,609 would otherwise build that many layers."""
    path = layout.path

    def fail(f: FieldInfo, problem: str) -> LowbitError:
        return LowbitError(f"{path}: corrupt GGUF file: field {shown(f.key)} at byte {f.at}: {problem}")

    arch_field = layout.field("general.architecture")
    if arch_field is None:
        raise LowbitError(f"{path}: no general.architecture field: not a model file")
    if arch_field.type_id != STRING:
        raise fail(arch_field, f"a {VALUE_TYPES[arch_field.type_id][0]}, must be a string")
    arch = str(arch_field.value)
    sizes: dict[str, int] = {}
    for key in SIZE_KEYS:
        f = layout.field(f"{arch}.{key}")
        if f is None or f.type_id == ARRAY:
            continue
        if f.type_id not in INTEGER_TYPES:
            raise fail(f, f"a {VALUE_TYPES[f.type_id][0]}, must be an integer")
        if int(f.value) < 1:  # type: ignore[call-overload]
            raise fail(f, f"{f.value}, must be positive")
        sizes[key] = int(f.value)  # type: ignore[call-overload]
    tensors = {t.name: t for t in layout.tensors}
    blocks = {int(n.split(".")[1]) for n in tensors if n.startswith("blk.") and n.split(".")[1].isdigit()}
    if "block_count" in sizes and blocks and sizes["block_count"] != max(blocks) + 1:
        raise fail(layout.field(f"{arch}.block_count"),  # type: ignore[arg-type]
                   f"{sizes['block_count']} blocks, but the tensors are of blocks 0..{max(blocks)}")
    heads, kv = sizes.get("attention.head_count"), sizes.get("attention.head_count_kv")
    if heads and kv and heads % kv:
        raise fail(layout.field(f"{arch}.attention.head_count_kv"),  # type: ignore[arg-type]
                   f"{kv} key/value heads do not divide the {heads} attention heads")
    emb = tensors.get("token_embd.weight")
    if emb is not None and len(emb.dims) == 2 and "embedding_length" in sizes and emb.dims[0] != sizes["embedding_length"]:
        raise fail(layout.field(f"{arch}.embedding_length"),  # type: ignore[arg-type]
                   f"{sizes['embedding_length']}, but token_embd.weight holds rows of {emb.dims[0]}")
    _check_tokenizer(layout, fail, emb)


def _check_tokenizer(layout: GGUFLayout, fail: Callable[[FieldInfo, str], LowbitError],
                     emb: TensorInfo | None) -> None:
    tokens = layout.field("tokenizer.ggml.tokens")
    if tokens is None:
        return
    if tokens.type_id != ARRAY or tokens.elem_type != STRING:
        raise fail(tokens, "must be an array of strings")
    n = tokens.count
    if emb is not None and len(emb.dims) == 2 and emb.dims[1] != n:
        raise fail(tokens, f"{n} tokens, but token_embd.weight has {emb.dims[1]} rows")
    for key, elem in (("scores", 6), ("token_type", 5)):
        f = layout.field(f"tokenizer.ggml.{key}")
        if f is None:
            continue
        if f.type_id != ARRAY or f.elem_type != elem:
            raise fail(f, f"must be an array of {VALUE_TYPES[elem][0]}")
        if f.count != n:
            raise fail(f, f"{f.count} entries for {n} tokens")
    merges = layout.field("tokenizer.ggml.merges")
    if merges is not None and (merges.type_id != ARRAY or merges.elem_type != STRING):
        raise fail(merges, "must be an array of strings")
    for kind in TOKEN_ID_KEYS:
        f = layout.field(f"tokenizer.ggml.{kind}_token_id")
        if f is None:
            continue
        if f.type_id not in INTEGER_TYPES:
            raise fail(f, f"a {VALUE_TYPES[f.type_id][0]}, must be an integer token id")
        if not 0 <= int(f.value) < n:  # type: ignore[call-overload]
            raise fail(f, f"token id {f.value} is outside the vocabulary of {n} tokens")
    model = layout.field("tokenizer.ggml.model")
    if model is not None and model.type_id != STRING:
        raise fail(model, f"a {VALUE_TYPES[model.type_id][0]}, must be a string")
