"""`make gpu-check`: on a CUDA machine, (1) the harness on CUDA against CPU for the bundled tiny model,
(2) a timed layer-streamed perplexity pass over `synth --preset 8x7b --layers 2` (tokens/s, peak GPU memory),
(3) GPTQ timings on CUDA: one full-size expert matrix, and one layer of the 8x7B synth model (plain GPTQ one matrix
at a time, the defaults in expert batches of 8 and 4, and the whole `quantize` pipeline with its defaults).
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

from mxtools.commands.convert import write_checkpoint
from mxtools.commands.synth import synth_checkpoint, synth_spec
from mxtools.core import chunking, names
from mxtools.core.bundled import CALIB, EVAL, MODEL
from mxtools.layouts import open_checkpoint
from mxtools.model import forward
from mxtools.verify import verify

RESULTS: dict = {}


def step(name):
    def wrap(fn):
        def run(*a):
            t = time.time()
            try:
                RESULTS[name] = fn(*a)
            except Exception as exc:  # noqa: BLE001  (keep going: every figure we can get counts)
                RESULTS[name] = {"error": f"{type(exc).__name__}: {exc}"}
            RESULTS[name]["seconds"] = round(time.time() - t, 2)
            print(name, json.dumps(RESULTS[name]), flush=True)
        return run
    return wrap


def tiny_model(root: Path) -> Path:
    """The bundled trained model; a random one of the same shape where the checkout lacks it."""
    if (MODEL / "model.safetensors").exists():
        return MODEL
    return write_checkpoint(synth_checkpoint(synth_spec("tiny", n_layers=4, hidden_dim=256)), "hf",
                            root / "tiny", "bf16")


@step("tiny_cuda_vs_cpu")
def tiny_cuda_vs_cpu(path: Path):
    with open_checkpoint(path) as ck:
        tokens = chunking.tokenize_file(ck.tokenizer, EVAL)
        fed = chunking.with_bos(chunking.chunk_tokens(tokens, 512, 2))
        cpu = forward.logits(ck, fed, "cpu", torch.float32)
        gpu = forward.logits(ck, fed, "cuda", torch.float32).cpu()
        r_cpu = verify(ck, None, tokens, ctx=512, chunks=16, device="cpu", dtype=torch.float32)
        r_gpu = verify(ck, None, tokens, ctx=512, chunks=16, device="cuda", dtype=torch.float32)
        r_bf16 = verify(ck, ck, tokens, ctx=512, chunks=16, device="cuda", dtype=torch.bfloat16, outtype="bf16")
    return {"model": str(path), "logits_rel_error": float((cpu - gpu).norm() / cpu.norm()),
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
        tokens = chunking.tokenize_file(ck.tokenizer, EVAL)
        chunks = 32
        torch.cuda.synchronize()
        t = time.time()
        r = verify(ck, None, tokens, ctx=512, chunks=chunks, device="cuda", dtype=torch.bfloat16, chunks_per_pass=16)
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


@step("gptq_8x7b_layer_compute")
def gptq_layer_compute(path: Path, nsamples: int = 16, seqlen: int = 2048):
    """GPTQ of every matrix of layer 0 (q, k, v, o, 8 x w1/w3/w2) on CUDA, Hessians from one forward pass."""
    from mxtools.quant.gptq import Hessian, QuantConfig, gptq_quantize
    dev = torch.device("cuda")
    with open_checkpoint(path) as ck:
        spec = ck.spec
        tokens = torch.randint(3, spec.vocab_size, (nsamples, seqlen))
        h = forward.embed(ck, forward.as_tokens(tokens, spec, dev), dev, torch.float32)
        w = forward.load_layer(ck, 0, dev, torch.float32)
        hess: dict = {}

        def observe(kind, x, expert):
            key = (kind, expert)
            if key not in hess:
                hess[key] = Hessian(x.shape[-1], device=dev)
            hess[key].add(x.reshape(-1, x.shape[-1]).float())
        torch.cuda.synchronize()
        t0 = time.time()
        forward.layer_forward(h, w, spec, forward.rope_tables(spec, seqlen, dev, torch.float32), observe)
        torch.cuda.synchronize()
        t1 = time.time()
        cfg = QuantConfig(bits=4, group_size=128)
        mats = [(w.q, "attn_q", None), (w.k, "attn_q", None), (w.v, "attn_q", None), (w.o, "attn_output", None)]
        for e, (w1, w2, w3) in enumerate(w.experts):
            mats += [(w1, "ffn_gate", e), (w3, "ffn_gate", e), (w2, "ffn_down", e)]
        tokens_per_expert = {e: hess[("ffn_gate", e)].n_tokens for e in range(spec.n_experts)
                             if ("ffn_gate", e) in hess}
        for mat, kind, e in mats:  # plain GPTQ, one matrix at a time: the reference of bench/gptq_launches.py
            gptq_quantize(mat, hess[(kind, e)].matrix(), cfg)
        torch.cuda.synchronize()
        t2 = time.time()
        # The defaults as the pipeline runs them: shared Hessians stacked, experts in batches of `per`.
        from mxtools.commands.quantize import DEFAULTS
        from mxtools.quant.gptq_groups import quantize_weights
        defaults = QuantConfig(**{k: v for k, v in DEFAULTS.items() if k in QuantConfig.__dataclass_fields__})
        batched = {}
        for per in (8, 4):
            torch.cuda.synchronize()
            t = time.time()
            quantize_weights([(hess[("attn_q", None)], [w.q, w.k, w.v]), (hess[("attn_output", None)], [w.o])],
                             defaults, "gptq", 0)
            for s in range(0, spec.n_experts, per):
                chunk = range(s, min(s + per, spec.n_experts))
                quantize_weights([(hess[("ffn_gate", e)], [w.experts[e][0], w.experts[e][2]]) for e in chunk],
                                 defaults, "gptq", 0)
                quantize_weights([(hess[("ffn_down", e)], [w.experts[e][1]]) for e in chunk], defaults, "gptq", 0)
            torch.cuda.synchronize()
            batched[f"defaults_{per}_experts_per_batch_s"] = round(time.time() - t, 2)
    return {"nsamples": nsamples, "seqlen": seqlen, "forward_hessians_s": round(t1 - t0, 2),
            "gptq_all_matrices_s": round(t2 - t1, 2), "matrices": len(mats), "tokens_per_expert": tokens_per_expert,
            **batched,
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


@step("gptq_8x7b_layer")
def gptq_layer(path: Path, root: Path):
    from mxtools.commands.quantize import QuantizeSettings, run_quantize
    calib = root / "calib.txt"
    calib.write_text(CALIB.read_text(encoding="utf-8"))
    t = time.time()
    report = run_quantize(path, root / "gptq", QuantizeSettings(calib=calib, bits=4, method="gptq", group_size=128,
                                                                nsamples=32, seqlen=2048, device="cuda"))
    return {"wall_s": round(time.time() - t, 2), "layers": 2, "nsamples": 32, "seqlen": 2048,
            "time_s": report["timings"]["time_s"], "per_layer_s": report["timings"]["layers_s"],
            "totals": report.get("totals"), "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


@step("tune_8x7b_layer")
def tune_layer_time(path: Path, nsamples: int = 128, seqlen: int = 2048, device: str = "cuda"):
    """Block-output reconstruction of layer 0 with the defaults (200 steps, 8 held out) on CUDA, from round-to-nearest
    codes (the steps cost the same whatever the codes): the time the defaults add per 8x7B layer."""
    from mxtools.commands.quantize import DEFAULTS
    from mxtools.quant.gptq import QuantConfig
    from mxtools.quant.gptq_groups import quantize_weights
    from mxtools.quant.gptq_tune import TuneConfig, tune_layer
    dev, cuda = torch.device(device), device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with open_checkpoint(path) as ck:
        spec = ck.spec
        cfg = QuantConfig(**{k: v for k, v in DEFAULTS.items() if k in QuantConfig.__dataclass_fields__})
        w = forward.load_layer(ck, 0, dev, torch.float32)
        mats = {"attn_q": w.q, "attn_k": w.k, "attn_v": w.v, "attn_output": w.o}
        results = {names.weight_name(k, 0): r for k, (r, _) in
                   zip(mats, [x[0] for x in quantize_weights([(None, [m]) for m in mats.values()], cfg, "rtn", 0)])}
        for e, trio in enumerate(w.experts):
            done = quantize_weights([(None, [m]) for m in trio], cfg, "rtn", 0)
            for key, (res, _) in zip(("ffn_gate", "ffn_down", "ffn_up"), [d[0] for d in done]):
                results[names.weight_name(key, 0, e)] = res
        tune = TuneConfig(iters=DEFAULTS["tune_iters"], scales=DEFAULTS["tune_scales"], codes=DEFAULTS["tune_codes"])
        tokens = torch.randint(3, spec.vocab_size, (nsamples, seqlen))  # the steps use the first tune.window
        h = forward.embed(ck, forward.as_tokens(tokens, spec, dev), dev, torch.float32)
        rope = forward.rope_tables(spec, seqlen, dev, torch.float32)
        sync()
        t = time.time()
        _, report, _, _ = tune_layer(w, results, 0, h, None, spec, rope, tune, dev, dev)
        sync()
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
    return {"nsamples": nsamples, "seqlen": seqlen, "window": tune.window, "iters": tune.iters,
            "tune_s": round(time.time() - t, 2), "report": report, "peak_gpu_gib": peak}


def main():
    if not torch.cuda.is_available():
        sys.exit("gpu-check needs a CUDA device")
    RESULTS["device"] = {"name": torch.cuda.get_device_name(), "torch": torch.__version__}
    only = set(sys.argv[1:])  # optional: names of the steps to run (default all)
    want = lambda name: not only or name in only
    with tempfile.TemporaryDirectory(dir=os.environ.get("MXTOOLS_TMP")) as tmp:
        if want("tiny_cuda_vs_cpu"):
            tiny_cuda_vs_cpu(tiny_model(Path(tmp)))
        if want("gptq_one_expert"):
            gptq_one_expert()
        path = synth_8x7b(Path(tmp))
        if want("ppl_8x7b_2layers"):
            ppl_8x7b(path)
        if want("gptq_8x7b_layer_compute"):
            gptq_layer_compute(path)
        if want("gptq_8x7b_layer"):
            gptq_layer(path, Path(tmp))
        if want("tune_8x7b_layer"):
            tune_layer_time(path)
    text = json.dumps(RESULTS, indent=2)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(text)


if __name__ == "__main__":
    main()
