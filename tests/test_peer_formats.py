"""Quantized checkpoints of other families than GPTQ, written by the tools themselves from the tiny synthetic
Mixtral tools/autoround_fixture.py makes: compressed-tensors by llm-compressor 0.14.0.1 (tests/fixtures/
llmcompressor, tools/llmcompressor_fixture.py: W4A16 g32 symmetric and asymmetric, W8A16 per channel, FP8 per
channel and per tensor) and bitsandbytes by transformers 5.25's save_pretrained (tests/fixtures/bnb,
tools/bnb_fixture.py: NF4 with nested quantization, FP4, LLM.int8). Each is read as its tool dequantizes it,
verified against the float model, inspected, converted, and refused with one line when damaged."""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import verify_json
from safetensors.torch import load_file, save_file
from test_peer_gptq import cli

from mxtools.layouts import open_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
# fixture -> (layout, format the config names, verify's outtype label, tool as inspect names it,
#             tensor naming, quantized Linears, relative error bound of a quantized Linear vs the float model)
PEERS = {
    "llmcompressor/w4a16-g32": ("compressed-tensors", "pack-quantized", "w4a16",
                                "llm-compressor (GPTQModifier, compressed-tensors 0.19.0)", "autoround", 32, 0.15),
    "llmcompressor/w4a16-asym-g32": ("compressed-tensors", "pack-quantized", "w4a16",
                                     "llm-compressor (GPTQModifier, compressed-tensors 0.19.0)", "autoround", 32, 0.15),
    "llmcompressor/w8a16-channel": ("compressed-tensors", "pack-quantized", "w8a16",
                                    "llm-compressor (GPTQModifier, compressed-tensors 0.19.0)", "autoround", 32, 0.01),
    "llmcompressor/fp8-dynamic": ("compressed-tensors", "float-quantized", "fp8",
                                  "llm-compressor (QuantizationModifier, compressed-tensors 0.19.0)", "autoround", 32,
                                  0.05),
    "llmcompressor/fp8-tensor": ("compressed-tensors", "float-quantized", "fp8",
                                 "llm-compressor (QuantizationModifier, compressed-tensors 0.19.0)", "autoround", 32,
                                 0.05),
    "bnb/nf4-double": ("bitsandbytes", "nf4", "bnb-nf4", "transformers 5.25.0 with bitsandbytes", "vllm", 8, 0.15),
    "bnb/fp4": ("bitsandbytes", "fp4", "bnb-fp4", "transformers 5.25.0 with bitsandbytes", "vllm", 8, 0.2),
    "bnb/int8": ("bitsandbytes", "int8", "bnb-int8", "transformers 5.25.0 with bitsandbytes", "vllm", 8, 0.02),
}
CANONICAL_EXPERT = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def canonical(key: str) -> str:
    """A stored name (llm-compressor's `block_sparse_moe.experts.E.gate_proj`) in the canonical naming, written out
    here independently of core/expert_names.py."""
    return re.sub(r"experts\.(\d+)\.((?:gate|up|down)_proj)", lambda m: f"experts.{m[1]}.{CANONICAL_EXPERT[m[2]]}", key)


def ckpt_dir(peer: str) -> Path:
    return FIXTURES / peer / "checkpoint"



@pytest.mark.parametrize("peer", sorted(PEERS))
def test_peer_checkpoint_reads_as_the_tool_dequantizes_it(peer):
    """expected.safetensors holds the tool's own dequantization. compressed-tensors computes (q - zero) * scale
    (or fp8 * scale) in the scale's dtype, f16 here; mxtools computes in float32, where those products are exact,
    so compressed-tensors' weight is mxtools' rounded to f16, bit for bit. bitsandbytes' weights come from
    bitsandbytes' own functions on both sides (mxtools builds the quantization state from the files, the
    reference from the parameters transformers loaded): equal in float32, bit for bit."""
    layout, fmt, _, _, naming, n_quantized, _ = PEERS[peer]
    expected = load_file(FIXTURES / peer / "expected.safetensors")
    assert len(expected) >= 3
    with open_checkpoint(ckpt_dir(peer)) as ck:
        assert (ck.layout, ck.info["format"], ck.info["tensor_names"]) == (layout, fmt, naming)
        assert sum(1 for t in ck.tensors.values() if t.stored_as) == n_quantized
        for key, want in expected.items():
            ours = ck.tensors[canonical(key)].load()
            assert ours.dtype == torch.float32 and ours.shape == want.shape, key
            if layout == "bitsandbytes":
                assert torch.equal(ours, want.float()), key
            else:
                assert want.dtype == torch.float16 and torch.equal(ours.half(), want), key
            assert ours.abs().max() > 0


@pytest.mark.parametrize("peer", sorted(PEERS))
def test_peer_checkpoint_is_the_float_model_quantized(peer_float, peer):
    """Every quantized Linear is within its format's error of the float model the fixture was made from; every
    tensor the tool kept float (router, lm_head, norms; bitsandbytes under transformers 5: the experts too) is
    that model's, bit for bit."""
    bound = PEERS[peer][-1]
    with open_checkpoint(ckpt_dir(peer)) as q, open_checkpoint(peer_float) as f:
        assert sorted(q.tensors) == sorted(f.tensors)
        for name, t in q.tensors.items():
            w, ref = t.load(), f.tensors[name].load()
            if t.stored_as:
                assert 0 < (w - ref.float()).norm() < bound * ref.float().norm(), name
            else:
                assert w.dtype == ref.dtype and torch.equal(w, ref), name


@pytest.mark.parametrize("peer", sorted(PEERS))
def test_inspect_names_the_format_and_the_tool(peer):
    layout, fmt, outtype, writer, naming, n_quantized, _ = PEERS[peer]
    r = cli("inspect", ckpt_dir(peer), "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    info = report["info"]
    assert report["layout"] == layout and not report["problems"]
    assert (info["format"], info["outtype"], info["written_by"], info["tensor_names"]) == (fmt, outtype, writer,
                                                                                           naming)
    assert sum(v for k, v in report["types"].items() if k.startswith(("compressed-", "bnb-"))) == n_quantized
    text = cli("inspect", ckpt_dir(peer), "--no-weights").output
    assert f"{layout}: format {fmt} ({outtype})" in text and f"written by {writer}" in text


# Mean KLD on these 4 chunks against the float model (2026-12-06, 2-core x86-64 dev box): RTN int4 g32 0.0145;
# w4a16 0.00123 (asymmetric 0.00087), fp8 per channel 0.00112, per tensor 0.00151, w8a16 0.000003; nf4 0.0086,
# fp4 0.0109, LLM.int8 0.00010 (bitsandbytes under transformers 5 quantizes the attention only). The bounds are
# shares of RTN's, each at least 1.4 times the measured share.
KLD_SHARE = {"llmcompressor/w4a16-g32": 0.25, "llmcompressor/w4a16-asym-g32": 0.25,
             "llmcompressor/fp8-dynamic": 0.25, "llmcompressor/fp8-tensor": 0.25, "bnb/nf4-double": 1.0, "bnb/fp4": 1.5}


@pytest.mark.parametrize("peer", sorted(PEERS))
def test_verify_peer_checkpoint_against_the_float_model(peer_float, peer_text, peer_rtn_kld, tmp_path, peer):
    """verify runs on the tool's checkpoint and reports a KLD above zero and, as the format's precision says,
    below a share of RTN int4's (8-bit formats: a twentieth of it)."""
    r, report = verify_json(ckpt_dir(peer), peer_float, peer_text, tmp_path / "v.json")
    assert r.exit_code in (0, 1) and report is not None, r.output
    assert report["outtype"] == PEERS[peer][2] and report["n_chunks"] == 4
    assert 0 < report["kld_mean"] < KLD_SHARE.get(peer, 0.05) * peer_rtn_kld, (report["kld_mean"], peer_rtn_kld)


@pytest.mark.parametrize("peer", ["llmcompressor/w4a16-asym-g32", "llmcompressor/fp8-tensor", "bnb/nf4-double",
                                  "bnb/int8"])
def test_convert_to_hf_and_to_a_gguf_mix(peer, tmp_path):
    """--to hf writes the dequantized weights (float32: the type that holds them exactly), read back equal; a
    GGUF mix says on stderr that it re-quantizes already-quantized weights."""
    r = cli("convert", ckpt_dir(peer), "--to", "hf", "-o", tmp_path / "hf")
    assert r.exit_code == 0, r.output
    assert "re-quantizes" not in r.stderr
    with open_checkpoint(ckpt_dir(peer)) as q, open_checkpoint(tmp_path / "hf") as h:
        assert h.layout == "hf"
        for name, t in q.tensors.items():
            assert torch.equal(h.tensors[name].load(), t.load().float()), name
    r = cli("convert", ckpt_dir(peer), "--to", "gguf", "--outtype", "q4_k_m", "-o", tmp_path / "m.gguf")
    assert r.exit_code == 0, r.output
    assert "already-quantized weights" in r.stderr and "re-quantizes" in r.stderr and "q4_k_m" in r.stderr
    from gguf import GGMLQuantizationType, GGUFReader
    types = {t.name: t.tensor_type for t in GGUFReader(tmp_path / "m.gguf").tensors}
    # dim 64 is no multiple of 256: llama.cpp's fallback for the K-quant is a legacy block type
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.Q5_0


def test_pack_quantized_g_idx_gives_each_column_its_group(tmp_path):
    """weight_g_idx, where stored, names each input column's group (compressed-tensors' act-order): the weight is
    (q - zero[g_idx]) * scale[g_idx], computed here by hand from the packed words."""
    dst = tmp_path / "gidx"
    shutil.copytree(ckpt_dir("llmcompressor/w4a16-asym-g32"), dst)
    base = "model.layers.0.self_attn.q_proj"
    stored = load_file(dst / "model.safetensors")
    g_idx = (torch.arange(63, -1, -1) // 32).to(torch.int32)  # reversed: column 0 in the last group
    save_file({**stored, f"{base}.weight_g_idx": g_idx}, dst / "model.safetensors", metadata={"format": "pt"})
    words, scale = stored[f"{base}.weight_packed"], stored[f"{base}.weight_scale"].float()
    zwords = stored[f"{base}.weight_zero_point"]
    q = torch.tensor([[((int(words[o, i // 8]) & 0xFFFFFFFF) >> (4 * (i % 8)) & 15) - 8 for i in range(64)]
                      for o in range(64)], dtype=torch.float32)
    zero = torch.tensor([[((int(zwords[o // 8, g]) & 0xFFFFFFFF) >> (4 * (o % 8)) & 15) - 8 for g in range(2)]
                         for o in range(64)], dtype=torch.float32)
    gi = g_idx.long()
    expected = (q - zero[:, gi]) * scale[:, gi]
    with open_checkpoint(dst) as ck:
        got = ck.tensors[f"{base}.weight"].load()
    assert torch.equal(got, expected)
    with open_checkpoint(ckpt_dir("llmcompressor/w4a16-asym-g32")) as ck:
        assert not torch.equal(ck.tensors[f"{base}.weight"].load(), expected)  # the groups did change it


def test_without_bitsandbytes_the_reader_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    for verb in (["inspect"], ["convert", "--to", "hf", "-o", "/nonexistent/out"]):
        r = cli(verb[0], ckpt_dir("bnb/nf4-double"), *verb[1:])
        assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
        assert "pip install 'mxtools[bnb]'" in r.output and str(ckpt_dir("bnb/nf4-double")) in r.output


# ---------------------------------------------------------------- damaged checkpoints

def _damaged(tmp_path: Path, peer: str, tensors=None, qc=None) -> Path:
    dst = tmp_path / "bad"
    shutil.copytree(ckpt_dir(peer), dst)
    if tensors is not None:
        save_file(tensors(load_file(dst / "model.safetensors")), dst / "model.safetensors", metadata={"format": "pt"})
    if qc is not None:
        cfg = json.loads((dst / "config.json").read_text())
        qc(cfg["quantization_config"])
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _weights(qc: dict, **kw) -> None:
    qc["config_groups"]["group_0"]["weights"].update(kw)


def _state(t: dict, key: str, **kw) -> dict:
    """t with the quant_state JSON at `key` changed."""
    state = json.loads(bytes(t[key].tolist()))
    state.update(kw)
    return {**t, key: torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)}


C = "model.layers.1.block_sparse_moe.experts.2.up_proj"  # a compressed-tensors module
B = "model.layers.1.self_attn.v_proj"  # a bitsandbytes module
NF4_STATE = f"{B}.weight.quant_state.bitsandbytes__nf4"
W4, W8, FP8, NF4, INT8 = ("llmcompressor/w4a16-asym-g32", "llmcompressor/w8a16-channel", "llmcompressor/fp8-tensor",
                          "bnb/nf4-double", "bnb/int8")
# name -> (fixture, tensor change, quantization_config change, message, tensor named)
DAMAGES = {
    "ct-packed-shape": (W4, lambda t: {**t, f"{C}.weight_packed": t[f"{C}.weight_packed"][:, :-1].contiguous()}, None,
                        "inconsistent pack-quantized tensors", C),
    "ct-scale-shape": (W4, lambda t: {**t, f"{C}.weight_scale": t[f"{C}.weight_scale"][:-1].contiguous()}, None,
                       "inconsistent pack-quantized tensors", C),
    "ct-no-scale": (W4, lambda t: {k: v for k, v in t.items() if k != f"{C}.weight_scale"}, None,
                    "lacks weight_scale", C),
    "ct-no-zero-point": (W4, lambda t: {k: v for k, v in t.items() if k != f"{C}.weight_zero_point"}, None,
                         "lacks weight_zero_point", C),
    "ct-weight-shape": (W8, lambda t: {**t, f"{C}.weight_shape": torch.tensor([128, 96])}, None,
                        "inconsistent pack-quantized tensors", C),
    "ct-fp8-no-scale": (FP8, lambda t: {k: v for k, v in t.items() if k != f"{C}.weight_scale"}, None,
                        "FP8 weight without its weight_scale", C + ".weight"),
    "ct-fp8-dtype": (FP8, lambda t: {**t, f"{C}.weight": t[f"{C}.weight"].half()}, None,
                     "inconsistent float-quantized tensors", C),
    "ct-bits-3": (W4, None, lambda qc: _weights(qc, num_bits=3), "num_bits=3 is not supported", None),
    "ct-format": (W4, None, lambda qc: qc.update(format="marlin-24") or qc["config_groups"]["group_0"].pop("format",
                                                                                                        None),
                  "format 'marlin-24' is not supported", None),
    "ct-strategy": (W8, None, lambda qc: _weights(qc, strategy="block"), "strategy 'block' is not supported", None),
    "ct-group-0": (W4, None, lambda qc: _weights(qc, group_size=0), "group_size=0", None),
    "ct-fp8-bits": (FP8, None, lambda qc: _weights(qc, num_bits=4), "num_bits=4 is not supported", None),
    "ct-transform": (W8, None, lambda qc: qc.update(transform_config={"config_groups": {"u": {}}}),
                     "weight transforms are not supported", None),
    "bnb-weight-shape": (NF4, lambda t: {**t, f"{B}.weight": t[f"{B}.weight"][:-4].contiguous()}, None,
                         "inconsistent 4-bit tensors", B),
    "bnb-no-absmax": (NF4, lambda t: {k: v for k, v in t.items() if k != f"{B}.weight.absmax"}, None,
                      "lacks weight.absmax", B),
    "bnb-no-nested-absmax": (NF4, lambda t: {k: v for k, v in t.items() if k != f"{B}.weight.nested_absmax"}, None,
                             "lacks weight.nested_absmax", B),
    "bnb-state-shape": (NF4, lambda t: _state(t, NF4_STATE, shape=[32, 128]), None, "inconsistent 4-bit tensors", B),
    "bnb-state-blocksize": (NF4, lambda t: _state(t, NF4_STATE, blocksize=48), None, "not a bitsandbytes 4-bit state",
                            NF4_STATE),
    "bnb-state-json": (NF4, lambda t: {**t, NF4_STATE: t[NF4_STATE][:-3].contiguous()}, None, "not a JSON object",
                       NF4_STATE),
    "bnb-no-scb": (INT8, lambda t: {k: v for k, v in t.items() if k != f"{B}.SCB"}, None, "lacks SCB", B),
    "bnb-scb-shape": (INT8, lambda t: {**t, f"{B}.SCB": t[f"{B}.SCB"][:-1].contiguous()}, None,
                      "inconsistent int8 tensors", B),
    "bnb-quant-type": (NF4, None, lambda qc: qc.update(bnb_4bit_quant_type="nf5"),
                       "bnb_4bit_quant_type 'nf5' is not supported", None),
    "bnb-both-widths": (INT8, None, lambda qc: qc.update(load_in_4bit=True, _load_in_4bit=True),
                        "exactly one must be true", None),
    "bnb-config-fp4": (NF4, None, lambda qc: qc.update(bnb_4bit_quant_type="fp4"), "the config fp4",
                       "model.layers.0.self_attn.k_proj.weight.quant_state.bitsandbytes__nf4"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_checkpoints_exit_2_with_one_line(peer_float, peer_text, tmp_path, damage):
    peer, tensors, qc, message, tensor = DAMAGES[damage]
    bad = _damaged(tmp_path, peer, tensors, qc)
    for args in (["inspect", bad], ["verify", bad, "--reference", peer_float, "--text", peer_text, "--ctx", "64",
                                    "--chunks", "1", "--device", "cpu"],
                 ["convert", bad, "--to", "hf", "-o", tmp_path / "out"]):
        r = cli(*args)
        assert r.exit_code == 2 and message in r.output and r.output.count("\n") == 1, (damage, r.output)
        assert str(bad) in r.output
        assert f"tensor {tensor}" in r.output if tensor else "config.json" in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_early_llm_compressor_compression_config_is_read_alike(tmp_path):
    """Early llm-compressor versions wrote the same object under config.json's `compression_config`."""
    old = tmp_path / "old"
    shutil.copytree(ckpt_dir("llmcompressor/w8a16-channel"), old)
    cfg = json.loads((old / "config.json").read_text())
    cfg["compression_config"] = cfg.pop("quantization_config")
    (old / "config.json").write_text(json.dumps(cfg))
    with open_checkpoint(old) as a, open_checkpoint(ckpt_dir("llmcompressor/w8a16-channel")) as b:
        assert a.layout == "compressed-tensors"
        assert all(torch.equal(t.load(), b.tensors[n].load()) for n, t in a.tensors.items())
