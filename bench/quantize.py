"""One-pass quantization benchmark: `mxtools convert --to gguf --outtype MIX` straight from the HF bf16 model,
against llama.cpp's two steps (convert_hf_to_gguf.py to f16, then llama-quantize with 2 threads), same input,
same run. Input: `synth --preset 8x7b --layers 2` (6.3 GB). Writes bench/out/quantize.json."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from common import OUT, PY, ROOT, llama_cpp_source, synth_8x7b_2layers, timed

MIXES = ("q4_k_m", "q4_0", "q8_0")


def llama_quantize() -> Path:
    out = subprocess.run(["bash", str(ROOT / "tools" / "llama_cpp_tools.sh")], check=True, capture_output=True,
                         text=True, env={**os.environ, "PYTHON": PY})
    return Path(out.stdout.strip()) / "llama-quantize"


def same_tensors(a: Path, b: Path) -> bool:
    """Every tensor of a and b has the same name, type, shape and bytes (metadata may differ)."""
    import numpy as np
    from gguf import GGUFReader
    ta, tb = GGUFReader(a).tensors, GGUFReader(b).tensors
    if [(t.name, t.tensor_type, list(t.shape)) for t in ta] != [(t.name, t.tensor_type, list(t.shape)) for t in tb]:
        return False
    return all(np.array_equal(x.data.view(np.uint8), y.data.view(np.uint8)) for x, y in zip(ta, tb))


def main():
    src = synth_8x7b_2layers()
    llama, quantize = llama_cpp_source(), llama_quantize()
    f16 = OUT / "llama-f16.gguf"
    conv = timed([PY, llama / "convert_hf_to_gguf.py", src, "--outtype", "f16", "--outfile", f16],
                 {"PYTHONPATH": str(llama / "gguf-py")})
    rows = []
    for mix in MIXES:
        theirs, ours = OUT / f"llama-{mix}.gguf", OUT / f"ours-{mix}.gguf"
        q = timed([quantize, f16, theirs, mix.upper(), "2"])
        o = timed([PY, "-m", "mxtools.cli", "convert", src, "--to", "gguf", "--outtype", mix, "-o", ours, "--force"],
                  {"OMP_NUM_THREADS": "2"})
        rows.append({"mix": mix, "ours_one_pass": o, "llama_convert_f16": conv, "llama_quantize": q,
                     "ratio_vs_quantize_alone": round(o["wall_s"] / q["wall_s"], 3),
                     "ratio_vs_two_steps": round(o["wall_s"] / (q["wall_s"] + conv["wall_s"]), 3),
                     "byte_identical_tensors": same_tensors(ours, theirs)})
        print(rows[-1], flush=True)
        theirs.unlink()
        ours.unlink()
    f16.unlink()
    (OUT / "quantize.json").write_text(json.dumps(rows, indent=2))
    print("| mix | mxtools one pass s (RSS MB) | llama.cpp convert f16 s (RSS MB) | llama-quantize s (RSS MB) | "
          "ratio vs quantize alone | ratio vs both steps | tensors byte-identical |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        o, c, q = r["ours_one_pass"], r["llama_convert_f16"], r["llama_quantize"]
        print(f"| {r['mix']} | {o['wall_s']} ({o['peak_rss_mb']}) | {c['wall_s']} ({c['peak_rss_mb']}) | "
              f"{q['wall_s']} ({q['peak_rss_mb']}) | {r['ratio_vs_quantize_alone']} | {r['ratio_vs_two_steps']} | "
              f"{r['byte_identical_tensors']} |")


if __name__ == "__main__":
    main()
