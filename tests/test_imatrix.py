"""Importance matrices: our GGUF imatrix file against llama.cpp's reader and quantizer, llama-imatrix's own file
against our reader and our computation (same text, same chunks), and the per-expert slices."""
from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from judges import llama_tool
from test_mixes import (
    assert_same_tensors,
    llama_cpp,
    llama_quantize_bin,
    our_convert,
    random_tokens,
    synth,
)

from mxtools.commands.convert import write_checkpoint
from mxtools.commands.synth import synth_spec
from mxtools.core.chunking import chunk_tokens, with_bos
from mxtools.core.errors import FormatError, ShapeError
from mxtools.io.files import RawFile
from mxtools.io.gguf_reader import read_header
from mxtools.layouts import open_checkpoint
from mxtools.quant.imatrix import (
    Imatrix,
    ImatrixStat,
    compute_imatrix,
    imatrix_for_writer,
    load_imatrix,
    read_imatrix,
    save_imatrix,
)

CTX, CHUNKS = 64, 4
STARVED = 7  # the expert no token reaches
TEXT = Path(__file__).resolve().parents[1] / "mxtools" / "assets" / "text" / "calib.txt"

X = "model.layers.{}.block_sparse_moe.experts.{}.{}.weight"


def starved_model():
    """A synth model whose router never picks expert 7: every embedding has a large positive column 0
    (it survives the residual stream), and router row 7 weighs that column strongly negative."""
    ckpt = synth()

    def embed(w):
        w = w.clone()
        w[:, 0] = 30
        return w

    def router(w):
        w = w.clone()
        w[STARVED] = 0
        w[STARVED, 0] = -10
        return w
    ckpt.tensors["model.embed_tokens.weight"] = ckpt.tensors["model.embed_tokens.weight"].map(embed)
    for i in range(ckpt.spec.n_layers):
        name = f"model.layers.{i}.block_sparse_moe.gate.weight"
        ckpt.tensors[name] = ckpt.tensors[name].map(router)
    return ckpt


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    """The starved model as an F32 GGUF, a text, its llama.cpp tokens, llama-imatrix's files (GGUF and legacy)
    and ours, all over the same CHUNKS chunks of CTX tokens. llama.cpp runs with an f32 KV cache and without
    flash attention (its CPU kernel rounds through f16, 5e-4 relative): then the sums agree to ~3e-6."""
    root = tmp_path_factory.mktemp("imatrix")
    model = write_checkpoint(starved_model(), "gguf", root / "model-f32.gguf", "f32")
    text = root / "text.txt"
    text.write_text(TEXT.read_text()[:8000].rstrip("\n"))  # llama.cpp drops one trailing newline
    vocab = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
    tokens = vocab.tokenize(text.read_text().encode(), add_bos=True, special=False)
    vocab.close()
    out = {"model": model, "text": text, "tokens": tokens, "root": root}
    for fmt, name in (("gguf", "llama.gguf"), ("dat", "llama.dat")):
        cmd = [str(llama_tool("llama-imatrix")), "-m", str(model), "-f", str(text), "-o", str(root / name),
               "-c", str(CTX), "--chunks", str(CHUNKS), "--no-ppl", "-t", "2", "-ctk", "f32", "-ctv", "f32",
               "-fa", "off", "--output-format", fmt]
        run = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        out[fmt] = root / name
    with open_checkpoint(model) as ckpt:
        out["ours"] = compute_imatrix(ckpt, tokens, ctx=CTX, chunks=CHUNKS, device="cpu")
    out["ours_file"] = save_imatrix(root / "ours.gguf", out["ours"], datasets=[str(text)])
    return out


def test_llama_imatrix_file_agrees_with_ours(judged):
    theirs, ours = read_imatrix(judged["gguf"]), judged["ours"]
    assert sorted(theirs) == sorted(ours)  # q/k/v/o, router, each expert's w1/w2/w3
    assert theirs.chunk_size == CTX and theirs.chunk_count == ours.chunk_count == CHUNKS
    for name, stat in ours.items():
        assert theirs[name].count == stat.count, name
        torch.testing.assert_close(theirs[name].sum_sq, stat.sum_sq, rtol=3e-5, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert ours["model.layers.0.self_attn.q_proj.weight"].count == CHUNKS * CTX
    for i in range(2):  # top-2 routing: every token counted twice over the experts, none by the starved one
        counts = [ours[X.format(i, e, "w2")].count for e in range(8)]
        assert sum(counts) == 2 * CHUNKS * CTX and counts[STARVED] == 0 and max(counts) > CTX


def test_expert_without_tokens_gets_ones_as_in_llama_quantize(judged):
    for path in (judged["gguf"], judged["ours_file"]):
        vecs = load_imatrix(path)
        for key in ("w1", "w2", "w3"):
            assert torch.equal(vecs[X.format(1, STARVED, key)], torch.ones_like(vecs[X.format(1, STARVED, key)]))
        seen = read_imatrix(path)[X.format(1, 0, "w2")]
        assert torch.equal(vecs[X.format(1, 0, "w2")], seen.sum_sq / np.float32(seen.count))


def test_legacy_dat_file_reads_like_the_gguf_one(judged):
    legacy, current = load_imatrix(judged["dat"]), load_imatrix(judged["gguf"])
    assert read_imatrix(judged["dat"]).legacy and sorted(legacy) == sorted(current)
    for name in current:
        torch.testing.assert_close(legacy[name], current[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("which", ["ours_file", "gguf"])
def test_llama_quantize_and_we_quantize_alike_with_either_file(judged, tmp_path, which):
    """Our file read by llama-quantize, llama-imatrix's read by us: the same bytes either way."""
    theirs = llama_quantize_bin(judged["model"], tmp_path / "llama.gguf", "q4_k_m", "--imatrix",
                                str(judged[which]))
    assert_same_tensors(our_convert(judged["model"], tmp_path / "ours.gguf", "q4_k_m", judged[which]), theirs)


def _header(path: Path):
    raw = RawFile(path)
    try:
        return read_header(raw)
    finally:
        raw.close()


def test_file_layout_is_llama_cpps(judged):
    """Our file has llama-imatrix's tensors in its order (entries by name, in_sum2 then counts), all F32."""
    meta, infos = _header(judged["ours_file"])
    meta_l, infos_l = _header(judged["gguf"])
    assert [(t.name, t.shape, t.qtype) for t in infos] == [(t.name, t.shape, t.qtype) for t in infos_l]
    for key in ("general.type", "imatrix.chunk_count", "imatrix.chunk_size", "imatrix.datasets"):
        assert meta[key] == meta_l[key], key
    shapes = {t.name: t.shape for t in infos}
    assert shapes["blk.1.ffn_down_exps.weight.in_sum2"] == (8, 512)
    assert shapes["blk.1.ffn_down_exps.weight.counts"] == (8, 1)
    assert shapes["blk.0.attn_k.weight.in_sum2"] == (256,) and shapes["blk.0.ffn_gate_inp.weight.counts"] == (1,)


def test_round_trip_and_writer_vectors(tmp_path):
    spec = synth_spec("tiny", n_layers=1, n_experts=2, dim=64, hidden_dim=96, head_dim=16)
    stats = {X.format(0, 1, "w2"): ImatrixStat(torch.arange(96, dtype=torch.float32), 3),
             "model.layers.0.self_attn.o_proj.weight": ImatrixStat(torch.full((64,), 2.0), 4)}
    path = save_imatrix(tmp_path / "i.gguf", Imatrix(stats, chunk_size=8, chunk_count=2))
    back = read_imatrix(path)
    assert back[X.format(0, 0, "w2")].count == 0  # the expert absent from the data is stored as llama.cpp does
    assert torch.equal(back[X.format(0, 1, "w2")].sum_sq, stats[X.format(0, 1, "w2")].sum_sq)
    vecs = imatrix_for_writer(back, spec)
    assert torch.equal(vecs["model.layers.0.self_attn.o_proj.weight"], torch.full((64,), 0.5))
    assert torch.equal(vecs[X.format(0, 0, "w2")], torch.ones(96))
    with pytest.raises(ShapeError, match="64 values"):
        imatrix_for_writer({X.format(0, 0, "w2"): torch.ones(64)}, spec)


def test_legacy_file_with_merged_experts(tmp_path):
    """A hand-made .dat: one flat vector per merged tensor, values = mean * ncall."""
    entries = [("blk.0.ffn_gate_inp.weight", 2, np.full(4, 6.0)),
               ("blk.0.ffn_down_exps.weight", 2, np.arange(2 * 6, dtype=np.float64)),
               ("blk.0.ffn_gate_exps.weight", 2, np.full(2 * 4, 4.0))]
    blob = struct.pack("<i", len(entries))
    for name, ncall, vals in entries:
        blob += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, len(vals))
        blob += vals.astype("<f4").tobytes()
    (tmp_path / "old.dat").write_bytes(blob + struct.pack("<i", 2) + struct.pack("<i", 0))
    vecs = load_imatrix(tmp_path / "old.dat")
    assert torch.equal(vecs[X.format(0, 1, "w2")], torch.arange(6, 12, dtype=torch.float32) / 2)
    assert torch.equal(vecs[X.format(0, 0, "w1")], torch.full((4,), 2.0))
    (tmp_path / "bad.dat").write_bytes(b"\x05\x00")
    with pytest.raises(FormatError):
        read_imatrix(tmp_path / "bad.dat")


def test_chunks_are_llama_imatrix_chunks():
    toks = torch.arange(10, 75)
    c = with_bos(chunk_tokens(toks, 16))
    assert c.shape == (4, 16) and c[:, 0].tolist() == [1] * 4 and c[1, 1:].tolist() == list(range(27, 42))
    assert chunk_tokens(toks, 16, chunks=2).shape == (2, 16)
    with pytest.raises(ShapeError, match="one chunk"):
        chunk_tokens(toks[:10], 16)


def test_compute_counts_match_routing():
    ckpt = synth(n_layers=1, n_experts=4, dim=64, hidden_dim=64, head_dim=16)
    imat = compute_imatrix(ckpt, random_tokens(96), ctx=32, device="cpu")
    counts = [imat[X.format(0, e, "w1")].count for e in range(4)]
    assert sum(counts) == 2 * 96 and imat["model.layers.0.block_sparse_moe.gate.weight"].count == 96
    assert all(imat[X.format(0, e, "w1")].count == imat[X.format(0, e, "w3")].count for e in range(4))


def test_observed_kinds_are_the_imatrix_policy():
    """The forward-pass observation points cover exactly the kinds names.py says an importance matrix takes."""
    from mxtools.core import names
    from mxtools.quant.imatrix import OBSERVED
    assert {k for kinds in OBSERVED.values() for k in kinds} == {k.key for k in names.KINDS if k.imatrix}
