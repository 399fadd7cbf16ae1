"""`make gpu-check`: on a CUDA machine, (1) the harness on CUDA against CPU for the bundled tiny model,
(2) a timed layer-streamed perplexity pass over `synth --preset 8x7b --layers 2` (tokens/s, peak GPU memory),
(3) GPTQ timings on CUDA: one full-size expert matrix, and one layer of the 8x7B synth model.
Prints one JSON document (also written to $OUT/gpu_check.json when OUT is set)."""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mxtools import model  # noqa: E402
from mxtools.bundled import EVAL, MODEL  # noqa: E402
from mxtools.convert import write_checkpoint  # noqa: E402
from mxtools.layouts import open_checkpoint  # noqa: E402
from mxtools.synth import synth_checkpoint, synth_spec  # noqa: E402
from mxtools.verify import metrics, verify  # noqa: E402

RESULTS: dict = {}


def step(name):
    def wrap(fn):
        def run(*a):
            t = time.time()
            try:
                RESULTS[name] = fn(*a)
            except Exception as exc:  # keep going: every figure we can get counts
                RESULTS[name] = {"error": f"{type(exc).__name__}: {exc}"}
            RESULTS[name]["seconds"] = round(time.time() - t, 2)
            print(name, json.dumps(RESULTS[name]), flush=True)
        return run
    return wrap


@step("tiny_cuda_vs_cpu")
def tiny_cuda_vs_cpu():
    with open_checkpoint(MODEL) as ck:
        tokens = ck.tokenizer.encode(EVAL.read_text(encoding="utf-8"), bos=False)
        fed = metrics.with_bos(metrics.chunk_tokens(tokens, 512, 2))
        cpu = model.logits(ck, fed, "cpu", torch.float32)
        gpu = model.logits(ck, fed, "cuda", torch.float32).cpu()
        r_cpu = verify(ck, None, tokens, 512, 16, "cpu", torch.float32)
        r_gpu = verify(ck, None, tokens, 512, 16, "cuda", torch.float32)
        r_bf16 = verify(ck, ck, tokens, 512, 16, "cuda", torch.bfloat16, outtype="bf16")
    return {"logits_rel_error": float((cpu - gpu).norm() / cpu.norm()),
            "top1_agree": float((cpu.argmax(-1) == gpu.argmax(-1)).float().mean()),
            "ppl_cpu": r_cpu["ppl"], "ppl_cuda": r_gpu["ppl"], "ppl_cuda_bf16": r_bf16["ppl"]}


def synth_8x7b(root: Path) -> Path:
    path = root / "synth-8x7b-2L"
    write_checkpoint(synth_checkpoint(synth_spec("8x7b", n_layers=2)), "hf", path, "bf16")
    return path


@step("ppl_8x7b_2layers")
def ppl_8x7b(path: Path):
    torch.cuda.reset_peak_memory_stats()
    with open_checkpoint(path) as ck:
        tokens = ck.tokenizer.encode(EVAL.read_text(encoding="utf-8"), bos=False)
        chunks = 32
        torch.cuda.synchronize()
        t = time.time()
        r = verify(ck, None, tokens, 512, chunks, "cuda", torch.bfloat16, chunks_per_pass=16)
        torch.cuda.synchronize()
        dt = time.time() - t
    return {"tokens": chunks * 512, "tokens_per_s": round(chunks * 512 / dt, 1), "wall_s": round(dt, 2),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "ppl": r["ppl"]}


@step("gptq_one_expert")
def gptq_one_expert():
    from mxtools.quant.gptq import Hessian, QuantConfig, gptq_quantize
    out = {}
    for name, (rows, cols) in {"w1": (14336, 4096), "w2": (4096, 14336)}.items():
        w = torch.randn(rows, cols, device="cuda") / cols ** 0.5
        h = Hessian(cols, device="cuda")
        h.add(torch.randn(2048, cols, device="cuda"))
        torch.cuda.synchronize()
        t = time.time()
        gptq_quantize(w, h.matrix(), QuantConfig(bits=4, group_size=128))
        torch.cuda.synchronize()
        out[f"{name}_{rows}x{cols}_s"] = round(time.time() - t, 3)
    return out


@step("gptq_8x7b_layer")
def gptq_layer(path: Path, root: Path):
    from mxtools.quant.gptq_pipeline import run_quantize
    calib = root / "calib.txt"
    calib.write_text((MODEL.parent.parent / "text" / "calib.txt").read_text(encoding="utf-8"))
    t = time.time()
    report = run_quantize(path, root / "gptq", calib, bits=4, method="gptq", group_size=128, nsamples=32,
                          seqlen=2048, device="cuda")
    return {"wall_s": round(time.time() - t, 2), "layers": 2, "nsamples": 32, "seqlen": 2048,
            "per_layer_s": report.get("layer_seconds") or report.get("time")}


def main():
    if not torch.cuda.is_available():
        sys.exit("gpu-check needs a CUDA device")
    RESULTS["device"] = {"name": torch.cuda.get_device_name(), "torch": torch.__version__}
    tiny_cuda_vs_cpu()
    gptq_one_expert()
    with tempfile.TemporaryDirectory(dir=os.environ.get("MXTOOLS_TMP")) as tmp:
        path = synth_8x7b(Path(tmp))
        ppl_8x7b(path)
        gptq_layer(path, Path(tmp))
    text = json.dumps(RESULTS, indent=2)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(text)


if __name__ == "__main__":
    main()
