"""Text sources for evaluation and calibration.

Built-in texts ship with every Python, so nothing is fetched:

* ``pydoc``: the language reference prose of ``pydoc_data.topics`` (English).
* ``stdlib``: the standard library's own ``.py`` source (code).

Each is split deterministically into an evaluation part and a calibration part that never
overlap: a topic (or source file) belongs to the evaluation part when the first byte of the
SHA-256 of its key falls in the evaluation bucket. ``pydoc`` / ``stdlib`` name the evaluation
parts; ``pydoc-calib`` / ``stdlib-calib`` the calibration parts. Evaluation parts are capped
(whole topics or files, in sorted order, up to ``*_EVAL_CHARS``); items of the evaluation
bucket past the cap are used by neither part.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import LowbitError

PYDOC_EVAL_PERCENT = 20  # of topics, by hash
STDLIB_EVAL_PERCENT = 2  # of source files, by hash
# Caps keep one evaluation pass near 22k tokens for SmolLM2's tokenizer (about 45 windows of 512).
PYDOC_EVAL_CHARS = 90_000
PYDOC_CALIB_CHARS = 10_000_000
STDLIB_EVAL_CHARS = 80_000
STDLIB_CALIB_CHARS = 2_000_000


@dataclass(frozen=True)
class Text:
    """A named text and the SHA-256 of its content (part of every cache key)."""

    name: str
    text: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def _bucket(key: str) -> int:
    return hashlib.sha256(key.encode()).digest()[0] * 100 // 256


def _take(items: list[tuple[str, str]], percent: int, part: str, cap: int) -> str:
    """Items (key, text) of ``part`` in key order, whole, until ``cap`` characters."""
    out: list[str] = []
    size = 0
    for key, text in sorted(items):
        if (_bucket(key) < percent) != (part == "eval"):
            continue
        if size and size + len(text) > cap:
            break
        out.append(text)
        size += len(text) + 2
    return "\n\n".join(out)


def pydoc_topics(part: str) -> str:
    """``part`` is ``eval`` or ``calib``."""
    from pydoc_data.topics import topics

    items = [(k, v.strip()) for k, v in topics.items()]
    return _take(items, PYDOC_EVAL_PERCENT, part, PYDOC_EVAL_CHARS if part == "eval" else PYDOC_CALIB_CHARS)


def stdlib_source(part: str) -> str:
    """``part`` is ``eval`` or ``calib``: whole files, each under a ``# file:`` header."""
    root = Path(sysconfig.get_paths()["stdlib"])
    items = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "test/", "idlelib/idle_test/")) or "/tests/" in rel:
            continue
        items.append((rel, f"# file: {rel}\n" + p.read_text(encoding="utf-8", errors="replace")))
    return _take(items, STDLIB_EVAL_PERCENT, part, STDLIB_EVAL_CHARS if part == "eval" else STDLIB_CALIB_CHARS)


BUILTIN_TEXTS = {
    "pydoc": lambda: pydoc_topics("eval"),
    "pydoc-calib": lambda: pydoc_topics("calib"),
    "stdlib": lambda: stdlib_source("eval"),
    "stdlib-calib": lambda: stdlib_source("calib"),
}


def load_text(spec: str) -> Text:
    """A built-in name, a path to a UTF-8 text file, or ``hf:DATASET[:CONFIG[:SPLIT]]``
    (needs the ``datasets`` package and network)."""
    if spec in BUILTIN_TEXTS:
        return Text(spec, BUILTIN_TEXTS[spec]())
    if spec.startswith("hf:"):
        return _load_hf_dataset(spec)
    p = Path(spec).expanduser()
    if not p.exists():
        raise LowbitError(f"no such text file or built-in text: {spec} (built-in: {', '.join(BUILTIN_TEXTS)})")
    if not p.is_file():
        raise LowbitError(f"{spec}: not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LowbitError(f"{spec}: not UTF-8 text") from None
    if not text.strip():
        raise LowbitError(f"{spec}: the text is empty")
    return Text(p.name, text)


def _load_hf_dataset(spec: str) -> Text:
    parts = spec[3:].split(":")
    name, config, split = parts[0], parts[1] if len(parts) > 1 else None, parts[2] if len(parts) > 2 else "test"
    try:
        import datasets
    except ImportError:
        raise LowbitError("hf: texts need the 'datasets' package (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:
        raise LowbitError(f"cannot load dataset {name!r} ({str(e).splitlines()[0][:200]}); offline?") from None
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return Text(spec, "\n\n".join(str(t) for t in ds[column]))
