"""The block linears' share of a prefill: each MODEL run as `lowbit bench-speed` runs it (fast kernels,
``--dtype``), one forward of a 512-token prompt (last position's logits only), with every decoder
block's linear timed by forward hooks; median of 5 after a warm-up. Prints the prefill's time, the
linears' time and share, and the rest (attention, norms, rotary, activations). Run alone.

    .venv/bin/python scripts/profile_prefill.py MODEL [MODEL ...] [--dtype bfloat16] [--tokens 512]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lowbit.evaluation.speed import load_for_running
from lowbit.modules import QuantLinear


def profile(spec: str, dtype: str, tokens: int) -> None:
    loaded, dtype_name, counts, _ = load_for_running(spec, dtype)
    model = loaded.model
    spent, started = [0.0], {}

    def pre(m: torch.nn.Module, args: object) -> None:
        started[m] = time.perf_counter()

    def post(m: torch.nn.Module, args: object, out: object) -> None:
        spent[0] += time.perf_counter() - started[m]

    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, QuantLinear)) and ".layers." in name:
            m.register_forward_pre_hook(pre)
            m.register_forward_hook(post)
    ids = torch.randint(0, model.get_input_embeddings().weight.shape[0], (1, tokens),
                        generator=torch.Generator().manual_seed(0))
    totals, linears = [], []
    with torch.inference_mode():
        for i in range(6):
            spent[0] = 0.0
            t0 = time.perf_counter()
            model(ids, use_cache=True, logits_to_keep=1)
            if i:
                totals.append(time.perf_counter() - t0)
                linears.append(spent[0])
    total, lin = statistics.median(totals), statistics.median(linears)
    print(f"{spec} ({dtype_name}; {counts or 'dense'}): prefill of {tokens} tokens {1000 * total:.0f} ms, block linears "
          f"{1000 * lin:.0f} ms ({100 * lin / total:.0f}%), the rest {1000 * (total - lin):.0f} ms", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", metavar="MODEL")
    ap.add_argument("--dtype", default="bfloat16", help="as bench-speed's --dtype (default bfloat16)")
    ap.add_argument("--tokens", type=int, default=512, help="prompt tokens (default 512)")
    args = ap.parse_args()
    for spec in args.models:
        profile(spec, args.dtype, args.tokens)


if __name__ == "__main__":
    main()
