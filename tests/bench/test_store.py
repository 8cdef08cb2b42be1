"""Benchmark rows kept on disk: resume, --redo."""

from __future__ import annotations

from pathlib import Path

import pytest

from lowbit.bench.store import RowStore


def test_rows_survive_a_new_store_and_redo_drops_every_part_of_a_label(tmp_path: Path) -> None:
    path = tmp_path / "bench" / "rows.json"
    store = RowStore(path)
    store.put("int4, fp32 passes|pydoc", {"kld": 1.0})
    store.put("int4, fp32 passes|stdlib", {"kld": 2.0})
    store.put("memory", {"mb": 3})
    again = RowStore(path)
    assert again.get("memory") == {"mb": 3}
    again.drop("int4, fp32 passes; memory")
    assert again.rows == {}
    assert RowStore(path).get("memory") == {"mb": 3}  # dropped in memory until the next put
    assert RowStore(path, fresh=True).rows == {}


def test_redo_of_an_unknown_label_is_refused(tmp_path: Path) -> None:
    store = RowStore(tmp_path / "rows.json")
    store.put("a", {})
    with pytest.raises(ValueError, match="no kept row is labelled 'b'"):
        store.drop("a;b")
