"""Speed and memory measurement: the counts it reports follow the model it measures."""

from __future__ import annotations

import torch

from lowbit.codecs.kv import KVQuantizer
from lowbit.evaluation.speed import (held_bytes, measure_speed, peak_resident_bytes, prefill, reset_peak,
                                     resident_bytes)
from lowbit.models.architectures import returned_cache
from lowbit.modules.kv_cache import QuantizedKVCache, emulate_kv_cache
from lowbit.modules import enable_fast_kernels
from lowbit.pipeline import quantize_model
from lowbit.recipes import resolve_recipe


def test_held_bytes_counts_each_storage_once_and_kernels_instead_of_codes(tiny_model) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama", tie_word_embeddings=True)
    model.tie_weights()
    dense = sum(p.numel() * p.element_size() for p in model.parameters())  # the tied table once
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert held_bytes(model) == dense + buffers
    quantize_model(model, resolve_recipe("w4a16", group_size=32), progress=False)
    before = held_bytes(model)
    enable_fast_kernels(model)
    kernels = [m.kernel for m in model.modules() if getattr(m, "kernel", None) is not None]
    codes = sum(k.codes().numel() for k in kernels) // 2  # 4-bit codes, as the layer held them
    assert held_bytes(model) == before - codes + sum(k.nbytes for k in kernels)


def test_measure_speed_counts_every_sequence(tiny_model) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama").eval()
    r = measure_speed(model, vocab_size=200, batch=2, prompt_tokens=6, new_tokens=3, repeats=2)
    assert (r.batch, r.prompt_tokens, r.new_tokens) == (2, 6, 3)
    assert r.prefill_tokens_per_s > 0 and r.decode_tokens_per_s > 0


def test_prefill_computes_the_last_positions_logits_only(tiny_model) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama").eval()
    shapes = []
    model.register_forward_hook(lambda m, args, out: shapes.append(tuple(out.logits.shape)))
    measure_speed(model, vocab_size=200, batch=2, prompt_tokens=6, new_tokens=3, repeats=1)
    assert shapes[0] == (2, 1, 256) and len(shapes) == 2 * (1 + 3)  # prefill, then 3 decode steps, twice


def test_peak_memory_follows_an_allocation() -> None:
    import mmap

    if resident_bytes() is None:
        return  # no /proc here
    assert reset_peak()
    base = peak_resident_bytes()
    # fresh pages, touched (a tensor may be served from memory an earlier test freed and the
    # allocator kept resident)
    block = mmap.mmap(-1, 64 * 2**20)
    block.write(b"\1" * len(block))
    assert peak_resident_bytes() >= base + 60 * 2**20
    block.close()


def test_a_chunked_prefill_gives_the_whole_prompts_logits_and_cache(tiny_model) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama").double().eval()
    ids = torch.randint(2, 256, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = prefill(model, ids)
        chunked = prefill(model, ids, chunk=5)  # 5 + 5 + 5 + 5 + 3 tokens
    torch.testing.assert_close(chunked.logits, whole.logits, rtol=0, atol=1e-10)
    assert returned_cache(chunked).get_seq_length() == 23
    r = measure_speed(model.float(), vocab_size=200, prompt_tokens=6, new_tokens=2, repeats=1, prefill_chunk=4)
    assert r.prefill_chunk == 4
    assert measure_speed(model, vocab_size=200, prompt_tokens=6, new_tokens=2, repeats=1).prefill_chunk is None


def test_a_chunked_prefill_reads_the_quantized_cache_as_decoding_does(tiny_model) -> None:  # type: ignore[no-untyped-def]
    # per-token codes and no window: a token reads every key and value quantized, its own
    # included, whether the prompt goes in at once, in chunks or one token at a time
    model = tiny_model("llama").double().eval()
    layers = [(KVQuantizer("int", 4, "token", 16), KVQuantizer("int", 4, "token", 16))] * model.config.num_hidden_layers
    ids = torch.randint(2, 256, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with emulate_kv_cache(model, layers):
            expected = model(ids, use_cache=False).logits[:, -1:]
        chunked = prefill(model, ids, QuantizedKVCache(layers), chunk=7)
        exact = prefill(model, ids, chunk=7)
    torch.testing.assert_close(chunked.logits, expected, rtol=0, atol=1e-8)
    assert (exact.logits - expected).abs().max() > 1e-3  # the cache really is quantized
