"""How many torch operations GPTQ dispatches for one 8x7B layer: the cost model behind the GPU projection.

On a GPU the GPTQ column loops are bound by launching kernels, not by arithmetic: on the H100 (docs/BENCHMARKS.md,
GPU check) one w1 (14336 x 4096) took 0.71 s and one w2 (4096 x 14336) 2.43 s, 173 and 170 us per column although
w2's columns are 3.5x shorter and its matrix products 3.5x larger. So the GPU time of a layer's GPTQ scales with
the operations dispatched: columns x operations per column. This script counts them on the CPU with a
TorchDispatchMode (every aten call; "kernels" leaves out the pure views), for a source tree and a setting:

- per column: one GPTQ call on a weight of R rows and C columns (a Hessian from random inputs), counted at two
  widths and fitted as a + b x C (the count does not depend on R, only on C);
- per layer: the pipeline's groups of one 8x7B layer: the measured tree quantizes 28 matrices one by one; the
  batched pipeline quantizes [q, k, v] stacked, [o], and the experts in batches of `--experts-per-batch`, each
  batch as one [w1, w3] call (4096 columns) and one [w2] call (14336 columns).

Then the projection: the measured layer (43.0 s, of which 24.9 s GPTQ) with the GPTQ part scaled by the ratio of
operations, and the measured tree's count as the reference.

`--validate C1,C2` checks the premise where it can be checked without a GPU: a CPU is also bound by dispatching
operations when the weights have few rows (32 here), so it times the column loops alone (cProfile; the
factorizations are arithmetic-bound on a CPU, not on a GPU) for batches of 1, 4 and 8 weights of C columns.

    python bench/gptq_launches.py --tree /path/to/old/checkout --recipe plain    # the measured code
    python bench/gptq_launches.py --recipe default --experts-per-batch 4          # this tree
    python bench/gptq_launches.py --validate 1024,1792                            # timed on this CPU
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, torch
from collections import Counter
from torch.utils._python_dispatch import TorchDispatchMode
sys.path.insert(0, sys.argv[1])
from mxtools.quant.gptq import QuantConfig, gptq_quantize
VIEWS = {"select", "slice", "view", "expand", "unsqueeze", "squeeze", "t", "transpose", "diagonal", "alias",
         "_unsafe_view", "as_strided", "detach", "permute", "reshape", "lift_fresh"}

class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

cfg = QuantConfig(**json.loads(sys.argv[2]))
out = {}
torch.manual_seed(0)
for cols in map(int, sys.argv[3].split(",")):
    w = torch.randn(16, cols)
    x = torch.randn(cols + 256, cols)
    h = x.T @ x / x.shape[0]
    count = Count()
    with count:
        gptq_quantize(w, h, cfg)
    out[cols] = {"ops": sum(count.ops.values()),
                 "kernels": sum(v for k, v in count.ops.items() if k not in VIEWS)}
print(json.dumps(out))
"""

RECIPES = {  # the settings the measured GPU run used, and this tree's defaults (mxtools/recipes/gptq-int4-g128.yaml)
    "plain": {"bits": 4, "group_size": 128},
    "default": {"bits": 4, "group_size": 128, "damp": 0.05, "act_group_aware": True, "search": "hessian",
                "refit": True, "repass": True, "sweeps": 1},
}
GPU = {"layer_s": 43.0, "gptq_s": 24.9, "layers": 32}  # H100, 2026-11-26 (docs/BENCHMARKS.md, GPU check)
DIM, FFN, EXPERTS = 4096, 14336, 8


def per_call(tree: Path, recipe: str, widths=(1024, 2048)) -> tuple[dict, dict]:
    """(fit a + b x C per measure, the raw counts) of one GPTQ call on `tree` with `recipe`."""
    p = subprocess.run([sys.executable, "-c", CHILD, str(tree), json.dumps(RECIPES[recipe]),
                        ",".join(map(str, widths))], capture_output=True, text=True, check=True)
    raw = {int(k): v for k, v in json.loads(p.stdout).items()}
    lo, hi = widths
    fit = {}
    for m in ("ops", "kernels"):
        b = (raw[hi][m] - raw[lo][m]) / (hi - lo)
        fit[m] = (raw[lo][m] - b * lo, b)
    return fit, raw


def layer_calls(batched: bool, experts_per_batch: int) -> list[int]:
    """The column counts of the GPTQ calls of one 8x7B layer."""
    if not batched:  # q, k, v, o, then each expert's w1, w3, w2
        return [DIM] * 4 + [DIM, DIM, FFN] * EXPERTS
    batches = -(-EXPERTS // experts_per_batch)
    return [DIM, DIM] + [DIM, FFN] * batches


def validate(widths: list[int], rows: int = 32) -> dict:
    """Seconds of the column loops (GPTQ's two passes and the sweep, from cProfile) for a batch of 1, 4 and 8
    weights of `rows` rows with the defaults, on this CPU, one thread; the factorizations and matrix products,
    arithmetic-bound here but not on a GPU, are left out."""
    import cProfile
    import pstats

    import torch
    sys.path.insert(0, str(ROOT))
    from mxtools.quant.gptq import QuantConfig, gptq_quantize_batch
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    cfg = QuantConfig(**RECIPES["default"])
    result = {"rows": rows}
    for cols in widths:
        hs = []
        for _ in range(8):
            x = torch.randn(cols + 256, cols, generator=gen)
            hs.append(x.T @ x / x.shape[0])
        ws = [torch.randn(rows, cols, generator=gen) for _ in range(8)]
        for n in (1, 4, 8):
            prof = cProfile.Profile()
            prof.enable()
            gptq_quantize_batch(ws[:n], hs[:n], cfg)
            prof.disable()
            loops = sum(v[3] for f, v in pstats.Stats(prof).stats.items() if f[2] in ("_gptq_loop", "descend_codes"))
            result[f"{cols}_columns_batch_{n}_loops_s"] = round(loops, 3)
        result[f"{cols}_columns_per_weight_8_vs_1"] = round(result[f"{cols}_columns_batch_8_loops_s"] / 8
                                                            / result[f"{cols}_columns_batch_1_loops_s"], 3)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--validate", help="C1,C2: time the column loops at these widths on this CPU (see above)")
    ap.add_argument("--tree", type=Path, default=ROOT, help="source tree to count (default: this one)")
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="default")
    ap.add_argument("--experts-per-batch", type=int, default=0, help="0: the tree quantizes one matrix per call")
    ap.add_argument("--reference", type=Path, help="JSON of the measured tree's run (this script's --json output)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.validate:
        print(json.dumps(validate([int(c) for c in args.validate.split(",")]), indent=2))
        return
    fit, raw = per_call(args.tree, args.recipe)
    calls = layer_calls(args.experts_per_batch > 0, args.experts_per_batch)
    layer = {m: round(sum(a + b * c for c in calls)) for m, (a, b) in fit.items()}
    result = {"tree": str(args.tree), "recipe": args.recipe, "experts_per_batch": args.experts_per_batch,
              "per_call": {str(k): v for k, v in raw.items()},
              "per_column": {m: round(b, 2) for m, (a, b) in fit.items()},
              "calls_per_layer": len(calls), "columns_per_layer": sum(calls), "layer": layer}
    if args.reference:
        ref = json.loads(args.reference.read_text())["layer"]
        for m in ("ops", "kernels"):
            ratio = layer[m] / ref[m]
            per_layer = GPU["layer_s"] - GPU["gptq_s"] + GPU["gptq_s"] * ratio
            result[f"projection_{m}"] = {"ratio": round(ratio, 3), "layer_s": round(per_layer, 1),
                                         "model_min": round(per_layer * GPU["layers"] / 60, 1)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
