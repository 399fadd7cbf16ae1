"""AutoRound (auto-round 0.16.1, its defaults) beside our GPTQ on the bundled tiny Mixtral, judged alike.

AutoRound runs in its own virtual environment (--venv, default /work/venvs/autoround: auto-round 0.16.1 beside
torch 2.13.0 and transformers 5.25), in a child process, on the very token ids our pipeline calibrates on
(mxtools.quant.gptq_pipeline.make_samples: 128 windows of 2047 tokens, each after BOS, spread evenly over the
tokenized calib.txt), given as its `dataset` argument (a list of [1, seqlen] id tensors: no network). Its
settings are its defaults (W4A16 sym, group size 128, 200 iterations per block, torch.compile as it decides),
on CPU, saved as GPTQ v1 (`format="auto_gptq"`). Its tensor names are mapped to ours (bytes untouched) and the
result is judged exactly as bench/gptqmodel_compare.py judges its rows: `mxtools verify` on both held-out texts
(EVAL_TEXTS: every 512-token chunk) against the bf16 reference's log-probs, saved once per text. AutoRound's
checkpoint is kept under bench/out/autoround_compare/ and reused with --reuse (it takes 20+ minutes here).

    python bench/autoround_compare.py [--rows NAME,...] [--reuse] [--nsamples N --seqlen L --iters I]  # small: smoke
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

from common import OUT, ROOT, timed
from gptqmodel_compare import THREADS, calibration_samples, mxtools_quantize, our_log
from judge import judge_row, keep_row, write_table

sys.path.insert(0, str(ROOT))
from mxtools.core.bundled import MODEL

WORK = OUT / "autoround_compare"
VENV_PY = Path("/work/venvs/autoround/bin/python")

# The child: load the bf16 model on CPU, AutoRound with its defaults on our samples, save GPTQ v1.
AUTOROUND_SCRIPT = """
import json, sys, time, torch
import auto_round
from auto_round import AutoRound
from transformers import AutoModelForCausalLM, AutoTokenizer
src, samples, out, info, extra, threads = sys.argv[1:7]
torch.set_num_threads(int(threads))
extra = json.loads(extra)
ids = [r.unsqueeze(0) for r in torch.load(samples)]
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
tok = AutoTokenizer.from_pretrained(src)
t = time.perf_counter()
ar = AutoRound(model, tok, dataset=ids, nsamples=len(ids), seqlen=ids[0].shape[1], device_map="cpu", **extra)
ar.quantize_and_save(out, format="auto_gptq")
secs = time.perf_counter() - t
json.dump({"quantize_call_s": round(secs, 2), "version": auto_round.__version__, "settings": extra},
          open(info, "w"))
"""

# AutoRound's Mixtral names -> ours: each expert's projections are called gate/up/down_proj.
EXPERT_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
THEIR_EXPERT = re.compile(r"\.block_sparse_moe\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.")


def our_name(key: str) -> str:
    """`...block_sparse_moe.experts.3.gate_proj.qweight` -> `...block_sparse_moe.experts.3.w1.qweight`."""
    return THEIR_EXPERT.sub(lambda m: f".block_sparse_moe.experts.{m[1]}.{EXPERT_NAMES[m[2]]}.", key)


def autoround_quantize(samples: Path, raw: Path, venv_py: Path, **settings) -> dict:
    """AutoRound in a child process of its own venv; wall, CPU seconds and peak RSS of the whole child."""
    shutil.rmtree(raw, ignore_errors=True)
    info = WORK / f"{raw.name}-run.json"
    t = timed([venv_py, "-c", AUTOROUND_SCRIPT, MODEL, samples, raw, info, json.dumps(settings),
               THREADS["OMP_NUM_THREADS"]], THREADS)
    return {**t, **json.loads(info.read_text())}


def to_our_layout(raw: Path, dst: Path) -> int:
    """AutoRound's output directory (a `<model>-w4g128` folder inside `raw`) with our tensor names and our
    tokenizer.model; tensors byte-identical."""
    from safetensors.torch import load_file, save_file
    src = next(p.parent for p in raw.rglob("config.json"))
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    shutil.copy(MODEL / "tokenizer.model", dst / "tokenizer.model")
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update({our_name(k): v for k, v in load_file(f).items()})
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return len(tensors)


# Every row: (label, who, settings). Ours: `mxtools quantize` options; AutoRound: AutoRound() keyword overrides.
ROWS = {
    "ours-int4-g128": ("mxtools GPTQ int4 g128 (defaults)", "ours", []),
    "ours-int4-g128-notune": ("mxtools GPTQ int4 g128 without block-output reconstruction", "ours",
                              ["--recipe", "gptq-int4-g128-notune"]),
    "autoround-int4-g128": ("AutoRound 0.16.1 int4 g128 (its defaults: 200 iterations)", "autoround", {}),
}


def quantize(name: str, args) -> tuple[Path, dict, dict]:
    """One row's quantization, timed: (our-layout directory, timing, what the quantizer logged)."""
    _, who, settings = ROWS[name]
    if who == "ours":
        out = WORK / name
        timing = mxtools_quantize(out, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), *settings)
        return out, timing, our_log(out)
    raw = WORK / f"{name}-raw"
    extra = {**settings, **({"iters": args.iters} if args.iters is not None else {})}
    timing = autoround_quantize(WORK / "calib_samples.pt", raw, Path(args.venv), **extra)
    timing["tensors"] = to_our_layout(raw, WORK / name)
    return WORK / name, timing, {"config": json.loads((WORK / name / "quantization_config.json").read_text())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=None, help="AutoRound's iterations per block (default: its own)")
    ap.add_argument("--venv", default=str(VENV_PY), help="the Python of AutoRound's virtual environment")
    ap.add_argument("--reuse", action="store_true", help="judge a row's kept quantization again, do not redo it")
    ap.add_argument("--quantize-only", action="store_true", help="quantize (and keep) the rows, judge nothing")
    args = ap.parse_args()
    (WORK / "rows").mkdir(parents=True, exist_ok=True)
    calibration = calibration_samples(args.nsamples, args.seqlen, WORK / "calib_samples.pt")
    for name in args.rows.split(","):
        done = WORK / "rows" / f"{name}-quantize.json"
        if args.reuse and done.exists():
            path, (timing, log) = WORK / name, json.loads(done.read_text())
        else:
            path, timing, log = quantize(name, args)
            done.write_text(json.dumps([timing, log], default=str))
        if args.quantize_only:
            continue
        result = {**judge_row(ROWS[name][0], path, WORK, name, timing), "row": name, "quantize_log": log,
                  "calibration": calibration}
        keep_row(WORK, name, result)
    write_table(WORK, ROWS)


if __name__ == "__main__":
    main()
