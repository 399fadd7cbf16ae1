"""End-to-end scale tuning, an experiment on the bundled model: every group scale of a GPTQ int4 checkpoint tuned
at once towards the float model's next-token distribution (the KL divergence of the logits) on the calibration
samples, through all layers, instead of layer by layer towards each layer's output (quant/gptq_tune.py, the
defaults). The roundings are tune_layer's own (scales only; codes, zeros and g_idx untouched); the steps are signed
(falling linearly to 0, as tune_layer's) or Adam's (--adam, cosine). 8 samples are held out; every --check steps
their KL is measured and the best checkpoint is kept. The result is written as SRC with its scales replaced, then
SRC and the result are judged alike (bench/judge.py: `mxtools verify` on every chunk of both held-out texts) and
the ratio printed with its paired standard error.

This needs the whole model in memory at once (the float and the quantized one, with their gradients): it measures
what a whole-model objective would add on top of the layer-by-layer one, not a path for 8x7B.

    python bench/e2e_scales.py SRC_DIR [--out DIR] [--iters 200] [--lr 0.001] [--adam] [--batch 8] [--window 512]
"""
from __future__ import annotations

import argparse
import json
import math
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
from mxtools.quant.gptq_tune import ATTENTION, EXPERT, SCALE_RANGE, TuneConfig, gptq_rounding

WORK = OUT / "e2e_scales"


def rounding(raw: dict, base: str):
    """The tunable group scales of one stored Linear (tune_layer's own class, scales only)."""
    q, zeros, scales, g_idx = unpack({s: raw[f"{base}.{s}"] for s in SUFFIXES}, 4)
    res = QuantResult(q=q, scales=scales.float(), zeros=zeros, g_idx=g_idx, loss=None, damp=None, method="gptq",
                      cfg=QuantConfig(bits=4, group_size=128, sym=True))
    r = gptq_rounding(res.dequantize(), res, "cpu", TuneConfig(iters=1))
    r.base = base
    return r


def student_layers(qckpt, raw, n_layers, n_experts):
    """Each layer's float parts (norms, router) with a rounding per quantized Linear; and all roundings."""
    layers, tuned = [], []
    for i in range(n_layers):
        w = forward.load_layer(qckpt, i, "cpu", torch.float32)
        sc = {attr: rounding(raw, weight_name(key, i)[:-len(".weight")]) for key, attr in ATTENTION}
        ex = [[rounding(raw, weight_name(key, i, e)[:-len(".weight")]) for key, _ in sorted(EXPERT, key=lambda k: k[1])]
              for e in range(n_experts)]
        layers.append((w, sc, ex))
        tuned += list(sc.values()) + [r for row in ex for r in row]
    return layers, tuned


@dataclass
class Models:
    """The float model (teacher) and the quantized one with its tunable scales (student), in float32 on the CPU."""

    spec: object
    rope: tuple
    teacher: tuple  # (embedding table, layers, head)
    student: tuple  # (embedding table, [(layer, attention roundings, expert roundings)], head)
    tuned: list  # every rounding of the student
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
    layers, tuned = student_layers(qck, raw, spec.n_layers, spec.n_experts)
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


def descend(m: Models, ids: torch.Tensor, hold: torch.Tensor, args) -> tuple[float, int, float]:
    """args.iters steps on batches of the training samples; the best checkpoint's scales are left in place.
    Returns (held-out KL before, best step (0: the source's), its held-out KL)."""
    train = torch.tensor([j for j in range(ids.shape[0]) if j not in set(hold.tolist())])
    params = [r.a for r in m.tuned]
    before = held_out(m, ids, hold)
    best = (before, 0, [p.detach().clone() for p in params])
    gen, t0 = torch.Generator().manual_seed(0), time.process_time()
    lr0 = args.lr if args.lr is not None else 1.0 / args.iters
    opt = torch.optim.Adam(params, lr=lr0) if args.adam else None
    order, pos = torch.randperm(train.numel(), generator=gen), 0
    for it in range(args.iters):
        if pos + args.batch > order.numel():
            order, pos = torch.randperm(train.numel(), generator=gen), 0
        loss = kl(m, ids[train[order[pos:pos + args.batch]]])
        pos += args.batch
        for p, g in zip(params, torch.autograd.grad(loss, params)):
            p.grad = g
        if opt is None:
            for r in m.tuned:
                r.step(lr0 * (1 - it / args.iters))
        else:
            for group in opt.param_groups:
                group["lr"] = lr0 * 0.5 * (1 + math.cos(math.pi * it / args.iters))
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                for p in params:
                    p.clamp_(-SCALE_RANGE, SCALE_RANGE)
        if (it + 1) % args.check == 0 or it + 1 == args.iters:
            err = held_out(m, ids, hold)
            print(json.dumps({"step": it + 1, "train_kl": float(loss.detach()), "holdout_kl": err,
                              "cpu_s": round(time.process_time() - t0)}), flush=True)
            if err < best[0]:
                best = (err, it + 1, [p.detach().clone() for p in params])
    with torch.no_grad():
        for p, v in zip(params, best[2]):
            p.copy_(v)
    return before, best[1], best[0]


def write(m: Models, src: Path, out: Path) -> None:
    """src with every tuned Linear's scales replaced (as tune_layer's results pack them), written to a temporary
    directory renamed at the end."""
    tensors = dict(m.raw)
    for r in m.tuned:
        tensors[f"{r.base}.scales"] = pack(r.result())["scales"]
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
    ap.add_argument("--adam", action="store_true", help="Adam steps (lr --lr, cosine to 0) instead of signed ones")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--window", type=int, default=512, help="first positions of each sample")
    ap.add_argument("--holdout", type=int, default=8)
    ap.add_argument("--check", type=int, default=25)
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    calibration_samples(128, 2048, WORK / "calib_samples.pt")  # the samples `mxtools quantize` calibrates on
    ids = torch.load(WORK / "calib_samples.pt")[:, :args.window]  # each sample starts with BOS
    hold = torch.linspace(0, ids.shape[0] - 1, args.holdout).round().long().unique()
    t0 = time.process_time()
    m = load_models(args.src, args.window)
    before, step, after = descend(m, ids, hold, args)
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
