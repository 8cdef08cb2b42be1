"""The quantized KV cache: generation with it gives the whole-sequence emulation's logits, it holds
packed codes, and the presets' bytes."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lowbit.codecs.kv import KVQuantizer
from lowbit.models.architectures import cache_argument
from lowbit.modules.kv_cache import QuantizedKVCache, emulate_kv_cache
from lowbit.recipes.kv_cache import kv_cache_spec

CASES = {
    "int4 KIVI": (KVQuantizer("int", 4, "channel", 8), KVQuantizer("int", 4, "token", 8), 5),
    "q8_0-like": (KVQuantizer("int", 8, "token", 16, True), KVQuantizer("int", 8, "token", 16, True), 0),
    "int2 KIVI": (KVQuantizer("int", 2, "channel", 16), KVQuantizer("int", 2, "token", 16), 20),
    "fp8": (KVQuantizer("fp8_e4m3", 8, "token", None, True), KVQuantizer("fp8_e4m3", 8, "token", None, True), 3),
    "fp8 static": (KVQuantizer("fp8_e4m3", 8, "token", None, True, 0.01), KVQuantizer("fp8_e5m2", 8, "token", None, True, 0.002), 0),
}


def per_layer(keys: KVQuantizer, values: KVQuantizer, layers: int) -> list[tuple[KVQuantizer, KVQuantizer]]:
    """The same codecs in every layer; static ones with a different scale in each (the layer of a
    scale must not get mixed up)."""
    def scaled(q: KVQuantizer, i: int) -> KVQuantizer:
        return q if q.static_scale is None else replace(q, static_scale=q.static_scale * (1 + i))
    return [(scaled(keys, i), scaled(values, i)) for i in range(layers)]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_teacher_forced_decoding_with_the_cache_gives_the_emulated_logits(tiny_model, family: str, case: str) -> None:  # type: ignore[no-untyped-def]
    keys, values, residual = CASES[case]
    model = tiny_model(family).double()  # float64: the two computations agree far below any quantization step
    ids = torch.randint(2, 256, (2, 60), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        layers = per_layer(keys, values, model.config.num_hidden_layers)
        with emulate_kv_cache(model, layers, residual):
            whole = model(ids, use_cache=False).logits
        cache = QuantizedKVCache(layers, residual)
        stepped = torch.cat([model(ids[:, t:t + 1], use_cache=True, **{cache_argument(model): cache}).logits
                             for t in range(ids.shape[1])], 1)  # one token at a time
        plain = model(ids, use_cache=False).logits
    torch.testing.assert_close(stepped, whole, rtol=0, atol=1e-5)
    assert (plain - stepped).abs().max() > 1e-3  # the cache really is quantized
    assert model.config._attn_implementation != "lowbit_kv_cache"  # restored


def test_int4_cache_holds_under_30_percent_of_bf16_bytes() -> None:
    kv = kv_cache_spec("int4")
    cache = QuantizedKVCache([(kv.keys.quantizer(), kv.values.quantizer())] * 2, kv.residual)
    gen = torch.Generator().manual_seed(0)
    tokens, heads, dim = 8192, 3, 64
    for layer in range(2):
        for chunk in torch.randn(1, heads, tokens, dim, generator=gen).to(torch.bfloat16).split(1024, dim=2):
            cache.update(chunk, chunk.clone(), layer)
    bf16 = 2 * 2 * heads * tokens * dim * 2  # layers x (keys, values) x values x 2 bytes
    assert cache.get_seq_length() == tokens
    assert cache.nbytes() <= 0.30 * bf16, cache.nbytes() / bf16
    first = cache.layers[0]
    assert first.k.buffer.shape[-2] < kv.residual + 32 and first.v.buffer.shape[-2] == kv.residual  # type: ignore[attr-defined]
    # every layer reads through one workspace: one layer's past (bf16 keys and values, float32
    # scratch), grown by at most half again, not one per layer or per read
    ws = cache.workspace.buffers
    assert all(layer.workspace is cache.workspace for layer in cache.layers)  # type: ignore[attr-defined]
    one_layer = heads * tokens * dim
    assert sum(b.numel() * b.element_size() for b in ws.values()) <= 1.5 * one_layer * (2 + 2 + 4)
    k, v = first.k.read(), first.v.read()  # type: ignore[attr-defined]
    assert k.untyped_storage().data_ptr() == ws["keys"].untyped_storage().data_ptr()
    assert v.shape == (1, heads, tokens, dim) and torch.isfinite(v).all()


def test_presets_and_bad_specs() -> None:
    from lowbit import LowbitError

    assert kv_cache_spec("int2").residual == 128 and kv_cache_spec("fp8").keys.format == "fp8_e4m3"
    with pytest.raises(LowbitError, match="unknown KV cache 'int3'"):
        kv_cache_spec("int3")
    with pytest.raises(LowbitError, match="int KV codes are 2, 4 or 8 bits"):
        kv_cache_spec({"keys": {"bits": 3}, "values": {}})
    with pytest.raises(LowbitError, match="kv_cache.keys: per-token groups of 48 do not divide a head of 64"):
        kv_cache_spec({"keys": {"group_size": 48}, "values": {}}).check_head_dim(64)
    with pytest.raises(LowbitError, match="window of 4096 tokens is longer than the model's context"):
        kv_cache_spec({"keys": {}, "values": {}, "residual": 4096}).check_head_dim(64, 2048)
