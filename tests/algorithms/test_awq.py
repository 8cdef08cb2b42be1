"""AWQ: the scale fold is an exact equivalence on every architecture's table entry, the scale
search never loses to no scaling, and the clip search minimizes the group output error."""

from __future__ import annotations

import copy

import pytest
import torch

from lowbit.algorithms import AWQ, RTN, LayerStats
from lowbit.calibration.statistics import StatsRequest
from lowbit.codecs.registry import codec_from_dict
from lowbit.models import architecture_of
from lowbit.pipeline.passes import capture_block_inputs, collect_step_statistics, run_block
from lowbit.transforms import AWQScale, StepContext
from lowbit.transforms.awq import search_scale


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma", "gemma2", "opt", "opt-post-ln", "phi3", "gpt2",
                                    "mistral"])
def test_fold_leaves_the_unquantized_model_unchanged(tiny_model, family: str) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model(family)
    arch = architecture_of(model)
    tokens = torch.randint(2, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=tokens, use_cache=False).logits
    block = arch.block_list(model)[0]
    inputs = capture_block_inputs(model, block, tokens, 2, torch.float32)
    expected = run_block(block, inputs, torch.float32)
    names = arch.linear_names()
    stats = collect_step_statistics(block, names, inputs, StatsRequest(hessian=True, means=True), torch.float32)
    codec = codec_from_dict({"name": "int", "bits": 3, "group_size": 16})
    folded = 0
    for s, step in enumerate(arch.steps):
        source = arch.scale_sources[s]
        before_w = {n: block.get_submodule(n).weight.detach().clone() for n in step}
        ctx = StepContext(block, "b", list(step), {n: codec for n in step}, stats[step[0]], source, arch.norm_plus_one)
        AWQScale(grid=8).apply(ctx)
        folded += any(not torch.equal(before_w[n], block.get_submodule(n).weight) for n in step)
    assert folded >= (1 if family == "opt-post-ln" else 2)  # scales really were folded (post-LN OPT: no norm takes one)
    got = run_block(block, inputs, torch.float32)
    for (a, _), (b, _) in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=tokens, use_cache=False).logits, before, rtol=1e-4, atol=1e-4)


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
