#!/usr/bin/env bash
# Build llama.cpp's llama-quantize and llama-imatrix (CPU only) from the llama.cpp vendored in the
# llama-cpp-python sdist, so tests judge our quantizer and imatrix files against the same llama.cpp the
# Python bindings run. Prints the bin directory; does nothing but print it when both binaries exist.
#
# Portable x86-64 flags rather than -march=native: this VM's CPU advertises AMX that the hypervisor does
# not enable, and a native build dies with "Illegal instruction".
# Environment: PYTHON (default: python3 on PATH), MXTOOLS_CACHE (default ~/.cache/mxtools), JOBS (default 2).
set -euo pipefail

VERSION=0.3.36
PREFIX="${MXTOOLS_CACHE:-$HOME/.cache/mxtools}/llama.cpp-$VERSION"
BIN="$PREFIX/bin"
TARGETS=(llama-quantize llama-imatrix)

if [ -x "$BIN/llama-quantize" ] && [ -x "$BIN/llama-imatrix" ]; then
    echo "$BIN"
    exit 0
fi

PY="${PYTHON:-python3}"
WORK="$PREFIX/work"
mkdir -p "$WORK"

# The sources are fetched with pip (the pip cache usually has them) and never copied into the repository.
SDIST="$WORK/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
    "$PY" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK" >&2
fi
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
[ -d "$SRC" ] || tar xzf "$SDIST" -C "$WORK"

cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF >&2
cmake --build "$WORK/build" --target "${TARGETS[@]}" -j "${JOBS:-2}" >&2

mkdir -p "$BIN"
for t in "${TARGETS[@]}"; do
    install -m 755 "$WORK/build/bin/$t" "$BIN/$t"
done
rm -rf "$WORK"  # the build tree is ~1 GB of objects; the two static binaries are all we keep
echo "$BIN"
