"""End-to-end scale tuning, an experiment on the bundled model: every group scale of a GPTQ int4 checkpoint tuned
at once towards the float model's next-token distribution (the KL divergence of the logits) on the calibration
samples, through all layers, instead of layer by layer towards each layer's output (quant/gptq_tune.py, the
defaults). The roundings and the signed-gradient descent are tune_layer's own (gptq_tune.descend; scales only:
codes, zeros and g_idx untouched). 8 samples are held out; every --check steps their KL is measured and the best
checkpoint is kept (the source's when none beats it). The result is written as SRC with its scales replaced, then
SRC and the result are judged alike (bench/judge.py: `mxtools verify` on every chunk of both held-out texts) and
the ratio printed with its paired standard error.

This needs the whole model in memory at once (the float and the quantized one, with their gradients): it measures
what a whole-model objective would add on top of the layer-by-layer one, not a path for 8x7B.

    python bench/e2e_scales.py SRC_DIR [--out DIR] [--iters 200] [--lr 0.001] [--batch 8] [--window 512]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from common import OUT, ROOT
from gptqmodel_compare import calibration_samples
from judge import judge_row, keep_row, ratio
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(ROOT))
from mxtools.core.bundled import MODEL
from mxtools.core.names import weight_name
from mxtools.io.gptq_pack import SUFFIXES, pack, unpack
from mxtools.layouts import open_checkpoint
from mxtools.model import forward
from mxtools.quant.gptq import QuantConfig, QuantResult
from mxtools.quant.gptq_tune import ATTENTION, EXPERT, TuneConfig, descend, gptq_rounding

WORK = OUT / "e2e_scales"


def student_layers(qckpt, raw: dict, bits: int) -> tuple[list, dict]:
    """Each layer's float parts (norms, router) with a rounding per quantized Linear (tune_layer's own, scales
    only); and every rounding by its stored name (without the .qweight/... suffix)."""
    tuned = {}

    def rounding(name: str):
        base = name[:-len(".weight")]
        q, zeros, scales, g_idx = unpack({s: raw[f"{base}.{s}"] for s in SUFFIXES}, bits)
        res = QuantResult(q=q, scales=scales.float(), zeros=zeros, g_idx=g_idx, loss=None, damp=None,
                          method="gptq", cfg=QuantConfig(bits=bits))
        tuned[base] = gptq_rounding(res.dequantize(), res, "cpu", TuneConfig(iters=1))
        return tuned[base]
    layers = []
    for i in range(qckpt.spec.n_layers):
        sc = {attr: rounding(weight_name(key, i)) for key, attr in ATTENTION}
        ex = [[rounding(weight_name(key, i, e)) for key, _ in sorted(EXPERT, key=lambda k: k[1])]
              for e in range(qckpt.spec.n_experts)]
        layers.append((forward.load_layer(qckpt, i, "cpu", torch.float32), sc, ex))
    return layers, tuned


@dataclass
class Models:
    """The float model (teacher) and the quantized one with its tunable scales (student), in float32 on the CPU."""

    spec: object
    rope: tuple
    teacher: tuple  # (embedding table, layers, head)
    student: tuple  # (embedding table, [(layer, attention roundings, expert roundings)], head)
    tuned: dict  # every rounding of the student, by stored name
    raw: dict  # the source's stored tensors


def load_models(src: Path, window: int) -> Models:
    fck, qck = open_checkpoint(MODEL), open_checkpoint(src)
    spec = fck.spec

    def emb_head(ckpt):
        return (forward.load_weight(ckpt, weight_name("token_embd"), "cpu", torch.float32),
                forward.load_head(ckpt, "cpu", torch.float32))
    f_emb, f_head = emb_head(fck)
    q_emb, q_head = emb_head(qck)
    raw = load_file(src / "model.safetensors")
    bits = json.loads((src / "quantize_config.json").read_text())["bits"]
    layers, tuned = student_layers(qck, raw, bits)
    teacher = (f_emb, [forward.load_layer(fck, i, "cpu", torch.float32) for i in range(spec.n_layers)], f_head)
    return Models(spec, forward.rope_tables(spec, window, "cpu", torch.float32), teacher, (q_emb, layers, q_head),
                  tuned, raw)


def teacher_logprobs(m: Models, toks: torch.Tensor) -> torch.Tensor:
    emb, layers, head = m.teacher
    with torch.no_grad():
        h = F.embedding(toks, emb)
        for w in layers:
            h = forward.layer_forward(h, w, m.spec, m.rope)[0]
        return torch.log_softmax(forward.head_logits(h, head, m.spec), -1)


def student_logits(m: Models, toks: torch.Tensor, stored: bool = False) -> torch.Tensor:
    """The quantized model's logits with the current scales (`stored`: as the fp16 scales will be written)."""
    emb, layers, head = m.student
    h = F.embedding(toks, emb)
    for w, sc, ex in layers:
        wq = replace(w, **{k: r.weight(stored) for k, r in sc.items()},
                     experts=[tuple(r.weight(stored) for r in row) for row in ex])
        h = forward.layer_forward(h, wq, m.spec, m.rope)[0]
    return forward.head_logits(h, head, m.spec)


def kl(m: Models, toks: torch.Tensor, stored: bool = False) -> torch.Tensor:
    """Mean KL(float || quantized) of the next-token distributions over every position of toks."""
    t_lp = teacher_logprobs(m, toks)
    return (t_lp.exp() * (t_lp - torch.log_softmax(student_logits(m, toks, stored), -1))).sum(-1).mean()


def held_out(m: Models, ids: torch.Tensor, hold: torch.Tensor) -> float:
    with torch.no_grad():
        return sum(float(kl(m, ids[j:j + 1], stored=True)) for j in hold.tolist()) / len(hold)


def tune(m: Models, ids: torch.Tensor, hold: torch.Tensor, cfg: TuneConfig) -> tuple[float, int, float]:
    """gptq_tune.descend on the KL of batches of the training samples, checked on the held-out ones; the best
    checkpoint's scales (the source's when none beat them) are left in place. Returns (held-out KL before, best
    step (0: the source's), its held-out KL)."""
    train = torch.tensor([j for j in range(ids.shape[0]) if j not in set(hold.tolist())])
    t0 = time.process_time()

    def check():
        err = held_out(m, ids, hold)
        print(json.dumps({"holdout_kl": err, "cpu_s": round(time.process_time() - t0)}), flush=True)
        return err
    before = held_out(m, ids, hold)
    run = descend(m.tuned.values(), train.numel(), cfg, lambda picked: kl(m, ids[train[picked]]), check)
    after, step, values = run["best"]
    if after >= before:
        return before, 0, before
    with torch.no_grad():
        for p, v in zip((p for r in m.tuned.values() for p in r.params()), values):
            p.copy_(v)
    return before, step, after


def write(m: Models, src: Path, out: Path) -> None:
    """src with every tuned Linear's scales replaced (as tune_layer's results pack them), written to a temporary
    directory renamed at the end."""
    tensors = dict(m.raw)
    for base, r in m.tuned.items():
        tensors[f"{base}.scales"] = pack(r.result())["scales"]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("model.safetensors"))
    save_file(tensors, tmp / "model.safetensors", metadata={"quantizer": "mxtools", "format": "pt"})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("src", type=Path)
    ap.add_argument("--out", type=Path, default=WORK / "e2e-scales")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--lr", type=float, default=None, help="first step (default 1/iters)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--window", type=int, default=512, help="first positions of each sample")
    ap.add_argument("--holdout", type=int, default=8)
    ap.add_argument("--check", type=int, default=25)
    args = ap.parse_args()
    src, out = args.src.resolve(), args.out.resolve()
    if out == src or src in out.parents or out in src.parents:
        ap.error(f"--out {args.out} would overwrite the source {args.src}")
    WORK.mkdir(parents=True, exist_ok=True)
    calibration_samples(128, 2048, WORK / "calib_samples.pt")  # the samples `mxtools quantize` calibrates on
    ids = torch.load(WORK / "calib_samples.pt")[:, :args.window]  # each sample starts with BOS
    hold = torch.linspace(0, ids.shape[0] - 1, args.holdout).round().long().unique()
    t0 = time.process_time()
    m = load_models(args.src, args.window)
    cfg = TuneConfig(iters=args.iters, lr=args.lr, batch=args.batch, check=args.check)
    before, step, after = tune(m, ids, hold, cfg)
    write(m, args.src, args.out)
    print(json.dumps({"holdout_kl_before": before, "best_step": step, "holdout_kl": after,
                      "cpu_s": round(time.process_time() - t0)}), flush=True)
    judge(args.src, args.out)


def judge(src: Path, out: Path) -> None:
    """Both checkpoints judged alike; out's mean KLD over src's, per text, with the paired standard error."""
    (WORK / "rows").mkdir(exist_ok=True)
    rows = {}
    for name, path in (("source", src), (out.name, out)):
        rows[name] = judge_row(str(path), path, WORK, name, {})
        keep_row(WORK, name, rows[name])
    for text in rows["source"]["texts"]:
        r = ratio(rows[out.name], rows["source"], text)
        print(f"{text}: {r['ratio']:.3f} ± {r['ratio_se']:.3f} of the source's mean KLD", flush=True)


if __name__ == "__main__":
    main()
