"""Tokenizers as GGUF metadata: SentencePiece BPE scores and types, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_byte_level_tokenizer, make_sentencepiece_tokenizer

from lowbit import LowbitError
from lowbit.io.gguf_tokenizer import BYTE, CONTROL, NORMAL, UNUSED, add_tokenizer, space_prefix

TEXTS = ["Hello world \u20ac na\u00efve  two  spaces\nnew line", "a\n\n b", "The return statement: \u00fcn\u00efc\u00f6d\u00e9 \u2211 \u6f22\u5b57",
         "def f(x):\n    return x ** 2  # square\n", "x"]


class Recorder:
    """A GGUF writer that keeps what it is given: ``fields[name] = first argument``."""

    def __init__(self) -> None:
        self.fields: dict[str, object] = {}

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return lambda *a: self.fields.__setitem__(name.removeprefix("add_"), a[0] if a else None)


@pytest.mark.parametrize("dummy_prefix", [True, False])
def test_the_test_tokenizer_is_huggingfaces_conversion_of_a_sentencepiece_model(tmp_path: Path, dummy_prefix: bool) -> None:
    fast, sp = make_sentencepiece_tokenizer(tmp_path, dummy_prefix)
    for text in TEXTS:
        assert fast(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text
    assert any(sp.is_byte(i) for t in TEXTS for i in sp.encode(t))  # byte fallback is exercised


@pytest.mark.parametrize("dummy_prefix", [True, False])
def test_sentencepiece_vocabulary_scores_types_and_prefix(tmp_path: Path, dummy_prefix: bool) -> None:
    fast, sp = make_sentencepiece_tokenizer(tmp_path, dummy_prefix)
    w = Recorder()
    add_tokenizer(w, fast, n_vocab=sp.get_piece_size() + 3)  # the model's embedding has 3 rows more
    f = w.fields
    assert (f["tokenizer_model"], f["tokenizer_pre"], f["add_space_prefix"]) == ("llama", "default", dummy_prefix)
    n = sp.get_piece_size()
    tokens, scores, types = f["token_list"], f["token_scores"], f["token_types"]
    assert tokens[:n] == [sp.id_to_piece(i) for i in range(n)] and tokens[n:] == [f"[PAD{i}]" for i in range(n, n + 3)]
    assert types[n:] == [UNUSED] * 3 and types[:3] == [CONTROL] * 3  # <unk>, <s>, </s>: special tokens
    assert all(types[i] == (BYTE if sp.is_byte(i) else NORMAL) for i in range(3, n))
    # SentencePiece's own scores order its merged pieces; the written scores must order them alike
    merged = [i for i in range(3, n) if not sp.is_byte(i) and len(sp.id_to_piece(i)) > 1]
    assert len(merged) > 50
    assert sorted(merged, key=lambda i: (-scores[i], i)) == sorted(merged, key=lambda i: (-sp.get_score(i), i))
    assert (f["bos_token_id"], f["eos_token_id"], f["unk_token_id"]) == (1, 2, 0)


def test_byte_level_vocabulary_is_unchanged() -> None:
    w = Recorder()
    add_tokenizer(w, make_byte_level_tokenizer(), n_vocab=262)
    f = w.fields
    assert (f["tokenizer_model"], f["tokenizer_pre"]) == ("gpt2", "gpt-2") and "token_scores" not in f
    assert f["token_merges"] == ["\u0120 t"] and f["token_types"][-4:] == [NORMAL, UNUSED, UNUSED, UNUSED]  # 259 tokens


def test_tokenizers_llama_cpp_cannot_represent_are_refused(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, normalizers
    from transformers import PreTrainedTokenizerFast

    unigram = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0)], 0)))
    with pytest.raises(LowbitError, match="not Unigram"):
        add_tokenizer(Recorder(), unigram, 8)
    fast, _ = make_sentencepiece_tokenizer(tmp_path)
    fast.backend_tokenizer.normalizer = normalizers.Lowercase()
    with pytest.raises(LowbitError, match="SentencePiece pre-tokenizer"):
        add_tokenizer(Recorder(), fast, 500)
    with pytest.raises(LowbitError, match="SentencePiece normalizer"):
        space_prefix({"normalizer": {"type": "Lowercase"}, "pre_tokenizer": None})
