"""Our GPTQ against GPTQModel's on the bundled tiny Mixtral, same calibration tokens, same evaluation.

Each row quantizes mxtools/assets/tiny-mixtral once: `mxtools quantize` with its defaults (int4 g128) and at
int8 and at group size -1, RTN int4 g128, and GPTQModel 7.6 with its own defaults (damp 0.05, act_group_aware)
at the same three settings (GPTQ sym, desc_act False, on CPU, in a child process: importing it patches
transformers' Mixtral; at group size -1 with act_group_aware off, which GPTQModel refuses there). GPTQModel is
fed the very token ids our pipeline calibrates on (mxtools.quant.gptq_pipeline.make_samples: 128 windows of
2047 tokens, each after BOS, spread evenly over the tokenized calib.txt), as input_ids + all-ones
attention_mask, batch 1; its settings are recorded in the JSON. Its outputs are renamed to our tensor names
(bytes untouched) and every output is judged by bench/judge.py: `mxtools verify` on both bundled held-out texts
(Wikipedia, the calibration domain, and fiction; every 512-token chunk) against the bf16 reference's log-probs,
saved once per text and reused for every row; ratios paired over chunks. Both sides run with
--threads threads (default 2; the quantized bytes, hence the KLDs, depend on it through float summation order,
so compare rows run at the same count). Each row's result is kept in bench/out/gptqmodel_compare/rows/ (so rows can be
run apart, --rows) and the table of all kept rows is written to bench/out/gptqmodel_compare.json.

    python bench/gptqmodel_compare.py [--rows NAME,...] [--threads T] [--nsamples N --seqlen L]   # small N, L: smoke
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import sys
from pathlib import Path

import judge
import torch
from common import OUT, PY, ROOT, timed
from judge import judge_row, keep_row, write_table

sys.path.insert(0, str(ROOT))
from mxtools.core.bundled import CALIB, MODEL
from mxtools.layouts import open_checkpoint
from mxtools.quant.gptq_pipeline import make_samples

WORK = OUT / "gptqmodel_compare"
THREADS = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}

# The child: load the bf16 model on CPU, quantize on our samples, save (GPTQ v1, transformers-5 names).
GPTQMODEL_SCRIPT = """
import json, sys, time, torch
from gptqmodel import GPTQModel, QuantizeConfig
import gptqmodel
src, samples, out, info, extra, threads = sys.argv[1:7]
torch.set_num_threads(int(threads))
ids = torch.load(samples)
calib = [{"input_ids": r.unsqueeze(0), "attention_mask": torch.ones_like(r).unsqueeze(0)} for r in ids]
qc = QuantizeConfig(sym=True, desc_act=False, **json.loads(extra))
model = GPTQModel.load(src, qc, device="cpu", dtype=torch.bfloat16)
t = time.perf_counter()
model.quantize(calib, batch_size=1)
secs = time.perf_counter() - t
model.save(out)
json.dump({"quantize_call_s": round(secs, 2), "version": gptqmodel.__version__, "settings": json.loads(extra)},
          open(info, "w"))
"""

# GPTQModel (transformers 5 module names) -> ours; the router and each expert's three projections.
EXPERT_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
THEIR_MOE = re.compile(r"\.mlp\.(?:gate|experts\.(\d+)\.(gate_proj|up_proj|down_proj))\.")


def our_name(key: str) -> str:
    """`model.layers.i.mlp.experts.e.gate_proj.qweight` -> `model.layers.i.block_sparse_moe.experts.e.w1.qweight`."""
    def sub(m):
        if m[1] is None:
            return ".block_sparse_moe.gate."
        return f".block_sparse_moe.experts.{m[1]}.{EXPERT_NAMES[m[2]]}."
    return THEIR_MOE.sub(sub, key)


def calibration_samples(nsamples: int, seqlen: int, path: Path) -> dict:
    """Our calibration samples exactly as `mxtools quantize` builds them, saved for the GPTQModel child."""
    with open_checkpoint(MODEL) as ckpt:
        tokens = ckpt.tokenizer.encode(CALIB.read_text(encoding="utf-8"), bos=False)
        samples, info = make_samples(tokens, nsamples, seqlen, ckpt.tokenizer.bos_id)
    torch.save(samples, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)  # atomic: a GPTQModel child of another run may be reading it
    return info


def mxtools_quantize(out: Path, *args: str) -> dict:
    return timed([PY, "-m", "mxtools.cli", "quantize", MODEL, "-o", out, "--force", "--device", "cpu", *args],
                 {**THREADS, "PYTHONPATH": str(ROOT)})


def gptqmodel_quantize(samples: Path, raw: Path, **settings) -> dict:
    """Run GPTQModel in a child process (QuantizeConfig overrides in `settings`); wall time and peak RSS of the
    whole child, plus the seconds of its quantize() call alone."""
    shutil.rmtree(raw, ignore_errors=True)
    info = WORK / f"{raw.name}-run.json"
    n = THREADS["OMP_NUM_THREADS"]
    workers = str(max(2, int(n)))  # GPTQModel 7.6 refuses fewer than 2 CPU workers (its model loader pool wants 2)
    t = timed([PY, "-c", GPTQMODEL_SCRIPT, MODEL, samples, raw, info, json.dumps(settings), n],
              {**THREADS, "GPTQMODEL_CPU_WORKERS": workers})
    return {**t, **json.loads(info.read_text())}


def to_our_layout(raw: Path, dst: Path) -> int:
    """GPTQModel's directory with our tensor names (tensors byte-identical) and our tokenizer.model added."""
    from safetensors.torch import load_file, save_file
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(raw, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    shutil.copy(MODEL / "tokenizer.model", dst / "tokenizer.model")  # GPTQModel saves only tokenizer.json
    tensors = {}
    for f in sorted(raw.glob("*.safetensors")):
        tensors.update({our_name(k): v for k, v in load_file(f).items()})
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return len(tensors)


def gptqmodel_log(raw: Path) -> dict:
    """What GPTQModel's quant_log.csv says per Linear: tokens seen, damping used, RTN fallbacks."""
    with open(raw / "quant_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    experts = [r for r in rows if ".experts." in r["module"]]
    fallbacks = [f"{r['layer']}.{r['module']}" for r in rows if "fallback" in r["loss"]]
    return {"linears": len(rows), "expert_linears": len(experts),
            "expert_tokens_min": min(int(r["samples"]) for r in experts),
            "expert_tokens_max": max(int(r["samples"]) for r in experts),
            "damp_values": sorted({float(r["damp"]) for r in rows}), "fallbacks": fallbacks}


def our_log(out: Path) -> dict:
    """The same facts from our quantize_report.json."""
    report = json.loads((out / "quantize_report.json").read_text())
    return {"totals": report.get("totals"), "calibration": report.get("calibration")}


# Every row: (label, who, settings). Ours: `mxtools quantize` options; GPTQModel: QuantizeConfig overrides.
ROWS = {
    "ours-int4-g128": ("mxtools GPTQ int4 g128 (defaults)", "ours", []),
    "ours-int4-g128-old": ("mxtools GPTQ int4 g128 (old defaults: damp 0.01, natural order, min/max)", "ours",
                           ["--recipe", "gptq-int4-g128-plain"]),
    "ours-int4-g128-actorder": ("mxtools GPTQ int4 g128 (the defaults with act-order)", "ours",
                                ["--recipe", "gptq-int4-g128-actorder"]),
    "ours-int4-g128-nosweep": ("mxtools GPTQ int4 g128 (the defaults without the coordinate-descent sweep)", "ours",
                               ["--recipe", "gptq-int4-g128-nosweep"]),
    "ours-int4-g128-gptaq": ("mxtools GPTQ int4 g128 (the defaults with the asymmetric objective, alpha 0.25)", "ours",
                             ["--recipe", "gptq-int4-g128-gptaq"]),
    "ours-rtn": ("mxtools RTN int4 g128", "ours", ["--recipe", "rtn-int4-g128"]),
    "gptqmodel-int4-g128": ("GPTQModel GPTQ int4 g128 (its defaults)", "gptqmodel", {"bits": 4, "group_size": 128}),
    "ours-int8-g128": ("mxtools GPTQ int8 g128 (defaults)", "ours", ["--bits", "8"]),
    "ours-int8-g128-notune": ("mxtools GPTQ int8 g128 without block-output reconstruction", "ours",
                              ["--recipe", "gptq-int4-g128-notune", "--bits", "8"]),
    "gptqmodel-int8-g128": ("GPTQModel GPTQ int8 g128 (its defaults)", "gptqmodel", {"bits": 8, "group_size": 128}),
    "ours-int4-g-1": ("mxtools GPTQ int4 g-1 (defaults)", "ours", ["--group-size", "-1"]),
    "ours-int4-g-1-notune": ("mxtools GPTQ int4 g-1 without block-output reconstruction", "ours",
                             ["--recipe", "gptq-int4-g128-notune", "--group-size", "-1"]),
    "gptqmodel-int4-g-1": ("GPTQModel GPTQ int4 g-1 (its defaults, act_group_aware off)", "gptqmodel",
                           {"bits": 4, "group_size": -1, "act_group_aware": False}),
}


def quantize(name: str, args) -> tuple[Path, dict, dict]:
    """One row's quantization, timed: (our-layout directory, timing, what the quantizer logged)."""
    _, who, settings = ROWS[name]
    if who == "ours":
        out = WORK / name
        extra = ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)] if "rtn" not in name else []
        timing = mxtools_quantize(out, *extra, *settings)
        return out, timing, our_log(out) if "rtn" not in name else {}
    raw = WORK / f"{name}-raw"
    timing = gptqmodel_quantize(WORK / "calib_samples.pt", raw, **settings)
    timing["tensors"] = to_our_layout(raw, WORK / name)
    log = {**gptqmodel_log(raw), "config": json.loads((raw / "quantize_config.json").read_text())}
    return WORK / name, timing, log


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--reuse", action="store_true", help="verify a row's kept quantization again, do not redo it")
    ap.add_argument("--threads", type=int, default=2, help="threads of every quantizer and verify process")
    args = ap.parse_args()
    THREADS.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    global WORK
    if args.threads != 2:  # other thread counts keep their rows apart (bench/out/gptqmodel_compare-tN)
        WORK = OUT / f"gptqmodel_compare-t{args.threads}"
    (WORK / "rows").mkdir(parents=True, exist_ok=True)
    calibration = calibration_samples(args.nsamples, args.seqlen, WORK / "calib_samples.pt")
    for name in args.rows.split(","):
        done = WORK / "rows" / f"{name}-quantize.json"
        if args.reuse and done.exists():
            path, timing, log = WORK / name, *json.loads(done.read_text())
        else:
            path, timing, log = quantize(name, args)
            done.write_text(json.dumps([timing, log], default=str))
        judge.THREADS.update(THREADS)
        result = {**judge_row(ROWS[name][0], path, WORK, name, timing), "row": name, "threads": args.threads,
                  "quantize_log": log, "calibration": calibration}
        keep_row(WORK, name, result)
    write_table(WORK, ROWS)


if __name__ == "__main__":
    main()
