"""The long fuzzing run of every reader of untrusted files: BENCHMARKS.md, section "fuzzing".

The same targets and oracle as the test suite (``tests/io/reader_fuzzing.py``): seed files written
by lowbit's own writers of tiny models (GGUF models, GGUF and legacy imatrix files, safetensors
files, lowbit / GPTQ / AWQ / compressed-tensors folders, recipes), damaged by seeded byte-level and
structure-aware mutations, each read by the reader a ``lowbit`` command uses. A case passes when
the file is read, or refused with one LowbitError line that names the file and leaks no Python or
numpy internals; anything else (another exception, a leaking message, a case past its time
limit, memory past the limit set below) is a failure, kept with ``--keep DIR``.

    .venv/bin/python scripts/fuzz_readers.py                  # about 150,000 cases, 10-15 minutes
    .venv/bin/python scripts/fuzz_readers.py --scale 0.1 --no-write
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "io")]

# cases per target at --scale 1: GGUF and safetensors files (alone and inside checkpoint folders) first
CASES = {"gguf-q-structure": 30_000, "gguf-f32-structure": 20_000, "gguf-packed": 10_000, "gguf-dequantized": 4_000,
         "imatrix-gguf": 10_000, "safetensors": 30_000, "folder-lowbit": 4_000, "folder-gptq": 3_000,
         "folder-awq": 3_000, "folder-compressed-tensors": 3_000, "imatrix-dat": 5_000, "recipe-json": 5_000,
         "recipe-yaml": 5_000}
GGUF_OR_SAFETENSORS = {"gguf-q-structure", "gguf-f32-structure", "gguf-packed", "gguf-dequantized", "imatrix-gguf",
                       "safetensors", "folder-lowbit", "folder-gptq", "folder-awq", "folder-compressed-tensors"}


def _limit_memory(extra_gb: float) -> int:
    """Cap this process's address space at what it maps now plus ``extra_gb``: a reader that
    allocates without bound then fails with MemoryError (a failure) instead of taking the machine."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            limit = int(line.split()[1]) * 1024 + int(extra_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            return limit
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every target's case count (default 1)")
    ap.add_argument("--targets", help="comma-separated targets (default: all)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the mutations (default 1; the tests use 20261203)")
    ap.add_argument("--time-limit", type=float, default=20.0, help="seconds a case may take (default 20)")
    ap.add_argument("--memory-gb", type=float, default=4.0, help="memory a case may add (default 4 GB)")
    ap.add_argument("--keep", type=Path, help="keep each failing case's damaged file in this folder")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args()
    import transformers

    from reader_fuzzing import build_targets, run_target

    from lowbit.bench.markdown import command_line, replace_section

    transformers.utils.logging.disable_progress_bar()
    warnings.simplefilter("ignore")
    names = args.targets.split(",") if args.targets else list(CASES)
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(prefix="lowbit-fuzz-", dir=shm if shm.is_dir() else None) as tmp:
        targets = build_targets(Path(tmp) / "seeds")
        limit = _limit_memory(args.memory_gb)
        rows, failures, t_all = [], [], time.perf_counter()
        for name in names:
            n = max(1, round(CASES[name] * args.scale))
            with tqdm(total=n, desc=name, unit="case", leave=False) as bar:
                tally = run_target(targets[name], n, args.seed, Path(tmp) / "work", args.time_limit,
                                   keep=args.keep, progress=lambda i: bar.update(1))
            rows.append((name, tally))
            failures += [(name, *f) for f in tally.failures]
            print(f"{name}: {tally.cases} cases, {dict(tally.kinds)}, {tally.seconds:.0f} s", flush=True)
        seconds = time.perf_counter() - t_all
    total = sum(t.cases for _, t in rows)
    files = sum(t.cases for n, t in rows if n in GGUF_OR_SAFETENSORS)
    lines = [
        f"Printed by {command_line('scripts/fuzz_readers.py', ap, args)} "
        f"(seed {args.seed}; Python {platform.python_version()}; each case limited to {args.time_limit:g} s and "
        f"{args.memory_gb:g} GB more memory{'' if limit else ' (no memory limit: no /proc)'}). Seeds: files lowbit "
        "writes of tiny models; mutations: bit flips, interesting integers over the seed's own length, count, type "
        "and offset fields, truncations, inserted, deleted and repeated chunks, bytes that are not UTF-8, and "
        "JSON-aware edits of safetensors headers and metadata files (values of other types, edge numbers, keys "
        "dropped or added). *read*: the reader took the file (damage in values, not structure); *refused*: one "
        "LowbitError line naming the file, no Python or numpy internals; *failures*: anything else.",
        "",
        "| target | reader | cases | read | refused | failures | seconds |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, t in rows:
        lines.append(f"| {name} | {targets[name].about} | {t.cases:,} | {t.kinds['ok']:,} | {t.kinds['refused']:,} | "
                     f"{len(t.failures)} | {t.seconds:.0f} |")
    lines += ["", f"{total:,} cases in {seconds / 60:.1f} min, {files:,} of them damaged GGUF or safetensors files "
              f"(alone or in a checkpoint folder); {len(failures)} failures."]
    for name, case, kind, detail in failures[:20]:
        lines.append(f"- {name} case {case}: {kind}: {detail[:300]}")
    body = "\n".join(lines)
    print("\n" + body)
    if not args.no_write:
        replace_section(ROOT / "BENCHMARKS.md", "fuzzing", "Hostile input: fuzzing the readers", body)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
