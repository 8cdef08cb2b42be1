"""evaluate(): perplexity, KLD, top-1 and delta PPL against float64 references written here,
and the on-disk cache of reference log-probs."""

from __future__ import annotations

import copy
import math
import tempfile

import numpy as np
import pytest
import torch

from lowbit import LowbitError
from lowbit.calibration import Text
from lowbit.evaluation import evaluate, tokenize
from lowbit.pipeline import quantize_model
from lowbit.recipes import resolve_recipe

SEQ = 64


def _text(text_factory, n: int = 600, seed: int = 0) -> Text:  # type: ignore[no-untyped-def]
    return Text(f"sample{seed}", text_factory(n, seed=seed))


def ref_logprobs(model, ids: list[int], seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:  # type: ignore[no-untyped-def]
    """float64 log-softmax rows and their targets for non-overlapping chunks of ``seq_len``:
    each chunk predicts its own tokens 1..end (the first token of a chunk is context only)."""
    out = []
    with torch.no_grad():
        for b in range(0, len(ids), seq_len):
            chunk = ids[b : b + seq_len]
            if len(chunk) < 2:
                continue
            logits = model(input_ids=torch.tensor([chunk])).logits[0].double()
            lp = torch.log_softmax(logits, dim=-1)[:-1].numpy()
            out.append((lp, np.array(chunk[1:])))
    return out


def ref_ppl(rows) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    nll = sum(-lp[np.arange(len(t)), t].sum() for lp, t in rows)
    n = sum(len(t) for _, t in rows)
    return math.exp(nll / n), n


def test_perplexity_matches_float64_reference(tiny_model, tokenizer_stub, text_factory) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama")
    text = _text(text_factory)
    ids = [ord(c) % 256 for c in text.text]
    r = evaluate(model, tokenizer_stub, text, seq_len=SEQ, progress=False)
    want, n = ref_ppl(ref_logprobs(model, ids, SEQ))
    assert r.tokens == n == 600 - math.ceil(600 / SEQ)
    assert r.windows == math.ceil(600 / SEQ)
    assert r.ppl == pytest.approx(want, rel=1e-5)
    assert (r.seq_len, r.stride, r.dtype, r.text) == (SEQ, SEQ, "float32", "sample0")
    assert r.kld is None and r.ref_ppl is None and r.top1 is None and r.delta_ppl is None
    assert r.seconds > 0
    # a random model is near-uniform over 256 tokens, not exactly
    assert 100 < r.ppl < 600 and r.ppl != pytest.approx(256, rel=1e-3)


def test_perplexity_with_stride_and_max_windows(tiny_model, tokenizer_stub, text_factory) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama")
    text = _text(text_factory, 300)
    ids = [ord(c) % 256 for c in text.text]
    r = evaluate(model, tokenizer_stub, text, seq_len=SEQ, max_windows=2, progress=False)
    want, n = ref_ppl(ref_logprobs(model, ids[: 2 * SEQ], SEQ))
    assert r.tokens == n == 2 * (SEQ - 1) and r.windows == 2
    assert r.ppl == pytest.approx(want, rel=1e-5)
    # stride 32: window k>0 feeds ids[32k : 32k+64] and scores its last 32 targets
    r2 = evaluate(model, tokenizer_stub, text, seq_len=SEQ, stride=32, progress=False)
    nll, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(ids), 32):
            chunk = ids[b : b + SEQ]
            lp = torch.log_softmax(model(input_ids=torch.tensor([chunk])).logits[0].double(), -1)
            first = 1 if b == 0 else SEQ - 32
            for pos in range(first, len(chunk)):
                nll -= float(lp[pos - 1, chunk[pos]])
                count += 1
            if b + SEQ >= len(ids):
                break
    assert r2.tokens == count == 299 and r2.stride == 32
    assert r2.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_against_identical_reference(tiny_model, tokenizer_stub, text_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama")
    ref = copy.deepcopy(model)
    r = evaluate(model, tokenizer_stub, _text(text_factory), ref=ref, seq_len=SEQ, cache_dir=tmp_path, progress=False)
    assert r.kld < 1e-6 and r.kld_p99 < 1e-5  # the floor of the 16-bit reference rows
    assert r.top1 == 1.0
    assert r.ref_ppl == pytest.approx(r.ppl, rel=1e-6)
    assert abs(r.delta_ppl) < 1e-6 * r.ppl


def test_kld_matches_float64_reference(tiny_model, tokenizer_stub, text_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ref = tiny_model("llama")
    model = copy.deepcopy(ref)
    quantize_model(model, resolve_recipe("w3a16"), progress=False)  # a genuinely different model
    text = _text(text_factory)
    ids = [ord(c) % 256 for c in text.text]
    r = evaluate(model, tokenizer_stub, text, ref=ref, seq_len=SEQ, cache_dir=tmp_path, progress=False)

    p_rows = ref_logprobs(ref, ids, SEQ)
    q_rows = ref_logprobs(model, ids, SEQ)
    kl = np.concatenate([(np.exp(p) * (p - q)).sum(-1) for (p, _), (q, _) in zip(p_rows, q_rows)])
    agree = np.concatenate([p.argmax(-1) == q.argmax(-1) for (p, _), (q, _) in zip(p_rows, q_rows)])
    assert r.kld > 1e-4  # the quantized model differs
    assert r.kld == pytest.approx(kl.mean(), rel=1e-3)
    assert r.kld_p99 == pytest.approx(np.quantile(kl, 0.99), rel=1e-3)
    assert r.top1 == pytest.approx(agree.mean(), abs=1.5 / len(agree))  # at most one near-tie flips
    assert r.top1 < 1.0
    ppl, _ = ref_ppl(q_rows)
    rppl, _ = ref_ppl(p_rows)
    assert r.ppl == pytest.approx(ppl, rel=1e-5)
    assert r.ref_ppl == pytest.approx(rppl, rel=1e-5)
    assert r.delta_ppl == pytest.approx(ppl - rppl, rel=1e-3, abs=1e-4)


def test_fast_float32_products_leave_the_results_unchanged(tiny_model, tokenizer_stub, text_factory, tmp_path,
                                                          monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # evaluation's float32 products run oneDNN's GEMM (lowbit.modules.rows_linear) and its windows lowbit's causal
    # attention (decode_attention); without them, F.linear's (MKL) and SDPA
    from lowbit.modules import rows_linear

    ref = tiny_model("llama")
    model = copy.deepcopy(ref)
    quantize_model(model, resolve_recipe("w3a16"), progress=False)
    text = _text(text_factory)
    before = model.config._attn_implementation
    fast = evaluate(model, tokenizer_stub, text, ref=ref, seq_len=SEQ, cache_dir=tmp_path / "a", progress=False)
    assert model.config._attn_implementation == before  # lowbit's attention only inside evaluate
    monkeypatch.setattr(rows_linear, "onednn_linear", lambda: False)
    monkeypatch.setattr(rows_linear, "row_products", lambda: False)
    plain = evaluate(model, tokenizer_stub, text, ref=ref, seq_len=SEQ, cache_dir=tmp_path / "b", progress=False)
    assert fast.ppl == pytest.approx(plain.ppl, rel=1e-6) and fast.ref_ppl == pytest.approx(plain.ref_ppl, rel=1e-6)
    assert fast.kld == pytest.approx(plain.kld, rel=1e-4) and fast.top1 == plain.top1


@pytest.mark.parametrize("family", ["llama", "gemma2", "opt"])
def test_the_lm_head_scored_some_rows_at_a_time_gives_the_whole_windows_results(  # type: ignore[no-untyped-def]
        tiny_model, tokenizer_stub, text_factory, tmp_path, monkeypatch, family: str) -> None:
    from lowbit.evaluation import reference

    ref = tiny_model(family)
    model = copy.deepcopy(ref)
    quantize_model(model, resolve_recipe("w3a16"), progress=False)
    head = model.get_output_embeddings()
    # Gemma 2 soft-caps its logits after the head: its windows are scored from the model's own logits
    assert (reference._separable_head(model) is None) == (family == "gemma2")
    monkeypatch.setattr(reference, "SCORE_ROWS", 7)  # 63 scored rows a window: 9 chunks
    text = _text(text_factory)
    ids = [ord(c) % 256 for c in text.text]
    r = evaluate(model, tokenizer_stub, text, ref=ref, seq_len=SEQ, cache_dir=tmp_path, progress=False)
    assert model.get_output_embeddings() is head  # the head is back in place
    p_rows, q_rows = ref_logprobs(ref, ids, SEQ), ref_logprobs(model, ids, SEQ)
    kl = np.concatenate([(np.exp(p) * (p - q)).sum(-1) for (p, _), (q, _) in zip(p_rows, q_rows)])
    assert r.ppl == pytest.approx(ref_ppl(q_rows)[0], rel=1e-5)
    assert r.ref_ppl == pytest.approx(ref_ppl(p_rows)[0], rel=1e-5)
    assert r.kld > 1e-4 and r.kld == pytest.approx(kl.mean(), rel=1e-3)


def _count_forwards(model) -> list[int]:  # type: ignore[no-untyped-def]
    calls = [0]
    model.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_reference_cache_is_reused_and_keyed_by_text(tiny_model, tokenizer_stub, text_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ref = tiny_model("llama")
    model = copy.deepcopy(ref)
    quantize_model(model, resolve_recipe("w4a16-g64"), progress=False)
    calls = _count_forwards(ref)
    text = _text(text_factory)
    first = evaluate(model, tokenizer_stub, text, ref=ref, seq_len=SEQ, cache_dir=tmp_path, progress=False)
    assert calls[0] == first.windows
    entries = list((tmp_path / "reference").iterdir())
    assert len(entries) == 1 and (entries[0] / "logprobs.npy").is_file() and (entries[0] / "nll.npy").is_file()

    second = evaluate(model, tokenizer_stub, text, ref=ref, seq_len=SEQ, cache_dir=tmp_path, progress=False)
    assert calls[0] == first.windows  # the reference model did not run again
    assert (second.kld, second.top1, second.ref_ppl, second.ppl) == (first.kld, first.top1, first.ref_ppl, first.ppl)

    other = _text(text_factory, seed=1)
    evaluate(model, tokenizer_stub, other, ref=ref, seq_len=SEQ, cache_dir=tmp_path, progress=False)
    assert calls[0] == 2 * first.windows  # another text: computed again
    assert len(list((tmp_path / "reference").iterdir())) == 2

    # another window protocol: computed again
    evaluate(model, tokenizer_stub, text, ref=ref, seq_len=32, cache_dir=tmp_path, progress=False)
    assert calls[0] > 2 * first.windows
    n = calls[0]
    # changed reference weights: computed again (and the numbers change)
    with torch.no_grad():
        ref.model.norm.weight.mul_(1.5)
    third = evaluate(model, tokenizer_stub, text, ref=ref, seq_len=SEQ, cache_dir=tmp_path, progress=False)
    assert calls[0] == n + first.windows
    assert third.ref_ppl != first.ref_ppl
    assert not [p for p in (tmp_path / "reference").iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_no_cache_dir_leaves_nothing(tiny_model, tokenizer_stub, text_factory, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    ref = tiny_model("llama")
    r = evaluate(copy.deepcopy(ref), tokenizer_stub, _text(text_factory), ref=ref, seq_len=SEQ, cache_dir=None,
                 progress=False)
    assert r.kld < 1e-6
    assert list(scratch.iterdir()) == []


def test_corrupt_cache_entry_is_recomputed(tiny_model, tokenizer_stub, text_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ref = tiny_model("llama")
    text = _text(text_factory)
    first = evaluate(copy.deepcopy(ref), tokenizer_stub, text, ref=ref, seq_len=SEQ, cache_dir=tmp_path, progress=False)
    entry = next((tmp_path / "reference").iterdir())
    np.save(entry / "logprobs.npy", np.zeros((3, 256), dtype=np.float32))  # wrong row count
    model = copy.deepcopy(ref)
    calls = _count_forwards(ref)
    again = evaluate(model, tokenizer_stub, text, ref=ref, seq_len=SEQ, cache_dir=tmp_path, progress=False)
    assert calls[0] == first.windows
    assert again.kld == first.kld and again.ref_ppl == first.ref_ppl


def test_bfloat16_evaluation(tiny_model, tokenizer_stub, text_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ref = tiny_model("llama")
    model = copy.deepcopy(ref)
    r = evaluate(model, tokenizer_stub, _text(text_factory), ref=ref, seq_len=SEQ, dtype=torch.bfloat16,
                 cache_dir=tmp_path, progress=False)
    assert r.dtype == "bfloat16"
    assert next(model.parameters()).dtype == torch.bfloat16
    assert next(ref.parameters()).dtype == torch.float32
    assert 0 < r.kld < 0.05 and r.top1 > 0.5


def test_dtype_none_leaves_the_model_uncast(tiny_model, tokenizer_stub, text_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A model another library quantized refuses ``.to(dtype)``: ``dtype=None`` runs it as it is."""
    ref = tiny_model("llama")
    model = copy.deepcopy(ref).to(torch.bfloat16)

    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("evaluate cast the model")

    model.to = refuse  # type: ignore[method-assign]
    r = evaluate(model, tokenizer_stub, _text(text_factory), ref=ref, seq_len=SEQ, dtype=None, cache_dir=tmp_path,
                 progress=False)
    cast = evaluate(copy.deepcopy(ref), tokenizer_stub, _text(text_factory), ref=ref, seq_len=SEQ,
                    dtype=torch.bfloat16, cache_dir=tmp_path, progress=False)
    assert r.dtype == "bfloat16" and (r.kld, r.ppl) == (cast.kld, cast.ppl)


@pytest.mark.parametrize("content", ["", "   \n\t "])
def test_empty_text(tiny_model, tokenizer_stub, content: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(LowbitError, match="empty"):
        evaluate(tiny_model("llama"), tokenizer_stub, Text("e", content), seq_len=SEQ, progress=False)


def test_too_short_text(tiny_model, tokenizer_stub) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(LowbitError, match="too short"):
        evaluate(tiny_model("llama"), tokenizer_stub, Text("s", "short text"), seq_len=SEQ, progress=False)


def test_token_outside_vocabulary(tiny_model, text_factory) -> None:  # type: ignore[no-untyped-def]
    def unicode_ids(text, **kwargs):  # type: ignore[no-untyped-def]
        return {"input_ids": [ord(c) for c in text]}

    with pytest.raises(LowbitError, match="token id 8364 is outside the model's vocabulary"):
        evaluate(tiny_model("llama"), unicode_ids, Text("t", "€" * 40 + text_factory(100)), seq_len=SEQ,
                 progress=False)


def test_vocabulary_mismatch(tiny_model, tokenizer_stub, text_factory) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(LowbitError, match="vocabulary"):
        evaluate(tiny_model("llama"), tokenizer_stub, _text(text_factory), ref=tiny_model("llama", vocab_size=300),
                 seq_len=SEQ, progress=False)


def test_tokenize_asks_for_no_special_tokens() -> None:
    seen = {}

    def tok(text, **kwargs):  # type: ignore[no-untyped-def]
        seen.update(kwargs)
        return {"input_ids": [1, 2, 3]}

    ids = tokenize(tok, Text("t", "abc"))
    assert ids.dtype == torch.int64 and ids.tolist() == [1, 2, 3]
    assert seen["add_special_tokens"] is False
