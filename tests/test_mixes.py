"""llama.cpp's quantization mixes: our one-pass convert against llama.cpp's own quantizer, tensor by tensor.

Judges: llama.cpp's type selection (`llama_quant_compute_types`, exported by the libllama that
llama-cpp-python ships) for the per-tensor types on real Mixtral shapes; `llama_cpp.llama_model_quantize`
for whole files without an importance matrix; the `llama-quantize` binary (built with the bindings,
tools/llama_cpp.sh) with one.
Also used by test_imatrix.py: the helpers and the model builders below.
"""
from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from judges import LazyJudge, llama_tool

from mxtools.commands.convert import convert, write_checkpoint
from mxtools.commands.synth import synth_checkpoint, synth_spec
from mxtools.core import names
from mxtools.core.errors import MxError
from mxtools.core.tokenizer import Tokenizer
from mxtools.io.files import RawFile
from mxtools.io.ggml_blocks import SUPPORTED
from mxtools.io.gguf_reader import read_header
from mxtools.layouts import open_checkpoint
from mxtools.layouts.gguf import TABLE
from mxtools.quant.imatrix import compute_imatrix, load_imatrix, save_imatrix
from mxtools.quant.mixes import (
    MIXES,
    ROW_LENGTH_FALLBACK,
    Overrides,
    gguf_options,
    load_mix,
    parse_mix,
    parse_tensor_type,
    row_fallback,
)

llama_cpp = LazyJudge("llama_cpp")


def _writable(mix: str) -> bool:
    """Whether our encoders write every type the mix can give (row fallbacks included)."""
    types = load_mix(mix).types()
    return {*types, *(ROW_LENGTH_FALLBACK.get(t, t) for t in types)} <= set(SUPPORTED)


WRITTEN = [m for m in MIXES if _writable(m)]  # the mixes compared byte for byte
N_VOCAB = 1024  # the first 1024 pieces of the v1 vocabulary: keeps embedding and output tables small


# ---- models ----

def small_vocab_tokenizer(n: int = N_VOCAB) -> Tokenizer:
    pieces, scores, types = Tokenizer.default().vocab()
    return Tokenizer.from_vocab(pieces[:n], scores[:n], types[:n])


def synth(seed: int = 0, **kw):
    """A synthetic Mixtral with a small vocabulary (rows of 256 and 512 unless told otherwise), in f16 so that
    its GGUF (norms and router F32) and HF (all f16) copies hold the same values."""
    base = {"dim": 256, "hidden_dim": 512, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 64,
            "n_experts": 8, "vocab_size": N_VOCAB}
    ckpt = synth_checkpoint(synth_spec("tiny", **{**base, **kw}), seed, torch.float16)
    ckpt.tokenizer = small_vocab_tokenizer(ckpt.spec.vocab_size)
    return ckpt


def write_pair(root: Path, ckpt, dtype: str = "f16") -> tuple[Path, Path]:
    """The same weights as a GGUF file and an HF directory."""
    return (write_checkpoint(ckpt, "gguf", root / f"model-{dtype}.gguf", dtype),
            write_checkpoint(ckpt, "hf", root / f"hf-{dtype}", dtype))


def random_tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, N_VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


# ---- llama.cpp ----

def llama_quantize_py(src: Path, out: Path, file_type: int) -> Path:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = file_type, 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed ({rc})"
    return out


def llama_quantize_bin(src: Path, out: Path, mix: str, *options: str) -> Path:
    cmd = [str(llama_tool("llama-quantize")), *options, str(src), str(out), mix.upper(), "2"]
    run = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{' '.join(cmd)} failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}"
    return out


def gguf_tensors(path: Path) -> tuple[dict, dict]:
    """(metadata, name -> (type, shape, bytes))."""
    raw = RawFile(path)
    try:
        meta, infos = read_header(raw)
        return meta, {t.name: (t.qtype, t.shape, raw.read(t.offset, t.nbytes, t.name).tobytes()) for t in infos}
    finally:
        raw.close()


def assert_same_tensors(ours: Path, theirs: Path) -> dict:
    """Every tensor of `ours` has the type, shape and bytes of the same-named one in `theirs`."""
    meta, a = gguf_tensors(ours)
    meta_b, b = gguf_tensors(theirs)
    assert sorted(a) == sorted(b)
    bad = []
    for name in sorted(a):
        (ta, sa, da), (tb, sb, db) = a[name], b[name]
        if (ta, sa) != (tb, sb):
            bad.append(f"{name}: ours {ta.name} {sa}, llama.cpp {tb.name} {sb}")
        elif da != db:
            diff = int((np.frombuffer(da, np.uint8) != np.frombuffer(db, np.uint8)).sum())
            bad.append(f"{name} ({ta.name}): {diff} of {len(da)} bytes differ")
    assert not bad, "tensors differ from llama.cpp's:\n" + "\n".join(bad)
    assert meta["general.file_type"] == meta_b["general.file_type"]
    return meta


def finite_logits(path: Path, tokens=(1, 15, 300, 700, 42, 9)) -> None:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=32, logits_all=True, n_threads=2, verbose=False)
    try:
        llm.eval(list(tokens))
        scores = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()
    assert scores.shape == (len(tokens), N_VOCAB) and np.isfinite(scores).all() and scores.std() > 0


# ---- llama.cpp's type selection through its own (C++) entry points ----

class _Desc(ctypes.Structure):
    _fields_ = [("architecture", ctypes.c_char_p)] + [(n, ctypes.c_uint32) for n in (
        "n_embd", "n_ff", "n_layer", "n_head", "n_head_kv", "n_expert", "n_embd_head_k", "n_embd_head_v")]


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


_SYMBOLS = {  # src/llama-ext.h (C++ linkage, hence the mangled names)
    "model": ("_Z31llama_quant_model_from_metadataPK22llama_quant_model_desc", ctypes.c_void_p,
              [ctypes.POINTER(_Desc)]),
    "init": ("_Z16llama_quant_initPK11llama_modelPK27llama_model_quantize_params", ctypes.c_void_p,
             [ctypes.c_void_p, ctypes.c_void_p]),
    "types": ("_Z25llama_quant_compute_typesP19quantize_state_impl11llama_ftypePP11ggml_tensorP9ggml_typem", None,
              [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int),
               ctypes.c_size_t]),
    "free": ("_Z16llama_quant_freeP19quantize_state_impl", None, [ctypes.c_void_p]),
}


def _ggml():
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_tensor_overhead.restype = ctypes.c_size_t
    lib.ggml_init.restype, lib.ggml_init.argtypes = ctypes.c_void_p, [_InitParams]
    lib.ggml_new_tensor_4d.restype = ctypes.c_void_p
    lib.ggml_new_tensor_4d.argtypes = [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_int64] * 4
    lib.ggml_set_name.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.ggml_free.argtypes = [ctypes.c_void_p]
    return lib


def gguf_plan(spec) -> list[tuple[str, str, int | None, tuple]]:
    """(gguf name, kind, layer, numpy shape) of every tensor, in llama.cpp's loading order (layer, then name)."""
    out = {}
    for name in names.canonical_names(spec):
        kind, layer, _ = names.parse(name)
        gname, slab = TABLE.to_layout(name)
        shape = names.expected_shape(name, spec)
        out[gname] = (gname, kind.key, layer, shape if slab is None else (spec.n_experts, *shape))
    return sorted(out.values(), key=lambda t: (-1 if t[2] is None else t[2], t[0]))


def llama_types(spec, file_type: int) -> dict[str, Q]:
    """gguf name -> the type llama.cpp's quantizer picks (no imatrix) for a llama model shaped like `spec`."""
    lib = llama_cpp.llama_cpp._lib
    fn = {}
    for key, (sym, res, args) in _SYMBOLS.items():
        fn[key] = getattr(lib, sym)
        fn[key].restype, fn[key].argtypes = res, args
    llama_cpp.llama_backend_init()
    ggml, plan = _ggml(), gguf_plan(spec)
    desc = _Desc(b"llama", spec.dim, spec.hidden_dim, spec.n_layers, spec.n_heads, spec.n_kv_heads,
                 spec.n_experts, spec.head_dim, spec.head_dim)
    model = fn["model"](ctypes.byref(desc))
    params = llama_cpp.llama_model_quantize_default_params()
    qs = fn["init"](model, ctypes.byref(params))
    ctx = ggml.ggml_init(_InitParams(len(plan) * ggml.ggml_tensor_overhead() + 4096, None, True))
    try:
        tensors = []
        for gname, _, _, shape in plan:
            ne = [*reversed(shape), 1, 1, 1][:4]
            t = ggml.ggml_new_tensor_4d(ctx, int(Q.F32), *ne)
            ggml.ggml_set_name(t, gname.encode())
            tensors.append(t)
        out = (ctypes.c_int * len(tensors))()
        fn["types"](qs, file_type, (ctypes.c_void_p * len(tensors))(*tensors), out, len(tensors))
    finally:
        fn["free"](qs)
        ggml.ggml_free(ctx)
        llama_cpp.llama_model_free(model)
    return {p[0]: Q(t) for p, t in zip(plan, out)}


# ---- the mixes as data ----

def test_mixes_come_from_the_recipe_files():
    assert set(MIXES) >= {"q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1",
                          "q2_k", "q3_k_s", "q3_k_m", "q3_k_l"}
    assert {m: load_mix(m).file_type for m in ("q4_k_m", "q8_0", "q4_0", "q2_k", "q3_k_l")} == \
        {"q4_k_m": 15, "q8_0": 7, "q4_0": 2, "q2_k": 10, "q3_k_l": 13}
    with pytest.raises(MxError, match="unknown quantization mix 'q9_x'.*q4_k_m"):
        load_mix("q9_x")
    with pytest.raises(MxError, match="unknown condition"):
        parse_mix({"name": "x", "file_type": 1, "default": "Q4_K", "rules": {"attn_v": [{"when": {"odd": 1},
                                                                                           "type": "Q8_0"}]}})
    with pytest.raises(MxError, match="unknown tensor kind"):
        parse_mix({"name": "x", "file_type": 1, "default": "Q4_K", "rules": {"attn_z": []}})


def test_row_fallback_follows_llama_cpp():
    assert [row_fallback(t, 4096) for t in (Q.Q4_K, Q.Q6_K, Q.Q4_0)] == [Q.Q4_K, Q.Q6_K, Q.Q4_0]
    assert [row_fallback(t, 96) for t in (Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q3_K, Q.Q8_0)] == \
        [Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_0, Q.Q8_0]
    assert [row_fallback(t, 200) for t in (Q.Q4_K, Q.Q8_0, Q.Q4_1)] == [Q.F16, Q.F16, Q.F16]


TYPE_SPECS = {  # real shapes, a non-8-expert llama, rows that need fallbacks, and llama.cpp's 70B class
    "8x7b": synth_spec("8x7b"),
    "8x22b": synth_spec("8x7b", n_layers=56, dim=6144, hidden_dim=16384, n_heads=48, head_dim=128),
    "4-experts": synth_spec("tiny", n_layers=16, n_experts=4),
    "odd-rows": synth_spec("tiny", n_layers=10, dim=96, hidden_dim=200, n_heads=3, n_kv_heads=1, head_dim=32),
    "70b-class": synth_spec("tiny", n_layers=80, n_experts=4),
    "gqa-4": synth_spec("tiny", n_layers=20, n_experts=4, n_heads=8, head_dim=32),  # Q2_K's n_gqa() >= 4 rule
}


@pytest.mark.parametrize("which", sorted(TYPE_SPECS))
def test_every_tensor_type_matches_llama_cpp(which):
    spec = TYPE_SPECS[which]
    for mix_name in MIXES:
        mix = load_mix(mix_name)
        theirs = llama_types(spec, mix.file_type)
        policy = mix.policy(spec)
        ours = {g: policy(kind, layer, shape) for g, kind, layer, shape in gguf_plan(spec)}
        bad = {g: (ours[g].name, theirs[g].name) for g in ours if ours[g] != theirs[g]}
        assert not bad, f"{mix_name} on {which}: (ours, llama.cpp) {bad}"


def test_mixtral_8x7b_choices_as_documented():
    spec = TYPE_SPECS["8x7b"]
    p = load_mix("q4_k_m").policy(spec)
    assert p("attn_k", 0, (1024, 4096)) == p("attn_v", 5, (1024, 4096)) == Q.Q8_0
    assert p("attn_output", 3, (4096, 4096)) == Q.Q5_K and p("output", None, (32000, 4096)) == Q.Q6_K
    more = [i for i in range(32) if p("ffn_down", i, (8, 4096, 14336)) == Q.Q6_K]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert p("ffn_gate_inp", 0, (8, 4096)) == p("attn_norm", 0, (4096,)) == Q.F32
    assert load_mix("q4_0").policy(spec, imatrix=True)("ffn_down", 3, (8, 4096, 14336)) == Q.Q4_1
    assert load_mix("q4_0").policy(spec, imatrix=False)("ffn_down", 3, (8, 4096, 14336)) == Q.Q4_0


# ---- whole files, byte for byte ----

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """f16 GGUF + HF of a 2-layer, 8-expert synth model, and our imatrix file for it."""
    root = tmp_path_factory.mktemp("mixes")
    gguf_path, hf_path = write_pair(root, synth())
    with open_checkpoint(gguf_path) as ckpt:
        imat = compute_imatrix(ckpt, random_tokens(256), ctx=64, device="cpu")
    return {"gguf": gguf_path, "hf": hf_path, "imatrix": save_imatrix(root / "imatrix.gguf", imat), "root": root}


def our_convert(src: Path, out: Path, mix: str, imatrix_file: Path | None = None, overrides=None) -> Path:
    """What `mxtools convert SRC --to gguf --outtype MIX [--imatrix FILE]` runs."""
    if overrides is None:
        return convert(src, "gguf", out, mix, imatrix_path=imatrix_file)
    with open_checkpoint(src) as ckpt:
        imat = load_imatrix(imatrix_file) if imatrix_file else None
        opts = gguf_options(mix, ckpt.spec, imat, overrides)
        return write_checkpoint(ckpt, "gguf", out, mix, inputs=[src], **opts)


@pytest.mark.parametrize("mix", [m for m in WRITTEN if not load_mix(m).may_need_imatrix()])
def test_mix_is_byte_identical_to_llama_cpp(model, tmp_path, mix):
    theirs = llama_quantize_py(model["gguf"], tmp_path / "llama.gguf", load_mix(mix).file_type)
    for src in ("gguf", "hf"):
        ours = our_convert(model[src], tmp_path / f"ours-{src}.gguf", mix)
        meta = assert_same_tensors(ours, theirs)
        assert meta["general.file_type"] == load_mix(mix).file_type
    finite_logits(ours)


@pytest.mark.parametrize("mix", WRITTEN)
def test_mix_with_imatrix_is_byte_identical_to_llama_quantize(model, tmp_path, mix):
    theirs = llama_quantize_bin(model["gguf"], tmp_path / "llama.gguf", mix, "--imatrix", str(model["imatrix"]))
    ours = our_convert(model["gguf"], tmp_path / "ours.gguf", mix, model["imatrix"])
    meta = assert_same_tensors(ours, theirs)
    keys = [k for k in gguf_tensors(theirs)[0] if k.startswith("quantize.imatrix.")]
    assert len(keys) >= 3 and {k: meta.get(k) for k in keys} == {k: gguf_tensors(theirs)[0][k] for k in keys}
    if load_mix(mix).may_need_imatrix():  # without one, refused as llama-quantize refuses it
        with pytest.raises(MxError, match="add --imatrix FILE"):
            our_convert(model["gguf"], tmp_path / "plain.gguf", mix)
    elif mix != "q8_0":  # the imatrix must have changed something (Q8_0 ignores it)
        plain = our_convert(model["gguf"], tmp_path / "plain.gguf", mix)
        assert gguf_tensors(plain)[1] != gguf_tensors(ours)[1]


@pytest.mark.parametrize("mix", ["q4_0", "q5_0", "q4_k_s"])
def test_first_eighth_rules_on_a_deeper_model(tmp_path, mix):
    """8 layers, so n/8 = 1: Q4_0/Q5_0 with an imatrix raise layer 0's ffn_down, Q4_K_S always does."""
    gguf_path = write_checkpoint(synth(seed=1, n_layers=8, dim=64, hidden_dim=128, head_dim=16),
                                 "gguf", tmp_path / "deep.gguf", "f16")
    with open_checkpoint(gguf_path) as ckpt:
        imat = save_imatrix(tmp_path / "imatrix.gguf", compute_imatrix(ckpt, random_tokens(64), ctx=32,
                                                                       device="cpu"))
    theirs = llama_quantize_bin(gguf_path, tmp_path / "llama.gguf", mix, "--imatrix", str(imat))
    ours = our_convert(gguf_path, tmp_path / "ours.gguf", mix, imat)
    assert_same_tensors(ours, theirs)
    raised = {"q4_0": Q.Q4_1, "q5_0": Q.Q5_1, "q4_k_s": Q.Q5_1}[mix]  # q4_k_s: Q5_K, rows of 128 -> Q5_1
    types = {n: t[0] for n, t in gguf_tensors(ours)[1].items()}
    assert types["blk.0.ffn_down_exps.weight"] == raised and types["blk.1.ffn_down_exps.weight"] != raised


def test_manual_overrides_match_llama_quantize(model, tmp_path):
    """--tensor-type, --output-tensor-type, --token-embedding-type and --pure as llama-quantize applies them."""
    ov = Overrides(tensor_types=(parse_tensor_type("FFN_down=q8_0"), parse_tensor_type(r"blk\.1\.attn_q=Q5_K")),
                   output_type=Q.Q4_K, token_embd_type=Q.Q8_0)
    manual = ("--tensor-type", "FFN_down=q8_0", "--tensor-type", r"blk\.1\.attn_q=q5_k", "--output-tensor-type",
              "q4_k", "--token-embedding-type", "q8_0")
    theirs = llama_quantize_bin(model["gguf"], tmp_path / "llama.gguf", "q4_k_m", *manual)
    assert_same_tensors(our_convert(model["gguf"], tmp_path / "ours.gguf", "q4_k_m", overrides=ov), theirs)
    assert_same_tensors(cli_convert(model["gguf"], tmp_path / "cli.gguf", "q4_k_m", *manual), theirs)
    theirs = llama_quantize_bin(model["gguf"], tmp_path / "llama-pure.gguf", "q4_k_m", "--pure")
    ours = our_convert(model["gguf"], tmp_path / "ours-pure.gguf", "q4_k_m", overrides=Overrides(pure=True))
    assert_same_tensors(ours, theirs)
    assert_same_tensors(cli_convert(model["gguf"], tmp_path / "cli-pure.gguf", "q4_k_m", "--pure"), theirs)


def cli_convert(src: Path, out: Path, mix: str, *options: str) -> Path:
    """`mxtools convert SRC --to gguf --outtype MIX OPTIONS... -o OUT`, through the CLI."""
    from click.testing import CliRunner

    from mxtools.cli import main
    result = CliRunner().invoke(main, ["convert", str(src), "--to", "gguf", "--outtype", mix, *options, "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("option,message", [(("--tensor-type", "blk.[0=q8_0"), "not a regular expression"),
                                            (("--tensor-type", "attn_q=q9_k"), "unknown GGML type"),
                                            (("--tensor-type", "noequals"), "wants PATTERN=TYPE"),
                                            (("--output-tensor-type", "nope"), "unknown GGML type")])
def test_bad_override_options_are_one_line_errors(model, tmp_path, option, message):
    from click.testing import CliRunner

    from mxtools.cli import main
    out = tmp_path / "o.gguf"
    r = CliRunner().invoke(main, ["convert", str(model["gguf"]), "--to", "gguf", "--outtype", "q4_k_m", *option,
                                  "-o", str(out)])
    assert r.exit_code == 2 and message in r.output and r.output.count("\n") == 1, r.output
    assert not out.exists() and not list(tmp_path.glob(".o.gguf.tmp-*"))
