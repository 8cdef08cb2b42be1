"""Do two results stores of one sweep hold the same results? (a local run against a ``--ray`` one,
or a run against its rerun). Prints one Markdown row per cell: whether every measured quantity
that does not depend on timing is equal, and which differ.

    python scripts/compare_sweeps.py sweeps/smollm2-lab-results /tmp/ray-results

Compared exactly: status, model fingerprint, recipe digest, size, per-text PPL/KLD/top-1,
per-linear error, HumanEval (without its seconds). Not compared: anything measured in seconds
(speed, llama-bench, quant and cell times) and when and where the cell ran. Exits 1 when a cell
differs or is missing from either store.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lowbit.bench.results import load_results

QUALITY = ("status", "model_fingerprint", "recipe_digest", "size", "texts", "layers", "humaneval")
TIMED = ("generation_seconds", "execution_seconds")


def quality(result: dict[str, Any]) -> dict[str, Any]:
    """The fields of a cell result that a rerun must reproduce exactly."""
    q = {k: result.get(k) for k in QUALITY}
    if isinstance(q["humaneval"], dict):
        q["humaneval"] = {k: v for k, v in q["humaneval"].items() if k not in TIMED}
    return q


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path, help="a results store")
    ap.add_argument("b", type=Path, help="the other results store")
    args = ap.parse_args(argv)
    a = {r["cell"]: r for r in load_results(args.a)}
    b = {r["cell"]: r for r in load_results(args.b)}
    print("| cell | recipe | same | differing fields |\n|---|---|---|---|")
    bad = same = 0
    for cell in sorted(a.keys() | b.keys()):
        if cell not in a or cell not in b:
            bad += 1
            print(f"| {cell} | {(a.get(cell) or b[cell])['recipe']} | no | only in {args.a if cell in a else args.b} |")
            continue
        qa, qb = quality(a[cell]), quality(b[cell])
        differ = [k for k in QUALITY if qa[k] != qb[k]]
        bad += bool(differ)
        same += not differ
        print(f"| {cell} | {a[cell]['recipe']} | {'no' if differ else 'yes'} | {', '.join(differ)} |")
    print(f"\n{same} of {len(a.keys() | b.keys())} cells the same in {args.a} and {args.b}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
