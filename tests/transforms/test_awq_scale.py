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


def test_scored_by_gptq_the_search_never_loses_to_gptq_alone() -> None:
    # AWQ's RTN score picks a scale for codes GPTQ will not choose; scored by GPTQ's own codes on
    # the scaled weights and the scaled input's Hessian, the no-scaling candidate is GPTQ alone
    from lowbit.algorithms import GPTQ, LayerStats

    gen = torch.Generator().manual_seed(4)  # a case where RTN's best scale is not GPTQ's (most agree)
    rows = torch.randn(512, 64, generator=gen) * torch.exp(2 * torch.randn(64, generator=gen))
    w = [torch.randn(32, 64, generator=gen) * 0.1, torch.randn(16, 64, generator=gen) * 0.1]
    codec = codec_from_dict({"name": "int", "bits": 4, "group_size": 32})
    h = rows.t() @ rows / rows.shape[0]
    gptq = GPTQ()

    def chosen(scaled: list[torch.Tensor], s: torch.Tensor) -> list[torch.Tensor]:
        hs = h / torch.outer(s, s)  # X diag(1/s): the scaled input's Hessian
        return [q.dequantize() for q in gptq.quantize_stacked(scaled, codec, LayerStats(hessian=hs, n_tokens=512))]

    def err(s: torch.Tensor) -> float:
        q = torch.cat([x / s for x in chosen([x * s for x in w], s)])
        return float((rows @ (q - torch.cat(w)).t()).square().mean())

    by_gptq = search_scale(w, [codec, codec], h, rows.abs().mean(0), grid=10, quantize=chosen)
    by_rtn = search_scale(w, [codec, codec], h, rows.abs().mean(0), grid=10)
    assert err(by_gptq) <= err(torch.ones(64))
    assert err(by_gptq) < 0.99 * err(by_rtn)
