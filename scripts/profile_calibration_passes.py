"""Where a GPTQ run's time goes, pass by pass, on the first N decoder blocks of SmolLM2.

Quantizes the first ``--blocks`` blocks with int4 g64 GPTQ on 128 x 512 tokens of pydoc-calib
(the benchmark's settings) and prints the seconds spent in each sub-step's calibration pass
(named by its first linear), in the last pass (the next block's inputs), in accumulating input
statistics (X^T X, included in the passes) and in choosing codes.

Usage: .venv/bin/python scripts/profile_calibration_passes.py [--blocks 4] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import collections
import sys
import time

import torch

import lowbit.calibration.statistics as statistics
import lowbit.pipeline.sequential as sequential
from lowbit.calibration import CalibrationConfig, calibration_set
from lowbit.models import load_model
from lowbit.pipeline import quantize_model
from lowbit.recipes import Recipe


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=4, help="decoder blocks to quantize (default 4)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16", help="pass dtype")
    args = ap.parse_args()
    seconds: dict[str, float] = collections.defaultdict(float)

    def timed(key, fn):  # type: ignore[no-untyped-def]
        def wrapper(*a, **k):  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                seconds[key(*a) if callable(key) else key] += time.perf_counter() - t
        return wrapper

    sequential.collect_step_statistics = timed(
        lambda block, names, *_: f"pass {names[0].rsplit('.', 1)[-1]}", sequential.collect_step_statistics)
    sequential.run_block = timed("last pass", sequential.run_block)
    statistics.InputStatistics.add = timed("of which X^T X and means", statistics.InputStatistics.add)

    base = load_model("smollm2-135m")
    calib = calibration_set(base.tokenizer, CalibrationConfig(source="pydoc-calib", samples=128, seq_len=512, seed=0))
    model = base.model
    model.model.layers = model.model.layers[: args.blocks]
    model.config.num_hidden_layers = args.blocks
    recipe = Recipe.from_dict({"codec": {"name": "int", "bits": 4, "group_size": 64}, "algorithm": {"name": "gptq"}})
    t = time.perf_counter()
    report = quantize_model(model, recipe, progress=False, calibration=calib, compute_dtype=getattr(torch, args.dtype))
    total = time.perf_counter() - t
    assert report.sequential is not None
    print(f"{args.blocks} blocks, {args.dtype} passes, {torch.get_num_threads()} threads: {total:.1f} s in all")
    for k, v in seconds.items():
        print(f"  {k:28s} {v:6.1f} s")
    print(f"  {'choosing codes (GPTQ)':28s} {sum(r.seconds for r in report.sequential.linears):6.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
