"""Bytes and bits per weight of a model as lowbit stores it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.modules import QuantLinear, dense_tensors


@dataclass(frozen=True)
class ModelSize:
    model_bytes: int  # every stored tensor: quantized parts plus dense tensors in their storage dtype
    linear_bytes: int  # the decoder-block linears (quantized or not)
    linear_params: int

    @property
    def bits_per_weight(self) -> float:
        """Bits per weight over the decoder-block linears, scale data included."""
        return 8.0 * self.linear_bytes / max(self.linear_params, 1)


def storage_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype lowbit stores dense tensors of a quantized model in (None: as they are)."""
    recipe = getattr(model, "lowbit_recipe", None)
    return None if recipe is None else getattr(torch, recipe.dense_dtype)


def model_size(model: nn.Module, block_linears: list[str]) -> ModelSize:
    """Sizes of ``model``; ``block_linears`` are the full names of its decoder-block linears."""
    dense_dtype = storage_dtype(model)
    linear_set = set(block_linears)
    total = lin_bytes = lin_params = 0
    seen: set[int] = set()  # a tied LM head shares its embedding's codes: count them once
    for mod_name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            nbytes = module.qweight.nbytes
            # a kernel-backed layer's codes live in its kernel
            ptr = id(module.kernel) if module.kernel is not None else module.qweight_codes.data_ptr()
            total += 0 if ptr in seen else nbytes
            seen.add(ptr)
            if mod_name in linear_set:
                lin_bytes += nbytes
                lin_params += module.in_features * module.out_features
    for mod_name, _, name, t in dense_tensors(model):
        elt = torch.empty((), dtype=dense_dtype or t.dtype).element_size() if t.dtype.is_floating_point else t.element_size()
        total += t.numel() * elt
        if mod_name in linear_set and name == "weight":
            lin_bytes += t.numel() * elt
            lin_params += t.numel()
    return ModelSize(total, lin_bytes, lin_params)
