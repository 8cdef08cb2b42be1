"""Observers of activation ranges, each against a reference computation."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.calibration.observers import AbsHistogram, Entropy, MinMax, MovingAverage, MSE, Percentile, WithoutChannels
from lowbit.codecs.activations import ActivationQuantizer

INT8 = ActivationQuantizer("int8", "tensor")


def batches(n: int = 6, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = torch.randn(256, 32, generator=gen) * (1 + i)  # later batches reach further: the histogram grows
        x[0, i] = 60.0 * (i + 1)  # sparse outliers
        out.append(x)
    return out


def test_minmax_per_tensor_and_per_channel() -> None:
    xs = batches()
    whole = torch.cat(xs)
    t, c = MinMax().start(False, INT8), MinMax().start(True, INT8)
    for x in xs:
        t.add(x)
        c.add(x.view(16, 16, 32))  # any leading shape: the last dimension is the channel
    assert t.range() == (whole.min(), whole.max())
    lo, hi = c.range()
    assert torch.equal(lo, whole.amin(0)) and torch.equal(hi, whole.amax(0))


def test_an_observer_without_channels_sees_only_the_other_features() -> None:
    xs = batches()  # the outliers sit in features 0..5
    kept = torch.tensor([0, 1, 2, 3, 4, 5])
    rest = torch.cat(xs)[:, 6:]
    for observer in (MinMax(), Percentile(q=99.0)):
        state = WithoutChannels(observer.start(False, INT8), kept, 32)
        direct = observer.start(False, INT8)
        for x in xs:
            state.add(x.view(16, 16, 32))
            direct.add(x[:, 6:])
        assert state.n == direct.n == rest.shape[0]
        assert state.range() == direct.range()


def test_moving_average_is_pytorchs_update_rule() -> None:
    xs = batches()
    state = MovingAverage(averaging=0.1).start(False, INT8)
    for x in xs:
        state.add(x)
    lo, hi = float(xs[0].min()), float(xs[0].max())
    for x in xs[1:]:
        lo += 0.1 * (float(x.min()) - lo)
        hi += 0.1 * (float(x.max()) - hi)
    assert float(state.range()[0]) == pytest.approx(lo, rel=1e-6)
    assert float(state.range()[1]) == pytest.approx(hi, rel=1e-6)


def test_histogram_doubles_its_range_exactly() -> None:
    xs = batches()
    hist = AbsHistogram(1024)
    for x in xs:
        hist.add(x)
    whole = torch.cat(xs).abs().double()
    assert hist.top >= float(whole.max()) and hist.total == whole.numel()
    want = torch.histc(whole, bins=1024, min=0, max=hist.top)
    assert torch.equal(hist.counts, want)


@pytest.mark.parametrize("q", [50.0, 99.0, 99.9, 99.99])
def test_percentile_matches_torch_quantile_within_a_bin(q: float) -> None:
    xs = batches()
    state = Percentile(q=q, bins=4096).start(False, INT8)
    for x in xs:
        state.add(x)
    lo, hi = state.range()
    # the observed value at that rank (not an interpolation between two far-apart outliers)
    want = float(torch.quantile(torch.cat(xs).abs().reshape(-1).double(), q / 100, interpolation="higher"))
    assert float(lo) == -float(hi)
    assert abs(float(hi) - want) <= state.hist.width  # type: ignore[attr-defined]


def test_mse_threshold_is_the_brute_force_optimum() -> None:
    xs = batches()
    state = MSE(candidates=64, bins=4096).start(False, INT8)
    for x in xs:
        state.add(x)
    t = float(state.range()[1])
    values = torch.cat(xs).reshape(1, -1)

    def err(thr: float) -> float:
        th = torch.tensor(thr)
        return float((INT8.fake_quantize(values, INT8.from_range(-th, th)).double() - values.double()).square().sum())

    top = state.hist.top  # type: ignore[attr-defined]
    errors = [err(top * k / 64) for k in range(1, 65)]
    best = min(errors)
    assert err(t) <= best * 1.02  # the histogram's bin centres stand in for the values
    assert t < float(values.abs().max())  # the outliers are clipped: that is the point


def _reference_entropy(counts: torch.Tensor, width: float, levels: int) -> float:
    """The KL search written out in float64 loops (the observer's docstring, bin by bin)."""
    bins = counts.numel()
    best_i, best = bins, math.inf
    for i in range(levels, bins + 1):
        p = [float(c) for c in counts[:i]]
        p[-1] += float(counts[i:].sum())
        raw = [float(c) for c in counts[:i]]
        per = i // levels
        q = [0.0] * i
        for g in range(levels):
            a = g * per
            b = i if g == levels - 1 else a + per
            nz = [j for j in range(a, b) if p[j] > 0]
            if nz:
                for j in nz:
                    q[j] = sum(raw[a:b]) / len(nz)
        sp, sq = sum(p), sum(q)
        kl = 0.0
        for pj, qj in zip(p, q):
            if pj > 0:
                if qj == 0:
                    kl = math.inf
                    break
                kl += pj / sp * math.log((pj / sp) / (qj / sq))
        if kl < best:
            best_i, best = i, kl
    return (best_i + 0.5) * width


def test_entropy_threshold_matches_a_float64_kl_search() -> None:
    xs = batches(3)
    state = Entropy(bins=256, levels=32).start(False, INT8)
    for x in xs:
        state.add(x)
    hist = state.hist  # type: ignore[attr-defined]
    want = _reference_entropy(hist.counts, hist.width, 32)
    assert float(state.range()[1]) == pytest.approx(want, rel=1e-9)
    assert want < hist.top  # the long tail is clipped


def test_observers_refuse_what_they_cannot_measure() -> None:
    with pytest.raises(ValueError, match="per tensor only"):
        Percentile().start(True, INT8)
    with pytest.raises(ValueError, match="symmetric range"):
        Entropy().start(False, ActivationQuantizer("int8", "tensor", symmetric=False))
    with pytest.raises(ValueError, match="saw no input"):
        MinMax().start(False, INT8).range()
    with pytest.raises(ValueError, match="power of two"):
        AbsHistogram(1000)
