"""llama-perplexity's protocol computed by lowbit (the second half of each chunk scored), against
a float64 computation of the same thing written out position by position."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.bench.llama_cpp import perplexity_like_llama_cpp


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_perplexity_like_llama_cpp_scores_the_second_half_of_each_chunk(tiny_model, batch: int) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama").eval()
    torch.manual_seed(0)
    n_ctx, chunks = 16, 5
    ids = torch.randint(0, model.config.vocab_size, (n_ctx * chunks + 7,))  # a ragged tail is dropped
    nll, count = 0.0, 0
    with torch.no_grad():
        for c in range(chunks):
            window = ids[c * n_ctx:(c + 1) * n_ctx]
            logits = model(input_ids=window[None]).logits[0].double()
            for pos in range(n_ctx // 2, n_ctx - 1):
                nll -= float(torch.log_softmax(logits[pos], -1)[window[pos + 1]])
                count += 1
    want = math.exp(nll / count)
    assert perplexity_like_llama_cpp(model, ids, n_ctx, chunks=chunks, batch=batch) == pytest.approx(want, rel=1e-6)
    # at most the chunks the ids hold
    assert perplexity_like_llama_cpp(model, ids, n_ctx, chunks=99, batch=batch) == pytest.approx(want, rel=1e-6)


def test_kld_like_llama_cpp_scores_the_second_half_of_each_chunk(tiny_model) -> None:  # type: ignore[no-untyped-def]
    from lowbit.bench.llama_cpp import kld_like_llama_cpp

    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    ids = torch.randint(2, 256, (100,), generator=torch.Generator().manual_seed(0))
    same = kld_like_llama_cpp(a, a, ids, n_ctx=32, chunks=8)
    assert same["kld"] == 0 and same["top1"] == 1 and same["tokens"] == 3 * 15
    got = kld_like_llama_cpp(a, b, ids, n_ctx=32, chunks=2)
    kl, n = 0.0, 0
    with torch.no_grad():
        for chunk in ids[:64].view(2, 32):  # positions 16..30 predict tokens 17..31
            lp = torch.log_softmax(a(chunk[None]).logits[0].double(), -1)[16:31]
            lr = torch.log_softmax(b(chunk[None]).logits[0].double(), -1)[16:31]
            kl += float((lr.exp() * (lr - lp)).sum())
            n += 15
    assert got["kld"] == pytest.approx(kl / n, rel=1e-9) and got["tokens"] == n
