"""A real model (SmolLM2-135M by default, ``--model`` another) written in each export layout and read
back: BENCHMARKS.md, section "exports" (or "exports-MODEL").

For each (recipe, layout): quantize SmolLM2 with the recipe, write the layout with
``save_model``, read the folder back with ``load_model`` (the path every ``lowbit`` command
takes), and compare its logits on a held-out window of ``pydoc`` with the in-memory quantized
model; for compressed-tensors, also load it with transformers (compressed-tensors installed)
and compare. Prints the table; ``--no-write`` leaves BENCHMARKS.md alone.

    .venv/bin/python scripts/check_exports.py [--model qwen2.5-coder-0.5b]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

from lowbit.bench.compare import folder_bytes
from lowbit.bench.markdown import command_line, replace_section
from lowbit.bench.models import DEFAULT_MODEL, bench_model, model_section
from lowbit.calibration import calibration_set, load_text
from lowbit.io.formats import save_model
from lowbit.models import LoadedModel, load_model
from lowbit.pipeline import quantize_model
from lowbit.recipes import get_preset

ROOT = Path(__file__).resolve().parent.parent
CASES = [
    ("w4a16 (int4 g128 sym; ragged last group)", "w4a16", ("native", "compressed-tensors", "gptq", "gptq_v2")),
    ("w4a16-asym-g64 (int4 g64 asym)", "w4a16-asym-g64", ("native", "compressed-tensors", "gptq_v2", "awq")),
    ("int8 (per channel)", "int8", ("native", "compressed-tensors", "gptq")),
    ("fp8 (E4M3 per channel)", "fp8", ("native", "compressed-tensors")),
    ("w8a8 (int8 inputs dynamic per token)", "w8a8", ("native", "compressed-tensors")),
    ("w8a8-static (int8 inputs, static per-tensor scales)", "w8a8-static", ("native", "compressed-tensors")),
    ("fp8-dynamic (FP8 inputs dynamic per token)", "fp8-dynamic", ("native", "compressed-tensors")),
    ("llm-int8 (LLM.int8(), threshold 6)", "llm-int8", ("native",)),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help=f"the model (default {DEFAULT_MODEL})")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    base = load_model(args.model)
    command = command_line("scripts/check_exports.py", ap, args)
    ids = torch.tensor(base.tokenizer(load_text("pydoc").text[:4000])["input_ids"][:256]).unsqueeze(0)
    lines = [
        f"Printed by {command}. {bench_model(args.model).name} quantized (RTN) in memory, written in "
        "each layout, read back by `load_model` (what every `lowbit` command does with a folder); logits on 256 "
        "held-out `pydoc` tokens against the in-memory quantized model (both with their inputs quantized where the "
        "recipe says: transformers' compressed-tensors fake-quantizes dynamic int8 inputs at absmax / 127.5, clipping "
        "each token's largest value by half a step, where vLLM's kernels and lowbit use absmax / 127). transformers: "
        "`AutoModelForCausalLM.from_pretrained` with compressed-tensors installed (GPTQ and AWQ need GPTQModel or "
        "AutoAWQ, which do not install on this CPU-only torch: their layouts are checked against reimplemented "
        "readers in the tests).",
        "",
        "| recipe | layout | MB on disk | lowbit reads it back: max abs logit diff | transformers loads it: max abs "
        "logit diff |",
        "|---|---|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory(prefix="lowbit-exports-") as tmp:
        for label, preset, layouts in CASES:
            model = copy.deepcopy(base.model)
            recipe = get_preset(preset)
            calib = calibration_set(base.tokenizer, recipe.calibration_config()) if recipe.needs_calibration else None
            quantize_model(model, recipe, progress=False, calibration=calib)
            with torch.no_grad():
                want = model(ids).logits
            loaded = LoadedModel(model, base.tokenizer, args.model, None)
            for layout in layouts:
                out = save_model(layout, loaded, Path(tmp) / f"{preset}-{layout}")
                back = load_model(str(out))
                with torch.no_grad():
                    ours = (back.model(ids).logits - want).abs().max().item()
                theirs = "-"
                if layout == "compressed-tensors":
                    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

                    # transformers' default path cannot read packed asymmetric zero points (for
                    # compressed-tensors' own files too); its load-time dequantization can, in fp16
                    asym = not model.lowbit_recipe.codec.model_dump().get("symmetric", True)
                    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if asym else {}
                    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **kw)
                    with torch.no_grad():
                        theirs = f"{(hf(ids).logits - want).abs().max().item():.3g}" + (" (fp16 dequantize)" if asym else "")
                lines.append(f"| {label} | {layout} | {folder_bytes(out) / 1e6:.1f} | {ours:.3g} | {theirs} |")
                print(lines[-1], file=sys.stderr, flush=True)
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        replace_section(ROOT / "BENCHMARKS.md", model_section("exports", args.model),
                        f"Export layouts: {bench_model(args.model).name} written and read back", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
