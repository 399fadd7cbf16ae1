"""llama.cpp's i-quant mixes: `mxtools convert` against `llama-quantize`, same source, same threads, same run.

Input: `synth --preset 8x7b --layers 2` (6.3 GB bf16, real per-layer widths 4096 and 14336), or with `--small` a
narrower 8-expert model (2 layers, hidden 1024, expert width 3584: a quarter of each width, 0.5 GB) for a quicker
run, and its f16 GGUF (llama.cpp's own converter). The importance matrix is llama-imatrix's, over a few chunks of
the bundled calibration text, so every expert has one. For each mix: llama-quantize from the f16 GGUF, mxtools from
the same f16 GGUF (throughput of the quantizer alone), and mxtools in one pass from the HF directory (against
llama.cpp's two steps); every tensor of mxtools' f16-GGUF output is compared with llama-quantize's, byte for byte.
Writes bench/out/iquants-MODEL.json and prints the table docs/BENCHMARKS.md holds.

    python bench/iquants.py [--mixes iq2_xs,iq4_xs] [--threads 2] [--small | --layers 1]
"""
from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from common import OUT, PY, llama_cpp_source, print_table, synth_8x7b_2layers, timed
from quantize import llama_quantize, same_tensors

MIXES = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "iq3_s", "iq3_m", "iq4_nl",
         "iq4_xs")


def llama_imatrix(f16: Path, out: Path, threads: int) -> Path:
    """llama-imatrix over 8 chunks of 128 tokens of the bundled calibration text (every expert is reached)."""
    from mxtools.core.bundled import CALIB
    tool = llama_quantize().with_name("llama-imatrix")
    if not out.exists():
        subprocess.run([tool, "-m", f16, "-f", CALIB, "-o", out, "-c", "128", "--chunks", "8", "-t", str(threads)],
                       check=True, capture_output=True)
    return out


def small_model() -> Path:
    """An 8-expert Mixtral with a quarter of 8x7B's widths (hidden 1024, expert width 3584), 2 layers, bf16."""
    path = OUT / "synth-small-2L"
    if not path.exists():
        subprocess.run([PY, "-m", "mxtools.cli", "synth", "--preset", "8x7b", "--layers", "2", "--hidden", "1024",
                        "--intermediate", "3584", "--heads", "8", "--kv-heads", "2", "-o", str(path)], check=True)
    return path


def full_model(layers: int) -> Path:
    """8x7B's real widths with `layers` layers (2: the model the other benchmarks share)."""
    if layers == 2:
        return synth_8x7b_2layers()
    path = OUT / f"synth-8x7b-{layers}L"
    if not path.exists():
        subprocess.run([PY, "-m", "mxtools.cli", "synth", "--preset", "8x7b", "--layers", str(layers), "-o", str(path)],
                       check=True)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mixes", default=",".join(MIXES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="a quarter of 8x7B's widths instead of the real ones")
    ap.add_argument("--layers", type=int, default=2, help="layers of the real-width model (not with --small)")
    args = ap.parse_args()
    src = small_model() if args.small else full_model(args.layers)
    llama, quantize = llama_cpp_source(), llama_quantize()
    f16 = OUT / "llama-f16.gguf"
    conv = timed([PY, llama / "convert_hf_to_gguf.py", src, "--outtype", "f16", "--outfile", f16],
                 {"PYTHONPATH": str(llama / "gguf-py")})
    imat = llama_imatrix(f16, OUT / f"imatrix-{src.name}.gguf", args.threads)
    threads = {"OMP_NUM_THREADS": str(args.threads)}
    rows = []
    for mix in args.mixes.split(","):
        theirs, ours, one = OUT / f"llama-{mix}.gguf", OUT / f"ours-{mix}.gguf", OUT / f"ours-hf-{mix}.gguf"
        q = timed([quantize, "--imatrix", imat, f16, theirs, mix.upper(), str(args.threads)])
        o = timed([PY, "-m", "mxtools.cli", "convert", f16, "--to", "gguf", "--outtype", mix, "--imatrix", imat,
                   "-o", ours, "--force"], threads)
        h = timed([PY, "-m", "mxtools.cli", "convert", src, "--to", "gguf", "--outtype", mix, "--imatrix", imat,
                   "-o", one, "--force"], threads)
        rows.append({"mix": mix, "llama_quantize": q, "ours_from_f16": o, "ours_one_pass": h, "llama_convert": conv,
                     "speedup_vs_quantize": round(q["wall_s"] / o["wall_s"], 2),
                     "one_pass_vs_two_steps": round(h["wall_s"] / (q["wall_s"] + conv["wall_s"]), 3),
                     "identical": same_tensors(ours, theirs)})
        print(rows[-1], flush=True)
        for p in (theirs, ours, one):
            p.unlink()
    f16.unlink()
    (OUT / f"iquants-{src.name}.json").write_text(json.dumps(rows, indent=2))
    print_table(["mix", "llama-quantize s (RSS MB)", "mxtools from f16 s (RSS MB)", "speed-up",
                 "mxtools one pass from HF s (RSS MB)", "one pass / (convert + quantize)", "identical bytes"],
                [[r["mix"], f"{r['llama_quantize']['wall_s']} ({r['llama_quantize']['peak_rss_mb']})",
                  f"{r['ours_from_f16']['wall_s']} ({r['ours_from_f16']['peak_rss_mb']})", r["speedup_vs_quantize"],
                  f"{r['ours_one_pass']['wall_s']} ({r['ours_one_pass']['peak_rss_mb']})", r["one_pass_vs_two_steps"],
                  r["identical"]] for r in rows])


if __name__ == "__main__":
    main()
