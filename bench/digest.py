"""The outputs of the conversions and quantizations the tests run, as SHA-256 digests: run it at two commits
and compare, to show that a change which should not alter any output does not.

    python bench/digest.py OUTDIR > digests.json     (uses the `mxtools` on PATH)

Covers: convert to GGUF f16 / q8_0 / q4_k_m (with and without an importance matrix), to the Mistral layout and
back to HF, a GPTQ quantize, a quantize --to gguf and an imatrix, all from the bundled model. Reports with
timings in them (quantize_report.json) are left out; everything else is hashed byte for byte. Every path is
relative to OUTDIR (outputs record their sources' paths), so two checkouts in different folders compare equal.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

JOBS = [
    ["example", "ex"],  # the positional OUT every version takes
    ["convert", "ex/model", "--to", "gguf", "--outtype", "f16", "-o", "f16.gguf"],
    ["convert", "ex/model", "--to", "gguf", "--outtype", "q8_0", "-o", "q8_0.gguf"],
    ["convert", "ex/model", "--to", "gguf", "--outtype", "q4_k_m", "-o", "q4_k_m.gguf"],
    ["convert", "ex/model", "--to", "mistral", "-o", "mistral"],
    ["convert", "mistral", "--to", "hf", "-o", "hf"],
    ["imatrix", "ex/model", "--text", "ex/calib.txt", "--chunks", "4", "-o", "imatrix.gguf"],
    ["convert", "ex/model", "--to", "gguf", "--outtype", "q4_k_m", "--imatrix", "imatrix.gguf",
     "-o", "q4_k_m-imatrix.gguf"],
    ["quantize", "ex/model", "--calib", "ex/calib.txt", "--nsamples", "16", "-o", "gptq"],
    ["quantize", "ex/model", "--to", "gguf", "--outtype", "q3_k_m", "--calib", "ex/calib.txt", "--nsamples", "16",
     "-o", "gguf-gptq.gguf"],
]
SKIP = {"quantize_report.json"}


def digests(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name not in SKIP):
        out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="a new scratch directory (replaced)")
    ap.add_argument("--mxtools", default="mxtools", help="the command to run")
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    for job in JOBS:
        # run inside OUT with relative paths: outputs record their sources' paths, which then match across runs
        subprocess.run([args.mxtools, *job], check=True, cwd=args.out, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        print(" ".join(job[:2]), file=sys.stderr)
    json.dump(digests(args.out), sys.stdout, indent=1)


if __name__ == "__main__":
    main()
