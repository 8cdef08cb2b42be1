"""Models whose decoder blocks stay on disk until the pipeline reaches them.

:func:`load_lazy` builds the model with every parameter on the ``meta`` device (no memory),
then loads everything outside the decoder blocks (embeddings, final norm, LM head) from the
folder's safetensors files. :meth:`LazyWeights.materialize` loads one block's tensors, read
through safetensors' memory map, when the pipeline needs it; a quantized block then holds only
its packed codes, so peak memory is one float block plus the activations.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.architectures import architecture_of
from lowbit.models.loaded import LoadedModel, first_line, quiet_transformers


class LazyWeights:
    """Name -> file index of a folder's safetensors weights."""

    def __init__(self, folder: Path, dtype: torch.dtype) -> None:
        self.folder = Path(folder)
        self.dtype = dtype
        from lowbit.io.hf_checkpoint import WEIGHTS, WEIGHTS_INDEX, read_json
        from lowbit.io.safetensors_layout import check_safetensors

        index = read_json(self.folder / WEIGHTS_INDEX)
        if index is not None:
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise LowbitError(f"{self.folder / WEIGHTS_INDEX}: corrupt safetensors index (no weight_map of file names)")
            self.files = {k: self.folder / v for k, v in weight_map.items()}
        else:
            single = self.folder / WEIGHTS
            if not single.is_file():
                raise LowbitError(f"{self.folder}: no safetensors weights (model.safetensors or its index)")
            self.files = {k: single for k in _tensor_names(single)}
        for f in sorted(set(self.files.values())):
            if not f.is_file():
                raise LowbitError(f"{self.folder}: missing {f.name} (named in {WEIGHTS_INDEX})")
            check_safetensors(f)  # every header, before any work

    def fingerprint(self) -> str:
        """Identity of the weights for resume checks: config, file names, sizes and mtimes."""
        h = hashlib.sha256((self.folder / "config.json").read_bytes())
        for f in sorted(set(self.files.values())):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for n in names:
            if n not in self.files:
                raise LowbitError(f"{self.folder}: tensor {n} is missing from the safetensors files")
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for f, keys in by_file.items():
            with safe_open(str(f), framework="pt") as handle:
                for k in keys:
                    # A private copy of just this tensor's bytes: a tensor viewing the file's
                    # memory map would keep its pages resident for as long as it lives.
                    t = handle.get_slice(k)[:]
                    out[k] = t.to(self.dtype, copy=True) if t.dtype.is_floating_point else t.clone()
        return out

    def materialize(self, module: nn.Module, prefix: str) -> None:
        """Replace every ``meta`` parameter/buffer of ``module`` (full name ``prefix.*``) with its
        tensor from disk; tensors already real are left alone."""
        targets = [
            (name, t)
            for name, t in [*module.named_parameters(), *module.named_buffers()]
            if t.device.type == "meta"
        ]
        if not targets:
            return
        loaded = self.load([f"{prefix}.{name}" if prefix else name for name, _ in targets])
        for name, t in targets:
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            value = loaded[f"{prefix}.{name}" if prefix else name]
            if value.shape != t.shape:
                raise LowbitError(f"{self.folder}: {prefix}.{name} has shape {tuple(value.shape)}, expected {tuple(t.shape)}")
            if isinstance(t, nn.Parameter):
                owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
            else:
                owner._buffers[attr] = value


def _tensor_names(file: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # the header walk found nothing wrong: what the library refuses is said as it says it
        raise LowbitError(f"{file}: corrupt safetensors file ({first_line(e)})") from None


def lazy_source(spec: str) -> Path | None:
    """The folder to load lazily for ``spec`` (a built-in name or an HF folder with safetensors
    weights), or None when ``spec`` must be loaded whole (GGUF, lowbit folders, hub ids)."""
    from lowbit.models.builtin import BUILTIN_MODELS, builtin_model_path
    from lowbit.models.loading import LOWBIT_MARKER

    if spec in BUILTIN_MODELS:
        return builtin_model_path(spec)
    p = Path(spec).expanduser()
    if not p.is_dir() or (p / LOWBIT_MARKER).exists() or not (p / "config.json").is_file():
        return None
    from lowbit.io.formats import folder_loader

    if folder_loader(p) is not None:  # a quantized checkpoint (GPTQ, AWQ, compressed-tensors)
        return None
    if (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file():
        return p
    return None


def load_lazy(path: Path, dtype: torch.dtype = torch.float32, source: str | None = None) -> tuple[LoadedModel, LazyWeights]:
    """An HF folder's model with its decoder blocks left on ``meta`` (see module docstring)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise LowbitError(f"{path}: no config.json, not a Hugging Face model folder")
    weights = LazyWeights(path, dtype)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise LowbitError(f"cannot build the model of {path}: {first_line(e)}") from None
    arch = architecture_of(model)
    blocks_prefix = arch.blocks + "."
    outside = [
        n for n, t in [*model.named_parameters(), *model.named_buffers()]
        if t.device.type == "meta" and not n.startswith(blocks_prefix)
    ]
    tied = bool(getattr(config, "tie_word_embeddings", False))
    every = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    missing = [n for n in every if n not in weights.files and not (tied and n.startswith(arch.lm_head + "."))]
    if missing:
        raise LowbitError(f"{path}: tensors missing from the safetensors files: {missing[:5]}")
    for name in [n for n in outside if n in weights.files]:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        value = weights.load([name])[name]
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
        else:
            owner._buffers[attr] = value
    if tied:
        model.get_submodule(arch.lm_head).weight = model.get_submodule(arch.embeddings).weight
    model.eval()
    return LoadedModel(model, tokenizer, source or str(path), path), weights
