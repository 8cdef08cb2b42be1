"""Continuous batching: rows join and leave one KV cache; each row's tokens are its unbatched ones."""

from __future__ import annotations

import torch

from lowbit.evaluation.continuous_batching import _Batch, decode_continuously, left_pad
from conftest import build_tiny_model


def _model(family: str = "llama") -> torch.nn.Module:
    return build_tiny_model(family, vocab_size=256).double()


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(2, 256, (n,), generator=gen).tolist() for n in (17, 3, 40, 9, 28, 11, 5)]


def test_left_pad() -> None:
    ids, mask = left_pad([[5, 6, 7], [8], []], pad=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]


def test_greedy_rows_equal_unbatched_generate_with_rows_stopping_at_different_steps() -> None:
    model, prompts = _model("qwen2"), _prompts()
    limits = [3, 11, 6, 1, 9, 4, 12]  # each prompt stops after its own number of tokens

    got = decode_continuously(model, prompts, finished=lambda i, ids: len(ids) >= limits[i], max_new_tokens=12,
                              batch_size=3, pad_id=0)
    for ids, new, n in zip(prompts, got, limits):
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
                             max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert new == out[0, len(ids):].tolist()


def test_samples_do_not_depend_on_which_rows_share_a_step() -> None:
    model, prompts = _model(), _prompts()
    kw = dict(finished=lambda i, ids: False, max_new_tokens=6, pad_id=0, temperature=1.0, seed=3)
    alone = decode_continuously(model, prompts, batch_size=1, **kw)  # type: ignore[arg-type]
    shared = decode_continuously(model, prompts, batch_size=4, order=[6, 2, 0, 5, 1, 4, 3], **kw)  # type: ignore[arg-type]
    other_seed = decode_continuously(model, prompts, batch_size=4, **{**kw, "seed": 4})  # type: ignore[arg-type]
    assert alone == shared and alone != other_seed
    assert len({tuple(x) for x in alone}) == len(prompts)


def test_order_sets_admission_and_on_done_reports_each_prompt_once() -> None:
    model, prompts = _model(), _prompts()
    done: list[int] = []
    decode_continuously(model, prompts, finished=lambda i, ids: len(ids) >= 1 + i % 3, max_new_tokens=8,
                        batch_size=2, pad_id=0, order=[3, 1, 4, 0, 2, 6, 5], on_done=done.append)
    assert sorted(done) == list(range(len(prompts)))
    assert done[:2] == [3, 1]  # 3 and 1 entered first; 3 (one token) stops before 1 (two tokens)


def test_leaving_rows_take_their_unused_columns_with_them() -> None:
    batch = _Batch()
    batch.rows = [7, 8, 9]
    batch.mask = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    batch.pos = torch.tensor([2, 5, 4])
    batch.last = torch.tensor([11, 12, 13])
    keys = torch.arange(3 * 5, dtype=torch.float64).reshape(3, 1, 5, 1)

    class Layer:
        def __init__(self) -> None:
            self.keys, self.values = keys.clone(), -keys.clone()

    batch.cache = type("Cache", (), {"layers": [Layer(), Layer()]})()
    batch.keep([0, 2])  # the row with the longest history leaves: column 0 is nobody's now
    assert batch.rows == [7, 9]
    assert batch.mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert batch.pos.tolist() == [2, 4] and batch.last.tolist() == [11, 13]
    for layer in batch.cache.layers:
        assert torch.equal(layer.keys, keys[[0, 2], :, 1:])
        assert torch.equal(layer.values, -keys[[0, 2], :, 1:])
