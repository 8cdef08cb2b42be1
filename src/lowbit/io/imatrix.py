"""Importance matrices ("imatrix"): each linear's mean squared input per column, as llama.cpp's
``llama-imatrix`` collects them and its quantizers use them to weight the rounding error.

Both of llama.cpp's file layouts are read (from ``tools/imatrix/imatrix.cpp`` and
``common/imatrix-loader.cpp``); the GGUF one is written:

* GGUF (current): ``general.type = "imatrix"``, string array ``imatrix.datasets``, u32
  ``imatrix.chunk_count`` (chunks seen) and ``imatrix.chunk_size`` (tokens per chunk); for each
  weight ``NAME`` (``blk.0.attn_q.weight``) two F32 tensors: ``NAME.in_sum2``, ggml shape
  ``(in, n_mat)``: the sum over tokens of ``x^2`` per input column, and ``NAME.counts``,
  ``(1, n_mat)``: the tokens summed. ``n_mat > 1`` only for 3-D weights (merged MoE experts).
  llama-quantize refuses a GGUF imatrix without the three ``imatrix.*`` keys.
* legacy ``.dat``, little-endian::

      int32 n_entries
      n_entries x { int32 len; char name[len]; int32 ncall; int32 nval; float32 values[nval] }
      optional:     int32 chunk_count; int32 len; char dataset[len]

  ``values`` hold ``mean x^2 * ncall`` (``ncall``: the chunks the entry saw), so the mean is
  ``values / ncall``, as llama-quantize reads it; token counts are not stored.

The files name tensors the GGUF way; :func:`read_imatrix` and :func:`write_imatrix` map those
names to a model's HF module names (``model.layers.0.self_attn.q_proj``) with gguf-py's tensor
name map, the one the GGUF writer uses. Only row order is permuted by the GGUF writer (q/k), never
input columns, so the values need no reordering.
"""

from __future__ import annotations

import hashlib
import re
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.errors import LowbitError

GGUF_MAGIC = b"GGUF"
_SUM, _COUNT = ".in_sum2", ".counts"
_BLOCK = re.compile(r"blk\.(\d+)\.")


@dataclass
class ImportanceMatrix:
    """Mean ``x^2`` per input column of each linear.

    ``values``: name -> ``(in,)`` float32; ``counts``: name -> tokens each mean is over (absent
    when unknown, as in legacy files); ``datasets``: what it was collected on; ``chunk_count``,
    ``chunk_size``: calibration sequences and tokens per sequence (0 when unknown). Names are HF
    module names once mapped to a model (:func:`read_imatrix`), else the file's GGUF tensor names.
    """

    values: dict[str, torch.Tensor]
    counts: dict[str, int] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def digest(self) -> str:
        """SHA-256 of the names and values (part of a resume fingerprint)."""
        h = hashlib.sha256()
        for name in sorted(self.values):
            h.update(name.encode() + b"\0")
            h.update(self.values[name].detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
        return h.hexdigest()


def read_imatrix(path: Path | str, model: nn.Module) -> ImportanceMatrix:
    """llama.cpp's imatrix file ``path`` (GGUF or legacy ``.dat``) keyed by ``model``'s HF module
    names. LowbitError when the file is corrupt or made for a different model (an entry whose
    width differs from the linear's inputs, or a block the model lacks); entries for tensors the
    block quantizers never see (``output.weight``, an MoE router) are dropped."""
    from lowbit.models import architecture_of

    raw = read_imatrix_file(path)
    by_gguf = {g: (hf, width) for hf, (g, width) in linear_gguf_names(model).items()}
    n_blocks = len(architecture_of(model).block_list(model))
    values: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for name, v in raw.values.items():
        hit = by_gguf.get(name)
        if hit is None:
            m = _BLOCK.match(name)
            if m is not None and int(m.group(1)) >= n_blocks:
                raise LowbitError(f"{path}: entry {name} is for block {m.group(1)}, but the model has "
                                  f"{n_blocks} blocks: an importance matrix of a different model?")
            continue
        hf, width = hit
        if v.shape[0] != width:
            raise LowbitError(f"{path}: entry {name} has {v.shape[0]} columns, but {hf} has {width} inputs: "
                              "an importance matrix of a different model?")
        values[hf] = v
        if name in raw.counts:
            counts[hf] = raw.counts[name]
    if not values:
        raise LowbitError(f"{path}: no entry matches a linear of this model: "
                          "an importance matrix of a different model?")
    return ImportanceMatrix(values, counts, raw.datasets, raw.chunk_count, raw.chunk_size)


def read_imatrix_file(path: Path | str) -> ImportanceMatrix:
    """The entries of an imatrix file under its own (GGUF tensor) names; either layout."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise LowbitError(f"cannot read importance matrix {path}: {e.strerror or e}") from None
    return _read_gguf(path) if magic == GGUF_MAGIC else _read_legacy(path)


def write_imatrix(path: Path | str, imatrix: ImportanceMatrix, model: nn.Module, overwrite: bool = False) -> Path:
    """Write ``imatrix`` (keyed by ``model``'s HF module names) as a GGUF imatrix that llama.cpp's
    tools read (``llama-quantize --imatrix``); written to ``PATH.tmp`` and renamed. Entries
    without a count are written with count 1 (the sums are then the means); linears without a
    GGUF name (MoE experts) are left out, with a warning."""
    import gguf

    from lowbit.io.gguf_writer import gguf_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise LowbitError(f"{path} exists (pass --overwrite to replace it)")
    names = linear_gguf_names(model)
    unnamed = [hf for hf in imatrix.values if hf not in names]
    if unnamed:
        warnings.warn(f"{len(unnamed)} linears have no GGUF name and are left out of {path} (e.g. {unnamed[0]})",
                      stacklevel=2)
    tensors: list[tuple[str, np.ndarray, np.ndarray]] = []
    for hf in sorted((n for n in imatrix.values if n in names), key=lambda n: names[n][0]):
        v = imatrix.values[hf].detach().to(torch.float32).cpu().reshape(-1)
        count = imatrix.counts.get(hf, 1)
        total = (v.to(torch.float64) * count).to(torch.float32).numpy()
        tensors.append((names[hf][0], total.reshape(1, -1), np.array([[count]], dtype=np.float32)))
    with gguf_file(path, _gguf_arch_name(model), overwrite) as w:
        w.add_type(gguf.GGUFType.IMATRIX)
        # gguf-py cannot write an empty array, and llama-quantize needs the key
        w.add_array(gguf.Keys.IMatrix.DATASETS, imatrix.datasets or ["unknown"])
        w.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, imatrix.chunk_count)
        w.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, imatrix.chunk_size)
        for name, total, count in tensors:
            w.add_tensor(name + _SUM, total)
            w.add_tensor(name + _COUNT, count)
    return path


def linear_gguf_names(model: nn.Module) -> dict[str, tuple[str, int]]:
    """HF module name -> (GGUF tensor name, input width) of every linear of the decoder blocks
    (dense or quantized) that has a GGUF name (MoE experts have none yet: llama.cpp merges them
    into one tensor)."""
    from lowbit.io.gguf_writer import tensor_name_map
    from lowbit.models import architecture_of
    from lowbit.modules import QuantLinear, linear_weight

    arch = architecture_of(model)
    names = tensor_name_map(model, _gguf_arch_name(model))
    out: dict[str, tuple[str, int]] = {}
    for full, block, n in arch.dense_block_linears(model):
        gguf_name = names.get_name(f"{full}.weight", try_suffixes=(".weight",))
        try:
            module = block.get_submodule(n)
        except AttributeError:
            continue
        if gguf_name is not None:
            width = module.in_features if isinstance(module, QuantLinear) else linear_weight(module)[0].shape[1]
            out[full] = (gguf_name, int(width))
    return out


def _gguf_arch_name(model: nn.Module) -> str:
    """llama.cpp's architecture name of a transformers model: the GGUF writer's when it knows
    the model type, else gguf-py's name of the same spelling (qwen2, phi3, gemma, gpt2, ...)."""
    import gguf

    from lowbit.io.gguf_architectures import GGUF_ARCHITECTURES

    model_type = getattr(getattr(model, "config", None), "model_type", None) or ""
    if model_type in GGUF_ARCHITECTURES:
        return GGUF_ARCHITECTURES[model_type].name
    if model_type.upper() in gguf.MODEL_ARCH.__members__:
        return model_type
    raise LowbitError(f"llama.cpp has no architecture {model_type!r}: no GGUF tensor names for its importance matrix")


def _read_gguf(path: Path) -> ImportanceMatrix:
    from gguf import GGUFReader

    from lowbit.io.gguf_layout import ARRAY, INTEGER_TYPES, STRING, read_gguf_layout, shown

    layout = read_gguf_layout(path)  # every bound checked: what gguf-py reads next is whole
    kind = layout.field("general.type")
    infos = {t.name: t for t in layout.tensors}
    sums = [n[: -len(_SUM)] for n in infos if n.endswith(_SUM)]
    if (kind is not None and kind.value != "imatrix") or not sums:
        raise LowbitError(f"{path} is a GGUF file but not an importance matrix "
                          f"(general.type {kind.value if kind is not None else None!r}, {len(sums)} {_SUM} tensors)")
    for key in ("imatrix.chunk_count", "imatrix.chunk_size"):
        f = layout.field(key)
        if f is not None and (f.type_id not in INTEGER_TYPES or int(f.value) < 0):  # type: ignore[call-overload]
            raise LowbitError(f"{path}: field {key} at byte {f.at} is {f.value!r}, not a count")
    ds = layout.field("imatrix.datasets")
    if ds is not None and (ds.type_id != ARRAY or ds.elem_type != STRING):
        raise LowbitError(f"{path}: field imatrix.datasets at byte {ds.at} is not an array of strings")
    for name in sums:
        total, count = infos[name + _SUM], infos.get(name + _COUNT)
        if count is None:
            raise LowbitError(f"{path}: entry {shown(name)} has {_SUM} but no {_COUNT}")
        if total.type_name != "F32" or count.type_name != "F32":
            raise LowbitError(f"{path}: entry {shown(name)} is not F32")
        n_mat = total.dims[1] if len(total.dims) > 1 else 1
        if len(total.dims) > 2 or count.dims[0] != 1 or (count.dims[1] if len(count.dims) > 1 else 1) != n_mat:
            raise LowbitError(f"{path}: entry {shown(name)} has sums of shape {list(total.dims)} and counts of shape "
                              f"{list(count.dims)} (ggml order); they should be (columns, matrices) and (1, matrices)")
    try:
        r = GGUFReader(str(path))
        fields = {k: f.contents() for k, f in r.fields.items() if k.startswith("imatrix.")}
        # only the imatrix's own tensors are copied: a model file given by mistake may be large
        tensors = {t.name: (t.tensor_type, np.array(t.data, copy=True)) for t in r.tensors
                   if t.name.endswith((_SUM, _COUNT))}
    except Exception as e:  # the walk above found nothing wrong: what gguf-py refuses is said as it says it
        raise LowbitError(f"{path}: corrupt GGUF file ({type(e).__name__}: {e})") from None
    sums = {k[: -len(_SUM)]: v for k, v in tensors.items() if k.endswith(_SUM)}
    values: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    merged = []
    for name, (_, total) in sorted(sums.items()):
        total, n = total.astype(np.float64).reshape(-1, total.shape[-1]), tensors[name + _COUNT][1].reshape(-1)
        if total.shape[0] > 1:
            merged.append(name)
            continue
        if not np.isfinite(n[0]) or not 0 <= n[0] < 2**53:
            raise LowbitError(f"{path}: entry {shown(name)} has a token count of {n[0]}")
        tokens = int(round(float(n[0])))
        # llama-quantize's convention: an entry that saw no token weighs every column 1
        mean = total[0] / tokens if tokens > 0 else np.ones_like(total[0])
        values[name] = _checked(path, name, mean)
        counts[name] = tokens
    if merged:
        warnings.warn(f"{path}: {len(merged)} entries of merged MoE experts skipped (e.g. {merged[0]}): "
                      "lowbit cannot use them yet", stacklevel=3)
    datasets = fields.get("imatrix.datasets") or []
    return ImportanceMatrix(values, counts, [str(d) for d in datasets],
                            int(fields.get("imatrix.chunk_count") or 0), int(fields.get("imatrix.chunk_size") or 0))


def _read_legacy(path: Path) -> ImportanceMatrix:
    from lowbit.io.gguf_layout import shown

    data = path.read_bytes()
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(data):
            raise LowbitError(f"{path}: truncated or corrupt importance matrix (.dat): {what} at byte {pos} "
                              f"needs {n} bytes, {len(data) - pos} left")
        pos += n
        return data[pos - n: pos]

    def int32(what: str) -> int:
        return struct.unpack("<i", take(4, what))[0]

    n_entries = int32("entry count")
    if n_entries < 1 or n_entries * 16 > len(data):
        raise LowbitError(f"{path} is neither a GGUF nor a legacy (.dat) importance matrix "
                          f"(it would hold {n_entries} entries in {len(data)} bytes)")
    values: dict[str, torch.Tensor] = {}
    for i in range(n_entries):
        raw_name = take(int32(f"entry {i} name length"), f"entry {i} name")
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise LowbitError(f"{path}: truncated or corrupt importance matrix (.dat): "
                              f"entry {i} name is not text") from None
        label = f"entry {i} ({shown(name)})"
        ncall = int32(f"{label} call count")
        nval = int32(f"{label} value count")
        if nval < 1:
            raise LowbitError(f"{path}: truncated or corrupt importance matrix (.dat): {label} has {nval} values")
        v = np.frombuffer(take(4 * nval, f"{label} values"), dtype="<f4").astype(np.float64)
        values[name] = _checked(path, name, v / ncall if ncall > 0 else v)
    chunk_count, datasets = 0, []
    if pos < len(data):  # the trailer is optional
        chunk_count = int32("chunk count")
        n = int32("dataset name length")
        if n > 0:
            datasets.append(take(n, "dataset name").decode("utf-8", errors="replace"))
    if pos != len(data):
        raise LowbitError(f"{path}: corrupt importance matrix (.dat): {len(data) - pos} unexpected bytes at the end")
    return ImportanceMatrix(values, {}, datasets, chunk_count, 0)


def _checked(path: Path, name: str, mean: np.ndarray) -> torch.Tensor:
    from lowbit.io.gguf_layout import shown

    if not np.isfinite(mean).all() or (mean < 0).any():
        raise LowbitError(f"{path}: entry {shown(name)} holds NaN, Inf or negative values")
    return torch.from_numpy(mean.astype(np.float32))
