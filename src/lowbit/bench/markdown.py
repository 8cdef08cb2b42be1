"""Sections of a Markdown file that a benchmark script owns, between marker comments, and the
command line that printed them."""

from __future__ import annotations

import argparse
import re
import shlex
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


# flags that choose what runs or where output goes, never what a table's numbers mean
NOT_IN_COMMAND = frozenset({"no_write", "fresh", "redo", "kept_only", "json", "import_rows", "keep"})


def command_line(script: str, parser: argparse.ArgumentParser, args: argparse.Namespace,
                 leave_out: frozenset[str] = NOT_IN_COMMAND) -> str:
    """The command that printed a table, in backticks: ``.venv/bin/python SCRIPT`` with every
    argument of ``args`` that differs from ``parser``'s default, in the parser's order (flags in
    ``leave_out``, by destination, are left out)."""
    parts = [".venv/bin/python", script]
    for action in parser._actions:  # argparse has no public list of its arguments
        if not action.option_strings or action.dest in leave_out or action.dest == "help":
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = max(action.option_strings, key=len)
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            parts.append(flag)
        else:
            parts += [flag, shlex.quote(str(value))]
    return "`" + " ".join(parts) + "`"
