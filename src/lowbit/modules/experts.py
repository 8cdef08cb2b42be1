"""Mixture-of-experts layers as one module per expert.

transformers stores the experts of an MoE block fused: ``gate_up_proj`` ``(E, 2I, H)`` and
``down_proj`` ``(E, H, I)`` parameters and a loop over the experts that received tokens.
:class:`UnfusedExperts` holds the same weights as one :class:`ExpertMLP` (two ``nn.Linear``) per
expert and computes the same function, so that the pipeline can hook each expert's linears (each
sees only the tokens routed to it) and replace them with ``QuantLinear``; saved models keep that
layout (``mlp.experts.3.gate_up_proj``).

With ``all_experts`` set, every expert runs on every token (the block's output still uses the
router's choice): calibration statistics then cover experts the calibration text never routes to.
"""

from __future__ import annotations

import torch
from torch import nn


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate) * up)`` with ``gate, up = gate_up(x).chunk(2)``."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, act_fn: nn.Module) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(gate_up.shape[1], gate_up.shape[0], bias=False, device="meta")
        self.down_proj = nn.Linear(down.shape[1], down.shape[0], bias=False, device="meta")
        self.gate_up_proj.weight = nn.Parameter(gate_up.detach().clone(), requires_grad=False)
        self.down_proj.weight = nn.Parameter(down.detach().clone(), requires_grad=False)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class UnfusedExperts(nn.ModuleList):
    """The experts of an MoE block, one :class:`ExpertMLP` each (module docstring)."""

    def __init__(self, fused: nn.Module) -> None:
        gate_up, down = fused.gate_up_proj, fused.down_proj
        super().__init__(ExpertMLP(gate_up[e], down[e], fused.act_fn) for e in range(gate_up.shape[0]))
        self.all_experts = False

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        if self.all_experts:
            for e, expert in enumerate(self):
                weight = (top_k_weights * (top_k_index == e)).sum(dim=-1, keepdim=True)
                final += (expert(hidden_states) * weight).to(final.dtype)
            return final
        for e, expert in enumerate(self):
            token_idx, slot = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue
            out = expert(hidden_states[token_idx]) * top_k_weights[token_idx, slot, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


def is_fused_experts(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (
        isinstance(gate_up, torch.Tensor) and gate_up.dim() == 3
        and isinstance(down, torch.Tensor) and down.dim() == 3
        and hasattr(module, "act_fn")
    )


def unfuse_experts(block: nn.Module, name: str) -> UnfusedExperts | None:
    """Replace the fused experts at ``name`` in ``block`` by :class:`UnfusedExperts` (idempotent);
    None when there is no fused experts module there."""
    try:
        module = block.get_submodule(name)
    except AttributeError:
        return None
    if isinstance(module, UnfusedExperts):
        return module
    if not is_fused_experts(module):
        return None
    unfused = UnfusedExperts(module)
    block.set_submodule(name, unfused)
    return unfused
