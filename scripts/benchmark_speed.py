"""Speed and memory of a real model on this CPU (SmolLM2-135M by default, `--model` another): BENCHMARKS.md, section "speed" (or "speed-MODEL").

Rows: FP32, BF16, int8 weight-only (per-channel, torch's ``_weight_int8pack_mm``), int4 g128
(torch's ``_weight_int4pack_mm_for_cpu``) and int8 W8A8 (the same int8 weights times int8
activations, ``torch._int_mm``), the quantized ones made by ``lowbit quantize`` (RTN)
and run by ``lowbit bench-speed`` with their fast kernels; the FP32, BF16, int8 and int4 rows again with ``--compile`` (decode steps on a
static cache, compiled by torch.compile); and llama.cpp's ``llama-bench`` on the GGUF files lowbit writes
of the same model (F32, and llama-quantize's Q8_0 and Q4_0 mixes), at the same threads and lengths, for
issue 19's goals; FP32 and BF16 once more with ``--no-kernels`` (transformers and torch as they come: the
baseline of issue 19's FP32 / BF16 goal). Each row runs in its own process, so
that its peak memory is its own; all rows in one invocation, so their ratios to FP32 compare.

Columns: prefill and decode tokens/s at batch 1 and 8 (128-token prompt, 32 greedy decode steps,
median of 3; every row run ``--rounds`` times in turn, the best kept), the MB of tensors the
model holds, the process's peak resident memory over load and run, and the mean KLD / top-1 of
each row against FP32 on held-out text (its real runtime numerics: kernels included; and its
weights on the float32 reference path). A decode-step profile (time in the quantized linears, in the LM
head, and in everything else) says where the time goes.

Never run another benchmark or test suite beside it.

    .venv/bin/python scripts/benchmark_speed.py
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from lowbit.bench.cell import best_speed, llama_bench
from lowbit.bench.markdown import command_line, replace_section
from lowbit.bench.models import DEFAULT_MODEL, bench_model, model_section
from lowbit.models import cache_dir

ROOT = Path(__file__).resolve().parent.parent
COMMAND = "`.venv/bin/python scripts/benchmark_speed.py`"
COMMAND_RUN = COMMAND  # main() sets the command that is running
MODEL = DEFAULT_MODEL  # --model
# (label, recipe or None for the float model, dtype, W8A8, decode compiled on a static cache, lowbit's
# runtime paths: its kernels, decode operators and one-query attention; False: `--no-kernels`, transformers
# and torch as they come, the baseline of issue 19's FP32 / BF16 goal)
ROWS = [
    ("FP32", None, "float32", False, False, True),
    ("BF16", None, "bfloat16", False, False, True),
    ("int8 weight-only (per-channel)", "int8", "auto", False, False, True),
    ("int4 g128 (symmetric)", "w4a16", "auto", False, False, True),
    ("int8 W8A8 (dynamic per-token int8 activations)", "int8", "auto", True, False, True),
    ("FP32, compiled", None, "float32", False, True, True),
    ("BF16, compiled", None, "bfloat16", False, True, True),
    ("int8 weight-only, compiled", "int8", "auto", False, True, True),
    ("int4 g128, compiled", "w4a16", "auto", False, True, True),
    # the token embedding and tied head int8 per row too, as llama.cpp's Q8_0 / Q4_0 mixes store token_embd
    ("int8, 8-bit embedding and head", "int8-e8", "auto", False, False, True),
    ("int4 g128, 8-bit embedding and head", "w4a16-e8", "auto", False, False, True),
    ("int8, 8-bit embedding and head, compiled", "int8-e8", "auto", False, True, True),
    ("int4 g128, 8-bit embedding and head, compiled", "w4a16-e8", "auto", False, True, True),
    ("FP32, plain torch", None, "float32", False, False, False),
    ("BF16, plain torch", None, "bfloat16", False, False, False),
]
# issue 19: FP32 and BF16 decode at least 2x the path the issue measured (transformers and torch as they come)
PLAIN_GOALS = {"FP32, plain torch": ("FP32", "FP32, compiled"), "BF16, plain torch": ("BF16", "BF16, compiled")}
GOALS = {"int8 weight-only (per-channel)": 1.5, "int4 g128 (symmetric)": 2.0}  # goals against FP32
# llama.cpp's rows: label, the preset of the GGUF file lowbit writes (llama-quantize's own mixes), and
# the lowbit rows beside it with the goal of their batch-1 decode against it (issue 19)
LLAMA_CPP = [
    ("llama.cpp F32", "gguf-f32", ["FP32", "FP32, compiled"], None),
    ("llama.cpp Q8_0", "gguf-q8_0-mix", ["int8 weight-only (per-channel)", "int8 weight-only, compiled",
                                         "int8, 8-bit embedding and head", "int8, 8-bit embedding and head, compiled"],
     0.7),
    ("llama.cpp Q4_0", "gguf-q4_0-mix", ["int4 g128 (symmetric)", "int4 g128, compiled", "int4 g128, 8-bit embedding "
                                         "and head", "int4 g128, 8-bit embedding and head, compiled"], 0.7),
]
LOWBIT = [sys.executable, "-m", "lowbit"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def quantized_folder(recipe: str) -> Path:
    out = cache_dir() / "bench" / "speed-models" / (recipe if MODEL == DEFAULT_MODEL else f"{MODEL}-{recipe}")
    if recipe.startswith("gguf-"):
        out = out.with_name(out.name + ".gguf")
    if not out.exists():
        log(f"quantizing {MODEL} with {recipe} -> {out}")
        subprocess.run([*LOWBIT, "quantize", MODEL, "--recipe", recipe, "--out", str(out), "--no-progress"],
                       check=True)
    return out


def bench_speed(spec: str, dtype: str, w8a8: bool, compiled: bool, args: argparse.Namespace,
                kernels: bool = True) -> dict:
    cmd = [*LOWBIT, "bench-speed", spec, "--dtype", dtype, "--batch", "1,8", "--prompt-tokens",
           str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--json",
           *(["--w8a8"] if w8a8 else []), *(["--compile"] if compiled else []), *([] if kernels else ["--no-kernels"])]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def quality(rows: list[tuple[str, str, str, bool]], windows: int) -> dict[str, tuple[float, float, float | None]]:
    """Mean KLD and top-1 of each row against FP32, running as bench-speed runs it, and the KLD
    of its quantized weights on the float32 reference path (what the kernels' bf16 costs)."""
    from lowbit.calibration import load_text
    from lowbit.evaluation import evaluate
    from lowbit.evaluation.speed import load_for_running

    text = load_text("pydoc")
    ref = load_for_running(MODEL, "float32")[0]

    def kld(spec: str, dtype: str, kernels: bool, w8a8: bool = False) -> tuple[float, float]:
        loaded, dt = load_for_running(spec, dtype, kernels=kernels, w8a8=w8a8)[:2]
        r = evaluate(loaded.model, ref.tokenizer, text, ref=ref.model, max_windows=windows, dtype=getattr(torch, dt),
                     progress=False)
        return r.kld, r.top1

    out = {}
    for label, spec, dtype, w8a8 in rows:
        k, t = kld(spec, dtype, True, w8a8)
        reference = kld(spec, "float32", False)[0] if spec != MODEL else None
        out[label] = (k, t, reference)
        log(f"{label}: KLD {k:.4f} top-1 {t:.4f} reference path {reference}")
    return out


def decode_profile(spec: str, dtype: str, w8a8: bool = False, steps: int = 16) -> dict[str, float]:
    """Milliseconds per batch-1 decode step in the quantized / dense block linears, the LM head
    and the rest (attention, norms, rotary, Python), from forward hooks."""
    from lowbit.evaluation.speed import load_for_running
    from lowbit.modules import QuantLinear

    loaded = load_for_running(spec, dtype, w8a8=w8a8)[0]
    model = loaded.model
    head = model.get_output_embeddings()
    spent = {"block linears": 0.0, "LM head": 0.0}
    starts: dict[int, float] = {}

    def pre(mod, _inp):  # type: ignore[no-untyped-def]
        starts[id(mod)] = time.perf_counter()

    def post(mod, _inp, _out):  # type: ignore[no-untyped-def]
        spent["LM head" if mod is head else "block linears"] += time.perf_counter() - starts[id(mod)]

    for m in model.modules():  # a quantized token embedding is a QuantLinear too: not a product
        if isinstance(m, QuantLinear | torch.nn.Linear) and m is not model.get_input_embeddings():
            m.register_forward_pre_hook(pre)
            m.register_forward_hook(post)
    ids = torch.randint(0, head.out_features, (1, 128), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for k in spent:
            spent[k] = 0.0
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(nxt, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        total = time.perf_counter() - t0
    ms = {k: 1e3 * v / steps for k, v in spent.items()}
    ms["rest"] = 1e3 * total / steps - sum(ms.values())
    return ms


def crossover(repeats: int = 20) -> list[tuple[str, int, float, float]]:
    """For SmolLM2's widest int4 g128 and int8 linears (1536 x 576, 576 x 1536): milliseconds of
    the packed (or row) operator and of dequantize + bf16 matmul, by input rows: where ``INT4_ROWS_MAX_ROWS``
    (lowbit's int4 operator; ``INT4_MAX_ROWS`` for torch's, where AVX-512 BF16 is missing) and
    ``INT8_MAX_ROWS`` (the switch between them in ``lowbit.modules``) come from."""
    from lowbit.codecs import IntCodec
    from lowbit.modules.kernels import build_kernel

    out = []
    g = torch.Generator().manual_seed(0)
    for label, codec in (("int4 g128", IntCodec(bits=4, group_size=128)), ("int8 channel", IntCodec(bits=8, granularity="channel"))):
        for shape in ((1536, 576), (576, 1536)):
            kernel = build_kernel(codec.quantize(torch.randn(*shape, generator=g)))
            for rows in (1, 8, 16, 32, 128, 512):
                x = torch.randn(rows, shape[1], generator=g).to(torch.bfloat16)

                def packed() -> None:
                    kernel.packed_matmul(x)

                def dense() -> None:
                    kernel.dequantized_matmul(x)

                times = []
                for f in (packed, dense):
                    f()
                    t0 = time.perf_counter()
                    for _ in range(repeats):
                        f()
                    times.append(1e3 * (time.perf_counter() - t0) / repeats)
                out.append((f"{label} {shape[0]}x{shape[1]} ({kernel.name})", rows, times[0], times[1]))
    return out


def _ms(f, repeats: int) -> float:  # type: ignore[no-untyped-def]
    f()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeats):
            f()
        best = min(best, (time.perf_counter() - t0) / repeats)
    return 1e3 * best


def decode_operators(repeats: int = 20) -> list[tuple[str, str, list[tuple[int, float, float]]]]:
    """lowbit's decode operators against what torch runs in their place, ms per call: the row
    products (dense float32 / bf16 and int8 against ``F.linear`` / ``_weight_int8pack_mm``) by input
    rows, on SmolLM2's 1536 x 576 MLP linear and its 49152 x 576 tied LM head, and one-query attention
    (9 query heads on 3 key/value heads of 64, bf16) against SDPA by cache length. Empty where the
    operators are not built or not vectorized here."""
    import torch.nn.functional as F

    from lowbit.modules.native import int4_rows, row_products

    if not row_products():
        return []
    g = torch.Generator().manual_seed(0)
    out = []
    for shape in ((1536, 576), (49152, 576)):
        for name, dtype in (("float32", torch.float32), ("bf16", torch.bfloat16), ("int8", torch.int8)):
            if dtype == torch.int8:
                w = torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)
                scale = torch.rand(shape[0], generator=g).to(torch.bfloat16)
                scale32 = scale.float()
            else:
                w = torch.randn(*shape, generator=g).to(dtype)
            cells = []
            for rows in (1, 2, 4, 8):
                x = torch.randn(rows, shape[1], generator=g).to(torch.bfloat16 if dtype == torch.int8 else dtype)
                if dtype == torch.int8:
                    ours = functools.partial(torch.ops.lowbit.int8_rows, x, w, scale32)
                    theirs = functools.partial(torch.ops.aten._weight_int8pack_mm, x, w, scale)
                else:
                    ours = functools.partial(torch.ops.lowbit.dense_rows, x, w, None)
                    theirs = functools.partial(F.linear, x, w)
                cells.append((rows, _ms(ours, repeats), _ms(theirs, repeats)))
            out.append((f"{name} {shape[0]}x{shape[1]}", "rows", cells))
    if int4_rows():  # lowbit's int4 kernel against torch's packed one (where AVX-512 BF16 is missing), g128
        from unittest import mock

        from lowbit.codecs import IntCodec
        from lowbit.modules import kernels

        for shape in ((1536, 576), (49152, 576)):
            qt = IntCodec(bits=4, group_size=128).quantize(torch.randn(*shape, generator=g))
            ours_k = kernels.build_kernel(qt)
            with mock.patch.object(kernels, "int4_rows", lambda: False):
                theirs_k = kernels.build_kernel(qt)
            assert ours_k is not None and theirs_k is not None and ours_k.name != theirs_k.name
            cells = []
            for rows in (1, 2, 4, 8):
                x = torch.randn(rows, shape[1], generator=g).to(torch.bfloat16)
                cells.append((rows, _ms(functools.partial(ours_k.packed_matmul, x), repeats),
                              _ms(functools.partial(theirs_k.packed_matmul, x), repeats)))
            out.append((f"int4 g128 {shape[0]}x{shape[1]}", "rows", cells))
    cells = []
    for length in (160, 512, 2048):
        q = torch.randn(1, 9, 64, generator=g).to(torch.bfloat16)
        k, v = (torch.randn(1, 3, length, 64, generator=g).to(torch.bfloat16) for _ in range(2))
        kk, vv = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)
        ours = functools.partial(torch.ops.lowbit.one_query_attention, q, k, v, None, 0.125)
        theirs = functools.partial(F.scaled_dot_product_attention, q.unsqueeze(2), kk, vv, scale=0.125)
        cells.append((length, _ms(ours, repeats), _ms(theirs, repeats)))
    out.append(("one-query attention, 9 heads on 3, bf16", "attention, cache length", cells))
    return out


def render_decode_operators(ops: list[tuple[str, str, list[tuple[int, float, float]]]]) -> str:
    if not ops:
        return "lowbit's decode operators are not built (or not vectorized) here: no comparison."
    lines = ["lowbit's decode operators against torch's, ms per call (lowbit / torch; best of 3 x 20 calls, "
             "warm caches: the 1536x576 weights stay in this CPU's cache between calls, the 49152x576 head does not). "
             "Rows: `dense_rows` against `F.linear`, `int8_rows` against `_weight_int8pack_mm` (RowsLinear takes at "
             "most `DENSE_MAX_ROWS`, the int8 kernel `INT8_NATIVE_MAX_ROWS`), `int4_rows` against "
             "`_weight_int4pack_mm_for_cpu` (as the int4 kernels call them: 576 columns are 4.5 groups of 128, so "
             "torch's takes groups of 64 repeating the scales); attention: `one_query_attention` "
             "against `scaled_dot_product_attention`.", ""]
    for unit in dict.fromkeys(u for _, u, _ in ops):
        group = [(label, cells) for label, u, cells in ops if u == unit]
        first = group[0][1]
        lines += ["| " + ("weight, input rows" if unit == "rows" else unit) + " | " +
                  " | ".join(str(n) for n, _, _ in first) + " |", "|---|" + "---:|" * len(first)]
        lines += [f"| {label} | " + " | ".join(f"{a:.3f} / {b:.3f}" for _, a, b in cells) + " |"
                  for label, cells in group]
        lines.append("")
    return "\n".join(lines).rstrip()


def render(results: dict[str, dict], kld: dict[str, tuple[float, float, float | None]], prof: dict[str, dict],
           cross: list[tuple[str, int, float, float]], minutes: float, threads: int, rounds: int) -> str:
    base = results["FP32"]
    b1 = {lab: next(r for r in res["runs"] if r["batch"] == 1) for lab, res in results.items()}
    b8 = {lab: next(r for r in res["runs"] if r["batch"] == 8) for lab, res in results.items()}
    lines = [
        f"Printed by {_command()} ({minutes:.0f} min, {platform.processor() or platform.machine()}, {threads} torch "
        f"threads). {bench_model(MODEL).name}; prompt {base['runs'][0]['prompt_tokens']} random tokens, then "
        f"{base['runs'][0]['new_tokens']} greedy decode steps with the KV cache, median of 3 timed runs; each row "
        f"in its own process (`lowbit bench-speed`), all rows in this one invocation, {rounds} rounds in turn and the "
        "best of each row kept (the machine is shared: single runs vary by 10-30%). Ratios are to FP32 in the same "
        "run. `model MB`: bytes of the tensors the model holds (kernel layouts, dense weights, tied embedding "
        "once); `peak MB`: the process's peak resident memory over load and the batch-1 and batch-8 runs (about "
        f"{_baseline_mb():.0f} MB of it is Python, torch and transformers). KLD / top-1: against FP32 on the held-out "
        "`pydoc` text (8 windows of 512), each row running as timed (kernels included); `KLD, reference path`: the "
        "same quantized weights dequantized in float32, so the difference is what the kernels' bf16 costs.",
        "",
        "| model | activations | decode tok/s, batch 1 | × FP32 | prefill tok/s, batch 1 | × FP32 | decode tok/s, "
        "batch 8 | prefill tok/s, batch 8 | model MB | peak MB | KLD | top-1 | KLD, reference path |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, res in results.items():
        d1, p1 = b1[label]["decode_tokens_per_s"], b1[label]["prefill_tokens_per_s"]
        peak = max(res.get("load_peak_mb") or 0, *(r["peak_mb"] or 0 for r in res["runs"]))
        k, t, ref_k = kld.get(label, (None, None, None))
        lines.append(
            f"| {label} | {res['dtype']} | {d1:.1f} | {d1 / b1['FP32']['decode_tokens_per_s']:.2f}x | {p1:.0f} | "
            f"{p1 / b1['FP32']['prefill_tokens_per_s']:.2f}x | {b8[label]['decode_tokens_per_s']:.1f} | "
            f"{b8[label]['prefill_tokens_per_s']:.0f} | {res['model_mb']:.0f} | {peak:.0f} | "
            f"{'-' if k is None else f'{k:.4f}'} | {'-' if t is None else f'{100 * t:.2f}%'} | "
            f"{'-' if ref_k is None else f'{ref_k:.4f}'} |")
    lines += ["", "Goals (batch-1 decode vs FP32):", ""]
    for label, goal in GOALS.items():
        ratio = b1[label]["decode_tokens_per_s"] / b1["FP32"]["decode_tokens_per_s"]
        verdict = "met" if ratio >= goal else f"missed by {100 * (1 - ratio / goal):.0f}%"
        plain = b1[label]["decode_tokens_per_s"] / b1["FP32, plain torch"]["decode_tokens_per_s"]
        lines.append(f"- {label}: {ratio:.2f}x against a goal of {goal}x: {verdict} ({plain:.2f}x FP32 on plain "
                     "torch, the FP32 path these goals were set against).")
    lines += ["", "Where a batch-1 decode step's time goes (ms per step, forward hooks):", "",
              "| model | block linears | LM head | rest (attention, norms, rotary, Python) | step |",
              "|---|---:|---:|---:|---:|"]
    for label, ms in prof.items():
        lines.append(f"| {label} | {ms['block linears']:.1f} | {ms['LM head']:.1f} | {ms['rest']:.1f} | "
                     f"{sum(ms.values()):.1f} |")
    rows = sorted({r for _, r, _, _ in cross})
    lines += ["", "Packed (or row) operator vs dequantize + bf16 matmul (AMX where the CPU has it), ms per call by input rows "
              "(the kernels switch to the second above `INT4_ROWS_MAX_ROWS` (lowbit's int4 operator) / `INT4_MAX_ROWS` "
              "(torch's) / `INT8_MAX_ROWS` rows):", "",
              "| linear | " + " | ".join(f"{r} rows" for r in rows) + " |", "|---|" + "---:|" * len(rows)]
    for name in dict.fromkeys(n for n, _, _, _ in cross):
        cells = {r: (p, d) for n, r, p, d in cross if n == name}
        lines.append(f"| {name} | " + " | ".join(f"{cells[r][0]:.2f} / {cells[r][1]:.2f}" for r in rows) + " |")
    return "\n".join(lines)


def render_llama_cpp(results: dict[str, dict], llama: dict[str, dict | None], threads: int) -> str:
    """lowbit's batch-1 rows beside llama-bench's on lowbit's GGUF files of the same model, and the
    compiled rows against the eager ones."""
    b1 = {lab: next(r for r in res["runs"] if r["batch"] == 1) for lab, res in results.items()}
    lines = [
        f"Beside llama.cpp: `llama-bench -t {threads} -p P -n N -r 3` (same prompt and decode lengths, batch 1, best "
        "of the rounds) on GGUF files that `lowbit quantize --recipe gguf-f32 | gguf-q8_0-mix | gguf-q4_0-mix` wrote "
        "(llama-quantize's own mixes), in the same run. `compiled`: `bench-speed --compile` (decode steps on a static "
        "cache compiled by torch.compile; its first run, untimed, compiles).",
        "",
        "| llama.cpp | decode tok/s | prefill tok/s | lowbit row | decode tok/s | × llama.cpp decode | prefill tok/s "
        "| compile s | goal |",
        "|---|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for label, _, rows, goal in LLAMA_CPP:
        ref = llama.get(label)
        for row in rows:
            d, p = b1[row]["decode_tokens_per_s"], b1[row]["prefill_tokens_per_s"]
            compile_s = b1[row].get("compile_s")
            if ref is None:
                ratio, verdict = "-", "llama.cpp not built"
            else:
                r = d / ref["decode_tokens_per_s"]
                ratio = f"{r:.2f}x"
                verdict = "-" if goal is None else (f"{goal}x: met" if r >= goal else f"{goal}x: missed")
            ref_d = "-" if ref is None else f"{ref['decode_tokens_per_s']:.1f}"
            ref_p = "-" if ref is None else f"{ref['prefill_tokens_per_s']:.0f}"
            secs = "-" if compile_s is None else f"{compile_s:.0f}"
            lines.append(f"| {label} | {ref_d} | {ref_p} | {row} | {d:.1f} | {ratio} | {p:.0f} | {secs} | {verdict} |")
    lines += ["", "FP32 and BF16 against the path issue 19 measured (`--no-kernels`: transformers' SDPA attention, "
              "torch's matmuls; batch-1 decode, goal 2x):", ""]
    for plain, rows in PLAIN_GOALS.items():
        for row in rows:
            r = b1[row]["decode_tokens_per_s"] / b1[plain]["decode_tokens_per_s"]
            lines.append(f"- {row}: {r:.2f}x {plain}; goal 2x: {'met' if r >= 2 else 'missed'}.")
    lines += ["", "Compiled against eager (batch-1 decode):", ""]
    for eager, compiled in (("FP32", "FP32, compiled"), ("BF16", "BF16, compiled"),
                            ("int8 weight-only (per-channel)", "int8 weight-only, compiled"),
                            ("int4 g128 (symmetric)", "int4 g128, compiled")):
        r = b1[compiled]["decode_tokens_per_s"] / b1[eager]["decode_tokens_per_s"]
        lines.append(f"- {compiled}: {r:.2f}x {eager}.")
    return "\n".join(lines)


def eval_speed(windows: int, threads: int, rounds: int) -> dict[str, dict]:
    """End-to-end wall time (process start to exit) of ``lowbit eval MODEL --dtype float32 --no-ref``
    and of ``llama-perplexity`` on lowbit's F32 GGUF of the same model: the same text file (pydoc),
    ``windows`` consecutive windows of 512 tokens each, the same threads; ``rounds`` runs of each in
    turn, the fastest kept. Tokens/s: windows x 512 over the wall time (both load the model in it)."""
    import re
    import tempfile

    from lowbit.bench.llama_cpp import llama_cpp_bin
    from lowbit.calibration import load_text

    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="lowbit-eval-speed-") as tmp:
        text = Path(tmp) / "pydoc.txt"
        text.write_text(load_text("pydoc").text)
        f32 = quantized_folder("gguf-f32")
        runs = {"lowbit eval": [*LOWBIT, "eval", MODEL, "--dtype", "float32", "--no-ref", "--text", str(text),
                                "--seq-len", "512", "--max-windows", str(windows),
                                "--no-progress", "--json"]}
        b = llama_cpp_bin()
        if b is not None:
            runs["llama-perplexity"] = [str(b / "llama-perplexity"), "-m", str(f32), "-f", str(text), "-c", "512",
                                        "-b", "512", "--chunks", str(windows), "-t", str(threads)]
        for _ in range(rounds):
            for label, cmd in runs.items():
                t0 = time.perf_counter()
                p = subprocess.run(cmd, capture_output=True, text=True, check=True)
                seconds = time.perf_counter() - t0
                if label == "lowbit eval":
                    printed = json.loads(p.stdout.strip().splitlines()[-1])
                    ppl, done = printed["ppl"], printed["windows"]
                else:
                    found = re.search(r"Final estimate: PPL = ([0-9.]+)", p.stdout + p.stderr)
                    ppl = float(found.group(1)) if found else None
                    chunks = re.search(r"perplexity over (\d+) chunks", p.stdout + p.stderr)
                    done = int(chunks.group(1)) if chunks else windows
                log(f"{label}: {seconds:.2f} s, {done} windows, PPL {ppl}")
                if label not in out or seconds < out[label]["seconds"]:
                    out[label] = {"seconds": seconds, "windows": done, "tokens_per_s": done * 512 / seconds, "ppl": ppl}
    return out


def render_eval_speed(by_windows: dict[int, dict[str, dict]], threads: int, rounds: int) -> str:
    """The evaluation comparison's table: a row per tool and window count."""
    lines = [f"Printed by {_command()}. Evaluation end to end: the wall time of each command, from process start "
             f"to exit (Python, imports and loading included), on the first N windows of 512 tokens of `pydoc` (27 in all), "
             f"{threads} threads, float32; {rounds} runs of each in turn, the fastest kept. llama-perplexity runs "
             "lowbit's F32 GGUF of the same weights and scores the second half of each window (its protocol); lowbit "
             "scores every token of a window. Both compute each window's 512 positions. `s / window`: the time "
             "beyond the smaller count's run, per extra window (the fixed cost of start-up left out).", "",
             "| tool | windows | seconds | tokens/s | × llama-perplexity | s / window | PPL |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    counts = sorted(by_windows)
    verdicts = []
    for w in counts:
        res = by_windows[w]
        ref = res.get("llama-perplexity")
        for label, r in res.items():
            ratio = "-" if ref is None else f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x"
            ppl = "-" if r["ppl"] is None else f"{r['ppl']:.3f}"
            per = "-"
            if w != counts[0] and label in by_windows[counts[0]]:
                first = by_windows[counts[0]][label]
                per = f"{(r['seconds'] - first['seconds']) / (r['windows'] - first['windows']):.3f}"
            lines.append(f"| {label} | {r['windows']} | {r['seconds']:.1f} | {r['tokens_per_s']:.0f} | {ratio} | {per} | {ppl} |")
        if ref is not None and "lowbit eval" in res:
            ours = res["lowbit eval"]
            verdicts.append((ours["windows"], ours["tokens_per_s"] / ref["tokens_per_s"]))
    if verdicts:
        met = all(ratio >= 1 for _, ratio in verdicts)
        lines += ["", "Goal (issue 19): lowbit eval end to end at least as fast as llama-perplexity: "
                  + ", ".join(f"{n} windows {ratio:.2f}x" for n, ratio in verdicts) + (": met." if met else ": not met.")]
    return "\n".join(lines)


def _command() -> str:
    return COMMAND_RUN


def _baseline_mb() -> float:
    family = "qwen2" if MODEL.startswith("qwen") else "llama"  # the modeling code the model runs
    code = (f"import torch, transformers, transformers.models.{family}.modeling_{family}, lowbit.cli\n"
            "print([int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS:')][0] / 1e3)")
    return float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help=f"the model (default {DEFAULT_MODEL})")
    ap.add_argument("--no-write", action="store_true", help="print only, do not rewrite BENCHMARKS.md")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--windows", type=int, default=8, help="evaluation windows for KLD (default 8)")
    ap.add_argument("--rounds", type=int, default=2, help="runs of every row, alternating; best kept (default 2)")
    ap.add_argument("--eval-only", action="store_true",
                    help="only the evaluation comparison (lowbit eval vs llama-perplexity), its own section")
    ap.add_argument("--eval-windows", default="8,27",
                    help="comma-separated window counts of the evaluation comparison (default 8,27: pydoc's all)")
    args = ap.parse_args()
    global MODEL, COMMAND_RUN
    MODEL = args.model
    COMMAND_RUN = command_line("scripts/benchmark_speed.py", ap, args)
    t0 = time.time()
    if args.eval_only:
        threads = torch.get_num_threads()
        counts = [int(w) for w in args.eval_windows.split(",")]
        table = render_eval_speed({w: eval_speed(w, threads, args.rounds) for w in counts}, threads, args.rounds)
        print(table)
        if not args.no_write:
            replace_section(ROOT / "BENCHMARKS.md", model_section("eval-speed", MODEL),
                            f"Evaluation speed: {bench_model(MODEL).name}, lowbit eval and llama-perplexity", table)
        return 0
    specs = [(label, MODEL if recipe is None else str(quantized_folder(recipe)), dtype, w8a8, compiled, kernels)
             for label, recipe, dtype, w8a8, compiled, kernels in ROWS]
    ggufs = {label: quantized_folder(preset) for label, preset, _, _ in LLAMA_CPP}
    threads = torch.get_num_threads()
    results: dict[str, dict] = {}
    llama: dict[str, dict | None] = {}
    for round_ in range(args.rounds):  # rows alternate, so no row is favoured by running first
        for label, spec, dtype, w8a8, compiled, kernels in specs:
            log(f"{label}, round {round_ + 1} ...")
            r = bench_speed(spec, dtype, w8a8, compiled, args, kernels)
            log(json.dumps(r))
            results[label] = r if label not in results else best_speed(results[label], r)
        for label, gguf in ggufs.items():  # llama.cpp's own benchmark, same threads and lengths
            log(f"{label}, round {round_ + 1} ...")
            r = llama_bench(gguf, args.prompt_tokens, args.new_tokens, threads)
            log(json.dumps(r))
            llama[label] = r if r is None or llama.get(label) is None else \
                {k: max(v, llama[label][k]) for k, v in r.items()}  # type: ignore[index]
    eager = [(label, spec, dtype, w8a8) for label, spec, dtype, w8a8, compiled, kernels in specs
             if not compiled and kernels]
    prof = {label: decode_profile(spec, dtype, w8a8) for label, spec, dtype, w8a8 in eager}
    log(json.dumps(prof))
    cross = crossover()
    ops = decode_operators()
    log(json.dumps(ops))
    log(json.dumps(cross))
    kld = quality(eager[1:], args.windows)
    table = render(results, kld, prof, cross, (time.time() - t0) / 60, threads, args.rounds)
    table += "\n\n" + render_decode_operators(ops)
    table += "\n\n" + render_llama_cpp(results, llama, threads)
    print(table)
    if not args.no_write:
        replace_section(ROOT / "BENCHMARKS.md", model_section("speed", MODEL),
                        f"Speed and memory: {bench_model(MODEL).name} on this CPU", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
