"""What the GPTQ and AWQ checkpoint folders share (:mod:`lowbit.io.gptq_format`,
:mod:`lowbit.io.awq_format`).

Both store an integer-codec linear as plain integer tables, which :class:`IntTables` holds:
codes ``(out, in)``, one fp16 scale and one integer zero point per group and output feature
``(G, out)``, and the group of every input column ``g_idx`` ``(in,)``; decoding is
``W[o, c] = scales[g_idx[c], o] * (codes[o, c] - zeros[g_idx[c], o])`` exactly as lowbit's
:class:`~lowbit.codecs.IntCodec` decodes (a symmetric codec's implied zero is ``2**(bits-1)``;
a per-tensor scale is repeated per output feature, one group of every column).

Writing: the checks every export makes before anything is written, then one folder
(:func:`lowbit.io.hf_checkpoint.write_folder`). Reading: every ``NAME.qweight`` owner read as a
quantized linear, the rest of the folder as :mod:`lowbit.io.hf_checkpoint` reads any folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from torch import nn

from lowbit.codecs import IntCodec, QuantizedTensor, codec_from_dict, unpack_codes
from lowbit.codecs.base import group_order
from lowbit.errors import LowbitError, validation_message
from lowbit.io.hf_checkpoint import RECIPE, assemble, empty_model, read_tensors
from lowbit.modules import QuantEmbedding, QuantLinear
from lowbit.modules.experts import UnfusedExperts

if TYPE_CHECKING:
    from lowbit.models.loaded import LoadedModel


# -- the quantization config -------------------------------------------------------------------
def _group_size(v: int | None) -> int | None:
    if v is not None and v != -1 and v < 1:
        raise ValueError(f"{v} is neither a positive group size nor -1 (one group per row)")
    return v


class Override(BaseModel):
    """One GPTQModel ``dynamic`` entry: the settings it changes for the linears it matches."""

    model_config = ConfigDict(extra="allow")
    bits: int | None = None
    group_size: int | None = None
    sym: bool | None = None

    check_group_size = field_validator("group_size")(_group_size)


class QuantConfig(BaseModel):
    """The fields of a GPTQ or AWQ quantization config that lowbit reads, with their types
    (other fields are kept, unread)."""

    model_config = ConfigDict(extra="allow")
    quant_method: str | None = None
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool | None = None
    dynamic: dict[str, Override] | None = None
    checkpoint_format: str | None = None
    format: str | None = None
    version: str | None = None
    is_marlin_format: bool | None = None
    pack_dtype: str | None = None
    meta: dict[str, Any] | None = None

    check_group_size = field_validator("group_size")(_group_size)


def typed_config(path: Path, config: dict[str, Any]) -> QuantConfig:
    """``config`` checked against :class:`QuantConfig`; LowbitError naming the field."""
    try:
        return QuantConfig.model_validate(config)
    except ValidationError as e:
        raise LowbitError(f"{path}: quantization config: {validation_message(e)}") from None


# -- integer tables ----------------------------------------------------------------------------
@dataclass
class IntTables:
    """An integer-codec weight as the GPTQ/AWQ layouts see it (module docstring).

    ``codes`` int64 ``(out, in)``; ``scales`` fp16 ``(G, out)``; ``zeros`` int64 ``(G, out)``,
    the zero point itself (no format offset); ``g_idx`` int64 ``(in,)``; ``group_size`` -1 for
    one group per output feature."""

    bits: int
    group_size: int
    symmetric: bool
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor

    @property
    def act_order(self) -> bool:
        """Whether columns are grouped otherwise than ``col // group_size`` (GPTQ act-order)."""
        return not torch.equal(self.g_idx, natural_g_idx(self.codes.shape[1], self.group_size))


def natural_g_idx(cols: int, group_size: int) -> torch.Tensor:
    """The group of each column without act-order: ``col // group_size`` (all 0 for -1)."""
    if group_size == -1:
        return torch.zeros(cols, dtype=torch.int64)
    return torch.arange(cols, dtype=torch.int64) // group_size


def has_act_order(qt: QuantizedTensor) -> bool:
    """Whether a tensor's ``g_idx`` part groups its columns otherwise than ``col // group_size``."""
    g_idx = qt.data.get("g_idx")
    group_size = qt.codec.get("group_size") if qt.codec.get("granularity") == "group" else None
    if g_idx is None or group_size is None:
        return False
    return not torch.equal(g_idx.to(torch.int64), natural_g_idx(qt.shape[1], int(group_size)))


def int_codec_reason(codec: dict[str, Any]) -> str | None:
    """Why an integer-table layout cannot hold ``codec`` at all, or None (shape and bit width
    are each layout's own checks)."""
    if codec.get("name") != "int":
        return f"{describe(codec)} is not an integer codec"
    if not codec.get("symmetric", True) and codec.get("zero_point") == "float":
        return f"{describe(codec)} has a float zero offset (x = scale * q + offset), not an integer zero point"
    if codec.get("scale_dtype", "float16") != "float16":
        return (f"{describe(codec)}: the layout stores fp16 scales, these are {codec['scale_dtype']} "
                "(compressed-tensors or lowbit's own format holds them)")
    return None


def describe(codec: dict[str, Any]) -> str:
    try:
        return codec_from_dict(codec).describe()
    except ValueError:
        return str(codec.get("name"))


def int_tables(qt: QuantizedTensor) -> IntTables:
    """The integer tables of an :class:`~lowbit.codecs.IntCodec` tensor (integer zero point)."""
    codec = qt.get_codec()
    if not isinstance(codec, IntCodec) or (not codec.symmetric and codec.zero_point == "float"):
        raise ValueError(f"{describe(qt.codec)} has no integer tables")
    rows, cols = qt.shape
    codes = unpack_codes(qt.data["codes"], codec.bits, rows * cols).view(rows, cols).to(torch.int64)
    groups = qt.data["scale"].shape[1]
    scales = qt.data["scale"].to(torch.float16).expand(rows, groups).t().contiguous()
    if codec.symmetric:
        zeros = torch.full((groups, rows), 1 << (codec.bits - 1), dtype=torch.int64)
    else:
        z = qt.data["zero"].to(torch.float32).expand(rows, groups).t()
        if not torch.equal(z, z.round()):
            raise ValueError("integer zero points that are not integers")
        zeros = z.to(torch.int64).contiguous()
    group_size = codec.group_size if codec.granularity == "group" else -1
    assert group_size is not None
    g_idx = qt.data.get("g_idx")
    g_idx = natural_g_idx(cols, group_size) if g_idx is None else g_idx.to(torch.int64)
    return IntTables(codec.bits, group_size, codec.symmetric, codes, scales, zeros, g_idx)


def tables_to_quantized(t: IntTables) -> QuantizedTensor:
    """The lowbit tensor of integer tables: an :class:`~lowbit.codecs.IntCodec` per group (or
    channel for ``group_size`` -1), symmetric when ``t.symmetric`` (then every zero must be
    ``2**(bits-1)``), with a ``g_idx`` part when the columns are act-ordered. ValueError when
    the tables do not fit together or lowbit's grouping cannot follow their ``g_idx``."""
    rows, cols = t.codes.shape
    groups = 1 if t.group_size == -1 else -(-cols // t.group_size)
    if t.scales.shape != (groups, rows) or t.zeros.shape != (groups, rows) or t.g_idx.shape != (cols,):
        raise ValueError(f"scales {tuple(t.scales.shape)}, zeros {tuple(t.zeros.shape)} and g_idx "
                         f"{tuple(t.g_idx.shape)} do not fit {groups} groups of a ({rows}, {cols}) weight")
    if t.g_idx.numel() and (int(t.g_idx.min()) < 0 or int(t.g_idx.max()) >= groups):
        raise ValueError(f"g_idx names groups outside 0..{groups - 1}")
    granularity = "channel" if t.group_size == -1 else "group"
    codec = IntCodec(bits=t.bits, symmetric=t.symmetric, granularity=granularity,
                     group_size=None if t.group_size == -1 else t.group_size, zero_point="integer")
    scale = {"scale": t.scales.t().contiguous()}
    if t.symmetric:
        if not bool((t.zeros == 1 << (t.bits - 1)).all()):
            raise ValueError("a symmetric codec with zero points other than 2**(bits-1)")
    else:
        scale["zero"] = t.zeros.t().to(torch.float16).contiguous()
    qt = codec.pack(t.codes.to(torch.uint8), scale, (rows, cols))
    if t.act_order:
        g_idx = t.g_idx.to(torch.int32)
        group_order(g_idx, codec.grouping, (rows, cols))  # ValueError unless lowbit's groups can follow it
        qt.data["g_idx"] = g_idx
    return qt


def packed_parts(tensors: dict[str, torch.Tensor], name: str, shapes: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """``NAME.{part}`` for each part of ``shapes``, checked: present, of that shape, packed parts
    (``q*``) int32 and ``scales`` exactly fp16 (lowbit's scale dtype); ValueError if not."""
    missing = [f"{name}.{p}" for p in shapes if f"{name}.{p}" not in tensors]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    parts = {p: tensors[f"{name}.{p}"] for p in shapes}
    for part, wanted in shapes.items():
        t = parts[part]
        if tuple(t.shape) != wanted:
            raise ValueError(f"{name}.{part} has shape {tuple(t.shape)}, expected {wanted}")
        if part.startswith("q") and t.dtype != torch.int32:
            raise ValueError(f"{name}.{part} of dtype {t.dtype} (lowbit reads int32 packing)")
    scales = parts.get("scales")
    if scales is not None:
        half = scales.to(torch.float16)
        if not scales.dtype.is_floating_point or not torch.equal(half.to(scales.dtype), scales):
            raise ValueError(f"{name}.scales of dtype {scales.dtype}, which fp16 cannot hold exactly")
        parts["scales"] = half
    return parts


# -- writing -------------------------------------------------------------------------------------
def exportable_linears(
    loaded: "LoadedModel", layout: str, reason: Callable[[dict[str, Any], tuple[int, int], bool], str | None]
) -> list[tuple[str, QuantizedTensor]]:
    """The quantized linears of ``loaded`` by name, or a LowbitError saying why ``layout``
    cannot hold the model (``reason(codec, shape, act_order)`` judges each tensor)."""
    model = loaded.model
    if any(isinstance(m, QuantEmbedding) for m in model.modules()):
        raise LowbitError(f"this recipe quantizes the token embedding (a GGUF type mix), which the {layout} "
                          "layout cannot hold: write a GGUF file (--out FILE.gguf) or lowbit's own folder")
    if any(isinstance(m, UnfusedExperts) for m in model.modules()):
        raise LowbitError(f"lowbit does not write mixture-of-experts models in the {layout} layout yet "
                          "(its per-expert names): write lowbit's own folder")
    linears = [(n, m.qweight) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not linears:
        raise LowbitError(f"the model has no quantized linears to write in the {layout} layout")
    refused: dict[str, list[str]] = {}
    for name, qt in linears:
        why = reason(qt.codec, qt.shape, has_act_order(qt))
        if why is not None:
            refused.setdefault(why, []).append(name)
    if refused:
        why, names = next(iter(refused.items()))
        more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
        raise LowbitError(f"the {layout} layout cannot hold {names[0]}{more}: {why}")
    return linears


def naming_alternatives(
    layout: str, reason: str | None, codec: dict[str, Any], shape: tuple[int, int] | None, act_order: bool
) -> str | None:
    """``reason`` (why ``layout`` cannot hold such a tensor, or None) followed by the layouts
    that can: the other integer-table layouts that accept it, and lowbit's own folder."""
    if reason is None:
        return None
    from lowbit.io import awq_format, gptq_format

    checks = {"GPTQ": gptq_format.layout_reason, "AWQ": awq_format.layout_reason}
    can = [name for name, check in checks.items() if name != layout and check(codec, shape, act_order) is None]
    return f"{reason}; write it as " + ", ".join([*can, "lowbit's own folder"])


def dense_linear_names(model: nn.Module) -> list[str]:
    """Linears (``nn.Linear`` / transformers ``Conv1D``) left unquantized, LM head aside: what a
    consumer must be told not to convert."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules()
            if (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D") and m is not head]


def output_head_quantized(model: nn.Module) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return isinstance(head, QuantLinear)


def lowbit_meta(loaded: "LoadedModel", source: str | None) -> dict[str, Any]:
    """The ``meta`` entry of a quantization config: who wrote it, from what."""
    import lowbit

    return {"quantizer": [f"lowbit:{lowbit.__version__}"], "lowbit_source": source or loaded.source}


# -- reading -------------------------------------------------------------------------------------
def linear_shape(model: nn.Module, name: str, path: Path) -> tuple[int, int]:
    """``(out, in)`` of the linear ``name`` of the (meta) model."""
    from lowbit.modules import linear_weight

    try:
        weight, _ = linear_weight(model.get_submodule(name))
    except (AttributeError, LowbitError):
        raise LowbitError(f"{path}: quantized tensors for {name}, which is not a linear of the model") from None
    return int(weight.shape[0]), int(weight.shape[1])


def load_folder(
    path: Path, dtype: torch.dtype, layout: str, config: dict[str, Any], parts: tuple[str, ...],
    read_linear: Callable[[dict[str, torch.Tensor], str, tuple[int, int]], QuantizedTensor],
) -> "LoadedModel":
    """The model of a checkpoint folder whose quantized linears are the ``NAME.qweight`` owners,
    each read by ``read_linear(tensors, NAME, (out, in))`` (a ValueError says what is wrong) and
    stored as ``NAME.{parts}``; the rest as :func:`assemble` does, then lowbit's recipe if the
    folder has one."""
    from lowbit.models.loaded import LoadedModel

    tensors = read_tensors(path)
    model, tokenizer = empty_model(path, dtype, tensors)
    quantized: dict[str, QuantizedTensor] = {}
    consumed: set[str] = set()
    for name in sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")):
        shape = linear_shape(model, name, path)
        try:
            quantized[name] = read_linear(tensors, name, shape)
        except ValueError as e:
            raise LowbitError(f"{path}: bad quantized linear {name}: {e}") from None
        consumed.update(f"{name}.{p}" for p in parts)
    if not quantized:
        raise LowbitError(f"{path}: a {layout} quantization config but no quantized linears (no *.qweight tensors)")
    assemble(model, path, quantized, tensors, consumed, dtype)
    if (path / RECIPE).is_file():
        from lowbit.recipes import Recipe

        model.lowbit_recipe = Recipe.from_file(path / RECIPE)
    source = (typed_config(path, config).meta or {}).get("lowbit_source") or str(path)
    return LoadedModel(model, tokenizer, str(source), path)
