"""Per-architecture facts, one small table entry per family instead of ``if`` chains.

``steps`` lists the linears of a decoder block in execution order, grouped by the input they
share (the sequential sub-steps that GPTQ-style algorithms quantize in turn): e.g. Llama's
q/k/v read the same normed input, o_proj reads the attention output.

``scale_sources`` names, per step, the module whose output *is* that step's input and can absorb
a per-channel scale exactly (AWQ/SmoothQuant fold ``1/s`` into it): the norm before q/k/v, the
linear before another linear when nothing but a positively homogeneous op lies between them
(v_proj -> o_proj through attention, up_proj -> down_proj through the gated product); None when
no such module exists (fused projections, a GELU in between). ``norm_plus_one``: the norms
compute ``x * (1 + weight)`` (Gemma), so a fold must rewrite ``weight`` as ``(1 + w) / s - 1``.
"""

from __future__ import annotations

from collections.abc import Iterator

from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class Architecture:
    family: str
    blocks: str  # dotted path of the ModuleList of decoder blocks
    steps: tuple[tuple[str, ...], ...]  # linears of a block, grouped by shared input, in order
    embeddings: str
    lm_head: str
    scale_sources: tuple[str | None, ...] = ()
    norm_plus_one: bool = False
    # Submodules of a block whose output is their last linear's output (attention -> o_proj,
    # MLP -> down_proj): once that linear's input is final, the runner replays them from it.
    replayed: tuple[str, ...] = ()
    experts: str | None = None  # the MoE experts module of a block; step names with "{e}" expand per expert

    def __post_init__(self) -> None:
        if self.scale_sources and len(self.scale_sources) != len(self.steps):
            raise ValueError(f"{self.family}: one scale source per step")

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        blocks = model.get_submodule(self.blocks)
        if not isinstance(blocks, nn.ModuleList):
            raise LowbitError(f"{self.family}: {self.blocks} is not a list of blocks")
        return blocks

    def linear_names(self) -> list[str]:
        return [name for step in self.steps for name in step]

    def dense_block_linears(self, model: nn.Module) -> "Iterator[tuple[str, nn.Module, str]]":
        """(full name, block, name in the block) of every linear of the decoder blocks that is
        not an MoE expert, in block and step order."""
        for i, block in enumerate(self.block_list(model)):
            for step in self.steps:
                for n in step:
                    if "{e}" not in n:
                        yield f"{self.blocks}.{i}.{n}", block, n

    def block_steps(self, block: nn.Module) -> list[tuple[str, ...]]:
        """``steps`` for one block, with ``{e}`` expanded over its experts (whose fused
        parameters are first split into one module per expert, see :mod:`lowbit.modules.experts`)."""
        if self.experts is None:
            return list(self.steps)
        from lowbit.modules.experts import unfuse_experts

        experts = unfuse_experts(block, self.experts)
        if experts is None:
            raise LowbitError(f"{self.family}: block has no fused experts module at {self.experts}")
        return [tuple(n.format(e=e) for n in step for e in range(len(experts))) if "{e}" in "".join(step) else step
                for step in self.steps]


_LLAMA_STEPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


_LLAMA_SOURCES = ("input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj")


def _llama_like(family: str, norm_plus_one: bool = False, sources: tuple[str | None, ...] = _LLAMA_SOURCES,
                ) -> Architecture:
    return Architecture(
        family, "model.layers", _LLAMA_STEPS, "model.embed_tokens", "lm_head", sources, norm_plus_one,
        replayed=("self_attn", "mlp"),
    )


ARCHITECTURES: dict[str, Architecture] = {
    **{f: _llama_like(f) for f in ("llama", "mistral", "qwen2", "qwen3")},
    "gemma": _llama_like("gemma", norm_plus_one=True),
    # Gemma 2 normalizes the attention's output (post_attention_layernorm) and then the MLP's
    # input (pre_feedforward_layernorm): the latter is what gate/up read.
    "gemma2": _llama_like("gemma2", norm_plus_one=True, sources=(
        "input_layernorm", "self_attn.v_proj", "pre_feedforward_layernorm", "mlp.up_proj")),
    "phi3": Architecture(
        "phi3",
        "model.layers",
        (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
        "model.embed_tokens",
        "lm_head",
        ("input_layernorm", None, "post_attention_layernorm", None),
        replayed=("self_attn", "mlp"),
    ),
    "opt": Architecture(
        "opt",
        "model.decoder.layers",
        (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",), ("fc2",)),
        "model.decoder.embed_tokens",
        "lm_head",
        # fc1 -> ReLU -> fc2: ReLU commutes with a positive scale.
        ("self_attn_layer_norm", "self_attn.v_proj", "final_layer_norm", "fc1"),
        replayed=("self_attn",),
    ),
    **{f: Architecture(
        f,
        "model.layers",
        (_LLAMA_STEPS[0], _LLAMA_STEPS[1], ("mlp.experts.{e}.gate_up_proj",), ("mlp.experts.{e}.down_proj",)),
        "model.embed_tokens",
        "lm_head",
        # The norm before the experts also feeds the router, and the experts do not share one input
        # tensor: no AWQ scale there.
        ("input_layernorm", "self_attn.v_proj", None, None),
        replayed=("self_attn",),
        experts="mlp.experts",
    ) for f in ("mixtral", "qwen3_moe", "olmoe")},
    # GPT-2 stores its linears as transformers' Conv1D, weight (in, out); the pipeline transposes.
    "gpt2": Architecture(
        "gpt2",
        "transformer.h",
        (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        "transformer.wte",
        "lm_head",
        ("ln_1", None, "ln_2", None),
        replayed=("attn", "mlp"),
    ),
}


def architecture_of(model: nn.Module) -> Architecture:
    """The table entry for a transformers model, by ``config.model_type``."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    arch = ARCHITECTURES.get(model_type or "")
    if arch is None:
        raise LowbitError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    if arch.family == "opt" and not getattr(config, "do_layer_norm_before", True):
        # post-LN OPT (opt-350m) normalizes each sub-layer's output, not its input: no norm
        # feeds q/k/v or fc1, so none can absorb their scales (or be skipped in a replay)
        arch = replace(arch, scale_sources=tuple(None if s and "layer_norm" in s else s for s in arch.scale_sources))
    return arch


def context_length(model: nn.Module) -> int | None:
    """The longest sequence ``model`` was trained for, in tokens (its config's
    ``max_position_embeddings``, GPT-2's ``n_positions``), or None where the config names none."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def cache_argument(model: nn.Module, method: str = "forward") -> str:
    """``method``'s name for the KV cache: ``cache`` in newer transformers (where
    ``past_key_values`` is deprecated), else ``past_key_values``."""
    import inspect

    params = inspect.signature(getattr(type(model), method)).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def returned_cache(out: Any) -> Any:
    """The updated KV cache of a forward's output (``cache`` or ``past_key_values``)."""
    return out.get("cache") if "cache" in out else out.past_key_values


def attention_head_dim(model: nn.Module) -> int:
    """Values per attention head of ``model`` (its text config's ``head_dim``, else hidden size
    over heads)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def check_context(model: nn.Module, tokens: int, what: str) -> None:
    """LowbitError when ``what`` (e.g. ``--seq-len 100000``) asks for sequences of ``tokens``
    tokens, more than ``model``'s context: positions it never saw make the numbers meaningless."""
    n = context_length(model)
    if n is not None and tokens > n:
        raise LowbitError(f"{what}: sequences of {tokens} tokens, but the model's context is {n} tokens")
