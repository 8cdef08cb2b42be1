"""Mixture-of-experts blocks: one module per expert computes what transformers' fused experts
compute; unrouted experts fall back to RTN, or get statistics when all experts are forced;
quantized MoE models round-trip through lowbit's format."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lowbit.calibration import CalibrationSet
from lowbit.models import LoadedModel, architecture_of
from lowbit.modules import QuantLinear
from lowbit.modules.experts import UnfusedExperts, unfuse_experts
from lowbit.pipeline import quantize_model
from lowbit.recipes import Recipe


def tiny_moe(family: str = "mixtral", seed: int = 0) -> torch.nn.Module:
    import transformers as tf

    from lowbit.models.loaded import quiet_transformers

    quiet_transformers()
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                  max_position_embeddings=128, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    if family == "mixtral":
        cfg = tf.MixtralConfig(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, **common)
    else:
        cfg = tf.Qwen3MoeConfig(moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2, head_dim=16,
                                decoder_sparse_step=1, mlp_only_layers=[], **common)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def tokens(n: int = 6, length: int = 24) -> torch.Tensor:
    return torch.randint(2, 256, (n, length), generator=torch.Generator().manual_seed(3))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_unfused_experts_compute_the_same(family: str) -> None:
    model = tiny_moe(family)
    ids = tokens()
    before = logits(model, ids)
    arch = architecture_of(model)
    for block in arch.block_list(model):
        assert isinstance(unfuse_experts(block, arch.experts), UnfusedExperts)
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)
    experts = model.model.layers[0].mlp.experts
    experts.all_experts = True  # every expert on every token, combined by the same routing
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)


class FirstTwoExperts(torch.nn.Module):
    """A router that sends every token to experts 0 and 1 only (so experts 2 and 3 get none)."""

    def __init__(self, router: torch.nn.Module) -> None:
        super().__init__()
        self.router = router

    def forward(self, hidden: torch.Tensor):  # type: ignore[no-untyped-def]
        logits, weights, index = self.router(hidden)
        return logits, weights, torch.tensor([0, 1]).expand_as(index)


def starve_experts(model: torch.nn.Module) -> None:
    for block in model.model.layers:
        block.mlp.gate = FirstTwoExperts(block.mlp.gate)


def recipe(all_experts: bool = False) -> Recipe:
    return Recipe.from_dict({
        "codec": {"name": "int", "bits": 4, "group_size": 32},
        "algorithm": {"name": "gptq"},
        "calibration": {"all_experts": all_experts},
    })


def test_unrouted_experts_fall_back_to_rtn_and_are_reported() -> None:
    model = tiny_moe()
    starve_experts(model)
    cal = CalibrationSet(tokens=tokens(), source="random")
    report = quantize_model(model, recipe(), calibration=cal, progress=False)
    notes = {r.name: r.note for r in report.sequential.linears}
    starved = [n for n, note in notes.items() if "no calibration token" in note]
    assert starved and all(".mlp.experts.2." in n or ".mlp.experts.3." in n for n in starved)
    assert "model.layers.0.mlp.experts.0.gate_up_proj" in notes and not notes["model.layers.0.mlp.experts.0.gate_up_proj"]
    for n in report.quantized:
        q = model.get_submodule(n)
        assert isinstance(q, QuantLinear) and torch.isfinite(q.weight).all()
    assert torch.isfinite(logits(model, tokens())).all()


def test_forcing_all_experts_gives_every_expert_statistics() -> None:
    model = tiny_moe()
    starve_experts(model)
    cal = CalibrationSet(tokens=tokens(), source="random")
    report = quantize_model(model, recipe(all_experts=True), calibration=cal, progress=False)
    assert not any(r.note for r in report.sequential.linears)
    assert len(report.quantized) == 2 * (4 + 2 * 4)


def test_quantized_moe_round_trips(tmp_path: Path, char_tokenizer) -> None:  # type: ignore[no-untyped-def]
    from lowbit.io import save_quantized
    from lowbit.io.lowbit_format import load_quantized

    model = tiny_moe()
    cal = CalibrationSet(tokens=tokens(), source="random")
    quantize_model(model, recipe(), calibration=cal, progress=False)
    out = save_quantized(LoadedModel(model, char_tokenizer, "tiny-moe", None), tmp_path / "q")
    back = load_quantized(out)
    ids = tokens()
    torch.testing.assert_close(logits(back.model, ids), logits(copy.deepcopy(model), ids), rtol=1e-4, atol=1e-4)
