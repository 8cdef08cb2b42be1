"""The output layouts ``lowbit quantize --format`` writes, and which folder layout a path holds.

Each layout says up front (before any quantization work) whether it can hold what a recipe
will produce, so that a long GPTQ run never ends in a refusal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lowbit.errors import LowbitError

if TYPE_CHECKING:
    from lowbit.models.loading import LoadedModel
    from lowbit.recipes import Recipe


@dataclass(frozen=True)
class Layout:
    name: str
    help: str
    #: why a weight of ``codec`` (``Codec.model_dump()``) and shape ``(out, in)`` cannot be held
    #: (``act_order``: GPTQ act-order with a stored g_idx), or None
    reason: Callable[[dict[str, Any], tuple[int, int], bool], str | None]
    save: Callable[..., Path]


def _native_reason(codec: dict[str, Any], shape: tuple[int, int], act_order: bool) -> str | None:
    return None


def _gptq_reason(codec: dict[str, Any], shape: tuple[int, int], act_order: bool) -> str | None:
    from lowbit.io.gptq_format import unsupported_reason

    return unsupported_reason(codec, shape, act_order)


def _awq_reason(codec: dict[str, Any], shape: tuple[int, int], act_order: bool) -> str | None:
    from lowbit.io.awq_format import unsupported_reason

    return unsupported_reason(codec, shape, act_order)


def _ct_reason(codec: dict[str, Any], shape: tuple[int, int], act_order: bool) -> str | None:
    from lowbit.io.compressed_tensors import unsupported_reason

    reason = unsupported_reason(codec)  # a shorter last group is stored as finer whole groups
    if reason is None and act_order:
        reason = ("act-order with a g_idx cannot be stored in compressed-tensors; use static_groups, or write the GPTQ "
                  "layout or lowbit's own format")
    return reason


def _save_native(loaded: "LoadedModel", out: Path, overwrite: bool, source: str | None) -> Path:
    from lowbit.io.lowbit_format import save_quantized

    return save_quantized(loaded, out, overwrite=overwrite, source=source)


def _save_ct(loaded: "LoadedModel", out: Path, overwrite: bool, source: str | None) -> Path:
    from lowbit.io.compressed_tensors import save_compressed_tensors

    return save_compressed_tensors(loaded, out, overwrite=overwrite, source=source)


def _save_gptq(loaded: "LoadedModel", out: Path, overwrite: bool, source: str | None) -> Path:
    from lowbit.io.gptq_format import save_gptq

    return save_gptq(loaded, out, overwrite=overwrite, source=source)


def _save_gptq_v2(loaded: "LoadedModel", out: Path, overwrite: bool, source: str | None) -> Path:
    from lowbit.io.gptq_format import save_gptq

    return save_gptq(loaded, out, overwrite=overwrite, source=source, checkpoint_format="gptq_v2")


def _save_awq(loaded: "LoadedModel", out: Path, overwrite: bool, source: str | None) -> Path:
    from lowbit.io.awq_format import save_awq

    return save_awq(loaded, out, overwrite=overwrite, source=source)


def _save_gguf(loaded: "LoadedModel", out: Path, overwrite: bool, source: str | None) -> Path:
    from lowbit.io.gguf_writer import save_gguf

    return save_gguf(loaded, out, overwrite=overwrite)


def _gguf_reason(codec: dict[str, Any], shape: tuple[int, int], act_order: bool) -> str | None:
    return None  # the GGUF writer checks its codecs and architecture itself, before the work


LAYOUTS: dict[str, Layout] = {
    "native": Layout("native", "lowbit's own folder: every codec, read back by lowbit", _native_reason, _save_native),
    "compressed-tensors": Layout(
        "compressed-tensors", "HF folder that transformers (with compressed-tensors) and vLLM load: int 2..8 bit "
        "pack-quantized, FP8 E4M3 float-quantized", _ct_reason, _save_ct),
    "gptq": Layout("gptq", "GPTQ checkpoint (v1, AutoGPTQ's zero-point offset) for transformers/vLLM/GPTQModel: "
                   "int 2/3/4/8 bit, act-order g_idx", _gptq_reason, _save_gptq),
    "gptq_v2": Layout("gptq_v2", "GPTQModel's v2 layout (zero points stored as they are)", _gptq_reason,
                      _save_gptq_v2),
    "awq": Layout("awq", "AWQ GEMM checkpoint: int4 groups, no act-order", _awq_reason, _save_awq),
    "gguf": Layout("gguf", "one llama.cpp file (--out FILE.gguf)", _gguf_reason, _save_gguf),
}


def layouts_holding(codec: dict[str, Any], shape: tuple[int, int], act_order: bool) -> list[str]:
    return [n for n, lay in LAYOUTS.items() if n != "gguf" and lay.reason(codec, shape, act_order) is None]


def check_layout(layout: str, recipe: "Recipe", model: nn.Module) -> None:
    """LowbitError unless ``layout`` can hold every linear ``recipe`` will quantize in ``model``
    (checked on the float model, before any work)."""
    from lowbit.modules import linear_weight

    lay = LAYOUTS[layout]
    if layout in ("native", "gguf"):
        return
    if recipe.gguf_mix or recipe.embedding or recipe.lm_head:
        raise LowbitError(f"{recipe.label()} quantizes the token embedding (a GGUF type mix): write a GGUF file")
    for name, module in model.named_modules():
        if not (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"):
            continue
        plan = recipe.assignment(name)
        if plan is None:
            continue
        weight, _ = linear_weight(module)
        codec, algorithm = plan
        act_order = bool(getattr(algorithm, "act_order", False)) and not getattr(algorithm, "static_groups", True)
        shape = (int(weight.shape[0]), int(weight.shape[1]))
        reason = lay.reason(codec.model_dump(), shape, act_order)
        if reason is not None:
            raise LowbitError(f"--format {layout} cannot hold {name} ({codec.describe()}): {reason}")


def save_model(layout: str, loaded: "LoadedModel", out: Path, overwrite: bool = False,
               source: str | None = None) -> Path:
    """Write ``loaded`` (quantized in place) as ``layout``."""
    return LAYOUTS[layout].save(loaded, Path(out), overwrite, source)


def folder_loader(path: Path) -> Callable[[Path, torch.dtype], "LoadedModel"] | None:
    """The reader of a quantized checkpoint folder (lowbit's, GPTQ, AWQ, compressed-tensors), or
    None for a plain HF folder."""
    from lowbit.io.awq_format import is_awq_folder, load_awq
    from lowbit.io.compressed_tensors import is_compressed_tensors_folder, load_compressed_tensors
    from lowbit.io.gptq_format import is_gptq_folder, load_gptq
    from lowbit.io.lowbit_format import MARKER, load_quantized

    if (path / MARKER).exists():
        return load_quantized
    for is_layout, load in ((is_gptq_folder, load_gptq), (is_awq_folder, load_awq),
                            (is_compressed_tensors_folder, load_compressed_tensors)):
        if is_layout(path):
            return load
    return None
