"""One-query attention against torch's SDPA (float64) and transformers' own path for more queries."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.modules import decode_attention, native
from lowbit.modules.decode_attention import NAME, one_query_attention, use_one_query_attention


class _Module(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)  # transformers' repeat_kv
    out = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


@pytest.mark.parametrize("path", ["native", "matmuls"])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (14, 2)])
def test_one_query_attention_matches_sdpa(mask_kind: str, heads: int, kv_heads: int, path: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    if path == "native" and not native.row_products():
        pytest.skip("lowbit's decode operators are not built (or not vectorized) here")
    monkeypatch.setattr(decode_attention, "_operator_here", [path == "native"])
    g = torch.Generator().manual_seed(heads)
    batch, length = 2, 23
    dim = {9: 64, 4: 40, 14: 24}[heads]  # whole 16-value steps, and ragged ends the operator reads masked
    q = torch.randn(batch, heads, 1, dim, generator=g)
    k = torch.randn(batch, kv_heads, length, dim, generator=g)
    v = torch.randn(batch, kv_heads, length, dim, generator=g)
    mask = None
    if mask_kind != "none":  # a static cache: the last positions are not written yet
        keep = torch.ones(batch, 1, 1, length, dtype=torch.bool)
        keep[0, ..., 17:] = False
        keep[1, ..., 20:] = False
        mask = keep if mask_kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    out, weights = one_query_attention(_Module(heads // kv_heads), q, k, v, mask, scaling=0.125)
    assert weights is None and out.shape == (batch, 1, heads, dim)
    ref_mask = None if mask is None else (mask if mask.dtype == torch.bool else mask.double())
    torch.testing.assert_close(out.double(), _reference(q, k, v, ref_mask, 0.125), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not native.row_products(), reason="lowbit's decode operators are not built here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_operator_reads_a_static_cache_in_place(dtype: torch.dtype) -> None:
    # a cache with room for 40 positions, 29 written: strided views, a mask per sequence
    g = torch.Generator().manual_seed(3)
    cache_k = torch.randn(2, 3, 40, 64, generator=g).to(dtype)
    cache_v = torch.randn(2, 3, 40, 64, generator=g).to(dtype)
    q = torch.randn(2, 9, 64, generator=g).to(dtype)
    keep = torch.zeros(2, 40, dtype=torch.bool)
    keep[0, :29] = True
    keep[1, :11] = True
    out = torch.ops.lowbit.one_query_attention(q, cache_k[:, :, :35], cache_v[:, :, :35], keep[:, :35], 0.125)
    assert out.shape == (2, 1, 9, 64) and out.dtype == dtype
    ref = _reference(q.unsqueeze(2).float(), cache_k.float(), cache_v.float(), keep[:, None, None, :], 0.125)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's one rounding
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("case", ["bf16 window", "masked window", "queries after a cache", "not causal"])
def test_more_queries_take_transformers_sdpa_path(case: str) -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(0)
    keys = 7 if case == "queries after a cache" else 5
    q, k, v = (torch.randn(1, 4, 5, 32, generator=g), torch.randn(1, 2, keys, 32, generator=g),
               torch.randn(1, 2, keys, 32, generator=g))
    if case == "bf16 window":
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    mask = torch.ones(1, 1, 5, keys, dtype=torch.bool).tril(keys - 5) if case == "masked window" else None
    module = _Module(2)
    module.is_causal = case != "not causal"
    ours, _ = one_query_attention(module, q, k, v, mask, scaling=0.2)
    theirs, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.2)
    assert torch.equal(ours, theirs)


@pytest.mark.skipif(not native.row_products(), reason="lowbit's operators are not built (or not vectorized) here")
@pytest.mark.parametrize("heads,kv_heads,length,dim", [(9, 3, 512, 64), (4, 4, 37, 40), (14, 2, 200, 64), (6, 2, 33, 64),
                                                       (2, 1, 2, 16)])
def test_a_whole_float32_window_takes_lowbits_causal_attention(heads: int, kv_heads: int, length: int,
                                                               dim: int) -> None:
    g = torch.Generator().manual_seed(length)
    # the query as transformers passes it: (B, H, L, D) over a (B, L, H, D) tensor
    q = torch.randn(2, length, heads, dim, generator=g).transpose(1, 2)
    k, v = (torch.randn(2, kv_heads, length, dim, generator=g) for _ in range(2))
    decode_attention._operator_here[0] = True
    calls = []
    real = torch.ops.lowbit.causal_attention

    class Spy:
        def __call__(self, *args: object) -> torch.Tensor:
            calls.append(1)
            return real(*args)

    ops = torch.ops.lowbit
    try:
        torch.ops.lowbit.__dict__["causal_attention"] = Spy()
        out, _ = one_query_attention(_Module(heads // kv_heads), q, k, v, None, scaling=dim ** -0.5)
    finally:
        ops.__dict__["causal_attention"] = real
    assert calls == [1] and out.shape == (2, length, heads, dim) and out.dtype == torch.float32
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    expected = _reference(q, k, v, causal, dim ** -0.5)
    assert (out.double() - expected).abs().max() < 1e-5


def test_a_model_decodes_the_same_tokens_with_it() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 200, (2, 7))
    with torch.inference_mode():
        before = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
        assert use_one_query_attention(model) and model.config._attn_implementation == NAME
        after = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert torch.equal(before, after)
    assert not use_one_query_attention(model)  # only a model on SDPA switches
