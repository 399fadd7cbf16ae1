"""Shared fixtures: small synthetic Mixtrals written through the project's own writers."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mxtools.cli import main
from mxtools.commands.convert import write_checkpoint
from mxtools.commands.quantize import QuantizeSettings, run_quantize
from mxtools.commands.synth import synth_checkpoint, synth_spec

torch.set_num_threads(min(2, os.cpu_count() or 1))


class FixedHessian:
    """A stand-in for gptq.Hessian: a given matrix and token count (to force a failing Cholesky, a starved one)."""

    def __init__(self, h, n_tokens=1000):
        self.h, self.n_tokens = h, n_tokens

    def matrix(self):
        return self.h.clone()


def small_spec(**kw):
    """A Mixtral small enough for every test (real 32000-piece vocabulary)."""
    base = dict(n_layers=2, dim=64, hidden_dim=128, n_heads=4, n_kv_heads=2, head_dim=16, n_experts=4,
                n_experts_per_tok=2)
    base.update(kw)
    return synth_spec("tiny", **base)


def write_synth(out: Path, layout: str, dtype: str = "f32", spec=None, seed: int = 0) -> Path:
    from mxtools.core.tensors import FLOAT_DTYPES
    ckpt = synth_checkpoint(spec or small_spec(), seed, FLOAT_DTYPES[dtype])
    return write_checkpoint(ckpt, layout, out, dtype)


def text_head(tmp_path_factory, source: Path, chars: int) -> Path:
    """The first `chars` characters of a bundled text, as a file (for tests that need less of it)."""
    path = tmp_path_factory.mktemp("text") / source.name
    path.write_text(source.read_text(encoding="utf-8")[:chars], encoding="utf-8")
    return path


def write_concat(mistral_dir: Path, dst: Path, spec) -> Path:
    """transformers' old converter input: experts stacked on rows (w2 blocks transposed), router under
    block_sparse_moe, params.json in the HF spelling, two .pt files."""
    dst.mkdir()
    shutil.copy(mistral_dir / "tokenizer.model", dst / "tokenizer.model")
    sd = load_file(mistral_dir / "consolidated.safetensors")
    out = {}
    for key, w in sd.items():
        if ".feed_forward.experts." not in key:
            out[key.replace(".feed_forward.gate.", ".block_sparse_moe.gate.")] = w
    for i in range(spec.n_layers):
        for k in ("w1", "w2", "w3"):
            blocks = [sd[f"layers.{i}.feed_forward.experts.{e}.{k}.weight"] for e in range(spec.n_experts)]
            out[f"layers.{i}.block_sparse_moe.{k}"] = torch.cat([b.t() if k == "w2" else b for b in blocks])
    keys = sorted(out)
    for part in range(2):
        torch.save({k: out[k].contiguous() for k in keys[part::2]}, dst / f"consolidated.0{part}.pt")
    (dst / "params.json").write_text(json.dumps({
        "hidden_size": spec.dim, "num_hidden_layers": spec.n_layers, "num_attention_heads": spec.n_heads,
        "num_key_value_heads": spec.n_kv_heads, "intermediate_size": spec.hidden_dim, "rms_norm_eps": 1e-5,
        "vocab_size": spec.vocab_size, "rope_theta": 1e6, "num_local_experts": spec.n_experts,
        "num_experts_per_tok": spec.n_experts_per_tok}))
    return dst


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """Write a synth model once per session per (layout, dtype) and hand out its path."""
    root = tmp_path_factory.mktemp("synth")
    cache = {}

    def get(layout="hf", dtype="f32") -> Path:
        key = (layout, dtype)
        if key not in cache:
            name = f"{layout}-{dtype}" + (".gguf" if layout == "gguf" else "")
            cache[key] = write_synth(root / name, layout, dtype)
        return cache[key]
    return get


@pytest.fixture(scope="module")
def clib():
    """llama.cpp's own quantizer, the judge of the GGML encoders: libggml-base from the installed llama-cpp-python
    (or $MXTOOLS_GGML_LIB)."""
    from ggml_clib import GGML, find_library
    from judges import require

    if not os.environ.get("MXTOOLS_GGML_LIB"):
        require("llama_cpp")
    path = find_library()
    assert path is not None, "llama_cpp is installed but ships no libggml-base/libggml to load"
    return GGML(path)


# The peer tools' fixture checkpoints (tests/fixtures/<tool>) were made from this float model (tools/*_fixture.py:
# this spec, seed 0, f16) and are verified on SHORT_TEXT (token ids below its 512-token vocabulary).
PEER_SPEC = small_spec(vocab_size=512)
SHORT_TEXT = " ".join(["in the of to and a on at by is"] * 40)


def verify_json(candidate, reference, text, json_out, *extra):
    """`mxtools verify` on 4 chunks of 64 tokens: (the CLI result, its JSON report or None)."""
    r = CliRunner().invoke(main, ["verify", str(candidate), "--reference", str(reference), "--text", str(text),
                                  "--ctx", "64", "--chunks", "4", "--device", "cpu", "--json", str(json_out),
                                  *map(str, extra)])
    return r, json.loads(json_out.read_text()) if json_out.exists() else None


@pytest.fixture(scope="session")
def peer_float(tmp_path_factory):
    return write_synth(tmp_path_factory.mktemp("peer-float") / "hf", "hf", "f16", spec=PEER_SPEC)


@pytest.fixture(scope="session")
def peer_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("peer-text") / "short.txt"
    path.write_text(SHORT_TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def peer_rtn_kld(peer_float, peer_text, tmp_path_factory):
    """mxtools' own round-to-nearest int4 g32 of the peers' float model, verified the same way: the yardstick."""
    root = tmp_path_factory.mktemp("peer-rtn")
    run_quantize(peer_float, root / "rtn", QuantizeSettings(method="rtn", group_size=32))
    return verify_json(root / "rtn", peer_float, peer_text, root / "rtn.json")[1]["kld_mean"]
