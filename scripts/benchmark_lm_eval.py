"""lm-evaluation-harness on a real model through lowbit, next to lm-eval's own `hf` backend.

Writes three local lm-eval tasks from text that ships with Python (`pydoc_data.topics`: the
help pages): the last word of a sentence given the sentence (loglikelihood: accuracy of greedy
decoding, perplexity of the word), the next words of a sentence (greedy generation until a
period or newline: exact match), and whole paragraphs (rolling loglikelihood: word perplexity,
bits per byte). Then runs, in one process, with the same token ids for every row:

  hf      lm-eval's `hf` backend on the unquantized model's HF folder, float32;
  lowbit  the `lowbit` backend on the same folder (float32: an HF folder has no kernels);
  lowbit  on the model quantized by `lowbit quantize --recipe R` for each R in --recipes, as
          `generate` runs it (fast CPU kernels, their dtype).

Prints one Markdown table and the largest difference between the two backends' per-request
loglikelihoods on the unquantized model, and rewrites its BENCHMARKS.md section.

    .venv/bin/python scripts/benchmark_lm_eval.py [--model smollm2-135m] [--recipes int8,w4a16]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local JSON tasks: nothing from a hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "smollm2-135m"
WORD, NEXT, ROLL = "lowbit_pydoc_lastword", "lowbit_pydoc_next", "lowbit_pydoc_paragraphs"
TASKS = [WORD, NEXT, ROLL]


def sentences_and_paragraphs() -> tuple[list[str], list[str]]:
    """Prose sentences (8 to 40 words, ending in a word and a period) and paragraphs (over 300
    characters) of the help topics, in topic order, without code lines."""
    from pydoc_data.topics import topics

    sentences, paragraphs = [], []
    for name in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[name]):
            if para.startswith((" ", "\t")) or ">>>" in para:
                continue  # code, tables and examples
            flat = " ".join(para.split())
            if len(flat) > 300:
                paragraphs.append(flat)
            for s in re.split(r"(?<=\.)\s+", flat):
                if 8 <= len(s.split()) <= 40 and re.fullmatch(r"[A-Z].*\s[a-z]+\.", s):
                    sentences.append(s)
    return sentences, paragraphs


def write_tasks(root: Path, n_words: int, n_next: int, n_paragraphs: int) -> None:
    sentences, paragraphs = sentences_and_paragraphs()
    step = max(1, len(sentences) // n_words)
    chosen = sentences[::step][:n_words]
    cache = root / "hf-datasets"

    def jsonl(name: str, rows: list[dict]) -> Path:
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    def yaml(task: str, data: Path, body: str) -> None:
        (root / f"{task}.yaml").write_text(
            f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"  cache_dir: {cache}\ntest_split: test\n{body}")

    words = [{"context": s[:-1].rsplit(" ", 1)[0], "word": " " + s[:-1].rsplit(" ", 1)[1]} for s in chosen]
    yaml(WORD, jsonl("lastword", words),
         "output_type: loglikelihood\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{word}}'\n"
         "metric_list:\n  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
         "  - {metric: perplexity, aggregation: perplexity, higher_is_better: false}\n")
    nexts = []
    for s in chosen[:n_next]:
        w = s.split()
        cut = len(w) // 2
        nexts.append({"prompt": " ".join(w[:cut]), "target": " ".join(w[cut:cut + 2])})
    yaml(NEXT, jsonl("next", nexts),
         "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
         "generation_kwargs:\n  until: ['.', '\\n']\n  max_gen_toks: 16\n  do_sample: false\n"
         "filter_list:\n  - name: two-words\n    filter:\n      - {function: regex, regex_pattern: '^\\s*(\\S+\\s+\\S+)'}\n"
         "      - {function: take_first}\n"
         "metric_list:\n  - {metric: exact_match, aggregation: mean, higher_is_better: true, ignore_punctuation: true}\n")
    step = max(1, len(paragraphs) // n_paragraphs)
    yaml(ROLL, jsonl("paragraphs", [{"text": p} for p in paragraphs[::step][:n_paragraphs]]),
         "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
         "metric_list:\n  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}\n"
         "  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}\n")


def scores(results: dict) -> dict[str, float]:
    r = results["results"]
    return {"acc": r[WORD]["acc,none"], "word ppl": r[WORD]["perplexity,none"],
            "next exact": r[NEXT]["exact_match,two-words"], "para word ppl": r[ROLL]["word_perplexity,none"],
            "bits/byte": r[ROLL]["bits_per_byte,none"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help=f"a built-in model (default {DEFAULT_MODEL})")
    ap.add_argument("--recipes", default="int8,w4a16", help="quantized rows, comma-separated presets")
    ap.add_argument("--words", type=int, default=200, help="last-word documents (default 200)")
    ap.add_argument("--next", type=int, default=50, help="generation documents (default 50)")
    ap.add_argument("--paragraphs", type=int, default=30, help="rolling-loglikelihood paragraphs (default 30)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-write", action="store_true", help="print only, do not rewrite BENCHMARKS.md")
    args = ap.parse_args()

    import lm_eval
    from lm_eval.tasks import TaskManager

    from lowbit.bench.markdown import command_line, replace_section
    from lowbit.evaluation.lm_eval_backend import request_loglikelihoods, run_lm_eval
    from lowbit.models import builtin_model_path

    folder = builtin_model_path(args.model)
    recipes = [r for r in args.recipes.split(",") if r]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tasks = Path(tmp) / "tasks"
        tasks.mkdir()
        write_tasks(tasks, args.words, args.next, args.paragraphs)
        manager = TaskManager(include_path=str(tasks), include_defaults=False)
        theirs = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": str(folder), "device": "cpu", "dtype": "float32"},
            tasks=TASKS, batch_size=args.batch_size, task_manager=manager)
        rows.append(("hf", "unquantized", "float32", scores(theirs)))
        ours = run_lm_eval(str(folder), TASKS, include_path=tasks, batch_size=args.batch_size, device="cpu")
        rows.append(("lowbit", "unquantized", ours["config"]["lowbit_dtype"], scores(ours)))
        a, b = request_loglikelihoods(theirs, [WORD, ROLL]), request_loglikelihoods(ours, [WORD, ROLL])
        gap = max(abs(x - y) for x, y in zip(a, b, strict=True))
        same_text = [s["filtered_resps"] for s in sorted(theirs["samples"][NEXT], key=lambda s: s["doc_id"])] == \
                    [s["filtered_resps"] for s in sorted(ours["samples"][NEXT], key=lambda s: s["doc_id"])]
        for recipe in recipes:
            out = Path(tmp) / recipe
            subprocess.run([sys.executable, "-m", "lowbit", "quantize", args.model, "--recipe", recipe,
                            "--out", str(out), "--no-progress"], check=True)
            q = run_lm_eval(str(out), TASKS, include_path=tasks, batch_size=args.batch_size, device="cpu")
            linears = q["config"]["lowbit_linears"]
            rows.append(("lowbit", recipe, f"{q['config']['lowbit_dtype']}, {linears}", scores(q)))
    command = command_line("scripts/benchmark_lm_eval.py", ap, args)
    names = list(rows[0][3])
    lines = [
        f"Printed by {command} (lm-eval {lm_eval.__version__}; {args.words} last-word, "
        f"{args.next} generation and {args.paragraphs} paragraph documents from `pydoc_data.topics`).",
        "",
        f"On the unquantized model the two backends' {len(a)} loglikelihoods differ by at most {gap:.2e} nats; "
        f"their greedy generations are {'identical' if same_text else 'NOT identical'}.",
        "",
        "| backend | model | runs as | " + " | ".join(names) + " |",
        "|---|---|---|" + "---:|" * len(names),
    ]
    for backend, model, runs, s in rows:
        lines.append(f"| {backend} | {model} | {runs} | " + " | ".join(f"{s[n]:.4f}" for n in names) + " |")
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        replace_section(ROOT / "BENCHMARKS.md", f"lm-eval-{args.model}",
                        f"lm-evaluation-harness through lowbit on {args.model}", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
