"""Quantized activations and composed transforms on SmolLM2-135M, beside llm-compressor and
bitsandbytes: the tables of BENCHMARKS.md sections "activations", "gptq-defaults" and
"activations-speed".

Sections (``--sections``, default all):

* ``quality``: lowbit's int8 weight-only, W8A8 (dynamic per token), W8A8 after SmoothQuant (a = 0.5
  and searched), W8A8 with static per-tensor input scales from each observer, FP8 dynamic, W4A8 and
  LLM.int8(); llm-compressor's W8A8 and SmoothQuant (0.5) + W8A8 on the same calibration token ids
  (its own virtual environment, ``scripts/peers/``), its folders read by lowbit; bitsandbytes'
  LLM.int8() (threshold 6, transformers' ``load_in_8bit`` on the CPU). Every row evaluated by the
  same evaluator (KLD, top-1, PPL against the unquantized model on the held-out ``pydoc`` and
  ``stdlib`` texts). Calibration: 128 x 512 tokens of ``pydoc-calib`` (seed 0) for everyone.
* ``gptq``: int4 g64 symmetric with 64 x 512 calibration tokens: lowbit's GPTQ with and without
  act-order, AWQ, AWQ's scaling then GPTQ (act-order), the last two also calibrated on
  ``stdlib-calib``; the presets ``w4a16-g64-gptq`` and ``w4a16-g64-awq-gptq`` as the CLI runs them (their
  128 x 512 calibration tokens); llm-compressor's GPTQ with its default (``actorder`` static) and without
  act-order, on the same tokens. Quantization times in the same run.
* ``speed``: ``lowbit bench-speed`` (batch 1, 512 prompt tokens, 32 new tokens, median of 3) of
  FP32, BF16 and each quantized recipe as generate runs it, and bitsandbytes' LLM.int8() decoding
  in the same process way (fewer tokens: it is slow).

Rows are kept in ``scripts/rows/activations.json`` (``--redo "LABEL;LABEL"`` runs some again,
``--fresh`` all; ``--redo speed`` every speed row). Never run another benchmark or test suite beside it: the times would be wrong.

    .venv/bin/python scripts/benchmark_activations.py [--sections quality,gptq,speed] [--max-windows N]
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
from typing import Any

import torch

from lowbit.bench.cell import best_speed
from lowbit.bench.compare import block_linear_names
from lowbit.bench.markdown import command_line, replace_section
from lowbit.bench.store import RowStore
from lowbit.calibration import CalibrationConfig, calibration_set, load_text
from lowbit.evaluation import evaluate, model_size
from lowbit.models.fingerprint import model_fingerprint
from lowbit.models import builtin_model_path, cache_dir, load_model
from lowbit.pipeline import quantize_model
from lowbit.recipes import Recipe, get_preset

ROOT = Path(__file__).resolve().parent.parent
ROWS_DIR = ROOT / "scripts" / "rows"
MODEL = "smollm2-135m"
TEXTS = ("pydoc", "stdlib")
CALIB = CalibrationConfig(source="pydoc-calib", samples=128, seq_len=512, seed=0)
GPTQ_CALIB = CalibrationConfig(source="pydoc-calib", samples=64, seq_len=512, seed=0)
PEER_PY = ROOT / ".venv-llmcompressor" / "bin" / "python"
W8 = {"name": "int", "bits": 8, "granularity": "channel", "group_size": None}
INT4_G64 = {"name": "int", "bits": 4, "granularity": "group", "group_size": 64}


def static(observer: dict[str, Any]) -> dict[str, Any]:
    return {"codec": W8, "activations": {"dynamic": False, "granularity": "tensor", "observer": observer},
            "calibration": CALIB.model_dump()}


# (label, preset name or recipe dict)
QUALITY: list[tuple[str, str | dict[str, Any]]] = [
    ("int8 weight-only (W8A16)", "int8"),
    ("W8A8 dynamic per token", "w8a8"),
    ("W8A8 SmoothQuant a=0.5", "w8a8-smoothquant"),
    ("W8A8 SmoothQuant a searched", {"codec": W8, "activations": {}, "calibration": CALIB.model_dump(),
                                     "transforms": [{"name": "smoothquant", "alpha": None}]}),
    ("W8A8 static, minmax", static({"name": "minmax"})),
    ("W8A8 static, moving average", static({"name": "moving_average"})),
    ("W8A8 static, percentile 99.9", static({"name": "percentile", "q": 99.9})),
    ("W8A8 static, percentile 99.99", static({"name": "percentile", "q": 99.99})),
    ("W8A8 static, MSE", static({"name": "mse"})),
    ("W8A8 static, entropy", static({"name": "entropy"})),
    ("W8A8 SmoothQuant a=0.5, static percentile 99.99", {**static({"name": "percentile", "q": 99.99}),
                                                         "transforms": [{"name": "smoothquant", "alpha": 0.5}]}),
    ("W8A8 SmoothQuant a=0.5, static MSE", {**static({"name": "mse"}),
                                            "transforms": [{"name": "smoothquant", "alpha": 0.5}]}),
    # SmoothQuant's a searched with the static per-tensor inputs in the loop (each sub-step's rows
    # quantized with one scale), and a stronger fixed migration: may a fully static recipe get close?
    ("W8A8 SmoothQuant a searched, static MSE", {**static({"name": "mse"}),
                                                "transforms": [{"name": "smoothquant", "alpha": None}]}),
    ("W8A8 SmoothQuant a=0.8, static MSE", {**static({"name": "mse"}),
                                            "transforms": [{"name": "smoothquant", "alpha": 0.8}]}),
    ("W8A8 SmoothQuant a searched, static MSE, calibrated on stdlib",
     {**static({"name": "mse"}), "transforms": [{"name": "smoothquant", "alpha": None}],
      "calibration": CALIB.model_copy(update={"source": "stdlib-calib"}).model_dump()}),
    # where static scales lose: the MLP's down projection (its input, SiLU(gate) * up, holds the largest values)
    ("W8A8 static MSE, down_proj inputs dynamic per token",
     {**static({"name": "mse"}), "rules": [{"match": "*.down_proj", "activations": {"granularity": "token"}}]}),
    ("W8A8 SmoothQuant a=0.5, static MSE, down_proj inputs dynamic per token",
     {**static({"name": "mse"}), "transforms": [{"name": "smoothquant", "alpha": 0.5}],
      "rules": [{"match": "*.down_proj", "activations": {"granularity": "token"}}]}),
    # SmolLM2's massive activations sit in a few input features: keep each linear's 16 largest (by calibrated
    # |x|) in 16-bit, the same ones for every input, and the rest static per tensor (the preset), or dynamic
    ("W8A8 static MSE, 16 fixed 16-bit channels", "w8a8-static-channels"),
    ("W8A8 static MSE, 16 fixed 16-bit channels, calibrated on stdlib",
     {**static({"name": "mse"}), "activations": {**static({"name": "mse"})["activations"], "outlier_channels": 16},
      "calibration": CALIB.model_copy(update={"source": "stdlib-calib"}).model_dump()}),
    ("W8A8 dynamic per token, 16 fixed 16-bit channels",
     {"codec": W8, "activations": {"outlier_channels": 16}, "calibration": CALIB.model_dump()}),
    ("FP8 dynamic (E4M3 weights and inputs)", "fp8-dynamic"),
    ("W4A8 (int4 g128, int8 inputs)", "w4a8"),
    ("LLM.int8() threshold 6", "llm-int8"),
]
PEERS = [("llm-compressor W8A8", None), ("llm-compressor SmoothQuant 0.5 + W8A8", 0.5)]
BNB = "bitsandbytes LLM.int8() threshold 6"


def gptq_recipe(extra: dict[str, Any], calib: CalibrationConfig = GPTQ_CALIB) -> dict[str, Any]:
    return {"codec": INT4_G64, "calibration": calib.model_dump(), **extra}


OTHER = CalibrationConfig(source="stdlib-calib", samples=64, seq_len=512, seed=0)
LLMC = "llm-compressor"  # a row of llm-compressor's GPTQ: (label, (LLMC, its actorder))
# in the order they run (the decisive rows first: the section is long, and kept rows resume)
SCORED = "lowbit AWQ scored by GPTQ, then GPTQ act-order"
GPTQ_ROWS: list[tuple[str, str | dict[str, Any] | tuple[str, str]]] = [
    ("lowbit GPTQ", gptq_recipe({"algorithm": {"name": "gptq", "act_order": False}})),
    ("lowbit GPTQ act-order", gptq_recipe({"algorithm": {"name": "gptq", "act_order": True}})),
    ("llm-compressor GPTQ, its default (actorder static)", (LLMC, "static")),
    ("lowbit GPTQ act-order, calibrated on stdlib", gptq_recipe({"algorithm": {"name": "gptq", "act_order": True}}, OTHER)),
    ("lowbit AWQ then GPTQ act-order", gptq_recipe({"algorithm": {"name": "gptq", "act_order": True},
                                                    "transforms": ["awq"]})),
    ("lowbit AWQ", gptq_recipe({"algorithm": {"name": "awq"}})),
    # AWQ's scale search scored by the codes GPTQ then chooses, not by RTN's (the presets' transform)
    (SCORED,
     gptq_recipe({"algorithm": {"name": "gptq", "act_order": True}, "transforms": [{"name": "awq", "score": "algorithm"}]})),
    ("llm-compressor GPTQ, actorder none", (LLMC, "none")),
    (f"{SCORED}, calibrated on stdlib",
     gptq_recipe({"algorithm": {"name": "gptq", "act_order": True}, "transforms": [{"name": "awq", "score": "algorithm"}]},
                 OTHER)),
    # the presets as the CLI runs them (their default calibration: 128 x 512 tokens of pydoc-calib)
    ("preset w4a16-g64-gptq", "w4a16-g64-gptq"),
    ("preset w4a16-g64-awq-gptq", "w4a16-g64-awq-gptq"),
]

# (label, preset or None for the float model, dtype)
SPEED_ROWS = [("FP32", None, "float32"), ("BF16", None, "bfloat16"), ("int8 weight-only", "int8", "auto"),
              ("W8A8 dynamic", "w8a8", "auto"), ("W8A8 static (per tensor)", "w8a8-static", "auto"),
              ("W8A8 static, 16 fixed channels", "w8a8-static-channels", "auto"),
              ("LLM.int8()", "llm-int8", "auto"), ("W4A8", "w4a8", "auto"), ("W4A16 (int4 g128)", "w4a16", "auto"),
              ("FP8 dynamic", "fp8-dynamic", "auto")]
MAX_WINDOWS: int | None = None


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def recipe_of(spec: str | dict[str, Any], label: str) -> Recipe:
    return get_preset(spec) if isinstance(spec, str) else Recipe.from_dict({"name": label, **spec})


def calibration_of(rec: Recipe, tokenizer, sets: dict) -> Any:  # type: ignore[no-untyped-def]
    """The calibration set of ``rec``'s calibration config, built once per config in ``sets``."""
    config = rec.calibration_config()
    if config not in sets:
        sets[config] = calibration_set(tokenizer, config)
    return sets[config]


def evaluate_rows(model, base, texts, ref_fp, label: str, extra: dict, store: RowStore,  # type: ignore[no-untyped-def]
                  dtype: torch.dtype | None = torch.float32) -> None:
    size = model_size(model, block_linear_names(base.model))
    for text in texts:
        r = evaluate(model, base.tokenizer, text, ref=base.model, cache_dir=cache_dir(), progress=False,
                     ref_fingerprint=ref_fp, max_windows=MAX_WINDOWS, dtype=dtype)
        store.put(f"{label}|{text.name}", {"label": label, "text": text.name, "kld": r.kld, "top1": r.top1, "ppl": r.ppl,
                                           "kld_p99": r.kld_p99, "bpw": size.bits_per_weight, **extra})
        log(f"{text.name:7s} {label:48s} kld={r.kld:.5f} top1={r.top1:.4f} {extra.get('quant_seconds')}")


def done(store: RowStore, label: str) -> bool:
    return all(store.get(f"{label}|{t}") for t in TEXTS)


def outlier_fraction(folder: Path, base, text) -> float:  # type: ignore[no-untyped-def]
    """LLM.int8(): the share of input columns kept in 16-bit, over every linear and window of
    ``text``, as the kernels run it."""
    from lowbit.evaluation.speed import load_for_running
    from lowbit.modules.kernels import LLMInt8Kernel

    loaded = load_for_running(str(folder), "auto")[0]
    evaluate(loaded.model, base.tokenizer, text, ref=None, progress=False, max_windows=MAX_WINDOWS,
             dtype=next(loaded.model.parameters()).dtype)
    kernels = [m.kernel for m in loaded.model.modules() if isinstance(getattr(m, "kernel", None), LLMInt8Kernel)]
    return sum(k.outlier_counts[0] for k in kernels) / max(1, sum(k.outlier_counts[1] for k in kernels))


def peer(script: str, *args: str) -> dict[str, Any]:
    if not PEER_PY.exists():
        subprocess.run(["bash", str(ROOT / "scripts" / "peers" / "setup_llmcompressor.sh")], check=True)
    cmd = [str(PEER_PY), str(ROOT / "scripts" / "peers" / script), *args, "--threads", str(torch.get_num_threads())]
    log("running " + " ".join(cmd))
    return json.loads(subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1])


def run_quality(base, texts, ref_fp, store: RowStore) -> None:  # type: ignore[no-untyped-def]
    calib = calibration_set(base.tokenizer, CALIB)  # the peers' too
    sets = {CALIB: calib}
    for label, spec in QUALITY:
        if done(store, label):
            continue
        rec = recipe_of(spec, label)
        model = copy.deepcopy(base.model)
        report = quantize_model(model, rec, progress=False,
                                calibration=calibration_of(rec, base.tokenizer, sets) if rec.needs_calibration else None)
        extra: dict[str, Any] = {"quant_seconds": report.seconds, "recipe": rec.to_dict()}
        if rec.activations is not None and rec.activations.outlier_threshold is not None:
            from lowbit.io.formats import save_model
            from lowbit.models import LoadedModel

            with tempfile.TemporaryDirectory() as tmp:
                folder = save_model("native", LoadedModel(model, base.tokenizer, MODEL, None), Path(tmp) / "m")
                extra["outlier_fraction"] = {t.name: outlier_fraction(folder, base, t) for t in texts}
        evaluate_rows(model, base, texts, ref_fp, label, extra, store)
    with tempfile.TemporaryDirectory(prefix="lowbit-peer-") as tmp:
        tokens = Path(tmp) / "tokens.pt"
        torch.save(calib.tokens, tokens)
        for label, strength in PEERS:
            if done(store, label):
                continue
            out = Path(tmp) / label.replace(" ", "_")
            args = ["--model", str(builtin_model_path(MODEL)), "--tokens", str(tokens), "--out", str(out)]
            result = peer("llmcompressor_w8a8.py", *args, *([] if strength is None else ["--smoothing-strength", str(strength)]))
            theirs = load_model(str(out))
            evaluate_rows(theirs.model, base, texts, ref_fp, label, {"quant_seconds": result["seconds"], "peer": result},
                          store)
    if not done(store, BNB):
        model, seconds, version = bitsandbytes_model()
        # bitsandbytes' model is evaluated as loaded (float16 activations): transformers refuses to cast it
        evaluate_rows(model, base, texts, ref_fp, BNB, {"quant_seconds": seconds, "bitsandbytes": version}, store,
                      dtype=None)


def bitsandbytes_model():  # type: ignore[no-untyped-def]
    """SmolLM2 through transformers' ``load_in_8bit`` (bitsandbytes' Linear8bitLt, threshold 6,
    lm_head kept dense as transformers does), in eval mode: bitsandbytes' int8 inference path."""
    import warnings

    import bitsandbytes
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(
            builtin_model_path(MODEL), dtype=torch.float16, device_map="cpu",
            quantization_config=BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)).eval()
    return model, time.perf_counter() - t0, bitsandbytes.__version__


def run_gptq(base, texts, ref_fp, store: RowStore) -> None:  # type: ignore[no-untyped-def]
    sets = {GPTQ_CALIB: calibration_set(base.tokenizer, GPTQ_CALIB)}
    with tempfile.TemporaryDirectory(prefix="lowbit-peer-") as tmp:
        tokens = Path(tmp) / "tokens.pt"
        torch.save(sets[GPTQ_CALIB].tokens, tokens)
        for label, spec in GPTQ_ROWS:
            if done(store, label):
                continue
            if isinstance(spec, tuple):
                out = Path(tmp) / spec[1]
                result = peer("llmcompressor_gptq.py", "--model", str(builtin_model_path(MODEL)), "--tokens", str(tokens),
                              "--bits", "4", "--group-size", "64", "--symmetric", "--actorder", spec[1],
                              "--dampening-frac", "0.01", "--block-size", "128", "--out", str(out))
                theirs = load_model(str(out))
                evaluate_rows(theirs.model, base, texts, ref_fp, label, {"quant_seconds": result["seconds"],
                                                                          "settings": result.get("settings")}, store)
            else:
                rec = recipe_of(spec, label)
                model = copy.deepcopy(base.model)
                report = quantize_model(model, rec, progress=False, calibration=calibration_of(rec, base.tokenizer, sets))
                evaluate_rows(model, base, texts, ref_fp, label,
                              {"quant_seconds": report.seconds, "recipe": rec.to_dict()}, store)


def run_speed(store: RowStore, rounds: int) -> None:
    """Each row's ``bench-speed`` in its own process, ``rounds`` times with the rows in turn, the best
    prefill and decode rates kept: a process's speed here falls into a fast or a slow mode (the
    same command measured 1,170 and 1,590 prefill tokens/s in consecutive processes), for every row."""
    lowbit = [sys.executable, "-m", "lowbit"]
    todo = [(label, preset, dtype) for label, preset, dtype in SPEED_ROWS if not store.get(f"speed|{label}")]
    with tempfile.TemporaryDirectory(prefix="lowbit-speed-") as tmp:
        specs = {}
        for label, preset, dtype in todo:
            specs[label] = MODEL if preset is None else str(Path(tmp) / preset)
            if preset is not None:
                subprocess.run([*lowbit, "quantize", MODEL, "--recipe", preset, "--out", specs[label], "--no-progress"],
                               check=True)
        best: dict[str, dict] = {}
        for round_ in range(rounds):
            for label, _, dtype in todo:
                out = subprocess.run([*lowbit, "bench-speed", specs[label], "--dtype", dtype, "--batch", "1",
                                      "--prompt-tokens", "512", "--new-tokens", "32", "--repeats", "3", "--json"],
                                     check=True, capture_output=True, text=True).stdout
                result = json.loads(out.strip().splitlines()[-1])
                log(f"{label}, round {round_ + 1}: {result['runs'][0]}")
                best[label] = {**(result if label not in best else best_speed(best[label], result)), "rounds": round_ + 1}
        for label, result in best.items():
            store.put(f"speed|{label}", {"label": label, **result})
    if not store.get(f"speed|{BNB}"):
        from lowbit.evaluation.speed import measure_speed

        model, _, version = bitsandbytes_model()
        r = measure_speed(model, model.config.vocab_size, batch=1, prompt_tokens=512, new_tokens=4, repeats=1)
        store.put(f"speed|{BNB}", {"label": BNB, "runs": [r.to_dict()], "linears": {"bitsandbytes": version},
                                   "dtype": "float16"})
        log(f"{BNB}: {r.to_dict()}")


# -------------------------------------------------------------------------------- tables


def fmt_rows(rows: dict[str, dict], labels: list[str]) -> list[str]:
    out = ["| text | recipe | mean KLD | KLD p99 | top-1 | PPL | bpw | quantize s |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for t in TEXTS:
        for label in labels:
            r = rows.get(f"{label}|{t}")
            if r is None:
                continue
            q = r.get("quant_seconds")
            # llm-compressor's GPTQ script hands back its chosen values dequantized (a dense folder): no bpw
            bpw = "-" if r["bpw"] > 16 else f"{r['bpw']:.3f}"
            out.append(f"| {t} | {label} | {r['kld']:.5f} | {r['kld_p99']:.4f} | {100 * r['top1']:.2f}% | {r['ppl']:.3f} | "
                       f"{bpw} | {'-' if q is None else f'{q:.1f}'} |")
    return out


def kld(rows: dict[str, dict], label: str, text: str) -> float | None:
    r = rows.get(f"{label}|{text}")
    return None if r is None else r["kld"]


def claims(rows: dict[str, dict]) -> list[str]:
    """The issue's goals, each line computed from the rows (a missing row: said so)."""
    out = []

    def ratio(a: str, b: str, t: str) -> str:
        x, y = kld(rows, a, t), kld(rows, b, t)
        return "not measured" if x is None or y is None else f"{x:.5f} / {y:.5f} = {x / y:.2f}"

    for t in TEXTS:
        out.append(f"- {t}: W8A8 SmoothQuant a=0.5 vs lowbit's plain W8A8: {ratio('W8A8 SmoothQuant a=0.5', 'W8A8 dynamic per token', t)} (goal <= 0.5)")
        out.append(f"- {t}: W8A8 SmoothQuant a=0.5 vs llm-compressor's SmoothQuant W8A8: "
                   f"{ratio('W8A8 SmoothQuant a=0.5', 'llm-compressor SmoothQuant 0.5 + W8A8', t)} (goal < 1)")
        # every input scale static per tensor (with or without SmoothQuant), calibrated on pydoc-calib; rows that
        # keep some inputs dynamic or some features in 16-bit do not count
        statics = [label for label, _ in QUALITY if "static" in label and "dynamic" not in label
                   and "channels" not in label and "calibrated on" not in label]
        best = min((s for s in statics if kld(rows, s, t) is not None), key=lambda s: kld(rows, s, t), default=None)
        if best:
            out.append(f"- {t}: best static per tensor ({best}) vs dynamic per token: "
                       f"{ratio(best, 'W8A8 dynamic per token', t)} (goal <= 1.5)")
        for label in ("W8A8 static MSE, 16 fixed 16-bit channels", "W8A8 static MSE, 16 fixed 16-bit channels, "
                      "calibrated on stdlib"):
            out.append(f"- {t}: {label} vs dynamic per token: {ratio(label, 'W8A8 dynamic per token', t)} "
                       "(goal <= 1.5, with 16 features per linear in 16-bit)")
        out.append(f"- {t}: lowbit's LLM.int8() vs bitsandbytes': {ratio('LLM.int8() threshold 6', BNB, t)} "
                   "(goal within 10%)")
    return out


def gptq_claims(rows: dict[str, dict]) -> list[str]:
    """The issue's GPTQ goals, each line computed from the rows (a missing row: said so)."""
    out = []
    for t in TEXTS:
        def vs(a: str, b: str, goal: str) -> str:
            x, y = kld(rows, a, t), kld(rows, b, t)
            value = "not measured" if x is None or y is None else f"{x:.4f} / {y:.4f} = {x / y:.2f}"
            return f"- {t}: {a} vs {b}: {value} ({goal})"
        out.append(vs("lowbit GPTQ act-order", "lowbit GPTQ", "the default follows the lower"))
        out.append(vs("lowbit GPTQ act-order", "llm-compressor GPTQ, its default (actorder static)", "lowbit's default"))
        for awq_gptq in (SCORED, "lowbit AWQ then GPTQ act-order"):
            out.append(vs(awq_gptq, "lowbit AWQ", "goal < 1"))
            out.append(vs(awq_gptq, "lowbit GPTQ act-order", "goal < 1"))
        out.append(vs(f"{SCORED}, calibrated on stdlib", "lowbit GPTQ act-order, calibrated on stdlib",
                      "on other calibration text"))
        out.append(vs("preset w4a16-g64-awq-gptq", "preset w4a16-g64-gptq", "the presets, 128 samples"))
    for label in (SCORED, "lowbit AWQ then GPTQ act-order", "preset w4a16-g64-awq-gptq"):
        best = kld(rows, label, "pydoc")
        out.append(f"- pydoc: {label} {'not measured' if best is None else f'{best:.4f}'} (goal <= 0.15)")
    return out


def render(rows: dict[str, dict], commands: dict[str, str], minutes: float) -> tuple[str, str, str]:
    """The three tables; ``commands``: per section, the command that measures its rows."""
    calib = ("Calibration: 128 x 512 tokens of the built-in `pydoc-calib` split (seed 0), the same token ids for "
             "lowbit and llm-compressor. ")
    where = "" if MAX_WINDOWS is None else f" (first {MAX_WINDOWS} windows of each)"
    machine = f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}" + (
        f"; this invocation {minutes:.1f} min." if minutes else "; rows kept from earlier invocations.")
    q_labels = [label for label, _ in QUALITY] + [label for label, _ in PEERS] + [BNB]
    outliers = [f"- {label}: {', '.join(f'{t} {100 * f:.2f}%' for t, f in r['outlier_fraction'].items())} of the "
                "input columns kept in 16-bit (over every linear and window, as the kernels run it)"
                for label in q_labels if (r := rows.get(f"{label}|pydoc")) and r.get("outlier_fraction")]
    peers = [f"- {label}: `{' + '.join(r['peer']['recipe'])}` (llm-compressor {r['peer']['versions']['llmcompressor']}), "
             f"{r['peer']['torch_num_threads']} threads" for label, _ in PEERS if (r := rows.get(f"{label}|pydoc"))]
    quality = "\n".join([
        f"Printed by {commands['quality']}. Model: SmolLM2-135M-Instruct (built-in `{MODEL}`). " + calib +
        "Evaluation: KLD, top-1 and PPL against the unquantized model in float32, held-out `pydoc` and `stdlib` texts, "
        f"windows of 512{where}, every row on lowbit's reference path (weights dequantized in float32, inputs rounded "
        "to their format as the kernels round them: int8 per token at absmax / 127, as vLLM). llm-compressor's "
        "folders (compressed-tensors `int-quantized`, dynamic per-token int8 inputs) are read by lowbit; "
        "bitsandbytes runs its own Linear8bitLt (fp16 activations, transformers' `load_in_8bit`).", "",
        *fmt_rows(rows, q_labels), "", *outliers, *peers, "", "Goals:", *claims(rows), "", machine])
    g_labels = [label for label, _ in GPTQ_ROWS]
    gptq = "\n".join([
        f"Printed by {commands['gptq']}. int4, groups of 64, symmetric; calibration 64 x 512 tokens of `pydoc-calib` (seed 0; "
        "the same ids for llm-compressor), or of `stdlib-calib` where the row says so; dampening 0.01, blocks of 128, "
        "static groups (act-order permutes columns by decreasing Hessian diagonal while keeping the groups in order, "
        "llm-compressor's `actorder: static`); float32 passes. `quantize s`: lowbit's `quantize_model`, "
        "llm-compressor's `oneshot`, in the same run. llm-compressor's GPTQ rows: its chosen codes, handed back "
        "dequantized (checked to lie on their grid) and evaluated as dense weights, hence no bpw.", "",
        *fmt_rows(rows, g_labels), "", "Goals:", *gptq_claims(rows), "", machine])
    speed = render_speed(rows, commands['speed'], machine)
    return quality, gptq, speed


def _rounds(rows: dict[str, dict]) -> str:
    counts = {r.get("rounds", 1) for label, r in rows.items() if label.startswith("speed|") and label != f"speed|{BNB}"}
    n = max(counts, default=1)
    return "" if n == 1 else f", {n} times with the rows in turn, the best prefill and decode rate of each row kept"


def render_speed(rows: dict[str, dict], command: str, machine: str) -> str:
    lines = [f"Printed by {command}. `lowbit bench-speed MODEL --batch 1 --prompt-tokens 512 --new-tokens 32 "
             "--repeats 3` of a folder quantized with each preset (median of 3 after a warm-up), as `lowbit generate` "
             "runs it, each row in its own process" + _rounds(rows) + "; bitsandbytes' model in the same way "
             "in-process, 4 new tokens, one run.", "",
             "| model | prefill tok/s (512) | decode tok/s | × BF16 prefill | × int8 decode | × FP32 decode | peak MB | "
             "linears |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    def run(label: str) -> dict | None:
        r = rows.get(f"speed|{label}")
        return None if r is None else r["runs"][0]
    bf16, int8, fp32 = run("BF16"), run("int8 weight-only"), run("FP32")
    for label in [label for label, _, _ in SPEED_ROWS] + [BNB]:
        r, info = run(label), rows.get(f"speed|{label}")
        if r is None:
            continue
        x = lambda a, b: "-" if b is None else f"{a / b:.2f}x"  # noqa: E731
        linears = ", ".join(f"{n} {k}" for k, n in (info.get("linears") or {}).items())  # type: ignore[union-attr]
        peak = "-" if r.get("peak_mb") is None else f"{r['peak_mb']:.0f}"
        lines.append(f"| {label} | {r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} | "
                     f"{x(r['prefill_tokens_per_s'], bf16 and bf16['prefill_tokens_per_s'])} | "
                     f"{x(r['decode_tokens_per_s'], int8 and int8['decode_tokens_per_s'])} | "
                     f"{x(r['decode_tokens_per_s'], fp32 and fp32['decode_tokens_per_s'])} | {peak} | {linears} |")
    return "\n".join(lines + ["", machine])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="quality,gptq,speed", help="comma-separated: quality, gptq, speed")
    ap.add_argument("--max-windows", type=int, help="evaluate at most N windows per text (default: all)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="speed: runs of every row in its own process, rows in turn, the best kept (default 3)")
    ap.add_argument("--fresh", action="store_true", help="discard rows kept from earlier runs")
    ap.add_argument("--redo", default="", metavar="LABELS", help="semicolon-separated row labels to run again")
    ap.add_argument("--no-write", action="store_true", help="print only, do not rewrite BENCHMARKS.md")
    ap.add_argument("--kept-only", action="store_true", help="run nothing: render the tables from the kept rows")
    args = ap.parse_args()
    global MAX_WINDOWS
    MAX_WINDOWS = args.max_windows
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    if unknown := sections - {"quality", "gptq", "speed"}:
        ap.error(f"--sections: unknown {sorted(unknown)}")
    store = RowStore(ROWS_DIR / "activations.json", args.fresh)
    try:
        store.drop(args.redo)  # "speed" drops every speed row
    except ValueError as e:
        ap.error(f"--redo: {e}")
    t0 = time.time()
    if args.kept_only:
        sections = set()
    if sections & {"quality", "gptq"}:
        base = load_model(MODEL)
        texts = [load_text(t) for t in TEXTS]
        ref_fp = model_fingerprint(base.model)
        if "quality" in sections:
            run_quality(base, texts, ref_fp, store)
        if "gptq" in sections:
            run_gptq(base, texts, ref_fp, store)
    if "speed" in sections:
        run_speed(store, args.rounds)
    commands = {name: command_line("scripts/benchmark_activations.py", ap, argparse.Namespace(**{**vars(args), "sections": name}))
                for name in ("quality", "gptq", "speed")}
    quality, gptq, speed = render(store.rows, commands,
                                  0 if args.kept_only else (time.time() - t0) / 60)
    print("\n\n".join((quality, gptq, speed)))
    if not args.no_write:
        bench = ROOT / "BENCHMARKS.md"
        # only the sections this invocation measured (each table's machine line gives its own invocation's time);
        # --kept-only writes all three from the rows store
        written = {"quality", "gptq", "speed"} if args.kept_only else sections
        if "quality" in written:
            replace_section(bench, "activations", "Quantized activations on SmolLM2-135M: W8A8, SmoothQuant, static "
                            "scales, FP8, LLM.int8()", quality)
        if "gptq" in written:
            replace_section(bench, "gptq-defaults", "GPTQ's defaults and AWQ then GPTQ on SmolLM2-135M", gptq)
        if "speed" in written:
            replace_section(bench, "activations-speed", "Speed of quantized activations on SmolLM2-135M", speed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
