"""Our GPTQ against GPTQModel's on the bundled tiny Mixtral, same calibration tokens, same evaluation.

Quantizes mxtools/assets/tiny-mixtral three ways: `mxtools quantize` (GPTQ int4 g128 sym, 128 x 2048 tokens of
calib.txt, experts routed), `mxtools quantize --method rtn` (int4 g128), and GPTQModel (GPTQ int4 g128 sym,
desc_act False, on CPU, in a child process: importing it patches transformers' Mixtral). GPTQModel is fed the
very token ids our pipeline calibrates on (mxtools.quant.gptq_pipeline.make_samples: 128 windows of 2047 tokens,
each after BOS, spread evenly over the tokenized calib.txt), as input_ids + all-ones attention_mask, batch 1.
Its other settings are its own defaults, recorded in the JSON (damp 0.05 with auto-increment, act_group_aware,
RTN fallback for a module that got < 0.5% of the calibration tokens); a second GPTQModel run uses our damping
(0.01) with its group-aware reordering (GAR) off, the like-for-like row. Its outputs are renamed to our tensor
names (bytes untouched) and every output is checked by `mxtools verify --reference` on eval.txt (every 512-token
chunk). Writes bench/out/gptqmodel_compare.json and prints a markdown table. About 25 minutes on 2 CPU cores.

    python bench/gptqmodel_compare.py [--nsamples N --seqlen L] [--no-matched]   # small N, L: a smoke run
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from common import OUT, PY, ROOT, timed

sys.path.insert(0, str(ROOT))
from mxtools.bundled import CALIB, EVAL, MODEL
from mxtools.layouts import open_checkpoint
from mxtools.quant.gptq_pipeline import make_samples

WORK = OUT / "gptqmodel_compare"
THREADS = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}

# The child: load the bf16 model on CPU, quantize on our samples, save (GPTQ v1, transformers-5 names).
GPTQMODEL_SCRIPT = """
import json, sys, time, torch
from gptqmodel import GPTQModel, QuantizeConfig
import gptqmodel
torch.set_num_threads(2)
src, samples, out, info, extra = sys.argv[1:6]
ids = torch.load(samples)
calib = [{"input_ids": r.unsqueeze(0), "attention_mask": torch.ones_like(r).unsqueeze(0)} for r in ids]
qc = QuantizeConfig(bits=4, group_size=128, sym=True, desc_act=False, **json.loads(extra))
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
    torch.save(samples, path)
    return info


def mxtools_quantize(out: Path, *args: str) -> dict:
    return timed([PY, "-m", "mxtools.cli", "quantize", MODEL, "-o", out, "--force", "--device", "cpu", *args],
                 {**THREADS, "PYTHONPATH": str(ROOT)})


def gptqmodel_quantize(samples: Path, raw: Path, **settings) -> dict:
    """Run GPTQModel in a child process (QuantizeConfig overrides in `settings`); wall time and peak RSS of the
    whole child, plus the seconds of its quantize() call alone."""
    shutil.rmtree(raw, ignore_errors=True)
    info = WORK / f"{raw.name}-run.json"
    t = timed([PY, "-c", GPTQMODEL_SCRIPT, MODEL, samples, raw, info, json.dumps(settings)],
              {**THREADS, "GPTQMODEL_CPU_WORKERS": "2"})
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


def verify(cand: Path, json_path: Path) -> dict:
    """`mxtools verify CAND --reference MODEL` on eval.txt (ctx 512, all chunks); the report, pass or fail."""
    json_path.unlink(missing_ok=True)
    p = subprocess.run([PY, "-m", "mxtools.cli", "verify", cand, "--reference", MODEL, "--text", EVAL,
                        "--device", "cpu", "--json", json_path], check=False, capture_output=True, text=True,
                       env={**os.environ, **THREADS, "PYTHONPATH": str(ROOT)})
    if not json_path.exists():  # exit 1 with a report is a failed threshold, still a measurement
        raise RuntimeError(f"verify {cand} failed:\n{p.stderr[-3000:]}")
    return json.loads(json_path.read_text())


def row(method: str, report: dict, timing: dict) -> dict:
    return {"method": method, "kld_mean": report.get("kld_mean"), "kld_unc": report["stats"].get("kld_unc"),
            "ppl": report.get("ppl"), "ppl_ref": report.get("ppl_base"), "ppl_ratio": report.get("ppl_ratio"),
            "same_top_p": report.get("same_top_p"), "passed": report.get("passed"), **timing}


def table(rows: list[dict]) -> str:
    lines = ["| method | mean KLD | PPL | PPL ratio | same-top-p | quantization wall s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['kld_mean']:.5f} ± {r['kld_unc']:.5f} | {r['ppl']:.4f} | {r['ppl_ratio']:.4f} | "
                     f"{r['same_top_p']:.4f} | {r['wall_s']} |")
    return "\n".join(lines)


# GPTQModel's defaults, then the same with our damping (0.01) and no group-aware reordering: the like-for-like row.
GPTQMODEL_RUNS = {"GPTQModel GPTQ (its defaults)": ("gptqmodel", {}),
                  "GPTQModel GPTQ (damp 0.01, GAR off)": ("gptqmodel-matched",
                                                          {"damp_percent": 0.01, "act_group_aware": False})}


def quantize_all(args) -> tuple[dict, dict]:
    """Every quantization, timed: {method: (our-layout directory, timing)} and what GPTQModel logged."""
    calib = ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    runs = {"ours GPTQ": (WORK / "ours-gptq", mxtools_quantize(WORK / "ours-gptq", *calib)),
            "ours RTN": (WORK / "ours-rtn", mxtools_quantize(WORK / "ours-rtn", "--method", "rtn"))}
    logs = {"ours GPTQ": our_log(WORK / "ours-gptq")}
    for method, (name, settings) in list(GPTQMODEL_RUNS.items())[:1 if args.no_matched else None]:
        raw = WORK / f"{name}-raw"
        timing = gptqmodel_quantize(WORK / "calib_samples.pt", raw, **settings)
        timing["tensors"] = to_our_layout(raw, WORK / name)
        runs[method] = (WORK / name, timing)
        logs[method] = {**gptqmodel_log(raw), "config": json.loads((raw / "quantize_config.json").read_text())}
        print(method, timing, flush=True)
    return runs, logs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--no-matched", action="store_true", help="skip the GPTQModel run with our damping, no GAR")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    result = {"model": str(MODEL), "eval": str(EVAL),
              "calibration": calibration_samples(args.nsamples, args.seqlen, WORK / "calib_samples.pt")}
    runs, result["quantize_logs"] = quantize_all(args)
    rows = []
    for method, (path, timing) in runs.items():
        rows.append(row(method, verify(path, WORK / f"verify-{path.name}.json"), timing))
        print(rows[-1], flush=True)
    result["rows"] = rows
    (OUT / "gptqmodel_compare.json").write_text(json.dumps(result, indent=2, default=str))
    print(table(rows))
    for method, log in result["quantize_logs"].items():
        print(method, json.dumps({k: v for k, v in log.items() if k != "config"}, default=str))


if __name__ == "__main__":
    main()
