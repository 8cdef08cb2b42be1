"""Load a causal LM and its tokenizer from a local HF folder, a hub id, a ``.gguf`` file, a
lowbit quantized folder, or a built-in name."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.models.loaded import LoadedModel, first_line, quiet_transformers

LOWBIT_MARKER = "lowbit.json"


def load_model(spec: str, dtype: torch.dtype = torch.float32, keep_quantized: bool = False) -> LoadedModel:
    """Load ``spec``: a built-in name (``smollm2-135m``), a lowbit folder, a GPTQ / AWQ /
    compressed-tensors checkpoint folder, an HF folder, a ``.gguf`` file, or a hub id. Weights
    are in ``dtype`` (a quantized folder's linears stay packed; a ``.gguf`` file's too with
    ``keep_quantized``, else it is dequantized)."""
    from lowbit.models.builtin import BUILTIN_MODELS, builtin_model_path

    if spec in BUILTIN_MODELS:
        return _load_hf_folder(builtin_model_path(spec), dtype, source=spec)
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            from lowbit.io.formats import folder_loader

            load = folder_loader(path)  # lowbit's own, GPTQ, AWQ or compressed-tensors
            if load is not None:
                return load(path, dtype)
            return _load_hf_folder(path, dtype, source=spec)
        if path.suffix == ".gguf":
            return load_gguf(path, dtype, keep_quantized=keep_quantized)
        raise LowbitError(f"{spec}: not a model folder or a .gguf file")
    if _looks_like_path(spec):
        raise LowbitError(f"no such file or directory: {spec}")
    return _load_from_hub(spec, dtype)


def _looks_like_path(spec: str) -> bool:
    # A hub id is "name" or "owner/name"; anything with more separators is a local path.
    return spec.startswith(("/", ".", "~")) or spec.endswith((".gguf", ".safetensors")) or max(spec.count("/"), spec.count(os.sep)) > 1


def _load_hf_folder(path: Path, dtype: torch.dtype, source: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    if not (path / "config.json").is_file():
        raise LowbitError(f"{path}: no config.json, not a Hugging Face model folder")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises many types for corrupt or partial folders
        from lowbit.io.hf_checkpoint import config_problem

        raise LowbitError(f"cannot load model from {path}: {config_problem(path) or first_line(e)}") from None
    model.eval()
    return LoadedModel(model, tokenizer, source, path)


def _load_from_hub(repo_id: str, dtype: torch.dtype) -> LoadedModel:
    """The real ``from_pretrained`` hub path: the local HF cache first, then the hub, failing at
    once (instead of retrying for half a minute) when the hub's host does not even resolve."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(repo_id, local_files_only=True)
    except Exception:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or not _hub_resolves()
        if offline:
            raise LowbitError(
                f"cannot load {repo_id!r}: not in the local Hugging Face cache and the hub is unreachable "
                "(offline); pass a local folder, a .gguf file, or a built-in model (smollm2-135m, qwen2.5-coder-0.5b)"
            ) from None
        try:
            model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(repo_id)
        except Exception as e:
            raise LowbitError(f"cannot load {repo_id!r} from the Hugging Face hub: {first_line(e)}") from None
    model.eval()
    return LoadedModel(model, tokenizer, repo_id, None)


def _hub_resolves() -> bool:
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def load_gguf(path: Path, dtype: torch.dtype = torch.float32, keep_quantized: bool = False) -> LoadedModel:
    """A GGUF file's model with the tokenizer stored in it: dequantized into a plain
    transformers model, or with ``keep_quantized`` read by :mod:`lowbit.io.gguf_reader`
    (linears of ggml types lowbit knows stay packed as QuantLinears). Architectures that
    reader does not know are dequantized, with a warning."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if keep_quantized:
        from lowbit.io.gguf_reader import UnknownGGUFArchitecture, read_gguf_model

        try:
            return read_gguf_model(path, dtype)
        except UnknownGGUFArchitecture as e:
            warnings.warn(f"{e}; loading it dequantized to float", stacklevel=2)
    from lowbit.io.gguf_reader import check_gguf

    check_gguf(path)
    quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:
        raise LowbitError(f"cannot load GGUF file {path}: {_gguf_problem(path) or first_line(e)}") from None
    # The weights are now plain dense tensors; drop the marker so that saving writes an HF model.
    model.config.quantization_config = None
    if hasattr(model.config, "_pre_quantization_dtype"):
        del model.config._pre_quantization_dtype
    model.hf_quantizer = None
    model.eval()
    return LoadedModel(model, tokenizer, str(path), path)


def _gguf_problem(path: Path) -> str | None:
    """What lowbit's own reader finds wrong with a GGUF file transformers could not load (a
    tensor of the wrong shape, named: transformers' message is numpy's reshape error), or None."""
    from lowbit.io.gguf_reader import read_gguf_model

    try:
        read_gguf_model(path, torch.float16)
    except LowbitError as e:
        return str(e)
    except Exception:  # noqa: BLE001 - a diagnosis only: the caller reports transformers' own error
        return None
    return None
