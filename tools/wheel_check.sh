#!/usr/bin/env bash
# The package as users install it: build the wheel, install it (not editable) into a fresh virtual environment
# with nothing but its own dependencies, and run from it, outside the checkout, what the README documents:
# `mxtools example`, a q4_k_m conversion, a small GPTQ quantize and `verify` of both against the reference.
# Environment: PYTHON (default .venv/bin/python, used to build the wheel), WORK (default: a new temporary folder).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
WORK="${WORK:-$(mktemp -d)}"
mkdir -p "$WORK"
echo "wheel check in $WORK" >&2

"$PY" -m pip wheel -q --no-deps . -w "$WORK/dist"
python3 -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q torch==2.13.0
"$VPY" -m pip install -q "$WORK"/dist/mxtools-*.whl

cd "$WORK"  # nothing of the checkout is importable from here
MX="$WORK/venv/bin/mxtools"
"$VPY" -c 'import mxtools, sys; sys.exit("mxtools imported from the checkout" if "site-packages" not in mxtools.__file__ else 0)'
"$MX" example -o ex
test -f ex/model/tokenizer.json
"$MX" convert ex/model --to gguf --outtype q4_k_m -o q4_k_m.gguf
"$MX" quantize ex/model --recipe gptq-int4-g128 --calib ex/calib.txt --nsamples 4 --seqlen 256 -o gptq
for artifact in q4_k_m.gguf gptq; do
    "$MX" verify "$artifact" --reference ex/model --text ex/eval.txt --chunks 4 --json "$artifact.json"
done
echo "wheel check passed: $WORK" >&2
