"""The evaluation protocol: which tokens are fed and which are scored."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import LowbitError
from lowbit.evaluation import Window, make_windows
from lowbit.evaluation.windows import MIN_EVAL_TOKENS


def test_non_overlapping_with_short_last_window() -> None:
    # windows do not overlap; a window of n tokens scores its last n - 1
    assert make_windows(100, 32) == [
        Window(0, 32, 1),
        Window(32, 64, 33),
        Window(64, 96, 65),
        Window(96, 100, 97),  # the last window is short: the text is evaluated whole
    ]
    assert [w.n_scored for w in make_windows(100, 32)] == [31, 31, 31, 3]


def test_exact_multiple() -> None:
    assert make_windows(64, 32) == [Window(0, 32, 1), Window(32, 64, 33)]


def test_last_window_of_one_token_scores_nothing() -> None:
    # 65 tokens: the 65th would be a window of one token, with no context: not scored
    assert make_windows(65, 32) == [Window(0, 32, 1), Window(32, 64, 33)]
    assert make_windows(66, 32)[-1] == Window(64, 66, 65)


def test_stride() -> None:
    # each window after the first scores only the targets the previous ones did not reach
    assert make_windows(100, 32, stride=16) == [
        Window(0, 32, 1),
        Window(16, 48, 32),
        Window(32, 64, 48),
        Window(48, 80, 64),
        Window(64, 96, 80),
        Window(80, 100, 96),
    ]
    assert make_windows(100, 32, stride=32) == make_windows(100, 32)
    assert sum(w.n_scored for w in make_windows(100, 32, stride=16)) == 99


def test_max_windows() -> None:
    assert make_windows(100, 32, max_windows=2) == [Window(0, 32, 1), Window(32, 64, 33)]
    assert make_windows(100, 32, max_windows=1) == [Window(0, 32, 1)]
    assert make_windows(100, 32, max_windows=99) == make_windows(100, 32)
    assert make_windows(100, 32, stride=16, max_windows=3)[-1] == Window(32, 64, 48)
    assert len(make_windows(100, 32, stride=16, max_windows=3)) == 3


def test_too_short() -> None:
    with pytest.raises(LowbitError, match="too short: 15 tokens"):
        make_windows(MIN_EVAL_TOKENS - 1, 8)
    with pytest.raises(LowbitError, match="too short: 0 tokens"):
        make_windows(0, 8)
    assert make_windows(MIN_EVAL_TOKENS, 8) == [Window(0, 8, 1), Window(8, 16, 9)]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(seq_len=8, stride=0), "stride"),
        (dict(seq_len=8, stride=9), "stride"),
        (dict(seq_len=8, stride=-1), "stride"),
        (dict(seq_len=1), "seq_len"),
        (dict(seq_len=0), "seq_len"),
        (dict(seq_len=8, max_windows=0), "max_windows"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(LowbitError, match=match):
        make_windows(100, **kwargs)


@settings(max_examples=300, deadline=None)
@given(st.integers(MIN_EVAL_TOKENS, 400), st.integers(2, 64), st.data())
def test_every_target_scored_once(n: int, seq_len: int, data) -> None:  # type: ignore[no-untyped-def]
    stride = data.draw(st.integers(1, seq_len))
    ws = make_windows(n, seq_len, stride)
    scored: list[int] = []
    for w in ws:
        assert 0 <= w.begin < w.first_target < w.end <= n  # at least one token of context
        assert w.end - w.begin <= seq_len
        assert w.begin % stride == 0  # windows start every stride tokens
        scored.extend(range(w.first_target, w.end))
    if stride < seq_len:
        assert scored == list(range(1, n))  # every target once, in order
        for w in ws[1:]:  # with at least seq_len - stride tokens of context
            assert w.first_target - w.begin >= seq_len - stride
    else:
        assert scored == [t for t in range(1, n) if t % seq_len != 0]
