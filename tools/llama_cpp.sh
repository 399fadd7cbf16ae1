#!/usr/bin/env bash
# The judges of our GGUF files, from ONE build of llama.cpp: the llama-cpp-python wheel (Python bindings) built
# with llama.cpp's tools switched on, so the same wheel also carries llama-quantize and llama-imatrix (installed
# as site-packages/bin/, linked against the wheel's own site-packages/lib/). The wheel is cached; prints its path.
#
# Portable x86-64 flags rather than -march=native: a CPU may advertise AMX that the hypervisor does not enable,
# and a native build then dies with "Illegal instruction" on Q8_0 models.
# LLAVA_BUILD=OFF: with the tools on, llama.cpp builds tools/mtmd itself (the bindings load it only for llava).
# Environment: PYTHON (default python3 on PATH), MXTOOLS_CACHE (default ~/.cache/mxtools), JOBS (default: all cores).
set -euo pipefail

VERSION=0.3.36
WHEELS="${MXTOOLS_CACHE:-$HOME/.cache/mxtools}/llama-cpp-python-$VERSION-tools"
PY="${PYTHON:-python3}"

wheel() { ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -1; }

if [ -z "$(wheel)" ]; then
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_TOOLS_INSTALL=ON -DLLAMA_BUILD_SERVER=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DCMAKE_INSTALL_RPATH=\$ORIGIN/../lib" \
    CMAKE_BUILD_PARALLEL_LEVEL="${JOBS:-$(nproc)}" \
        "$PY" -m pip wheel -q --no-cache-dir --no-deps "llama-cpp-python==$VERSION" -w "$WHEELS" >&2
fi
wheel
