"""Make tests/fixtures/llmcompressor: compressed-tensors checkpoints written by llm-compressor itself, of the tiny
synthetic Mixtral tools/autoround_fixture.py starts from (its `float` step makes it).

    .venv/bin/python tools/autoround_fixture.py float /tmp/ar-float
    /work/venvs/llmc/bin/python tools/llmcompressor_fixture.py /tmp/ar-float tests/fixtures/llmcompressor

llm-compressor 0.14.0.1 needs transformers 5.15-5.17, so it runs in its own environment (llmc: torch 2.13.0 CPU,
llmcompressor 0.14.0.1, compressed-tensors and transformers as it pins them). One checkpoint per RECIPES entry,
each under OUT/<name>/checkpoint:

- w4a16-g32: GPTQ, int4, group size 32, symmetric (format pack-quantized)
- w4a16-asym-g32: GPTQ, int4, group size 32, asymmetric (pack-quantized, weight_zero_point stored)
- w8a16-channel: GPTQ, int8, one scale per output row, symmetric (pack-quantized)
- fp8-dynamic: round to nearest FP8 e4m3, one scale per output row (FP8_DYNAMIC: float-quantized)
- fp8-tensor: FP8 e4m3 with one scale per tensor and static input scales (FP8: float-quantized)

The router (`re:.*gate$`) and lm_head are left unquantized, as llm-compressor's examples do for MoE models.
After saving, each module of EXPECTED is decompressed by compressed-tensors' own compressor for the checkpoint's
format (`BaseCompressor.load_from_registry(format).decompress` with the scheme read back from config.json) and
stored as OUT/<name>/expected.safetensors ([out, in], in the scale's dtype, as compressed-tensors returns it).
tokenizer.json is dropped (the tests add mxtools' own); VERSIONS records the versions and settings.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import fixture_common

WORDS = ["in", "the", "of", "to", "and", "a", "on", "at", "by", "is"]  # Mixtral v1 ids below 512
IGNORE = ["lm_head", "re:.*gate$"]
W4_ASYM_G32 = {"weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32, "symmetric": False,
                           "dynamic": False}, "targets": ["Linear"]}
W4_G32 = {"weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32, "symmetric": True,
                      "dynamic": False}, "targets": ["Linear"]}
W8_CHANNEL = {"weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True, "dynamic": False},
              "targets": ["Linear"]}
# name -> (modifier, its settings)
RECIPES = {
    "w4a16-g32": ("gptq", {"config_groups": {"group_0": W4_G32}}),
    "w4a16-asym-g32": ("gptq", {"config_groups": {"group_0": W4_ASYM_G32}}),
    "w8a16-channel": ("gptq", {"config_groups": {"group_0": W8_CHANNEL}}),
    "fp8-dynamic": ("rtn", {"scheme": "FP8_DYNAMIC", "targets": ["Linear"]}),
    "fp8-tensor": ("rtn", {"scheme": "FP8", "targets": ["Linear"]}),
}
EXPECTED = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj",
            "model.layers.0.block_sparse_moe.experts.1.gate_proj",
            "model.layers.1.block_sparse_moe.experts.3.down_proj")


def calibration():
    from datasets import Dataset
    rng = random.Random(0)
    return Dataset.from_dict({"text": [" ".join(rng.choice(WORDS) for _ in range(64)) for _ in range(16)]})


def quantize(src: Path, out: Path, name: str) -> None:
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    kind, settings = RECIPES[name]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16)
    tok = AutoTokenizer.from_pretrained(src)
    modifier = (GPTQModifier(ignore=IGNORE, **settings) if kind == "gptq"
                else QuantizationModifier(ignore=IGNORE, **settings))
    needs_data = kind == "gptq" or settings.get("scheme") == "FP8"
    data = {"dataset": calibration(), "num_calibration_samples": 16, "max_seq_length": 64} if needs_data else {}
    oneshot(model=model, tokenizer=tok, recipe=modifier, **data)
    dst = out / name / "checkpoint"
    model.save_pretrained(dst, save_compressed=True)
    tok.save_pretrained(dst)
    (dst / "tokenizer.json").unlink(missing_ok=True)


def _stored(ckpt: Path) -> dict:
    from safetensors.torch import load_file
    tensors = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def write_expected(out: Path, name: str) -> None:
    """compressed-tensors' own decompression of each module of EXPECTED."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import save_file

    ckpt = out / name / "checkpoint"
    qc = QuantizationConfig.model_validate(json.loads((ckpt / "config.json").read_text())["quantization_config"])
    stored, expected = _stored(ckpt), {}
    for base in EXPECTED:
        group = next(g for g in qc.config_groups.values())
        fmt = group.format or qc.format
        compressor = BaseCompressor.load_from_registry(fmt)
        local = {k.removeprefix(base + "."): v for k, v in stored.items() if k.startswith(base + ".")}
        expected[f"{base}.weight"] = compressor.decompress(local, group)["weight"].contiguous()
    save_file(expected, out / name / "expected.safetensors")


def write_versions(out: Path) -> None:
    notes = ["float model: tools/autoround_fixture.py float (mxtools synth)",
             f"ignore: {json.dumps(IGNORE)}; calibration: tools/llmcompressor_fixture.py (16 x 64 tokens)"]
    notes += [f"{name}: {kind} {json.dumps(settings)}" for name, (kind, settings) in RECIPES.items()]
    notes += ["tokenizer.json removed after saving (the tests add mxtools' Mixtral v1 one)",
              "expected.safetensors: compressed-tensors' compressor decompress() of the saved tensors ([out, in])"]
    fixture_common.write_versions(out, ("llmcompressor", "compressed-tensors", "torch", "transformers",
                                        "safetensors"), notes)


if __name__ == "__main__":
    fixture_common.make_fixtures(__doc__, RECIPES, quantize, write_expected, write_versions)
