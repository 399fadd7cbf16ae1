"""Make tests/fixtures/bnb: bitsandbytes checkpoints serialized by transformers' save_pretrained, of the tiny
synthetic Mixtral tools/autoround_fixture.py starts from (its `float` step makes it).

    .venv/bin/python tools/autoround_fixture.py float /tmp/ar-float
    .venv/bin/python tools/bnb_fixture.py /tmp/ar-float tests/fixtures/bnb

bitsandbytes (0.50, with its CPU backend) and transformers are in the project's .venv. One checkpoint per
CONFIGS entry, each under OUT/<name>/checkpoint: `from_pretrained(float, quantization_config=BitsAndBytesConfig(
...), device_map="cpu")` then `save_pretrained`. transformers 5 quantizes the nn.Linear modules only: the
attention projections; its Mixtral keeps the experts as fused 3-D parameters, which bitsandbytes leaves in f16
(and the router and lm_head, which it skips). After saving, the checkpoint is loaded back through transformers
and each module of EXPECTED dequantized by bitsandbytes' own functions from the loaded parameter's quantization
state (`dequantize_4bit(weight, weight.quant_state)`, `int8_vectorwise_dequant(weight.CB, weight.SCB)`), stored
as OUT/<name>/expected.safetensors ([out, in], as bitsandbytes returns it). tokenizer.json is dropped (the
tests add mxtools' own); VERSIONS records the versions and settings.
"""
from __future__ import annotations

import json
from pathlib import Path

import fixture_common

CONFIGS = {
    "nf4-double": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                       bnb_4bit_compute_dtype="float16"),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False,
                bnb_4bit_compute_dtype="float16"),
    "int8": dict(load_in_8bit=True),
}
EXPECTED = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.o_proj")


def _config(name: str):
    import torch
    from transformers import BitsAndBytesConfig
    kw = dict(CONFIGS[name])
    if "bnb_4bit_compute_dtype" in kw:
        kw["bnb_4bit_compute_dtype"] = getattr(torch, kw["bnb_4bit_compute_dtype"])
    return BitsAndBytesConfig(**kw)


def quantize(src: Path, out: Path, name: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=_config(name), device_map="cpu",
                                                 dtype=torch.float16)
    dst = out / name / "checkpoint"
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    (dst / "tokenizer.json").unlink(missing_ok=True)


def write_expected(out: Path, name: str) -> None:
    import bitsandbytes.functional as F
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / name / "checkpoint", device_map="cpu", dtype=torch.float16)
    modules, expected = dict(model.named_modules()), {}
    for base in EXPECTED:
        w = modules[base].weight
        with torch.no_grad():
            if name == "int8":
                deq = F.int8_vectorwise_dequant(w.CB if w.CB is not None else w.data, w.SCB)
            else:
                deq = F.dequantize_4bit(w.data, w.quant_state)
        expected[f"{base}.weight"] = deq.contiguous()
    save_file(expected, out / name / "expected.safetensors")


def write_versions(out: Path) -> None:
    notes = ["float model: tools/autoround_fixture.py float (mxtools synth)"]
    notes += [f"{name}: BitsAndBytesConfig({json.dumps(kw)})" for name, kw in CONFIGS.items()]
    notes += ["tokenizer.json removed after saving (the tests add mxtools' Mixtral v1 one)",
              ("expected.safetensors: bitsandbytes.functional dequantize_4bit / int8_vectorwise_dequant of the "
               "parameters transformers loaded back ([out, in])")]
    fixture_common.write_versions(out, ("bitsandbytes", "torch", "transformers", "safetensors"), notes)


if __name__ == "__main__":
    fixture_common.make_fixtures(__doc__, CONFIGS, quantize, write_expected, write_versions)
