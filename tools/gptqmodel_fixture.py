"""Make tests/fixtures/gptqmodel: a GPTQ checkpoint written by GPTQModel itself, of the tiny synthetic Mixtral
tools/autoround_fixture.py starts from (its `float` step makes it), with act-order (desc_act: g_idx not
monotone) and GPTQModel's v2 packing (checkpoint_format "gptq_v2": zero points stored without v1's offset).

    .venv/bin/python tools/autoround_fixture.py float /tmp/ar-float
    GPTQMODEL_CPU_WORKERS=2 .venv/bin/python tools/gptqmodel_fixture.py /tmp/ar-float tests/fixtures/gptqmodel

(GPTQModel 7.6 refuses to start on CPU with fewer than 2 workers.)

GPTQModel 7.6 is a test judge of the project's .venv. After saving, the checkpoint is loaded back with GPTQModel
(its CPU torch kernel) and each module of EXPECTED dequantized by the kernel's own `dequantize_weight()`, stored
as expected.safetensors (float32 [out, in]) beside OUT/checkpoint; tokenizer.json is dropped (the tests add
mxtools' own) and VERSIONS records the versions and settings.
"""
from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import fixture_common

SETTINGS = dict(bits=4, group_size=32, sym=True, desc_act=True)
WORDS = ["in", "the", "of", "to", "and", "a", "on", "at", "by", "is"]  # Mixtral v1 ids below 512
EXPECTED = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.experts.1.gate_proj",
            "model.layers.1.mlp.experts.2.down_proj")


def quantize(src: Path, out: Path) -> None:
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization import FORMAT

    rng = random.Random(0)
    calibration = [" ".join(rng.choice(WORDS) for _ in range(64)) for _ in range(32)]
    torch.manual_seed(0)
    cfg = QuantizeConfig(**SETTINGS, format=FORMAT.GPTQ_V2, device="cpu")
    model = GPTQModel.load(str(src), cfg, dtype=torch.float16)
    model.quantize(calibration, batch_size=4)
    out.mkdir(parents=True)
    model.save(str(out / "checkpoint"))
    (out / "checkpoint" / "tokenizer.json").unlink(missing_ok=True)


def write_expected(out: Path) -> None:
    import torch
    from gptqmodel import BACKEND, GPTQModel
    from safetensors.torch import save_file

    model = GPTQModel.load(str(out / "checkpoint"), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    modules = dict(model.model.named_modules())
    expected = {}
    for name in EXPECTED:
        with torch.no_grad():
            w = modules[name].dequantize_weight()  # [in, out]
        expected[f"{name}.weight"] = w.T.float().contiguous()
    save_file(expected, out / "expected.safetensors")


def write_versions(out: Path) -> None:
    lines = ["float model: tools/autoround_fixture.py float (mxtools synth)",
             f"settings: {json.dumps(SETTINGS)}, format gptq_v2, calibration: tools/gptqmodel_fixture.py",
             "tokenizer.json removed after saving (the tests add mxtools' Mixtral v1 one)",
             "expected.safetensors: GPTQModel TorchQuantLinear.dequantize_weight() (float32 [out, in])"]
    fixture_common.write_versions(out, ("gptqmodel", "torch", "transformers", "safetensors"), lines)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    dst = Path(sys.argv[2])
    quantize(Path(sys.argv[1]), dst)
    shutil.rmtree(dst / "checkpoint" / "__pycache__", ignore_errors=True)
    write_expected(dst)
    write_versions(dst)
