"""The GPTQ checkpoint layout, as transformers (through GPTQModel), vLLM and GPTQModel read it.

A Hugging Face folder whose ``model.safetensors`` holds, for each quantized linear ``NAME``
with ``in`` inputs, ``out`` outputs, ``G`` groups of ``group_size`` columns and ``bits`` bits:

==================  =========  ========================  ==========================================
tensor              dtype      shape                     content
==================  =========  ========================  ==========================================
``NAME.qweight``    int32      ``(in * bits / 32, out)`` codes, packed along the input dimension
``NAME.qzeros``     int32      ``(G, out * bits / 32)``  zero points, packed along the output one
``NAME.scales``     float16    ``(G, out)``              one scale per group and output
``NAME.g_idx``      int32      ``(in,)``                 group of each input column
``NAME.bias``       (dense)    ``(out,)``                if the linear has one
==================  =========  ========================  ==========================================

``W[o, c] = scales[g, o] * (q[c, o] - z[g, o])`` with ``g = g_idx[c]``. Packing is the int32 bit
stream of :mod:`lowbit.io.int32_packing` (3-bit codes straddle words). ``G = ceil(in /
group_size)``: a last, shorter group ("ragged", e.g. 576 columns in groups of 128 make 5 groups,
the last 64 wide) is expressed by ``g_idx`` alone. GPTQModel's torch kernels read it; vLLM
refuses input widths that are not a multiple of the group size. ``group_size`` -1 is one group
per output feature.

Zero points: the original AutoGPTQ (``checkpoint_format`` ``gptq``, "v1") stores ``z - 1`` and
every v1 reader adds the 1 back, so a zero point of 0 cannot be written (it would read back as
``2**bits``); ``gptq_v2`` (GPTQModel's own, read by GPTQModel and recent vLLM) stores ``z``. A
symmetric lowbit codec writes ``2**(bits-1)`` (``sym: true``). Act-order (``desc_act``) is a
non-trivial ``g_idx``: the codes stay in column order, each column scaled by its group.

``quantize_config.json`` and ``config.json``'s ``quantization_config`` carry the common
``bits``/``group_size``/``sym``/``desc_act``; linears that differ get GPTQModel's ``dynamic``
overrides (``"+:^NAME$": {...}``, which vLLM reads too) and linears left dense a negative
``"-:^NAME$"`` entry. Dense tensors go in the recipe's dense dtype, as in lowbit's own folder.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from lowbit.codecs import QuantizedTensor
from lowbit.errors import LowbitError
from lowbit.io.hf_checkpoint import hf_quantization_config, holds_checkpoint, read_json, write_folder
from lowbit.io.int32_packing import fills_words, pack_int32, unpack_int32
from lowbit.io.int_checkpoint import (
    QuantConfig,
    typed_config,
    IntTables,
    dense_linear_names,
    exportable_linears,
    int_codec_reason,
    int_tables,
    load_folder,
    lowbit_meta,
    naming_alternatives,
    natural_g_idx,
    output_head_quantized,
    packed_parts,
    tables_to_quantized,
)

if TYPE_CHECKING:
    from lowbit.models.loaded import LoadedModel

QUANTIZE_CONFIG = "quantize_config.json"
BITS = (2, 3, 4, 8)
_BITS_TEXT = "2, 3, 4 or 8"
CheckpointFormat = Literal["gptq", "gptq_v2"]
_PARTS = ("qweight", "qzeros", "scales", "g_idx")


def layout_reason(codec: dict[str, Any], shape: tuple[int, int] | None = None, act_order: bool = False) -> str | None:
    """Why the GPTQ layout cannot hold a tensor of ``codec`` (``QuantizedTensor.codec``) and
    ``shape`` ``(out, in)`` (not checked when None), or None. Act-order is always fine."""
    reason = int_codec_reason(codec)
    if reason is not None:
        return reason
    bits = int(codec["bits"])
    if bits not in BITS:
        return f"GPTQ stores {_BITS_TEXT}-bit codes, not {bits}-bit ones"
    if shape is not None:
        unit = 32 // math.gcd(32, bits)
        for what, n in (("input", shape[1]), ("output", shape[0])):
            if not fills_words(n, bits):
                return (f"{n} {what} features of {bits} bits do not fill whole int32 words "
                        f"(GPTQ packs them {unit} to a run of words)")
    return None


def unsupported_reason(codec: dict[str, Any], shape: tuple[int, int] | None = None, act_order: bool = False) -> str | None:
    """:func:`layout_reason`, naming the layouts that can hold the tensor instead."""
    return naming_alternatives("GPTQ", layout_reason(codec, shape, act_order), codec, shape, act_order)


# -- writing -------------------------------------------------------------------------------------
def gptq_tensors(t: IntTables, checkpoint_format: CheckpointFormat = "gptq") -> dict[str, torch.Tensor]:
    """``qweight``, ``qzeros``, ``scales`` and ``g_idx`` of one linear; ValueError for a zero
    point the layout's fields cannot hold (0 in v1, which stores zero - 1)."""
    stored = t.zeros if checkpoint_format == "gptq_v2" else t.zeros - 1
    if bool((stored < 0).any()):
        raise ValueError("it has a zero point of 0, which the v1 layout (checkpoint_format 'gptq', which "
                         "stores zero - 1) cannot hold: write checkpoint_format 'gptq_v2' (GPTQModel and "
                         "recent vLLM read it)")
    if bool((stored >= 1 << t.bits).any()):
        raise ValueError(f"it has a zero point of {int(t.zeros.max())}, beyond the {t.bits}-bit fields of "
                         f"checkpoint_format {checkpoint_format!r}")
    return {
        "qweight": pack_int32(t.codes, t.bits).t().contiguous(),
        "qzeros": pack_int32(stored, t.bits),
        "scales": t.scales.contiguous(),
        "g_idx": t.g_idx.to(torch.int32),
    }


def save_gptq(
    loaded: "LoadedModel", out: Path, overwrite: bool = False, source: str | None = None,
    checkpoint_format: CheckpointFormat = "gptq",
) -> Path:
    """Write a lowbit-quantized model as a GPTQ checkpoint folder ``out`` (module docstring);
    every check runs before anything is written."""
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"checkpoint_format must be 'gptq' or 'gptq_v2', got {checkpoint_format!r}")
    linears = exportable_linears(loaded, "GPTQ", unsupported_reason)
    tensors: dict[str, torch.Tensor] = {}
    settings: dict[str, dict[str, Any]] = {}
    for name, qt in linears:
        t = int_tables(qt)
        try:
            parts = gptq_tensors(t, checkpoint_format)
        except ValueError as e:
            raise LowbitError(f"the GPTQ layout cannot hold {name}: {e}") from None
        tensors.update({f"{name}.{k}": v for k, v in parts.items()})
        settings[name] = {"bits": t.bits, "group_size": t.group_size, "sym": t.symmetric, "desc_act": t.act_order}
    config = _quantize_config(loaded, settings, checkpoint_format, source)
    return write_folder(loaded, out, overwrite, tensors, config, {QUANTIZE_CONFIG: config})


def _quantize_config(
    loaded: "LoadedModel", settings: dict[str, dict[str, Any]], checkpoint_format: str, source: str | None
) -> dict[str, Any]:
    """The most common settings at the top, GPTQModel ``dynamic`` overrides for the others and
    negative entries for dense linears."""
    model = loaded.model
    common = dict(Counter(tuple(sorted(s.items())) for s in settings.values()).most_common(1)[0][0])
    dynamic: dict[str, dict[str, Any]] = {}
    for name, s in settings.items():
        if s != common:
            dynamic[f"+:^{re.escape(name)}$"] = s
    for name in dense_linear_names(model):
        dynamic[f"-:^{re.escape(name)}$"] = {}
    algorithm = getattr(getattr(model, "lowbit_recipe", None), "algorithm", None)
    gptq = getattr(algorithm, "name", None) == "gptq"
    damp = float(algorithm.dampening) if gptq else 0.01  # type: ignore[union-attr]
    config: dict[str, Any] = {
        **common,
        "static_groups": bool(gptq and algorithm.static_groups),  # type: ignore[union-attr]
        "true_sequential": True,
        "damp_percent": damp if 0 < damp < 1 else 0.01,  # transformers refuses a config outside (0, 1)
        "lm_head": output_head_quantized(model),
        "quant_method": "gptq",
        "checkpoint_format": checkpoint_format,
        "format": checkpoint_format,
        "pack_dtype": "int32",
        "meta": lowbit_meta(loaded, source),
    }
    if dynamic:
        config["dynamic"] = dynamic
    return config


# -- reading -------------------------------------------------------------------------------------
def gptq_config(path: Path) -> dict[str, Any] | None:
    """The GPTQ quantization config of a folder (``quantize_config.json``, else ``config.json``'s
    ``quantization_config``), or None when the folder is not a GPTQ checkpoint."""
    path = Path(path)
    own = read_json(path / QUANTIZE_CONFIG)
    if own is not None and str(own.get("quant_method", "gptq")).lower() == "gptq" and "bits" in own:
        return own
    qc = hf_quantization_config(path)
    if qc is not None and str(qc.get("quant_method", "")).lower() == "gptq":
        return qc
    return None


def is_gptq_folder(path: Path) -> bool:
    """Whether ``path`` is a folder holding a GPTQ checkpoint (by its quantization config)."""
    return holds_checkpoint(path, gptq_config)


def module_settings(config: dict[str, Any] | QuantConfig, name: str) -> dict[str, Any] | None:
    """Bits, group size and ``sym`` of linear ``name`` after GPTQModel's ``dynamic`` overrides
    (first matching pattern wins; None for a negative ``-:`` match, a linear left dense)."""
    qc = config if isinstance(config, QuantConfig) else QuantConfig.model_validate(config)
    settings = {"bits": qc.bits, "group_size": qc.group_size, "sym": qc.sym}
    for pattern, override in (qc.dynamic or {}).items():
        negative = pattern.startswith("-:")
        try:
            hit = re.match(pattern[2:] if pattern.startswith(("+:", "-:")) else pattern, name)
        except re.error as e:
            raise ValueError(f"bad dynamic pattern {pattern!r} in the quantization config ({e})") from None
        if hit:
            changed = {k: v for k, v in override.model_dump(include=set(settings)).items() if v is not None}
            return None if negative else {**settings, **changed}
    return settings


def read_gptq_linear(
    tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, int], bits: int, group_size: int,
    sym: bool, checkpoint_format: CheckpointFormat = "gptq",
) -> QuantizedTensor:
    """The lowbit tensor of linear ``name`` (``shape`` ``(out, in)``); ValueError if its tensors
    are missing or do not fit. A v1 zero field of ``2**bits - 1`` (another tool's zero point 0,
    wrapped) reads as ``2**bits``, as every v1 reader takes it; symmetric only when ``sym`` and
    every zero point is ``2**(bits-1)``."""
    out, cols = shape
    if bits not in BITS:
        raise ValueError(f"{bits}-bit codes (GPTQ has {_BITS_TEXT})")
    if not (fills_words(cols, bits) and fills_words(out, bits)):
        raise ValueError(f"a ({out}, {cols}) weight does not fill whole int32 words of {bits}-bit codes")
    groups = 1 if group_size == -1 else -(-cols // group_size)
    parts = packed_parts(tensors, name, {"qweight": (cols * bits // 32, out), "qzeros": (groups, out * bits // 32),
                                         "scales": (groups, out)})
    g_idx = tensors.get(f"{name}.g_idx")
    zeros = unpack_int32(parts["qzeros"], bits).to(torch.int64) + (0 if checkpoint_format == "gptq_v2" else 1)
    t = IntTables(
        bits=bits, group_size=group_size, symmetric=False,
        codes=unpack_int32(parts["qweight"].t().contiguous(), bits).to(torch.int64),
        scales=parts["scales"],
        zeros=zeros,
        g_idx=natural_g_idx(cols, group_size) if g_idx is None else g_idx.to(torch.int64),
    )
    t.symmetric = bool(sym) and bool((zeros == 1 << (bits - 1)).all())
    return tables_to_quantized(t)


def load_gptq(path: Path, dtype: torch.dtype = torch.float32) -> "LoadedModel":
    """A GPTQ checkpoint folder (lowbit's, AutoGPTQ's or GPTQModel's; v1, or v2 when its
    ``checkpoint_format`` says ``gptq_v2``) as a lowbit model: each quantized linear a
    QuantLinear with the same dequantized weight, dense tensors in ``dtype``."""
    path = Path(path)
    raw = gptq_config(path)
    if raw is None:
        raise LowbitError(f"{path}: not a GPTQ checkpoint (no quantize_config.json, no GPTQ quantization_config)")
    config = typed_config(path, raw)
    fmt = (config.checkpoint_format or config.format or "gptq").lower()
    if config.is_marlin_format or fmt not in ("gptq", "gptq_v2"):
        raise LowbitError(f"{path}: GPTQ checkpoint format {'marlin' if config.is_marlin_format else fmt!r} "
                          "is not read by lowbit (it reads 'gptq' and 'gptq_v2')")
    if (config.pack_dtype or "int32") != "int32":
        raise LowbitError(f"{path}: pack_dtype {config.pack_dtype!r} is not read by lowbit (int32 only)")

    def read(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, int]) -> QuantizedTensor:
        settings = module_settings(config, name)
        if settings is None:
            raise ValueError("its quantization config (a negative dynamic entry) leaves it dense")
        return read_gptq_linear(tensors, name, shape, settings["bits"], settings["group_size"], settings["sym"],
                                fmt)  # type: ignore[arg-type]

    return load_folder(path, dtype, "GPTQ", raw, _PARTS, read)
