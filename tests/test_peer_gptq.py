"""GPTQ checkpoints written by other tools: every expert naming (vLLM's w1/w2/w3, transformers 5's
mlp.experts.E.*, AutoRound's block_sparse_moe.experts.E.gate_proj/up_proj/down_proj; the router under either
block name) found from the tensor names, GPTQModel's v2 zero points, act-order g_idx, per-module dynamic bits, a
checkpoint that carries only tokenizer.json; and the checkpoints AutoRound 0.16.1 and GPTQModel 7.6 themselves
wrote (tests/fixtures/autoround and gptqmodel, made by tools/autoround_fixture.py and tools/gptqmodel_fixture.py),
read as each tool dequantizes them, verified, inspected, and refused when damaged."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import small_spec, verify_json, write_synth
from safetensors.torch import load_file, save_file

from mxtools.cli import main
from mxtools.commands.quantize import QuantizeSettings, run_quantize
from mxtools.core.bundled import CALIB, EVAL
from mxtools.core.tokenizer import Tokenizer
from mxtools.io.hf_dir import write_tokenizer_json
from mxtools.layouts import open_checkpoint

SPEC = small_spec()  # dim 64, ffn 128, 4 experts: group size 32 fits every Linear
FIXTURES = Path(__file__).parent / "fixtures"
AUTOROUND = FIXTURES / "autoround"
# AutoRound's Mixtral names, written out here independently of layouts/gptq.py
AUTOROUND_EXPERT = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_synth(tmp_path_factory.mktemp("src") / "hf", "hf", "f16", spec=SPEC)


@pytest.fixture(scope="module")
def ours(src, tmp_path_factory):
    """mxtools' own RTN int4 g32 checkpoint (vLLM names), the source of the renamed variants."""
    out = tmp_path_factory.mktemp("q") / "vllm"
    run_quantize(src, out, QuantizeSettings(method="rtn", group_size=32))
    return out


def weights(path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ck:
        return {n: t.load() for n, t in ck.tensors.items()}


def rewrite(src: Path, dst: Path, rename=lambda k: k, change=lambda k, t: t, qc=None) -> Path:
    """A copy of the GPTQ directory `src` with its tensors renamed/changed and its config's quantization_config
    updated with `qc`."""
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        tensors = load_file(f)
        save_file({rename(k): change(k, t) for k, t in tensors.items()}, f, metadata={"format": "pt"})
    if qc:
        for name in ("config.json", "quantize_config.json"):
            cfg = json.loads((dst / name).read_text())
            target = cfg["quantization_config"] if name == "config.json" else cfg
            target.update(qc)
            (dst / name).write_text(json.dumps(cfg))
    return dst


def autoround_key(key: str, router: str = "block_sparse_moe.gate") -> str:
    key = re.sub(r"\.experts\.(\d+)\.(w[123])\.", lambda m: f".experts.{m[1]}.{AUTOROUND_EXPERT[m[2]]}.", key)
    return key.replace(".block_sparse_moe.gate.", f".{router}.")


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("router", ["block_sparse_moe.gate", "mlp.gate"])
def test_autoround_names_read_as_the_same_weights(ours, tmp_path, router):
    renamed = rewrite(ours, tmp_path / "ar", lambda k: autoround_key(k, router))
    assert any(".block_sparse_moe.experts.0.gate_proj.qweight" in k for k in load_file(renamed / "model.safetensors"))
    expected, got = weights(ours), weights(renamed)
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    r = cli("inspect", renamed, "--json", "--no-weights")
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)["info"]
    assert (info["tensor_names"], info["router_name"], info["written_by"]) == ("autoround", router, "mxtools")


def test_vllm_experts_with_the_mlp_router(ours, tmp_path):
    renamed = rewrite(ours, tmp_path / "mixed", lambda k: k.replace(".block_sparse_moe.gate.", ".mlp.gate."))
    expected, got = weights(ours), weights(renamed)
    assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_two_expert_namings_at_once_are_refused(ours, tmp_path):
    mixed = rewrite(ours, tmp_path / "two", lambda k: autoround_key(k) if ".layers.1." in k else k)
    r = cli("inspect", mixed, "--no-weights")
    assert r.exit_code == 2 and "named in two ways" in r.output and r.output.count("\n") == 1, r.output


def test_convert_reexports_the_autoround_names_under_vllms_byte_for_byte(ours, tmp_path):
    renamed = rewrite(ours, tmp_path / "ar", autoround_key)
    r = cli("convert", renamed, "--to", "gptq", "--names", "vllm", "-o", tmp_path / "back")
    assert r.exit_code == 0, r.output
    a, b = load_file(ours / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def _to_v2(key: str, t: torch.Tensor) -> torch.Tensor:
    """GPTQModel's v1 -> v2 conversion of qzeros at 4 bits: each 4-bit field + 1 (no field is 15 here)."""
    if not key.endswith(".qzeros"):
        return t
    fields = torch.stack([(t >> (4 * j)) & 0xF for j in range(8)])
    assert int(fields.max()) < 15
    return sum(((fields[j] + 1) << (4 * j)) for j in range(8)).to(torch.int32)


def test_gptq_v2_zero_points(ours, tmp_path):
    v2 = rewrite(ours, tmp_path / "v2", change=_to_v2, qc={"checkpoint_format": "gptq_v2"})
    expected, got = weights(ours), weights(v2)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    r = cli("inspect", v2, "--json", "--no-weights")
    assert json.loads(r.output)["info"]["checkpoint_format"] == "gptq_v2"
    # the same tensors read as v1 are other weights: the format is what decides
    v1 = rewrite(ours, tmp_path / "v1", change=_to_v2)
    wrong = weights(v1)
    assert not torch.equal(wrong["model.layers.0.self_attn.q_proj.weight"],
                           expected["model.layers.0.self_attn.q_proj.weight"])


def test_act_order_g_idx_is_read_as_stored(ours, tmp_path):
    """desc_act true: g_idx holds a permutation's groups (non-monotone); each column uses its own group."""
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))

    def permuted(key, t):
        if key == "model.layers.0.self_attn.q_proj.g_idx":
            return t[perm].contiguous()
        return t
    desc = rewrite(ours, tmp_path / "desc", change=permuted, qc={"desc_act": True})
    stored = load_file(ours / "model.safetensors")
    g_idx = stored["model.layers.0.self_attn.q_proj.g_idx"][perm].long()
    assert bool((g_idx[1:] < g_idx[:-1]).any())  # non-monotone
    scales = stored["model.layers.0.self_attn.q_proj.scales"].float()
    q = torch.stack([(stored["model.layers.0.self_attn.q_proj.qweight"] >> (4 * j)) & 0xF for j in range(8)], 1)
    q = q.reshape(64, 64).float()  # [in, out]
    expected = ((q - 8) * scales[g_idx]).T  # symmetric int4: every zero point is 8
    got = weights(desc)["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(got, expected)


@pytest.mark.parametrize("text", [CALIB, EVAL], ids=["calib", "eval"])
def test_tokenizer_json_gives_sentencepieces_ids(tmp_path, text):
    """mxtools' Mixtral v1 tokenizer.json through the tokenizers library: SentencePiece's ids on the bundled texts."""
    write_tokenizer_json(Tokenizer.default(), tmp_path)
    shutil.copy(text, tmp_path / "t.txt")
    from mxtools.io.hf_dir import read_tokenizer
    fast = read_tokenizer(tmp_path)
    assert fast.kind == "tokenizer.json" and fast.same_as_sentencepiece_v1
    content = text.read_text(encoding="utf-8")
    sp = Tokenizer.default()
    assert fast.encode(content) == sp.encode(content)
    lines = content.splitlines()[:200]
    assert [fast.encode(x) for x in lines] == [sp.encode(x) for x in lines]


def test_a_checkpoint_with_only_tokenizer_json(ours, tmp_path):
    only = _without_tokenizer_model(ours, tmp_path / "only")
    r = cli("inspect", only, "--no-weights")
    assert r.exit_code == 0 and "tokenizer.json only" in r.output, r.output
    r = CliRunner().invoke(main, ["verify", str(ours), "--reference", str(only), "--ctx", "64",
                                                  "--chunks", "2", "--device", "cpu", "--text", str(EVAL),
                                                  "--json", str(tmp_path / "v.json")])
    assert r.exit_code == 0, r.output
    assert "assuming the Mixtral v1 tokenizer" not in r.stderr  # tokenizer.json won over the fallback
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["kld_mean"] == 0 and v["same_top_p"] == 1


def test_a_tokenizer_json_of_another_vocabulary_encodes_but_is_not_rewritten(ours, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(ours, other)
    (other / "tokenizer.model").unlink()
    tj = json.loads((other / "tokenizer.json").read_text())
    tj["model"]["vocab"]["\u2581zzzz"] = len(tj["model"]["vocab"])
    (other / "tokenizer.json").write_text(json.dumps(tj))
    with open_checkpoint(other) as ck:
        assert not ck.tokenizer.same_as_sentencepiece_v1
        assert ck.tokenizer.encode("in the") == Tokenizer.default().encode("in the")
    r = cli("convert", other, "--to", "hf", "-o", tmp_path / "hf")
    assert r.exit_code == 2 and "not Mixtral v1's" in r.output and r.output.count("\n") == 1, r.output
    assert not (tmp_path / "hf").exists()


# ---------------------------------------------------------------- AutoRound's own checkpoint

AR_CHECKPOINT = AUTOROUND / "checkpoint"


CANONICAL_EXPERT = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
# fixture -> (tensor naming, router, packing format, desc_act, tool) as the files say
PEERS = {"autoround": ("autoround", "block_sparse_moe.gate", "gptq", False, "auto-round:0.16.1"),
         "gptqmodel": ("transformers", "mlp.gate", "gptq_v2", True, "gptqmodel:7.6.0")}


def canonical(key: str) -> str:
    key = key.replace(".mlp.experts.", ".block_sparse_moe.experts.")
    return re.sub(r"(gate|up|down)_proj", lambda m: CANONICAL_EXPERT[m[0]], key)


@pytest.mark.parametrize("tool", sorted(PEERS))
def test_peer_checkpoint_reads_as_the_tool_dequantizes_it(tool):
    """expected.safetensors: the tool's own dequantization (AutoRound's CPU GPTQ Linear run on the identity,
    GPTQModel's TorchQuantLinear.dequantize_weight()); both compute in fp16, so theirs is ours rounded to fp16,
    bit for bit. GPTQModel's is act-order (g_idx not monotone) and v2-packed."""
    expected = load_file(FIXTURES / tool / "expected.safetensors")
    assert len(expected) >= 3
    with open_checkpoint(FIXTURES / tool / "checkpoint") as ck:
        naming, router, fmt, desc_act, _ = PEERS[tool]
        assert (ck.info["tensor_names"], ck.info["router_name"], ck.info["checkpoint_format"]) == (naming, router, fmt)
        assert ck.info["gptq"]["group_size"] == 32 and ck.info["gptq"]["desc_act"] == desc_act
        for key, want in expected.items():
            ours = ck.tensors[canonical(key)].load()
            assert ours.dtype == torch.float32 and ours.shape == want.shape
            assert torch.equal(ours.half().float(), want), key
            assert not torch.equal(ours, torch.zeros_like(ours))
    g_idx = load_file(FIXTURES / tool / "checkpoint" / "model.safetensors")["model.layers.0.self_attn.q_proj.g_idx"]
    assert bool((g_idx[1:] < g_idx[:-1]).any()) == desc_act


@pytest.mark.parametrize("tool", sorted(PEERS))
def test_peer_checkpoint_is_the_float_model_quantized(peer_float, tool):
    """Every quantized Linear is within int4 g32's error of the float model the fixtures were made from, and the
    float tensors the tool kept (AutoRound: bf16, GPTQModel: f16) are that model's, rounded to their dtype."""
    with open_checkpoint(FIXTURES / tool / "checkpoint") as q, open_checkpoint(peer_float) as f:
        assert sorted(q.tensors) == sorted(f.tensors)
        for name, t in q.tensors.items():
            w, ref = t.load(), f.tensors[name].load().float()
            if t.stored_as and t.stored_as.startswith("gptq"):
                assert (w - ref).norm() < 0.15 * ref.norm(), name
            else:
                assert torch.equal(w.float(), ref.to(w.dtype).float()), name


@pytest.mark.parametrize("tool", sorted(PEERS))
def test_inspect_names_the_naming_and_the_tool(tool):
    naming, router, fmt, _, writer = PEERS[tool]
    r = cli("inspect", FIXTURES / tool / "checkpoint", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    info = report["info"]
    assert (info["tensor_names"], info["router_name"], info["checkpoint_format"]) == (naming, router, fmt)
    assert info["written_by"] == writer and not report["problems"]
    assert report["types"]["gptq-int4"] == 32
    text = cli("inspect", FIXTURES / tool / "checkpoint").output
    assert f"tensor names {naming}" in text and f"written by {writer}" in text


@pytest.mark.parametrize("tool", sorted(PEERS))
def test_verify_peer_checkpoint_against_the_float_model(peer_float, peer_text, peer_rtn_kld, tmp_path, tool):
    """verify runs on the tool's checkpoint and reports; its KLD is below round-to-nearest's (both tools fitted
    the rounding on text of the same words; on these 4 chunks, 2026-12-06, 2-core x86-64 dev box: AutoRound
    0.0017, GPTQModel 0.0010, mxtools RTN 0.0145), so the weights are read as the tool meant them."""
    r, report = verify_json(FIXTURES / tool / "checkpoint", peer_float, peer_text, tmp_path / "v.json")
    assert r.exit_code in (0, 1) and report is not None, r.output
    assert report["outtype"] == "gptq-int4" and report["n_chunks"] == 4
    assert 0 < report["kld_mean"] < peer_rtn_kld / 2, (report["kld_mean"], peer_rtn_kld)


def _without_tokenizer_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "tokenizer.model").unlink()
    return dst


def test_autoround_checkpoint_with_its_tokenizer_json(peer_float, peer_text, tmp_path):
    """AutoRound saves tokenizer.json and no tokenizer.model: tokenized through the tokenizers library (verify
    takes the reference's tokenizer first, so the reference carries only tokenizer.json too), the same ids as
    SentencePiece's, so verify's statistics are those of the SentencePiece run, to the bit."""
    with_json = tmp_path / "ar"
    shutil.copytree(AR_CHECKPOINT, with_json)
    write_tokenizer_json(Tokenizer.default(), with_json)
    r = cli("inspect", with_json, "--no-weights")
    assert "tokenizer.json only" in r.output, r.output
    json_ref = _without_tokenizer_model(peer_float, tmp_path / "float-json")
    r, report = verify_json(with_json, json_ref, peer_text, tmp_path / "a.json")
    assert r.exit_code in (0, 1) and "assuming the Mixtral v1 tokenizer" not in r.stderr, r.output
    _, sentencepiece = verify_json(with_json, peer_float, peer_text, tmp_path / "b.json")
    assert report["kld_mean"] == sentencepiece["kld_mean"] and report["ppl"] == sentencepiece["ppl"]
    # the bare checkpoint against the bare reference: the tokenizer.json given with --tokenizer
    bare_ref = tmp_path / "float-bare"
    shutil.copytree(json_ref, bare_ref)
    (bare_ref / "tokenizer.json").unlink()
    r, given = verify_json(AR_CHECKPOINT, bare_ref, peer_text, tmp_path / "c.json", "--tokenizer",
                       with_json / "tokenizer.json")
    assert r.exit_code in (0, 1) and "assuming the Mixtral v1 tokenizer" not in r.stderr, r.output
    assert given["kld_mean"] == sentencepiece["kld_mean"]
    r, _ = verify_json(AR_CHECKPOINT, bare_ref, peer_text, tmp_path / "d.json")
    assert "assuming the Mixtral v1 tokenizer" in r.stderr  # the fallback, said, where there is no file at all


def _damaged(tmp_path, name, tensors=None, qc=None) -> Path:
    dst = tmp_path / name
    shutil.copytree(AR_CHECKPOINT, dst)
    if tensors is not None:
        stored = load_file(dst / "model.safetensors")
        save_file(tensors(stored), dst / "model.safetensors", metadata={"format": "pt"})
    if qc is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["quantization_config"].update(qc)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


Q = "model.layers.1.block_sparse_moe.experts.2.up_proj"
DAMAGES = {
    "qweight-shape": (lambda t: {**t, f"{Q}.qweight": t[f"{Q}.qweight"][:-1].contiguous()}, None,
                      "inconsistent GPTQ tensors"),
    "scales-shape": (lambda t: {**t, f"{Q}.scales": t[f"{Q}.scales"][:, :-8].contiguous()}, None,
                     "inconsistent GPTQ tensors"),
    "no-scales": (lambda t: {k: v for k, v in t.items() if k != f"{Q}.scales"}, None, "lacks scales"),
    "qzeros-dtype": (lambda t: {**t, f"{Q}.qzeros": t[f"{Q}.qzeros"].float()}, None, "inconsistent GPTQ tensors"),
    "bits-3": (None, {"bits": 3}, "bits=3 is not supported"),
    "group-0": (None, {"group_size": 0}, "group_size=0"),
    "format": (None, {"checkpoint_format": "marlin"}, "checkpoint_format"),
    "dynamic-bits": (None, {"dynamic": {"+:.*up_proj": {"bits": 5}}}, "bits=5 is not supported"),
    "dynamic-regex": (None, {"dynamic": {"+:(": {"bits": 8}}}, "no regular expression"),
    "dynamic-8-bits": (None, {"dynamic": {"+:.*up_proj": {"bits": 8}}}, "inconsistent GPTQ tensors at 8 bits"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_autoround_checkpoints_exit_2_with_one_line(peer_float, peer_text, tmp_path, damage):
    tensors, qc, message = DAMAGES[damage]
    bad = _damaged(tmp_path, damage, tensors, qc)
    for args in (["inspect", bad], ["verify", bad, "--reference", peer_float, "--text", peer_text, "--ctx", "64",
                                    "--chunks", "1", "--device", "cpu"]):
        r = cli(*args)
        assert r.exit_code == 2 and message in r.output and r.output.count("\n") == 1, (damage, r.output)
        assert str(bad) in r.output


def test_dynamic_bits_are_read_per_module(src, ours, tmp_path):
    """A `dynamic` override giving q_proj 8 bits (GPTQModel's per-module rules, which AutoRound writes too): those
    modules are unpacked at 8 bits, the others at the config's 4."""
    eight = tmp_path / "q8"
    run_quantize(src, eight, QuantizeSettings(method="rtn", bits=8, group_size=32))
    q8 = load_file(eight / "model.safetensors")
    mixed = rewrite(ours, tmp_path / "mixed", change=lambda k, t: q8[k] if ".q_proj." in k else t,
                    qc={"dynamic": {"-:.*gate$": {}, "+:.*q_proj": {"bits": 8}}})
    a, b, got = weights(ours), weights(eight), weights(mixed)
    for name, w in got.items():
        assert torch.equal(w, (b if ".q_proj." in name else a)[name]), name
