"""Statistics of a linear's input, accumulated over calibration tokens.

One :class:`InputStatistics` per distinct input of a block's sub-step (q/k/v share one): the
Hessian proxy ``X^T X`` (one matrix product per batch), per-column mean ``|x|`` and ``x^2`` and
max ``|x|``,
and an evenly spread sample of input rows for algorithms that evaluate output errors (AWQ).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


HESSIAN_BLOCK = 384  # columns per block row of the X^T X accumulation


@dataclass(frozen=True)
class StatsRequest:
    """What an algorithm needs collected: the Hessian (in ``hessian_dtype``) and/or up to
    ``input_rows`` sample rows of the input."""

    hessian: bool = False
    hessian_dtype: torch.dtype = torch.float32
    input_rows: int = 0
    means: bool = False  # per-column mean |x| and x^2 (the Hessian's diagonal gives x^2 anyway)
    absmax: bool = False  # per-column max |x| (SmoothQuant)

    def merge(self, other: "StatsRequest") -> "StatsRequest":
        wide = torch.float64 if torch.float64 in (self.hessian_dtype, other.hessian_dtype) else torch.float32
        return StatsRequest(
            self.hessian or other.hessian, wide, max(self.input_rows, other.input_rows), self.means or other.means,
            self.absmax or other.absmax,
        )


class InputStatistics:
    """Accumulates statistics of inputs ``(..., n_features)`` over ``n_batches`` batches."""

    def __init__(
        self,
        n_features: int,
        request: StatsRequest,
        n_batches: int,
        product_dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        """``product_dtype``: dtype of each batch's ``X^T X`` product before it is added to the
        accumulator; bfloat16 (AMX) is about twice as fast and, per batch of 4096 tokens, changes
        the Hessian by ~1e-3 relative and GPTQ's output error not at all (BENCHMARKS.md)."""
        self.n_features = n_features
        self.request = request
        self.product_dtype = product_dtype if request.hessian_dtype == torch.float32 else request.hessian_dtype
        self.n_tokens = 0
        self.abs_sum = torch.zeros(n_features, dtype=torch.float64, device=device) if request.means else None
        self.sq_sum = torch.zeros(n_features, dtype=torch.float64, device=device) if request.means else None
        self.hessian_sum = torch.zeros(n_features, n_features, dtype=request.hessian_dtype, device=device) if request.hessian else None
        self.abs_max = torch.zeros(n_features, dtype=torch.float32, device=device) if request.absmax else None
        self._rows_per_batch = -(-request.input_rows // max(n_batches, 1)) if request.input_rows else 0
        self._rows: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.n_features)
        self.n_tokens += x.shape[0]
        if self.abs_sum is not None and self.sq_sum is not None:
            xf = x.to(torch.float32)
            self.abs_sum += xf.abs().sum(0, dtype=torch.float64)
            self.sq_sum += xf.square().sum(0, dtype=torch.float64)
        if self.abs_max is not None:
            torch.maximum(self.abs_max, x.abs().amax(0).to(torch.float32), out=self.abs_max)
        if self.hessian_sum is not None:
            # Only the block rows' upper parts: X^T X is symmetric, and skipping the blocks below
            # the diagonal saves about a third of the product's time (read back by `hessian`).
            xp = x.to(self.product_dtype)
            for i in range(0, self.n_features, HESSIAN_BLOCK):
                rows = xp[:, i:i + HESSIAN_BLOCK].t()
                if self.product_dtype == self.hessian_sum.dtype:
                    self.hessian_sum[i:i + HESSIAN_BLOCK, i:].addmm_(rows, xp[:, i:])
                else:
                    self.hessian_sum[i:i + HESSIAN_BLOCK, i:] += (rows @ xp[:, i:]).to(self.hessian_sum.dtype)
        if self._rows_per_batch:
            xf = x.to(torch.float32)
            step = max(1, xf.shape[0] // self._rows_per_batch)
            self._rows.append(xf[::step][: self._rows_per_batch].clone())

    @property
    def mean_abs(self) -> torch.Tensor:
        """``(n_features,)`` float32 mean ``|x|`` per input column (needs ``means``)."""
        if self.abs_sum is None:
            raise ValueError("mean |x| was not collected (StatsRequest.means)")
        return (self.abs_sum / max(self.n_tokens, 1)).to(torch.float32)

    @property
    def mean_square(self) -> torch.Tensor | None:
        """``(n_features,)`` float32 mean ``x^2`` per input column (the diagonal of the Hessian),
        or None when neither means nor the Hessian were collected."""
        if self.sq_sum is not None:
            return (self.sq_sum / max(self.n_tokens, 1)).to(torch.float32)
        h = self.hessian
        return None if h is None else h.diagonal().to(torch.float32).clone()

    @property
    def hessian(self) -> torch.Tensor | None:
        """``X^T X / n_tokens`` ``(n_features, n_features)``, in the requested dtype."""
        if self.hessian_sum is None:
            return None
        upper = self.hessian_sum.triu()
        return (upper + upper.triu(1).t()) / max(self.n_tokens, 1)

    @property
    def rows(self) -> torch.Tensor | None:
        """Sampled input rows ``(n, n_features)`` float32, or None when none were requested."""
        if not self._rows:
            return None
        return torch.cat(self._rows)

    def scale_columns(self, s: torch.Tensor) -> None:
        """The statistics of ``x / s`` (after an equivalence transform folded ``1/s`` into the
        module that produces the input): ``s`` ``(n_features,)`` positive."""
        s64 = s.to(torch.float64)
        if self.abs_sum is not None and self.sq_sum is not None:
            self.abs_sum /= s64
            self.sq_sum /= s64.square()
        if self.abs_max is not None:
            self.abs_max /= s.to(torch.float32)
        if self.hessian_sum is not None:
            sh = s.to(self.hessian_sum.dtype)
            self.hessian_sum /= sh.unsqueeze(0) * sh.unsqueeze(1)
        self._rows = [r / s.to(torch.float32) for r in self._rows]
