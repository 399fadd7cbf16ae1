"""llm-compressor's GPTQModifier as a second peer in the GPTQ comparison, judged like the GPTQModel rows.

llm-compressor 0.14 pins transformers <= 5.17, so it cannot share the project venv (transformers 5.24); it runs
from its own venv (--python, default /work/venvs/llmc/bin/python; set it up with `python3 -m venv
/work/venvs/llmc && /work/venvs/llmc/bin/pip install torch==2.13.0 llmcompressor sentencepiece protobuf`: oneshot
insists on a tokenizer when given a dataset, and the bundled model has only tokenizer.model), in child processes:

1. quantize: the bundled tiny Mixtral loaded in bf16 on the CPU under llm-compressor's
   `load_quantizable_moe` (transformers 5's fused 3-D MixtralExperts are linearized into one nn.Linear per
   expert projection, gate_proj/up_proj/down_proj), then `oneshot` with `GPTQModifier(targets="Linear",
   scheme=..., ignore=["lm_head", "re:.*mlp.gate$"])` at its own defaults (damp 0.01, block 128, actorder
   "static", memoryless min/max scale observer) and oneshot's MoE default `moe_calibrate_all_experts=True`
   (every expert is run on every token, so every expert's Hessian sees all calibration tokens; only the
   routed experts' outputs reach the block's output). It is fed the very token ids our pipeline calibrates on
   (bench/gptqmodel_compare.calibration_samples: 128 windows of 2048 tokens, BOS first) as a datasets.Dataset
   of input_ids + all-ones attention_mask, batch 1, unshuffled; the sequential pipeline (one decoder layer
   at a time, later layers fed by the quantized earlier ones) is what oneshot infers for GPTQ. Saved with
   `save_pretrained(save_compressed=True)`: compressed-tensors pack-quantized (weight_packed int32,
   weight_scale, weight_shape), the format vLLM's compressed-tensors loader reads.
2. decompress: the SAVED checkpoint's tensors are read back and decompressed with compressed-tensors' own
   `PackedQuantizationCompressor.decompress` with the scales cast to float32 (so q * scale is exact; the
   loader's bf16 product is reported beside it), checked to lie on the 2^bits-level grid per group (per row
   at channel-wise), renamed to our tensor names and written as a float32 HF directory with our
   tokenizer.model. The unquantized tensors (embeddings, norms, routers, lm_head) are checked to be the
   reference's own.
3. judge: bench/judge.py, as bench/gptqmodel_compare.py does: `mxtools verify` (project venv) on both bundled
   held-out texts, every 512-token chunk, against the saved bases of the bf16 reference's log-probs; the row
   lands in its rows/ folder.

Threads: --threads (default 1: torch.set_num_threads and OMP/MKL in the child, verify at the same count),
rows kept in bench/out/gptqmodel_compare-t1/rows/ beside the 1-thread mxtools and GPTQModel rows (at 2
threads: bench/out/gptqmodel_compare/rows/). Every child runs under `nice -n 19`.

    python bench/llmcompressor_compare.py [--rows llmc-int4-g128,...] [--threads 1] [--nsamples N --seqlen L]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import judge
from common import OUT, ROOT, timed
from gptqmodel_compare import calibration_samples
from judge import judge_row, table

sys.path.insert(0, str(ROOT))
from mxtools.core.bundled import MODEL

LLMC_PY = "/work/venvs/llmc/bin/python"
IGNORE = ["lm_head", "re:.*mlp.gate$"]  # transformers 5 Mixtral: the router is model.layers.i.mlp.gate

# The quantizing child (llm-compressor's venv): load, oneshot GPTQ on our samples, save compressed.
QUANTIZE_SCRIPT = r"""
import json, sys, time, collections
from importlib.metadata import version
import torch
src, samples, out, info, settings, threads = sys.argv[1:7]
settings = json.loads(settings)
torch.set_num_threads(int(threads))
from datasets import Dataset
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modeling.moe.linearize import load_quantizable_moe
from llmcompressor.modifiers.gptq import GPTQModifier

ids = torch.load(samples)
n, L = ids.shape
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})

# count the tokens each quantized Linear's Hessian accumulates (GPTQModifier's own hook, wrapped)
tokens = collections.Counter()
calibrate = GPTQModifier.calibrate_module
def counted(self, module, args, output):
    tokens[self._module_names.get(module, "?")] += args[0].shape[:-1].numel()
    return calibrate(self, module, args, output)
GPTQModifier.calibrate_module = counted

t0 = time.perf_counter()
with load_quantizable_moe():
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
recipe = GPTQModifier(targets="Linear", ignore=settings["ignore"], **settings["modifier"])
t = time.perf_counter()
oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=n, max_seq_length=L,
        shuffle_calibration_samples=False, moe_calibrate_all_experts=settings["moe_calibrate_all_experts"],
        batch_size=1)
secs = time.perf_counter() - t
model.save_pretrained(out, save_compressed=True)
experts = {k: v for k, v in tokens.items() if ".experts." in k}
json.dump({"quantize_call_s": round(secs, 2), "load_s": round(t - t0, 2),
           "versions": {p: version(p) for p in ("llmcompressor", "compressed-tensors", "transformers", "torch",
                                                "accelerate", "datasets")},
           "settings": settings,
           "modifier": {k: str(v) for k, v in recipe.model_dump().items() if k in
                        ("block_size", "dampening_frac", "actorder", "batched_quantization", "scheme", "targets",
                         "ignore", "config_groups")},
           "rtn_fallbacks": list(recipe._rtn_fallback_module_names),
           "linears": len(tokens), "expert_linears": len(experts),
           "expert_tokens_min": min(experts.values()) if experts else None,
           "expert_tokens_max": max(experts.values()) if experts else None,
           "tokens_per_linear": dict(tokens)}, open(info, "w"), indent=1)
"""

# The decompressing child (llm-compressor's venv, for compressed-tensors): saved checkpoint -> fp32, our names.
DECOMPRESS_SCRIPT = r"""
import json, re, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationConfig
raw, ref, dst = map(Path, sys.argv[1:4])

cfg = json.loads((raw / "config.json").read_text())["quantization_config"]
qc = QuantizationConfig.model_validate(cfg)
assert qc.format == "pack-quantized", qc.format
assert len(qc.config_groups) == 1, qc.config_groups
scheme = next(iter(qc.config_groups.values()))
w = scheme.weights
bits, strategy, group = w.num_bits, str(w.strategy.value if hasattr(w.strategy, "value") else w.strategy), w.group_size
lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1   # symmetric int: [-8, 7] at 4 bits

src = {}
for f in sorted(raw.glob("*.safetensors")):
    src.update(load_file(f))
reference = {}
for f in sorted(ref.glob("*.safetensors")):
    reference.update(load_file(f))

EXPERT = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
def our_name(k):
    # transformers 5.17's save renames .mlp. back to .block_sparse_moe. but keeps the linearized experts'
    # gate_proj/up_proj/down_proj (gate_up_proj was cat(w1, w3): gate_proj is w1, up_proj w3; down_proj w2)
    k = re.sub(r"\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.",
               lambda m: f".block_sparse_moe.experts.{m[1]}.{EXPERT[m[2]]}.", k)
    return re.sub(r"\.mlp\.gate\.", ".block_sparse_moe.gate.", k)

out, facts = {}, {"bits": bits, "strategy": strategy, "group_size": group, "symmetric": w.symmetric,
                  "actorder": str(w.actorder), "quantized": 0, "max_levels_per_group": 0, "g_idx": 0,
                  "scale_dtype": None, "bf16_product_max_abs_diff": 0.0, "bf16_product_differs": 0,
                  "unquantized_identical_to_reference": True, "raw_keys_sample": sorted(src)[:12]}
prefixes = sorted({k[: -len(".weight_packed")] for k in src if k.endswith(".weight_packed")})
fused = [k for k in src if re.search(r"experts\.(gate_up_proj|down_proj)", k)]
assert not fused, f"fused 3-D expert tensors in the saved checkpoint: {fused[:4]}"
for p in prefixes:
    sd = {s: src.pop(f"{p}.{s}") for s in ("weight_packed", "weight_scale", "weight_shape")}
    gidx = src.pop(f"{p}.weight_g_idx", None)
    assert f"{p}.weight_zero_point" not in src, "symmetric scheme saved a zero point"
    facts["scale_dtype"] = str(sd["weight_scale"].dtype)
    exact = PackedQuantizationCompressor.decompress({**sd, "weight_scale": sd["weight_scale"].float()},
                                                    scheme)["weight"]
    loader = PackedQuantizationCompressor.decompress(dict(sd), scheme)["weight"]   # the stored-dtype product
    assert exact.dtype == torch.float32, exact.dtype
    d = (exact - loader.float()).abs()
    facts["bf16_product_max_abs_diff"] = max(facts["bf16_product_max_abs_diff"], d.max().item())
    facts["bf16_product_differs"] += int((d > 0).sum())
    # the grid check: every weight / its group's scale is an integer in [lo, hi]; at most 2^bits values a group
    rows, cols = exact.shape
    scale = sd["weight_scale"].float()
    if strategy == "group":
        col_group = gidx.long() if gidx is not None else torch.arange(cols) // group
        facts["g_idx"] += gidx is not None
        s = scale[:, col_group]
    elif strategy == "channel":
        assert scale.shape == (rows, 1), scale.shape
        col_group = torch.zeros(cols, dtype=torch.long)
        s = scale.expand(rows, cols)
    else:
        raise SystemExit(f"unexpected strategy {strategy}")
    q = exact / s
    assert torch.equal(q, q.round()), f"{p}: off-grid weights"
    assert q.min() >= lo and q.max() <= hi, f"{p}: codes outside [{lo}, {hi}]"
    for g in col_group.unique():
        vals = exact[:, col_group == g]
        levels = max(torch.unique(r).numel() for r in vals)
        facts["max_levels_per_group"] = max(facts["max_levels_per_group"], levels)
    assert facts["max_levels_per_group"] <= 1 << bits
    name = our_name(p + ".weight")
    ref_w = reference[name].float()
    rel = ((exact - ref_w).norm() / ref_w.norm()).item()   # the right tensor under the right name
    assert rel < 0.5, f"{p} -> {name}: relative error {rel:.3f} against the reference"
    facts["max_rel_err_vs_reference"] = max(facts.get("max_rel_err_vs_reference", 0.0), rel)
    out[name] = exact.contiguous()
    facts["quantized"] += 1
for k, v in src.items():
    name = our_name(k)
    if not torch.equal(v, reference[name]):
        facts["unquantized_identical_to_reference"] = False
    out[name] = v.float().contiguous()
missing = sorted(set(reference) - set(out))
extra = sorted(set(out) - set(reference))
assert not missing and not extra, (missing[:5], extra[:5])
for k in out:
    assert tuple(out[k].shape) == tuple(reference[k].shape), k
dst.mkdir(parents=True)
for f in ref.iterdir():
    if f.is_file() and f.name != "config.json" and not f.name.endswith((".safetensors", ".index.json")):
        (dst / f.name).write_bytes(f.read_bytes())
config = json.loads((ref / "config.json").read_text())
config["torch_dtype"] = "float32"
(dst / "config.json").write_text(json.dumps(config, indent=2))
save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
facts["tensors"] = len(out)
print(json.dumps(facts))
"""

# Every row: label, the GPTQModifier settings (its defaults for everything not named)[, moe_calibrate_all_experts].
ROWS = {
    "llmc-int4-g128": ("llm-compressor GPTQModifier W4A16 int4 g128 (its defaults)", {"scheme": "W4A16"}),
    "llmc-int8-g128": ("llm-compressor GPTQModifier W8A16 int8 g128 (its defaults)", {"scheme": "W8A16"}),
    "llmc-int4-g-1": ("llm-compressor GPTQModifier int4 channel-wise (W4A16 with strategy channel, its defaults)",
                      {"config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                          "num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel"}}}}),
    # not its default: oneshot(moe_calibrate_all_experts=False), each expert calibrated on its routed tokens only
    # (as mxtools and GPTQModel do), to see what the all-experts default is worth
    "llmc-int4-g128-routed": (("llm-compressor GPTQModifier W4A16 int4 g128 (its defaults, but experts calibrated "
                               "on routed tokens only: moe_calibrate_all_experts=False)"), {"scheme": "W4A16"}, False),
}


def nice(cmd: list) -> list:
    return ["nice", "-n", "19", *map(str, cmd)]


def quantize(name: str, samples: Path, work: Path, args) -> tuple[Path, dict, dict]:
    """Quantize in llm-compressor's venv (timed: wall, CPU, peak RSS), decompress the saved checkpoint to a
    float32 HF directory with our names; (that directory, timing, log)."""
    raw, dst, info = work / f"{name}-raw", work / name, work / f"{name}-raw-run.json"
    shutil.rmtree(raw, ignore_errors=True)
    shutil.rmtree(dst, ignore_errors=True)
    all_experts = ROWS[name][2] if len(ROWS[name]) > 2 else True  # oneshot's default: True
    settings = {"modifier": ROWS[name][1], "ignore": IGNORE, "moe_calibrate_all_experts": all_experts}
    threads = str(args.threads)
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    script = work / "llmc_quantize.py"  # a file, not -c: /usr/bin/time's report then names a path, not the code
    script.write_text(QUANTIZE_SCRIPT)
    timing = timed(nice([args.python, script, MODEL, samples, raw, info, json.dumps(settings), threads]), env)
    log = json.loads(info.read_text())
    timing.update(quantize_call_s=log.pop("quantize_call_s"), load_s=log.pop("load_s"))
    script = work / "llmc_decompress.py"
    script.write_text(DECOMPRESS_SCRIPT)
    p = subprocess.run(nice([args.python, script, raw, MODEL, dst]), check=False, capture_output=True,
                       text=True, env={**os.environ, **env})
    if p.returncode:
        raise RuntimeError(f"decompress {raw} failed:\n{p.stderr[-3000:]}")
    log["decompressed"] = json.loads(p.stdout.strip().splitlines()[-1])
    log["saved_quantization_config"] = json.loads((raw / "config.json").read_text())["quantization_config"]
    return dst, timing, log


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="llmc-int4-g128", help=f"comma-separated, from {', '.join(ROWS)}")
    ap.add_argument("--python", default=LLMC_PY, help="llm-compressor venv's python")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1, help="threads of the quantizer and of verify")
    ap.add_argument("--reuse", action="store_true", help="verify a row's kept quantization again, do not redo it")
    ap.add_argument("--work", type=Path, default=None, help="output folder (default: the gptqmodel_compare one "
                                                            "for this thread count)")
    args = ap.parse_args()
    work = args.work or (OUT / ("gptqmodel_compare" if args.threads == 2 else f"gptqmodel_compare-t{args.threads}"))
    (work / "rows").mkdir(parents=True, exist_ok=True)
    samples = work / f"calib_samples-{args.nsamples}x{args.seqlen}.pt"
    calibration = calibration_samples(args.nsamples, args.seqlen, samples)
    judge.THREADS.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    for name in args.rows.split(","):
        done = work / "rows" / f"{name}-quantize.json"
        if args.reuse and done.exists():
            path, (timing, log) = work / name, json.loads(done.read_text())
        else:
            path, timing, log = quantize(name, samples, work, args)
            done.write_text(json.dumps([timing, log], default=str, indent=1))
        result = {**judge_row(ROWS[name][0], path, work, name, timing, f"gptq-int{log['decompressed']['bits']}"),
                  "row": name, "threads": args.threads, "versions": log.get("versions"),
                  "quantize_log": log, "calibration": calibration}
        (work / "rows" / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
        print(json.dumps({k: v for k, v in result.items() if k not in ("quantize_log",)}, default=str), flush=True)
    rows = [json.loads((work / "rows" / f"{n}.json").read_text()) for n in ROWS
            if (work / "rows" / f"{n}.json").exists()]
    print(table(rows))


if __name__ == "__main__":
    main()
