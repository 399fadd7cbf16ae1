"""The main job on the bundled tiny trained Mixtral: convert it to GGUF f16, GGUF q8_0, GGUF q4_k_m and the Mistral
layout, quantize it with GPTQ int4 g128, verify each artifact against the reference, and print one table.
Run by `make demo`.

    python examples/demo.py OUT_DIR [--chunks N]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mxtools.commands.convert import convert, write_checkpoint
from mxtools.commands.example import write_example
from mxtools.commands.quantize import QuantizeSettings, run_quantize
from mxtools.commands.synth import synth_checkpoint, synth_spec
from mxtools.commands.verify import VerifySettings, run_verify
from mxtools.core.bundled import CALIB, EVAL, MODEL

ARTIFACTS = [("gguf", "f16", "model-f16.gguf"), ("gguf", "q8_0", "model-q8_0.gguf"),
             ("gguf", "q4_k_m", "model-q4_k_m.gguf"), ("mistral", "bf16", "mistral"),
             ("gptq", "int4", "gptq-int4-g128")]


def make(ref: Path, layout: str, outtype: str, out: Path) -> Path:
    if layout == "gptq":  # calibrated on the held-out text's sibling, the bundled calibration text
        run_quantize(ref, out, QuantizeSettings(calib=CALIB, bits=4, group_size=128, nsamples=16, seqlen=2048,
                                                force=True))
        return out
    return convert(ref, layout, out, outtype, force=True)


def size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--chunks", type=int, default=16, help="512-token chunks of the held-out text to score "
                    "(16: 4096 scored tokens, same_top_p to about 0.3%)")
    args = ap.parse_args(argv)
    if (MODEL / "model.safetensors").exists():
        write_example(args.out, force=True)
    else:  # a checkout without the trained weights: run the same pipeline on a random model
        args.out.mkdir(parents=True, exist_ok=True)
        write_checkpoint(synth_checkpoint(synth_spec("tiny")), "hf", args.out / "model", "bf16", force=True)
        (args.out / "eval.txt").write_text(EVAL.read_text())
    ref = args.out / "model"
    base = args.out / "reference.base"  # the reference's log-probs, computed with the first artifact and reused
    rows = []
    for i, (layout, outtype, name) in enumerate(ARTIFACTS):
        out = make(ref, layout, outtype, args.out / name)
        reference, against = (ref, dict(save_base=base)) if i == 0 else (None, dict(base=base))
        r = run_verify(out, reference, VerifySettings(text=args.out / "eval.txt", ctx=512, chunks=args.chunks,
                                                      **against))
        rows.append((name, size(out), r))
        print(f"verified {name}: {'PASSED' if r['passed'] else 'FAILED ' + ', '.join(r['failures'])}",
              file=sys.stderr)
    print(f"\nreference: {ref} ({size(ref) / 2**20:.1f} MiB), held-out text: {args.chunks} chunks of 512 tokens\n")
    print(f"{'artifact':<18}{'size MiB':>10}{'PPL':>10}{'ratio':>10}{'mean KLD':>12}{'same top':>10}  verdict")
    for name, nbytes, r in rows:
        print(f"{name:<18}{nbytes / 2**20:>10.1f}{r['ppl']:>10.2f}{r['ppl_ratio']:>10.5f}{r['kld_mean']:>12.3e}"
              f"{r['same_top_p']:>10.4f}  {'PASS' if r['passed'] else 'FAIL'}")
    return 0 if all(r["passed"] for _, _, r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
