"""llama.cpp's i-quant mixes (IQ1_S .. IQ4_XS) as data: every tensor's type against the file `llama-quantize`
writes, with and without an importance matrix, and its refusal of the very low-bit types without one.

Our encoders for the IQ types are not part of mxtools, so these tests compare types (the mix policy that
`convert` would write with) rather than bytes; where manual options leave only types we write, whole files are
compared byte for byte. test_mixes.py's `test_every_tensor_type_matches_llama_cpp` covers these mixes too, on
real Mixtral shapes, through llama.cpp's own type selection (no importance matrix).
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from judges import llama_tool
from test_mixes import assert_same_tensors, gguf_plan, synth

from mxtools.commands.convert import convert, write_checkpoint
from mxtools.commands.example import write_example
from mxtools.commands.synth import synth_spec
from mxtools.core.bundled import EVAL
from mxtools.core.errors import MxError
from mxtools.layouts import open_checkpoint
from mxtools.quant.imatrix import imatrix_for_writer, read_imatrix
from mxtools.quant.mixes import (
    MIXES,
    NEEDS_IMATRIX,
    ROW_LENGTH_FALLBACK,
    Overrides,
    gguf_options,
    load_mix,
    parse_mix,
    parse_tensor_type,
    row_fallback,
)

IQ_MIXES = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "iq3_s", "iq3_m",
            "iq4_nl", "iq4_xs")
FILE_TYPES = {"iq2_xxs": 19, "iq2_xs": 20, "iq3_xs": 22, "iq3_xxs": 23, "iq1_s": 24, "iq4_nl": 25, "iq3_s": 26,
              "iq3_m": 27, "iq2_s": 28, "iq2_m": 29, "iq4_xs": 30, "iq1_m": 31}  # include/llama.h
NEEDS_ONE = {"iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs"}
REFUSED = "requires an importance matrix"  # llama-quantize's words
TEXT = Path(__file__).resolve().parents[1] / "mxtools" / "assets" / "text" / "calib.txt"
# The bundled model in `make test`; the two synthetic shapes (every per-layer rule, non-8-expert llamas) in
# `make bench` (pytest -m slow), where llama-quantize's many runs on them fit.
MODELS = ("bundled", pytest.param("synth-8x16", marks=pytest.mark.slow),
          pytest.param("synth-2x8", marks=pytest.mark.slow))


# ---- the recipes and the tables ----

def test_iquant_mixes_are_recipes_with_llama_cpps_file_types():
    assert set(IQ_MIXES) <= set(MIXES)
    assert {m: load_mix(m).file_type for m in IQ_MIXES} == FILE_TYPES
    assert {m for m in MIXES if load_mix(m).may_need_imatrix()} == NEEDS_ONE


def test_row_fallback_of_the_iquant_types():
    iq = (Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ4_XS)
    assert [row_fallback(t, 512) for t in iq] == list(iq)
    assert {row_fallback(t, 96) for t in iq} == {Q.IQ4_NL} and all(ROW_LENGTH_FALLBACK[t] == Q.IQ4_NL for t in iq)
    assert [row_fallback(t, 200) for t in (*iq, Q.IQ4_NL)] == [Q.F16] * 9
    assert row_fallback(Q.IQ4_NL, 96) == Q.IQ4_NL


def _one_rule(kind: str, when: dict):
    return parse_mix({"name": "t", "file_type": 1, "default": "Q4_0",
                      "rules": {kind: [{"when": when, "type": "Q8_0"}]}}, "t.yaml")


def test_new_condition_words():
    spec = synth_spec("tiny", n_layers=16, n_experts=4)
    up = _one_rule("ffn_up", {"last_eighth": True}).policy(spec)
    assert [i for i in range(16) if up("ffn_up", i, (4, 512, 256)) == Q.Q8_0] == [14, 15]
    mid = _one_rule("ffn_up", {"first_eighth": False, "last_eighth": False}).policy(spec)
    assert [i for i in range(16) if mid("ffn_up", i, (4, 512, 256)) == Q.Q8_0] == list(range(2, 14))
    assert _one_rule("output", {"last_eighth": True}).policy(spec)("output", None, (1024, 256)) == Q.Q4_0
    for n, hit in ((3, False), (4, True), (8, True)):
        pick = _one_rule("attn_v", {"experts_at_least": 4}).policy(spec.replace(n_experts=n, n_experts_per_tok=2))
        assert (pick("attn_v", 0, (128, 256)) == Q.Q8_0) == hit
    wide = _one_rule("output", {"dim_multiple_of": 256}).policy
    assert wide(spec)("output", None, (1024, 256)) == Q.Q8_0
    assert wide(spec.replace(dim=128))("output", None, (1024, 128)) == Q.Q4_0
    with pytest.raises(MxError, match="t.yaml: condition dim_multiple_of: 0 is not a value"):
        _one_rule("output", {"dim_multiple_of": 0})


def refusal(mix: str, spec, imatrix=None, overrides=None) -> str | None:
    """gguf_options' one-line refusal, None if it builds the writer's options."""
    try:
        gguf_options(mix, spec, imatrix, overrides)
    except MxError as exc:
        return exc.line()
    return None


def test_refusal_without_an_imatrix_is_by_type():
    """As llama-quantize: any tensor but token_embd and output in IQ1_S/IQ1_M/IQ2_XXS/IQ2_XS/IQ2_S/IQ3_XXS."""
    assert NEEDS_IMATRIX == {Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS}
    spec = synth_spec("tiny", n_layers=4)
    assert refusal("iq2_xs", spec) == ("mix iq2_xs gives blk.0.attn_q.weight type IQ2_XS, which llama.cpp writes "
                                       "only with an importance matrix: add --imatrix FILE (`mxtools imatrix MODEL "
                                       "-o FILE` makes one)")
    for mix in IQ_MIXES:
        needs = "add --imatrix FILE" in (refusal(mix, spec) or "")
        assert needs == (mix in NEEDS_ONE), mix
        assert "--imatrix" not in (refusal(mix, spec, {"x": 1}) or "")  # any imatrix lifts it
    assert "--imatrix" not in (refusal("iq3_xs", spec, None, Overrides(pure=True)) or "")  # IQ3_S everywhere
    ov = Overrides(tensor_types=(parse_tensor_type("ffn_up=iq2_xxs"),))
    assert "q4_k_m gives blk.0.ffn_up_exps.weight type IQ2_XXS" in refusal("q4_k_m", spec, None, ov)
    exempt = Overrides(tensor_types=(parse_tensor_type("blk=q4_k"),), output_type=Q.Q6_K, token_embd_type=Q.Q8_0)
    assert refusal("iq2_xxs", spec, None, exempt) is None
    exempt = Overrides(tensor_types=(parse_tensor_type("blk=q4_k"),), output_type=Q.IQ2_XS)
    assert "--imatrix" not in (refusal("iq2_xxs", spec, None, exempt) or "")


def test_types_without_an_encoder_are_refused():
    spec = synth_spec("tiny", n_layers=2)
    ov = Overrides(tensor_types=(parse_tensor_type("ffn_up=tq1_0"),))
    assert refusal("q4_k_m", spec, None, ov).startswith("mix q4_k_m gives blk.0.ffn_up_exps.weight type TQ1_0, "
                                                        "for which mxtools has no encoder (it writes Q8_0, ")


# ---- against llama-quantize ----

def _bundled(root: Path):
    """`mxtools example DIR` then `mxtools convert DIR/model --to gguf --outtype f16`."""
    write_example(root / "example")
    return convert(root / "example" / "model", "gguf", root / "bundled-f16.gguf", "f16")


def _synth(root: Path, name: str, **kw):
    return write_checkpoint(synth(seed=3, **kw), "gguf", root / f"{name}-f16.gguf", "f16")


BUILD = {
    "bundled": _bundled,
    # 16 layers: n/8 = 2 and 7n/8 = 14, so every per-layer rule has layers on both sides
    "synth-8x16": lambda root: _synth(root, "synth-8x16", n_layers=16, hidden_dim=256),
    # 2 experts and GQA 2: the rules for llamas that are not 8-expert (attn_v, attn_k, attn_q, attn_output)
    "synth-2x8": lambda root: _synth(root, "synth-2x8", n_layers=8, n_experts=2, n_experts_per_tok=2,
                                     hidden_dim=256),
}


def llama_imatrix(model: Path, out: Path) -> Path:
    text = out.with_suffix(".txt")
    text.write_text(TEXT.read_text()[:6000].rstrip("\n"))
    cmd = [str(llama_tool("llama-imatrix")), "-m", str(model), "-f", str(text), "-o", str(out), "-c", "64",
           "--chunks", "4", "--no-ppl", "-t", "2"]
    run = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


@pytest.fixture(scope="module", params=MODELS)
def judged(request, tmp_path_factory):
    """One model's f16 GGUF, its spec, llama-imatrix's file for it and that file as the writer reads it."""
    root = tmp_path_factory.mktemp(request.param)
    gguf_path = BUILD[request.param](root)
    with open_checkpoint(gguf_path) as ckpt:
        spec = ckpt.spec
    imatrix = llama_imatrix(gguf_path, root / "imatrix.gguf")
    return {"name": request.param, "gguf": gguf_path, "spec": spec, "imatrix": imatrix,
            "vectors": imatrix_for_writer(read_imatrix(imatrix), spec)}


def llama_quantize(src: Path, out: Path, mix: str, *options: str) -> subprocess.CompletedProcess:
    cmd = [str(llama_tool("llama-quantize")), *map(str, options), str(src), str(out), mix.upper(), "2"]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)


def file_types(path: Path) -> dict[str, Q]:
    """GGUF tensor name -> type, read with gguf-py's GGUFReader."""
    reader = GGUFReader(path)
    return {t.name: Q(t.tensor_type) for t in reader.tensors}


def policy_types(policy, spec) -> dict[str, Q]:
    return {g: policy(kind, layer, shape) for g, kind, layer, shape in gguf_plan(spec)}


def quantized_types(judged, out: Path, mix: str, *options: str) -> dict[str, Q]:
    run = llama_quantize(judged["gguf"], out, mix, *options)
    assert run.returncode == 0, f"llama-quantize {mix} {options} failed:\n{run.stderr[-3000:]}"
    types = file_types(out)
    out.unlink()
    return types


def assert_same_types(ours: dict, theirs: dict, what: str) -> None:
    assert sorted(ours) == sorted(theirs)
    bad = {g: (ours[g].name, theirs[g].name) for g in ours if ours[g] != theirs[g]}
    assert not bad, f"{what}: (ours, llama-quantize) {bad}"


# One mix per family in `make test` (test_mixes.py compares every mix's bytes on a synthetic 8-expert model there);
# every mix on every model in `make bench`.
QUICK = ("iq1_m", "iq2_xs", "iq3_xxs", "iq4_xs")


@pytest.mark.parametrize("mix", [m if m in QUICK else pytest.param(m, marks=pytest.mark.slow) for m in IQ_MIXES])
def test_types_with_imatrix_match_llama_quantize(judged, tmp_path, mix):
    """Every tensor's type is llama-quantize's, and so are its bytes: `mxtools convert F16.gguf --outtype MIX
    --imatrix F` against llama-quantize on the same file with the same llama-imatrix file."""
    run = llama_quantize(judged["gguf"], tmp_path / "llama.gguf", mix, "--imatrix", judged["imatrix"])
    assert run.returncode == 0, f"llama-quantize {mix} failed:\n{run.stderr[-3000:]}"
    ours = convert(judged["gguf"], "gguf", tmp_path / "ours.gguf", mix, imatrix_path=judged["imatrix"])
    assert_same_tensors(ours, tmp_path / "llama.gguf")
    assert_llama_cpp_runs(ours)
    theirs = file_types(tmp_path / "llama.gguf")
    policy = load_mix(mix).policy(judged["spec"], imatrix=True)
    assert_same_types(policy_types(policy, judged["spec"]), theirs, f"{mix} on {judged['name']}")
    assert "--imatrix" not in (refusal(mix, judged["spec"], judged["vectors"]) or "")
    low = {t for t in theirs.values() if t in NEEDS_IMATRIX}
    assert bool(low) == (mix in NEEDS_ONE)  # the refusal below is about real tensors


@pytest.mark.parametrize("mix", [*sorted(NEEDS_ONE), "iq4_nl", "iq4_xs"])
def test_without_imatrix_we_refuse_where_llama_quantize_does(judged, tmp_path, mix):
    run = llama_quantize(judged["gguf"], tmp_path / "llama.gguf", mix)
    if mix in NEEDS_ONE:
        assert run.returncode != 0 and REFUSED in run.stderr, run.stderr[-2000:]
        assert "add --imatrix FILE" in refusal(mix, judged["spec"])
        return
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = file_types(tmp_path / "llama.gguf")
    assert "--imatrix" not in (refusal(mix, judged["spec"]) or "")
    assert_same_types(policy_types(load_mix(mix).policy(judged["spec"]), judged["spec"]), theirs,
                      f"{mix} without imatrix on {judged['name']}")


# ---- llama-quantize's manual options with the i-quant mixes ----

MANUAL = ("--tensor-type", "ffn_down=iq3_s", "--tensor-type", r"blk\.1\.attn_q=q5_k", "--output-tensor-type", "q4_k",
          "--token-embedding-type", "iq4_nl")


@pytest.mark.parametrize("judged", ["bundled"], indirect=True)
def test_manual_options_match_llama_quantize(judged, tmp_path):
    """--tensor-type, --output-tensor-type, --token-embedding-type and --pure go through the same policy."""
    spec = judged["spec"]
    ov = Overrides(tensor_types=(parse_tensor_type("ffn_down=iq3_s"), parse_tensor_type(r"blk\.1\.attn_q=q5_k")),
                   output_type=Q.Q4_K, token_embd_type=Q.IQ4_NL)
    theirs = quantized_types(judged, tmp_path / "a.gguf", "iq2_xs", "--imatrix", judged["imatrix"], *MANUAL)
    ours = policy_types(load_mix("iq2_xs").policy(spec, True, ov), spec)
    assert_same_types(ours, theirs, "iq2_xs with manual types")
    assert theirs["blk.1.attn_q.weight"] == Q.Q5_K and theirs["blk.0.ffn_down_exps.weight"] == Q.IQ3_S
    for mix, imatrix in (("iq2_m", True), ("iq3_xs", False)):  # --pure: IQ3_S everywhere needs no imatrix
        options = ("--pure", "--imatrix", judged["imatrix"]) if imatrix else ("--pure",)
        theirs = quantized_types(judged, tmp_path / "p.gguf", mix, *options)
        ours = policy_types(load_mix(mix).policy(spec, imatrix, Overrides(pure=True)), spec)
        assert_same_types(ours, theirs, f"{mix} --pure")


@pytest.mark.parametrize("judged", ["bundled"], indirect=True)
def test_manual_types_decide_the_refusal_as_in_llama_quantize(judged, tmp_path):
    """A K-quant mix with an IQ2_XXS tensor is refused without an imatrix; an IQ2_XXS mix whose layers are all
    Q4_K is not (its token_embd Q2_K and output Q5_K are exempt) and is then written byte for byte."""
    run = llama_quantize(judged["gguf"], tmp_path / "k.gguf", "q4_k_m", "--tensor-type", "ffn_up=iq2_xxs")
    assert run.returncode != 0 and REFUSED in run.stderr
    r = _cli(judged["gguf"], tmp_path / "ours-k.gguf", "q4_k_m", "--tensor-type", "ffn_up=iq2_xxs")
    assert r.exit_code == 2 and "add --imatrix FILE" in r.output and r.output.count("\n") == 1, r.output
    run = llama_quantize(judged["gguf"], tmp_path / "llama.gguf", "iq2_xxs", "--tensor-type", "blk=q4_k")
    assert run.returncode == 0, run.stderr[-3000:]
    r = _cli(judged["gguf"], tmp_path / "ours.gguf", "iq2_xxs", "--tensor-type", "blk=q4_k")
    assert r.exit_code == 0, r.output
    meta = assert_same_tensors(tmp_path / "ours.gguf", tmp_path / "llama.gguf")
    assert meta["general.file_type"] == 19
    types = file_types(tmp_path / "ours.gguf")
    assert types["token_embd.weight"] == Q.Q2_K and types["output.weight"] == Q.Q5_K


def _cli(src: Path, out: Path, mix: str, *options: str):
    from click.testing import CliRunner

    from mxtools.cli import main
    return CliRunner().invoke(main, ["convert", str(src), "--to", "gguf", "--outtype", mix, *options, "-o", str(out)])


@pytest.mark.parametrize("judged", ["bundled"], indirect=True)
@pytest.mark.parametrize("mix", sorted(NEEDS_ONE))
def test_cli_refuses_without_imatrix(judged, tmp_path, mix):
    out = tmp_path / "o.gguf"
    r = _cli(judged["gguf"], out, mix)
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert "add --imatrix FILE" in r.output and f"mix {mix} gives " in r.output
    assert not out.exists() and not list(tmp_path.iterdir())


# ---- compare's candidates ----

def test_compare_offers_the_iquant_mixes():
    from mxtools.commands.compare import DEFAULT_FORMATS, formats, parse_formats
    known = formats()
    for mix in IQ_MIXES:
        assert f"{mix}+imatrix" in known and (mix in known) == (mix not in NEEDS_ONE)
        assert f"{mix}+gptq" in known  # GPTQ onto the i-quant codebooks
        assert known[f"{mix}+imatrix"].outtype == mix
    assert [f.name for f in parse_formats("iq2_xs+imatrix,iq4_nl,iq4_xs+imatrix")] == \
        ["iq2_xs+imatrix", "iq4_nl", "iq4_xs+imatrix"]
    with pytest.raises(MxError, match="unknown format.*iq2_xs"):
        parse_formats("iq2_xs")
    assert not any(f.startswith("iq") for f in DEFAULT_FORMATS)
    assert {"q4_k_m", "q4_k_m+imatrix", "q4_k_m+gptq"} <= set(known)


@pytest.mark.parametrize("judged", ["bundled"], indirect=True)
def test_inspect_verify_and_llama_cpp_read_llama_quantizes_iquant_files(judged, tmp_path):
    """A llama-quantize IQ2_XS and IQ4_XS file of the bundled model: inspect names its types, verify scores it
    against the f16 file (finite, IQ4_XS closer than IQ2_XS)."""
    import json

    from click.testing import CliRunner

    from mxtools.cli import main
    kld = {}
    for mix in ("iq2_xs", "iq4_xs"):
        theirs = tmp_path / f"llama-{mix}.gguf"
        assert llama_quantize(judged["gguf"], theirs, mix, "--imatrix", judged["imatrix"]).returncode == 0
        r = CliRunner().invoke(main, ["inspect", str(theirs), "--json", "-"])
        assert r.exit_code == 0, r.output
        assert mix.upper() in json.loads(r.stdout)["types"]
        r = CliRunner().invoke(main, ["verify", str(theirs), "--reference", str(judged["gguf"]), "--ctx", "128",
                                      "--chunks", "2", "--text", str(EVAL), "--json", str(tmp_path / f"{mix}.json"),
                                      "--max-kld", "100", "--min-same-top", "0", "--max-ppl-ratio", "100"])
        assert r.exit_code == 0, r.output
        kld[mix] = json.loads((tmp_path / f"{mix}.json").read_text())["kld_mean"]
    assert 0 < kld["iq4_xs"] < kld["iq2_xs"] < 10


def assert_llama_cpp_runs(path: Path) -> None:
    """llama.cpp loads the file and gives finite, non-constant logits for a few tokens."""
    import numpy as np
    from test_mixes import llama_cpp
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=32, logits_all=True, n_threads=2, verbose=False)
    try:
        llm.eval([1, 15, 300, 700, 42, 9])  # ids every test model has (the synthetic ones keep 1024 pieces)
        scores = np.array(llm.scores[:6], dtype=np.float32)
    finally:
        llm.close()
    assert np.isfinite(scores).all() and scores.std() > 0
