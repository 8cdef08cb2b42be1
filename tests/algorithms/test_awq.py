"""AWQ's clip search minimizes the group output error, with every codec (its scaling is the awq
transform: tests/transforms)."""

from __future__ import annotations

import copy

import pytest
import torch

from lowbit.algorithms import AWQ, RTN, LayerStats
from lowbit.codecs.registry import codec_from_dict


def test_clip_search_lowers_the_output_error() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1024, 128, generator=gen) * torch.exp(torch.randn(128, generator=gen))
    w = torch.randn(64, 128, generator=gen) * 0.05
    w[:, 7] *= 8  # an outlier column stretches its groups' ranges
    codec = codec_from_dict({"name": "int", "bits": 3, "group_size": 32})
    h = x.t() @ x / x.shape[0]

    def err(q: torch.Tensor) -> float:
        return float((x @ (w - q).t()).square().sum())

    clipped = AWQ().quantize(w, codec, LayerStats(hessian=h, importance=h.diagonal()))
    plain = RTN().quantize(w, codec)
    assert err(clipped.dequantize()) < err(plain.dequantize())


@pytest.mark.parametrize("spec", [{"name": "nvfp4"}, {"name": "nf4", "double_quant": True}, {"name": "mxfp4"},
                                  {"name": "int", "bits": 4, "granularity": "channel"}])
def test_awq_quantize_works_with_other_codecs(spec: dict) -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(256, 128, generator=gen)
    w = torch.randn(32, 128, generator=gen) * 0.05
    qt = AWQ().quantize(w, codec_from_dict(spec), LayerStats(hessian=x.t() @ x / 256))
    assert torch.isfinite(qt.dequantize()).all()
    _ = copy.deepcopy(qt)
