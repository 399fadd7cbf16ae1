"""Non-finite weights: a block-quantized GGUF output and GPTQ/RTN quantize refuse NaN/inf with one
line naming the file and tensor; lossless outputs copy them bit for bit (NaN payloads included); inspect lists
them as problems."""
from __future__ import annotations

import shutil

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mxtools.cli import main

EXPERT = "model.layers.1.block_sparse_moe.experts.2.w1.weight"   # block-quantized in every mix
NORM = "model.layers.0.post_attention_layernorm.weight"          # kept F32 in every mix
NAN_BITS = 0x7FC0_1234  # a NaN with a payload: any canonicalising cast would change it


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr.strip()


def one_line_error(code, err, *must_contain):
    assert code == 2, err
    assert "\n" not in err and err.startswith("mxtools: error:"), err
    for s in must_contain:
        assert s in err, (s, err)


def _poisoned(src, dst, edits: dict) -> dict:
    """dst: a copy of the f32 HF directory src with tensor name -> {flat index: float32 bits} written in."""
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    for name, values in edits.items():
        bits = sd[name].view(torch.int32).reshape(-1)
        for i, b in values.items():
            bits[i] = b - (1 << 32) if b >= 1 << 31 else b
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return sd


INF, NEG_INF = 0x7F80_0000, 0xFF80_0000


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory, synth_dir):
    dst = tmp_path_factory.mktemp("nonfinite") / "src"
    sd = _poisoned(synth_dir("hf", "f32"), dst, {EXPERT: {5: NAN_BITS, 77: INF}, NORM: {3: NEG_INF}})
    return dst, sd


@pytest.mark.parametrize("outtype", ["q8_0", "q4_k_m"])
def test_block_quantized_gguf_refuses_nan(tmp_path, synth_dir, outtype):
    src = tmp_path / "src"
    _poisoned(synth_dir("hf", "f32"), src, {EXPERT: {130: NAN_BITS}})
    out = tmp_path / "o.gguf"
    code, _, err = run("convert", src, "--to", "gguf", "--outtype", outtype, "-o", out)
    one_line_error(code, err, "model.safetensors", f"tensor {EXPERT}", "row 2", "NaN")
    assert not out.exists() and not list(tmp_path.glob(".o.gguf.tmp*"))


def test_block_quantized_gguf_refuses_inf_in_a_float_tensor(tmp_path, poisoned):
    """A norm stays F32 inside a q4_k_m file, but the file as a whole is a quantized output: refused too."""
    code, _, err = run("convert", poisoned[0], "--to", "gguf", "--outtype", "q4_k_m", "-o", tmp_path / "o.gguf")
    one_line_error(code, err, "model.safetensors", f"tensor {NORM}", "-inf")


@pytest.mark.parametrize("method,name", [("rtn", EXPERT), ("gptq", EXPERT), ("gptq", NORM), ("rtn", NORM)])
def test_quantize_refuses_non_finite(tmp_path, synth_dir, method, name):
    src, out = tmp_path / "src", tmp_path / "q"
    _poisoned(synth_dir("hf", "f32"), src, {name: {3: NAN_BITS}})
    code, _, err = run("quantize", src, "--method", method, "--group-size", "32", "--nsamples", "2",
                       "--seqlen", "32", "--device", "cpu", "-o", out)
    one_line_error(code, err, "model.safetensors", f"tensor {name}", "GPTQ/RTN quantized output", "nan")
    assert not out.exists()


def _gguf_tensor(path, name, expert=None) -> np.ndarray:
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    data = np.asarray(t.data)
    return data[expert] if expert is not None else data


@pytest.mark.parametrize("layout", ["hf", "mistral", "gguf"])
def test_lossless_outputs_copy_non_finite_bits(tmp_path, poisoned, layout):
    src, sd = poisoned
    out = tmp_path / ("o.gguf" if layout == "gguf" else "o")
    code, _, err = run("convert", src, "--to", layout, "--outtype", "f32", "-o", out)
    assert code == 0, err
    if layout == "hf":
        got = {n: load_file(out / "model.safetensors")[n] for n in (EXPERT, NORM)}
    elif layout == "mistral":
        st = load_file(out / "consolidated.safetensors")
        got = {EXPERT: st["layers.1.feed_forward.experts.2.w1.weight"], NORM: st["layers.0.ffn_norm.weight"]}
    else:
        got = {EXPERT: torch.from_numpy(_gguf_tensor(out, "blk.1.ffn_gate_exps.weight", 2).copy()),
               NORM: torch.from_numpy(_gguf_tensor(out, "blk.0.ffn_norm.weight").copy())}
    for name, want in ((EXPERT, sd[EXPERT]), (NORM, sd[NORM])):
        assert got[name].numpy().tobytes() == want.numpy().tobytes(), name
    assert got[EXPERT].view(torch.int32).reshape(-1)[5].item() == NAN_BITS


def test_f16_output_keeps_them_non_finite(tmp_path, poisoned):
    src, sd = poisoned
    code, _, err = run("convert", src, "--to", "hf", "--outtype", "f16", "-o", tmp_path / "o")
    assert code == 0, err
    got = load_file(tmp_path / "o" / "model.safetensors")[EXPERT].float()
    want = sd[EXPERT]
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    assert torch.equal(got[finite], want.half().float()[finite])


def test_inspect_lists_non_finite_tensors(poisoned):
    code, out, err = run("inspect", poisoned[0])
    one_line_error(code, err, "model.safetensors", "NaN or infinite", "1 more problems")
    assert f"problem: {poisoned[0]}/model.safetensors: tensor {EXPERT}: holds NaN" in out
    assert f"tensor {NORM}: holds NaN or infinite values (first at flat index 3)" in out
    code, out, err = run("inspect", poisoned[0], "--no-weights")
    assert code == 0 and "no problems found" in out, err
