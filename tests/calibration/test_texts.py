"""Text sources: built-in corpora split into evaluation and calibration parts that never overlap."""

from __future__ import annotations

import hashlib

import pytest

from lowbit import LowbitError
from lowbit.calibration import BUILTIN_TEXTS, Text, load_text
from lowbit.calibration import texts as T


def _eval_keys(percent: int, keys) -> set[str]:  # type: ignore[no-untyped-def]
    return {k for k in keys if hashlib.sha256(k.encode()).digest()[0] * 100 // 256 < percent}


def test_pydoc_parts_do_not_overlap() -> None:
    from pydoc_data.topics import topics

    ev, cal = load_text("pydoc"), load_text("pydoc-calib")
    assert ev.name == "pydoc" and 10_000 < len(ev.text) <= T.PYDOC_EVAL_CHARS
    assert len(cal.text) > len(ev.text)
    eval_keys = _eval_keys(T.PYDOC_EVAL_PERCENT, topics)
    assert 0 < len(eval_keys) < len(topics)
    for k, v in topics.items():
        body = v.strip()
        if len(body) < 200:
            continue
        # every topic is in at most one part, and calibration text never holds an evaluation topic
        assert not (body in ev.text and body in cal.text), k
        if k in eval_keys:
            assert body not in cal.text, k
        else:
            assert body not in ev.text, k
    assert load_text("pydoc") == ev  # deterministic


def test_stdlib_eval_part() -> None:
    ev = load_text("stdlib")
    assert 10_000 < len(ev.text) <= T.STDLIB_EVAL_CHARS
    assert ev.text.startswith("# file: ")
    files = [line[len("# file: "):] for line in ev.text.splitlines() if line.startswith("# file: ")]
    assert files == sorted(files)
    keys = _eval_keys(T.STDLIB_EVAL_PERCENT, files)
    assert set(files) == keys  # only files of the evaluation bucket
    assert not any(f.startswith(("test/", "site-packages/")) for f in files)


def test_builtin_names() -> None:
    assert set(BUILTIN_TEXTS) == {"pydoc", "pydoc-calib", "stdlib", "stdlib-calib"}


def test_text_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "my.txt"
    p.write_text("héllo wörld\n", encoding="utf-8")
    t = load_text(str(p))
    assert t == Text("my.txt", "héllo wörld\n")
    assert t.digest == hashlib.sha256("héllo wörld\n".encode()).hexdigest()
    assert Text("x", "a").digest != Text("x", "b").digest


def test_text_file_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(LowbitError, match="no such text file or built-in text"):
        load_text(str(tmp_path / "none.txt"))
    with pytest.raises(LowbitError, match="not a file"):
        load_text(str(tmp_path))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(LowbitError, match="not UTF-8"):
        load_text(str(latin))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(LowbitError, match="empty"):
        load_text(str(empty))
