"""Re-encode the built-in SmolLM2 GGUF's Q4_1 tensors with lowbit's Q4_1 codec and count the
blocks that come out byte for byte identical to the original file.

Each Q4_1 tensor is read from the file as ggml bytes, decoded by lowbit, quantized again from
those float values by lowbit's Q4_1 codec, and written back as ggml bytes. Prints one summary
line and, with --per-tensor, one line per tensor.

Usage: .venv/bin/python scripts/check_gguf_reencode.py [--per-tensor]
"""

from __future__ import annotations

import argparse
import sys

from lowbit.io.ggml_blocks import reencode_counts
from lowbit.models.builtin import BUILTIN_MODELS, find_gguf


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-tensor", action="store_true", help="one line per tensor")
    args = ap.parse_args()
    spec = BUILTIN_MODELS["smollm2-135m"]
    counts = reencode_counts(str(find_gguf(spec)))
    if args.per_tensor:
        for name, n, same in counts:
            print(f"{name:40s} {same}/{n} blocks identical")
    blocks = sum(n for _, n, _ in counts)
    same = sum(s for _, _, s in counts)
    print(f"{spec.gguf_file}: {len(counts)} Q4_1 tensors, {same}/{blocks} blocks identical byte for byte "
          f"after lowbit decodes and re-encodes them ({100 * same / blocks:.4f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
