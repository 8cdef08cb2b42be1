"""lowbit's own checkpoint format.

A folder::

    lowbit.json          format version, lowbit version, source model, recipe digest
    recipe.json          the full recipe (reproduces the result)
    config.json          the transformers config of the model
    model.safetensors    dense tensors in the recipe's dense dtype, and for each quantized
                         linear NAME: NAME.weight.codes (packed uint8) plus its scale data
                         (NAME.weight.scale, NAME.weight.zero, ...); the safetensors metadata
                         key "lowbit.quantized" maps NAME to its codec and logical shape; with
                         static input scales (the recipe's activations), NAME.input_scale
                         (and NAME.input_zero) in float32; with fixed 16-bit input
                         channels, NAME.input_channels (int64 feature indices); with a KV cache of static scales,
                         ATTN.k_scale and ATTN.v_scale per attention module, float32 (1,);
                         a quantized token embedding is stored as a linear of its name (a
                         tied LM head, sharing its codes, is not stored again)
    tokenizer files

It is written into a hidden temporary folder beside the target and renamed only when complete,
so a failure never leaves a partial model behind.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import nn

import lowbit
from lowbit.codecs import QuantizedTensor
from lowbit.codecs.activations import ActivationQuantizer
from lowbit.codecs.base import ScaleData
from lowbit.errors import LowbitError
from lowbit.io.folder import atomic_folder
from lowbit.io.hf_checkpoint import RECIPE, WEIGHTS, assemble, dense_state, empty_model, read_json, read_safetensors
from lowbit.modules import QuantEmbedding, QuantLinear
from lowbit.modules.kv_cache import kv_scale_tensors, set_kv_scales, take_kv_scales

if TYPE_CHECKING:
    from lowbit.models.loaded import LoadedModel
    from lowbit.recipes import Recipe

FORMAT_VERSION = 1
MARKER = "lowbit.json"
QUANT_KEY = "lowbit.quantized"


def quantized_state(model: nn.Module, dense_dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to store and the per-linear headers; tied tensors are stored once."""
    tensors: dict[str, torch.Tensor] = {}
    headers: dict[str, str] = {}
    stored: set[int] = set()  # a tied LM head shares the token embedding's codes: stored once, as the embedding
    for mod_name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            if id(module.qweight_codes) in stored:
                continue
            stored.add(id(module.qweight_codes))
            qt = module.qweight
            headers[mod_name] = qt.header()
            prefix = f"{mod_name}." if mod_name else ""
            tensors.update({k: v.contiguous() for k, v in qt.state_dict(f"{prefix}weight").items()})
            for k, v in (module.input_scale or {}).items():  # static input scales, float32 as calibrated
                tensors[f"{prefix}input_{k}"] = v.contiguous()
            if module.input_channels is not None:  # the input features kept in 16-bit
                tensors[f"{prefix}input_channels"] = module.input_channels.contiguous()
    tensors.update(dense_state(model, dense_dtype))
    tensors.update(kv_scale_tensors(model))  # static KV cache scales, float32
    return tensors, headers


def save_quantized(loaded: "LoadedModel", out: Path, overwrite: bool = False, source: str | None = None) -> Path:
    """Write a quantized model (``loaded.model.lowbit_recipe`` set) to the folder ``out``."""
    model = loaded.model
    recipe = getattr(model, "lowbit_recipe", None)
    if recipe is None:
        raise LowbitError("the model is not quantized (no recipe attached)")
    out = Path(out)
    with atomic_folder(out, overwrite) as tmp:
        tensors, headers = quantized_state(model, getattr(torch, recipe.dense_dtype))
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", QUANT_KEY: json.dumps(headers)})
        model.config.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        (tmp / RECIPE).write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
        marker = {
            "format": "lowbit",
            "format_version": FORMAT_VERSION,
            "lowbit_version": lowbit.__version__,
            "source": source or loaded.source,
            "recipe_digest": recipe.digest(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "quantized_modules": len(headers),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return out


def read_marker(path: Path) -> dict[str, Any]:
    marker = read_json(path / MARKER)
    if marker is None:
        raise LowbitError(f"{path}: missing {MARKER}")
    if marker.get("format") != "lowbit" or marker.get("format_version") != FORMAT_VERSION:
        raise LowbitError(f"{path}: not a lowbit folder of format version {FORMAT_VERSION}")
    return marker


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of ``model.safetensors`` and the quantized-linear headers."""
    file = path / WEIGHTS
    if not file.is_file():
        raise LowbitError(f"{path}: missing {WEIGHTS}")
    tensors, meta = read_safetensors(file)
    try:
        headers = json.loads(meta.get(QUANT_KEY, "{}"))
    except json.JSONDecodeError:
        raise LowbitError(f"{file}: corrupt {QUANT_KEY} metadata (not JSON)") from None
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise LowbitError(f"{file}: corrupt {QUANT_KEY} metadata (not a mapping of module names to headers)")
    return tensors, headers


def load_quantized(path: Path, dtype: torch.dtype = torch.float32) -> "LoadedModel":
    """Rebuild a quantized model from a lowbit folder; dense tensors are cast to ``dtype``."""
    from lowbit.models.loaded import LoadedModel
    from lowbit.recipes import Recipe

    path = Path(path)
    marker = read_marker(path)
    recipe = Recipe.from_file(path / RECIPE)
    tensors, headers = read_weights(path)
    # parameters on the meta device: the float weights of the quantized linears are never
    # allocated; buffers (rotary tables) are real, as the checkpoint does not hold them
    model, tokenizer = empty_model(path, dtype, tensors, keep_quantization_config=True)

    from lowbit.models import architecture_of
    from lowbit.modules.experts import unfuse_experts

    try:
        arch = architecture_of(model)
    except LowbitError:
        arch = None
    if arch is not None and arch.experts is not None:
        for block in arch.block_list(model):  # quantized experts are stored one module per expert
            unfuse_experts(block, arch.experts)
    quantized: dict[str, QuantizedTensor] = {}
    consumed: set[str] = set()
    for name, header in headers.items():
        try:
            quantized[name] = qt = QuantizedTensor.from_state_dict(header, tensors, f"{name}.weight")
            model.get_submodule(name)
        except (ValueError, KeyError, AttributeError) as e:
            raise LowbitError(f"{path}: bad quantized tensor {name}: {e}") from None
        consumed.update(qt.state_dict(f"{name}.weight"))
    _set_quantized_embedding(model, quantized, path)
    inputs = input_quantization(recipe, quantized, tensors, path)
    consumed.update(k for name, (_, scale, channels) in inputs.items() for k in input_tensor_names(name, scale, channels))
    scales = read_kv_scales(path, tensors, consumed)
    result = assemble(model, path, quantized, tensors, consumed, dtype)
    for name, (quantizer, scale, channels) in inputs.items():
        model.get_submodule(name).set_input_quant(quantizer, scale, channels)
    set_kv_scales(model, scales)
    # lowbit writes every persistent tensor: one the folder lacks is missing even when the
    # model could build it (a buffer), unless it is tied or a quantized linear's own
    missing = [k for k in result.missing_keys if not _is_tied_or_quantized(model, k)]
    if missing:
        raise LowbitError(f"{path}: missing tensors {missing[:5]}")
    model.lowbit_recipe = recipe
    return LoadedModel(model, tokenizer, str(marker.get("source", path)), path)


def _set_quantized_embedding(model: nn.Module, quantized: dict[str, QuantizedTensor], path: Path) -> None:
    """A quantized token embedding (taken out of ``quantized``, which then holds linears only) set in
    as a QuantEmbedding, and a tied LM head as a QuantLinear over the same codes."""
    emb = model.get_input_embeddings()
    name = next((n for n in quantized if model.get_submodule(n) is emb), None)
    if name is None:
        return
    qt = quantized.pop(name)
    if tuple(emb.weight.shape) != qt.shape:
        raise LowbitError(f"{path}: {name} is stored as a {qt.shape[0]}x{qt.shape[1]} table, the model's is "
                          f"{emb.weight.shape[0]}x{emb.weight.shape[1]}")
    model.set_input_embeddings(QuantEmbedding(qt))
    # a tied head's weight stored anyway is an unexpected tensor to assemble()
    if model.get_output_embeddings() is not None and getattr(model.config, "tie_word_embeddings", False):
        model.set_output_embeddings(QuantLinear(qt))


def input_quantization(recipe: Recipe, quantized: dict[str, QuantizedTensor], tensors: dict[str, torch.Tensor],
                       path: Path) -> dict[str, tuple[ActivationQuantizer, ScaleData | None, torch.Tensor | None]]:
    """Per quantized linear whose input the recipe quantizes: its quantizer, for static scales
    the scale data stored as ``NAME.input_scale`` (``NAME.input_zero``), exactly the parts the
    format has, and with fixed outlier channels their indices (``NAME.input_channels``);
    LowbitError for a missing or ill-shaped one."""
    out: dict[str, tuple[ActivationQuantizer, ScaleData | None, torch.Tensor | None]] = {}
    for name, qt in quantized.items():
        act = recipe.activations_for(name)
        if act is None:
            continue
        quantizer = act.quantizer()
        scale = None
        if not act.dynamic:
            rows = qt.shape[1] if act.granularity == "channel" else 1
            scale = {}
            for part, dtype in quantizer.codec.scale_dtypes().items():
                t = tensors.get(f"{name}.input_{part}")
                if t is None or tuple(t.shape) != (rows, 1) or t.dtype != dtype:
                    found = "missing" if t is None else f"{tuple(t.shape)} {t.dtype}"
                    raise LowbitError(f"{path}: {name}.input_{part} should be ({rows}, 1) {dtype} (static input scales "
                                      f"of the recipe), found {found}")
                scale[part] = t
        channels = None
        if act.outlier_channels is not None:  # the recipe's fixed outlier channels
            channels = tensors.get(f"{name}.input_channels")
            if channels is None or channels.dtype != torch.int64:
                found = "missing" if channels is None else channels.dtype
                raise LowbitError(f"{path}: {name}.input_channels should be int64 (the recipe's fixed outlier "
                                  f"channels), found {found}")
            try:
                quantizer.check_channels(channels, qt.shape[1])
            except ValueError as e:
                raise LowbitError(f"{path}: {name}.input_channels: {e}") from None
        out[name] = (quantizer, scale, channels)
    return out


def input_tensor_names(name: str, scale: ScaleData | None, channels: torch.Tensor | None) -> list[str]:
    """The tensors of linear ``name``'s input quantization (static scale data, kept channels)."""
    return [f"{name}.input_{k}" for k in scale or {}] + ([f"{name}.input_channels"] if channels is not None else [])


def read_kv_scales(path: Path, tensors: dict[str, torch.Tensor], consumed: set[str]) -> dict[str, tuple[float, float]]:
    """The static KV cache scales a checkpoint holds (``NAME.k_scale`` / ``NAME.v_scale``), their
    keys added to ``consumed``; LowbitError for a malformed pair."""
    try:
        return take_kv_scales(tensors, consumed)
    except ValueError as e:
        raise LowbitError(f"{path}: {e}") from None


def _is_tied_or_quantized(model: nn.Module, key: str) -> bool:
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if isinstance(module, QuantLinear):
        return True
    # A tied weight (e.g. lm_head.weight = embed_tokens.weight) is stored once, under its source.
    t = getattr(module, attr, None)
    if t is None:
        return False
    return any(p is t for n, p in model.named_parameters() if n != key)
