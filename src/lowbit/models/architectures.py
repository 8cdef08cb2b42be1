"""Per-architecture facts, one small table entry per family instead of ``if`` chains.

``steps`` lists the linears of a decoder block in execution order, grouped by the input they
share (the sequential sub-steps that GPTQ-style algorithms quantize in turn): e.g. Llama's
q/k/v read the same normed input, o_proj reads the attention output.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class Architecture:
    family: str
    blocks: str  # dotted path of the ModuleList of decoder blocks
    steps: tuple[tuple[str, ...], ...]  # linears of a block, grouped by shared input, in order
    embeddings: str
    lm_head: str

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        blocks = model.get_submodule(self.blocks)
        if not isinstance(blocks, nn.ModuleList):
            raise LowbitError(f"{self.family}: {self.blocks} is not a list of blocks")
        return blocks

    def linear_names(self) -> list[str]:
        return [name for step in self.steps for name in step]


_LLAMA_STEPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


def _llama_like(family: str) -> Architecture:
    return Architecture(family, "model.layers", _LLAMA_STEPS, "model.embed_tokens", "lm_head")


ARCHITECTURES: dict[str, Architecture] = {
    **{f: _llama_like(f) for f in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")},
    "phi3": Architecture(
        "phi3",
        "model.layers",
        (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
        "model.embed_tokens",
        "lm_head",
    ),
    "opt": Architecture(
        "opt",
        "model.decoder.layers",
        (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",), ("fc2",)),
        "model.decoder.embed_tokens",
        "lm_head",
    ),
    # GPT-2 stores its linears as transformers' Conv1D, weight (in, out); the pipeline transposes.
    "gpt2": Architecture(
        "gpt2",
        "transformer.h",
        (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        "transformer.wte",
        "lm_head",
    ),
}


def architecture_of(model: nn.Module) -> Architecture:
    """The table entry for a transformers model, by ``config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = ARCHITECTURES.get(model_type or "")
    if arch is None:
        raise LowbitError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return arch
