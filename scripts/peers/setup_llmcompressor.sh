#!/usr/bin/env bash
# Create or reuse /work/main/.venv-llmcompressor: a separate venv holding llm-compressor (the
# reference GPTQ implementation) so its pins never touch the project's own .venv.
# torch is installed FIRST as the CPU wheel torch==2.13.0 (a bare `torch` requirement would pull a
# multi-GB CUDA build); every later install is constrained to keep exactly that torch.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
VENV=.venv-llmcompressor
TORCH_VERSION=2.13.0
LLMCOMPRESSOR_VERSION=0.14.0.1
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q --disable-pip-version-check)
if [ "$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null)" != "$TORCH_VERSION" ]; then
    "${PIP[@]}" "torch==$TORCH_VERSION"
fi
# Pin torch for the rest of the resolution so nothing can swap it for a CUDA build.
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_VERSION" >"$CONSTRAINTS"
if [ "$("$PY" -c 'import importlib.metadata as m; print(m.version("llmcompressor"))' 2>/dev/null)" != "$LLMCOMPRESSOR_VERSION" ]; then
    "${PIP[@]}" -c "$CONSTRAINTS" "llmcompressor==$LLMCOMPRESSOR_VERSION" datasets
fi
"$PY" -m pip check --disable-pip-version-check
"$PY" -c 'import torch, transformers, llmcompressor, compressed_tensors, datasets; print("torch", torch.__version__, "transformers", transformers.__version__, "llmcompressor", llmcompressor.__version__, "compressed-tensors", compressed_tensors.__version__)'
