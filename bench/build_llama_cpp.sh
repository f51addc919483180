#!/usr/bin/env bash
# Build llama.cpp's llama-server, llama-quantize and llama-perplexity for the peer figures, from the
# source that llama-cpp-python's sdist vendors (the package index is reachable; GitHub may not be).
#
# GGML_NATIVE=ON (llama.cpp's default, -march=native) has died with `Illegal instruction` on this
# project's AVX-512/AMX machines once the thread pool starts, and the machine a sitting gets may
# have AVX-512 or only AVX2. So the instruction sets are named, each ON only where /proc/cpuinfo
# lists it.
#
# usage: bench/build_llama_cpp.sh [DIR]   (default ~/.cache/slmkit/llama.cpp); prints the export line.
set -euo pipefail
VERSION=0.3.36
DIR=${1:-$HOME/.cache/slmkit/llama.cpp}
# Absolute: the script changes directory before it runs pip.
PYTHON=${PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
mkdir -p "$DIR" && cd "$DIR"
if [ ! -d "llama_cpp_python-$VERSION" ]; then
  "$PYTHON" -m pip download --no-deps --no-binary=:all: "llama-cpp-python==$VERSION" >/dev/null
  tar xzf "llama_cpp_python-$VERSION.tar.gz"
fi
cd "llama_cpp_python-$VERSION/vendor/llama.cpp"
flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
on() { [[ "$flags" == *" $1 "* ]] && echo ON || echo OFF; }
cmake -B build -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DGGML_NATIVE=OFF \
  -DGGML_AVX="$(on avx)" -DGGML_AVX2="$(on avx2)" -DGGML_FMA="$(on fma)" -DGGML_F16C="$(on f16c)" \
  -DGGML_BMI2="$(on bmi2)" -DGGML_AVX512="$(on avx512f)" -DGGML_AVX512_VNNI="$(on avx512_vnni)" \
  -DGGML_AVX512_BF16="$(on avx512_bf16)" -DGGML_AVX_VNNI="$(on avx_vnni)" >/dev/null
cmake --build build --target llama-server llama-quantize llama-perplexity -j"$(nproc)" >/dev/null
echo "export LLAMA_SERVER=$PWD/build/bin/llama-server"
