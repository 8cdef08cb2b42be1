"""GGUF files of a real model made by lowbit and by llama.cpp's llama-quantize, run by llama.cpp
and evaluated by lowbit, in one table; rewrites the "GGUF" sections of BENCHMARKS.md (SmolLM2-135M,
the default; ``--model`` another: sections "gguf-MODEL" and "gguf-mixes-MODEL").

``--rows`` picks what runs: ``all``, ``q4_k_m`` (the F32 file and every Q4_K_M row), ``no-passes``
(every row whose file needs no calibration passes of lowbit's: all of llama.cpp's rows, lowbit's
RTN rows and lowbit's rows with llama.cpp's imatrix file; lowbit's own imatrix and GPTQ take
10-15 minutes each on a 0.5B model), or row labels separated by semicolons. The tables show every
row kept from any invocation, in the table's order.

Every row is a GGUF file:

* lowbit: ``lowbit quantize smollm2-135m --recipe gguf-<type>[-gptq] --out FILE.gguf``
  (every linear in the block type, embeddings in F16);
* llama.cpp: ``llama-quantize --pure --token-embedding-type f16 --output-tensor-type f16`` from
  the F32 GGUF that lowbit's writer makes of the same model (same layout as lowbit's rows), with
  and without an importance matrix from ``llama-imatrix`` on the same calibration text.

Each file is then (a) loaded by transformers' GGUF loader and evaluated by lowbit (KLD, top-1
and PPL against the unquantized model on the held-out pydoc text, windows of 512), and (b) run
by ``llama-perplexity`` on the same text (all its chunks of 512 tokens, at most 64), next to lowbit's own
computation of that perplexity protocol on the file's weights and llama.cpp's own token ids.
Needs llama.cpp's tools (``scripts/peers/setup_llamacpp.sh``, about 6 minutes). Rows are kept in
``scripts/rows/gguf[-MODEL].json``, llama.cpp's imatrix in ``$LOWBIT_CACHE/bench``; ``--fresh`` runs
everything again.

Usage: .venv/bin/python scripts/benchmark_gguf.py [--model M] [--rows all|q4_k_m|no-passes|"LABEL;LABEL"]
       [--max-windows N] [--fresh]
       [--chunks N] [--no-write] [--redo "LABEL;LABEL"] [--kept-only]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lowbit.bench.llama_cpp import (
    llama_cpp_bin,
    llama_cpp_imatrix,
    llama_cpp_perplexity,
    llama_cpp_token_ids,
    perplexity_like_llama_cpp,
    run_tool,
)
from lowbit.bench.markdown import command_line, replace_section
from lowbit.bench.models import DEFAULT_MODEL, bench_model, model_section
from lowbit.bench.store import RowStore
from lowbit.calibration import load_text
from lowbit.evaluation import evaluate
from lowbit.models.fingerprint import model_fingerprint
from lowbit.io.gguf_writer import save_gguf
from lowbit.io.imatrix import read_imatrix
from lowbit.models import LoadedModel, cache_dir, load_model
from lowbit.pipeline import quantize_model
from lowbit.recipes import get_preset

ROOT = Path(__file__).resolve().parent.parent
COMMAND = "`.venv/bin/python scripts/benchmark_gguf.py`"
ROWS_DIR = ROOT / "scripts" / "rows"  # the kept rows, committed: a table can be rendered and resumed on any machine
N_CTX, CHUNKS = 512, 64
IMATRIX_CHUNKS = 128  # llama-imatrix's chunks of N_CTX tokens of pydoc-calib
# (row label, how it is made)
ROWS = [
    ("F32 (unquantized)", ("f32",)),
    ("lowbit Q8_0 RTN", ("lowbit", "gguf-q8_0")),
    ("llama.cpp Q8_0", ("llama.cpp", "Q8_0", False)),
    ("lowbit Q4_1 RTN", ("lowbit", "gguf-q4_1")),
    ("llama.cpp Q4_1", ("llama.cpp", "Q4_1", False)),
    ("lowbit Q4_0 RTN", ("lowbit", "gguf-q4_0")),
    ("llama.cpp Q4_0", ("llama.cpp", "Q4_0", False)),
    ("llama.cpp Q4_0 imatrix", ("llama.cpp", "Q4_0", True)),
    ("lowbit Q4_0 RTN+imatrix", ("lowbit", "gguf-q4_0-imatrix")),
    ("lowbit Q4_0 GPTQ", ("lowbit", "gguf-q4_0-gptq")),
]
# llama-quantize's type mixes, each made by llama.cpp (with and without its imatrix) and by lowbit
MIX_ROWS = [
    row
    # (llama-quantize's mix name, the name in row labels, lowbit's preset stem, which rows)
    for mix, name, stem, kinds in (
        ("Q4_K_M", "Q4_K_M", "gguf-q4_k_m", "all"), ("Q3_K_M", "Q3_K_M", "gguf-q3_k_m", "all"),
        ("Q2_K", "Q2_K", "gguf-q2_k", "calibrated"), ("Q6_K", "Q6_K", "gguf-q6_k", "rtn"),
        ("Q4_K_S", "Q4_K_S", "gguf-q4_k_s", "no-file"), ("Q5_K_M", "Q5_K_M", "gguf-q5_k_m", "no-file"),
        ("Q8_0", "Q8_0 mix", "gguf-q8_0-mix", "rtn"), ("Q4_0", "Q4_0 mix", "gguf-q4_0-mix", "no-file"))
    for row in [
        *([(f"llama.cpp {name}", ("llama.cpp-mix", mix, False))] if kinds != "calibrated" else []),
        *([(f"lowbit {name} RTN", ("lowbit", stem))] if kinds != "calibrated" else []),
        *([(f"llama.cpp {name} imatrix", ("llama.cpp-mix", mix, True))] if kinds != "rtn" else []),
        *([(f"lowbit {name} RTN + llama.cpp's imatrix", ("lowbit+imatrix-file", f"{stem}-imatrix"))]
          if kinds in ("all", "calibrated") else []),
        *([(f"lowbit {name} RTN+imatrix", ("lowbit", f"{stem}-imatrix")),
           (f"lowbit {name} GPTQ", ("lowbit", f"{stem}-gptq"))] if kinds != "rtn" else []),
    ]
]

ALL_ROWS = ROWS + MIX_ROWS
# --rows q4_k_m: the unquantized file, and Q4_K_M made by llama.cpp and lowbit in every way
Q4_K_M_ROWS = [ROWS[0], *(row for row in MIX_ROWS if " Q4_K_M" in row[0])]


def rows_file(model: str) -> Path:
    """Where the rows of ``model`` are kept."""
    return ROWS_DIR / ("gguf.json" if model == DEFAULT_MODEL else f"gguf-{model}.json")


def imatrix_file(model: str) -> Path:
    """Where llama.cpp's imatrix of ``model`` is kept, in lowbit's cache (its folder made)."""
    path = cache_dir() / "bench" / (rows_file(model).stem + "-imatrix.gguf")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def needs_passes(how: tuple) -> bool:
    """Whether lowbit runs calibration passes to make this row's file (its own imatrix or GPTQ)."""
    return how[0] == "lowbit" and get_preset(how[1]).needs_calibration


ROW_SETS = {"all": ALL_ROWS, "q4_k_m": Q4_K_M_ROWS,
            "no-passes": [row for row in ALL_ROWS if not needs_passes(row[1])]}


def pick_rows(spec: str) -> list:
    """The rows that ``--rows`` names: a set's name or labels separated by semicolons (ValueError
    naming an unknown label)."""
    if spec in ROW_SETS:
        return ROW_SETS[spec]
    labels = [label.strip() for label in spec.split(";") if label.strip()]
    known = dict(ALL_ROWS)
    unknown = [label for label in labels if label not in known]
    if unknown or not labels:
        raise ValueError(f"unknown row {unknown[0]!r}" if unknown else "no row named")
    return [(label, known[label]) for label in labels]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def linear_bits_per_weight(path: Path) -> float:
    """Bits per weight of the decoder blocks' 2-D tensors, from the file's own tensor sizes."""
    from gguf import GGUFReader

    bits = n = 0
    for t in GGUFReader(str(path)).tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            bits += int(t.n_bytes) * 8
            n += int(t.n_elements)
    return bits / n


def tensor_types(path: Path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}


def load_gguf_weights(path: Path) -> LoadedModel:
    """The file's model as transformers' GGUF loader dequantizes it (weights only: converting the
    file's tokenizer back takes minutes and the evaluation uses the base model's, which llama.cpp
    matches token for token, see the table's note)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return LoadedModel(model, None, str(path), path)


def make_file(how: tuple, base: LoadedModel, work: Path, f32: Path, imatrix: Path) -> tuple[Path, float | None]:
    """The row's GGUF file and, for lowbit rows, the quantize_model seconds."""
    out = work / f"{'-'.join(str(h) for h in how)}.gguf"
    if how[0] == "f32":
        return f32, None
    if how[0] in ("lowbit", "lowbit+imatrix-file"):
        recipe = get_preset(how[1])
        model = copy.deepcopy(base.model)
        calib = importance = None
        if how[0] == "lowbit+imatrix-file":
            importance = read_imatrix(imatrix, model)
        elif recipe.needs_calibration:
            from lowbit.calibration import calibration_set

            calib = calibration_set(base.tokenizer, recipe.calibration_config())
        report = quantize_model(model, recipe, progress=False, calibration=calib, importance=importance)
        save_gguf(LoadedModel(model, base.tokenizer, base.source, None), out, overwrite=True)
        return out, report.seconds
    _, qtype, with_imatrix = how
    # the pure rows: every linear in the one type, embeddings F16 (as lowbit's gguf-<type> presets)
    args = [] if how[0] == "llama.cpp-mix" else ["--pure", "--token-embedding-type", "f16", "--output-tensor-type", "f16"]
    if with_imatrix:
        args += ["--imatrix", str(imatrix)]
    run_tool("llama-quantize", *args, str(f32), str(out), qtype)
    return out, None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help=f"the model (default {DEFAULT_MODEL})")
    ap.add_argument("--rows", default="all", metavar="SET|LABELS",
                    help="all (default), q4_k_m, no-passes (no calibration passes of lowbit's), or row labels "
                    "separated by semicolons; the tables show every kept row")
    ap.add_argument("--max-windows", type=int, help="evaluate at most N windows of the text (default: all)")
    ap.add_argument("--chunks", type=int, default=CHUNKS, help=f"llama-perplexity protocol: at most N chunks of {N_CTX} "
                    f"tokens (default {CHUNKS}; the text may hold fewer)")
    ap.add_argument("--fresh", action="store_true", help="discard rows kept from earlier runs")
    ap.add_argument("--no-write", action="store_true", help="print only, do not rewrite BENCHMARKS.md")
    ap.add_argument("--redo", default="", metavar="LABELS", help="semicolon-separated row labels to run again")
    ap.add_argument("--kept-only", action="store_true", help="render the kept rows, run nothing")
    return ap


def main() -> int:
    ap = build_parser()
    args = ap.parse_args()
    store_file = rows_file(args.model)
    try:
        which = pick_rows(args.rows)
    except ValueError as e:
        ap.error(f"--rows: {e}")
    if args.kept_only:
        store = RowStore(store_file, False)
        if not store.rows:
            ap.error(f"--kept-only: no rows kept in {store_file}; run without it")
        write_tables(store.rows, 0.0, args.no_write, ap, args, ran=set())
        return 0
    if llama_cpp_bin() is None:
        log("llama.cpp's tools are missing: building them (scripts/peers/setup_llamacpp.sh)")
        subprocess.run(["bash", str(ROOT / "scripts" / "peers" / "setup_llamacpp.sh")], check=True)
    store = RowStore(store_file, args.fresh)
    try:
        store.drop(args.redo)
    except ValueError as e:
        ap.error(f"--redo: {e}")
    t0 = time.time()
    threads = torch.get_num_threads()
    base = load_model(args.model)
    text = load_text("pydoc")
    ref_fp = model_fingerprint(base.model)
    with tempfile.TemporaryDirectory(prefix="lowbit-gguf-") as tmp:
        work = Path(tmp)
        text_file = work / "pydoc.txt"
        text_file.write_text(text.text)
        calib_file = work / "pydoc-calib.txt"
        calib_file.write_text(load_text("pydoc-calib").text)
        f32 = save_gguf(base, work / "f32.gguf", dense="f32")
        # kept beside the rows (13 minutes for Qwen2.5-0.5B): a later invocation reuses it, --fresh remakes it
        imatrix = imatrix_file(args.model)
        if args.fresh:
            imatrix.unlink(missing_ok=True)
        if not imatrix.is_file() and any(how[0].startswith("llama.cpp") and how[2] or how[0] == "lowbit+imatrix-file"
                                         for label, how in which if store.get(label) is None):
            llama_cpp_imatrix(f32, calib_file, imatrix, N_CTX, IMATRIX_CHUNKS, threads)
        theirs_ids = llama_cpp_token_ids(f32, text_file)
        ours_ids = base.tokenizer(text.text, add_special_tokens=False)["input_ids"]
        n_cmp = args.chunks * N_CTX
        same_ids = sum(a == b for a, b in zip(theirs_ids[:n_cmp], ours_ids[:n_cmp]))
        ran: set[str] = set()
        for label, how in which:
            if store.get(label) is not None:
                continue
            log(f"{label} ...")
            ran.add(label)
            path, quant_s = make_file(how, base, work, f32, imatrix)
            loaded = load_gguf_weights(path)
            r = evaluate(loaded.model, base.tokenizer, text, ref=base.model, cache_dir=cache_dir(), progress=False,
                         ref_fingerprint=ref_fp, max_windows=args.max_windows)
            ppl_ours = perplexity_like_llama_cpp(loaded.model, torch.tensor(theirs_ids), N_CTX, args.chunks)
            ppl_theirs = llama_cpp_perplexity(path, text_file, N_CTX, args.chunks, threads)
            types = None
            if how[0] == "lowbit" and get_preset(how[1]).gguf_mix:
                twin = work / f"llama.cpp-mix-{get_preset(how[1]).gguf_mix.upper()}-False.gguf"
                if twin.is_file():
                    ours_t, theirs_t = tensor_types(path), tensor_types(twin)
                    types = [sum(ours_t[k] == theirs_t.get(k) for k in ours_t), len(ours_t)]
            row = {"label": label, "command": command_line("scripts/benchmark_gguf.py", ap, args),
                   "file_mb": path.stat().st_size / 1e6, "bpw": linear_bits_per_weight(path),
                   "types_as_llama_cpp": types,
                   "kld": r.kld, "top1": r.top1, "ppl": r.ppl, "ppl_llama_protocol_lowbit": ppl_ours,
                   "ppl_llama_cpp": ppl_theirs, "quant_seconds": quant_s,
                   "token_ids_same": same_ids, "token_ids_compared": min(n_cmp, len(theirs_ids))}
            store.put(label, row)
            log(json.dumps(row))
            del loaded
    write_tables(store.rows, (time.time() - t0) / 60, args.no_write, ap, args, ran)
    return 0


def write_tables(rows: dict[str, dict], minutes: float, no_write: bool, parser: argparse.ArgumentParser,
                 args: argparse.Namespace, ran: set[str]) -> None:
    """Print both tables (every kept row) and, unless ``no_write``, put them in BENCHMARKS.md;
    ``ran``: the labels this invocation measured, in ``minutes``."""
    name = bench_model(args.model).name
    command = command_line("scripts/benchmark_gguf.py", parser, args)
    note = "" if args.model == DEFAULT_MODEL else f"Model: {bench_model(args.model).about}. "
    only_f32 = not any(label in rows for label, _ in ROWS[1:])
    pure = render(rows, ROWS, minutes, note + (F32_NOTE if only_f32 else PURE_NOTE), command, ran)
    mixes = render(rows, MIX_ROWS, minutes, note + MIX_NOTE, command, ran)
    print(pure + "\n\n" + mixes)
    if not no_write:
        replace_section(ROOT / "BENCHMARKS.md", model_section("gguf", args.model), f"GGUF files: lowbit and llama.cpp on "
                        f"{name}", pure)
        replace_section(ROOT / "BENCHMARKS.md", model_section("gguf-mixes", args.model), "GGUF type mixes (Q4_K_M, ...): "
                        f"lowbit and llama.cpp on {name}", mixes)


PURE_NOTE = (
    "Each row is one GGUF file; every linear of the decoder blocks in the named "
    "type, the token embedding and the output matrix (SmolLM2's is tied to it) in F16. llama.cpp's files: `llama-quantize --pure "
    "--token-embedding-type f16 --output-tensor-type f16` from the F32 GGUF of the same model; ")
F32_NOTE = (
    "The F32 file lowbit writes (`gguf-f32`), from which llama-quantize makes every llama.cpp file of the "
    "next table: llama.cpp and lowbit compute the same perplexity from it. ")
MIX_NOTE = (
    "Each row is one GGUF file with llama-quantize's type mix: the type of every tensor as llama-quantize "
    "chooses it (lowbit's `gguf-<mix>` presets resolve to the same types, tested against llama-quantize's "
    "own choices, and counted below for each lowbit RTN file against llama.cpp's of the same mix; rows that "
    "are not whole 256-value super-blocks, SmolLM2's 576 and Qwen2.5-0.5B's 896, take llama.cpp's fallback "
    "32-block types). llama.cpp's "
    "files: `llama-quantize [--imatrix] F32.gguf OUT.gguf <MIX>`; lowbit's: `gguf-<mix>` (RTN with llama.cpp's "
    "searches), `gguf-<mix>-imatrix` (the searches weighted by lowbit's importance matrix, collected block by "
    "block with earlier blocks quantized; or by llama.cpp's imatrix file read with `--imatrix`), "
    "`gguf-<mix>-gptq` (GPTQ on each tensor's grid). ")


def render(rows: dict[str, dict], which: list, minutes: float, note: str, command: str = COMMAND,
           ran: set[str] = frozenset()) -> str:  # type: ignore[assignment]
    any_row = next(iter(rows.values()))
    measured_by = list(dict.fromkeys(rows[label]["command"] for label, _ in which
                                     if label in rows and rows[label].get("command")))
    lines = [
        f"Printed by {command}" + ("" if measured_by in ([], [command]) else
                                   f" (its rows measured by {', '.join(measured_by)})") + ". " + note + "llama.cpp's imatrix: "
        "`llama-imatrix` on 128 chunks of 512 tokens of the built-in `pydoc-calib` text. KLD, top-1 and PPL: "
        "lowbit's evaluator on the file as transformers' GGUF loader reads it, held-out `pydoc` text, windows of "
        f"512. The two last PPL columns follow `llama-perplexity`'s protocol ({any_row['token_ids_compared'] // N_CTX} "
        f"chunks of {N_CTX} tokens, the second half of each chunk scored) on llama.cpp's own token ids: computed by lowbit "
        "from the file's weights, and by `llama-perplexity` running the file. llama.cpp and lowbit tokenize the "
        f"text identically on {any_row['token_ids_same']} of the first {any_row['token_ids_compared']} tokens.",
        "",
        "| file | MB | bpw (linears) | mean KLD | top-1 | PPL | PPL, llama.cpp protocol: lowbit | "
        "PPL: llama.cpp | quantize s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, _ in which:
        r = rows.get(label)
        if r is None:
            continue
        q = r["quant_seconds"]
        lines.append(f"| {label}{' †' if r.get('stale') else ''} | {r['file_mb']:.1f} | {r['bpw']:.3f} | {r['kld']:.5f} | {100 * r['top1']:.2f}% | "
                     f"{r['ppl']:.3f} | {r['ppl_llama_protocol_lowbit']:.3f} | {r['ppl_llama_cpp']:.3f} | "
                     f"{'-' if q is None else f'{q:.1f}'} |")
    counted = [(label, (rows.get(label) or {}).get("types_as_llama_cpp")) for label, _ in which]
    stale = sorted({r["stale"] for label, _ in which if (r := rows.get(label)) and r.get("stale")})
    lines += [""] if any(types for _, types in counted) or stale else []
    lines += [f"- †: {why}" for why in stale]
    for label, types in counted:
        if types:
            lines.append(f"- {label}: {types[0]} of its {types[1]} tensors have the type llama-quantize gives them.")
    lines += ["", f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
              + _provenance([label for label, _ in which if label in rows], ran, minutes)]
    return "\n".join(lines)


def _provenance(shown: list[str], ran: set[str], minutes: float) -> str:
    here = [label for label in shown if label in ran]
    if not here:
        return "; rows kept from earlier invocations."
    if len(here) == len(shown):
        return f"; this invocation {minutes:.1f} min."
    return (f"; {len(here)} of these {len(shown)} rows from this invocation ({minutes:.1f} min), the others kept "
            "from earlier invocations.")


if __name__ == "__main__":
    sys.exit(main())
