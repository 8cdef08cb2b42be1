"""Benchmark rows kept on disk between invocations, so a long benchmark can resume and single
rows can be run again (``--redo``)."""

from __future__ import annotations

import json
from pathlib import Path


class RowStore:
    """Rows (JSON objects) keyed by ``"LABEL"`` or ``"LABEL|PART"`` (e.g. a text name), written
    to ``path`` atomically after every change."""

    def __init__(self, path: Path, fresh: bool = False) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: dict[str, dict] = {} if fresh or not path.exists() else json.loads(path.read_text())

    def get(self, key: str) -> dict | None:
        return self.rows.get(key)

    def put(self, key: str, row: dict) -> None:
        self.rows[key] = row
        self._write()

    def drop(self, labels: str) -> None:
        """Forget the rows of each label in ``labels`` (separated by semicolons: labels may hold
        commas), in memory until the next ``put``; ValueError naming a label no kept row has."""
        for label in dict.fromkeys(filter(None, (x.strip() for x in labels.split(";")))):
            keys = [k for k in self.rows if k.split("|")[0] == label]
            if not keys:
                raise ValueError(f"no kept row is labelled {label!r}")
            for k in keys:
                del self.rows[k]

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.rows, indent=1))
        tmp.replace(self.path)
