"""The ``lowbit`` command: quantize, eval, inspect, bench."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import NoReturn

from lowbit.errors import LowbitError

DTYPES = ("float32", "bfloat16", "float16")


def _dtype(name: str):  # type: ignore[no-untyped-def]
    import torch

    return getattr(torch, name)


def _integer(text: str, low: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"must be {'positive' if low == 1 else f'{low} or more'}, got {v}")
    return v


def _positive(text: str) -> int:
    return _integer(text, 1)


def _non_negative(text: str) -> int:
    return _integer(text, 0)


def _temperature(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (0: greedy), got {text}")
    return v


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad argument said in one line (and where the help is) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from lowbit.recipes import PRESET_HELP

    parser = _Parser(
        prog="lowbit",
        description="Quantize causal LMs and measure what each quantization costs.",
        epilog="MODEL is a built-in name (smollm2-135m, qwen2.5-coder-0.5b), a Hugging Face folder or hub id, a .gguf file, "
        "or a folder written by `lowbit quantize`. Presets (see `lowbit quantize --help`): "
        + ", ".join(PRESET_HELP) + ".",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser(
        "quantize",
        help="quantize a model and save it in lowbit's format",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Quantize MODEL with a preset or a recipe file (YAML/JSON) and write it to --out.\n\npresets:\n"
        + "\n".join(f"  {k:16s} {v}" for k, v in PRESET_HELP.items()),
    )
    q.add_argument("model", metavar="MODEL")
    q.add_argument("--recipe", required=True, metavar="PRESET_OR_FILE", help="preset name or recipe file")
    q.add_argument("--out", required=True, type=Path, metavar="DIR|FILE.gguf",
                   help="output folder (must not exist), or a .gguf file that llama.cpp runs (Llama-family "
                   "models with the gguf-* presets: llama.cpp's block types)")
    q.add_argument("--format", choices=tuple(_layouts()), metavar="LAYOUT",
                   help="output layout: " + "; ".join(f"{n}: {h}" for n, h in _layouts().items())
                   + " (default: gguf for --out FILE.gguf, else native)")
    q.add_argument("--codec", metavar="NAME", help="replace the recipe's codec by NAME with its defaults "
                   "(e.g. q4_k, nf4, mxfp4; --bits/--group-size then adjust it)")
    q.add_argument("--algorithm", choices=("rtn", "gptq", "awq"), help="replace the recipe's algorithm")
    q.add_argument("--group-size", type=_positive, metavar="N", help="override the codec's group size")
    q.add_argument("--bits", type=int, metavar="N", help="override the codec's bits (2..8 for int)")
    q.add_argument("--clip-search", action="store_true", default=None,
                   help="RTN/GPTQ: search each group's range shrink for the lowest squared error")
    from lowbit.recipes.kv_cache import KV_PRESETS

    q.add_argument("--kv-cache", metavar="PRESET|FILE",
                   help="set the recipe's KV cache (what generate and eval run by default): "
                   + ", ".join(KV_PRESETS) + ", a YAML file, or none; fp8-static calibrates vLLM's per-layer "
                   "k_scale/v_scale on the calibration data")
    _add_calibration_args(q)
    g = q.add_argument_group("importance matrix (imatrix)")
    g.add_argument("--imatrix", type=Path, metavar="FILE",
                   help="use this importance matrix instead of collecting one (recipes with rtn importance: the "
                   "gguf-*-imatrix presets); llama.cpp's llama-imatrix output, GGUF or legacy .dat, or a "
                   "--save-imatrix file; no calibration pass is then needed")
    g.add_argument("--save-imatrix", type=Path, metavar="FILE",
                   help="also write the importance matrix this run collects (each linear's mean x^2 per input "
                   "column, measured with the earlier linears quantized) in llama.cpp's GGUF imatrix format, "
                   "which llama-quantize --imatrix reads")
    q.add_argument("--restart", action="store_true",
                   help="discard the resume state of an interrupted run (OUT.partial) and start over")
    q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    q.add_argument("--no-progress", action="store_true", help="no progress bars")

    e = sub.add_parser("eval", help="perplexity, and KLD/top-1/delta PPL against a reference model")
    e.add_argument("model", metavar="MODEL")
    e.add_argument("--ref", metavar="MODEL",
                   help="reference model (default: the source of a lowbit folder; none for other models)")
    e.add_argument("--no-ref", action="store_true", help="perplexity only")
    e.add_argument("--text", default="pydoc", metavar="NAME_OR_FILE",
                   help="pydoc (English), stdlib (Python code), a UTF-8 text file, or hf:DATASET[:CONFIG[:SPLIT]]"
                   " (default: pydoc)")
    e.add_argument("--seq-len", type=_positive, default=512, metavar="N", help="tokens per window (default 512)")
    e.add_argument("--stride", type=_positive, metavar="N", help="window step (default: seq-len, no overlap)")
    e.add_argument("--max-windows", type=_positive, metavar="N", help="evaluate at most N windows")
    e.add_argument("--dtype", choices=DTYPES, default=None,
                   help="compute dtype of the evaluated model (default float32: bf16 itself costs KLD ~1e-3 on "
                   "SmolLM2, see BENCHMARKS.md; with --kernels: bfloat16 where a kernel runs, as generate)")
    e.add_argument("--kernels", action="store_true",
                   help="run the model exactly as generate and bench-speed do: fast kernels (int8/int4, W8A8, "
                   "LLM.int8()) in their dtype, other quantized layers dequantized once (default: the reference "
                   "path, every weight dequantized in float32)")
    e.add_argument("--w8a8", action="store_true",
                   help="with --kernels: int8 layers that do not quantize their inputs yet do, dynamic per token")
    from lowbit.evaluation.kv_cache import kv_cache_args

    kv_cache_args(e)
    e.add_argument("--ref-dtype", choices=DTYPES, default="float32", help="compute dtype of the reference")
    e.add_argument("--no-cache", action="store_true", help="do not read or write the reference logits cache")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    from lowbit.evaluation.lm_eval_backend import add_lm_eval_args

    add_lm_eval_args(e)
    from lowbit.evaluation.humaneval_cli import add_humaneval_args

    add_humaneval_args(e)  # after lm-eval's: both share --limit

    i = sub.add_parser("inspect", help="per-layer codec, bits per weight and size of a quantized model",
                       description="List every quantized layer of a lowbit, GPTQ, AWQ or compressed-tensors folder, "
                       "or every tensor of a GGUF file, with its codec (ggml type), shape, bits per weight and bytes.")
    i.add_argument("path", metavar="DIR|FILE.gguf", type=Path)
    i.add_argument("--json", action="store_true", help="print JSON")

    b = sub.add_parser("bench", help="quantize with several recipes in memory, evaluate each, print a table")
    b.add_argument("model", metavar="MODEL")
    b.add_argument("--recipes", default="int8,fp8,w4a16,nf4,mxfp4,w3a16", metavar="LIST",
                   help="comma-separated presets or recipe files (default: int8,fp8,w4a16,nf4,mxfp4,w3a16)")
    b.add_argument("--text", default="pydoc", metavar="LIST", help="comma-separated texts (default: pydoc)")
    b.add_argument("--seq-len", type=_positive, default=512, metavar="N", help="tokens per window (default 512)")
    b.add_argument("--max-windows", type=_positive, metavar="N", help="evaluate at most N windows per text")
    b.add_argument("--dtype", choices=DTYPES, default="float32")
    _add_calibration_args(b)
    b.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    b.add_argument("--no-progress", action="store_true")
    gen = sub.add_parser("generate", help="generate text, streamed, and print tokens/s")
    _add_run_args(gen)
    gen.add_argument("--prompt", required=True, metavar="TEXT", help="the prompt")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    gen.add_argument("--max-new-tokens", type=_positive, default=64, metavar="N", help="default 64")
    gen.add_argument("--temperature", type=_temperature, default=0.0, metavar="T",
                     help="sampling temperature (default 0: greedy)")
    gen.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default 0)")
    _add_compile_arg(gen)
    _add_prefill_chunk_arg(gen)

    sp = sub.add_parser("bench-speed", help="prefill and decode tokens/s and peak memory")
    _add_run_args(sp)
    sp.add_argument("--batch", default="1,8", metavar="LIST", help="comma-separated batch sizes (default 1,8)")
    sp.add_argument("--prompt-tokens", type=_positive, default=128, metavar="N", help="prefill length (default 128)")
    sp.add_argument("--new-tokens", type=_positive, default=32, metavar="N", help="decode steps (default 32)")
    sp.add_argument("--repeats", type=_positive, default=3, metavar="N", help="timed runs, median (default 3)")
    sp.add_argument("--threads", type=_positive, metavar="N", help="torch threads (default: torch's)")
    _add_compile_arg(sp)
    _add_prefill_chunk_arg(sp)
    sp.add_argument("--json", action="store_true", help="print one JSON object")

    sw = sub.add_parser(
        "sweep", help="run models x recipes x evaluations from a sweep file, resumable",
        description="Run every cell (model x recipe) of SWEEP.yaml in its own processes and keep each result in "
        "RESULTS as it finishes; a restart skips the cells that are done. Quality stages run --jobs at a time, "
        "timing stages (speed, memory) always alone. See `lowbit report` for the page.")
    sw.add_argument("sweep", type=Path, metavar="SWEEP.yaml", help="the sweep file (models, recipes, evaluations)")
    sw.add_argument("-o", "--results", type=Path, metavar="DIR",
                    help="results store (default: SWEEP-results beside the sweep file)")
    sw.add_argument("--jobs", type=_positive, default=1, metavar="N",
                    help="quality stages run side by side (default 1); threads per cell: CPUs / N")
    sw.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                    help="run the cells as Ray tasks on the cluster at ADDRESS (HOST:PORT), or on a local cluster "
                    "started for the sweep when no address is given")
    sw.add_argument("--retry-failed", action="store_true", help="run failed cells again (default: keep them)")
    sw.add_argument("--no-progress", action="store_true", help="no progress display")
    from lowbit.bench.report import add_report_args

    add_report_args(sub.add_parser("report", help="an HTML page (or Markdown with PNG plots) of a sweep's results"))
    return parser


def _layouts() -> dict[str, str]:
    from lowbit.io.formats import LAYOUTS

    return {n: lay.help for n, lay in LAYOUTS.items()}


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="built-in name, HF folder, lowbit folder, .gguf file or hub id")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="dtype of activations and dense weights (default auto: bfloat16 when a fast kernel "
                        "runs the quantized linears, whose operators compute in bf16; else float32)")
    p.add_argument("--no-kernels", action="store_true",
                   help="run quantized linears on the reference path (dequantized once, then dense matmuls)")
    p.add_argument("--w8a8", action="store_true",
                   help="int8 linears also quantize their inputs to int8 (per token, dynamic) and multiply in "
                        "int8 (torch._int_mm): faster, less exact")
    from lowbit.evaluation.kv_cache import kv_cache_args

    kv_cache_args(p)


def _add_prefill_chunk_arg(p: argparse.ArgumentParser) -> None:
    from lowbit.evaluation.speed import DEFAULT_PREFILL_CHUNK

    p.add_argument("--prefill-chunk", type=_non_negative, default=DEFAULT_PREFILL_CHUNK, metavar="N",
                   help=f"feed a long prompt N tokens at a time, as llama.cpp's micro-batches (default "
                        f"{DEFAULT_PREFILL_CHUNK}; 0: at once). Each chunk reads the cache the chunks before it "
                        "filled, so a long prompt's peak memory is the model and its (quantized) cache, not the "
                        "whole prompt's activations (generate --compile feeds the prompt at once)")


def _add_compile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true",
                   help="decode on a static KV cache with the one-token step compiled by torch.compile (later steps "
                        "skip Python's per-operator overhead; greedy tokens as without it). The first run compiles: "
                        "tens of seconds for generate; bench-speed's step (one graph through inductor's C++ wrapper, "
                        "without guards on the model's modules) 2-3 minutes the first time on a machine, then "
                        "torch's cache has it")


def _add_calibration_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration (GPTQ, AWQ)")
    g.add_argument("--calib", metavar="SOURCE",
                   help="pydoc-calib (default), stdlib-calib, a UTF-8 text file, a .jsonl of chat messages "
                   "(rendered with the tokenizer's chat template), or hf:DATASET[:CONFIG[:SPLIT]]")
    g.add_argument("--calib-samples", type=_positive, metavar="N", help="calibration sequences (default 128)")
    g.add_argument("--calib-seq-len", type=_positive, metavar="L", help="tokens per sequence (default 512)")
    g.add_argument("--calib-seed", type=int, metavar="S", help="seed of the sample offsets (default 0)")
    g.add_argument("--calib-batch", type=_positive, metavar="B",
                   help="sequences per forward pass (default 8 on the CPU, 32 with --calib-device cuda)")
    g.add_argument("--calib-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the calibration forward passes (default float32; bfloat16 uses AMX/tensor cores: "
                   "1.65x faster on SmolLM2 here, but GPTQ's KLD came out ~5%% higher, see BENCHMARKS.md; "
                   "statistics accumulate in float32 either way)")
    g.add_argument("--calib-device", metavar="DEVICE",
                   help="where the calibration passes and GPTQ/AWQ run, one block at a time: cpu (default) or "
                   "cuda[:N]; the model itself stays in CPU memory or on disk")


def _with_calibration(recipe, args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """``recipe`` with the --calib* overrides applied to its calibration config."""
    over = {"source": args.calib, "samples": args.calib_samples, "seq_len": args.calib_seq_len, "seed": args.calib_seed}
    over = {k: v for k, v in over.items() if v is not None}
    if not over:
        return recipe
    if not recipe.needs_calibration:
        raise LowbitError(f"--calib options given, but {recipe.label()} uses no calibration data")
    from lowbit.recipes import Recipe

    data = recipe.to_dict()
    data["calibration"] = {**recipe.calibration_config().model_dump(), **over}
    return Recipe.from_dict(data, source="recipe with calibration overrides")


def cmd_quantize(args: argparse.Namespace) -> int:
    from lowbit.io.folder import check_output
    from lowbit.pipeline import quantize_model
    from lowbit.pipeline.importance import calibration_users
    from lowbit.recipes import resolve_recipe

    recipe = resolve_recipe(args.recipe, clip_search=args.clip_search, codec=args.codec, algorithm=args.algorithm,
                            group_size=args.group_size, bits=args.bits)
    if args.kv_cache is not None:
        recipe = recipe.with_kv_cache(args.kv_cache)
    recipe = _with_calibration(recipe, args)
    layout = _output_layout(args)
    check_output(args.out, args.overwrite)  # free and writable: before the model is even loaded
    _check_imatrix_args(recipe, args)
    loaded, weights = _load_for_quantization(args.model)
    importance = None
    if args.imatrix is not None:
        from lowbit.io.imatrix import read_imatrix

        importance = read_imatrix(args.imatrix, loaded.model)
        if not calibration_users(recipe, importance) and _calibration_overrides(args):
            raise LowbitError(f"--calib options given, but with --imatrix {recipe.label()} uses no calibration data")
    if args.save_imatrix is not None:
        from lowbit.io.imatrix import linear_gguf_names

        linear_gguf_names(loaded.model)  # llama.cpp names its linears: before the work, not after it
    calibrating = bool(calibration_users(recipe, importance))
    _check_plan(args, layout, recipe, loaded, calibrating)
    calib, resume = None, None
    partial = args.out.with_name(args.out.name + ".partial")
    if calibrating:
        from lowbit.calibration import calibration_set
        from lowbit.pipeline.resume import ResumeState, run_fingerprint

        calib = calibration_set(loaded.tokenizer, recipe.calibration_config())
        model_id = weights.fingerprint() if weights is not None else None
        resume = ResumeState(partial, run_fingerprint(loaded.model, model_id, recipe, calib, args.calib_dtype, importance))
        if args.restart:
            resume.discard()
        if args.save_imatrix is not None and resume.finished_blocks():
            raise LowbitError(f"{resume.folder} holds finished blocks whose statistics --save-imatrix would lack: "
                              "pass --restart to start over")
    elif partial.exists():
        warnings.warn(f"{partial} holds an interrupted calibrated run that this one ({recipe.label()}, no calibration) "
                      "does not resume; it is left as it is: finish that run with its own command, or delete it",
                      stacklevel=1)
    report = quantize_model(
        loaded.model, recipe, progress=not args.no_progress, calibration=calib, weights=weights, resume=resume,
        compute_dtype=_dtype(args.calib_dtype), batch_size=args.calib_batch, device=args.calib_device,
        importance=importance,
    )
    if report.sequential is not None and not args.no_progress:
        print(report.sequential.summary(), file=sys.stderr)
    from lowbit.io.formats import save_model

    save_model(layout, loaded, args.out, overwrite=args.overwrite, source=args.model)
    if args.save_imatrix is not None:
        from lowbit.io.imatrix import write_imatrix

        assert report.importance is not None  # _check_imatrix_args: the run collected statistics
        write_imatrix(args.save_imatrix, report.importance, loaded.model, overwrite=args.overwrite)
        print(f"importance matrix of {len(report.importance.values)} linears -> {args.save_imatrix}")
    if resume is not None:
        resume.discard()
    from lowbit.bench.compare import block_linear_names, folder_bytes
    from lowbit.evaluation import model_size

    size = model_size(loaded.model, block_linear_names(loaded.model))
    resumed = "" if report.sequential is None or not report.sequential.resumed_blocks else \
        f" ({report.sequential.resumed_blocks} blocks resumed from {partial.name})"
    print(
        f"quantized {len(report.quantized)} linears with {recipe.label()} "
        f"({recipe.codec.describe() if recipe.codec is not None else 'no codec'}, {recipe.algorithm.name}) in "
        f"{report.seconds:.1f}s{resumed}: {size.bits_per_weight:.3f} bits per weight, "
        f"{folder_bytes(args.out) / 1e6:.1f} MB on disk -> {args.out}"
    )
    if report.untransformed:
        names = "+".join(t.name for t in recipe.transforms)
        print(f"{names} left these sub-steps of every block as they are: {'; '.join(report.untransformed)}",
              file=sys.stderr)
    return 0


def _check_plan(args: argparse.Namespace, layout: str, recipe, loaded, calibrating: bool) -> None:  # type: ignore[no-untyped-def]
    """Everything about the run that can be known from the loaded (possibly lazy) model, checked
    before any work: the layout holds what the recipe makes (a GGUF file: the architecture, its
    hyper-parameters and the tokenizer too), the recipe quantizes something, the calibration
    sequences fit the model's context, and the disk has room for the output (and, for a
    calibrated run, its resume state)."""
    from lowbit.io.folder import check_output
    from lowbit.io.formats import check_layout
    from lowbit.io.gguf_mixes import resolve_gguf_mix
    from lowbit.models import architecture_of, check_context
    from lowbit.pipeline.quantize import check_selection, planned_bytes

    model = loaded.model
    check_layout(layout, recipe, model)
    if layout == "gguf":
        from lowbit.io.gguf_writer import check_gguf_writable

        check_gguf_writable(loaded)
    resolved = resolve_gguf_mix(recipe, model)
    check_selection(model, architecture_of(model), resolved, warn=False)  # the run itself warns
    nbytes = planned_bytes(model, resolved)
    if calibrating:
        calib = recipe.calibration_config()
        flag = "--calib-seq-len" if args.calib_seq_len is not None else "the recipe's calibration.seq_len"
        check_context(model, calib.seq_len, f"{flag} {calib.seq_len}")
        hidden = int(getattr(model.config, "hidden_size", 0) or 0)
        # the resume state: the blocks quantized so far, and the next block's inputs in float32
        nbytes += nbytes + calib.samples * calib.seq_len * hidden * 4
    check_output(args.out, args.overwrite, nbytes)


def _output_layout(args: argparse.Namespace) -> str:
    to_gguf = args.out.suffix == ".gguf"
    layout = args.format or ("gguf" if to_gguf else "native")
    if (layout == "gguf") != to_gguf:
        raise LowbitError("a GGUF output is one file: pass --out FILE.gguf" if layout == "gguf"
                          else f"--out {args.out} names a GGUF file, but --format is {layout} (a folder)")
    return layout


def _calibration_overrides(args: argparse.Namespace) -> bool:
    return any(v is not None for v in (args.calib, args.calib_samples, args.calib_seq_len, args.calib_seed))


def _check_imatrix_args(recipe, args: argparse.Namespace) -> None:  # type: ignore[no-untyped-def]
    """LowbitError for --imatrix/--save-imatrix combinations that cannot work, before any work."""
    if args.imatrix is not None and not args.imatrix.is_file():
        raise LowbitError(f"--imatrix {args.imatrix} is a folder, not an importance matrix file" if args.imatrix.exists()
                          else f"no such importance matrix file: {args.imatrix}")
    out = args.save_imatrix
    if out is None:
        return
    if args.imatrix is not None:
        raise LowbitError("--save-imatrix writes what a run collects, and with --imatrix nothing is collected")
    if out.suffix == ".dat":
        raise LowbitError(f"--save-imatrix {out}: only llama.cpp's GGUF imatrix format is written; name it .gguf")
    from lowbit.io.folder import check_output

    check_output(out, args.overwrite, what="importance matrix")
    if not recipe.needs_calibration:
        raise LowbitError(f"--save-imatrix: {recipe.label()} collects no calibration statistics "
                          "(use a gguf-*-imatrix or a -gptq preset)")
    if recipe.transforms or any(a.implied_transforms() for a in recipe.algorithms):
        raise LowbitError(f"--save-imatrix: {recipe.label()} rescales the inputs of its linears (AWQ, SmoothQuant), so "
                          "what it measures is not the model's importance matrix")


def _load_for_quantization(spec: str):  # type: ignore[no-untyped-def]
    """A lazily loaded model (blocks stay on disk until quantized) when ``spec`` is a Hugging
    Face folder with safetensors weights, else a fully loaded one."""
    from lowbit.models import load_model
    from lowbit.models.lazy import lazy_source

    folder = lazy_source(spec)
    if folder is not None:
        from lowbit.models.lazy import load_lazy

        try:
            return load_lazy(folder, source=spec)
        except LowbitError:
            pass  # e.g. checkpoint names that need transformers' conversion: load it whole
    return load_model(spec), None


def cmd_eval(args: argparse.Namespace) -> int:
    if args.task == "humaneval":
        return _eval_humaneval(args)
    if args.lm_eval_tasks:
        return _eval_lm_eval(args)
    from lowbit.bench.compare import block_linear_names
    from lowbit.calibration import load_text
    from lowbit.evaluation import evaluate, model_size
    from lowbit.models import cache_dir, check_context, load_model

    text = load_text(args.text)
    loaded, dtype = _load_for_eval(args)
    check_context(loaded.model, args.seq_len, f"--seq-len {args.seq_len}")
    ref_spec = _reference_spec(args, loaded)
    ref = load_model(ref_spec, _dtype(args.ref_dtype)).model if ref_spec else None
    from lowbit.evaluation.kv_cache import emulated, resolve_kv_cache

    kv = resolve_kv_cache(loaded.model, args.kv_cache)
    with emulated(loaded.model, kv):
        result = evaluate(
            loaded.model, loaded.tokenizer, text, ref=ref, seq_len=args.seq_len, stride=args.stride,
            max_windows=args.max_windows, dtype=_dtype(dtype), ref_dtype=_dtype(args.ref_dtype),
            cache_dir=None if args.no_cache else cache_dir(), progress=not args.no_progress,
        )
    size = model_size(loaded.model, block_linear_names(loaded.model))
    result.bits_per_weight = size.bits_per_weight
    result.model_bytes = size.model_bytes
    out = result.to_dict()
    out["model"] = args.model
    out["ref"] = ref_spec
    out["kv_cache"] = None if kv is None else kv.describe()
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            if v is not None:
                print(f"{k:16s} {v:.6g}" if isinstance(v, float) else f"{k:16s} {v}")
    return 0


def _load_for_eval(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The evaluated model and its compute dtype's name: as generate runs it (``--kernels``), or
    every linear on the reference path (a .gguf file's linears stay packed)."""
    from lowbit.models import load_model

    if args.w8a8 and not args.kernels:
        raise LowbitError("--w8a8 runs on a kernel: add --kernels")
    if args.kernels:
        from lowbit.evaluation.speed import load_for_running

        loaded, dtype, _, _ = load_for_running(args.model, args.dtype or "auto", kernels=True, w8a8=args.w8a8)
        return loaded, dtype
    return load_model(args.model, keep_quantized=True), args.dtype or "float32"


def _reference_spec(args: argparse.Namespace, loaded) -> str | None:  # type: ignore[no-untyped-def]
    """``--ref``, else the model a lowbit-quantized folder came from; None with ``--no-ref``."""
    if args.no_ref:
        return None
    if args.ref is None and getattr(loaded.model, "lowbit_recipe", None) is not None:
        return loaded.source
    return args.ref


def _eval_humaneval(args: argparse.Namespace) -> int:
    from lowbit.evaluation.humaneval_cli import eval_humaneval, format_humaneval, validate_humaneval_args
    from lowbit.models import load_model

    validate_humaneval_args(args)  # before the slow model load
    if args.kv_cache not in (None, "none"):
        raise LowbitError("--kv-cache with --task humaneval is not supported yet (its batched generation reorders the "
                          "cache); measure the cache with --task ppl")
    if args.lm_eval_tasks:
        raise LowbitError("--task humaneval and --lm-eval-tasks exclude each other")
    loaded, dtype = _load_for_eval(args)
    loaded.model.to(_dtype(dtype))
    ref_spec = _reference_spec(args, loaded)
    ref = load_model(ref_spec, _dtype(args.ref_dtype)).model if ref_spec else None
    out = eval_humaneval(args, loaded.model, loaded.tokenizer, ref)
    out["model"], out["ref"] = args.model, ref_spec
    print(json.dumps(out) if args.json else format_humaneval(out))
    return 0


def _eval_lm_eval(args: argparse.Namespace) -> int:
    from lowbit.evaluation.lm_eval_backend import format_lm_eval, parse_tasks, run_lm_eval

    # the model as `generate` runs it (kernels, their dtype), as lm-eval's own backends do
    results = run_lm_eval(args.model, parse_tasks(args.lm_eval_tasks), include_path=args.lm_eval_include,
                          limit=args.limit, batch_size=args.lm_eval_batch_size, num_fewshot=args.num_fewshot,
                          dtype="auto")
    print(json.dumps({"model": args.model, "results": results["results"]}, default=str) if args.json
          else format_lm_eval(results))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from lowbit.evaluation.inspect import inspect_checkpoint

    result = inspect_checkpoint(args.path)
    layers, summary = result.layers, result.summary
    if args.json:
        print(json.dumps({**summary, "layers": layers}))
        return 0
    width = max((len(layer["module"]) for layer in layers), default=6)
    print(f"{'module':{width}s}  {'codec':22s} {'shape':>12s} {'bpw':>7s} {'bytes':>10s}")
    for layer in layers:
        shape = "x".join(map(str, layer["shape"]))
        print(f"{layer['module']:{width}s}  {layer['codec']:22s} {shape:>12s} {layer['bpw']:7.3f} {layer['bytes']:10d}")
    print()
    for k, v in summary.items():
        print(f"{k:26s} {v:.4f}" if isinstance(v, float) else f"{k:26s} {v}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from lowbit.bench import compare_recipes, format_table
    from lowbit.calibration import load_text
    from lowbit.models import check_context, load_model
    from lowbit.recipes import resolve_recipe

    recipes = [resolve_recipe(r) for r in _items(args.recipes, "--recipes", "presets or recipe files")]
    if any(v is not None for v in (args.calib, args.calib_samples, args.calib_seq_len, args.calib_seed)):
        recipes = [_with_calibration(r, args) if r.needs_calibration else r for r in recipes]
    texts = [load_text(t) for t in _items(args.text, "--text", "texts")]
    base = load_model(args.model)
    check_context(base.model, args.seq_len, f"--seq-len {args.seq_len}")
    for r in recipes:
        if r.needs_calibration:
            c = r.calibration_config()
            check_context(base.model, c.seq_len, f"{r.label()}: calibration seq_len {c.seq_len}")
    rows = compare_recipes(base, recipes, texts, seq_len=args.seq_len, max_windows=args.max_windows,
                           dtype=_dtype(args.dtype), progress=not args.no_progress,
                           compute_dtype=_dtype(args.calib_dtype))
    if args.json:
        print(json.dumps([r.to_dict() for r in rows]))
    else:
        print(format_table(rows))
    return 0


def _items(text: str, flag: str, what: str) -> list[str]:
    """The comma-separated entries of ``text``; LowbitError when there are none."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise LowbitError(f"{flag} {text!r} names no {what}")
    return items


def _load_for_running(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from lowbit.evaluation.speed import load_for_running

    if args.w8a8 and args.no_kernels:
        raise LowbitError("--w8a8 runs on a kernel: drop --no-kernels")
    return load_for_running(args.model, args.dtype, kernels=not args.no_kernels, w8a8=args.w8a8)


def _describe_run(dtype: str, counts: dict[str, int], memory: dict[str, float | None]) -> str:
    layers = ", ".join(f"{n} linears: {k}" for k, n in counts.items()) or "no quantized linears"
    rss = memory["rss_after_load_mb"]
    return (f"{dtype} activations; {layers}; model tensors {memory['model_mb']:.0f} MB"
            + ("" if rss is None else f", process resident {rss:.0f} MB after loading"))


def cmd_generate(args: argparse.Namespace) -> int:
    import time

    import torch
    from transformers import TextStreamer

    from lowbit.evaluation.speed import peak_resident_bytes
    from lowbit.models import check_context

    if not args.prompt and not args.chat:
        raise LowbitError("--prompt is empty: give the text to continue (or --chat, whose template adds its own tokens)")
    loaded, dtype, counts, memory = _load_for_running(args)
    tok = loaded.tokenizer
    if tok is None:
        raise LowbitError(f"{args.model} has no tokenizer")
    if args.chat:
        if not getattr(tok, "chat_template", None):
            raise LowbitError(f"{args.model}'s tokenizer has no chat template (drop --chat)")
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(args.prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise LowbitError(f"--prompt {args.prompt!r} is no tokens at all for {args.model}'s tokenizer")
    check_context(loaded.model, ids.shape[1] + args.max_new_tokens,
                  f"a prompt of {ids.shape[1]} tokens and --max-new-tokens {args.max_new_tokens}")
    from lowbit.evaluation.kv_cache import new_cache, resolve_kv_cache
    from lowbit.models.architectures import cache_argument

    kv = resolve_kv_cache(loaded.model, args.kv_cache)
    compiled = _compile_kwargs(loaded.model, kv) if args.compile else {}
    print(_describe_run(dtype, counts, memory) + ("" if kv is None else f"; KV cache {kv.describe()}")
          + ("; decode compiled on a static cache" if compiled else ""), file=sys.stderr)
    sample = args.temperature > 0
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = loaded.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens, do_sample=sample,
            temperature=args.temperature if sample else None, top_p=None, top_k=None,
            streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True),
            **({} if kv is None else {cache_argument(loaded.model, "generate"): new_cache(loaded.model, kv)}),
            **compiled, **({} if compiled else _chunked_prefill(ids.shape[1], args.prefill_chunk)),
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        )
    seconds = time.perf_counter() - t0
    n = out.shape[1] - ids.shape[1]
    peak = peak_resident_bytes()
    print(f"{n} tokens in {seconds:.2f} s: {n / seconds:.1f} tokens/s (prompt {ids.shape[1]} tokens)"
          + ("" if peak is None else f"; peak resident memory of load and generation {peak / 1e6:.0f} MB"),
          file=sys.stderr)
    return 0


def _chunked_prefill(prompt_tokens: int, chunk: int) -> dict[str, object]:
    """generate's argument for a prompt fed ``chunk`` tokens at a time (none for a shorter prompt)."""
    return {"prefill_chunk_size": chunk} if 0 < chunk < prompt_tokens else {}


def _compile_kwargs(model: object, kv: object) -> dict[str, object]:
    """generate's arguments for --compile, or a LowbitError naming why this model cannot."""
    from lowbit.evaluation.compiled_decode import generate_kwargs

    if kv is not None:
        raise LowbitError("--compile decodes on the static full-precision cache: it cannot be combined with --kv-cache")
    try:
        return generate_kwargs(model)  # type: ignore[arg-type]
    except ValueError as exc:
        raise LowbitError(f"--compile: {exc}") from None


def cmd_bench_speed(args: argparse.Namespace) -> int:
    import torch

    from lowbit.evaluation.speed import measure_speed, peak_resident_bytes

    from lowbit.models import check_context

    try:
        batches = [int(b) for b in args.batch.split(",") if b.strip()]
    except ValueError:
        raise LowbitError(f"--batch: expected comma-separated integers, got {args.batch!r}") from None
    if not batches or min(batches) < 1:
        raise LowbitError(f"--batch: expected positive batch sizes, got {args.batch!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded, dtype, counts, memory = _load_for_running(args)
    check_context(loaded.model, args.prompt_tokens + args.new_tokens,
                  f"--prompt-tokens {args.prompt_tokens} and --new-tokens {args.new_tokens}")
    from lowbit.evaluation.kv_cache import new_cache, resolve_kv_cache

    kv = resolve_kv_cache(loaded.model, args.kv_cache)
    load_peak = peak_resident_bytes()
    vocab = loaded.model.get_input_embeddings().weight.shape[0]
    if args.compile:
        _compile_kwargs(loaded.model, kv)  # refused before any run
    rows = [measure_speed(loaded.model, vocab, b, args.prompt_tokens, args.new_tokens, args.repeats,
                          new_cache=None if kv is None else (lambda: new_cache(loaded.model, kv)),
                          compiled=args.compile, prefill_chunk=args.prefill_chunk or None)
            for b in batches]
    result = {
        "model": args.model, "dtype": dtype, "linears": counts, "threads": torch.get_num_threads(),
        "kv_cache": None if kv is None else kv.describe(),
        **memory, "load_peak_mb": None if load_peak is None else load_peak / 1e6,
        "runs": [r.to_dict() for r in rows],
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.model}: {_describe_run(dtype, counts, memory)}; {result['threads']} threads"
          + ("" if kv is None else f"; KV cache {kv.describe()}")
          + ("" if not args.compile else "; decode compiled on a static cache (first run: "
             + ", ".join(f"{r.compile_s:.0f} s" for r in rows if r.compile_s is not None) + ")"))
    print(f"{'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'peak MB':>8} {'KV bytes/token':>15}")
    for r in rows:
        peak = "-" if r.peak_mb is None else f"{r.peak_mb:.0f}"
        print(f"{r.batch:>5} {r.prefill_tokens_per_s:>14.1f} {r.decode_tokens_per_s:>13.1f} {peak:>8} "
              f"{r.kv_bytes_per_token:>15.0f}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from lowbit.bench.sweep import run_sweep

    results = args.results or args.sweep.with_name(args.sweep.stem + "-results")
    summary = run_sweep(args.sweep, results, jobs=args.jobs, ray_address=args.ray, retry_failed=args.retry_failed,
                        progress=not args.no_progress)
    resumed = f" ({summary.resumed} of them measured before: timing only)" if summary.resumed else ""
    print(f"{summary.cells} cells: {summary.done} run now{resumed}, {summary.skipped} kept from {results}, "
          f"{len(summary.failed)} failed -> {results} (`lowbit report {results} -o report.html`)")
    return 1 if summary.failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    from lowbit.bench.report import report_command

    return report_command(args)


COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval, "inspect": cmd_inspect, "bench": cmd_bench,
            "generate": cmd_generate, "bench-speed": cmd_bench_speed, "sweep": cmd_sweep, "report": cmd_report}


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # type: ignore[no-untyped-def]
    print(f"lowbit: warning: {message}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    shown, warnings.showwarning = warnings.showwarning, _show_warning  # one line each, as errors are
    try:
        return COMMANDS[args.command](args)
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`lowbit inspect ... | head`): no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
