"""Observers: the range ``[lo, hi]`` of a linear's input, measured on calibration data, from which
static activation scales are fitted (:meth:`lowbit.codecs.activations.ActivationQuantizer.from_range`).

An :class:`Observer` is the choice (a registered pydantic model a recipe names); its
:meth:`Observer.start` gives the state that accumulates batches and says the range:

* ``minmax``: the smallest and largest value seen (per tensor or per input channel);
* ``moving_average``: each batch's min and max, averaged exponentially with ``averaging``
  (PyTorch's MovingAverageMinMaxObserver; per tensor or per channel);
* ``percentile``: the ``q``-th percentile of ``|x|`` (symmetric range), per tensor;
* ``mse``: the clipping threshold ``t`` that minimizes the mean squared error of the format's
  round trip over the observed values, per tensor;
* ``entropy``: TensorRT's calibration: the threshold whose 128-level quantized distribution has
  the least KL divergence from the observed one (clipped values folded into the last bin),
  per tensor.

The last three read a histogram of ``|x|`` with ``bins`` equal bins on ``[0, R)``. ``R`` starts
as the first batch's ``max |x|`` and doubles (neighbouring bins merged, exactly) whenever a
batch reaches beyond it, so the histogram is exact at its resolution whatever the order of
batches.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from pydantic import Field

from lowbit.registry import Registered

if TYPE_CHECKING:
    from lowbit.codecs.activations import ActivationQuantizer


class ObserverState(ABC):
    """Accumulates inputs ``(..., K)``; :meth:`range` gives ``(lo, hi)``: scalars per tensor,
    ``(K,)`` per channel, float32."""

    def __init__(self, per_channel: bool) -> None:
        self.per_channel = per_channel
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        if flat.numel():
            self.n += flat.shape[0]
            self._add(flat)

    @abstractmethod
    def _add(self, flat: torch.Tensor) -> None: ...

    @abstractmethod
    def range(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def _extremes(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.per_channel:
            return flat.amin(0), flat.amax(0)
        return flat.amin(), flat.amax()


class WithoutChannels(ObserverState):
    """Another state that sees every input feature but ``channels`` (int64 ``(k,)``: features kept
    in 16-bit, which a static scale need not cover)."""

    def __init__(self, inner: ObserverState, channels: torch.Tensor, n_features: int) -> None:
        super().__init__(inner.per_channel)
        keep = torch.ones(n_features, dtype=torch.bool)
        keep[channels.cpu()] = False
        self.inner, self.keep = inner, keep.nonzero().view(-1)

    def _add(self, flat: torch.Tensor) -> None:
        self.inner.add(flat.index_select(1, self.keep.to(flat.device)))

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner.range()


class Observer(Registered, ABC):
    registry: ClassVar[dict[str, type["Observer"]]] = {}
    per_channel_ok: ClassVar[bool] = True

    def start(self, per_channel: bool, quantizer: "ActivationQuantizer") -> ObserverState:
        """A fresh state for one input (per tensor or per input channel), for ``quantizer``'s
        format; ValueError for a combination this observer cannot measure."""
        if per_channel and not self.per_channel_ok:
            raise ValueError(f"the {self.name} observer measures per tensor only")
        return self._start(per_channel, quantizer)

    @abstractmethod
    def _start(self, per_channel: bool, quantizer: "ActivationQuantizer") -> ObserverState: ...


# ---------------------------------------------------------------------------- min-max


class _MinMax(ObserverState):
    def __init__(self, per_channel: bool) -> None:
        super().__init__(per_channel)
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def _add(self, flat: torch.Tensor) -> None:
        lo, hi = self._extremes(flat)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None or self.hi is None:
            raise ValueError("the observer saw no input")
        return self.lo, self.hi


class MinMax(Observer):
    name: Literal["minmax"] = "minmax"

    def _start(self, per_channel: bool, quantizer: "ActivationQuantizer") -> ObserverState:
        return _MinMax(per_channel)


class _MovingAverage(_MinMax):
    def __init__(self, per_channel: bool, c: float) -> None:
        super().__init__(per_channel)
        self.c = c

    def _add(self, flat: torch.Tensor) -> None:
        lo, hi = self._extremes(flat)
        if self.lo is None or self.hi is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo = self.lo + self.c * (lo - self.lo)
            self.hi = self.hi + self.c * (hi - self.hi)


class MovingAverage(Observer):
    name: Literal["moving_average"] = "moving_average"
    averaging: float = Field(0.01, gt=0, le=1, description="weight of each new batch's min and max")

    def _start(self, per_channel: bool, quantizer: "ActivationQuantizer") -> ObserverState:
        return _MovingAverage(per_channel, self.averaging)


# ---------------------------------------------------------------------------- histograms


class AbsHistogram:
    """A histogram of ``|x|``: ``counts`` ``(bins,)`` float64 on ``[0, R)`` in equal bins, ``R``
    doubling as needed (module docstring)."""

    def __init__(self, bins: int) -> None:
        if bins < 2 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two, got {bins}")
        self.bins = bins
        self.counts = torch.zeros(bins, dtype=torch.float64)
        self.top = 0.0  # R
        self.total = 0

    @property
    def width(self) -> float:
        return self.top / self.bins

    def add(self, values: torch.Tensor) -> None:
        a = values.detach().reshape(-1).to(torch.float32).abs()
        if not a.numel():
            return
        m = float(a.max())
        if self.top == 0.0:
            self.top = m if m > 0 else 1.0
        while m >= self.top:  # double the range: pairs of bins merge exactly
            self.counts = torch.cat([self.counts.view(-1, 2).sum(1), torch.zeros(self.bins // 2, dtype=torch.float64)])
            self.top *= 2
        idx = (a / self.width).floor().clamp_(max=self.bins - 1).to(torch.int64)
        self.counts += torch.bincount(idx, minlength=self.bins).to(torch.float64)
        self.total += a.numel()

    def centers(self) -> torch.Tensor:
        return (torch.arange(self.bins, dtype=torch.float64) + 0.5) * self.width


class _HistogramState(ObserverState):
    def __init__(self, bins: int) -> None:
        super().__init__(per_channel=False)
        self.hist = AbsHistogram(bins)

    def _add(self, flat: torch.Tensor) -> None:
        self.hist.add(flat)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.hist.total:
            raise ValueError("the observer saw no input")
        t = torch.tensor(self.threshold(), dtype=torch.float32)
        return -t, t

    @abstractmethod
    def threshold(self) -> float: ...


class _HistogramObserver(Observer):
    per_channel_ok: ClassVar[bool] = False
    bins: int = Field(2048, ge=128, description="histogram bins of |x| (a power of two)")

    def _check(self, quantizer: "ActivationQuantizer") -> None:
        if not quantizer.symmetric:
            raise ValueError(f"the {self.name} observer gives a symmetric range; use minmax or moving_average "
                             "for asymmetric activations")


class _Percentile(_HistogramState):
    def __init__(self, bins: int, q: float) -> None:
        super().__init__(bins)
        self.q = q

    def threshold(self) -> float:
        return histogram_percentile(self.hist, self.q)


def histogram_percentile(hist: AbsHistogram, q: float) -> float:
    """The ``q``-th percentile (0..100) of the observed ``|x|``: the value of rank ``q% * n`` (the
    smallest with at least ``q%`` of the values at or below it), to within its bin."""
    cum = torch.cumsum(hist.counts, 0)
    target = q / 100 * hist.total
    i = int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64)).clamp(max=hist.bins - 1))
    before = float(cum[i - 1]) if i else 0.0
    inside = float(hist.counts[i])
    frac = (target - before) / inside if inside > 0 else 1.0
    return (i + min(max(frac, 0.0), 1.0)) * hist.width


class Percentile(_HistogramObserver):
    name: Literal["percentile"] = "percentile"
    q: float = Field(99.99, gt=0, le=100, description="percentile of |x| taken as the range's end")

    def _start(self, per_channel: bool, quantizer: "ActivationQuantizer") -> ObserverState:
        self._check(quantizer)
        return _Percentile(self.bins, self.q)


class _MSE(_HistogramState):
    def __init__(self, bins: int, candidates: int, quantizer: "ActivationQuantizer") -> None:
        super().__init__(bins)
        self.candidates = candidates
        self.quantizer = quantizer

    def threshold(self) -> float:
        return mse_threshold(self.hist, self.quantizer, self.candidates)


def mse_threshold(hist: AbsHistogram, quantizer: "ActivationQuantizer", candidates: int) -> float:
    """The threshold among ``candidates`` evenly spaced in ``(0, R]`` whose round trip through
    ``quantizer``'s format (scale fitted to ``[-t, t]``) has the least squared error over the
    histogram (each bin's values at its centre)."""
    centers, counts = hist.centers().to(torch.float32), hist.counts
    keep = counts > 0
    centers, counts = centers[keep], counts[keep]
    best_t, best_err = hist.top, math.inf
    for k in range(1, candidates + 1):
        t = torch.tensor(hist.top * k / candidates)
        scale = quantizer.from_range(-t, t)
        err = float(((quantizer.fake_quantize(centers.unsqueeze(0), scale).squeeze(0) - centers).to(torch.float64)
                     .square() * counts).sum())
        if err < best_err:
            best_t, best_err = float(t), err
    return best_t


class MSE(_HistogramObserver):
    name: Literal["mse"] = "mse"
    candidates: int = Field(256, ge=8, description="clipping thresholds tried, evenly spaced up to the largest |x|")

    def _start(self, per_channel: bool, quantizer: "ActivationQuantizer") -> ObserverState:
        self._check(quantizer)
        return _MSE(self.bins, self.candidates, quantizer)


class _Entropy(_HistogramState):
    def __init__(self, bins: int, levels: int) -> None:
        super().__init__(bins)
        self.levels = levels

    def threshold(self) -> float:
        return entropy_threshold(self.hist, self.levels)


def entropy_threshold(hist: AbsHistogram, levels: int = 128) -> float:
    """TensorRT's KL-divergence calibration on a histogram of ``|x|``: for each ``i`` from
    ``levels`` to ``bins``, the reference ``P`` is the first ``i`` bins with the mass beyond them
    added to the last; ``Q`` merges those ``i`` bins (without the added mass) into ``levels``
    groups and spreads each group's mass evenly over the bins where ``P`` is non-zero; the ``i``
    of least ``KL(P || Q)`` (infinite where ``Q`` is 0 and ``P`` is not) gives the threshold
    ``(i + 0.5) * width``."""
    counts = hist.counts
    best_i, best_kl = hist.bins, math.inf
    for i in range(levels, hist.bins + 1):
        p = counts[:i].clone()
        p[i - 1] += counts[i:].sum()
        q = _expand(p, counts[:i], levels)
        kl = _kl(p, q)
        if kl < best_kl:
            best_i, best_kl = i, kl
    return (best_i + 0.5) * hist.width


def _expand(p: torch.Tensor, raw: torch.Tensor, levels: int) -> torch.Tensor:
    """``Q``: ``raw``'s bins merged into ``levels`` groups of ``len // levels`` (the last takes the
    remainder, as TensorRT's), each group's total spread evenly over the bins where ``p`` is
    non-zero."""
    n = raw.numel()
    group = (torch.arange(n) // (n // levels)).clamp_(max=levels - 1)
    nonzero = (p > 0).to(torch.float64)
    sums = torch.zeros(levels, dtype=torch.float64).index_add_(0, group, raw)
    used = torch.zeros(levels, dtype=torch.float64).index_add_(0, group, nonzero)
    return torch.where(used[group] > 0, sums[group] / used[group].clamp(min=1), 0.0) * nonzero


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """``KL(p || q)`` of the normalized distributions, over the bins where ``p > 0`` (``q == 0``
    there counts as a very large divergence)."""
    p = p / p.sum()
    qs = q.sum()
    if qs <= 0:
        return math.inf
    q = q / qs
    mask = p > 0
    if bool((q[mask] == 0).any()):
        return math.inf
    return float((p[mask] * (p[mask] / q[mask]).log()).sum())


class Entropy(_HistogramObserver):
    name: Literal["entropy"] = "entropy"
    levels: int = Field(128, ge=2, description="quantized levels of |x| (128 for int8)")

    def _start(self, per_channel: bool, quantizer: "ActivationQuantizer") -> ObserverState:
        self._check(quantizer)
        return _Entropy(self.bins, self.levels)
