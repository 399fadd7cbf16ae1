"""One-pass quantization benchmark: `mxtools convert --to gguf --outtype MIX` straight from the HF bf16 model,
against llama.cpp's two steps (convert_hf_to_gguf.py to f16, then llama-quantize with 2 threads), same input,
same run. Input: `synth --preset 8x7b --layers 2` (6.3 GB). Byte identity is checked against llama-quantize of
llama.cpp's bf16 GGUF (the lossless route; its f16 route rounds bf16 weights first). Writes bench/out/quantize.json."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from common import OUT, PY, llama_cpp_source, synth_8x7b_2layers, timed

MIXES = ("q4_k_m", "q4_0", "q8_0")


def llama_quantize() -> Path:
    """The llama-quantize built with the venv's llama-cpp-python (tools/llama_cpp.sh): site-packages/bin."""
    out = subprocess.run([PY, "-c", "import llama_cpp; print(llama_cpp.__file__)"], check=True, capture_output=True,
                         text=True)
    return Path(out.stdout.strip()).parents[1] / "bin" / "llama-quantize"


def same_tensors(a: Path, b: Path) -> bool:
    """Every tensor of a and b has the same name, type, shape and bytes (metadata may differ)."""
    import numpy as np
    from gguf import GGUFReader
    ta, tb = ({t.name: t for t in GGUFReader(p).tensors} for p in (a, b))
    if sorted(ta) != sorted(tb) or any((ta[n].tensor_type, list(ta[n].shape)) != (tb[n].tensor_type, list(tb[n].shape))
                                       for n in ta):
        return False
    return all(np.array_equal(ta[n].data.view(np.uint8), tb[n].data.view(np.uint8)) for n in ta)


def main():
    src = synth_8x7b_2layers()
    llama, quantize = llama_cpp_source(), llama_quantize()
    env = {"PYTHONPATH": str(llama / "gguf-py")}
    f16, bf16 = OUT / "llama-f16.gguf", OUT / "llama-bf16.gguf"
    conv = timed([PY, llama / "convert_hf_to_gguf.py", src, "--outtype", "f16", "--outfile", f16], env)
    conv_bf = timed([PY, llama / "convert_hf_to_gguf.py", src, "--outtype", "bf16", "--outfile", bf16], env)
    rows = []
    for mix in MIXES:
        theirs, theirs_bf, ours = OUT / f"llama-{mix}.gguf", OUT / f"llama-bf16-{mix}.gguf", OUT / f"ours-{mix}.gguf"
        q = timed([quantize, f16, theirs, mix.upper(), "2"])
        q_bf = timed([quantize, bf16, theirs_bf, mix.upper(), "2"])
        o = timed([PY, "-m", "mxtools.cli", "convert", src, "--to", "gguf", "--outtype", mix, "-o", ours, "--force"],
                  {"OMP_NUM_THREADS": "2"})
        rows.append({"mix": mix, "ours_one_pass": o, "llama_convert_f16": conv, "llama_quantize": q,
                     "llama_convert_bf16": conv_bf, "llama_quantize_from_bf16": q_bf,
                     "ratio_vs_quantize_alone": round(o["wall_s"] / q["wall_s"], 3),
                     "ratio_vs_two_steps": round(o["wall_s"] / (q["wall_s"] + conv["wall_s"]), 3),
                     # bf16 -> f16 rounds small weights, so only the lossless bf16 route can match byte for byte
                     "identical_to_bf16_route": same_tensors(ours, theirs_bf),
                     "identical_to_f16_route": same_tensors(ours, theirs)})
        print(rows[-1], flush=True)
        for p in (theirs, theirs_bf, ours):
            p.unlink()
    f16.unlink()
    bf16.unlink()
    (OUT / "quantize.json").write_text(json.dumps(rows, indent=2))
    print("| mix | mxtools one pass s (RSS MB) | llama.cpp convert f16 s (RSS MB) | llama-quantize f16 s (RSS MB) | "
          "ratio vs quantize alone | ratio vs both steps | llama-quantize bf16 s | identical to bf16 route |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        o, c, q = r["ours_one_pass"], r["llama_convert_f16"], r["llama_quantize"]
        print(f"| {r['mix']} | {o['wall_s']} ({o['peak_rss_mb']}) | {c['wall_s']} ({c['peak_rss_mb']}) | "
              f"{q['wall_s']} ({q['peak_rss_mb']}) | {r['ratio_vs_quantize_alone']} | {r['ratio_vs_two_steps']} | "
              f"{r['llama_quantize_from_bf16']['wall_s']} | {r['identical_to_bf16_route']} |")


if __name__ == "__main__":
    main()
