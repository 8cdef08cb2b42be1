"""Does w8a8-static-channels' result on SmolLM2 carry to Qwen2.5-Coder-0.5B? A spot check, not a table:
the presets ``w8a8`` (dynamic per-token inputs) and ``w8a8-static-channels`` (static per-tensor inputs, 16 fixed
16-bit features per linear) on the built-in Qwen model, KLD / top-1 against its float32 self on the first 8
windows of ``pydoc`` and ``stdlib``. About 20 minutes on 2 cores (the static preset calibrates 13 of them).

    .venv/bin/python scripts/check_static_channels_qwen.py
"""

from __future__ import annotations

import copy
import time

import torch

from lowbit.calibration import calibration_set, load_text
from lowbit.evaluation import evaluate
from lowbit.models import builtin_model_path, cache_dir, load_model
from lowbit.pipeline import quantize_model
from lowbit.recipes import get_preset


def main() -> None:
    base = load_model(builtin_model_path("qwen2.5-coder-0.5b"), dtype=torch.float32)
    texts = [load_text(t) for t in ("pydoc", "stdlib")]
    for preset in ("w8a8", "w8a8-static-channels"):
        rec = get_preset(preset)
        model = copy.deepcopy(base.model)
        t = time.time()
        calib = calibration_set(base.tokenizer, rec.calibration_config()) if rec.needs_calibration else None
        quantize_model(model, rec, progress=False, calibration=calib)
        seconds = time.time() - t
        for text in texts:
            r = evaluate(model, base.tokenizer, text, ref=base.model, cache_dir=cache_dir(), progress=False,
                         max_windows=8)
            print(preset, text.name, f"kld {r.kld:.5f} top1 {r.top1:.4f} quant {seconds:.0f}s", flush=True)
        del model


if __name__ == "__main__":
    main()
