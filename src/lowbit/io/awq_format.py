"""AutoAWQ's GEMM checkpoint layout, as transformers (through GPTQModel), vLLM and AutoAWQ read it.

A Hugging Face folder whose ``model.safetensors`` holds, for each quantized linear ``NAME``
with ``in`` inputs, ``out`` outputs and ``G = in / group_size`` groups (4-bit codes only):

==================  =========  ===================  =============================================
tensor              dtype      shape                content
==================  =========  ===================  =============================================
``NAME.qweight``    int32      ``(in, out / 8)``    codes, eight outputs a word, interleaved
``NAME.qzeros``     int32      ``(G, out / 8)``     zero points, packed the same way
``NAME.scales``     float16    ``(G, out)``         one scale per group and output
``NAME.bias``       (dense)    ``(out,)``           if the linear has one
==================  =========  ===================  =============================================

``W[o, c] = scales[c // group_size, o] * (q[c, o] - z[c // group_size, o])``: no zero-point
offset (unlike GPTQ v1) and no ``g_idx``. Each word holds outputs ``8k .. 8k+7`` in the order
``0 2 4 6 1 3 5 7`` (:data:`~lowbit.io.int32_packing.AWQ_ORDER`). ``group_size`` -1 is one
group per output feature.

What it cannot hold, refused before anything is written: act-order column groups (no
``g_idx``), groups that do not divide the input width (no ragged last group), output widths not
a multiple of 8, and different group sizes in one model (one ``group_size`` in the config). A
symmetric lowbit codec is written with every zero point ``2**(bits-1)`` (``zero_point: true``),
which is what it means; reading takes a table of such zero points back as symmetric.

``config.json``'s ``quantization_config`` is ``{"quant_method": "awq", "version": "gemm",
"bits": 4, "group_size": G, "zero_point": true, "modules_to_not_convert": [dense linears]}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lowbit.codecs import QuantizedTensor
from lowbit.errors import LowbitError
from lowbit.io.hf_checkpoint import hf_quantization_config, holds_checkpoint, read_json, write_folder
from lowbit.io.int32_packing import AWQ_ORDER, pack_int32, unpack_int32
from lowbit.io.int_checkpoint import (
    typed_config,
    IntTables,
    dense_linear_names,
    exportable_linears,
    int_codec_reason,
    int_tables,
    load_folder,
    lowbit_meta,
    naming_alternatives,
    packed_parts,
    natural_g_idx,
    tables_to_quantized,
)

if TYPE_CHECKING:
    from lowbit.models.loaded import LoadedModel

BITS = 4
PACK = 32 // BITS  # outputs per int32 word
LEGACY_CONFIG = "quant_config.json"  # older AutoAWQ: {"w_bit", "q_group_size", "zero_point", "version"}
_PARTS = ("qweight", "qzeros", "scales")


def layout_reason(codec: dict[str, Any], shape: tuple[int, int] | None = None, act_order: bool = False) -> str | None:
    """Why the AWQ GEMM layout cannot hold a tensor of ``codec`` (``QuantizedTensor.codec``),
    ``shape`` ``(out, in)`` (not checked when None) and act-ordered columns, or None."""
    reason = int_codec_reason(codec)
    if reason is not None:
        return reason
    if int(codec["bits"]) != BITS:
        return f"AWQ stores 4-bit codes, not {codec['bits']}-bit ones"
    if act_order:
        return "its columns are grouped in act-order, and AWQ has no g_idx to say so"
    if shape is not None:
        out, cols = shape
        group_size = codec.get("group_size") if codec.get("granularity") == "group" else None
        if group_size is not None and cols % group_size:
            return (f"its {cols} input columns are not a multiple of the group size {group_size} "
                    "(AWQ stores whole groups only)")
        if out % PACK:
            return f"its {out} output features are not a multiple of {PACK} (AWQ packs {PACK} to a word)"
    return None


def unsupported_reason(codec: dict[str, Any], shape: tuple[int, int] | None = None, act_order: bool = False) -> str | None:
    """:func:`layout_reason`, naming the layouts that can hold the tensor instead."""
    return naming_alternatives("AWQ", layout_reason(codec, shape, act_order), codec, shape, act_order)


# -- writing -------------------------------------------------------------------------------------
def awq_tensors(t: IntTables) -> dict[str, torch.Tensor]:
    """``qweight``, ``qzeros`` and ``scales`` of one linear; ValueError for a zero point beyond
    the 4-bit fields (a model read from a GPTQ v1 file can hold 16: a wrapped field of 15)."""
    if int(t.zeros.max()) >= 1 << BITS:
        raise ValueError(f"it has a zero point of {int(t.zeros.max())}, beyond AWQ's 4-bit fields")
    return {
        "qweight": pack_int32(t.codes.t().contiguous(), BITS, AWQ_ORDER),
        "qzeros": pack_int32(t.zeros, BITS, AWQ_ORDER),
        "scales": t.scales.contiguous(),
    }


def save_awq(loaded: "LoadedModel", out: Path, overwrite: bool = False, source: str | None = None) -> Path:
    """Write a lowbit-quantized model as an AWQ GEMM checkpoint folder ``out`` (module
    docstring); every check runs before anything is written."""
    linears = exportable_linears(loaded, "AWQ", unsupported_reason)
    tables = {name: int_tables(qt) for name, qt in linears}
    sizes = {t.group_size for t in tables.values()}
    if len(sizes) > 1:
        by_size: dict[int, str] = {}
        for name, t in tables.items():
            by_size.setdefault(t.group_size, name)
        named = ", ".join(f"{n} ({'per-channel' if g == -1 else f'g{g}'})" for g, n in sorted(by_size.items()))
        raise LowbitError(f"the AWQ layout has one group size per model, these linears differ: {named}; "
                          "write it as GPTQ (per-module overrides) or lowbit's own folder")
    tensors: dict[str, torch.Tensor] = {}
    for name, t in tables.items():
        try:
            tensors.update({f"{name}.{k}": v for k, v in awq_tensors(t).items()})
        except ValueError as e:
            raise LowbitError(f"the AWQ layout cannot hold {name}: {e}") from None
    config = {
        "quant_method": "awq",
        "version": "gemm",
        "bits": BITS,
        "group_size": sizes.pop(),
        "zero_point": True,
        "modules_to_not_convert": dense_linear_names(loaded.model) or None,
        "meta": lowbit_meta(loaded, source),
    }
    return write_folder(loaded, out, overwrite, tensors, config)


# -- reading -------------------------------------------------------------------------------------
def awq_config(path: Path) -> dict[str, Any] | None:
    """The AWQ quantization config of a folder (``config.json``'s ``quantization_config``, else
    an older AutoAWQ ``quant_config.json``) with ``version``, ``bits`` and ``group_size``, or
    None when the folder is not an AWQ checkpoint."""
    path = Path(path)
    qc = hf_quantization_config(path)
    if qc is not None and str(qc.get("quant_method", "")).lower() == "awq":
        return {**qc, "version": str(qc.get("version") or qc.get("format") or "gemm").lower()}
    legacy = read_json(path / LEGACY_CONFIG)
    if legacy is not None and "w_bit" in legacy:
        return {**legacy, "bits": legacy["w_bit"], "group_size": legacy.get("q_group_size", 128),
                "version": str(legacy.get("version", "gemm")).lower()}
    return None


def is_awq_folder(path: Path) -> bool:
    """Whether ``path`` is a folder holding an AWQ checkpoint (by its quantization config)."""
    return holds_checkpoint(path, awq_config)


def read_awq_linear(
    tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, int], group_size: int
) -> QuantizedTensor:
    """The lowbit tensor of linear ``name`` (``shape`` ``(out, in)``); ValueError if its tensors
    are missing or do not fit."""
    out, cols = shape
    if out % PACK or (group_size != -1 and cols % group_size):
        raise ValueError(f"a ({out}, {cols}) weight does not fit AWQ groups of {group_size} and words of {PACK}")
    groups = 1 if group_size == -1 else cols // group_size
    parts = packed_parts(tensors, name, {"qweight": (cols, out // PACK), "qzeros": (groups, out // PACK),
                                         "scales": (groups, out)})
    zeros = unpack_int32(parts["qzeros"], BITS, AWQ_ORDER).to(torch.int64)
    return tables_to_quantized(IntTables(
        bits=BITS, group_size=group_size, symmetric=bool((zeros == 1 << (BITS - 1)).all()),
        codes=unpack_int32(parts["qweight"], BITS, AWQ_ORDER).t().to(torch.int64),
        scales=parts["scales"],
        zeros=zeros,
        g_idx=natural_g_idx(cols, group_size),
    ))


def load_awq(path: Path, dtype: torch.dtype = torch.float32) -> "LoadedModel":
    """An AWQ GEMM checkpoint folder (lowbit's or AutoAWQ's) as a lowbit model: each quantized
    linear a QuantLinear with the same dequantized weight, dense tensors in ``dtype``."""
    path = Path(path)
    raw = awq_config(path)
    if raw is None:
        raise LowbitError(f"{path}: not an AWQ checkpoint (no AWQ quantization_config)")
    config = typed_config(path, raw)
    if config.version != "gemm":
        raise LowbitError(f"{path}: AWQ version {config.version!r} is not read by lowbit (it reads 'gemm')")
    if config.bits != BITS:
        raise LowbitError(f"{path}: {config.bits}-bit AWQ is not read by lowbit (4-bit only)")
    return load_folder(path, dtype, "AWQ", raw, _PARTS,
                       lambda tensors, name, shape: read_awq_linear(tensors, name, shape, config.group_size))
