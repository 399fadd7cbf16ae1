"""The defaults the command line, the recipes and the library share, in one table. Importing this module costs
nothing (no torch, no C extension): `mxtools --help` reads it."""
from __future__ import annotations

from .bundled import CALIB, EVAL, FICTION

__all__ = [
           "CALIB",
           "COMPARE_FORMATS",
           "CTX",
           "DEVICES",
           "EVAL",
           "EVAL_TEXTS",
           "GPTQ_NAMINGS",
           "QUANTIZE",
           "SHARD_BYTES",
           "WRITABLE_LAYOUTS",
]

CTX = 512  # tokens per evaluation or importance-matrix chunk: llama-perplexity's and llama-imatrix's default
SHARD_BYTES = 5 * 10**9  # the largest HF-style shard, as transformers' save_pretrained
DEVICES = ("auto", "cuda", "cpu")

# The held-out texts every quality figure is reported on: the calibration domain (Wikipedia) and another one
# (Moby-Dick); mxtools/assets/text/SOURCES.md says where each comes from.
EVAL_TEXTS = {"wikipedia": EVAL, "fiction": FICTION}

# The layouts `convert --to` writes, in the order the layout registry (mxtools/layouts) registers them; the
# registry checks that it agrees.
WRITABLE_LAYOUTS = ("gguf", "hf", "gptq", "mistral")
GPTQ_NAMINGS = ("vllm", "transformers")  # layouts/gptq.py's NAMINGS: vLLM's names (the default) or transformers 5's

# `mxtools compare`'s candidates when --formats is not given.
COMPARE_FORMATS = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_k_m+imatrix", "gptq-int4", "rtn-int4", "bnb-nf4",
                   "bnb-int8")

# The settings of `mxtools quantize` (= recipes/gptq-int4-g128.yaml): damping 0.05, group-aware order, the
# Hessian-weighted range search, the scale re-fit, a second GPTQ pass on the re-fitted scales (re-fitted again)
# and one coordinate-descent sweep over the codes (followed by a re-fit); each lever's measured effect is in
# docs/BENCHMARKS.md. The asymmetric objective (GPTAQ, `gptaq`) is off: it did not help int4 on the bundled model.
# Then block-output reconstruction of each layer's group scales (200 steps; codes kept: tuning them did not help).
QUANTIZE = dict(bits=4, method="gptq", group_size=128, sym=True, act_order=False, damp=0.05, nsamples=128,
                seqlen=2048, experts="routed", static_groups=False, mse=False, min_tokens=None, act_group_aware=True,
                search="hessian", refit=True, repass=True, sweeps=1, gptaq=0.0, gptaq_ridge=0.05, tune_iters=200,
                tune_scales=True, tune_codes=False)
