"""Write a quantized Llama-family model as one GGUF file that llama.cpp runs.

What goes in (gguf-py writes the bytes):

* metadata: the architecture's hyper-parameters, ``general.file_type`` and the tokenizer
  (BPE vocabulary, token types, merges, special ids, the pre-tokenizer name, chat template);
* tensors under llama.cpp's names (gguf-py's tensor-name map): linears quantized with one of
  llama.cpp's block codecs as their ggml bytes; other linears are refused (their grid has no
  GGUF type); norms in F32, embeddings, an untied LM head and unquantized linears in F16;
* q/k weights with their rows permuted the way llama.cpp expects for Llama-family RoPE (HF
  checkpoints interleave the two rotary halves differently): whole rows move, so quantized
  blocks are permuted as bytes, unchanged.

The file is written to ``PATH.tmp`` and renamed, so a failure never leaves a partial file.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from lowbit.codecs import QuantizedTensor, codec_from_dict
from lowbit.codecs.ggml_legacy import GGMLBlockCodec
from lowbit.errors import LowbitError
from lowbit.io.folder import atomic_file
from lowbit.io.ggml_blocks import to_ggml_blocks
from lowbit.modules import QuantLinear

if TYPE_CHECKING:
    from lowbit.models.loading import LoadedModel


@dataclass(frozen=True)
class GGUFArch:
    name: str  # llama.cpp's architecture name
    permute_qk: bool  # Llama-style rotary halves: q/k rows reordered for llama.cpp


# transformers model_type -> GGUF architecture; Mistral checkpoints run as "llama" in llama.cpp.
GGUF_ARCHITECTURES = {
    "llama": GGUFArch("llama", permute_qk=True),
    "mistral": GGUFArch("llama", permute_qk=True),
}

# HF tokenizer.json pre-tokenizer (as canonical JSON) -> llama.cpp's pre-tokenizer name.
_PRE_TOKENIZERS = {
    json.dumps({"add_prefix_space": False, "trim_offsets": True, "type": "ByteLevel", "use_regex": True},
               sort_keys=True): "gpt-2",
    json.dumps({"pretokenizers": [{"individual_digits": True, "type": "Digits"},
                                  {"add_prefix_space": False, "trim_offsets": True, "type": "ByteLevel",
                                   "use_regex": True}], "type": "Sequence"}, sort_keys=True): "smollm",
}

# llama.cpp's token types
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


def check_gguf_architecture(model: nn.Module) -> GGUFArch:
    """The GGUF architecture of a transformers model, or a LowbitError naming the known ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = GGUF_ARCHITECTURES.get(model_type or "")
    if arch is None:
        raise LowbitError(f"the GGUF writer does not know architecture {model_type!r}; "
                          f"known: {', '.join(sorted(GGUF_ARCHITECTURES))}")
    return arch


def save_gguf(loaded: "LoadedModel", path: Path, overwrite: bool = False, dense: str = "f16") -> Path:
    """Write ``loaded`` (quantized in place by lowbit, or dense) as the GGUF file ``path``;
    ``dense``: ``f16`` or ``f32``, the type of 2-D tensors that are not quantized (``f32`` makes
    the float source that llama-quantize expects)."""
    if dense not in ("f16", "f32"):
        raise ValueError(f"dense must be f16 or f32, got {dense!r}")
    import gguf

    model, cfg = loaded.model, loaded.model.config
    arch = check_gguf_architecture(model)
    path = Path(path)
    if path.exists() and not overwrite:
        raise LowbitError(f"{path} exists (pass --overwrite to replace it)")
    tensors = list(_gguf_tensors(model, arch, dense == "f32"))  # all checks before anything is written
    with gguf_file(path, arch.name, overwrite) as w:
        _add_hparams(w, arch, cfg)
        _add_tokenizer(w, loaded.tokenizer, int(cfg.vocab_size))
        mix = getattr(getattr(loaded.model, "lowbit_recipe", None), "gguf_mix", None)
        w.add_file_type(int(gguf.LlamaFileType[f"MOSTLY_{mix.upper()}"]) if mix else _file_type(tensors))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, data, qtype in tensors:
            w.add_tensor(name, data, raw_dtype=qtype)
    return path


@contextlib.contextmanager
def gguf_file(path: Path, arch: str, overwrite: bool = False) -> Iterator["gguf.GGUFWriter"]:  # type: ignore[name-defined]
    """A GGUFWriter for ``arch`` on a temporary file beside ``path``: when the block ends without
    an error, its header, fields and tensors are written and the file becomes ``path``; else the
    writer is closed and the temporary removed (:func:`lowbit.io.folder.atomic_file`)."""
    import gguf

    with atomic_file(path, overwrite) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        try:
            yield w
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()


def _add_hparams(w: "gguf.GGUFWriter", arch: GGUFArch, cfg: object) -> None:  # type: ignore[name-defined]
    g = lambda k, d=None: getattr(cfg, k, d)  # noqa: E731
    heads = g("num_attention_heads")
    head_dim = g("head_dim") or g("hidden_size") // heads
    w.add_name(str(g("_name_or_path") or arch.name))
    w.add_context_length(g("max_position_embeddings"))
    w.add_embedding_length(g("hidden_size"))
    w.add_block_count(g("num_hidden_layers"))
    w.add_feed_forward_length(g("intermediate_size"))
    w.add_head_count(heads)
    w.add_head_count_kv(g("num_key_value_heads") or heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    rope = g("rope_parameters") or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    w.add_rope_freq_base(float(theta or g("rope_theta") or 10000.0))
    if isinstance(rope, dict) and rope.get("rope_type", "default") != "default":
        raise LowbitError(f"the GGUF writer does not handle rope_type {rope['rope_type']!r} yet")
    w.add_layer_norm_rms_eps(float(g("rms_norm_eps")))
    w.add_vocab_size(g("vocab_size"))


def _add_tokenizer(w: "gguf.GGUFWriter", tokenizer: object, n_vocab: int) -> None:  # type: ignore[name-defined]
    """The tokenizer's BPE vocabulary, padded with unused tokens to the model's ``n_vocab``
    embedding rows (llama.cpp checks the two agree)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LowbitError("the GGUF writer needs a fast (tokenizers) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model["type"] != "BPE":
        raise LowbitError(f"the GGUF writer handles BPE tokenizers only, not {model['type']}")
    pre_key = json.dumps(spec.get("pre_tokenizer"), sort_keys=True)
    pre = _PRE_TOKENIZERS.get(pre_key)
    if pre is None:
        raise LowbitError(f"the GGUF writer does not know this pre-tokenizer: {pre_key}")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    for i, t in added.items():
        vocab[t["content"]] = i
    n = max(vocab.values()) + 1
    if n > n_vocab:
        raise LowbitError(f"the tokenizer has {n} tokens but the model only {n_vocab} embedding rows")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    for text, i in vocab.items():
        tokens[i] = text
    types = [(_CONTROL if added[i]["special"] else _USER_DEFINED) if i in added else _NORMAL for i in range(n)]
    types += [_UNUSED] * (n_vocab - n)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for attr, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                      ("unk_token_id", w.add_unk_token_id), ("pad_token_id", w.add_pad_token_id)):
        tid = getattr(tokenizer, attr, None)
        if tid is not None:
            add(int(tid))
    # llama.cpp adds BOS only when told; the HF tokenizer's own post-processor decides here
    probe = tokenizer("a")["input_ids"]  # type: ignore[operator]
    bos = getattr(tokenizer, "bos_token_id", None)
    w.add_add_bos_token(bool(probe) and bos is not None and probe[0] == bos)
    template = getattr(tokenizer, "chat_template", None)
    if template:
        w.add_chat_template(template)


def tensor_name_map(model: nn.Module, arch_name: str) -> "gguf.TensorNameMap":  # type: ignore[name-defined]
    """gguf-py's map from ``model``'s HF tensor names to llama.cpp's for the GGUF architecture
    ``arch_name``: ``get_name("model.layers.0.self_attn.q_proj.weight", try_suffixes=(".weight",))``
    is ``blk.0.attn_q.weight``."""
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch_name.upper()], model.config.num_hidden_layers)


def _gguf_tensors(model: nn.Module, arch: GGUFArch, dense_f32: bool):  # type: ignore[no-untyped-def]
    """(GGUF name, numpy data, raw ggml type or None) for every tensor the file holds."""
    cfg = model.config
    names = tensor_name_map(model, arch.name)
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    done: set[str] = set()
    for module_name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            items = [(f"{module_name}.weight", module)]
            if module.bias is not None:
                items.append((f"{module_name}.bias", module.bias))
        else:
            items = [(f"{module_name}.{k}" if module_name else k, p)
                     for k, p in module.named_parameters(recurse=False)]
        for hf_name, value in items:
            if hf_name in done:
                continue
            done.add(hf_name)
            if tied and hf_name == "lm_head.weight":
                continue
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise LowbitError(f"no GGUF name for tensor {hf_name}")
            n_head = heads if name.endswith("attn_q.weight") else kv_heads if name.endswith("attn_k.weight") else 0
            yield (name, *_tensor_data(hf_name, value, n_head if arch.permute_qk else 0, dense_f32))


def _tensor_data(hf_name: str, value: object, n_head: int, dense_f32: bool) -> tuple[np.ndarray, object]:
    import gguf

    if isinstance(value, QuantLinear):
        qt: QuantizedTensor = value.qweight
        codec = codec_from_dict(qt.codec)
        if not isinstance(codec, GGMLBlockCodec):
            raise LowbitError(f"{hf_name}: codec {qt.codec['name']!r} has no GGUF type "
                              "(use a GGUF block type: q4_0, q4_1, q5_0, q5_1, q8_0, q2_k .. q6_k)")
        raw = to_ggml_blocks(qt, codec)  # (rows, row bytes)
        if n_head:
            raw = _permute_rows(raw, n_head)
        return raw.numpy(), gguf.GGMLQuantizationType[codec.ggml_type]
    t = value.detach().to(torch.float32)  # type: ignore[union-attr]
    if n_head:
        t = _permute_rows(t, n_head)
    if t.dim() == 1 or dense_f32:
        return t.numpy(), None
    return t.to(torch.float16).numpy(), None


def _permute_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's q/k row order -> llama.cpp's: per head, the two rotary halves interleaved."""
    rows = t.shape[0]
    return t.reshape(n_head, 2, rows // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _file_type(tensors: list) -> int:  # type: ignore[type-arg]
    """``general.file_type``: the most common quantized type (llama.cpp's mostly-X convention)."""
    import gguf

    counts: dict[str, int] = {}
    for _, _, qtype in tensors:
        if qtype is not None:
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
    if not counts:
        return int(gguf.LlamaFileType.ALL_F32 if all(d.dtype == np.float32 for _, d, _ in tensors)
                   else gguf.LlamaFileType.MOSTLY_F16)
    top = max(counts, key=lambda k: counts[k])
    return int(gguf.LlamaFileType[f"MOSTLY_{_K_FILE_TYPES.get(top, top)}"])


# a k-quant type as the file type of llama.cpp's mix that uses it most
_K_FILE_TYPES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
