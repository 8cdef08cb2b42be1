"""Read a GGUF file into a lowbit model whose quantized linears stay packed.

* config and tokenizer: transformers' own GGUF conversion (``AutoConfig`` / ``AutoTokenizer``
  with ``gguf_file=``); the model is built with its parameters on ``meta`` and filled tensor by
  tensor, so a float copy of a quantized weight never exists;
* a linear stored in a ggml type lowbit has a codec for (:func:`known_ggml_codecs`) becomes a
  :class:`QuantLinear` holding the file's blocks exactly (:func:`from_ggml_blocks`);
* a token embedding / LM head stored in such a type (llama-quantize's mixes) becomes a
  :class:`QuantEmbedding` / :class:`QuantLinear` (a tied head shares the embedding's codes);
* F32/F16/BF16 tensors are float in the requested dtype (other types dequantized by gguf-py);
* a linear in a type lowbit has no codec for is dequantized by gguf-py too, with a warning;
* q/k rows (and biases) are put back in HF's order: the writer's permutation moves whole
  rows, so quantized rows are un-permuted as bytes, before decoding.

Architectures: the GGUF writer's (:mod:`lowbit.io.gguf_architectures`) whose tensors map one to one
onto the transformers model's: llama (and mistral), qwen2, qwen3, gemma2 (norms read ``- 1``),
phi3. Others (GPT-2's ``Conv1D``, the MoE families' stacked experts) are loaded dequantized by
transformers, with a warning; transformers reads no Gemma (1) GGUF at all.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from lowbit.codecs import Codec, QuantizedTensor, codec_from_dict
from lowbit.errors import LowbitError
from lowbit.io.gguf_architectures import GGUF_ARCHITECTURES, GGUFArch
from lowbit.models.loaded import LoadedModel, first_line, quiet_transformers
from lowbit.modules import QuantEmbedding, QuantLinear

if TYPE_CHECKING:
    from gguf import GGUFReader, ReaderTensor

# GGUF general.architecture -> how its tensors are laid out (the writer's table, by GGUF name)
READABLE_ARCHITECTURES: dict[str, GGUFArch] = {
    GGUF_ARCHITECTURES[t].name: GGUF_ARCHITECTURES[t] for t in ("llama", "qwen2", "qwen3", "gemma2", "phi3")}
_FLOAT_TYPES = ("F32", "F16", "BF16")


def known_ggml_codecs() -> dict[str, Codec]:
    """ggml type name (``"Q4_1"``) -> lowbit codec, for every block type lowbit stores
    (the keys of :data:`lowbit.io.ggml_blocks.BLOCK_BYTES`: new types appear here by themselves)."""
    from lowbit.io import ggml_blocks

    return {name: codec_from_dict({"name": name.lower()}) for name in ggml_blocks.BLOCK_BYTES}


class UnknownGGUFArchitecture(LowbitError):
    """The file is valid GGUF, but of an architecture this reader does not know."""


def check_gguf(path: Path) -> "GGUFReader":
    """Parse a GGUF file's header and tensor table (returned as gguf-py's reader, the tensors
    memory-mapped); LowbitError naming the damaged field or tensor if it is truncated or corrupt
    (:func:`lowbit.io.gguf_layout.read_gguf_layout` walks it, bounds checked, before gguf-py)."""
    from gguf import GGUFReader

    from lowbit.io.gguf_layout import check_model_fields, read_gguf_layout

    check_model_fields(read_gguf_layout(path))
    try:
        return GGUFReader(path)
    except Exception as e:  # the walk above found nothing wrong: what gguf-py refuses is said as it says it
        raise LowbitError(f"{path}: corrupt GGUF file ({first_line(e)})") from None


def read_gguf_model(path: Path, dtype: torch.dtype = torch.float32) -> "LoadedModel":
    """The model of the GGUF file ``path``: linears of ggml types lowbit knows as packed
    :class:`QuantLinear`\\ s, every other tensor float in ``dtype`` (module docstring)."""

    path = Path(path)
    reader = check_gguf(path)
    field = reader.fields.get("general.architecture")
    arch_name = str(field.contents()) if field is not None else ""
    arch = READABLE_ARCHITECTURES.get(arch_name)
    if arch is None:
        raise UnknownGGUFArchitecture(f"{path}: lowbit's GGUF reader does not know architecture {arch_name!r} "
                                      f"(known: {', '.join(sorted(READABLE_ARCHITECTURES)) or 'none'})")
    model, tokenizer = _empty_model(path, dtype, reader)
    hf_names = _hf_names(model, arch)
    codecs = known_ggml_codecs()
    out_emb = model.get_output_embeddings()
    dequantized: dict[str, list[str]] = {}  # type name -> linears lowbit has no codec for
    for t in reader.tensors:
        hf = hf_names.get(t.name)
        if hf is None:
            continue  # e.g. llama.cpp's rope_freqs: transformers derives these from the config
        module_name, _, attr = hf.rpartition(".")
        module = model.get_submodule(module_name)
        n_head = _n_head(model.config, t.name) if arch.permute_qk else 0
        type_name = t.tensor_type.name
        is_linear = isinstance(module, nn.Linear) and module is not out_emb and attr == "weight"
        is_table = attr == "weight" and (module is model.get_input_embeddings() or module is out_emb)
        if is_table and type_name in codecs:
            # a quantized token embedding / output (llama-quantize's mixes) stays packed too
            shape = tuple(getattr(module, attr).shape)
            qt = _quantized_tensor(t, codecs[type_name], (shape[0], shape[1]), 0, path)
            if module is out_emb:
                model.set_output_embeddings(QuantLinear(qt, getattr(module, "bias", None)))
            else:
                model.set_input_embeddings(QuantEmbedding(qt))
            continue
        if is_linear and type_name in codecs:
            model.set_submodule(module_name, _quant_linear(t, codecs[type_name], module, n_head, path))
            continue
        if is_linear and type_name not in _FLOAT_TYPES:
            dequantized.setdefault(type_name, []).append(hf)
        value = _float_tensor(t, tuple(getattr(module, attr).shape), n_head, torch.float32, path)
        if arch.norm_plus_one and hf.endswith("norm.weight"):
            value = value - 1  # the writer's + 1: Gemma's RMSNorm scales by 1 + w
        _assign(module, attr, value.to(dtype))
    if dequantized:
        kinds = ", ".join(f"{k} ({len(v)})" for k, v in sorted(dequantized.items()))
        warnings.warn(f"{path}: lowbit has no codec for ggml type(s) {kinds}: those linears were "
                      "dequantized to float", stacklevel=2)
    if getattr(model.config, "tie_word_embeddings", False) and out_emb is not None:
        emb = model.get_input_embeddings()
        if isinstance(emb, QuantEmbedding):
            model.set_output_embeddings(QuantLinear(emb.qweight))
        else:
            out_emb.weight = emb.weight
    missing = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.device.type == "meta"]
    if missing:
        raise LowbitError(f"{path}: tensors missing from the GGUF file: {missing[:5]}")
    model.eval()
    return LoadedModel(model, tokenizer, str(path), path)


def _empty_model(path: Path, dtype: torch.dtype, reader: "GGUFReader") -> tuple[nn.Module, object]:
    """The model of the file's config with parameters on ``meta`` (buffers real), and its tokenizer."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


    quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        _complete_config(config, reader)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # transformers raises many types for metadata it cannot convert
        raise LowbitError(f"cannot build the model of GGUF file {path}: {first_line(e)}") from None
    return model, tokenizer


def _complete_config(config: object, reader: "GGUFReader") -> None:
    """What transformers' GGUF config conversion leaves at its defaults though the file says it:
    the vocabulary size (the embedding's rows), the head size (``attention.key_length``; Qwen3's
    default is 128) and, for Gemma 2, the query scale llama.cpp uses (1/sqrt(head size))."""
    arch = str(reader.fields["general.architecture"].contents())
    field = lambda k: reader.fields[k].contents() if k in reader.fields else None  # noqa: E731
    emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if emb is not None:
        config.vocab_size = int(emb.shape[1])  # type: ignore[attr-defined]
    head_dim = field(f"{arch}.attention.key_length")
    if head_dim is not None and hasattr(config, "head_dim"):
        config.head_dim = int(head_dim)  # type: ignore[attr-defined]
        if arch == "gemma2":
            config.query_pre_attn_scalar = int(head_dim)  # type: ignore[attr-defined]
    pad = getattr(config, "pad_token_id", None)
    if isinstance(pad, int) and pad >= config.vocab_size:  # type: ignore[attr-defined]
        config.pad_token_id = None  # type: ignore[attr-defined]


def _hf_names(model: nn.Module, arch: GGUFArch) -> dict[str, str]:
    """GGUF tensor name -> HF parameter name, by gguf-py's tensor-name map (as the writer)."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.name.upper()], model.config.num_hidden_layers)
    out: dict[str, str] = {}
    for hf in model.state_dict(keep_vars=True):
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is not None:
            out.setdefault(name, hf)
    return out


def _n_head(config: object, gguf_name: str) -> int:
    """Heads whose rotary halves llama.cpp interleaves in this tensor's rows (0: none)."""
    heads = config.num_attention_heads  # type: ignore[attr-defined]
    if ".attn_q." in gguf_name:
        return heads
    if ".attn_k." in gguf_name:
        return getattr(config, "num_key_value_heads", None) or heads
    return 0


def unpermute_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order -> HF's: the inverse of the writer's ``_permute_rows``.
    Moves whole rows of ``t`` ``(rows, ...)``, so it applies to float rows and to rows of
    ggml block bytes alike."""
    rows = t.shape[0]
    return t.reshape(n_head, rows // n_head // 2, 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _rows_cols(t: "ReaderTensor") -> tuple[int, int]:
    cols = int(t.shape[0])  # ggml's ne[0]: values per row
    return int(t.n_elements) // cols, cols


def _quantized_tensor(t: "ReaderTensor", codec: Codec, shape: tuple[int, int], n_head: int,
                      path: Path) -> QuantizedTensor:
    """The blocks of ``t`` as a QuantizedTensor of the HF ``shape`` ``(rows, cols)``."""
    from lowbit.io.ggml_blocks import from_ggml_blocks

    rows, cols = _rows_cols(t)
    if (rows, cols) != shape:
        raise LowbitError(f"{path}: {t.name} has shape {(rows, cols)}, the model expects {shape}")
    raw = torch.from_numpy(np.array(t.data, dtype=np.uint8).reshape(rows, -1))  # a private copy, not the memmap
    if n_head:
        raw = unpermute_rows(raw, n_head)
    try:
        return from_ggml_blocks(raw, codec, (rows, cols))  # type: ignore[arg-type]
    except ValueError as e:
        raise LowbitError(f"{path}: {t.name}: {e}") from None


def _quant_linear(t: "ReaderTensor", codec: Codec, old: nn.Linear, n_head: int, path: Path) -> QuantLinear:
    q = QuantLinear(_quantized_tensor(t, codec, (old.out_features, old.in_features), n_head, path))
    if old.bias is not None:
        q.bias = old.bias  # still meta, or already read: the bias tensor may come first in the file
    return q


def _float_tensor(t: "ReaderTensor", shape: tuple[int, ...], n_head: int, dtype: torch.dtype,
                  path: Path) -> torch.Tensor:
    """The tensor ``t`` as float ``dtype`` of the HF ``shape``, dequantized by gguf-py if needed."""
    from gguf import quants

    if int(t.n_elements) != int(np.prod(shape)):
        raise LowbitError(f"{path}: {t.name} has {int(t.n_elements)} values, the model expects shape {shape}")
    try:
        values = quants.dequantize(np.asarray(t.data), t.tensor_type)
    except NotImplementedError:
        raise LowbitError(f"{path}: {t.name} is stored as ggml type {t.tensor_type.name}, "
                          "which neither lowbit nor gguf-py can decode") from None
    out = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape)
    if n_head:
        out = unpermute_rows(out, n_head)
    return out.to(dtype)


def _assign(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value

