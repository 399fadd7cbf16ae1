"""Time GPTQ on one full-size Mixtral-8x7B expert matrix (w1: 14336 x 4096, w2: 4096 x 14336).

Prints wall-clock seconds and the process CPU seconds (all threads): on shared cores the CPU time shows the
work when other load inflates the wall time. Random weights and a Hessian from random tokens (default 2048):
the cost of GPTQ does not depend on the values.
    python bench/gptq_expert.py --threads 2 [--act-order] [--which w1,w2] [--device cuda]
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from mxtools.quant.gptq import Hessian, QuantConfig, gptq_quantize, rtn_quantize

SHAPES = {"w1": (14336, 4096), "w2": (4096, 14336)}  # [out, in] in HF orientation


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_one(name, tokens, cfg, device):
    """Build the Hessian, then run GPTQ and RTN; return the timings in seconds."""
    out, inp = SHAPES[name]
    gen = torch.Generator().manual_seed(0)
    w = (0.02 * torch.randn(out, inp, generator=gen)).to(device)
    x = torch.randn(tokens, inp, generator=gen).to(device)
    t0 = time.perf_counter()
    hs = Hessian(inp, device=device)
    hs.add(x)
    h = hs.matrix()
    _sync(device)
    t1 = time.perf_counter()
    c1 = time.process_time()
    res = gptq_quantize(w, h, cfg)
    _sync(device)
    t2, c2 = time.perf_counter(), time.process_time()
    rtn_quantize(w, cfg)
    _sync(device)
    t3 = time.perf_counter()
    return {"hessian_s": t1 - t0, "gptq_s": t2 - t1, "gptq_cpu_s": c2 - c1, "rtn_s": t3 - t2, "damp": res.damp,
            "loss": res.loss}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--which", default="w1,w2")
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = QuantConfig(bits=4, group_size=args.group_size, act_order=args.act_order)
    print(f"device={args.device} threads={torch.get_num_threads()} tokens={args.tokens} {cfg}")
    for name in args.which.split(","):
        r = bench_one(name, args.tokens, cfg, args.device)
        shape = "x".join(map(str, SHAPES[name]))
        print(f"{name} {shape}: hessian {r['hessian_s']:.2f}s  "
              f"gptq {r['gptq_s']:.2f}s (process CPU {r['gptq_cpu_s']:.1f}s)  rtn {r['rtn_s']:.2f}s  "
              f"(damp {r['damp']}, loss {r['loss']:.4g})",
              flush=True)


if __name__ == "__main__":
    main()
