"""SmoothQuant: its scale, what it does to a W8A8 error, and its alpha search."""

from __future__ import annotations

import copy

import pytest
import torch

from lowbit.calibration.statistics import InputStatistics, StatsRequest
from lowbit.codecs.activations import ActivationQuantizer
from lowbit.codecs.registry import codec_from_dict
from lowbit.transforms import SmoothQuant, StepContext
from lowbit.transforms.smoothquant import smoothing_scale

W8 = codec_from_dict({"name": "int", "bits": 8, "granularity": "channel"})
A8 = ActivationQuantizer("int8", "token")


def test_smoothing_scale_is_the_papers_formula() -> None:
    x = torch.tensor([4.0, 0.5, 0.0, 9.0])
    w = torch.tensor([0.25, 2.0, 1.0, 0.0])
    s = smoothing_scale(x, w, 0.5)
    assert torch.allclose(s[:2], (x[:2] / w[:2]).sqrt())
    assert s[2] == 1 and s[3] == 1  # a dead input channel, an all-zero weight column: nothing to migrate
    assert torch.allclose(smoothing_scale(x, w, 1.0)[:2], x[:2]) and torch.allclose(smoothing_scale(x, w, 0.0)[:2], 1 / w[:2])


class Block(torch.nn.Module):
    """A norm feeding two linears, the layout of q/k/v."""

    def __init__(self, k: int = 64) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.norm = torch.nn.LayerNorm(k)
        with torch.no_grad():
            self.norm.weight.copy_(1 + 0.1 * torch.randn(k, generator=gen))
            self.norm.bias.copy_(0.1 * torch.randn(k, generator=gen))
        self.a, self.b = torch.nn.Linear(k, 32), torch.nn.Linear(k, 16)
        with torch.no_grad():
            for lin in (self.a, self.b):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.1)


def _inputs(k: int = 64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(512, k, generator=gen)
    x[:, [3, 17, 40]] *= 60  # outlier channels, as LLM activations have
    return x


@torch.no_grad()
def _w8a8_error(block: Block, x: torch.Tensor) -> float:
    h = block.norm(x)
    ref = torch.cat([torch.nn.functional.linear(h, lin.weight, lin.bias) for lin in (block.a, block.b)], 1)
    q = torch.cat([torch.nn.functional.linear(A8.fake_quantize(h), W8.fake_quantize(lin.weight), lin.bias)
                   for lin in (block.a, block.b)], 1)
    return float((q - ref).square().mean())


@pytest.mark.parametrize("alpha", [0.5, None])
def test_smoothing_cuts_the_w8a8_error_and_keeps_the_function(alpha: float | None) -> None:
    block, x = Block(), _inputs()
    plain = _w8a8_error(block, x)
    with torch.no_grad():
        ref = torch.cat([block.a(block.norm(x)), block.b(block.norm(x))], 1)
    stats = InputStatistics(64, SmoothQuant(alpha=alpha).request(), 1)
    stats.add(block.norm(x).detach())
    smoothed = copy.deepcopy(block)
    ctx = StepContext(smoothed, "blk", ["a", "b"], {"a": W8, "b": W8}, stats, "norm", False, {"a": A8, "b": A8})
    assert SmoothQuant(alpha=alpha, alpha_grid=10, rows=256).apply(ctx)
    with torch.no_grad():
        out = torch.cat([smoothed.a(smoothed.norm(x)), smoothed.b(smoothed.norm(x))], 1)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)  # an exact equivalence
    assert _w8a8_error(smoothed, x) < 0.5 * plain  # the outliers moved into the weights
    # the statistics now describe the smoothed input
    torch.testing.assert_close(stats.abs_max, smoothed.norm(x).detach().abs().amax(0), rtol=1e-5, atol=1e-6)


def test_searched_alpha_is_no_worse_than_the_default() -> None:
    x = _inputs()
    errors = {}
    for alpha in (0.5, None):
        block = Block()
        stats = InputStatistics(64, SmoothQuant(alpha=alpha, rows=512).request(), 1)
        stats.add(block.norm(x).detach())
        ctx = StepContext(block, "blk", ["a", "b"], {"a": W8, "b": W8}, stats, "norm", False, {"a": A8, "b": A8})
        SmoothQuant(alpha=alpha, rows=512).apply(ctx)
        errors[alpha] = _w8a8_error(block, x)
    assert errors[None] <= errors[0.5] * 1.0001


def test_no_source_no_smoothing() -> None:
    block, x = Block(), _inputs()
    stats = InputStatistics(64, StatsRequest(absmax=True), 1)
    stats.add(x)
    before = block.a.weight.clone()
    assert not SmoothQuant().apply(StepContext(block, "blk", ["a", "b"], {"a": W8, "b": W8}, stats, None, False))
    assert torch.equal(block.a.weight, before)
