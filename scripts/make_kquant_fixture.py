"""Write tests/data/kquants_llama_cpp.npz: llama.cpp's own k-quant bytes for fixed inputs.

The k-quant tests compare lowbit's quantizer against llama.cpp's (``ggml_quantize_chunk`` of
the libggml-base built by scripts/peers/setup_llamacpp.sh), with and without an importance
matrix, and check that lowbit reads and re-writes llama.cpp's bytes unchanged. CI has no
llama.cpp build, so the bytes are stored. Run: ``.venv/bin/python scripts/make_kquant_fixture.py``.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType

from lowbit.bench.llama_cpp import llama_cpp_bin
from lowbit.io.ggml_blocks import BLOCK_BYTES

TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "kquants_llama_cpp.npz"


def main() -> None:
    bin_dir = llama_cpp_bin()
    if bin_dir is None:
        raise SystemExit("llama.cpp is not built: run scripts/peers/setup_llamacpp.sh")
    lib = ctypes.CDLL(str(bin_dir / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    g = torch.Generator().manual_seed(7)
    rows, cols = 32, 512
    normal = torch.randn(rows // 2, cols, generator=g) * 0.02
    heavy = torch.distributions.StudentT(3.0).sample((rows // 2, cols)) * 0.02  # seeded below
    x = torch.cat([normal, heavy]).numpy().astype(np.float32)
    x[3, :256] = 0.0  # an all-zero super-block
    x[5, 256:] = 0.5  # a constant one
    imatrix = (torch.rand(cols, generator=g) ** 4 + 0.01).numpy().astype(np.float32)
    out: dict[str, np.ndarray] = {"x": x, "imatrix": imatrix}
    for t in TYPES:
        for key, qw in ((t, None), (f"{t}_imatrix", imatrix)):
            dst = np.zeros(rows * cols // 256 * BLOCK_BYTES[t], dtype=np.uint8)
            lib.ggml_quantize_chunk(int(GGMLQuantizationType[t]), x.ctypes.data, dst.ctypes.data, 0, rows, cols,
                                    None if qw is None else qw.ctypes.data)
            out[key] = dst.reshape(rows, -1)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    torch.manual_seed(7)
    main()
