"""Compiled decoding on a static cache: the same greedy tokens as the eager path, in float32."""

from __future__ import annotations

import pytest
import torch

from lowbit.evaluation.compiled_decode import CompiledDecoder, generate_kwargs
from lowbit.evaluation.speed import measure_speed
from lowbit.pipeline import quantize_model
from lowbit.recipes import resolve_recipe

PROMPTS = [[5, 17, 99, 3], [200, 1, 1, 1, 1, 7, 42], [64]]


def _greedy(model: torch.nn.Module, prompt: list[int], new: int, **kw: object) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             top_p=None, top_k=None, pad_token_id=0, **kw)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_generate_compiled_gives_the_eager_tokens_on_a_quantized_model(tiny_model) -> None:  # type: ignore[no-untyped-def]
    torch._dynamo.reset()
    model = tiny_model("llama").eval()
    model.generation_config.eos_token_id = None  # the random model's tokens run on
    quantize_model(model, resolve_recipe("w4a16", group_size=32), progress=False)  # lowbit's own linears
    eager = [_greedy(model, p, 12) for p in PROMPTS]
    assert len({tuple(t) for t in eager}) > 1  # the prompts lead somewhere different
    compiled = [_greedy(model, p, 12, **generate_kwargs(model)) for p in PROMPTS]
    assert compiled == eager
    assert getattr(model, "_compiled_call", None) is not None  # transformers compiled the decode step


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_compiled_decoder_steps_as_the_eager_cache(tiny_model) -> None:  # type: ignore[no-untyped-def]
    torch._dynamo.reset()
    model = tiny_model("qwen2").eval()  # attention biases, grouped-query attention
    model.generation_config.eos_token_id = None
    decoder = CompiledDecoder(model, max_len=16)
    for prompt in PROMPTS:
        decoder.reset()
        with torch.inference_mode():
            nxt = decoder.prefill(torch.tensor([prompt])).argmax(-1, keepdim=True)
            tokens = [int(nxt)]
            for _ in range(8):
                nxt = decoder.step(nxt).argmax(-1, keepdim=True)
                tokens.append(int(nxt))
        assert tokens == _greedy(model, prompt, 9)
    assert decoder.eager_reason is None
    r = measure_speed(model, vocab_size=200, batch=2, prompt_tokens=5, new_tokens=3, repeats=1, compiled=True)
    assert r.compiled and r.compile_s is not None and r.decode_tokens_per_s > 0
    assert r.kv_bytes_per_token > 0


def test_a_quantized_kv_cache_is_refused(tiny_model) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama").eval()
    model.lowbit_kv_cache = object()
    with pytest.raises(ValueError, match="static"):
        generate_kwargs(model)
    with pytest.raises(ValueError, match="static"):
        measure_speed(tiny_model("llama").eval(), vocab_size=200, prompt_tokens=4, new_tokens=2, repeats=1,
                      new_cache=lambda: None, compiled=True)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_each_model_keeps_its_own_compiled_step(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """The compiled step skips the checks on a model's modules (guards). Models of one structure must still
    each run their own graph: one whose norms hold another constant (baked into a graph, checked only by a
    module guard), and a quantized one (its step breaks the graph, so it takes transformers' guarded path)."""
    import copy

    torch._dynamo.reset()
    dense = tiny_model("llama").eval()
    other = copy.deepcopy(dense)
    for module in other.modules():
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = 0.5
    quantized = copy.deepcopy(dense)
    quantize_model(quantized, resolve_recipe("w4a16", group_size=32), progress=False)
    prompt = torch.tensor([PROMPTS[1]])

    def logits(model: torch.nn.Module, decoder: CompiledDecoder | None) -> torch.Tensor:
        with torch.inference_mode():
            if decoder is None:  # eager, no cache: every position at once
                ids = torch.cat([prompt, torch.tensor([[11, 23]])], dim=1)
                return model(ids).logits[0, -2:]
            decoder.reset()
            decoder.prefill(prompt)
            return torch.cat([decoder.step(torch.tensor([[11]])), decoder.step(torch.tensor([[23]]))])

    models = {"dense": dense, "other": other, "quantized": quantized}
    decoders = {name: CompiledDecoder(m, 16) for name, m in models.items()}
    for name in ["dense", "other", "quantized", "dense"]:  # each compiles after the one before; then the first again
        eager, compiled = logits(models[name], None), logits(models[name], decoders[name])
        assert torch.allclose(compiled, eager, atol=1e-4, rtol=1e-4), name
        assert decoders[name].eager_reason is None
    for name in ("other", "quantized"):  # the models' outputs differ by far more than the tolerance above
        assert (logits(dense, None) - logits(models[name], None)).abs().max() > 1e-2
