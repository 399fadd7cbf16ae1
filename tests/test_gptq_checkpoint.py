"""The GPTQ v1 checkpoint: what we write reads back as exactly the fake-quantized weights, has the names,
dtypes and shapes of docs/FORMATS.md section 7, is claimed by the "gptq" layout only, loads in an independent
implementation (GPTQModel) with the same logits, and passes `mxtools verify` against its source."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import small_spec, write_synth
from judges import require_installed
from safetensors import safe_open

from mxtools.commands.convert import convert
from mxtools.commands.quantize import QuantizeSettings, run_quantize
from mxtools.commands.verify import VerifySettings, run_verify
from mxtools.core import names
from mxtools.core.bundled import CALIB, EVAL
from mxtools.core.names import is_gptq_quantized as is_quantized
from mxtools.io.atomic import atomic_output
from mxtools.layouts import detect, hf, open_checkpoint
from mxtools.layouts.gptq import write_quantized
from mxtools.model import forward
from mxtools.quant.gptq import QuantConfig
from mxtools.quant.gptq_pipeline import quantize_checkpoint

# dims that are multiples of 128, so the real group size 128 is used (o_proj and w1/w3 have one group, w2 two)
SPEC = small_spec(dim=128, hidden_dim=256, n_heads=4, n_kv_heads=2, head_dim=32)
SEQLEN, NSAMPLES = 128, 4


class Tee:
    """Pass a QuantStream through, keeping every dequantized result (the writer frees the originals)."""

    def __init__(self, stream):
        self.stream, self.weights = stream, {}

    @property
    def report(self):
        return self.stream.report

    def __iter__(self):
        for lq in self.stream:
            self.weights.update({n: r.dequantize() for n, r in lq.results.items()})
            yield lq


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CALIB.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_synth(tmp_path_factory.mktemp("src") / "hf", "hf", "f32", spec=SPEC)


def quantize_dir(src, out, calib, cfg: QuantConfig, seqlen=SEQLEN) -> Tee:
    with open_checkpoint(src) as ckpt:
        tokens = ckpt.tokenizer.encode(calib.read_text(encoding="utf-8"), bos=False)
        tee = Tee(quantize_checkpoint(ckpt, tokens, cfg, nsamples=NSAMPLES, seqlen=seqlen))
        with atomic_output(out, directory=True) as tmp:
            write_quantized(ckpt, tmp, tee, cfg, source_name=str(src), shard_bytes=200_000)
    return tee


@pytest.fixture(scope="module")
def int4(src, calib, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "gptq-int4"
    return out, quantize_dir(src, out, calib, QuantConfig(bits=4, group_size=128))


def stored(path) -> dict:
    """name -> (dtype string, shape) of every tensor in the directory's shards."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: (st.get_slice(k).get_dtype(), st.get_slice(k).get_shape()) for k in st.keys()})
    return out


def test_round_trip_gives_the_fake_quantized_weights(int4):
    out, tee = int4
    with open_checkpoint(out) as ckpt:
        assert ckpt.layout == "gptq" and ckpt.info["quant_method"] == "gptq"
        assert ckpt.info["gptq"]["bits"] == 4 and ckpt.info["gptq"]["group_size"] == 128
        quantized = [n for n in names.canonical_names(SPEC) if is_quantized(n)]
        assert sorted(tee.weights) == sorted(quantized)
        for name in quantized:
            assert torch.equal(ckpt.tensors[name].load(), tee.weights[name]), name
    assert detect(out).name == "gptq" and not hf.is_hf(out)


def test_names_dtypes_shapes_and_configs_follow_gptq_md(int4):
    out, _ = int4
    tensors = stored(out)
    assert (out / "model.safetensors.index.json").exists()  # small shards: the index is written
    for name in names.canonical_names(SPEC):
        shape = names.expected_shape(name, SPEC)
        if not is_quantized(name):
            assert tensors[name] == ("F16", list(shape)), name
            continue
        out_f, in_f = shape
        base, groups = name.removesuffix(".weight"), in_f // 128
        assert name not in tensors
        assert tensors[base + ".qweight"] == ("I32", [in_f // 8, out_f])
        assert tensors[base + ".qzeros"] == ("I32", [groups, out_f // 8])
        assert tensors[base + ".scales"] == ("F16", [groups, out_f])
        assert tensors[base + ".g_idx"] == ("I32", [in_f])
    assert "model.layers.1.block_sparse_moe.experts.3.w2.qweight" in tensors
    assert tensors["model.layers.0.block_sparse_moe.gate.weight"][0] == "F16"
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as st:
        for key in (k for k in st.keys() if k.endswith(".qzeros")):
            assert (st.get_tensor(key) == 0x77777777).all(), key  # sym 4-bit: every stored zero-1 is 7
        for key in (k for k in st.keys() if k.endswith(".g_idx")):
            g = st.get_tensor(key)
            assert torch.equal(g, (torch.arange(g.numel()) // 128).to(torch.int32))
    qc = json.loads((out / "quantize_config.json").read_text())
    assert json.loads((out / "config.json").read_text())["quantization_config"] == qc
    assert {k: qc[k] for k in ("bits", "group_size", "damp_percent", "desc_act", "static_groups", "sym",
                               "true_sequential", "quant_method", "checkpoint_format", "model_file_base_name")} == \
        dict(bits=4, group_size=128, damp_percent=0.01, desc_act=False, static_groups=False, sym=True,
             true_sequential=True, quant_method="gptq", checkpoint_format="gptq", model_file_base_name="model")
    report = json.loads((out / "quantize_report.json").read_text())
    assert report["totals"]["linears"] == 2 * (4 + 3 * SPEC.n_experts) and report["calibration"]["samples"] == 4
    assert (out / "tokenizer.model").exists()


@pytest.fixture(scope="module")
def int8(src, calib, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "gptq-int8"
    return out, quantize_dir(src, out, calib, QuantConfig(bits=8, group_size=128), seqlen=64)


def test_8_bit_and_act_order_round_trip(int8, src, calib, tmp_path):
    act = tmp_path / "act"
    cases = (int8 + (0x7F7F7F7F, False),
             (act, quantize_dir(src, act, calib, QuantConfig(group_size=64, act_order=True), seqlen=64), 0x77777777,
              True))
    name = "model.layers.0.block_sparse_moe.experts.1.w2"
    for out, tee, zero_word, act_order in cases:
        with open_checkpoint(out) as ckpt:
            assert torch.equal(ckpt.tensors[name + ".weight"].load(), tee.weights[name + ".weight"])
            assert ckpt.info["gptq"]["desc_act"] == act_order
        with safe_open(str(next(out.glob("*.safetensors"))), "pt") as st:
            keys = [k for k in st.keys() if k.endswith(".qzeros")]
            assert keys and all((st.get_tensor(k) == zero_word).all() for k in keys)
    g = _g_idx(act, name)
    assert not bool((g[1:] >= g[:-1]).all())  # act-order: g_idx is not monotone
    assert torch.equal(torch.bincount(g.long()), torch.full((256 // 64,), 64))


def _g_idx(out, base):
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            if base + ".g_idx" in st.keys():
                return st.get_tensor(base + ".g_idx")
    raise KeyError(base)


def test_run_quantize_and_convert_to_gptq(src, calib, tmp_path):
    report = run_quantize(src, tmp_path / "q", QuantizeSettings(calib=calib, recipe="rtn-int4-g128", nsamples=2,
                                                                seqlen=64))
    assert report["method"] == "rtn" and report["totals"]["rtn"] == report["totals"]["linears"]
    assert detect(tmp_path / "q").name == "gptq"
    with pytest.raises(Exception, match="exists"):
        run_quantize(src, tmp_path / "q", QuantizeSettings(calib=calib, method="rtn"))
    report = run_quantize(src, tmp_path / "q", QuantizeSettings(calib=calib, group_size=64, nsamples=2, seqlen=64,
                                                                force=True))
    assert report["method"] == "gptq" and report["group_size"] == 64 and report["calibration"]["samples"] == 2
    assert json.loads((tmp_path / "q" / "quantize_config.json").read_text())["group_size"] == 64
    out = convert(src, "gptq", tmp_path / "c", "f16")  # the layout writer: round to nearest, int4 g128
    with open_checkpoint(out) as ckpt:
        w = ckpt.tensors["model.layers.0.self_attn.q_proj.weight"].load()
        assert ckpt.info["gptq"]["group_size"] == 128 and w.shape == (128, 128)


def test_verify_on_a_gptq_dir_passes_against_its_source(int8, src, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text(EVAL.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    r = run_verify(int8[0], src, VerifySettings(text=text, ctx=128, chunks=4, device="cpu"))
    assert r["passed"], r["failures"]
    assert r["outtype"] == "gptq-int8" and r["kld_mean"] < 1e-3


def test_verify_int4_reports_gptq_and_small_kld(int4, src, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text(EVAL.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    # Random synth logits are nearly flat (ppl ~ vocab size), so top-1 agreement says little: relax only it.
    r = run_verify(int4[0], src, VerifySettings(text=text, ctx=128, chunks=4, overrides={"min_same_top_p": 0.5},
                                                device="cpu"))
    assert r["passed"], r["failures"]
    assert r["outtype"] == "gptq-int4" and r["kld_mean"] < 0.07 and r["first_divergent_layer"] is None


# ---------------------------------------------------------------- an independent loader: GPTQModel

# Run in a child process: importing GPTQModel patches transformers' Mixtral classes for the whole process (defuser),
# which would change what later tests get from transformers.
GPTQMODEL_SCRIPT = """
import sys, torch
from gptqmodel import BACKEND, GPTQModel
torch.set_num_threads(2)
model = GPTQModel.load(sys.argv[1], device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)  # CPU kernel: fp16/bf16
with torch.no_grad():
    torch.save(model.model(input_ids=torch.load(sys.argv[2])).logits.float(), sys.argv[3])
"""


def test_gptqmodel_loads_it_with_the_same_logits(int4, src, tmp_path):
    require_installed("gptqmodel")
    out = int4[0]
    with open_checkpoint(out) as ckpt:
        tokens = torch.tensor([ckpt.tokenizer.encode("The quick brown fox jumps over the lazy dog.")])
    torch.save(tokens, tmp_path / "tokens.pt")
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2"}
    # GPTQModel 7.x under transformers 5 looks for transformers 5's names (mlp.experts.E.gate_proj ...): our
    # checkpoint re-exported under them, byte for byte (test_gptq_names.py), and loaded as a user would.
    renamed = convert(out, "gptq", tmp_path / "transformers-names", names="transformers")
    run = subprocess.run([sys.executable, "-c", GPTQMODEL_SCRIPT, str(renamed),
                          str(tmp_path / "tokens.pt"), str(tmp_path / "logits.pt")], check=False,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = torch.load(tmp_path / "logits.pt")
    with open_checkpoint(out) as ckpt, open_checkpoint(src) as source:
        ours = forward.logits(ckpt, tokens, "cpu")
        quant_effect = (forward.logits(source, tokens, "cpu") - ours).abs().max()
    diff = (theirs - ours).abs().max()
    print(f"GPTQModel fp16 vs mxtools fp32 logits: max abs diff {float(diff):.4g} "
          f"(quantization itself moves them by {float(quant_effect):.3g})")
    assert diff < 0.02 and diff < quant_effect / 20
