#!/usr/bin/env bash
# Build llama.cpp's command-line tools (llama-quantize, llama-imatrix, llama-perplexity,
# llama-completion, llama-tokenize, llama-bench) from the llama.cpp vendored in PyPI's llama-cpp-python source package, into
# $LOWBIT_CACHE/llama.cpp (default ~/.cache/lowbit/llama.cpp). About 6 minutes on 2 cores.
#
# AMX is switched off: on AMX CPUs a -march=native build crashes on quantized models (its AMX
# repacking); the AVX-512 kernels are kept.
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
ROOT="${LOWBIT_CACHE:-$HOME/.cache/lowbit}/llama.cpp"
SRC="$ROOT/llama_cpp_python-$VERSION/vendor/llama.cpp"
BUILD="$ROOT/build-$VERSION"
TOOLS=(llama-quantize llama-imatrix llama-perplexity llama-completion llama-tokenize llama-bench)
mkdir -p "$ROOT"
if [ ! -d "$SRC" ]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp" -q
  tar xzf "$tmp"/llama_cpp_python-"$VERSION".tar.gz -C "$ROOT"
fi
flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" > "$BUILD.cmake.log"
cmake --build "$BUILD" -j "$(nproc)" --target "${TOOLS[@]}" > "$BUILD.build.log"
for t in "${TOOLS[@]}"; do test -x "$BUILD/bin/$t"; done
echo "$BUILD/bin"
