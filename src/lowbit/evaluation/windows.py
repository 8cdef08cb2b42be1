"""Which tokens are fed and which are scored: the evaluation protocol, pinned.

Windows of ``seq_len`` tokens start every ``stride`` tokens. Each target token is scored once,
in the first window that contains it after at least one token of context: with
``stride == seq_len`` (the default) windows do not overlap and a window of ``n`` tokens scores
its last ``n - 1``; with a smaller stride every window after the first scores only the targets
the previous windows did not reach (more context per scored token, more compute). The last
window may be shorter: a text file is evaluated whole.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.errors import LowbitError

MIN_EVAL_TOKENS = 16


@dataclass(frozen=True)
class Window:
    begin: int  # first token fed
    end: int  # one past the last token fed
    first_target: int  # first target position scored (targets first_target..end-1)

    @property
    def n_scored(self) -> int:
        return self.end - self.first_target


def make_windows(n_tokens: int, seq_len: int, stride: int | None = None, max_windows: int | None = None) -> list[Window]:
    stride = seq_len if stride is None else stride
    if seq_len < 2:
        raise LowbitError(f"seq_len must be at least 2, got {seq_len}")
    if not 0 < stride <= seq_len:
        raise LowbitError(f"stride must be in 1..seq_len ({seq_len}), got {stride}")
    if max_windows is not None and max_windows < 1:
        raise LowbitError(f"max_windows must be positive, got {max_windows}")
    if n_tokens < MIN_EVAL_TOKENS:
        raise LowbitError(f"evaluation text too short: {n_tokens} tokens, need at least {MIN_EVAL_TOKENS}")
    windows: list[Window] = []
    prev_end = 0
    begin = 0
    while prev_end < n_tokens:
        end = min(begin + seq_len, n_tokens)
        first = max(begin + 1, prev_end)
        if end - first >= 1:
            windows.append(Window(begin, end, first))
        prev_end = end
        begin += stride
        if max_windows is not None and len(windows) >= max_windows:
            break
    return windows
