#!/usr/bin/env python3
"""Reference GPTQ run with llm-compressor, for side-by-side comparison with lowbit.

Run with the peer venv made by scripts/peers/setup_llmcompressor.sh:

    .venv-llmcompressor/bin/python scripts/peers/llmcompressor_gptq.py \
        --model DIR --tokens calib.pt --bits 4 --group-size 64 --symmetric --threads 1 --out OUT

* The calibration data is the (N, L) int64 tensor in --tokens, used as is: no
  re-tokenization, no shuffling (shuffle_calibration_samples=False), batch size 1, every
  row exactly L tokens, attention_mask all ones.
* Only the `oneshot` call is timed (time.perf_counter).
* --out receives a plain Hugging Face folder: config.json without quantization_config,
  safetensors with the same tensor names and shards as the input model, in which every
  quantized Linear weight holds the dequantized values llm-compressor chose, and the
  tokenizer and other non-weight files copied. It loads with plain
  transformers.AutoModelForCausalLM.from_pretrained, no compressed-tensors needed.
  Extra files: llmcompressor_gptq.json (the result line plus per-module GPTQ losses) and
  llmcompressor_qparams/qparams.safetensors (weight_scale / weight_zero_point per layer).
* Every quantized weight is checked to lie exactly on its grid (recomputed from
  weight_scale / weight_zero_point); the script fails otherwise.
* stdout carries only the final JSON line; all logging goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import re
import resource
import shutil
import sys
import time
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
WEIGHT_INDEX_NAMES = {"model.safetensors.index.json", "pytorch_model.bin.index.json"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="Hugging Face model folder (safetensors)")
    p.add_argument("--tokens", required=True, type=Path,
                   help="torch-saved int64 tensor (N, L) of calibration token ids")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128, help="-1 means per output channel")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=True,
                     help="symmetric grid, zero point 0 (default)")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false",
                     help="asymmetric grid with an integer zero point")
    p.add_argument("--actorder", choices=["none", "static", "group"], default="none",
                   help="'static' (= 'weight' in compressed-tensors) permutes columns by "
                        "descending Hessian diagonal during GPTQ only; 'group' was removed "
                        "from compressed-tensors and is rejected")
    p.add_argument("--dampening-frac", type=float, default=0.01)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads before loading (default: torch's own choice, one "
                        "per core). GPTQ's per-column loop is made of tiny ops: when another "
                        "process holds a core, 2 OpenMP threads made it ~60-90x slower here "
                        "than 1 thread, so pin this (and the same for lowbit) when timing")
    p.add_argument("--out", required=True, type=Path)
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fail(msg: str):
    log(f"ERROR: {msg}")
    raise SystemExit(1)


def load_tokens(path: Path):
    import torch

    tokens = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(tokens, torch.Tensor):
        fail(f"{path}: expected a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dtype != torch.int64 or tokens.dim() != 2:
        fail(f"{path}: expected an int64 tensor of shape (N, L), got {tokens.dtype} {tuple(tokens.shape)}")
    if tokens.shape[0] < 1 or tokens.shape[1] < 1:
        fail(f"{path}: empty token tensor {tuple(tokens.shape)}")
    return tokens


def expand_per_column(param, group_index, columns: int):
    """(rows, n_groups) qparam -> (rows, columns) using group_index[col]."""
    if param.shape[1] == 1:
        return param.expand(-1, columns)
    return param[:, group_index]


def check_on_grid(name, weight, scale, zero_point, g_idx, args, qmin, qmax):
    """Recompute every weight from (scale, zero_point) and the integer codes; fail if off-grid.

    Returns (codes int tensor, stats dict)."""
    import torch

    w = weight.detach().to(torch.float32)
    rows, cols = w.shape
    if g_idx is not None:
        group_index = g_idx.to(torch.long)
    elif args.strategy == "group":
        group_index = torch.arange(cols) // args.group_size
    else:
        group_index = torch.zeros(cols, dtype=torch.long)
    s = expand_per_column(scale.detach().to(torch.float32), group_index, cols)
    if args.symmetric:
        if zero_point is not None and torch.count_nonzero(zero_point) != 0:
            fail(f"{name}: symmetric scheme but non-zero weight_zero_point")
        z = torch.zeros_like(s)
    else:
        z = expand_per_column(zero_point.detach().to(torch.float32), group_index, cols)
        if not torch.equal(z, z.round()) or z.min() < qmin or z.max() > qmax:
            fail(f"{name}: zero point not an integer in [{qmin}, {qmax}]")
    if not torch.all(s > 0) or not torch.all(torch.isfinite(s)):
        fail(f"{name}: non-positive or non-finite weight_scale")
    # Same op order as compressed_tensors fake_quantize: x / s (+ z), clamp, round, (q - z) * s.
    x = w / s + z
    codes = torch.round(x)
    frac = (x - codes).abs().max().item()
    if codes.min() < qmin or codes.max() > qmax:
        fail(f"{name}: codes outside [{qmin}, {qmax}]: {codes.min().item()} .. {codes.max().item()}")
    deq = (codes - z) * s
    exact = torch.equal(deq, w)
    max_rel = ((deq - w).abs() / s).max().item()
    # A weight that is not a grid point would be >= ~half a step away; allow only float noise.
    if not exact and max_rel > 1e-4:
        fail(f"{name}: weight is not on its quantization grid (max |deq - w| / scale = {max_rel:.3g}, "
             f"max distance of w/s+z from an integer = {frac:.3g})")
    return codes.to(torch.int8 if qmax <= 127 and qmin >= -128 else torch.int32), {
        "exact": exact, "max_rel_err": max_rel, "max_frac": frac,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.actorder == "group":
        fail("actorder 'group' (alias 'dynamic') has been removed from compressed-tensors "
             "(QuantizationArgs rejects it); use 'static' or 'none'")
    if args.group_size == 0 or args.group_size < -1:
        fail("--group-size must be a positive integer or -1 (per channel)")
    if not (2 <= args.bits <= 8):
        fail("--bits must be in 2..8")
    model_dir = args.model.resolve()
    if not (model_dir / "config.json").is_file():
        fail(f"{model_dir}: no config.json")
    st_index = model_dir / "model.safetensors.index.json"
    if st_index.is_file():
        shard_names = sorted(set(json.loads(st_index.read_text())["weight_map"].values()))
    elif (model_dir / "model.safetensors").is_file():
        shard_names = ["model.safetensors"]
    else:
        fail(f"{model_dir}: only safetensors checkpoints are supported")
    out_dir = args.out.resolve()
    if out_dir == model_dir:
        fail("--out must differ from --model")

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers
    from safetensors import safe_open
    from safetensors.torch import save_file

    if args.threads is not None:
        if args.threads < 1:
            fail("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    tokens = load_tokens(args.tokens)
    n_samples, seq_len = (int(d) for d in tokens.shape)

    # llm-compressor adds a loguru sink on sys.stdout at import time (and logs from it right
    # away); bind that sink to stderr, then replace it below. stdout is for the result only.
    with contextlib.redirect_stdout(sys.stderr):
        import datasets
        import llmcompressor
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from compressed_tensors.quantization.utils import calculate_range
        from llmcompressor import oneshot
        from llmcompressor.modifiers.gptq import GPTQModifier
        from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="INFO",
               format="{time:HH:mm:ss} | {function} | {level} - {message}")
    collected: list[tuple[str, str, str]] = []
    logger.add(lambda m: collected.append((m.record["function"], m.record["level"].name,
                                           m.record["message"])), level="DEBUG")

    config = json.loads((model_dir / "config.json").read_text())
    vocab = config.get("vocab_size")
    if vocab is not None and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
        fail(f"token ids outside [0, {vocab})")

    log(f"loading {model_dir} in float32 on CPU")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                             device_map=None)
    model.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)

    strategy = "channel" if args.group_size == -1 else "group"
    weight_args = QuantizationArgs(
        num_bits=args.bits,
        type="int",
        symmetric=args.symmetric,
        strategy=strategy,
        group_size=None if strategy == "channel" else args.group_size,
        dynamic=False,
        actorder=None,  # set on the modifier (a conflicting pair raises)
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=weight_args,
                                input_activations=None, output_activations=None)
    # actorder must be passed explicitly: GPTQModifier's default is a Sentinel("static") that
    # turns an unset scheme actorder into STATIC.
    modifier = GPTQModifier(
        config_groups={"group_0": scheme},
        targets=["Linear"],
        ignore=["lm_head"],
        block_size=args.block_size,
        dampening_frac=args.dampening_frac,
        actorder=None if args.actorder == "none" else "static",
    )

    ds = datasets.Dataset.from_dict({
        "input_ids": tokens.tolist(),
        "attention_mask": torch.ones_like(tokens).tolist(),
    })
    oneshot_kwargs = dict(
        model=model,
        processor=tokenizer,
        recipe=modifier,
        dataset=ds,
        num_calibration_samples=n_samples,
        max_seq_length=seq_len,
        shuffle_calibration_samples=False,
        batch_size=1,
        pipeline="sequential",
        output_dir=None,
    )
    if strategy == "group":
        # llm-compressor refuses in_features % group_size != 0 (and its bypass flag only moves
        # the crash into the weight observer), so say so before calibrating.
        bad = sorted({(n, m.in_features) for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and n.split(".")[-1] != "lm_head"
                      and m.in_features % args.group_size}, key=lambda t: t[1])
        if bad:
            fail(f"--group-size {args.group_size} does not divide in_features of "
                 f"{len(bad)} Linear layers (e.g. {bad[0][0]}: {bad[0][1]}); llm-compressor "
                 "supports only whole groups; pick a divisor or -1 (per channel)")
    log(f"oneshot: GPTQ w{args.bits} {strategy}"
        f"{'' if strategy == 'channel' else ' g' + str(args.group_size)} "
        f"{'sym' if args.symmetric else 'asym'} actorder={args.actorder} on {n_samples}x{seq_len} tokens")
    with contextlib.redirect_stdout(sys.stderr):
        t0 = time.perf_counter()
        model = oneshot(**oneshot_kwargs)
        seconds = time.perf_counter() - t0
    log(f"oneshot took {seconds:.2f} s")

    # ---- collect and verify the quantized weights ----------------------------------------
    q_weights: dict[str, torch.Tensor] = {}
    q_params: dict[str, torch.Tensor] = {}
    grid_stats = {"modules": 0, "exact": 0, "max_rel_err": 0.0}
    resolved_weight_args = None
    for name, module in model.named_modules():
        qs = getattr(module, "quantization_scheme", None)
        if qs is None or qs.weights is None:
            continue
        wa = qs.weights
        resolved_weight_args = wa
        if not hasattr(module, "weight_scale"):
            fail(f"{name}: quantization scheme attached but no weight_scale")
        qmin, qmax = (int(v) for v in calculate_range(wa, "cpu"))
        zp = getattr(module, "weight_zero_point", None)
        g_idx = getattr(module, "weight_g_idx", None)
        codes, st = check_on_grid(name, module.weight, module.weight_scale, zp, g_idx, wa, qmin, qmax)
        grid_stats["modules"] += 1
        grid_stats["exact"] += int(st["exact"])
        grid_stats["max_rel_err"] = max(grid_stats["max_rel_err"], st["max_rel_err"])
        q_weights[f"{name}.weight"] = module.weight.detach().to(torch.float32).contiguous().clone()
        q_params[f"{name}.weight_scale"] = module.weight_scale.detach().float().contiguous().clone()
        if zp is not None:
            q_params[f"{name}.weight_zero_point"] = zp.detach().to(torch.int32).contiguous().clone()
        if g_idx is not None:
            q_params[f"{name}.weight_g_idx"] = g_idx.detach().to(torch.int32).contiguous().clone()
    linear_names = [n for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and n.split(".")[-1] != "lm_head"]
    missing = sorted(set(f"{n}.weight" for n in linear_names) - set(q_weights))
    if missing or not q_weights:
        fail(f"{len(missing)} Linear layers were not quantized, e.g. {missing[:5]}")
    log(f"grid check passed: {grid_stats['modules']} layers, {grid_stats['exact']} bit-exact, "
        f"max |deq - w|/scale = {grid_stats['max_rel_err']:.3g}")

    # ---- write the plain HF folder --------------------------------------------------------
    state = {k: v for k, v in model.state_dict().items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    written: set[str] = set()
    for shard in shard_names:
        tensors = {}
        with safe_open(str(model_dir / shard), framework="pt") as f:
            metadata = f.metadata()
            for key in f.keys():
                orig = f.get_tensor(key)
                if key in q_weights:
                    tensors[key] = q_weights[key].to(torch.float32)
                    written.add(key)
                    continue
                if key not in state:
                    fail(f"{shard}: tensor {key} not found in the calibrated model")
                cur = state[key].detach().to("cpu")
                if not torch.equal(cur.to(orig.dtype), orig):
                    fail(f"{key}: not a quantization target but changed by oneshot")
                tensors[key] = orig.contiguous()
        save_file(tensors, str(out_dir / shard), metadata=metadata or {"format": "pt"})
        os.chmod(out_dir / shard, 0o644)
    unwritten = sorted(set(q_weights) - written)
    if unwritten:
        fail(f"quantized weights not present in the input checkpoint's keys: {unwritten[:5]}")
    if st_index.is_file():
        shutil.copy2(st_index, out_dir / st_index.name)
    for entry in model_dir.iterdir():
        if (entry.name == "config.json" or entry.name in WEIGHT_INDEX_NAMES
                or entry.suffix in WEIGHT_SUFFIXES or not entry.is_file()):
            continue
        shutil.copy2(entry, out_dir / entry.name)
    config.pop("quantization_config", None)
    # The dequantized weights are float32 values; make a default (dtype="auto") load keep them.
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = "float32"
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    qdir = out_dir / "llmcompressor_qparams"
    qdir.mkdir(exist_ok=True)
    save_file(q_params, str(qdir / "qparams.safetensors"))
    os.chmod(qdir / "qparams.safetensors", 0o644)

    # ---- settings actually used ------------------------------------------------------------
    from llmcompressor.modifiers.gptq.helpers import GPTQ_PRECISION
    from llmcompressor.utils.pytorch.module import infer_sequential_targets

    import dataclasses

    from llmcompressor.args import DatasetArguments

    # Every dataset/pipeline setting: DatasetArguments defaults, then oneshot()'s own
    # defaults, then what this script passed.
    used = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
            for f in dataclasses.fields(DatasetArguments)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    used.update({k: p.default for k, p in inspect.signature(oneshot).parameters.items()
                 if p.default is not inspect.Parameter.empty})
    used.update({k: v for k, v in oneshot_kwargs.items()
                 if k not in ("model", "processor", "recipe", "dataset")})
    oneshot_settings = {k: used[k] for k in (
        "pipeline", "batch_size", "num_calibration_samples", "max_seq_length",
        "shuffle_calibration_samples", "data_collator", "sequential_targets",
        "sequential_targets_per_subgraph", "sequential_offload_device", "propagate_error",
        "sequential_prefetch", "dataloader_num_workers", "tie_word_embeddings", "precision",
        "moe_calibrate_all_experts") if k in used}
    if oneshot_settings.get("sequential_targets") is None:
        oneshot_settings["sequential_targets_inferred"] = sorted(
            infer_sequential_targets(model, None))
    oneshot_settings["sampler"] = ("LengthAwareSampler (argsort of lengths, descending)"
                                   if not used["shuffle_calibration_samples"] else "RandomSampler")
    oneshot_settings["passes_per_subgraph"] = (
        "1 calibration forward (Hessians of all Linear layers in the decoder layer), "
        "GPTQ on all of them, then 1 propagation forward with the quantized weights"
        if used["propagate_error"] else "1 calibration forward; outputs of unquantized layer propagated")

    modifier_dump = modifier.model_dump()
    gptq_settings = {k: v for k, v in modifier_dump.items() if k not in (
        "config_groups", "index", "group", "start", "end", "update", "initialized_",
        "finalized_", "started_", "ended_")}
    wa = resolved_weight_args
    weight_settings = wa.model_dump(mode="json")
    weight_settings["observer_effective"] = (
        {None: "memoryless_minmax", "minmax": "memoryless_minmax",
         "static_minmax": "memoryless_minmax", "mse": "memoryless_mse"}.get(wa.observer, wa.observer))
    weight_settings["q_range"] = [int(v) for v in calculate_range(wa, "cpu")]
    losses = []
    pending: list[str] = []
    for function, level, message in collected:
        m = re.match(r"Quantizing \d+ module\(s\): \[(.*)\]", message)
        if m:
            pending = [s.strip().strip("'\"") for s in m.group(1).split(",")]
            continue
        m = re.match(r"error ([0-9.eE+-]+|nan|inf)", message)
        if function == "GPTQ" and m and pending:
            losses.append({"module": pending.pop(0), "loss": float(m.group(1))})
    rtn_fallback = [msg for _, lvl, msg in collected if "Hessian inversion failed" in msg]

    settings = {
        "gptq": {
            **gptq_settings,
            "actorder_resolved": wa.actorder,
            "gptq_precision": str(GPTQ_PRECISION),
            "block_update_backend": "triton" if torch.cuda.is_available() else "eager torch (CPU)",
            "hessian": "H = sum over batches of 2 X^T X / number of sequences; "
                       "damp = dampening_frac * mean(diag H) added to diag",
            "qparams": "scale/zero_point from the weight observer on the pre-GPTQ weights, "
                       "fixed during GPTQ (not recomputed per group from updated weights)",
        },
        "weights": weight_settings,
        "oneshot": oneshot_settings,
        "torch_num_threads": torch.get_num_threads(),
        "calibration": {"num_sequences": n_samples, "seq_len": seq_len, "tokens_file": str(args.tokens)},
        "rtn_fallback_warnings": rtn_fallback,
        "grid_check": grid_stats,
        "quantized_layers": len(q_weights),
    }
    result = {
        "seconds": round(seconds, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "llmcompressor": llmcompressor.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "settings": settings,
    }
    line = json.dumps(result, default=str, sort_keys=False)
    (out_dir / "llmcompressor_gptq.json").write_text(
        json.dumps({**result, "gptq_losses": losses}, default=str, indent=2) + "\n")
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
