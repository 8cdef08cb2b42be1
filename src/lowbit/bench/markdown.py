"""Sections of a Markdown file that a benchmark script owns, between marker comments."""

from __future__ import annotations

import re
from pathlib import Path


def replace_section(path: Path, section: str, heading: str, body: str) -> None:
    """Put ``body`` between ``<!-- BEGIN section -->`` and ``<!-- END section -->`` in ``path``,
    leaving the rest of the file alone; a file without the markers gets them appended under
    ``## heading``."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    begin, end = f"<!-- BEGIN {section} -->", f"<!-- END {section} -->"
    block = f"{begin}\n{body}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n## {heading}\n\n{block}\n"
    path.write_text(text)
