"""GPTQ on llama.cpp's block grids against llama.cpp's own quantization, on the bundled tiny Mixtral.

For each mix: plain (`convert --outtype MIX`; not for the mixes llama-quantize writes only with an importance
matrix), imatrix (`convert --outtype MIX --imatrix`, the imatrix from the calibration text) and GPTQ (`quantize
--to gguf --outtype MIX --tune-iters 0`, the same calibration text, without block-output reconstruction). Each
file runs in llama.cpp (llama-cpp-python, f32 KV cache) over each held-out text (EVAL_TEXTS: eval.txt, Wikipedia
as the calibration text; fiction.txt, Moby-Dick) beside the bf16 GGUF as reference, in chunks of CTX tokens (BOS
first), scoring the second half of each chunk as llama-perplexity does: mean KL divergence to the reference (with
its standard error over chunks), its ratio to the imatrix file's with the paired standard error (the delta method
on the per-chunk pairs), perplexity ratio, same top token, bits per weight. Prints one JSON line per file and a
Markdown table per text; writes bench/out/gguf_gptq.json.

    python bench/gguf_gptq.py [--mixes q4_k_m,iq2_xs] [--nsamples 128] [--seqlen 512] [--chunks 0 (all)]
                              [--texts wikipedia,fiction] [--gptaq 1] [--keep-embedding MIXES]
                              [--iq-variants repass,gptq-weights] [--tune 200] [--threads 2]

--tune N adds, for each GPTQ run (plain and --gptaq), the same run with block-output reconstruction at N steps
per layer (200: `quantize`'s default), with its ratio to the untuned run. --keep-embedding adds, for the mixes
named, a GPTQ run whose token embedding is left as llama.cpp encodes it (the decoder layers' share alone);
--iq-variants adds GPTQ runs with the i-quants' options (gguf_iq.iq_loop) on every i-quant type.

`--speed TYPES [--shapes w1]` instead times one full-size 8x7B expert matrix of each shape (w1 14336 x 4096, w2
4096 x 14336; random weights, Hessian from 2048 random tokens) with GPTQ on each GGML type (the i-quants with
`quantize`'s options) beside the int4 g128 GPTQ core, wall and process CPU seconds.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import OUT

from mxtools.commands.convert import convert
from mxtools.commands.imatrix import imatrix_from_text
from mxtools.commands.quantize import QuantizeSettings, run_quantize_gguf
from mxtools.core.bundled import CALIB, MODEL
from mxtools.core.defaults import EVAL_TEXTS
from mxtools.core.tokenizer import Tokenizer
from mxtools.io.files import RawFile
from mxtools.io.gguf_reader import read_header
from mxtools.quant.gguf_iq import IQ_TYPES
from mxtools.quant.mixes import load_mix
from mxtools.verify.paired import paired

CTX, THREADS = 512, 2
VARIANTS = {"repass": {"repass": True}, "gptq-weights": {"snap_weights": "gptq"},
            "repass+gptq-weights": {"repass": True, "snap_weights": "gptq"}}


def llama(path):
    from llama_cpp import Llama
    return Llama(model_path=str(path), n_ctx=CTX, n_batch=CTX, logits_all=True, type_k=0, type_v=0,
                 n_threads=THREADS, verbose=False)


def logprobs(llm, chunk: list[int], rows: slice) -> torch.Tensor:
    """log-softmax (float64) of the logits at positions `rows` of the chunk."""
    llm.reset()
    llm.eval(chunk)
    return torch.log_softmax(torch.from_numpy(np.array(llm.scores[rows], dtype=np.float32)).double(), -1)


def bits_per_weight(path) -> float:
    raw = RawFile(path)
    try:
        _, infos = read_header(raw)
    finally:
        raw.close()
    return 8 * sum(t.nbytes for t in infos) / sum(int(np.prod(t.shape)) for t in infos)


def evaluate(files: dict, ref_path, tokens: list[int], chunks: int) -> dict:
    """name -> metrics of each file against the reference, on the same chunks."""
    ref, models = llama(ref_path), {k: llama(p) for k, p in files.items()}
    acc = {k: {"kld": [], "nll": [], "same": 0, "n": 0} for k in files}
    ref_nll, half = [], CTX // 2
    body = CTX - 1
    n = min(chunks or len(tokens), len(tokens) // body)
    for c in range(n):
        if c % 10 == 0:
            print(f"chunk {c}/{n}", file=sys.stderr, flush=True)
        chunk = [1] + tokens[c * body:(c + 1) * body]
        targets = torch.tensor(chunk[half + 1:])
        p = logprobs(ref, chunk, slice(half, CTX - 1))
        p_exp = p.exp()
        ref_nll.append(float(-p.gather(1, targets[:, None]).sum()))
        for k, llm in models.items():
            q = logprobs(llm, chunk, slice(half, CTX - 1))
            a = acc[k]
            a["kld"].append(float((p_exp * (p - q)).sum(-1).mean()))
            a["nll"].append(float(-q.gather(1, targets[:, None]).sum()))
            a["same"] += int((p.argmax(-1) == q.argmax(-1)).sum())
            a["n"] += len(targets)
    for llm in (ref, *models.values()):
        llm.close()
    out = {}
    for k, a in acc.items():
        kld = np.array(a["kld"])
        out[k] = {"kld_mean": float(kld.mean()), "kld_se": float(kld.std(ddof=1) / np.sqrt(len(kld))),
                  "kld_chunks": kld.tolist(),
                  "ppl_ratio": float(np.exp((sum(a["nll"]) - sum(ref_nll)) / a["n"])),
                  "same_top": a["same"] / a["n"], "bpw": bits_per_weight(files[k]), "chunks": len(kld)}
    return out


def speed(types: list[str], shapes: list[str], tokens: int = 2048) -> dict:
    from gguf import GGMLQuantizationType as Q

    from mxtools.quant.gguf_gptq import quantize_matrix
    from mxtools.quant.gguf_iq import IQ_OPTIONS
    from mxtools.quant.gptq import Hessian, QuantConfig, gptq_quantize
    rows = {}
    for name, (out, inp) in {"w1": (14336, 4096), "w2": (4096, 14336)}.items():
        if name not in shapes:
            continue
        gen = torch.Generator().manual_seed(0)
        w = 0.02 * torch.randn(out, inp, generator=gen)
        hs = Hessian(inp)
        hs.add(torch.randn(tokens, inp, generator=gen))
        h = hs.matrix()
        runs = {"int4 g128": lambda w=w, h=h: gptq_quantize(w, h, QuantConfig())}
        runs.update({t: (lambda t=t, w=w, h=h: quantize_matrix(w, Q[t.upper()], h, **IQ_OPTIONS.get(Q[t.upper()], {})))
                     for t in types})
        for label, fn in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            rows[f"{name} {label}"] = {"wall_s": round(time.perf_counter() - t0, 1),
                                       "cpu_s": round(time.process_time() - c0, 1)}
            print(json.dumps({f"{name} {label}": rows[f"{name} {label}"]}), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--speed", help="time full-size expert matrices on these GGML types (e.g. q4_k,q6_k)")
    ap.add_argument("--shapes", default="w1,w2", help="--speed: which expert matrices (w1 14336 x 4096, w2)")
    ap.add_argument("--mixes", default="q2_k,q3_k_m,q4_k_m,q5_k_m,q6_k")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=0, help="chunks of each text (0: all)")
    ap.add_argument("--texts", default=",".join(EVAL_TEXTS), help="held-out texts (names of EVAL_TEXTS)")
    ap.add_argument("--keep-embedding", default="", help="also GPTQ with llama.cpp's token embedding for these mixes")
    ap.add_argument("--name", default="gguf_gptq", help="results file bench/out/NAME.json")
    ap.add_argument("--reuse", action="store_true", help="keep files already written by an earlier run")
    ap.add_argument("--no-plain", action="store_true", help="no plain (`convert` without --imatrix) files")
    ap.add_argument("--imatrix-only", default="", help="mixes for which only llama.cpp's imatrix file is made")
    ap.add_argument("--iq-variants", default="", help=f"also GPTQ with these i-quant options ({', '.join(VARIANTS)})")
    ap.add_argument("--damp", type=float, default=None)
    ap.add_argument("--gptq-imatrix", action="store_true", help="also GPTQ with the imatrix as search weights")
    ap.add_argument("--gptaq", default="", help="also GPTQ with the asymmetric objective at these scales (e.g. 1)")
    ap.add_argument("--tune", default="", help="also each GPTQ run (plain, --gptaq) with block-output reconstruction "
                    "at these iterations per layer (the plain runs have none)")
    ap.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")
    args = ap.parse_args()
    global THREADS
    THREADS = args.threads
    torch.set_num_threads(THREADS)
    if args.speed:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "gguf_gptq_speed.json").write_text(json.dumps(speed(args.speed.split(","), args.shapes.split(",")),
                                                             indent=1))
        return
    out = OUT / "gguf_gptq"
    out.mkdir(parents=True, exist_ok=True)
    ref = convert(MODEL, "gguf", out / "bf16.gguf", "bf16", force=True)
    imat = out / "imatrix.gguf"
    if not (args.reuse and imat.exists()):
        imat = imatrix_from_text(MODEL, CALIB, imat, ctx=args.seqlen, chunks=args.nsamples, device="cpu", force=True)
    files, times = {}, {}
    for mix in args.mixes.split(","):
        if not load_mix(mix).may_need_imatrix() and not args.no_plain:
            files[f"{mix} plain"] = convert(MODEL, "gguf", out / f"{mix}-plain.gguf", mix, force=True)
        files[f"{mix} imatrix"] = convert(MODEL, "gguf", out / f"{mix}-imatrix.gguf", mix, force=True,
                                          imatrix_path=imat)
        if mix in args.imatrix_only.split(","):
            continue
        runs = [("gptq", None, {}, {})] + ([("gptq+imatrix", imat, {}, {})] if args.gptq_imatrix else [])
        gptaqs = [a for a in args.gptaq.split(",") if a]
        runs += [(f"gptq gptaq={a}", None, {"gptaq": float(a)}, {}) for a in gptaqs]
        runs += [(f"gptq {v}", None, {}, {"iq_options": {t: VARIANTS[v] for t in IQ_TYPES}})
                 for v in args.iq_variants.split(",") if v and load_mix(mix).types() & set(IQ_TYPES)]
        runs += [("gptq embd-llama", None, {}, {"embedding": False})] if mix in args.keep_embedding.split(",") else []
        runs = [(label, im, {"tune_iters": 0, **extra}, kw) for label, im, extra, kw in runs]
        runs += [(f"{label} tune={n}", im, {**extra, "tune_iters": int(n)}, kw) for n in args.tune.split(",") if n
                 for label, im, extra, kw in list(runs) if label in ("gptq", *(f"gptq gptaq={a}" for a in gptaqs))]
        for label, im, extra, kw in runs:
            t = time.time()
            path = files[f"{mix} {label}"] = out / f"{mix}-{label.replace(' ', '-')}.gguf"
            if args.reuse and path.exists():
                continue
            report = run_quantize_gguf(MODEL, path, mix,
                                       QuantizeSettings(calib=CALIB, nsamples=args.nsamples, seqlen=args.seqlen,
                                                        damp=args.damp, device="cpu", force=True, **extra),
                                       imatrix_path=im, **kw)
            times[f"{mix} {label}"] = {"wall_s": round(time.time() - t, 1), "layers_s": report["timings"]["layers_s"],
                                       "fallbacks": len(report["totals"]["fallbacks"])}
            files[f"{mix} {label}"] = path
            print(json.dumps({f"{mix} {label}": times[f"{mix} {label}"]}), flush=True)
    results = {}
    for text in args.texts.split(","):
        tokens = Tokenizer.default().encode(EVAL_TEXTS[text].read_text(encoding="utf-8"), bos=False)
        res = with_ratios(evaluate(files, ref, tokens, args.chunks))
        results[text] = res
        for k, r in res.items():
            print(json.dumps({text: {k: {m: v for m, v in r.items() if m != "kld_chunks"}}}), flush=True)
        print(table(text, res))
    settings = {k: v for k, v in vars(args).items()} | {"ctx": CTX, "calib": CALIB.name}
    Path(OUT / f"{args.name}.json").write_text(json.dumps({"settings": settings, "results": results, "times": times},
                                                       indent=1))


def with_ratios(res: dict) -> dict:
    """Each file's mean KLD over the same mix's imatrix file's ("ratio"), and a tuned file's over the same run
    untuned ("tune_ratio"), each with its paired standard error ("_se": the delta method over the chunks)."""
    for k, r in res.items():
        base = res.get(f"{k.split(' ', 1)[0]} imatrix")
        if base is not None:
            p = paired(r["kld_chunks"], base["kld_chunks"])
            r["ratio"], r["ratio_se"] = p["ratio"], p["ratio_se"]
        untuned = res.get(k.rsplit(" tune=", 1)[0]) if " tune=" in k else None
        if untuned is not None:
            p = paired(r["kld_chunks"], untuned["kld_chunks"])
            r["tune_ratio"], r["tune_ratio_se"] = p["ratio"], p["ratio_se"]
    return res


def table(text: str, res: dict) -> str:
    head = ("| mix | method | mean KLD (± s.e.) | / imatrix (± paired s.e.) | / untuned (± paired s.e.) | PPL ratio | "
            "same top | bits/weight |")
    rows = [f"{text}:", head, "|---|---|---|---|---|---|---|---|"]
    for k, r in res.items():
        mix, method = k.split(" ", 1)
        ratio, tuned = (f"{r[m]:.3f} ± {r[m + '_se']:.3f}" if m in r else "-" for m in ("ratio", "tune_ratio"))
        rows.append(f"| {mix} | {method} | {r['kld_mean']:.5f} ± {r['kld_se']:.5f} | {ratio} | {tuned} | "
                    f"{r['ppl_ratio']:.4f} | {r['same_top']:.4f} | {r['bpw']:.3f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
