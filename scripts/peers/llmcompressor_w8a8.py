#!/usr/bin/env python3
"""llm-compressor's W8A8: plain, or after its SmoothQuant, for a side-by-side with lowbit's.

Run with the peer venv made by scripts/peers/setup_llmcompressor.sh:

    .venv-llmcompressor/bin/python scripts/peers/llmcompressor_w8a8.py --model DIR --tokens calib.pt \
        [--smoothing-strength 0.5] --threads 2 --out OUT

``oneshot`` on the model in float32 with ``QuantizationModifier(targets="Linear", scheme="W8A8",
ignore=["lm_head"])`` (int8 weights per output channel, symmetric, RTN; int8 inputs dynamic per
token), preceded with ``--smoothing-strength`` by ``SmoothQuantModifier(smoothing_strength=...)``
(its default layer mappings for the model's family). The calibration data is the ``(N, L)`` int64
tensor in ``--tokens``, used as is (no shuffling, batch size 1). Saved compressed
(``int-quantized`` with ``input_activations``): lowbit reads that folder. Only the ``oneshot`` call
is timed. stdout carries one JSON line (versions, seconds, the modifiers as configured); logging
goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="Hugging Face model folder")
    p.add_argument("--tokens", required=True, type=Path, help="torch-saved int64 tensor (N, L) of calibration ids")
    p.add_argument("--smoothing-strength", type=float, default=None, help="run SmoothQuant first with this alpha")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", required=True, type=Path, help="output folder (must not exist)")
    args = p.parse_args()
    if args.out.exists():
        p.error(f"{args.out} exists")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with contextlib.redirect_stdout(sys.stderr):  # llm-compressor logs to stdout at import
        import compressed_tensors
        import datasets
        import llmcompressor
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokens = torch.load(args.tokens, map_location="cpu", weights_only=True)
    if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.int64 or tokens.dim() != 2:
        p.error(f"{args.tokens}: expected an int64 tensor (N, L)")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    recipe = [QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
    if args.smoothing_strength is not None:
        recipe.insert(0, SmoothQuantModifier(smoothing_strength=args.smoothing_strength))
    ds = datasets.Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
    with contextlib.redirect_stdout(sys.stderr):
        t0 = time.perf_counter()
        model = oneshot(model=model, processor=tokenizer, recipe=recipe, dataset=ds,
                        num_calibration_samples=int(tokens.shape[0]), max_seq_length=int(tokens.shape[1]),
                        shuffle_calibration_samples=False, batch_size=1, pipeline="sequential", output_dir=None)
        seconds = time.perf_counter() - t0
        model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    print(json.dumps({
        "seconds": seconds, "out": str(args.out), "torch_num_threads": torch.get_num_threads(),
        "recipe": [f"{type(m).__name__}({', '.join(f'{k}={v!r}' for k, v in m.model_dump(exclude_defaults=True).items())})"
                   for m in recipe],
        "versions": {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
                     "torch": torch.__version__}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
