"""GPTQ and AWQ on a real model: the tables of BENCHMARKS.md, section "calibration" (SmolLM2-135M, the
default) or "calibration-MODEL" (``--model``: the quality rows at 8, 4 and 3 bits, and how much the
calibration data moves the result: another text, another draw of the same text).

Sections (``--sections``, default all):

* ``quality``: RTN, GPTQ and AWQ at int4 g64, int4 g128 (ragged last group on 576-wide rows),
  int3 g64 and int2 g64, symmetric; calibration 128 x 512 tokens of the built-in ``pydoc-calib``
  split; evaluation against the unquantized model on the held-out ``pydoc`` and ``stdlib`` texts.
* ``peer``: llm-compressor's GPTQ (in its own virtual environment, ``scripts/peers/``) on the same
  calibration tokens at the same settings (int4 g64 symmetric, no act-order, dampening 0.01,
  block 128, static group scales), evaluated by the same evaluator; its quantization time against
  lowbit's.
* ``device`` (needs a CUDA GPU): GPTQ and AWQ with the calibration passes and the code search on
  the GPU (``quantize_model(device="cuda")``, the model itself in CPU memory), and the same GPTQ
  on that machine's CPU for a same-machine ratio. The rows are kept under labels starting with
  ``device:``; ``--import-rows FILE`` copies them from that machine's ``calibration.json`` into
  this one's store, so that BENCHMARKS.md can show them beside the CPU rows.
* ``memory``: GPTQ on a random-weight Llama whose float weights do not fit the memory budget set
  for the run (a watchdog kills the subprocess when its RSS exceeds it), quantized from disk
  block by block; peak RSS.

Each finished row is kept in ``scripts/rows/calibration[-MODEL].json`` so an interrupted run
resumes (``--fresh`` starts over). Timings are only comparable within one quiet run: never run
another benchmark or test suite beside it.

    .venv/bin/python scripts/benchmark_calibration.py
    .venv/bin/python scripts/benchmark_calibration.py --model qwen2.5-coder-0.5b --max-windows 8
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

from lowbit.bench.compare import block_linear_names
from lowbit.bench.markdown import command_line, replace_section
from lowbit.bench.models import DEFAULT_MODEL, bench_model, model_section
from lowbit.bench.store import RowStore as Store
from lowbit.calibration import CalibrationConfig, calibration_set, load_text
from lowbit.evaluation import evaluate, model_size
from lowbit.models.fingerprint import model_fingerprint
from lowbit.models import builtin_model_path, cache_dir, load_model
from lowbit.pipeline import quantize_model
from lowbit.recipes import Recipe

ROOT = Path(__file__).resolve().parent.parent
COMMAND = "`.venv/bin/python scripts/benchmark_calibration.py`"
ROWS_DIR = ROOT / "scripts" / "rows"  # the kept rows, committed: a table can be rendered and resumed on any machine
SECTION = "calibration"
TEXTS = ("pydoc", "stdlib")
CALIB = CalibrationConfig(source="pydoc-calib", samples=128, seq_len=512, seed=0)


def recipe(bits: int, group: int, algorithm: str, calib: CalibrationConfig = CALIB, **algo: object) -> Recipe:
    return Recipe.from_dict({
        "codec": {"name": "int", "bits": bits, "symmetric": True, "granularity": "group", "group_size": group},
        # GPTQ's rows keep columns in order (the settings of the side-by-side; act-order: benchmark_activations.py)
        "algorithm": {"name": algorithm, **({"act_order": False} if algorithm == "gptq" else {}), **algo},
        "calibration": calib.model_dump() if algorithm != "rtn" else None,
    })


# (row label, recipe, dtype of the calibration forward passes)
QUALITY = [
    # the two rows timed against llm-compressor come first, run back to back with it
    ("int4 g64 GPTQ", recipe(4, 64, "gptq"), "bfloat16"),
    ("int4 g64 GPTQ, fp32 passes", recipe(4, 64, "gptq"), "float32"),
    ("int4 g64 RTN", recipe(4, 64, "rtn"), "bfloat16"),
    ("int4 g64 AWQ", recipe(4, 64, "awq"), "bfloat16"),
    ("int4 g128 RTN", recipe(4, 128, "rtn"), "bfloat16"),
    ("int4 g128 GPTQ", recipe(4, 128, "gptq"), "bfloat16"),
    ("int3 g64 RTN", recipe(3, 64, "rtn"), "bfloat16"),
    ("int3 g64 GPTQ", recipe(3, 64, "gptq"), "bfloat16"),
    ("int2 g64 RTN", recipe(2, 64, "rtn"), "bfloat16"),
    ("int2 g64 GPTQ", recipe(2, 64, "gptq"), "bfloat16"),
]
PEER_LOWBIT_ROW = "int4 g64 GPTQ"
# another model (--model): 8, 4 and 3 bits, and the same GPTQ on other calibration data
OTHER_CALIB = {"other text": CalibrationConfig(source="stdlib-calib", samples=128, seq_len=512, seed=0),
               "other draw": CalibrationConfig(source="pydoc-calib", samples=128, seq_len=512, seed=1)}
QUALITY_OTHER = [
    ("int8 g128 RTN", recipe(8, 128, "rtn"), "bfloat16"),
    ("int8 g128 GPTQ", recipe(8, 128, "gptq"), "bfloat16"),
    ("int4 g128 RTN", recipe(4, 128, "rtn"), "bfloat16"),
    ("int4 g128 GPTQ", recipe(4, 128, "gptq"), "bfloat16"),
    ("int4 g128 GPTQ, calibrated on stdlib", recipe(4, 128, "gptq", OTHER_CALIB["other text"]), "bfloat16"),
    ("int4 g128 GPTQ, another draw of pydoc", recipe(4, 128, "gptq", OTHER_CALIB["other draw"]), "bfloat16"),
    ("int4 g128 AWQ", recipe(4, 128, "awq"), "bfloat16"),
    ("int3 g64 RTN", recipe(3, 64, "rtn"), "bfloat16"),
    ("int3 g64 GPTQ", recipe(3, 64, "gptq"), "bfloat16"),
    ("int3 g64 AWQ", recipe(3, 64, "awq"), "bfloat16"),
]

# (row label, recipe, dtype of the passes, device of the passes and the code search)
DEVICE_ROWS = [
    ("device: int4 g64 GPTQ", recipe(4, 64, "gptq"), "bfloat16", "cuda"),
    ("device: int4 g64 GPTQ, fp32 passes", recipe(4, 64, "gptq"), "float32", "cuda"),
    ("device: int4 g64 GPTQ, the GPU machine's CPU", recipe(4, 64, "gptq"), "bfloat16", "cpu"),
    ("device: int4 g64 AWQ", recipe(4, 64, "awq"), "bfloat16", "cuda"),
    ("device: int3 g64 GPTQ", recipe(3, 64, "gptq"), "bfloat16", "cuda"),
    ("device: int2 g64 GPTQ", recipe(2, 64, "gptq"), "bfloat16", "cuda"),
]
DEVICE_PREFIX = "device: "


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


MAX_WINDOWS: int | None = None  # --max-windows


def evaluate_rows(model, base, texts, ref_fp, label: str, extra: dict, store: Store) -> None:  # type: ignore[no-untyped-def]
    size = model_size(model, block_linear_names(base.model))
    for text in texts:
        r = evaluate(model, base.tokenizer, text, ref=base.model, cache_dir=cache_dir(), progress=False,
                     ref_fingerprint=ref_fp, max_windows=MAX_WINDOWS)
        row = {"label": label, "text": text.name, "ppl": r.ppl, "delta_ppl": r.delta_ppl, "kld": r.kld,
               "kld_p99": r.kld_p99, "top1": r.top1, "tokens": r.tokens, "bpw": size.bits_per_weight, **extra}
        store.put(f"{label}|{text.name}", row)
        log(f"{text.name:7s} {label:32s} kld={r.kld:.5f} top1={r.top1:.4f} quant={extra.get('quant_seconds')}")


def run_quality(base, texts, ref_fp, calib, store: Store, rows: int | None = None,  # type: ignore[no-untyped-def]
                quality: list | None = None) -> None:
    for label, rec, dtype in (quality or QUALITY)[:rows]:
        if all(store.get(f"{label}|{t.name}") for t in texts):
            continue
        model = copy.deepcopy(base.model)
        own = rec.calibration_config()
        if rec.needs_calibration and own != CALIB:
            log(f"{label}: calibration {own.source}, seed {own.seed}")
            data = calibration_set(base.tokenizer, own)
        else:
            data = calib if rec.needs_calibration else None
        report = quantize_model(model, rec, progress=False, calibration=data, compute_dtype=getattr(torch, dtype))
        extra = {"quant_seconds": report.seconds, "dtype": dtype, "recipe": rec.to_dict()}
        if report.sequential is not None:
            extra["code_seconds"] = sum(r.seconds for r in report.sequential.linears)
            extra["pass_seconds"] = report.sequential.forward_seconds
            extra["fallbacks"] = [f"{r.name}: {r.note}" for r in report.sequential.linears if r.note]
        evaluate_rows(model, base, texts, ref_fp, label, extra, store)
        del model


def run_device(base, texts, ref_fp, calib, store: Store) -> None:  # type: ignore[no-untyped-def]
    if not torch.cuda.is_available():
        raise SystemExit("--sections device needs a CUDA GPU, and this torch build sees none")
    # the built-in texts come from this Python's pydoc_data and standard library: another Python
    # version draws other calibration tokens and evaluates other texts
    machine = {"gpu": torch.cuda.get_device_name(), "cpu_threads": torch.get_num_threads(),
               "torch": torch.__version__, "python": platform.python_version(), "calibration_digest": calib.digest[:12]}
    # warm-up, not timed: CUDA's context, cuBLAS and cuSOLVER handles, the kernels' first loads
    quantize_model(copy.deepcopy(base.model), DEVICE_ROWS[0][1], progress=False,
                   calibration=type(calib)(calib.tokens[:8], calib.source), device="cuda")
    for label, rec, dtype, device in DEVICE_ROWS:
        if all(store.get(f"{label}|{t.name}") for t in texts):
            continue
        model = copy.deepcopy(base.model)
        if device == "cuda":
            torch.cuda.synchronize()
        report = quantize_model(model, rec, progress=False, calibration=calib, compute_dtype=getattr(torch, dtype),
                                device=device)
        extra = {"quant_seconds": report.seconds, "dtype": dtype, "device": device, "recipe": rec.to_dict(),
                 "code_seconds": sum(r.seconds for r in report.sequential.linears),
                 "pass_seconds": report.sequential.forward_seconds, **machine}
        evaluate_rows(model, base, texts, ref_fp, label, extra, store)
        del model


def import_rows(path: Path, store: Store) -> None:
    """Copy the ``device:`` rows of another machine's ``calibration.json`` into ``store``."""
    rows = json.loads(path.read_text())
    picked = {k: r for k, r in rows.items() if k.startswith(DEVICE_PREFIX)}
    if not picked:
        raise SystemExit(f"{path}: holds no rows labelled '{DEVICE_PREFIX}...'")
    for k, r in picked.items():
        store.put(k, r)
    log(f"imported {len(picked)} rows from {path}")


def run_peer(base, texts, ref_fp, calib, store: Store) -> None:  # type: ignore[no-untyped-def]
    label = "llm-compressor int4 g64 GPTQ"
    if all(store.get(f"{label}|{t.name}") for t in texts):
        return
    venv_python = ROOT / ".venv-llmcompressor" / "bin" / "python"
    if not venv_python.exists():
        subprocess.run(["bash", str(ROOT / "scripts" / "peers" / "setup_llmcompressor.sh")], check=True)
    work = Path(tempfile.mkdtemp(prefix="lowbit-peer-"))
    tokens = work / "tokens.pt"
    torch.save(calib.tokens, tokens)
    out = work / "model"
    cmd = [str(venv_python), str(ROOT / "scripts" / "peers" / "llmcompressor_gptq.py"), "--model",
           str(builtin_model_path("smollm2-135m")), "--tokens", str(tokens), "--bits", "4", "--group-size", "64",
           "--symmetric", "--actorder", "none", "--dampening-frac", "0.01", "--block-size", "128",
           "--threads", str(torch.get_num_threads()), "--out", str(out)]
    log("running llm-compressor: " + " ".join(cmd))
    proc = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    peer = load_model(str(out))
    extra = {"quant_seconds": result["seconds"], "peak_rss_mb": result["peak_rss_mb"],
             "versions": {k: result[k] for k in ("llmcompressor", "torch", "transformers")},
             "settings": result["settings"]}
    evaluate_rows(peer.model, base, texts, ref_fp, label, extra, store)
    subprocess.run(["rm", "-rf", str(work)], check=False)


MEMORY_CONFIG = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 16,
                 "num_key_value_heads": 4, "vocab_size": 49152, "tie_word_embeddings": False}
MEMORY_BUDGET_MB = 2000


def run_memory(store: Store) -> None:
    key = "memory|random-llama"
    if store.get(key):
        return
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    work = Path(tempfile.mkdtemp(prefix="lowbit-memory-"))
    try:
        folder = work / "random-llama"
        torch.manual_seed(0)
        with torch.device("meta"):
            meta = LlamaForCausalLM(LlamaConfig(**MEMORY_CONFIG))
        n_params = sum(p.numel() for p in meta.parameters())
        # Write the checkpoint block by block so that this process never holds it whole either.
        _write_random_checkpoint(folder, LlamaConfig(**MEMORY_CONFIG))
        AutoTokenizer.from_pretrained(builtin_model_path("smollm2-135m")).save_pretrained(folder)
        out = work / "quantized"
        code = (
            "import json, os, threading, time\n"
            f"BUDGET = {MEMORY_BUDGET_MB << 20}\n"
            "def watchdog():\n"
            "    page = os.sysconf('SC_PAGE_SIZE')\n"
            "    while True:\n"
            "        with open('/proc/self/statm') as f:\n"
            "            rss = int(f.read().split()[1]) * page\n"
            "        if rss > BUDGET:\n"
            "            print(f'over the memory budget: RSS {rss >> 20} MB', flush=True)\n"
            "            os._exit(3)\n"
            "        time.sleep(0.02)\n"
            "threading.Thread(target=watchdog, daemon=True).start()\n"
            "from lowbit.cli import main\n"
            "t = time.perf_counter()\n"
            f"rc = main(['quantize', {str(folder)!r}, '--recipe', 'w4a16-gptq', '--calib-samples', '16', "
            f"'--calib-seq-len', '256', '--calib-dtype', 'bfloat16', '--out', {str(out)!r}, '--no-progress'])\n"
            # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so it would report this
            # benchmark's own (parent) size at fork time
            "hwm = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
            "print(json.dumps({'rc': rc, 'seconds': time.perf_counter() - t, 'peak_rss_mb': hwm / 1024}))\n"
        )
        proc = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"memory run failed with exit code {proc.returncode}: {proc.stdout[-300:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        if result["rc"] != 0:
            raise RuntimeError(f"memory run: lowbit quantize exited with {result['rc']}")
        out_mb = sum(p.stat().st_size for p in out.rglob("*.safetensors")) / 1e6
        store.put(key, {"params": n_params, "fp32_mb": n_params * 4 / 1e6, "budget_mb": MEMORY_BUDGET_MB,
                        "config": MEMORY_CONFIG, "output_mb": out_mb, **result})
        log(f"memory: {result}")
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)


def _write_random_checkpoint(folder: Path, config) -> None:  # type: ignore[no-untyped-def]
    """A safetensors checkpoint of random weights (std 0.02, norms 1), one shard per block."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    folder.mkdir(parents=True)
    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in meta.named_parameters():
        shard = f"block-{name.split('.')[2]}.safetensors" if name.startswith("model.layers.") else "rest.safetensors"
        shards.setdefault(shard, {})
    weight_map = {}
    for shard in sorted(shards):
        tensors = {}
        for name, p in meta.named_parameters():
            own = f"block-{name.split('.')[2]}.safetensors" if name.startswith("model.layers.") else "rest.safetensors"
            if own != shard:
                continue
            tensors[name] = torch.ones(p.shape) if p.dim() == 1 else torch.randn(p.shape, generator=gen) * 0.02
            weight_map[name] = shard
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(folder)


def fmt_quality(rows: list[dict]) -> str:
    head = ("| text | recipe | PPL | ΔPPL | mean KLD | KLD p99 | top-1 | bpw | quantize s | "
            "of which passes s | passes dtype |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        q = r.get("quant_seconds")
        p = r.get("pass_seconds")
        lines.append(
            f"| {r['text']} | {r['label']} | {r['ppl']:.3f} | {r['delta_ppl']:+.3f} | {r['kld']:.5f} | "
            f"{r['kld_p99']:.4f} | {100 * r['top1']:.2f}% | {r['bpw']:.3f} | {'-' if q is None else f'{q:.1f}'} | "
            f"{'-' if p is None else f'{p:.1f}'} | {r.get('dtype', '-') if p is not None else '-'} |")
    return "\n".join(lines)


def render_device(rows: dict[str, dict]) -> list[str]:
    dev = [rows[f"{label}|{t}"] for t in TEXTS for label, *_ in DEVICE_ROWS if f"{label}|{t}" in rows]
    if not dev:
        return []
    m = dev[0]
    python = f"Python {m['python']}" if "python" in m else "its own Python"
    out = ["### On a CUDA GPU", "",
           f"Printed by `.venv/bin/python scripts/benchmark_calibration.py --sections device` on a machine with "
           f"an {m['gpu']} and {m['cpu_threads']} CPU threads (torch {m['torch']}, {python}), its rows brought here "
           "with `--import-rows`. Same model, recipes and evaluation method as above, but the built-in texts come "
           "from the running Python's `pydoc_data` and standard library, and that machine's Python differs from "
           "this one's: its calibration tokens and evaluation texts are not the same as above, so its KLDs compare "
           "with each other, not with the table above. `quantize_model(device=\"cuda\")`: the model stays in CPU "
           "memory; each block is moved to the GPU for its passes (batches of 32 sequences) and its GPTQ/AWQ, then "
           "back. One row runs the same GPTQ on that machine's CPU (batches of 8), for the KLD and the time on "
           "the same machine.", "",
           "| text | recipe | device | passes dtype | mean KLD | top-1 | PPL | quantize s | of which passes s | "
           "time vs that machine's CPU |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in dev:
        label = r["label"][len(DEVICE_PREFIX):]
        cpu = rows.get(f"{DEVICE_PREFIX}int4 g64 GPTQ, the GPU machine's CPU|{r['text']}")
        ratio = "-" if cpu is None or r is cpu or "int4 g64 GPTQ" not in label else \
            f"{cpu['quant_seconds'] / r['quant_seconds']:.1f}x faster"
        out.append(f"| {r['text']} | {label} | {r['device']} | {r['dtype']} | {r['kld']:.5f} | "
                   f"{100 * r['top1']:.2f}% | {r['ppl']:.3f} | {r['quant_seconds']:.1f} | {r['pass_seconds']:.1f} | "
                   f"{ratio} |")
    return out + [""]


def render(store: Store, minutes: float, model: str = DEFAULT_MODEL, command: str = COMMAND,
           quality: list | None = None) -> str:
    rows = store.rows
    windows = "" if MAX_WINDOWS is None else f", the first {MAX_WINDOWS} windows of each"
    out = [
        f"Model: {bench_model(model).about}. Calibration: 128 samples x 512 tokens drawn "
        "(seed 0) from the built-in `pydoc-calib` split; evaluation on the held-out `pydoc` and `stdlib` texts "
        f"(windows of 512, no overlap{windows}), KLD and top-1 against the unquantized model, all models evaluated in "
        "float32. Codecs: symmetric int, fp16 scales" + ("; g128 on 576-wide rows has a ragged last group (64 "
        "columns)" if model == DEFAULT_MODEL else "") + ". Calibration passes in bfloat16 unless a row says fp32. GPTQ: blocks of 128, dampening 0.01 x mean diag(H), static group scales, no act-order, "
        "sub-steps quantized true-sequentially (q/k/v, o, gate/up, down). AWQ: 20 exponents, group-Hessian "
        "clip search over 20 shrink factors in [0.5, 1]. `quantize s` is the whole `quantize_model` call; "
        "`of which passes s` the calibration forward passes with their statistics (the rest chooses codes).",
        "",
        "### RTN vs GPTQ vs AWQ",
        "",
        f"Printed by {command}.",
        "",
    ]
    algo_order = {"RTN": 0, "GPTQ": 1, "GPTQ, fp32 passes": 2, "GPTQ, calibrated on stdlib": 3,
                  "GPTQ, another draw of pydoc": 4, "AWQ": 5}
    order = sorted((label for label, _, _ in (quality or QUALITY)),
                   key=lambda x: (-int(x[3]), int(x.split(" ")[1][1:]), algo_order[x.split(" ", 2)[2]]))
    q = [rows[f"{label}|{t}"] for t in TEXTS for label in order if f"{label}|{t}" in rows]
    out += [fmt_quality(q), ""]
    checks = []
    for t in TEXTS:
        def k(label: str) -> float | None:
            r = rows.get(f"{label}|{t}")
            return None if r is None else r["kld"]

        for cfg in ("int8 g128", "int4 g64", "int4 g128", "int3 g64", "int2 g64"):
            rtn, gptq, awq = k(f"{cfg} RTN"), k(f"{cfg} GPTQ"), k(f"{cfg} AWQ")
            if rtn is not None and gptq is not None:
                checks.append(f"- {t}, {cfg}: GPTQ KLD {gptq:.4f} vs RTN {rtn:.4f} ({100 * (1 - gptq / rtn):.0f}% lower)")
            if rtn is not None and awq is not None:
                checks.append(f"- {t}, {cfg}: AWQ KLD {awq:.4f} vs RTN {rtn:.4f} ({100 * (1 - awq / rtn):.0f}% lower)")
    out += ["KLD reduction over RTN at the same codec:", *checks, ""]
    moved = []
    for t in TEXTS:
        base_row = rows.get(f"int4 g128 GPTQ|{t}")
        for other in ("calibrated on stdlib", "another draw of pydoc"):
            r = rows.get(f"int4 g128 GPTQ, {other}|{t}")
            if base_row is not None and r is not None:
                moved.append(f"- {t}: int4 g128 GPTQ {other}: KLD {r['kld']:.4f} against {base_row['kld']:.4f} "
                             f"({100 * (r['kld'] / base_row['kld'] - 1):+.1f}%)")
    if moved:
        out += ["How much the calibration data moves GPTQ's result (the same 128 x 512 tokens drawn from the built-in "
                "`stdlib-calib` split instead, or with seed 1 from `pydoc-calib`):", *moved, ""]

    peer = [rows.get(f"llm-compressor int4 g64 GPTQ|{t}") for t in TEXTS]
    ours = [rows.get(f"{PEER_LOWBIT_ROW}|{t}") for t in TEXTS]
    ours32 = [rows.get(f"int4 g64 GPTQ, fp32 passes|{t}") for t in TEXTS]
    if all(peer) and all(ours):
        out += ["### Side by side with llm-compressor's GPTQ", "", f"Printed by {COMMAND}.", "",
                "Same model, same 128 x 512 calibration token ids, same settings (int4 g64 symmetric, scale "
                "absmax/7.5, static group scales from the original weights, no act-order, dampening 0.01, "
                f"blocks of 128), both on this machine's {torch.get_num_threads()} threads in the same run. "
                "llm-compressor runs its sequential pipeline in float32 in its own virtual environment; its time "
                "is its `oneshot` call only (model loading excluded), lowbit's the `quantize_model` call.", "",
                "| text | implementation | mean KLD | top-1 | PPL | quantize s | time vs llm-compressor |",
                "|---|---|---:|---:|---:|---:|---:|"]
        for t, p, o, o32 in zip(TEXTS, peer, ours, ours32):
            for name, r in ((f"llm-compressor {p['versions']['llmcompressor']}", p), ("lowbit, bf16 passes", o),
                            ("lowbit, fp32 passes", o32)):
                if r is None:
                    continue
                ratio = p["quant_seconds"] / r["quant_seconds"]
                out.append(f"| {t} | {name} | {r['kld']:.5f} | {100 * r['top1']:.2f}% | {r['ppl']:.3f} | "
                           f"{r['quant_seconds']:.1f} | {'1.00x' if r is p else f'{ratio:.2f}x faster'} |")
        out += ["", f"llm-compressor settings as it reported them: `{json.dumps(peer[0]['settings'], sort_keys=True)}`", ""]

    out += render_device(rows)
    mem = rows.get("memory|random-llama")
    if mem:
        out += ["### Peak memory of a GPTQ run, model on disk", "", f"Printed by {COMMAND}.", "",
                f"A random-weight Llama ({mem['params'] / 1e6:.0f}M parameters: {json.dumps(mem['config'])}), "
                f"{mem['fp32_mb']:.0f} MB of float32 weights in per-block safetensors shards, quantized with "
                "`lowbit quantize --recipe w4a16-gptq --calib-samples 16 --calib-seq-len 256 --calib-dtype bfloat16` in a "
                "subprocess whose "
                f"resident memory is held under a budget of {mem['budget_mb']} MB (a watchdog thread reads "
                "/proc/self/statm every 20 ms and kills the run above it), less than the model's float weights: "
                "the blocks stay on disk and one is loaded at a time.", "",
                "| float32 weights MB | memory budget MB | peak RSS MB | quantize + save s | output MB |",
                "|---:|---:|---:|---:|---:|",
                f"| {mem['fp32_mb']:.0f} | {mem['budget_mb']} | {mem['peak_rss_mb']:.0f} | {mem['seconds']:.1f} | "
                f"{mem['output_mb']:.0f} |", ""]
    out.append(f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
               + (f"this invocation {minutes:.1f} min" if minutes >= 0.1 else "rendered from kept rows")
               + f". Command: {command}.")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help=f"the model (default {DEFAULT_MODEL}; another one runs the "
                    "quality section at 8, 4 and 3 bits and the calibration-data rows)")
    ap.add_argument("--max-windows", type=int, help="evaluate at most N windows per text (default: all)")
    ap.add_argument("--sections", default="quality,peer,memory",
                    help="comma-separated: quality, peer, memory, device (device needs a CUDA GPU)")
    ap.add_argument("--import-rows", type=Path, metavar="JSON",
                    help="copy the device rows of another machine's calibration.json (as written by "
                         "--sections device there) into this machine's store, then render")
    ap.add_argument("--fresh", action="store_true", help="discard rows kept from earlier runs")
    ap.add_argument("--no-write", action="store_true", help="print only, do not rewrite BENCHMARKS.md")
    ap.add_argument("--redo", default="", metavar="LABELS",
                    help="semicolon-separated row labels to run again although kept, e.g. "
                         "'int4 g64 GPTQ;llm-compressor int4 g64 GPTQ;memory' (their rows are dropped first)")
    ap.add_argument("--rows", default="", metavar="LABELS",
                    help="semicolon-separated quality row labels to run (default: all of the model's rows), e.g. "
                         "'int3 g64 RTN;int3 g64 GPTQ'")
    args = ap.parse_args()
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    global MAX_WINDOWS
    MAX_WINDOWS = args.max_windows
    default = args.model == DEFAULT_MODEL
    quality = QUALITY if default else QUALITY_OTHER
    if args.rows:
        wanted = [w.strip() for w in args.rows.split(";") if w.strip()]
        unknown = [w for w in wanted if w not in {label for label, _, _ in quality}]
        if unknown:
            ap.error(f"--rows: no such row {unknown[0]!r} (rows: {'; '.join(label for label, _, _ in quality)})")
        quality = [row for row in quality if row[0] in wanted]
    if not default:
        sections &= {"quality"}
    command = command_line("scripts/benchmark_calibration.py", ap, args)
    store = Store(ROWS_DIR / ("calibration.json" if default else f"calibration-{args.model}.json"), args.fresh)
    try:
        store.drop(args.redo)
    except ValueError as e:
        ap.error(f"--redo: {e}")
    t0 = time.time()
    if args.import_rows is not None:
        import_rows(args.import_rows, store)
    if sections & {"quality", "peer", "device"}:
        base = load_model(args.model)
        texts = [load_text(t) for t in TEXTS]
        ref_fp = model_fingerprint(base.model)
        calib = calibration_set(base.tokenizer, CALIB)
        log(f"calibration: {tuple(calib.tokens.shape)} tokens, digest {calib.digest[:12]}")
        if "quality" in sections and default:
            run_quality(base, texts, ref_fp, calib, store, rows=2)
        if "peer" in sections:
            run_peer(base, texts, ref_fp, calib, store)
        if "quality" in sections:
            run_quality(base, texts, ref_fp, calib, store, quality=quality)
        if "device" in sections:
            run_device(base, texts, ref_fp, calib, store)
    if "memory" in sections:
        run_memory(store)
    body = render(store, (time.time() - t0) / 60, args.model, command, quality)
    print(body)
    if not args.no_write:
        replace_section(ROOT / "BENCHMARKS.md", model_section(SECTION, args.model),
                        f"Calibration: GPTQ and AWQ on {bench_model(args.model).name}", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
