"""scripts/compare_sweeps.py: two stores of one sweep agree on everything but times, or it says
which cell and which field differ."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest

from lowbit.bench.results import ResultsStore

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "compare_sweeps.py"


def _script():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("compare_sweeps", SCRIPT)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


ROW = {"cell": "m__int8__ab", "model": "m", "recipe": "int8", "recipe_digest": "ab", "status": "done",
       "model_fingerprint": "f", "size": {"bits_per_weight": 8.0}, "texts": {"pydoc": {"kld": 0.003}},
       "layers": {"l.0": 0.1}, "humaneval": {"pass@1": 0.25, "generation_seconds": 10.0},
       "speed": {"decode_tokens_per_s": 30.0}, "seconds": 50.0, "started_at": "2026-01-01T00:00:00+00:00"}


def _store(root: Path, rows: list[dict]) -> Path:
    store = ResultsStore(root)
    for r in rows:
        store.put(r)
    return root


def test_times_may_differ_measurements_may_not(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    compare = _script()
    other = copy.deepcopy(ROW)
    other.update(seconds=70.0, speed={"decode_tokens_per_s": 12.0}, started_at="2026-02-02T00:00:00+00:00")
    other["humaneval"]["generation_seconds"] = 99.0
    a, b = _store(tmp_path / "a", [ROW]), _store(tmp_path / "b", [other])
    assert compare.main([str(a), str(b)]) == 0
    assert "1 of 1 cells the same" in capsys.readouterr().out

    other["texts"]["pydoc"]["kld"] = 0.0031
    other["humaneval"]["pass@1"] = 0.26
    _store(b, [other])
    assert compare.main([str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "| m__int8__ab | int8 | no | texts, humaneval |" in out and "0 of 1 cells the same" in out


def test_a_cell_missing_from_one_store_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    compare = _script()
    second = {**ROW, "cell": "m__nf4__cd", "recipe": "nf4"}
    a, b = _store(tmp_path / "a", [ROW, second]), _store(tmp_path / "b", [ROW])
    assert compare.main([str(a), str(b)]) == 1
    assert f"| m__nf4__cd | nf4 | no | only in {a} |" in capsys.readouterr().out
