#!/usr/bin/env bash
# make gpu-check: runs on a CUDA machine with the system's CUDA PyTorch (never the CPU venv). Packages missing
# there (gguf, mistral-common) come as wheels in .whl/ (see docs/BENCHMARKS.md) and are unpacked to /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 bench/gpu_check.py "$@"
