"""Write tests/data/llama_quantize_types.json: the type llama-quantize gives each tensor of
SmolLM2-135M for each of its mixes (from the F32 GGUF lowbit's writer makes), so that a test
can check lowbit's mix tables against llama.cpp's own choices without llama.cpp.

Run: ``.venv/bin/python scripts/make_mix_fixture.py`` (needs scripts/peers/setup_llamacpp.sh).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from gguf import GGUFReader

from lowbit.bench.llama_cpp import run_tool
from lowbit.io.gguf_writer import save_gguf
from lowbit.models import load_model

MIXES = ["Q2_K", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0"]
OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "llama_quantize_types.json"


def main() -> None:
    base = load_model("smollm2-135m")
    cfg = base.model.config
    out: dict[str, object] = {"model": "smollm2-135m", "config": {
        k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                     "num_key_value_heads", "vocab_size", "tie_word_embeddings")}, "types": {}}
    with tempfile.TemporaryDirectory() as tmp:
        f32 = save_gguf(base, Path(tmp) / "f32.gguf", dense="f32")
        for mix in MIXES:
            q = Path(tmp) / f"{mix}.gguf"
            run_tool("llama-quantize", str(f32), str(q), mix)
            out["types"][mix] = {t.name: t.tensor_type.name for t in GGUFReader(q).tensors}  # type: ignore[index]
            q.unlink()
    OUT.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
