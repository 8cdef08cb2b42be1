"""Mutation fuzzing of lowbit's readers of untrusted files: seeded, bounded, shared by the test
suite (a few thousand cases) and ``scripts/fuzz_readers.py`` (the long run).

A *target* is a seed file and a reader. :func:`mutants` derives damaged copies of the seed:
bit flips, interesting integers written over the seed's own length, count and type fields
(``landmarks``: their byte offsets), truncations, inserted, deleted and repeated chunks, and
bytes that are not UTF-8. :func:`run_case` feeds one to the reader and classifies the outcome:
``ok`` (the reader took it), ``refused`` (a LowbitError whose one line names the file and does
not leak Python or numpy internals) or a failure (any other exception, an error message that
leaks internals, or a case that ran past its time limit).
"""

from __future__ import annotations

import random
import re
import signal
import struct
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lowbit.errors import LowbitError

# words of Python, numpy and torch internals that a user-facing message must not carry
LEAKS = re.compile(
    r"out of bounds for axis|cannot reshape|index \d+ is out of|list index|object has no attribute|"
    r"unpack requires|codec can't decode|invalid literal for|NoneType|not subscriptable|unhashable|"
    r"Traceback|operands could not be broadcast|shape '\[|size mismatch|expected sequence|"
    r"must be real number|argument must be|takes \d+ positional|unsupported operand|Errno",
)

INTERESTING_U64 = (0, 1, 2, 3, 7, 8, 31, 32, 33, 255, 256, 4095, 4096, 65535, 1 << 16, (1 << 31) - 1, 1 << 31,
                   (1 << 32) - 1, 1 << 32, 1 << 40, (1 << 63) - 1, 1 << 63, (1 << 64) - 1)


@dataclass
class Outcome:
    kind: str  # ok, refused, crash, leak, timeout
    detail: str = ""


@dataclass
class Tally:
    cases: int = 0
    kinds: Counter = field(default_factory=Counter)
    failures: list[tuple[int, str, str]] = field(default_factory=list)  # (case, kind, detail)
    seconds: float = 0.0

    def add(self, case: int, outcome: Outcome) -> None:
        self.cases += 1
        self.kinds[outcome.kind] += 1
        if outcome.kind not in ("ok", "refused"):
            self.failures.append((case, outcome.kind, outcome.detail))


class _Timeout(BaseException):
    """Raised by the alarm; a BaseException so that a reader's ``except Exception`` cannot eat it."""


def _alarm(_sig: int, _frame: object) -> None:
    raise _Timeout()


def run_case(reader: Callable[[Path], object], path: Path, time_limit: float = 10.0) -> Outcome:
    """Feed ``path`` to ``reader``, classified (module docstring)."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, time_limit)
    try:
        reader(path)
        return Outcome("ok")
    except _Timeout:
        return Outcome("timeout", f"ran past {time_limit} s")
    except LowbitError as e:
        msg = str(e)
        lines = msg.splitlines()
        if len(lines) != 1 or LEAKS.search(msg):
            return Outcome("leak", msg[:500])
        return Outcome("refused", msg)
    except Exception as e:  # noqa: BLE001 - what the fuzzer is for
        tb = traceback.extract_tb(e.__traceback__)[-1]
        return Outcome("crash", f"{type(e).__name__}: {str(e)[:300]} ({Path(tb.filename).name}:{tb.lineno})")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def mutate_bytes(seed: bytes, rng: random.Random, landmarks: list[int], hot_end: int | None = None) -> bytes:
    """A damaged copy of ``seed``: one to three byte-level edits. ``landmarks``: byte offsets of
    the seed's integer fields (lengths, counts, type ids, offsets); ``hot_end``: the end of its
    header, where most random damage goes (a tensor data byte changes values, not structure)."""
    hot = hot_end or len(seed)
    ops = (_flip, _interesting, _interesting, _interesting, _truncate, _insert, _delete, _repeat, _garbage)
    data = bytearray(seed)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        data = rng.choice(ops)(data, rng, landmarks, hot)
    return bytes(data)


def _pos(rng: random.Random, n: int, hot: int) -> int:
    return rng.randrange(max(1, min(hot, n))) if rng.random() < 0.85 else rng.randrange(max(1, n))


def _flip(d: bytearray, rng: random.Random, marks: list[int], hot: int) -> bytearray:
    if d:
        d[_pos(rng, len(d), hot)] ^= 1 << rng.randrange(8)
    return d


def _interesting(d: bytearray, rng: random.Random, marks: list[int], hot: int) -> bytearray:
    at = rng.choice(marks) if marks and rng.random() < 0.9 else _pos(rng, len(d), hot)
    width = rng.choice((1, 4, 4, 8, 8))
    value = rng.choice(INTERESTING_U64) if rng.random() < 0.8 else rng.randrange(1 << (8 * width))
    if rng.random() < 0.2:  # near the true value: off by a little
        old = int.from_bytes(d[at:at + width].ljust(width, b"\0"), "little")
        value = max(0, old + rng.choice((-2, -1, 1, 2, 16)))
    value &= (1 << (8 * width)) - 1
    d[at:at + width] = value.to_bytes(width, "little")
    return d


def _truncate(d: bytearray, rng: random.Random, marks: list[int], hot: int) -> bytearray:
    return d[: _pos(rng, len(d), hot)]


def _insert(d: bytearray, rng: random.Random, marks: list[int], hot: int) -> bytearray:
    at = _pos(rng, len(d), hot)
    d[at:at] = bytes(rng.randrange(256) for _ in range(rng.choice((1, 4, 8, 17))))
    return d


def _delete(d: bytearray, rng: random.Random, marks: list[int], hot: int) -> bytearray:
    at = _pos(rng, len(d), hot)
    del d[at:at + rng.choice((1, 4, 8, 17))]
    return d


def _repeat(d: bytearray, rng: random.Random, marks: list[int], hot: int) -> bytearray:
    at = _pos(rng, len(d), hot)
    chunk = d[at:at + rng.choice((4, 8, 24, 64))]
    d[at:at] = chunk
    return d


def _garbage(d: bytearray, rng: random.Random, marks: list[int], hot: int) -> bytearray:
    at = _pos(rng, len(d), hot)
    n = rng.choice((1, 2, 8))
    d[at:at + n] = bytes(rng.choice((0x80, 0xC3, 0xFF, 0xFE, 0x00)) for _ in range(n))
    return d


# -- landmarks of the seed files ------------------------------------------------------------------
def gguf_landmarks(path: Path) -> tuple[list[int], int]:
    """Offsets of every length, count, type id and offset field of a GGUF file, and the end of
    its header (the start of the tensor data)."""
    from lowbit.io.gguf_layout import ARRAY, read_gguf_layout

    lay = read_gguf_layout(path)
    data = path.read_bytes()
    marks = [4, 8, 16]
    for f in lay.fields:
        (klen,) = struct.unpack_from("<Q", data, f.at)
        marks += [f.at, f.at + 8 + klen, f.value_at]
        if f.type_id == ARRAY:
            marks.append(f.value_at + 4)
    for t in lay.tensors:
        (nlen,) = struct.unpack_from("<Q", data, t.at)
        p = t.at + 8 + nlen
        marks += [t.at, p] + [p + 4 + 8 * i for i in range(len(t.dims))]
        p += 4 + 8 * len(t.dims)
        marks += [p, p + 4]
    return marks, lay.data_offset


def safetensors_landmarks(path: Path) -> tuple[list[int], int]:
    """The header length field, and the offsets of every number in the JSON header (dtypes,
    shapes and data offsets are text there)."""
    data = path.read_bytes()
    (n,) = struct.unpack_from("<Q", data, 0)
    header = data[8:8 + n]
    marks = [0] + [8 + m.start() for m in re.finditer(rb"\d+|\"[A-Z0-9]+\"", header)]
    return marks, 8 + n


# -- structure-aware mutation of JSON (metadata files, safetensors headers) -----------------------
JSON_VALUES = (None, True, False, 0, -1, 1, 3, 7, 8, 9, 64, 1 << 31, 1 << 64, -(1 << 63), 1.5, -0.0, 1e308,
               float("nan"), float("inf"), "", "x", "\udcff", "int4", "F32", "U8", "I32", "BF16", "../x", [], [0],
               [1, 2], [-1, 5], {}, {"name": "int"})


def _nodes(obj: object, path: tuple = ()) -> Iterator[tuple]:
    yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _nodes(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _nodes(v, (*path, i))


def _get(obj: object, path: tuple) -> object:
    for p in path:
        obj = obj[p]  # type: ignore[index]
    return obj


def mutate_json(obj: object, rng: random.Random, nested: tuple[str, ...] = ()) -> object:
    """A copy of the JSON value ``obj`` with one to three random edits: a value replaced (by
    another type, an edge number, a nearby number), a key deleted or added, a list element
    dropped or repeated. A string value under a key in ``nested`` is JSON itself and is
    mutated as JSON."""
    import copy
    import json

    obj = copy.deepcopy(obj)
    for _ in range(rng.choice((1, 1, 2, 3))):
        paths = list(_nodes(obj))
        path = rng.choice(paths)
        if path and path[-1] in nested and isinstance(_get(obj, path), str):
            parent = _get(obj, path[:-1])
            try:
                inner = json.loads(parent[path[-1]])  # type: ignore[index]
            except ValueError:
                continue
            parent[path[-1]] = json.dumps(mutate_json(inner, rng, nested))  # type: ignore[index]
            continue
        if not path:
            continue
        parent, key = _get(obj, path[:-1]), path[-1]
        old = parent[key]  # type: ignore[index]
        op = rng.random()
        if op < 0.55:
            if isinstance(old, bool) or not isinstance(old, (int, float)) or rng.random() < 0.5:
                new = rng.choice(JSON_VALUES)
            else:
                new = rng.choice((old + 1, old - 1, old * 2, old // 2 if isinstance(old, int) else old / 2, -old, 0))
            parent[key] = copy.deepcopy(new)  # type: ignore[index]
        elif op < 0.75 and isinstance(parent, dict):
            del parent[key]
        elif op < 0.85 and isinstance(parent, dict):
            parent[rng.choice(("extra", "bits", "shape", "codec", "parts", "group_size"))] = rng.choice(JSON_VALUES)
        elif isinstance(parent, list):
            if rng.random() < 0.5:
                del parent[key]
            else:
                parent.insert(key, copy.deepcopy(old))
    return obj


def safetensors_header(data: bytes) -> tuple[dict, bytes]:
    import json

    (n,) = struct.unpack_from("<Q", data, 0)
    return json.loads(data[8:8 + n]), data[8 + n:]


def with_safetensors_header(header: dict, body: bytes) -> bytes:
    import json

    raw = json.dumps(header).encode("utf-8", errors="surrogatepass")
    return struct.pack("<Q", len(raw)) + raw + body


# -- targets: a seed folder, what the reader is given, and how its files are damaged ---------------
Mutator = Callable[[bytes, random.Random], bytes]


@dataclass
class Target:
    name: str
    folder: Path  # the seed files; cases run on a copy
    entry: str  # the file the reader is given, "" for the folder itself
    reader: Callable[[Path], object]
    mutators: list[tuple[str, Mutator]]  # (file in the folder, how to damage it)
    about: str = ""  # the reader, in words


def bytes_mutator(path: Path, landmarks: Callable[[Path], tuple[list[int], int]] | None = None) -> Mutator:
    marks, hot = landmarks(path) if landmarks is not None else ([], None)
    return lambda data, rng: mutate_bytes(data, rng, marks, hot)


def json_mutator(nested: tuple[str, ...] = ()) -> Mutator:
    """Mostly JSON-aware edits (:func:`mutate_json`), sometimes bytes (a syntax error, not UTF-8)."""
    import json

    def mutate(data: bytes, rng: random.Random) -> bytes:
        if rng.random() < 0.2:
            return mutate_bytes(data, rng, [], None)
        out = json.dumps(mutate_json(json.loads(data), rng, nested), indent=1)
        return out.encode("utf-8", errors="surrogatepass")

    return mutate


def safetensors_mutator(path: Path, nested: tuple[str, ...] = ()) -> Mutator:
    """Edits of a safetensors header: its JSON (dtypes, shapes, offsets, metadata; ``nested``
    metadata strings as JSON), or its bytes."""
    marks, hot = safetensors_landmarks(path)

    def mutate(data: bytes, rng: random.Random) -> bytes:
        if rng.random() < 0.3:
            return mutate_bytes(data, rng, marks, hot)
        header, body = safetensors_header(data)
        return with_safetensors_header(mutate_json(header, rng, nested), body)  # type: ignore[arg-type]

    return mutate


def run_target(target: Target, cases: int, rng_seed: int, work: Path, time_limit: float = 10.0,
               budget_s: float | None = None, keep: Path | None = None,
               progress: Callable[[int], None] | None = None) -> Tally:
    """``cases`` damaged copies of ``target``'s seed through its reader (at most ``budget_s``
    seconds); each case damages one file of a copy of the seed folder, then restores it. With
    ``keep``, the damaged file of each failing case is kept there (``TARGET-CASE-FILE``)."""
    import shutil

    rng = random.Random(rng_seed)
    case_dir = work / target.name
    shutil.rmtree(case_dir, ignore_errors=True)
    shutil.copytree(target.folder, case_dir)
    originals = {f: (case_dir / f).read_bytes() for f, _ in target.mutators}
    tally = Tally()
    t0 = time.perf_counter()
    for i in range(cases):
        file, mutate = rng.choice(target.mutators)
        damaged = mutate(originals[file], rng)
        (case_dir / file).write_bytes(damaged)
        failures = len(tally.failures)
        tally.add(i, run_case(target.reader, case_dir / target.entry if target.entry else case_dir, time_limit))
        if keep is not None and len(tally.failures) > failures:
            keep.mkdir(parents=True, exist_ok=True)
            (keep / f"{target.name}-{i}-{file}").write_bytes(damaged)
        (case_dir / file).write_bytes(originals[file])
        if progress is not None:
            progress(i)
        if budget_s is not None and time.perf_counter() - t0 > budget_s:
            break
    tally.seconds = time.perf_counter() - t0
    return tally


# -- the seeds -----------------------------------------------------------------------------------
def _quantized(recipe: dict, family: str = "llama", tokenizer: object = None, **cfg: object) -> object:
    from conftest import build_tiny_model, make_char_tokenizer

    from lowbit.models import LoadedModel
    from lowbit.pipeline import quantize_model
    from lowbit.recipes import Recipe

    model = build_tiny_model(family, **cfg)
    quantize_model(model, Recipe.from_dict(recipe), progress=False)
    return LoadedModel(model, tokenizer if tokenizer is not None else make_char_tokenizer(), f"tiny-{family}", None)


def load_and_run(path: Path) -> object:
    """The whole of what a user's command does with a checkpoint: load it, decode every quantized
    weight, run the model on a few tokens."""
    import torch

    from lowbit.models import load_model
    from lowbit.modules import QuantLinear

    loaded = load_model(str(path), keep_quantized=True)
    for m in loaded.model.modules():
        if isinstance(m, QuantLinear):
            m.qweight.dequantize()
    with torch.inference_mode():
        loaded.model(torch.tensor([[1, 2, 3]]))
    return loaded


# codecs of every family in one lowbit folder (rows of 64: k-quants need 256, left to the GGUF seed)
NATIVE_RECIPE = {"codec": {"name": "int", "bits": 4, "group_size": 32}, "rules": [
    {"match": "*.self_attn.k_proj", "codec": {"name": "nf4", "double_quant": True}},
    {"match": "*.self_attn.v_proj", "codec": {"name": "fp8"}},
    {"match": "*.self_attn.o_proj", "codec": {"name": "nvfp4"}},
    {"match": "*.mlp.gate_proj", "codec": {"name": "mxfp4"}},
    {"match": "*.mlp.down_proj", "codec": {"name": "q4_1"}},
    {"match": "model.layers.1.mlp.up_proj", "codec": {"name": "int", "bits": 3, "group_size": 16,
                                                      "symmetric": False}},
]}


def build_targets(root: Path) -> dict[str, Target]:
    """Every reader of untrusted files, each with seeds written by lowbit's own writers of tiny
    models (a few hundred KB): GGUF models (structure only, packed, dequantized), GGUF and legacy
    imatrix files, safetensors files, lowbit / GPTQ / AWQ / compressed-tensors folders, recipes."""
    import json

    import numpy as np
    import torch
    from conftest import build_tiny_model, make_byte_level_tokenizer, write_tiny_gguf
    from safetensors.torch import save_file
    from test_imatrix import legacy_dat

    from lowbit.io.awq_format import save_awq
    from lowbit.io.compressed_tensors import save_compressed_tensors
    from lowbit.io.gguf_writer import save_gguf
    from lowbit.io.gptq_format import save_gptq
    from lowbit.io.hf_checkpoint import read_safetensors
    from lowbit.io.imatrix import ImportanceMatrix, linear_gguf_names, read_imatrix, write_imatrix
    from lowbit.io.lowbit_format import save_quantized
    from lowbit.io.gguf_reader import check_gguf
    from lowbit.recipes import Recipe, resolve_recipe

    targets: dict[str, Target] = {}
    gguf_dir = root / "gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    q = _quantized({"codec": {"name": "q4_k"}, "rules": [
        {"match": "*.mlp.down_proj", "codec": {"name": "q8_0"}}, {"match": "*.self_attn.v_proj", "codec": {"name": "q6_k"}}]},
        tokenizer=make_byte_level_tokenizer(), vocab_size=260, hidden_size=256, intermediate_size=256,
        num_hidden_layers=1)
    save_gguf(q, gguf_dir / "q.gguf")  # type: ignore[arg-type]
    write_tiny_gguf(gguf_dir / "f32.gguf")
    for name, entry in (("q", "q.gguf"), ("f32", "f32.gguf")):
        mut = [(entry, bytes_mutator(gguf_dir / entry, gguf_landmarks))]
        targets[f"gguf-{name}-structure"] = Target(f"gguf-{name}-structure", gguf_dir, entry, check_gguf, mut,
                                                   "check_gguf: header, fields, tensor table")
    from lowbit.models import load_model

    targets["gguf-packed"] = Target("gguf-packed", gguf_dir, "q.gguf", load_and_run,
                                    [("q.gguf", bytes_mutator(gguf_dir / "q.gguf", gguf_landmarks))],
                                    "load_model(keep_quantized), decode, forward (Q4_K/Q6_K/Q8_0/F16)")
    targets["gguf-dequantized"] = Target("gguf-dequantized", gguf_dir, "f32.gguf", lambda p: load_model(str(p)),
                                         [("f32.gguf", bytes_mutator(gguf_dir / "f32.gguf", gguf_landmarks))],
                                         "load_model: transformers' GGUF loader")

    im_dir = root / "imatrix"
    im_dir.mkdir(exist_ok=True)
    model = build_tiny_model("llama")
    names = linear_gguf_names(model)
    rng = np.random.default_rng(0)
    values = {hf: torch.from_numpy(rng.random(width).astype(np.float32) + 0.1) for hf, (_, width) in names.items()}
    write_imatrix(im_dir / "imatrix.gguf", ImportanceMatrix(values, {k: 8 for k in values}, ["pydoc-calib"], 8, 32),
                  model)
    (im_dir / "imatrix.dat").write_bytes(legacy_dat(
        {g: (3, (values[hf].numpy() * 3).astype(np.float32)) for hf, (g, _) in names.items()}, (8, "pydoc-calib")))
    read = lambda p: read_imatrix(p, model)  # noqa: E731
    targets["imatrix-gguf"] = Target("imatrix-gguf", im_dir, "imatrix.gguf", read,
                                     [("imatrix.gguf", bytes_mutator(im_dir / "imatrix.gguf", gguf_landmarks))],
                                     "read_imatrix (GGUF)")
    targets["imatrix-dat"] = Target("imatrix-dat", im_dir, "imatrix.dat", read,
                                    [("imatrix.dat", bytes_mutator(im_dir / "imatrix.dat", _dat_landmarks))],
                                    "read_imatrix (legacy .dat)")

    st_dir = root / "safetensors"
    st_dir.mkdir(exist_ok=True)
    save_file({"a": torch.randn(4, 8), "b": torch.arange(6, dtype=torch.int32), "c": torch.ones(3, dtype=torch.uint8),
               "d": torch.randn(2, 2).to(torch.bfloat16)}, str(st_dir / "t.safetensors"), metadata={"format": "pt"})
    st = st_dir / "t.safetensors"
    targets["safetensors"] = Target("safetensors", st_dir, "t.safetensors", read_safetensors,
                                    [("t.safetensors", safetensors_mutator(st))], "read_safetensors")

    writers = {"lowbit": (save_quantized, NATIVE_RECIPE),
               "gptq": (save_gptq, {"codec": {"name": "int", "bits": 4, "group_size": 32, "symmetric": False}}),
               "awq": (save_awq, {"codec": {"name": "int", "bits": 4, "group_size": 32, "symmetric": False,
                                            }}),
               "compressed-tensors": (save_compressed_tensors, {"codec": {"name": "int", "bits": 4, "group_size": 32},
                                                                "rules": [{"match": "*.mlp.*", "codec": {"name": "fp8"}}]})}
    for layout, (save, recipe) in writers.items():
        folder = root / layout
        save(_quantized(recipe, "qwen2" if layout != "lowbit" else "llama"), folder)  # qwen2: biases too
        weights = folder / "model.safetensors"
        muts = [("model.safetensors", safetensors_mutator(weights, ("lowbit.quantized",))), ("config.json", json_mutator())]
        muts += [(f.name, json_mutator()) for f in sorted(folder.glob("*.json"))
                 if f.name in ("lowbit.json", "recipe.json", "quantize_config.json")]
        targets[f"folder-{layout}"] = Target(f"folder-{layout}", folder, "", load_and_run, muts,
                                             f"load_model, decode, forward; damaged: {', '.join(f for f, _ in muts)}")

    r_dir = root / "recipes"
    r_dir.mkdir(exist_ok=True)
    import yaml

    data = Recipe.from_dict({**NATIVE_RECIPE, "calibration": {"samples": 8}, "algorithm": {"name": "gptq"}}).to_dict()
    (r_dir / "r.json").write_text(json.dumps(data, indent=1))
    (r_dir / "r.yaml").write_text(yaml.safe_dump(resolve_recipe("gguf-q4_k_m").to_dict()))
    targets["recipe-json"] = Target("recipe-json", r_dir, "r.json", Recipe.from_file, [("r.json", json_mutator())],
                                    "Recipe.from_file (JSON)")
    targets["recipe-yaml"] = Target("recipe-yaml", r_dir, "r.yaml", Recipe.from_file,
                                    [("r.yaml", bytes_mutator(r_dir / "r.yaml"))], "Recipe.from_file (YAML)")
    return targets


def _dat_landmarks(path: Path) -> tuple[list[int], int]:
    """Offsets of the entry count, and of each entry's name length, call count and value count."""
    data = path.read_bytes()
    (n,) = struct.unpack_from("<i", data, 0)
    marks, pos = [0], 4
    for _ in range(n):
        (k,) = struct.unpack_from("<i", data, pos)
        marks += [pos, pos + 4 + k, pos + 8 + k]
        (nval,) = struct.unpack_from("<i", data, pos + 8 + k)
        pos += 12 + k + 4 * nval
    return marks + [pos, pos + 4], len(data)
