"""Block-level proxy for out-of-domain quality: GPTQ with the defaults against GPTQ + block-output reconstruction
(`tune_iters` = argv[1], the float weight's pull on the start argv[2]), on the bundled model with all 128 x 2048
calibration ids. For the first argv[3] layers, each variant through its own quantized layers, the relative squared
error of the hidden state against the float model at the scored positions (the second half) of 16 chunks of 512
of each held-out text (EVAL_TEXTS).

    python bench/tune_proxy.py 25 0.5 2
"""
import sys
import time

import torch

from mxtools.commands.quantize import calibration_tokens, quant_config, resolve_settings
from mxtools.core import chunking
from mxtools.core.bundled import CALIB, MODEL
from mxtools.core.defaults import EVAL_TEXTS
from mxtools.layouts import open_checkpoint
from mxtools.model import forward
from mxtools.quant.gptq_pipeline import quantize_checkpoint
from mxtools.quant.gptq_tune import TuneConfig, dequantized_layer

torch.set_num_threads(2)
iters, pull, LAYERS, CHUNKS = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), 16
s = resolve_settings()
cfg = quant_config(s)
with open_checkpoint(MODEL) as ck:
    spec = ck.spec
    toks = calibration_tokens(ck, CALIB)
    evals = {n: chunking.with_bos(chunking.chunk_tokens(chunking.tokenize_file(ck.tokenizer, p), 512, CHUNKS))
             for n, p in EVAL_TEXTS.items()}
    rope = forward.rope_tables(spec, 512, "cpu", torch.float32)
    h_f = {n: forward.embed(ck, t, "cpu", torch.float32) for n, t in evals.items()}
    floats = [forward.load_layer(ck, i, "cpu", torch.float32) for i in range(LAYERS)]
    out = {}
    for name, tune in (("gptq", None), (f"tune{iters}", TuneConfig(iters=iters, pull=pull))):
        t0 = time.process_time()
        stream = quantize_checkpoint(ck, toks, cfg, "gptq", "routed", 128, 2048, "cpu", None, tune=tune)
        h_q = {n: h.clone() for n, h in h_f.items()}
        hf = {n: h.clone() for n, h in h_f.items()}
        for lq in stream:
            i = lq.index
            wq = dequantized_layer(floats[i], lq.results, i)
            for n in evals:
                with torch.no_grad():
                    hf[n] = forward.layer_forward(hf[n], floats[i], spec, rope)[0]
                    h_q[n] = forward.layer_forward(h_q[n], wq, spec, rope)[0]
                    d = hf[n][:, 256:] - h_q[n][:, 256:]
                    out[(name, i, n)] = float(d.pow(2).sum() / hf[n][:, 256:].pow(2).sum())
            print(name, i, {n: out[(name, i, n)] for n in evals}, lq.report.get("tune"), flush=True)
            if i + 1 == LAYERS:
                break
        print(name, "cpu s", time.process_time() - t0, flush=True)
for i in range(LAYERS):
    for n in evals:
        g, t = out[("gptq", i, n)], out[(f"tune{iters}", i, n)]
        print(f"layer {i} {n}: relative hidden error gptq {g:.4e} tuned {t:.4e} ratio {t / g:.3f}")
