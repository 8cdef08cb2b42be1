"""Read and write the ``(out, in)`` weight of the linear layers transformers uses."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import LowbitError


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight ``(out, in)`` and bias of an ``nn.Linear`` or transformers ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.weight.detach(), module.bias
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: weight (in, out)
        return module.weight.detach().t(), module.bias
    raise LowbitError(f"cannot quantize a {type(module).__name__}: not a linear layer")


def set_linear_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write a ``(out, in)`` weight back into an ``nn.Linear`` or ``Conv1D``."""
    target = module.weight
    value = weight.t() if type(module).__name__ == "Conv1D" else weight
    target.data = value.to(target.dtype).contiguous()
