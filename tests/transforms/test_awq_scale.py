"""AWQ's scale search (the awq transform; its fold is checked on every family in test_scaling)."""

from __future__ import annotations

import torch

from lowbit.codecs.registry import codec_from_dict
from lowbit.transforms.awq import search_scale


def test_scale_search_never_loses_to_no_scaling() -> None:
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(512, 64, generator=gen) * torch.exp(2 * torch.randn(64, generator=gen))  # outlier channels
    w = [torch.randn(32, 64, generator=gen) * 0.1, torch.randn(16, 64, generator=gen) * 0.1]
    codec = codec_from_dict({"name": "int", "bits": 3, "group_size": 32})

    def err(s: torch.Tensor) -> float:
        q = torch.cat([codec.quantize(x * s).dequantize() / s for x in w])
        return float((rows @ (q - torch.cat(w)).t()).square().mean())

    s = search_scale(w, [codec, codec], rows.t() @ rows / rows.shape[0], rows.abs().mean(0), grid=20)
    assert err(s) <= err(torch.ones(64))
    assert err(s) < 0.9 * err(torch.ones(64))  # with outlier channels scaling really helps
