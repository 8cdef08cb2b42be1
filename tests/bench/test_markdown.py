"""A benchmark script rewrites only its own section of BENCHMARKS.md."""

from __future__ import annotations

from pathlib import Path

from lowbit.bench.markdown import replace_section


def test_replaces_only_its_section(tmp_path: Path) -> None:
    f = tmp_path / "B.md"
    f.write_text("# B\n\nintro\n<!-- BEGIN a -->\nold $1 \\1\n<!-- END a -->\ntail\n<!-- BEGIN b -->\nkeep\n<!-- END b -->\n")
    replace_section(f, "a", "A", "new \\1 $1")
    assert f.read_text() == "# B\n\nintro\n<!-- BEGIN a -->\nnew \\1 $1\n<!-- END a -->\ntail\n<!-- BEGIN b -->\nkeep\n<!-- END b -->\n"


def test_appends_a_missing_section_under_its_heading(tmp_path: Path) -> None:
    f = tmp_path / "B.md"
    f.write_text("# B\n\ntext\n\n")
    replace_section(f, "c", "Section C", "body")
    assert f.read_text() == "# B\n\ntext\n\n## Section C\n\n<!-- BEGIN c -->\nbody\n<!-- END c -->\n"
