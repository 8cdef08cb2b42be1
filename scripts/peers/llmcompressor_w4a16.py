#!/usr/bin/env python3
"""llm-compressor's own W4A16 checkpoint of a model: what a user of that tool hands to lowbit.

Run with the peer venv made by scripts/peers/setup_llmcompressor.sh:

    .venv-llmcompressor/bin/python scripts/peers/llmcompressor_w4a16.py --model DIR --out OUT

``oneshot`` with a ``QuantizationModifier`` of the ``W4A16`` scheme (int4, groups of 128,
symmetric, RTN: no calibration data) on every ``Linear`` but ``lm_head``, the model loaded in
float32 (so its scales are float32, as llm-compressor keeps them), saved compressed
(``save_compressed=True``: compressed-tensors' pack-quantized format). The tokenizer is copied.
stdout carries one JSON line (versions, seconds); logging goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="Hugging Face model folder")
    p.add_argument("--out", required=True, type=Path, help="output folder (must not exist)")
    args = p.parse_args()
    if args.out.exists():
        p.error(f"{args.out} exists")
    import compressed_tensors
    import llmcompressor
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    t0 = time.perf_counter()
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]))
    seconds = time.perf_counter() - t0
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    print(json.dumps({"seconds": seconds, "out": str(args.out), "versions": {
        "llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
        "torch": torch.__version__}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
