"""Conversion benchmark: mxtools convert vs llama.cpp's convert_hf_to_gguf.py on the same input, same run.

Input: `mxtools synth --preset 8x7b --layers 2` (6.3 GB bf16). Prints a markdown table and writes
bench/out/convert.json. Run by `make bench`."""
from __future__ import annotations

import json
import shutil

from common import OUT, PY, llama_cpp_source, synth_8x7b_2layers, timed


def main(outtypes=("f16", "bf16", "q8_0")):
    src = synth_8x7b_2layers()
    llama = llama_cpp_source()
    env = {"PYTHONPATH": str(llama / "gguf-py"), "NO_LOCAL_GGUF": ""}
    rows = []
    for outtype in outtypes:
        theirs = OUT / f"llama-{outtype}.gguf"
        ours = OUT / f"ours-{outtype}.gguf"
        t = timed([PY, llama / "convert_hf_to_gguf.py", src, "--outtype", outtype, "--outfile", theirs], env)
        o = timed([PY, "-m", "mxtools.cli", "convert", src, "--to", "gguf", "--outtype", outtype, "-o", ours,
                   "--force"])
        rows.append({"job": f"HF bf16 -> GGUF {outtype}", "ours": o, "llama.cpp": t,
                     "time_ratio": round(o["wall_s"] / t["wall_s"], 3), "size_ours": ours.stat().st_size,
                     "size_llama.cpp": theirs.stat().st_size})
        theirs.unlink()
        ours.unlink()
    m = timed([PY, "-m", "mxtools.cli", "convert", src, "--to", "mistral", "-o", OUT / "ours-mistral", "--force"])
    rows.append({"job": "HF bf16 -> Mistral", "ours": m})
    shutil.rmtree(OUT / "ours-mistral")
    (OUT / "convert.json").write_text(json.dumps(rows, indent=2))
    print("| job | mxtools wall s | mxtools peak RSS MB | llama.cpp wall s | llama.cpp peak RSS MB | time ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        t = r.get("llama.cpp", {})
        print(f"| {r['job']} | {r['ours']['wall_s']} | {r['ours']['peak_rss_mb']} | {t.get('wall_s', '-')} | "
              f"{t.get('peak_rss_mb', '-')} | {r.get('time_ratio', '-')} |")


if __name__ == "__main__":
    main()
