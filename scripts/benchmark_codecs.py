"""Every codec with RTN on a real model: the tables of BENCHMARKS.md, section "codecs-rtn" (SmolLM2-135M,
the default) or "codecs-rtn-MODEL".

Quantizes the built-in model with each integer recipe and each float/microscaling preset,
evaluates every result against the unquantized model on both built-in evaluation texts, saves
each to disk for its size, measures what bf16 compute costs, checks that more bits give lower
KLD, and rewrites the section between its markers in BENCHMARKS.md (``--no-write`` only prints).

    .venv/bin/python scripts/benchmark_codecs.py
    .venv/bin/python scripts/benchmark_codecs.py --model qwen2.5-coder-0.5b --max-windows 8 --rows short
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

from lowbit.bench.compare import compare_recipes, format_table, remove_dir, temporary_save_dir
from lowbit.bench.markdown import command_line, replace_section
from lowbit.bench.models import DEFAULT_MODEL, bench_model, model_section
from lowbit.calibration import load_text
from lowbit.evaluation import evaluate
from lowbit.models import cache_dir, load_model
from lowbit.recipes import Recipe, get_preset

ROOT = Path(__file__).resolve().parent.parent
SECTION = "codecs-rtn"


def int_recipe(label: str, bits: int, symmetric: bool, group_size: int | None, zero_point: str = "integer",
               clip_search: bool = False) -> Recipe:
    codec = {"name": "int", "bits": bits, "symmetric": symmetric, "zero_point": zero_point}
    codec.update({"granularity": "channel", "group_size": None} if group_size is None else
                 {"granularity": "group", "group_size": group_size})
    return Recipe.from_dict({"name": label, "codec": codec, "algorithm": {"name": "rtn", "clip_search": clip_search}})


INT_RECIPES = [
    int_recipe("int8 per-channel sym", 8, True, None),
    int_recipe("int4 g64 sym", 4, True, 64),
    int_recipe("int4 g64 asym", 4, False, 64),
    int_recipe("int4 g128 sym", 4, True, 128),
    int_recipe("int4 g128 asym", 4, False, 128),
    int_recipe("int4 g128 sym, clip search", 4, True, 128, clip_search=True),
    int_recipe("int4 g32 asym float-zero (Q4_1 grid)", 4, False, 32, "float"),
    int_recipe("int3 g64 sym", 3, True, 64),
    int_recipe("int3 g64 asym", 3, False, 64),
    int_recipe("int3 g64 sym, clip search", 3, True, 64, clip_search=True),
    int_recipe("int2 g64 sym", 2, True, 64),
    int_recipe("int2 g64 asym", 2, False, 64),
]
FLOAT_PRESETS = ["fp8", "fp8-e5m2", "mxfp8", "nf4", "nf4-dq", "fp4", "mxfp4", "nvfp4"]
# the rows at 8, 4 and 3 bits (for a larger model, where every row costs minutes)
SHORT_ROWS = ["int8 per-channel sym", "int4 g64 sym", "int4 g128 sym", "int4 g128 asym", "int3 g64 sym", "int3 g64 asym",
              "fp8", "mxfp8", "nf4", "fp4", "mxfp4", "nvfp4"]
# Integer rows shown beside the float ones, by size.
INT_NEIGHBOURS = ["int8 per-channel sym", "int4 g64 sym", "int4 g64 asym", "int4 g128 sym", "int4 g128 asym"]


def bf16_study(base, texts, max_windows):  # type: ignore[no-untyped-def]
    """KLD of the unquantized model computed in bf16 vs fp32, and the speed ratio."""
    lines = ["| text | compute dtype | PPL | mean KLD vs fp32 | top-1 | eval s | speed-up |", "|---|---|---:|---:|---:|---:|---:|"]
    for text in texts:
        fp32 = evaluate(copy.deepcopy(base.model), base.tokenizer, text, ref=base.model, max_windows=max_windows,
                        cache_dir=cache_dir(), progress=False)
        bf16 = evaluate(copy.deepcopy(base.model), base.tokenizer, text, ref=base.model, max_windows=max_windows,
                        dtype=torch.bfloat16, cache_dir=cache_dir(), progress=False)
        for name, r in (("float32", fp32), ("bfloat16", bf16)):
            lines.append(f"| {text.name} | {name} | {r.ppl:.3f} | {r.kld:.5f} | {100 * r.top1:.2f}% | {r.seconds:.1f} | "
                         f"{fp32.seconds / r.seconds:.2f}x |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help=f"the model (default {DEFAULT_MODEL})")
    ap.add_argument("--rows", choices=("all", "short"), default="all",
                    help="all rows, or those at 8, 4 and 3 bits (default all)")
    ap.add_argument("--max-windows", type=int, default=None, help="cap windows per text (quick runs)")
    ap.add_argument("--no-write", action="store_true", help="print only, do not rewrite BENCHMARKS.md")
    ap.add_argument("--json", type=Path, help="also write all rows as JSON here")
    args = ap.parse_args()

    t0 = time.time()
    base = load_model(args.model)
    info = bench_model(args.model)
    command = command_line("scripts/benchmark_codecs.py", ap, args)
    texts = [load_text("pydoc"), load_text("stdlib")]
    save_dir = temporary_save_dir()
    try:
        recipes = INT_RECIPES + [get_preset(p) for p in FLOAT_PRESETS]
        if args.rows == "short":
            recipes = [r for r in recipes if r.name in SHORT_ROWS]
        rows = compare_recipes(base, recipes, texts, max_windows=args.max_windows, save_dir=save_dir,
                               on_row=lambda r: print(f"{r.text:7s} {r.recipe:40s} kld={r.kld:.5f} top1={r.top1:.4f}",
                                                      file=sys.stderr, flush=True))
    finally:
        remove_dir(save_dir)
    study = bf16_study(base, texts, args.max_windows)

    # More bits must mean lower KLD (same grouping and symmetry), on every text.
    checks = []
    by = {(r.text, r.recipe): r.kld for r in rows}
    for text in texts:
        for chain in (["int8 per-channel sym", "int4 g64 sym", "int3 g64 sym", "int2 g64 sym"],
                      ["int4 g64 asym", "int3 g64 asym", "int2 g64 asym"]):
            chain = [c for c in chain if (text.name, c) in by]
            if len(chain) < 2:  # --rows short holds one row of the asymmetric chain
                continue
            klds = [by[(text.name, c)] for c in chain]
            ok = all(a < b for a, b in zip(klds, klds[1:]))
            checks.append(f"- {text.name}: {' < '.join(chain)}: {'holds' if ok else 'FAILS'}")
    table = format_table([r for r in rows if r.recipe not in FLOAT_PRESETS])
    float_rows = [r for r in rows if r.recipe in FLOAT_PRESETS or r.recipe in INT_NEIGHBOURS]
    float_table = format_table(sorted(float_rows, key=lambda r: (r.text != "pydoc", -r.bits_per_weight, r.kld)))
    minutes = (time.time() - t0) / 60
    body = "\n".join([
        f"Model: {info.about}. "
        f"Texts: `pydoc` ({rows[0].tokens} scored tokens) and `stdlib` ({rows[1].tokens}), windows of 512, "
        f"no overlap{'' if args.max_windows is None else f', at most {args.max_windows} windows'}. "
        "Reference: the unquantized model in float32; all models evaluated in float32. RTN; the clipping "
        "search (where named) is unweighted MSE over 26 shrink factors in [0.5, 1]. "
        "`bpw` counts the decoder-block linears with their scale data; `model MB` every stored tensor "
        "(embeddings and norms in fp16); `disk MB` the saved safetensors file. The unquantized row is "
        "the fp32 model as converted.",
        "",
        "### Integer codecs",
        "",
        f"Printed by {command}.",
        "",
        table,
        "",
        "### Float and microscaling codecs beside the integer rows of similar size",
        "",
        f"Printed by {command}.",
        "",
        "Presets as `lowbit quantize --recipe NAME` uses them (RTN, no search), sorted by bits per weight.",
        "",
        float_table,
        "",
        "More bits, lower KLD:",
        *checks,
        "",
        f"What bf16 compute costs (unquantized model, same windows; KLD against the fp32 reference; "
        f"printed by {command}):",
        "",
        study,
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"whole run {minutes:.1f} min. Command: {command}.",
    ])
    print(body)
    if args.json:
        args.json.write_text(json.dumps([r.to_dict() for r in rows], indent=1))
    if not args.no_write:
        replace_section(ROOT / "BENCHMARKS.md", model_section(SECTION, args.model), f"Codecs with RTN on {info.name}", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
