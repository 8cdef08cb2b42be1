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


def test_command_line_names_what_differs_from_the_defaults() -> None:
    import argparse

    from lowbit.bench.markdown import command_line

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-windows", type=int)
    ap.add_argument("--rows", default="all")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--redo", default="")
    ap.add_argument("-c", "--chunks", type=int, default=64)
    script = "scripts/benchmark_x.py"
    assert command_line(script, ap, ap.parse_args([])) == f"`.venv/bin/python {script}`"
    args = ap.parse_args(["--no-write", "--rows", "lowbit Q4_0 GPTQ;llama.cpp Q4_0", "--model", "qwen",
                          "--redo", "x", "-c", "12", "--max-windows", "8"])
    assert command_line(script, ap, args) == (f"`.venv/bin/python {script} --model qwen --max-windows 8 "
                                              "--rows 'lowbit Q4_0 GPTQ;llama.cpp Q4_0' --chunks 12`")
