"""Make tests/fixtures/autoround: a GPTQ checkpoint written by AutoRound itself, of a tiny synthetic Mixtral.

Two steps, each in its own environment (AutoRound pins its own torch and transformers):

    # 1. the float model, with mxtools (the project's .venv); the tests rebuild it the same way
    .venv/bin/python tools/autoround_fixture.py float /tmp/ar-float
    # 2. AutoRound's GPTQ export of it, and AutoRound's own dequantization of a few tensors
    /work/venvs/autoround/bin/python tools/autoround_fixture.py quantize /tmp/ar-float tests/fixtures/autoround

Step 2 quantizes with AutoRound (int4, group size 32, symmetric, a few sign-gradient iterations on a short
calibration text whose token ids fit the model's 512-token vocabulary), saves it with format "auto_gptq" and then,
for the tensors in EXPECTED, builds AutoRound's own packed Linear (auto_round_extension's torch_zp QuantLinear: the
class its exporter packs with and its CPU inference backend for GPTQ checkpoints, built as that backend builds it,
without g_idx for desc_act false) from the saved tensors and runs it on the identity matrix: its forward pass
computes the weight it multiplies by, which is stored as expected.safetensors (float32 [out, in]) beside the
checkpoint (OUT/checkpoint is what AutoRound saved, less its tokenizer.json). The large tokenizer.json AutoRound
saves is dropped (the tests add mxtools' own, which transformers re-saved unchanged), and VERSIONS records the
tools' versions and the settings.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import fixture_common

# the float model: tests/conftest.py's small_spec with a 512-token vocabulary (so the fixture stays small), seed 0
SPEC = dict(n_layers=2, dim=64, hidden_dim=128, n_heads=4, n_kv_heads=2, head_dim=16, n_experts=4,
            n_experts_per_tok=2, vocab_size=512)
SEED = 0
SETTINGS = dict(bits=4, group_size=32, sym=True, iters=20, nsamples=8, seqlen=64, batch_size=4)
# words whose Mixtral v1 token ids are all below 512
WORDS = ["in", "the", "of", "to", "and", "a", "on", "at", "by", "is"]
EXPECTED = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj",
            "model.layers.0.block_sparse_moe.experts.0.gate_proj",
            "model.layers.1.block_sparse_moe.experts.3.down_proj")


def make_float(out: Path) -> None:
    import torch

    from mxtools.commands.convert import write_checkpoint
    from mxtools.commands.synth import synth_checkpoint, synth_spec
    spec = synth_spec("tiny", **SPEC)
    write_checkpoint(synth_checkpoint(spec, SEED, torch.float16), "hf", out, "f16")


def calibration_texts(n: int) -> list[str]:
    import random
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(200)) for _ in range(n)]


def expected_only(out: Path) -> None:
    write_expected(out)
    write_versions(out)


def quantize(src: Path, out: Path) -> None:
    import torch
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16)
    tok = AutoTokenizer.from_pretrained(src)
    s = SETTINGS
    ar = AutoRound(model, tok, bits=s["bits"], group_size=s["group_size"], sym=s["sym"], iters=s["iters"],
                   nsamples=s["nsamples"], seqlen=s["seqlen"], batch_size=s["batch_size"],
                   dataset=calibration_texts(s["nsamples"] * 2), device_map="cpu", enable_torch_compile=False)
    staging = out.with_name(out.name + ".staging")
    ar.quantize_and_save(str(staging), format="auto_gptq")
    saved = next(p.parent for p in staging.rglob("config.json"))  # AutoRound saves into a sub-folder it names
    out.mkdir(parents=True)
    saved.rename(out / "checkpoint")
    shutil.rmtree(staging, ignore_errors=True)
    (out / "checkpoint" / "tokenizer.json").unlink(missing_ok=True)
    write_expected(out)
    write_versions(out)


def _stored(out: Path) -> dict:
    from safetensors.torch import load_file
    tensors = {}
    for f in sorted((out / "checkpoint").glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def write_expected(out: Path) -> None:
    """AutoRound's own dequantization of EXPECTED: its QuantLinear's forward on the identity matrix."""
    import torch
    from auto_round_extension.torch.qlinear_torch_zp import QuantLinear
    from safetensors.torch import save_file

    stored, s, expected = _stored(out), SETTINGS, {}
    for base in EXPECTED:
        in_f, out_f = stored[f"{base}.g_idx"].shape[0], stored[f"{base}.scales"].shape[1]
        layer = QuantLinear(s["bits"], s["group_size"], in_f, out_f, False)  # as its inference builds it (no g_idx)
        for part in ("qweight", "qzeros", "scales"):
            getattr(layer, part).copy_(stored[f"{base}.{part}"])
        layer.post_init()
        with torch.no_grad():
            w = layer(torch.eye(in_f, dtype=torch.float32))  # x @ W^T with x = I: W^T [in, out]
        expected[f"{base}.weight"] = w.T.contiguous().float()
    save_file(expected, out / "expected.safetensors")


def write_versions(out: Path) -> None:
    lines = [f"float model: mxtools synth spec {json.dumps(SPEC)} seed {SEED} f16",
             f"settings: {json.dumps(SETTINGS)}, format auto_gptq, calibration: tools/autoround_fixture.py",
             "tokenizer.json removed after saving (the tests add mxtools' Mixtral v1 one)",
             "expected.safetensors: auto_round_extension QuantLinear forward on the identity (float32 [out, in])"]
    fixture_common.write_versions(out, ("auto-round", "torch", "transformers", "safetensors"), lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "float":
        make_float(Path(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "quantize":
        quantize(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit(__doc__)
