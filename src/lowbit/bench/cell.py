"""One sweep cell, run as the commands a user runs: ``lowbit quantize``, ``lowbit eval`` (per
text, and HumanEval), ``lowbit bench-speed``, each in its own process; plus the per-linear weight
error and, for a GGUF row, llama.cpp's ``llama-bench``.

A cell runs in two stages so that a parallel sweep never times two cells against each other:
``quality`` (quantize, save into the cell's work folder, evaluate) may run beside other cells;
``timing`` (speed, peak memory, llama-bench) runs alone. ``python -m lowbit.bench.cell CELL.json
STAGE WORK OUT.json`` runs one stage and writes its part of the result to OUT.json.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lowbit.bench.sweep_spec import Cell
from lowbit.errors import LowbitError

STAGES = ("quality", "timing")


def run_stage(cell: Cell, stage: str, work: Path, threads: int) -> dict[str, Any]:
    """The fields of ``cell``'s result that ``stage`` measures (see :mod:`lowbit.bench.results`).
    ``work``: the cell's folder (the quantized model is kept there between the stages)."""
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    if stage == "quality":
        return _quality(cell, work, env)
    if stage == "timing":
        return _timing(cell, work, env, threads)
    raise ValueError(f"unknown stage {stage!r}")


def model_path(cell: Cell, work: Path) -> Path | None:
    """Where the quality stage writes the quantized model (None for the dense rows)."""
    if cell.format is None:
        return None
    return work / ("model.gguf" if cell.format == "gguf" else "model")


def describe(cell: Cell) -> dict[str, Any]:
    """The fields that say what the cell is and where it ran."""
    import torch
    import transformers

    import lowbit

    data = cell.recipe_data or {}
    algorithm = (data.get("algorithm") or {}).get("name", "rtn") if data else "none"
    codec = data.get("codec") or {}
    return {
        "cell": cell.cell, "model": cell.model, "recipe": cell.recipe, "recipe_digest": cell.recipe_digest,
        "method": algorithm, "format": "gguf" if cell.format == "gguf" else "lowbit", "dense": cell.dense,
        "codec": _codec_label(cell.dense, data, codec),
        "machine": {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count()},
        "versions": {"lowbit": lowbit.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _codec_label(dense: str | None, data: dict[str, Any], codec: dict[str, Any]) -> str:
    if dense is not None:
        return "bf16" if dense == "bfloat16" else "float32"
    if data.get("gguf_mix"):
        return f"gguf {data['gguf_mix']}"
    from lowbit.recipes import Recipe

    r = Recipe.from_dict(data)
    return r.codec.describe() if r.codec is not None else "dense"


def die_with_parent() -> None:
    """In a child before exec: SIGKILL when the parent dies (Linux), so that a killed sweep
    leaves no cell working on behind it."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _lowbit(*args: str, env: dict[str, str]) -> tuple[str, float]:
    """Run ``lowbit ARGS`` in a new process: its stdout and wall seconds, or a LowbitError with the
    last line it printed to stderr."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "lowbit", *args], capture_output=True, text=True, env=env,
                       preexec_fn=die_with_parent)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit status {p.returncode}"
        raise LowbitError(f"lowbit {args[0]} failed: {last}")
    return p.stdout, seconds


def _json_line(stdout: str) -> Any:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith(("{", "[")):
            return json.loads(line)
    raise LowbitError("expected a JSON line, got: " + stdout.strip()[-200:])


def _quality(cell: Cell, work: Path, env: dict[str, str]) -> dict[str, Any]:
    ev = cell.evaluations
    out = model_path(cell, work)
    result: dict[str, Any] = {"quant_seconds": None}
    if out is not None and not out.exists():
        recipe_file = work / "recipe.json"
        recipe_file.write_text(json.dumps(cell.recipe_data))
        partial = out.with_name("partial-" + out.name)  # keeps the suffix the layout is read from
        _remove(partial)
        _, seconds = _lowbit("quantize", cell.model, "--recipe", str(recipe_file), "--out", str(partial),
                             "--format", cell.format or "native", "--no-progress", env=env)
        partial.replace(out)
        result["quant_seconds"] = seconds
    evaluated = str(out) if out is not None else cell.model
    dtype = ["--dtype", "bfloat16"] if cell.dense == "bfloat16" else []
    texts: dict[str, Any] = {}
    size: dict[str, Any] = {}
    for text in ev.texts:
        windows = ["--max-windows", str(ev.max_windows)] if ev.max_windows else []
        stdout, _ = _lowbit("eval", evaluated, "--ref", cell.model, "--text", text, "--seq-len", str(ev.seq_len),
                            *windows, *dtype, "--json", "--no-progress", env=env)
        r = _json_line(stdout)
        texts[text] = {k: r.get(k) for k in ("ppl", "delta_ppl", "kld", "kld_p99", "top1", "tokens")}
        size = size or {"bits_per_weight": r.get("bits_per_weight"), "model_bytes": r.get("model_bytes")}
    from lowbit.bench.compare import folder_bytes

    size["disk_bytes"] = folder_bytes(out) if out is not None else None
    result.update(texts=texts, size=size)
    if ev.humaneval is not None:
        h = ev.humaneval
        limit = ["--limit", str(h.limit)] if h.limit else []
        stdout, _ = _lowbit("eval", evaluated, "--ref", cell.model, "--task", "humaneval", *limit,
                            "--max-new-tokens", str(h.max_new_tokens), "--batch-size", str(h.batch_size),
                            *(["--chat"] if h.chat else []), *dtype, "--json", "--no-progress", env=env)
        result["humaneval"] = _json_line(stdout)
    result.update(source_facts(cell.model, out if ev.layers else None))
    return result


def _timing(cell: Cell, work: Path, env: dict[str, str], threads: int) -> dict[str, Any]:
    sp = cell.evaluations.speed
    assert sp is not None
    out = model_path(cell, work)
    if out is not None and not out.exists():
        raise LowbitError(f"{out}: the quality stage's model is missing")
    spec = str(out) if out is not None else cell.model
    dtype = cell.dense or "auto"
    stdout, _ = _lowbit("bench-speed", spec, "--batch", str(sp.batch), "--prompt-tokens", str(sp.prompt_tokens),
                        "--new-tokens", str(sp.new_tokens), "--repeats", str(sp.repeats), "--dtype", dtype,
                        "--threads", str(threads), "--json", env=env)
    r = _json_line(stdout)
    run = r["runs"][0]
    result: dict[str, Any] = {
        "speed": {"batch": sp.batch, "prompt_tokens": sp.prompt_tokens, "new_tokens": sp.new_tokens,
                  "prefill_tokens_per_s": run["prefill_tokens_per_s"], "decode_tokens_per_s": run["decode_tokens_per_s"],
                  "peak_mb": run.get("peak_mb"), "threads": r.get("threads")},
        "memory": {"model_mb": r.get("model_mb"), "peak_mb": run.get("peak_mb")},
        "llama_bench": None,
    }
    if cell.format == "gguf" and cell.evaluations.llama_bench and out is not None:
        result["llama_bench"] = llama_bench(out, sp.prompt_tokens, sp.new_tokens, threads)
    return result


def best_speed(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two ``lowbit bench-speed --json`` results of one model as one: per batch size the faster of
    their tokens/s and the larger peak memory (the machine is shared: the best of runs is the model's)."""
    out = {**a, "load_peak_mb": max(a["load_peak_mb"] or 0, b["load_peak_mb"] or 0)}
    out["runs"] = [
        {**ra, **{k: max(ra[k], rb[k]) for k in ("prefill_tokens_per_s", "decode_tokens_per_s")},
         "peak_mb": max(ra["peak_mb"] or 0, rb["peak_mb"] or 0)}
        for ra, rb in zip(a["runs"], b["runs"])
    ]
    return out


def llama_bench(gguf: Path, prompt_tokens: int, new_tokens: int, threads: int) -> dict[str, Any] | None:
    """llama.cpp's ``llama-bench`` tokens/s of a GGUF file (None when llama.cpp is not built)."""
    from lowbit.bench.llama_cpp import llama_cpp_bin

    b = llama_cpp_bin()
    if b is None or not (b / "llama-bench").is_file():
        return None
    p = subprocess.run([str(b / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(prompt_tokens),
                        "-n", str(new_tokens), "-r", "3", "-o", "json", "--no-repack", "1"],
                       capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        p = subprocess.run([str(b / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(prompt_tokens),
                            "-n", str(new_tokens), "-r", "3", "-o", "json"], capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise LowbitError(f"llama-bench failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    runs = json.loads(p.stdout)
    speed = {"threads": threads}
    for r in runs:
        key = "prefill_tokens_per_s" if r.get("n_prompt", 0) > 0 else "decode_tokens_per_s"
        speed[key] = r["avg_ts"]
    return speed


def source_facts(source: str, quantized: Path | None) -> dict[str, Any]:
    """``model_fingerprint`` (a hash of the source model's weights) and ``layers``:
    ``{linear: ||W - Q(W)||^2 / ||W||^2}`` over the decoder-block linears, from the source model's
    float32 weights and the quantized file's weights dequantized in float32 (None without
    ``quantized``)."""
    import torch

    from lowbit.bench.compare import block_linear_names
    from lowbit.models.fingerprint import model_fingerprint
    from lowbit.models import load_model
    from lowbit.modules import linear_weight

    def dense_weight(m: torch.nn.Module) -> torch.Tensor:
        return m.dense_weight(torch.float32) if hasattr(m, "dense_weight") else linear_weight(m)[0].float()

    ref = load_model(source).model
    facts: dict[str, Any] = {"model_fingerprint": model_fingerprint(ref), "layers": None}
    if quantized is None:
        return facts
    q = load_model(str(quantized), keep_quantized=True).model
    errors = {}
    with torch.no_grad():
        for name in block_linear_names(ref):
            w = dense_weight(ref.get_submodule(name)).double()
            wq = dense_weight(q.get_submodule(name)).double()
            errors[name] = float(((w - wq) ** 2).sum() / (w ** 2).sum().clamp_min(1e-300))
    facts["layers"] = errors
    return facts


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def main(argv: list[str] | None = None) -> int:
    cell_file, stage, work, out, threads = (argv or sys.argv[1:])[:5]
    cell = Cell.model_validate_json(Path(cell_file).read_text())
    try:
        result = run_stage(cell, stage, Path(work), int(threads))
    except LowbitError as e:
        Path(out).write_text(json.dumps({"error": str(e)}))
        return 1
    Path(out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
