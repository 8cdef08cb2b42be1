"""A sweep's results store: one JSON file per finished cell, so that an interrupted sweep resumes
where it stopped and a report can be drawn from any store.

Layout of a store folder::

    RESULTS/
      lowbit-results.json     {"schema": SCHEMA, "lowbit_version": ...}: what wrote the store
      cells/CELL_ID.json      one cell result (a dict, see :func:`cell_result`), written atomically

A cell result (``schema`` 1) holds:

* ``cell``, ``model``, ``recipe`` (the name the sweep file gives), ``recipe_digest`` (None for the
  unquantized and 16-bit rows), ``method`` (the algorithm: ``rtn``, ``gptq``, ``awq``, or ``none``),
  ``format`` (``lowbit`` or ``gguf``), ``codec`` (a short description), ``dense`` (``float32`` for the
  unquantized reference, ``bfloat16`` for the 16-bit row, None for a quantized one; absent in results
  written before it was kept);
* ``status`` (``done`` or ``failed``) and ``error`` (one line, or None);
* ``model_fingerprint``, ``machine`` (platform, cpus, threads), ``versions`` (lowbit, torch,
  transformers, python), ``started_at`` (ISO 8601, UTC), ``seconds`` (the whole cell);
* ``size``: ``bits_per_weight`` (decoder-block linears with their scale data), ``model_bytes``
  (every stored tensor), ``disk_bytes`` (the saved weights: a GGUF file, a folder's safetensors; None if not saved);
* ``quant_seconds``;
* ``texts``: per text name ``{ppl, delta_ppl, kld, kld_p99, top1, tokens}`` (KLD in nats/token);
* ``speed``: None or ``{batch, prompt_tokens, new_tokens, prefill_tokens_per_s,
  decode_tokens_per_s, peak_mb}``;
* ``memory``: None or ``{model_mb, peak_mb}`` (peak resident memory of the speed run);
* ``humaneval``: None or the JSON of ``lowbit eval --task humaneval`` (``pass@1``, ``problems``, ...);
* ``layers``: None or ``{linear name: relative squared weight error ||W - Q(W)||^2 / ||W||^2}``;
* ``llama_bench``: None or llama.cpp's own speed of a GGUF row
  ``{prefill_tokens_per_s, decode_tokens_per_s, threads}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import lowbit
from lowbit.errors import LowbitError
from lowbit.io.folder import write_text_atomic

SCHEMA = 1
HEADER = "lowbit-results.json"


class ResultsStore:
    """The cell results under ``root``; created on first use. A store written by another schema
    is refused with one line, never mixed with this one's rows."""

    def __init__(self, root: Path, create: bool = True) -> None:
        self.root = Path(root)
        header = self.root / HEADER
        if header.is_file():
            try:
                head = json.loads(header.read_text())
            except (OSError, ValueError) as e:
                raise LowbitError(f"{header}: not a lowbit results header ({e})") from None
            if not isinstance(head, dict) or head.get("schema") != SCHEMA:
                found = head.get("schema") if isinstance(head, dict) else None
                raise LowbitError(
                    f"{self.root}: a results store of schema {found!r} (lowbit {head.get('lowbit_version', '?') if isinstance(head, dict) else '?'});"
                    f" this lowbit {lowbit.__version__} reads schema {SCHEMA}: use another folder")
        elif create:
            if self.root.exists() and any(self.root.iterdir()):
                raise LowbitError(f"{self.root}: exists and is not a lowbit results store (no {HEADER})")
            (self.root / "cells").mkdir(parents=True, exist_ok=True)
            _write_atomic(header, {"schema": SCHEMA, "lowbit_version": lowbit.__version__})
        else:
            raise LowbitError(f"{self.root}: not a lowbit results store (no {HEADER})")

    def path_of(self, cell: str) -> Path:
        return self.root / "cells" / f"{cell}.json"

    def get(self, cell: str) -> dict[str, Any] | None:
        p = self.path_of(cell)
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except ValueError:
            return None  # a torn file cannot exist (atomic writes); a hand-edited one is redone

    def put(self, result: dict[str, Any]) -> None:
        result = {"schema": SCHEMA, **result}
        _write_atomic(self.path_of(result["cell"]), result)

    def done(self, cell: str) -> bool:
        r = self.get(cell)
        return r is not None and r.get("status") == "done"

    def results(self) -> list[dict[str, Any]]:
        """Every cell result, in file-name order."""
        return [r for r in (self.get(p.stem) for p in sorted((self.root / "cells").glob("*.json"))) if r is not None]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.results())


def load_results(path: Path) -> list[dict[str, Any]]:
    """The cell results of the store at ``path`` (LowbitError if it is none)."""
    if not Path(path).is_dir():
        raise LowbitError(f"{path}: no such results folder")
    return ResultsStore(Path(path), create=False).results()


def _write_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1))
