"""Perplexity throughput of our harness against llama.cpp (llama-cpp-python) on the same GGUF and text, same
run, and the peak memory of verifying `synth --preset 8x7b --layers 2` against itself. Run by `make bench`."""
from __future__ import annotations

import json
import os
import sys
import time

import torch
from common import OUT, PY, ROOT, synth_8x7b_2layers, timed

from mxtools.commands.convert import convert
from mxtools.core import chunking
from mxtools.core.bundled import EVAL, MODEL
from mxtools.layouts import open_checkpoint
from mxtools.verify import verify

sys.path.insert(0, str(ROOT / "tests"))  # the judge: llama.cpp tokenizes and chunks the text itself
from judges import llama_cpp_perplexity

CHUNKS, CTX, THREADS = 16, 512, 2


def ours(path) -> tuple[float, float]:
    with open_checkpoint(path) as ck:
        tokens = chunking.tokenize_file(ck.tokenizer, EVAL)
        t = time.time()
        r = verify(ck, None, tokens, ctx=CTX, chunks=CHUNKS, device="cpu", dtype=torch.float32)
        return time.time() - t, r["ppl"]


def llama_cpp(path) -> tuple[float, float]:
    from llama_cpp import Llama
    llm = Llama(model_path=str(path), n_ctx=CTX, n_batch=CTX, logits_all=True, type_k=0, type_v=0,
                n_threads=THREADS, verbose=False)
    t = time.time()
    ppl, _ = llama_cpp_perplexity(llm, EVAL, CTX, CHUNKS)
    dt = time.time() - t
    llm.close()
    return dt, ppl


def main():
    torch.set_num_threads(THREADS)
    OUT.mkdir(parents=True, exist_ok=True)
    rows = {}
    for outtype in ("f16", "q8_0"):
        g = convert(MODEL, "gguf", OUT / f"tiny-{outtype}.gguf", outtype, force=True)
        (t_o, p_o), (t_l, p_l) = ours(g), llama_cpp(g)
        n = CHUNKS * CTX
        rows[f"tiny {outtype}"] = {"tokens": n, "ours_tok_s": round(n / t_o), "llama_cpp_tok_s": round(n / t_l),
                                   "speed_ratio": round(t_l / t_o, 3), "ppl_ours": p_o, "ppl_llama_cpp": p_l}
        print(rows[f"tiny {outtype}"], flush=True)
    src = synth_8x7b_2layers()
    mem = timed([PY, "-m", "mxtools.cli", "verify", src, "--reference", src, "--ctx", "512", "--chunks", "2",
                 "--json", OUT / "verify-8x7b.json"], {"OMP_NUM_THREADS": str(THREADS)})
    rows["verify synth-8x7b-2L vs itself, 2 chunks of 512, CPU f32"] = mem
    print(mem)
    (OUT / "perplexity.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    main()
