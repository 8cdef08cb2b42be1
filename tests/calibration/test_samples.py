"""Calibration samples: seeded, local RNG, warnings on short texts, chat JSONL rendering."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from lowbit import LowbitError
from lowbit.calibration import CalibrationConfig, calibration_set, sample_windows
from lowbit.calibration.samples import load_chat_jsonl


def test_windows_are_disjoint_slices_and_reproducible() -> None:
    ids = torch.arange(10_000)
    a = sample_windows(ids, 16, 100, seed=3)
    b = sample_windows(ids, 16, 100, seed=3)
    assert torch.equal(a, b)
    assert a.shape == (16, 100)
    starts = a[:, 0]
    assert (starts % 100 == 0).all() and starts.unique().numel() == 16  # disjoint windows
    assert torch.equal(a, starts.unsqueeze(1) + torch.arange(100))  # contiguous slices of the text
    assert not torch.equal(a, sample_windows(ids, 16, 100, seed=4))


def test_global_rng_is_untouched() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    sample_windows(torch.arange(5000), 8, 64, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_too_few_tokens_for_disjoint_windows_warns_and_overlaps() -> None:
    with pytest.warns(UserWarning, match="samples overlap"):
        out = sample_windows(torch.arange(1000), 32, 100, seed=0)
    assert out.shape == (32, 100)


def test_text_shorter_than_one_window_warns() -> None:
    # the 4 samples are then the same 300 tokens: the overlap warning says so too
    with pytest.warns(UserWarning, match="only 300 tokens"), pytest.warns(UserWarning, match="samples overlap"):
        out = sample_windows(torch.arange(300), 4, 512, seed=0)
    assert out.shape == (4, 300)


def test_too_short_text_is_an_error() -> None:
    with pytest.raises(LowbitError, match="need at least"):
        sample_windows(torch.arange(10), 4, 512, seed=0)


def test_calibration_set_from_a_text_file(tmp_path: Path, char_tokenizer, text_factory) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "calib.txt"
    f.write_text(text_factory(20_000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cal = calibration_set(char_tokenizer, CalibrationConfig(source=str(f), samples=8, seq_len=128))
    assert cal.tokens.shape == (8, 128)
    assert cal.digest == calibration_set(char_tokenizer, CalibrationConfig(source=str(f), samples=8, seq_len=128)).digest


class ChatTokenizer:
    chat_template = "stub"

    def apply_chat_template(self, messages, tokenize=False):  # type: ignore[no-untyped-def]
        assert tokenize is False
        return "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)


def test_chat_jsonl_is_rendered_with_the_template(tmp_path: Path) -> None:
    f = tmp_path / "chat.jsonl"
    lines = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "2+2?"}]},
    ]
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    text = load_chat_jsonl(f, ChatTokenizer())
    assert text.text == "<|user|>hi<|end|><|assistant|>hello<|end|>\n<|user|>2+2?<|end|>"


@pytest.mark.parametrize("line", ['{"messages": "no"}', "not json", '{"messages": [{"role": "user"}]}'])
def test_bad_chat_lines_name_the_line(tmp_path: Path, line: str) -> None:
    f = tmp_path / "chat.jsonl"
    f.write_text('{"messages": [{"role": "user", "content": "ok"}]}\n' + line + "\n")
    with pytest.raises(LowbitError, match="chat.jsonl:2"):
        load_chat_jsonl(f, ChatTokenizer())


def test_chat_needs_a_template(tmp_path: Path) -> None:
    f = tmp_path / "chat.jsonl"
    f.write_text('{"messages": [{"role": "user", "content": "ok"}]}\n')

    class NoTemplate:
        chat_template = None

    with pytest.raises(LowbitError, match="no chat template"):
        load_chat_jsonl(f, NoTemplate())
