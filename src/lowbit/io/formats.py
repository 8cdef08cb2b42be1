"""The output layouts ``lowbit quantize --format`` writes, and which folder layout a path holds.

Each layout says up front (before any quantization work) whether it can hold what a recipe
will produce, so that a long GPTQ run never ends in a refusal.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lowbit.errors import LowbitError

if TYPE_CHECKING:
    from lowbit.models.loaded import LoadedModel
    from lowbit.recipes import Recipe


@dataclass(frozen=True)
class Layout:
    help: str
    save: Callable[..., Path]  # (loaded, out, overwrite=..., source=...)
    #: why a weight of ``codec`` (``Codec.model_dump()``) and shape ``(out, in)`` cannot be held
    #: (``act_order``: GPTQ act-order with a stored g_idx), or None; no function: every weight
    reason: Callable[[dict[str, Any], tuple[int, int], bool], str | None] | None = None
    #: why this input quantization (a recipe's ``Activations``) cannot be held, or None; no
    #: function: weights only, no input quantization at all
    activations: Callable[[Any], str | None] | None = None


def _any_activations(act: Any) -> str | None:
    return None


def _ct_activations(act: Any) -> str | None:
    from lowbit.io.compressed_tensors import activations_reason

    return activations_reason(act)


def _lazy(module: str, name: str, **fixed: Any) -> Callable[..., Any]:
    """``module.name``, imported when first called (a layout's libraries load only when it is
    used), with ``fixed`` keyword arguments."""
    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **fixed, **kwargs)

    return call


def _ct_reason(codec: dict[str, Any], shape: tuple[int, int], act_order: bool) -> str | None:
    from lowbit.io.compressed_tensors import unsupported_reason

    reason = unsupported_reason(codec)  # a shorter last group is stored as finer whole groups
    if reason is None and act_order:
        reason = ("act-order with a g_idx cannot be stored in compressed-tensors; use static_groups, or write the GPTQ "
                  "layout or lowbit's own format")
    return reason


def _save_gguf(loaded: "LoadedModel", out: Path, overwrite: bool, source: str | None) -> Path:
    from lowbit.io.gguf_writer import save_gguf

    return save_gguf(loaded, out, overwrite=overwrite)  # a GGUF file records no source path


_GPTQ_REASON = _lazy("lowbit.io.gptq_format", "unsupported_reason")
LAYOUTS: dict[str, Layout] = {
    "native": Layout("lowbit's own folder: every codec and input quantization, read back by lowbit",
                     _lazy("lowbit.io.lowbit_format", "save_quantized"), activations=_any_activations),
    "compressed-tensors": Layout(
        "HF folder that transformers (with compressed-tensors) and vLLM load: int 2..8 bit pack-quantized, FP8 E4M3 "
        "float-quantized, W8A8 int8 and FP8 inputs", _lazy("lowbit.io.compressed_tensors", "save_compressed_tensors"),
        _ct_reason, _ct_activations),
    "gptq": Layout("GPTQ checkpoint (v1, AutoGPTQ's zero-point offset) for transformers/vLLM/GPTQModel: int 2/3/4/8 "
                   "bit, act-order g_idx", _lazy("lowbit.io.gptq_format", "save_gptq"), _GPTQ_REASON),
    "gptq_v2": Layout("GPTQModel's v2 layout (zero points stored as they are)",
                      _lazy("lowbit.io.gptq_format", "save_gptq", checkpoint_format="gptq_v2"), _GPTQ_REASON),
    "awq": Layout("AWQ GEMM checkpoint: int4 groups, no act-order", _lazy("lowbit.io.awq_format", "save_awq"),
                  _lazy("lowbit.io.awq_format", "unsupported_reason")),
    # the GGUF writer checks its codecs and the architecture itself, before the work
    "gguf": Layout("one llama.cpp file (--out FILE.gguf)", _save_gguf),
}


def check_layout(layout: str, recipe: "Recipe", model: nn.Module) -> None:
    """LowbitError unless ``layout`` can hold every linear ``recipe`` will quantize in ``model``
    (checked on the float model, before any work)."""
    from lowbit.modules import linear_weight

    lay = LAYOUTS[layout]
    if layout != "gguf" and recipe.gguf_mix:
        raise LowbitError(f"{recipe.label()} is a GGUF type mix (it quantizes the token embedding): "
                          "write a GGUF file (--out FILE.gguf)")
    if layout not in ("gguf", "native") and (recipe.embedding or recipe.lm_head):
        raise LowbitError(f"{recipe.label()} quantizes the token embedding or LM head, which the {layout} layout "
                          "cannot hold: write a lowbit folder (--format native) or a GGUF file (--out FILE.gguf)")
    for name, module in model.named_modules():
        if not (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"):
            continue
        plan = recipe.assignment(name)
        if plan is None:
            continue
        act = recipe.activations_for(name)
        if act is not None:
            why = ("it stores weights only (GGUF has no activation quantization; GPTQ and AWQ checkpoints are "
                   "weight-only)" if lay.activations is None else lay.activations(act))
            if why is not None:
                raise LowbitError(f"--format {layout} cannot hold the input quantization of {name} "
                                  f"({act.describe()}): {why}")
        if lay.reason is None:
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
    return LAYOUTS[layout].save(loaded, Path(out), overwrite=overwrite, source=source)


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
