"""Dense linears on the CPU at the speed of the best product this machine has for their shape.

- One-token products (a decode step: an unquantized model's linears, a quantized model's tied LM
  head) run lowbit's row operator (``torch.ops.lowbit.dense_rows``, :mod:`lowbit.modules.native`),
  which streams the weight once where torch's CPU GEMM is slower (BENCHMARKS.md,
  ``scripts/benchmark_speed.py``'s decode-operator table).
- Float32 products of more rows (prefill, evaluation windows) run oneDNN's float32 GEMM
  (``torch.ops.mkldnn._linear_pointwise``, IEEE float32, no reduced precision) instead of the MKL
  one ``F.linear`` calls: 2.3x its speed on this machine's 512-row products (460-500 against 200-220
  GFLOPS), the same float32 arithmetic with the additions in another order.

Numerics: float32 accumulation as torch's, the additions in another order (float32 rounding
differences; bf16 outputs rounded to nearest even as torch rounds them). Products that need
gradients, and bf16 ones (torch already runs those through oneDNN), are ``F.linear``'s. Only models
made fast on purpose take these paths (:func:`enable_row_products` for running,
:func:`fast_dense_linears` while evaluating): calibration and quantization keep ``F.linear``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.modules.native import row_products

#: the most input rows the row operator takes per weight dtype: above them torch's GEMM is as
#: fast or faster (``scripts/benchmark_speed.py``'s decode-operator table; the weights' values are
#: read once per four rows, so float32, the slowest to read, gains longest)
DENSE_MAX_ROWS = {torch.float32: 4, torch.bfloat16: 2}


@functools.lru_cache(maxsize=1)
def onednn_linear() -> bool:
    """Whether oneDNN's float32 linear is here and gives ``F.linear``'s products (checked once on a small case)."""
    if not torch.backends.mkldnn.is_available():
        return False
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(9, 40, generator=g), torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
    try:
        with torch.inference_mode():
            y = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    except (RuntimeError, AttributeError):
        return False
    return bool(torch.allclose(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5))


def dense_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, bias)``; float32 on the CPU without gradients through oneDNN's GEMM (see the module
    docstring). ``x`` ``(..., K)``, ``w`` ``(N, K)``."""
    if torch.compiler.is_compiling():  # inductor chooses a graph's products itself
        return F.linear(x, w, bias)
    if (x.dtype == torch.float32 and w.dtype == torch.float32 and x.device.type == "cpu" and w.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            and (bias is None or (bias.dtype == torch.float32 and not (torch.is_grad_enabled() and bias.requires_grad)))
            and x.numel() and onednn_linear()):
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), w, bias, "none", [], "")
        return y.view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w, bias)


class RowsLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, same state dict) that sends inputs of at most
    ``DENSE_MAX_ROWS`` rows in the weight's dtype to the row operator, and the others to :func:`dense_linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if (0 < rows <= DENSE_MAX_ROWS.get(w.dtype, 0) and x.dtype == w.dtype and x.device.type == "cpu"
                and row_products()):
            y = torch.ops.lowbit.dense_rows(x.reshape(rows, x.shape[-1]).contiguous(), w, self.bias)
            return y.view(*x.shape[:-1], w.shape[0])
        return dense_linear(x, w, self.bias)


def _plain_linears(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m) is nn.Linear and m.weight.dtype in DENSE_MAX_ROWS
            and m.weight.device.type == "cpu" and m.weight.is_contiguous()]


def _quantized_linears(model: nn.Module) -> list[nn.Module]:
    """Layers with a dense reference product that may take :func:`dense_linear` (lowbit's QuantLinear)."""
    return [m for m in model.modules() if hasattr(type(m), "fast_dense")]


def _switch_on(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """Plain linears made :class:`RowsLinear` and quantized layers switched to :func:`dense_linear` (those not
    already), as ``(linears, quantized)``; nothing where neither the row operator nor oneDNN's linear is here."""
    if not (row_products() or onednn_linear()):
        return [], []
    linears = _plain_linears(model)
    quantized = [m for m in _quantized_linears(model) if not m.fast_dense]
    for m in linears:
        m.__class__ = RowsLinear
    for m in quantized:
        m.fast_dense = True
    return linears, quantized


def enable_row_products(model: nn.Module) -> int:
    """Every plain ``nn.Linear`` of ``model`` (float32 or bf16 weight, on the CPU) becomes a
    :class:`RowsLinear` in place (its class only: parameters and ties stay), and quantized layers' reference
    products take :func:`dense_linear`; returns how many plain linears. None where neither the row operator
    (built and vectorized) nor oneDNN's linear is here."""
    return len(_switch_on(model)[0])


@contextlib.contextmanager
def fast_dense_linears(model: nn.Module) -> Iterator[None]:
    """:func:`enable_row_products` for the ``with`` block (evaluation), and lowbit's attention
    (:mod:`lowbit.modules.decode_attention`: whole float32 causal windows through ``lowbit::causal_attention``);
    the model is as it was after it."""
    from lowbit.modules.decode_attention import NAME, use_one_query_attention

    linears, quantized = _switch_on(model)
    # whole float32 windows through lowbit's causal attention (decode_attention), SDPA again after the block
    attention = use_one_query_attention(model) if row_products() else False
    try:
        yield
    finally:
        for m in linears:
            m.__class__ = nn.Linear
        for m in quantized:
            m.fast_dense = False
        if attention and model.config._attn_implementation == NAME:  # type: ignore[union-attr]
            model.config._attn_implementation = "sdpa"  # type: ignore[union-attr]
