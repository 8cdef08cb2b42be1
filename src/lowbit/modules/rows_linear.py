"""Dense linears whose one-token products run lowbit's row operator (``torch.ops.lowbit.dense_rows``,
:mod:`lowbit.modules.native`): at a decode step a dense layer (an unquantized model's linears, a
quantized model's tied LM head) multiplies a row or two by its whole weight, where the row operator streams the weight
once and torch's CPU GEMM is slower (BENCHMARKS.md, ``scripts/benchmark_speed.py``'s decode-operator table).

Numerics: float32 accumulation as torch's, the additions in another order (float32 rounding
differences; bf16 outputs rounded to nearest even as torch rounds them). With more rows (prefill,
evaluation windows, larger batches) the layer is a plain ``nn.Linear``: its results are torch's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.modules.native import row_products

#: the most input rows the row operator takes per weight dtype: above them torch's GEMM is as
#: fast or faster (``scripts/benchmark_speed.py``'s decode-operator table; the weights' values are
#: read once per four rows, so float32, the slowest to read, gains longest)
DENSE_MAX_ROWS = {torch.float32: 4, torch.bfloat16: 2}


class RowsLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, same state dict) that sends inputs of at most
    ``DENSE_MAX_ROWS`` rows in the weight's dtype to the row operator."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if 0 < rows <= DENSE_MAX_ROWS.get(w.dtype, 0) and x.dtype == w.dtype and x.device.type == "cpu":
            y = torch.ops.lowbit.dense_rows(x.reshape(rows, x.shape[-1]).contiguous(), w, self.bias)
            return y.view(*x.shape[:-1], w.shape[0])
        return F.linear(x, w, self.bias)


def enable_row_products(model: nn.Module) -> int:
    """Every plain ``nn.Linear`` of ``model`` (float32 or bf16 weight, on the CPU) becomes a
    :class:`RowsLinear` in place (its class only: parameters and ties stay); returns how many. None
    where the operator is not built here or not vectorized."""
    if not row_products():
        return 0
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear and m.weight.dtype in DENSE_MAX_ROWS and m.weight.device.type == "cpu" \
                and m.weight.is_contiguous():
            m.__class__ = RowsLinear
            n += 1
    return n
