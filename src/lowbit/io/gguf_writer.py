"""Write a model lowbit quantized (or a dense one) as one GGUF file that llama.cpp runs.

What goes in (gguf-py writes the bytes), as llama.cpp's own converter writes it for each family
(:mod:`lowbit.io.gguf_architectures`: llama, mistral, mixtral, qwen2, qwen3, qwen3-moe, olmoe,
gemma, gemma2, phi3, gpt2):

* metadata: the family's hyper-parameters, ``general.file_type`` and the tokenizer
  (:mod:`lowbit.io.gguf_tokenizer`: byte-level or SentencePiece BPE, special ids, chat template);
* tensors under llama.cpp's names (gguf-py's tensor-name map): linears quantized with one of
  llama.cpp's block codecs as their ggml bytes; other quantized linears are refused (their grid
  has no GGUF type); the experts of an MoE block stacked into one 3-D tensor per projection;
  norms, biases, 1-D tensors, routers and position embeddings in F32, and every other dense
  tensor in the recipe's dense dtype (F16 by default, or BF16/F32: the ``gguf-f16`` ... presets);
* the family's differences from the HF checkpoint: q/k rows permuted for Llama-style rotary
  halves, Gemma's norms ``+ 1``, GPT-2's ``Conv1D`` weights transposed. Whole rows move, so
  quantized blocks are permuted as bytes, unchanged.

The file is written to a hidden temporary name and renamed, so a failure never leaves a part.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from lowbit.codecs import QuantizedTensor, codec_from_dict
from lowbit.codecs.ggml_legacy import GGMLBlockCodec
from lowbit.errors import LowbitError
from lowbit.io.folder import atomic_file
from lowbit.io.gguf_architectures import GGUFArch, gguf_architecture
from lowbit.io.gguf_tokenizer import add_tokenizer
from lowbit.io.ggml_blocks import to_ggml_blocks
from lowbit.modules import QuantLinear

if TYPE_CHECKING:
    from lowbit.models.loaded import LoadedModel


def check_gguf_architecture(model: nn.Module) -> GGUFArch:
    """The GGUF architecture of a transformers model, or a LowbitError naming the known ones."""
    return gguf_architecture(getattr(getattr(model, "config", None), "model_type", None))


class _DryRun:
    """A GGUFWriter that writes nothing: the metadata code runs against it to find, before any
    work, what it would refuse."""

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return lambda *args, **kwargs: None


def check_gguf_writable(loaded: "LoadedModel") -> GGUFArch:
    """LowbitError, before any work, unless ``loaded`` can be written as GGUF: its architecture,
    its hyper-parameters (what llama.cpp would compute otherwise) and its tokenizer (a byte-level
    BPE vocabulary with a pre-tokenizer llama.cpp knows, or a SentencePiece BPE one)."""
    arch = check_gguf_architecture(loaded.model)
    cfg = loaded.model.config
    arch.hparams(_DryRun(), cfg.to_dict())
    arch.extra_tensors(cfg.to_dict())
    add_tokenizer(_DryRun(), loaded.tokenizer, int(cfg.vocab_size))
    return arch


def save_gguf(loaded: "LoadedModel", path: Path, overwrite: bool = False, dense: str | None = None) -> Path:
    """Write ``loaded`` (quantized in place by lowbit, or dense) as the GGUF file ``path``;
    ``dense``: ``f32``, ``f16`` or ``bf16``, the type of 2-D tensors that are not quantized
    (default: the recipe's ``dense_dtype``, F16 for a model no recipe quantized; ``f32`` makes
    the float source that llama-quantize expects)."""
    import gguf

    model, cfg = loaded.model, loaded.model.config
    recipe = getattr(model, "lowbit_recipe", None)
    dense = dense or _DENSE_TYPES.get(recipe.dense_dtype if recipe is not None else "float16")
    if dense not in _DENSE_TYPES.values():
        raise ValueError(f"dense must be one of {', '.join(_DENSE_TYPES.values())}, got {dense!r}")
    arch = check_gguf_architecture(model)
    path = Path(path)
    if path.exists() and not overwrite:
        raise LowbitError(f"{path} exists (pass --overwrite to replace it)")
    tensors = list(_gguf_tensors(model, arch, dense))  # all checks before anything is written
    tensors += [(name, data, None) for name, data in arch.extra_tensors(cfg.to_dict())]
    with gguf_file(path, arch.name, overwrite) as w:
        if getattr(cfg, "_name_or_path", None):  # llama.cpp keys tokenizer fixes on it (a name with "phi3" in it...)
            w.add_name(str(cfg._name_or_path))
        arch.hparams(w, cfg.to_dict())
        add_tokenizer(w, loaded.tokenizer, int(cfg.vocab_size))
        mix = getattr(recipe, "gguf_mix", None)
        w.add_file_type(int(gguf.LlamaFileType[f"MOSTLY_{mix.upper()}"]) if mix else _file_type(tensors, dense))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, data, qtype in tensors:
            w.add_tensor(name, data, raw_dtype=qtype)
    return path


_DENSE_TYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


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


def tensor_name_map(model: nn.Module, arch_name: str) -> "gguf.TensorNameMap":  # type: ignore[name-defined]
    """gguf-py's map from ``model``'s HF tensor names to llama.cpp's for the GGUF architecture
    ``arch_name``: ``get_name("model.layers.0.self_attn.q_proj.weight", try_suffixes=(".weight",))``
    is ``blk.0.attn_q.weight``."""
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch_name.upper()], model.config.num_hidden_layers)


def _gguf_tensors(model: nn.Module, arch: GGUFArch, dense: str):  # type: ignore[no-untyped-def]
    """(GGUF name, numpy data, raw ggml type or None) for every tensor the file holds."""
    from lowbit.models import architecture_of

    cfg = model.config
    names = tensor_name_map(model, arch.name)
    heads = getattr(cfg, "num_attention_heads", None)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    lowbit_arch = architecture_of(model)
    experts_at = lowbit_arch.experts
    done: set[str] = set()
    if experts_at is not None:
        for i, block in enumerate(lowbit_arch.block_list(model)):
            prefix = f"{lowbit_arch.blocks}.{i}.{experts_at}"
            for kind, data, qtype in _expert_tensors(block.get_submodule(experts_at), prefix, dense):
                name = names.get_name(f"{prefix}.{kind}.weight", try_suffixes=(".weight",))
                if name is None:
                    raise LowbitError(f"no GGUF name for the experts' {kind} of {prefix}")
                yield name, data, qtype
            done.update(f"{prefix}.{n}" for n, _ in block.get_submodule(experts_at).named_parameters())
            done.update(f"{prefix}.{n}.weight" for n, m in block.get_submodule(experts_at).named_modules()
                        if isinstance(m, QuantLinear))
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
            if not isinstance(value, QuantLinear):
                value = value.detach().to(torch.float32)
                if arch.norm_plus_one and hf_name.endswith("norm.weight"):
                    value = value + 1  # llama.cpp's RMSNorm scales by w, Gemma's by 1 + w
                if arch.conv1d and type(module).__name__ == "Conv1D" and hf_name.endswith(".weight"):
                    value = value.t()  # Conv1D stores (in, out)
            yield (name, *_tensor_data(hf_name, value, n_head if arch.permute_qk else 0, _dense_type(name, value, dense)))


def _dense_type(name: str, value: object, dense: str) -> str:
    """llama.cpp's converter's rule: 1-D tensors, norms, biases, routers and position embeddings
    in F32; every other dense tensor in ``dense``."""
    if not isinstance(value, torch.Tensor):
        return dense
    if value.dim() <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") or \
            ".ffn_gate_inp." in name or name.startswith("position_embd."):
        return "f32"
    return dense


def _expert_tensors(experts: nn.Module, prefix: str, dense: str):  # type: ignore[no-untyped-def]
    """``(kind, data, ggml type)`` of the stacked ``gate_proj``, ``up_proj`` and ``down_proj``
    of an MoE block's experts: fused (dense, as transformers holds them) or one module per
    expert (:class:`lowbit.modules.experts.UnfusedExperts`, quantized or not); each
    ``(E, rows, cols)``, as llama.cpp's ``ffn_{gate,up,down}_exps``."""
    from lowbit.modules.experts import UnfusedExperts

    if not isinstance(experts, UnfusedExperts):  # fused: gate_up (E, 2I, H), down (E, H, I)
        gate_up = experts.gate_up_proj.detach().to(torch.float32)
        half = gate_up.shape[1] // 2
        for kind, t in (("gate_proj", gate_up[:, :half]), ("up_proj", gate_up[:, half:]),
                        ("down_proj", experts.down_proj.detach().to(torch.float32))):
            yield (kind, *_tensor_data(f"{prefix}.{kind}", t.contiguous(), 0, dense))
        return
    per_kind: dict[str, list[tuple[np.ndarray, object]]] = {"gate_proj": [], "up_proj": [], "down_proj": []}
    for e, expert in enumerate(experts):
        for hf, module in (("gate_up_proj", expert.gate_up_proj), ("down_proj", expert.down_proj)):
            value = module if isinstance(module, QuantLinear) else module.weight.detach().to(torch.float32)
            data, qtype = _tensor_data(f"{prefix}.{e}.{hf}", value, 0, dense)
            if hf == "gate_up_proj":  # rows: gate then up; ggml rows are whole blocks, so bytes split too
                half = data.shape[0] // 2
                per_kind["gate_proj"].append((data[:half], qtype))
                per_kind["up_proj"].append((data[half:], qtype))
            else:
                per_kind["down_proj"].append((data, qtype))
    for kind, parts in per_kind.items():
        types = {str(q) for _, q in parts}
        if len(types) > 1:
            raise LowbitError(f"{prefix}: the experts' {kind} are stored in different GGUF types ({', '.join(sorted(types))}); "
                              "llama.cpp stacks them into one tensor of one type")
        yield kind, np.stack([d for d, _ in parts]), parts[0][1]


def _tensor_data(hf_name: str, value: object, n_head: int, dense: str) -> tuple[np.ndarray, object]:
    """The bytes of one tensor: a quantized linear's ggml blocks, or a float tensor in ``dense``
    (``f32``, ``f16``, ``bf16``; raw ggml type None for F32/F16, which gguf-py infers)."""
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
    if dense == "f32":
        return t.contiguous().numpy(), None
    if dense == "bf16":  # numpy has no bfloat16: the raw bytes, two per value
        raw = t.to(torch.bfloat16).contiguous().view(torch.uint8).reshape(*t.shape[:-1], 2 * t.shape[-1])
        return raw.numpy(), gguf.GGMLQuantizationType.BF16
    return t.to(torch.float16).numpy(), None


def _permute_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's q/k row order -> llama.cpp's: per head, the two rotary halves interleaved."""
    rows = t.shape[0]
    return t.reshape(n_head, 2, rows // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _file_type(tensors: list, dense: str) -> int:  # type: ignore[type-arg]
    """``general.file_type``: the most common quantized type (llama.cpp's mostly-X convention),
    else the dense type's."""
    import gguf

    counts: dict[str, int] = {}
    for _, _, qtype in tensors:
        if qtype is not None and qtype.name != "BF16":
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
    if not counts:
        return int({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                    "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dense])
    top = max(counts, key=lambda k: counts[k])
    return int(gguf.LlamaFileType[f"MOSTLY_{_K_FILE_TYPES.get(top, top)}"])


# a k-quant type as the file type of llama.cpp's mix that uses it most
_K_FILE_TYPES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
