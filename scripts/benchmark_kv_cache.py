"""KV-cache quantization on SmolLM2-135M beside llama.cpp's quantized caches: BENCHMARKS.md sections
"kv-cache" (quality) and "kv-cache-speed" (memory and speed at long context).

Sections (``--sections``, default both):

* ``quality``: on the held-out ``pydoc`` and ``stdlib`` texts, in chunks of 512 and of 2048 tokens,
  ``llama-perplexity``'s protocol (the second half of each chunk scored given the first):
  llama.cpp running the F32 GGUF of the model with its ``q8_0`` and ``q4_0`` caches (``-ctk``/``-ctv``,
  flash attention), KLD against its own ``f32`` cache's logits (``--kl-divergence``); lowbit's
  caches (its presets and KIVI windows of 32 and 128 tokens) emulated on the same token ids
  (:func:`lowbit.modules.kv_cache.emulate_kv_cache`: every position reads the quantized past as when
  decoding one token at a time), KLD against the same model with an exact cache, by
  :func:`lowbit.bench.llama_cpp.kld_like_llama_cpp`. lowbit's ``q8_0`` preset (llama.cpp's format)
  ties the two evaluations together.
* ``speed``: ``lowbit bench-speed`` at batch 1 with prompts of 1024, 4096 and 8160 tokens (8192 with
  the 32 new ones: SmolLM2's context), the model in bfloat16, each cache against the bfloat16 cache:
  decode tokens/s, KV bytes per token (from the cache's own tensors), peak memory.

Rows are kept in ``scripts/rows/kv_cache.json`` (``--redo``, ``--fresh``). Never run another benchmark
or test suite beside it.

    .venv/bin/python scripts/benchmark_kv_cache.py [--sections quality,speed] [--chunks N]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lowbit.bench.llama_cpp import kld_like_llama_cpp, llama_cpp_bin, llama_cpp_kld, llama_cpp_token_ids
from lowbit.bench.markdown import command_line, replace_section
from lowbit.bench.store import RowStore
from lowbit.calibration import load_text
from lowbit.evaluation.kv_cache import emulated
from lowbit.evaluation.speed import DEFAULT_PREFILL_CHUNK
from lowbit.models.architectures import attention_head_dim
from lowbit.io.gguf_writer import save_gguf
from lowbit.models import context_length, load_model
from lowbit.recipes.kv_cache import kv_cache_spec

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m"
TEXTS = ("pydoc", "stdlib")
CONTEXTS = (512, 2048)
KIVI = {"keys": {"bits": 4, "axis": "channel", "group_size": 32}, "values": {"bits": 4, "axis": "token", "group_size": 32}}
# (label, --kv-cache spec) of lowbit's rows
LOWBIT = [("lowbit q8_0 (llama.cpp's format)", "q8_0"), ("lowbit int8", "int8"),
          ("lowbit int4, window 32", {**KIVI, "residual": 32}), ("lowbit int4 (preset: window 64)", "int4"),
          ("lowbit int4, window 128", {**KIVI, "residual": 128}), ("lowbit int2 (preset: window 128)", "int2"),
          ("lowbit fp8 e4m3", "fp8")]
LLAMA = [("llama.cpp q8_0", "q8_0"), ("llama.cpp q4_0", "q4_0")]
SPEED = [("bf16 cache", None), ("int8", "int8"), ("int4", "int4"), ("int2", "int2"), ("fp8", "fp8")]
PROMPTS = (1024, 4096, 8160)
PREFILL_CHUNK = DEFAULT_PREFILL_CHUNK  # what bench-speed does without --prefill-chunk


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_quality(store: RowStore, chunks: int, only: set[str] | None = None) -> None:
    base = load_model(MODEL)
    twin = load_model(MODEL).model  # the same weights, run with the quantized caches
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="lowbit-kv-") as tmp:
        work = Path(tmp)
        f32 = save_gguf(base, work / "f32.gguf", dense="f32")
        for text_name in TEXTS:
            text_file = work / f"{text_name}.txt"
            text_file.write_text(load_text(text_name).text)
            ids = torch.tensor(llama_cpp_token_ids(f32, text_file))
            for n_ctx in CONTEXTS:
                key = f"{text_name}|{n_ctx}"
                kld_base = work / f"base-{text_name}-{n_ctx}.bin"
                for label, cache in LLAMA:
                    if store.get(f"{label}|{key}") or (only is not None and label not in only):
                        continue
                    if not kld_base.is_file():
                        llama_cpp_kld(f32, text_file, n_ctx, chunks, threads, kld_base, "f32", "f32")
                    r = llama_cpp_kld(f32, text_file, n_ctx, chunks, threads, kld_base, cache, cache)
                    store.put(f"{label}|{key}", {"label": label, "text": text_name, "ctx": n_ctx, **r})
                    log(f"{label} {key}: {r}")
                for label, spec in LOWBIT:
                    if store.get(f"{label}|{key}") or (only is not None and label not in only):
                        continue
                    kv = kv_cache_spec(spec)
                    kv.check_head_dim(attention_head_dim(base.model), context_length(base.model))
                    t0 = time.perf_counter()
                    with emulated(twin, kv):  # the reference (base) keeps an exact cache
                        r = kld_like_llama_cpp(twin, base.model, ids, n_ctx, chunks)
                    store.put(f"{label}|{key}", {"label": label, "text": text_name, "ctx": n_ctx, "spec": kv.describe(),
                                                "bits": kv.bits_per_value(attention_head_dim(base.model)),
                                                "seconds": time.perf_counter() - t0, **r})
                    log(f"{label} {key}: {r}")


def speed_key(label: str, prompt: int, chunk: int) -> str:
    # rows of a prompt fed at once (chunk 0) keep the key they had before the prefill went in chunks
    return f"speed|{label}|{prompt}" + (f"|chunk {chunk}" if chunk else "")


def run_speed(store: RowStore) -> None:
    lowbit = [sys.executable, "-m", "lowbit"]
    for label, preset in SPEED:
        for prompt in PROMPTS:
            key = speed_key(label, prompt, PREFILL_CHUNK)
            if store.get(key):
                continue
            cmd = [*lowbit, "bench-speed", MODEL, "--dtype", "bfloat16", "--batch", "1", "--prompt-tokens", str(prompt),
                   "--new-tokens", "32", "--repeats", "2", "--json", *([] if preset is None else ["--kv-cache", preset])]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            store.put(key, {"label": label, "prompt": prompt, **result["runs"][0], "kv_cache": result["kv_cache"],
                            "rss_after_load_mb": result["rss_after_load_mb"]})
            log(f"{key}: {result['runs'][0]}")


def render(rows: dict[str, dict], commands: dict[str, str], chunks: int, minutes: float) -> tuple[str, str]:
    """The two tables; ``commands``: per section, the command that measures its rows."""
    machine = f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}" + (
        f"; this invocation {minutes:.1f} min." if minutes >= 0.05 else "; rows kept from earlier invocations.")
    labels = [label for label, _ in LLAMA] + [label for label, _ in LOWBIT]
    lines = [f"Printed by {commands['quality']}. SmolLM2-135M-Instruct (built-in `{MODEL}`), its weights unquantized (float32 in "
             f"lowbit, the F32 GGUF lowbit writes in llama.cpp); `llama-perplexity`'s protocol on llama.cpp's token ids "
             f"(at most {chunks} chunks; the second half of each scored). llama.cpp: `-ctk T -ctv T -fa on`, KLD against "
             "its run with `-ctk f32 -ctv f32` (`--kl-divergence-base`, then `--kl-divergence`); lowbit: its caches "
             "emulated as when decoding one token at a time, KLD against the model with an exact cache. `bits`: stored "
             "bits per cached value, scales included (the window aside).", "",
             "| text | context | cache | bits | mean KLD | same top-1 | PPL |", "|---|---:|---|---:|---:|---:|---:|"]
    for t in TEXTS:
        for n_ctx in CONTEXTS:
            for label in labels:
                r = rows.get(f"{label}|{t}|{n_ctx}")
                if r is None:
                    continue
                bits = r.get("bits") or {"llama.cpp q8_0": 8.5, "llama.cpp q4_0": 4.5}.get(label)
                lines.append(f"| {t} | {n_ctx} | {label} | {bits:.3g} | {r['kld']:.5f} | {100 * r['top1']:.2f}% | "
                             f"{r['ppl']:.3f} |")
    lines += ["", "Goals:"]
    for t in TEXTS:
        for n_ctx in CONTEXTS:
            def k(label: str) -> float | None:
                r = rows.get(f"{label}|{t}|{n_ctx}")
                return None if r is None else r["kld"]
            q8, q4 = k("llama.cpp q8_0"), k("llama.cpp q4_0")
            i8 = k("lowbit int8")
            int4 = {label: k(label) for label, _ in LOWBIT if label.startswith("lowbit int4")}
            if q8 is not None and i8 is not None:
                lines.append(f"- {t}, {n_ctx}: lowbit int8 {i8:.5f} vs llama.cpp q8_0 {q8:.5f} (goal: no higher)")
            for label, v in int4.items():
                if q4 is not None and v is not None:
                    lines.append(f"- {t}, {n_ctx}: {label} {v:.5f} vs llama.cpp q4_0 {q4:.5f}: {v / q4:.2f}x (goal <= 0.5x)")
    quality = "\n".join(lines + ["", machine])
    s = ["Printed by " + commands["speed"] + ". `lowbit bench-speed smollm2-135m --dtype bfloat16 --batch 1 --prompt-tokens N "
         "--new-tokens 32 --repeats 2 [--kv-cache C]` (the median, here the mean, of 2 timed runs after a warm-up; the prompt fed "
         f"{PREFILL_CHUNK} tokens at a time, bench-speed's default). `KV bytes/token`: the cache's own tensors after "
         "the run (codes, scales, the full-precision window) over its tokens, all 30 layers. `peak MB`: the process's "
         "peak resident memory over the runs; `over load`: that peak less the resident memory after loading the model "
         "(the cache and the working memory of prefill and decode). `at once`: the peak of an earlier invocation that "
         "fed the whole prompt in one forward (`--prefill-chunk 0`), where the prompt's activations, not the cache, set "
         "the peak.", "",
         "| cache | prompt tokens | decode tok/s | × bf16 cache | KV bytes/token | × bf16 cache bytes | peak MB | "
         "over load MB | × bf16 cache | peak MB, at once |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def over_load(r: dict | None) -> float | None:
        if r is None or r.get("peak_mb") is None or r.get("rss_after_load_mb") is None:
            return None
        return r["peak_mb"] - r["rss_after_load_mb"]

    def x(a: float | None, b: float | None) -> str:
        return "-" if a is None or not b else f"{a / b:.2f}x"

    def mb(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    for prompt in PROMPTS:
        ref = rows.get(speed_key("bf16 cache", prompt, PREFILL_CHUNK))
        for label, _ in SPEED:
            r = rows.get(speed_key(label, prompt, PREFILL_CHUNK))
            if r is None:
                continue
            at_once = rows.get(speed_key(label, prompt, 0))
            s.append(f"| {label} | {prompt} | {r['decode_tokens_per_s']:.1f} | "
                     f"{x(r['decode_tokens_per_s'], ref and ref['decode_tokens_per_s'])} | {r['kv_bytes_per_token']:.0f} | "
                     f"{x(r['kv_bytes_per_token'], ref and ref['kv_bytes_per_token'])} | {mb(r.get('peak_mb'))} | "
                     f"{mb(over_load(r))} | {x(over_load(r), over_load(ref))} | "
                     f"{mb(at_once and at_once.get('peak_mb'))} |")
    return quality, "\n".join(s + ["", machine])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="quality,speed", help="comma-separated: quality, speed")
    ap.add_argument("--chunks", type=int, default=64, help="at most N chunks per text and context (default 64)")
    ap.add_argument("--fresh", action="store_true", help="discard rows kept from earlier runs")
    ap.add_argument("--redo", default="", metavar="LABELS", help="semicolon-separated row labels to run again")
    ap.add_argument("--rows", default="", metavar="LABELS",
                    help="semicolon-separated quality row labels to run (default: all); kept rows are shown either way")
    ap.add_argument("--no-write", action="store_true", help="print only, do not rewrite BENCHMARKS.md")
    args = ap.parse_args()
    known = {label for label, _ in LLAMA + LOWBIT}
    only = {r.strip() for r in args.rows.split(";") if r.strip()} or None
    if only and only - known:
        ap.error(f"--rows: unknown {sorted(only - known)}; rows: {sorted(known)}")
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    store = RowStore(ROOT / "scripts" / "rows" / "kv_cache.json", args.fresh)
    try:
        store.drop(args.redo)
    except ValueError as e:
        ap.error(f"--redo: {e}")
    if "quality" in sections and llama_cpp_bin() is None:
        subprocess.run(["bash", str(ROOT / "scripts" / "peers" / "setup_llamacpp.sh")], check=True)
    t0 = time.time()
    if "quality" in sections:
        run_quality(store, args.chunks, only)
    if "speed" in sections:
        run_speed(store)
    commands = {name: command_line("scripts/benchmark_kv_cache.py", ap, argparse.Namespace(**{**vars(args), "sections": name}))
                for name in ("quality", "speed")}
    quality, speed = render(store.rows, commands, args.chunks,
                            (time.time() - t0) / 60)
    print(quality + "\n\n" + speed)
    if not args.no_write:
        replace_section(ROOT / "BENCHMARKS.md", "kv-cache", "KV-cache quantization on SmolLM2-135M beside llama.cpp's", quality)
        replace_section(ROOT / "BENCHMARKS.md", "kv-cache-speed", "KV-cache memory and speed at long context", speed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
