"""What a quantized checkpoint holds, layer by layer: codec, shape, bits per weight, bytes.

* a lowbit folder: read from its headers, without building the model;
* a GGUF file: its tensor table (ggml type of every tensor), without reading any tensor data;
* a GPTQ, AWQ or compressed-tensors folder: loaded (packed, never as float weights) and its
  quantized linears listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError


@dataclass
class Inspection:
    layers: list[dict[str, Any]] = field(default_factory=list)  # module, codec, shape [out, in], bpw, bytes
    summary: dict[str, Any] = field(default_factory=dict)


def inspect_checkpoint(path: Path) -> Inspection:
    """The :class:`Inspection` of a lowbit / GPTQ / AWQ / compressed-tensors folder or a .gguf file."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise LowbitError(f"{path}: not a .gguf file (inspect reads GGUF files and quantized model folders)")
        return _gguf(path)
    if not path.is_dir():
        raise LowbitError(f"no such file or folder: {path}")
    from lowbit.io.formats import folder_loader
    from lowbit.io.lowbit_format import MARKER

    if (path / MARKER).exists():
        return _lowbit(path)
    load = folder_loader(path)
    if load is None:
        raise LowbitError(f"{path}: not a quantized model folder (lowbit, GPTQ, AWQ or compressed-tensors)")
    return _loaded(path, load)


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def _summary(layers: list[dict[str, Any]], **head: Any) -> dict[str, Any]:
    quant_bytes = sum(layer["bytes"] for layer in layers if layer["codec"] not in ("F32", "F16", "BF16"))
    quant_params = sum(layer["shape"][0] * layer["shape"][1] for layer in layers
                       if layer["codec"] not in ("F32", "F16", "BF16"))
    return {**head, "quantized_layers": sum(layer["codec"] not in ("F32", "F16", "BF16") for layer in layers),
            "quantized_bits_per_weight": 8 * quant_bytes / max(quant_params, 1), "quantized_bytes": quant_bytes}


def _lowbit(path: Path) -> Inspection:
    from lowbit.codecs import QuantizedTensor
    from lowbit.io.hf_checkpoint import RECIPE
    from lowbit.io.lowbit_format import read_marker, read_weights
    from lowbit.recipes import Recipe

    marker = read_marker(path)
    recipe = Recipe.from_file(path / RECIPE)
    tensors, headers = read_weights(path)
    layers = []
    for name in sorted(headers, key=_natural_key):
        try:
            qt = QuantizedTensor.from_state_dict(headers[name], tensors, f"{name}.weight")
        except ValueError as e:
            raise LowbitError(f"{path}: bad quantized tensor {name}: {e}") from None
        layers.append({"module": name, "codec": qt.get_codec().describe(), "shape": list(qt.shape),
                       "bpw": qt.bits_per_weight, "bytes": qt.nbytes})
    consumed = {k for name in headers for k in tensors if k.startswith(f"{name}.weight.")}
    dense_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if k not in consumed)
    summary = _summary(layers, folder=str(path), layout="lowbit", source=marker.get("source"), recipe=recipe.label(),
                       recipe_digest=marker.get("recipe_digest"))
    summary.update(dense_bytes=dense_bytes, model_bytes=summary["quantized_bytes"] + dense_bytes)
    return Inspection(layers, summary)


def _loaded(path: Path, load: Any) -> Inspection:
    import torch

    from lowbit.modules import QuantLinear, dense_tensors

    loaded = load(path, torch.float16)
    layers = [{"module": name, "codec": m.qweight.get_codec().describe(), "shape": list(m.qweight.shape),
               "bpw": m.qweight.bits_per_weight, "bytes": m.qweight.nbytes}
              for name, m in loaded.model.named_modules() if isinstance(m, QuantLinear)]
    layers.sort(key=lambda layer: _natural_key(layer["module"]))
    dense_bytes = sum(t.numel() * t.element_size() for _, _, _, t in dense_tensors(loaded.model))
    recipe = getattr(loaded.model, "lowbit_recipe", None)
    summary = _summary(layers, folder=str(path), layout=getattr(load, "__name__", "").removeprefix("load_"),
                       source=loaded.source, recipe=None if recipe is None else recipe.label())
    summary.update(dense_bytes=dense_bytes, model_bytes=summary["quantized_bytes"] + dense_bytes)
    return Inspection(layers, summary)


def _gguf(path: Path) -> Inspection:
    from lowbit.io.gguf_layout import read_gguf_layout

    lay = read_gguf_layout(path)
    layers = []
    for t in lay.tensors:
        rows = 1
        for d in t.dims[1:]:
            rows *= d
        nbytes = t.data_end - t.data_begin
        layers.append({"module": t.name, "codec": t.type_name, "shape": [rows, t.dims[0]],
                       "bpw": 8 * nbytes / (rows * t.dims[0]), "bytes": nbytes})
    field = lambda k: None if lay.field(k) is None else lay.field(k).value  # type: ignore[union-attr]  # noqa: E731
    summary = _summary(layers, file=str(path), layout="gguf", architecture=field("general.architecture"),
                       name=field("general.name"), file_type=field("general.file_type"), tensors=len(layers))
    summary["model_bytes"] = lay.size
    return Inspection(layers, summary)
