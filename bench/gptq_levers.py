"""GPTQ quality levers on the bundled tiny Mixtral: a cheap per-Linear proxy, then the full KLD.

record   Run the quantize pipeline (GPTQ int4 g128, the default calibration: 128 x 2048 tokens of calib.txt) and
         keep each quantized Linear's float weight W and calibration Hessian H; run it again on eval.txt
         (windows of 2048 tokens) and keep each Linear's held-out Hessian He. Saved to bench/out/gptq_levers.pt.
proxy    Quantize every recorded W from its calibration H with each lever's settings (no forward pass) and
         score the held-out relative output error tr(dW He dW^T) / tr(W He W^T) of every Linear; print the
         geometric mean over attention Linears, over expert Linears, over all, and the ratio to the first lever.
kld      The whole pipeline with a lever's settings (sequential, each stage calibrated on the quantized earlier
         ones), written as a GPTQ checkpoint and checked by `verify` on the first --chunks chunks of eval.txt
         against the bf16 reference's saved log-probs: the proxy's ranking is checked against this.

    python bench/gptq_levers.py record
    python bench/gptq_levers.py proxy [LEVER ...]
    python bench/gptq_levers.py kld LEVER [--chunks N]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import OUT, ROOT

sys.path.insert(0, str(ROOT))
from mxtools.core.bundled import CALIB, EVAL, MODEL
from mxtools.layouts import open_checkpoint
from mxtools.quant import gptq_pipeline as gp
from mxtools.quant.gptq import QuantConfig, gptq_quantize
from mxtools.verify import verify

RECORD = OUT / "gptq_levers.pt"
BASE = OUT / "gptq_levers-eval-base.bin"

# Each lever: QuantConfig overrides on top of int4 g128 sym (the old defaults: damp 0.01, natural order).
LEVERS = {
    "base": {},
    "damp.05": {"damp": 0.05},
    "damp.1": {"damp": 0.1},
    "gar": {"act_group_aware": True},
    "actorder": {"act_order": True},
    "mse": {"mse": True},
    "hsearch": {"search": "hessian"},
    "refit": {"refit": True},
    "damp.05+gar": {"damp": 0.05, "act_group_aware": True},
    "damp.05+gar+hsearch": {"damp": 0.05, "act_group_aware": True, "search": "hessian"},
    "damp.05+gar+refit": {"damp": 0.05, "act_group_aware": True, "refit": True},
    "damp.05+gar+hsearch+refit": {"damp": 0.05, "act_group_aware": True, "search": "hessian", "refit": True},
    "gar+hsearch+refit": {"act_group_aware": True, "search": "hessian", "refit": True},
    "actorder+hsearch+refit": {"act_order": True, "search": "hessian", "refit": True},
    "damp.05+actorder+hsearch+refit": {"damp": 0.05, "act_order": True, "search": "hessian", "refit": True},
}


def config(lever: str, **over) -> QuantConfig:
    return QuantConfig(**{"bits": 4, "group_size": 128, "damp": 0.01, **LEVERS[lever], **over})


def _tokens(path: Path) -> list[int]:
    with open_checkpoint(MODEL) as ckpt:
        return ckpt.tokenizer.encode(path.read_text(encoding="utf-8"), bos=False)


def _hessians(tokens, nsamples: int, keep_weights: bool) -> dict:
    """{weight name: (W or None, H)} from one pipeline run (old default settings) on `tokens`."""
    seen, original = {}, gp.quantize_weights

    def recording(jobs, cfg, method, min_tokens):  # in the order the pipeline stores the results
        for hess, ws in jobs:
            for w in ws:
                seen[len(seen)] = (w.detach().cpu().clone() if keep_weights else None, hess.matrix().cpu())
        return original(jobs, cfg, method, min_tokens)

    gp.quantize_weights = recording
    try:
        with open_checkpoint(MODEL) as ckpt:
            stream = gp.quantize_checkpoint(ckpt, tokens, config("base"), nsamples=nsamples, device="cpu")
            names = [name for layer in stream for name in layer.results]
    finally:
        gp.quantize_weights = original
    return {name: seen[k] for k, name in enumerate(names)}


def record() -> None:
    t = time.perf_counter()
    calib = _hessians(_tokens(CALIB), 128, True)
    held = _hessians(_tokens(EVAL), 128, False)
    torch.save({n: (w, h, held[n][1]) for n, (w, h) in calib.items()}, RECORD)
    print(f"recorded {len(calib)} Linears in {time.perf_counter() - t:.1f} s -> {RECORD}")


def proxy(levers: list[str]) -> None:
    data = torch.load(RECORD)
    rows, ref = [], None
    for lever in levers:
        cfg, t = config(lever), time.perf_counter()
        errs = {}
        for name, (w, h, he) in data.items():
            d = w - gptq_quantize(w, h, cfg).dequantize()
            errs[name] = float(((d @ he) * d).sum() / ((w @ he) * w).sum())
        secs = time.perf_counter() - t
        attn = [v for n, v in errs.items() if ".experts." not in n]
        expert = [v for n, v in errs.items() if ".experts." in n]
        score = {k: math.exp(sum(map(math.log, v)) / len(v)) for k, v in
                 (("attn", attn), ("experts", expert), ("all", list(errs.values())))}
        ref = ref or score
        rows.append({"lever": lever, **score, "ratio_all": score["all"] / ref["all"],
                     "ratio_attn": score["attn"] / ref["attn"], "ratio_experts": score["experts"] / ref["experts"],
                     "gptq_s": round(secs, 2)})
        r = rows[-1]
        print(f"| {lever} | {r['attn']:.5f} | {r['experts']:.5f} | {r['all']:.5f} | {r['ratio_attn']:.3f} | "
              f"{r['ratio_experts']:.3f} | {r['ratio_all']:.3f} | {r['gptq_s']} |", flush=True)
    (OUT / "gptq_levers-proxy.json").write_text(json.dumps(rows, indent=2))


def kld(lever: str, chunks: int) -> None:
    from mxtools.layouts.gptq import write_quantized
    tokens = _tokens(EVAL)
    if not BASE.exists():
        with open_checkpoint(MODEL) as ref:
            verify(ref, None, tokens, chunks=chunks, device="cpu", save_base=BASE)
    cfg, t = config(lever), time.perf_counter()
    with tempfile.TemporaryDirectory(dir=OUT) as tmp, open_checkpoint(MODEL) as ckpt:
        stream = gp.quantize_checkpoint(ckpt, _tokens(CALIB), cfg, device="cpu")
        write_quantized(ckpt, Path(tmp), stream, cfg)
        secs = time.perf_counter() - t
        with open_checkpoint(Path(tmp)) as cand:
            rep = verify(cand, None, tokens, chunks=chunks, device="cpu", base=BASE)
    row = {"lever": lever, "chunks": chunks, "kld_mean": rep["kld_mean"], "kld_unc": rep["stats"]["kld_unc"],
           "same_top_p": rep["same_top_p"], "quantize_s": round(secs, 1)}
    print(json.dumps(row), flush=True)
    with open(OUT / "gptq_levers-kld.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=["record", "proxy", "kld"])
    ap.add_argument("levers", nargs="*")
    ap.add_argument("--chunks", type=int, default=24)
    args = ap.parse_args()
    torch.set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.stage == "record":
        record()
    elif args.stage == "proxy":
        proxy(args.levers or list(LEVERS))
    else:
        for lever in args.levers:
            kld(lever, args.chunks)


if __name__ == "__main__":
    main()
