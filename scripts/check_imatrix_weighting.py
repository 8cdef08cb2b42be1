"""How llama.cpp's block types weigh an importance matrix: llama.cpp's per-value weights
``qw * sqrt(sigma^2 + x^2)`` (what lowbit does) against the imatrix ``qw`` alone (what lowbit did
before), both on llama.cpp's own imatrix file of the model, for one GGUF preset, evaluated on
both held-out texts.

The imatrix file is the one ``scripts/benchmark_gguf.py`` uses (``llama-imatrix`` on 128 chunks of
512 tokens of ``pydoc-calib``, kept in ``$LOWBIT_CACHE/bench``; made here the same way when it is
missing, which needs llama.cpp's tools, ``scripts/peers/setup_llamacpp.sh``). Weights are
quantized in memory (the values lowbit's GGUF file of the preset holds) and evaluated by lowbit's
evaluator against the unquantized model in float32.

    .venv/bin/python scripts/check_imatrix_weighting.py [--model M] [--preset gguf-q3_k_m-imatrix] [--max-windows N]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmark_gguf import IMATRIX_CHUNKS, N_CTX, imatrix_file  # this script's folder is on sys.path

from lowbit.bench.llama_cpp import llama_cpp_imatrix
from lowbit.bench.models import DEFAULT_MODEL
from lowbit.calibration import load_text
from lowbit.codecs.ggml_legacy import GGMLBlockCodec
from lowbit.evaluation import evaluate
from lowbit.io.gguf_writer import save_gguf
from lowbit.io.imatrix import read_imatrix
from lowbit.models import cache_dir, load_model
from lowbit.models.fingerprint import model_fingerprint
from lowbit.pipeline import quantize_model
from lowbit.recipes import get_preset


def imatrix_of(model: str, base) -> Path:  # type: ignore[no-untyped-def]
    """llama.cpp's imatrix of ``model``, where benchmark_gguf.py keeps it (made the same way when missing)."""
    path = imatrix_file(model)
    if not path.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            f32 = save_gguf(base, Path(tmp) / "f32.gguf", dense="f32")
            calib = Path(tmp) / "calib.txt"
            calib.write_text(load_text("pydoc-calib").text)
            llama_cpp_imatrix(f32, calib, path, N_CTX, IMATRIX_CHUNKS, torch.get_num_threads())
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--preset", default="gguf-q3_k_m-imatrix", help="a gguf-*-imatrix preset")
    ap.add_argument("--max-windows", type=int, help="evaluate at most N windows per text (default: all)")
    args = ap.parse_args()
    recipe = get_preset(args.preset)
    base = load_model(args.model)
    imatrix = imatrix_of(args.model, base)
    texts = [load_text(t) for t in ("pydoc", "stdlib")]
    fp = model_fingerprint(base.model)
    llama_cpps = GGMLBlockCodec.importance_weights
    print(f"{args.model}, {args.preset}, llama.cpp's imatrix {imatrix.name}; KLD / top-1 / PPL against float32")
    print("| weighting | text | mean KLD | top-1 | PPL | quantize s |\n|---|---|---:|---:|---:|---:|")
    try:
        for name, rule in (("qw * sqrt(sigma^2 + x^2) (llama.cpp's, lowbit's)", llama_cpps),
                           ("qw alone (lowbit before)", lambda self, groups, weights: weights)):
            GGMLBlockCodec.importance_weights = rule  # type: ignore[method-assign]
            model = copy.deepcopy(base.model)
            t0 = time.perf_counter()
            quantize_model(model, recipe, progress=False, importance=read_imatrix(imatrix, model))
            seconds = time.perf_counter() - t0
            for text in texts:
                r = evaluate(model, base.tokenizer, text, ref=base.model, cache_dir=cache_dir(), progress=False,
                             ref_fingerprint=fp, max_windows=args.max_windows)
                print(f"| {name} | {text.name} | {r.kld:.5f} | {100 * r.top1:.2f}% | {r.ppl:.3f} | {seconds:.1f} |",
                      flush=True)
            del model
    finally:
        GGMLBlockCodec.importance_weights = llama_cpps  # type: ignore[method-assign]
    return 0


if __name__ == "__main__":
    sys.exit(main())
