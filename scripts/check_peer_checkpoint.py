"""llm-compressor's own W4A16 checkpoint of a real model, read by lowbit: BENCHMARKS.md, section
"peer-checkpoint-MODEL".

What a user of llm-compressor hands to lowbit: ``oneshot`` with the ``W4A16`` scheme (int4, groups
of 128, symmetric, RTN) on the model loaded in float32, saved compressed (compressed-tensors'
pack-quantized format, float32 scales), made by ``scripts/peers/llmcompressor_w4a16.py`` in the
peer venv (``scripts/peers/setup_llmcompressor.sh`` makes it when missing). lowbit reads the
folder with ``load_model`` (every linear packed, never as float weights) and the same recipe is
made by lowbit from the same float model (``w4a16`` with float32 scales): the codes and scales of
the two are compared linear by linear, and both are evaluated against the unquantized model.

    .venv/bin/python scripts/check_peer_checkpoint.py [--model qwen2.5-coder-0.5b] [--max-windows 8] [--no-write]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from lowbit.bench.markdown import command_line, replace_section
from lowbit.bench.models import bench_model
from lowbit.calibration import load_text
from lowbit.evaluation import evaluate
from lowbit.models.fingerprint import model_fingerprint
from lowbit.models import builtin_model_path, cache_dir, load_model
from lowbit.modules import QuantLinear
from lowbit.pipeline import quantize_model
from lowbit.recipes import Recipe, get_preset

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ("pydoc", "stdlib")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def peer_checkpoint(model: str, out: Path) -> dict:
    venv_python = ROOT / ".venv-llmcompressor" / "bin" / "python"
    if not venv_python.exists():
        subprocess.run(["bash", str(ROOT / "scripts" / "peers" / "setup_llmcompressor.sh")], check=True)
    cmd = [str(venv_python), str(ROOT / "scripts" / "peers" / "llmcompressor_w4a16.py"), "--model",
           str(builtin_model_path(model)), "--out", str(out)]
    log("running llm-compressor: " + " ".join(cmd))
    proc = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare_linears(theirs: torch.nn.Module, ours: torch.nn.Module) -> dict:
    """Per linear: codes equal, scales equal; over all: the fraction of equal codes."""
    ours_by_name = {n: m for n, m in ours.named_modules() if isinstance(m, QuantLinear)}
    n_lin = same_scales = 0
    codes_same = codes_total = 0
    scale_dtypes, kinds = set(), set()
    for name, m in theirs.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        n_lin += 1
        mine = ours_by_name[name]
        a, b = m.qweight, mine.qweight
        kinds.add(f"{a.codec['name']} {a.codec.get('bits')}-bit g{a.codec.get('group_size')}"
                  f"{' sym' if a.codec.get('symmetric') else ' asym'}")
        scale_dtypes.add(str(a.data["scale"].dtype).removeprefix("torch."))
        same_scales += bool(torch.equal(a.data["scale"], b.data["scale"]))
        (ca, _), (cb, _) = a.get_codec().unpack(a), b.get_codec().unpack(b)
        codes_same += int((ca == cb).sum())
        codes_total += ca.numel()
    return {"linears": n_lin, "linears_with_equal_scales": same_scales, "codes_equal": codes_same,
            "codes": codes_total, "codecs": sorted(kinds), "scale_dtypes": sorted(scale_dtypes)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b", help="a built-in model (default qwen2.5-coder-0.5b)")
    ap.add_argument("--max-windows", type=int, default=8, help="evaluation windows per text (default 8)")
    ap.add_argument("--no-write", action="store_true", help="print only, do not rewrite BENCHMARKS.md")
    args = ap.parse_args()
    base = load_model(args.model)
    ref_fp = model_fingerprint(base.model)
    texts = [load_text(t) for t in TEXTS]
    with tempfile.TemporaryDirectory(prefix="lowbit-peer-ckpt-") as tmp:
        out = Path(tmp) / "llmcompressor-w4a16"
        peer = peer_checkpoint(args.model, out)
        theirs = load_model(str(out))
        with open(out / "config.json") as f:
            fmt = json.load(f)["quantization_config"]["format"]
        ours = copy.deepcopy(base.model)
        recipe = get_preset("w4a16").to_dict()
        recipe["codec"]["scale_dtype"] = "float32"
        report = quantize_model(ours, Recipe.from_dict({**recipe, "name": "w4a16, float32 scales"}), progress=False)
        same = compare_linears(theirs.model, ours)
        results = {}
        for who, model in (("llm-compressor", theirs.model), ("lowbit", ours)):
            for text in texts:
                r = evaluate(model, base.tokenizer, text, ref=base.model, max_windows=args.max_windows,
                             cache_dir=cache_dir(), progress=False, ref_fingerprint=ref_fp)
                results[(who, text.name)] = r
    versions = peer["versions"]
    cmd = command_line("scripts/check_peer_checkpoint.py", ap, args)
    lines = [
        f"Printed by {cmd}. {bench_model(args.model).about}. llm-compressor {versions['llmcompressor']} "
        f"(compressed-tensors {versions['compressed_tensors']}, torch {versions['torch']}): `oneshot` with "
        "`QuantizationModifier(targets=\"Linear\", scheme=\"W4A16\", ignore=[\"lm_head\"])` on the model in float32, "
        f"saved with `save_compressed=True` (format `{fmt}`), {peer['seconds']:.1f} s. lowbit reads that folder with "
        f"`load_model`: {same['linears']} linears, all packed ({', '.join(same['codecs'])}; scales "
        f"{', '.join(same['scale_dtypes'])}, kept exactly). lowbit's own: `w4a16` with float32 scales and `lm_head` "
        f"left dense, from the same float weights ({report.seconds:.1f} s). Same linears: "
        f"{same['linears_with_equal_scales']} of {same['linears']} have bit-identical scales, "
        f"{same['codes_equal']:,} of {same['codes']:,} codes are equal "
        f"({100 * same['codes_equal'] / same['codes']:.4f}%). Evaluation: first {args.max_windows} windows of 512 "
        "of each text, KLD and top-1 against the unquantized model, float32.",
        "",
        "| text | checkpoint | PPL | mean KLD | top-1 |",
        "|---|---|---:|---:|---:|",
    ]
    for (who, text), r in results.items():
        lines.append(f"| {text} | {who} | {r.ppl:.3f} | {r.kld:.5f} | {100 * r.top1:.2f}% |")
    lines += ["", f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}."]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        replace_section(ROOT / "BENCHMARKS.md", f"peer-checkpoint-{args.model}",
                        f"Another tool's checkpoint read by lowbit: llm-compressor's W4A16 of "
                        f"{bench_model(args.model).name}", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
