"""The 2-bit and 1-bit i-quants (IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M): byte-identical to llama.cpp's
ggml_quantize_chunk, decodable by gguf-py."""


import numpy as np
import pytest
import torch
from ggml_clib import (
    assert_encodes_like_llama_cpp,
    assert_rows_like_llama_cpp,
    assert_threads_keep_bytes,
)
from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants

from mxtools.io.ggml_blocks import NEEDS_IMATRIX, SUPPORTED, quantize

TYPES = [Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ1_S, Q.IQ1_M]
N = 512  # two super-blocks per row


def _imatrix(kind: str, n: int = N) -> np.ndarray | None:
    rng = np.random.default_rng(99)
    if kind == "none":
        return None
    qw = rng.exponential(1.0, n)
    if kind == "sparse":  # dead columns: zero weights
        qw *= rng.random(n) < 0.3
    return qw.astype(np.float32)


def _rows() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    normal = rng.standard_normal((24, N))
    one = np.zeros((2, N))
    one[0, 37], one[1, 300] = 3.0, -0.01
    signed = np.where(rng.random(N) < 0.5, -0.0, 0.0)
    edge = [np.zeros(N), signed, np.full(N, 0.7), np.full(N, -2.5), rng.integers(-3, 4, N) * 0.5,
            rng.integers(0, 2, N) * 1.0, rng.standard_normal(N) * 1e-6, rng.standard_normal(N) * 1e-12,
            rng.standard_normal(N) * 1e-30, rng.standard_normal(N) * 60000.0]
    denormal = rng.standard_normal((2, N)) * np.float32(2.0 ** -130)  # float32 subnormals
    return {
        "normal": normal * 0.02,
        "heavy": rng.standard_t(2.0, (24, N)) * 0.01,
        "outliers": normal * np.where(rng.random((24, N)) < 0.01, 40.0, 1.0),
        "one_outlier": one,
        "edge": np.array(edge),
        "denormal": denormal,
    }


ROWS = {k: v.astype(np.float32) for k, v in _rows().items()}


def _imats(qtype: Q) -> list[str]:
    return ["dense", "sparse"] + ([] if qtype in NEEDS_IMATRIX else ["none"])


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matches_llama_cpp(clib, qtype):
    for imat in _imats(qtype):
        qw = _imatrix(imat)
        assert_rows_like_llama_cpp(clib, qtype, ROWS, qw, f"imatrix={imat}")


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_mixtral_widths_match_llama_cpp(clib, qtype):
    """Rows as wide as 8x7B's (4096: attention and w1/w3 inputs; 14336: w2's input), a few rows each."""
    rng = np.random.default_rng(3)
    for n in (4096, 14336):
        x = (rng.standard_normal((3, n)) * 0.015).astype(np.float32)
        for imat in _imats(qtype):
            assert_encodes_like_llama_cpp(clib, qtype, x, _imatrix(imat, n), f"n={n} {imat}")


def test_threads_and_chunks_do_not_change_bytes(clib, monkeypatch):
    assert_threads_keep_bytes(clib, monkeypatch, TYPES, ROWS["heavy"], _imatrix("dense"), chunk_rows=3)


# gguf-py's decoder (an independent implementation of the layouts) gets values close to the input back: relative
# RMS error on N(0, 1) rows with a dense imatrix or none (measured 0.27 IQ2_S, 0.33 IQ2_XS, 0.38 IQ2_XXS, 0.50-0.59
# IQ1_M, 0.52-0.53 IQ1_S over three seeds; a sparse imatrix leaves its dead columns unfitted, so it is left out).
TOLERANCE = {Q.IQ2_S: 0.3, Q.IQ2_XS: 0.37, Q.IQ2_XXS: 0.42, Q.IQ1_M: 0.64, Q.IQ1_S: 0.58}


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_gguf_py_dequantizes_close_to_input(qtype):
    x = np.random.default_rng(5).standard_normal((32, N)).astype(np.float32)
    for imat in ("dense",) + (() if qtype in NEEDS_IMATRIX else ("none",)):
        data = quantize(x, qtype, _imatrix(imat))
        back = gguf_quants.dequantize(data, qtype)
        assert back.shape == x.shape
        rel = float(np.sqrt(np.mean((back - x) ** 2)) / x.std())
        assert rel < TOLERANCE[qtype], f"{qtype.name} imatrix={imat}: relative RMS error {rel:.4f}"


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_refuses_non_finite_rows_and_missing_imatrix(qtype):
    qw = _imatrix("dense")
    bad = np.random.default_rng(2).standard_normal((5, N)).astype(np.float32)
    bad[3, 100] = np.nan
    with pytest.raises(ValueError, match="row 3 holds NaN or infinite values"):
        quantize(bad, qtype, qw)
    bad[3, 100], bad[1, 7] = 0, -np.inf
    with pytest.raises(ValueError, match="row 1 holds NaN or infinite values"):
        quantize(torch.from_numpy(bad).to(torch.bfloat16), qtype, qw)
    if qtype in NEEDS_IMATRIX:
        with pytest.raises(ValueError, match=f"{qtype.name} needs an importance matrix"):
            quantize(bad[:1], qtype)
    with pytest.raises(ValueError, match="multiple of 256, got 288"):
        quantize(np.zeros((1, 288), np.float32), qtype, np.ones(288, np.float32))
    assert SUPPORTED[qtype][0] == 256
