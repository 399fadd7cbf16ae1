"""The i-quant encoders IQ4_NL, IQ4_XS, IQ3_XXS and IQ3_S: byte-identical to llama.cpp's ggml_quantize_chunk with
and without an importance matrix, decodable by gguf-py, non-finite rows refused."""


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

from mxtools import native
from mxtools.io.ggml_blocks import SUPPORTED, quantize

TYPES = [Q.IQ4_NL, Q.IQ4_XS, Q.IQ3_XXS, Q.IQ3_S]
N = 512  # two 256-value super-blocks, sixteen 32-value blocks per row


def _distributions() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(4321)
    rows = 48
    normal = rng.standard_normal((rows, N))
    return {
        "normal": normal * 0.02,
        "heavy": rng.standard_t(2.0, (rows, N)) * 0.01,  # Student t(2): very heavy tails
        "outliers": normal * np.where(rng.random((rows, N)) < 0.01, 40.0, 1.0),
    }


DISTS = {k: v.astype(np.float32) for k, v in _distributions().items()}


def _imatrix(kind: str, n: int = N) -> np.ndarray | None:
    rng = np.random.default_rng(98)
    if kind == "none":
        return None
    qw = rng.exponential(1.0, n)
    if kind == "sparse":  # dead columns, a whole dead 32-value sub-block and a dead 256-value super-block
        qw *= rng.random(n) < 0.3
        qw[64:96] = 0
        qw[256:512] = 0
    return qw.astype(np.float32)


def _edge_rows() -> np.ndarray:
    """Zeros, constants, one outlier, denormal-sized values, an all-zero sub-block in the middle, huge values."""
    rng = np.random.default_rng(8)
    one = np.zeros(N)
    one[37] = 3.0
    hole = rng.standard_normal(N)
    hole[64:96] = 0  # IQ3_S stores the sub-blocks after a zero one a slot early
    hole[300:340] = 0
    rows = [np.zeros(N), np.full(N, 0.7), np.full(N, -2.5), one, -one, rng.standard_normal(N) * 1e-6,
            rng.standard_normal(N) * 1e-20, rng.standard_normal(N) * 1e-39,  # float32 subnormals
            hole, -np.abs(rng.standard_normal(N)), rng.integers(-8, 8, N) * 1.0, rng.standard_normal(N) * 60000.0,
            np.where(rng.random(N) < 0.5, -0.0, 0.0)]
    return np.array(rows, dtype=np.float32)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("imat", ["none", "dense", "sparse"])
def test_matches_llama_cpp(clib, qtype, imat):
    assert_rows_like_llama_cpp(clib, qtype, DISTS, _imatrix(imat), f"imatrix={imat}")


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("imat", ["none", "dense", "sparse"])
def test_edge_rows_match_llama_cpp(clib, qtype, imat):
    assert_encodes_like_llama_cpp(clib, qtype, _edge_rows(), _imatrix(imat), f"edge rows imatrix={imat}")


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("width", [4096, 14336])
def test_mixtral_widths_match_llama_cpp(clib, qtype, width):
    x = (np.random.default_rng(width).standard_normal((3, width)) * 0.02).astype(np.float32)
    for imat in ("none", "dense"):
        assert_encodes_like_llama_cpp(clib, qtype, x, _imatrix(imat, width), f"n={width} {imat}")


def test_threads_and_chunks_do_not_change_bytes(clib, monkeypatch):
    """Two threads over uneven chunks (the IQ3 neighbour tables are built once, whichever thread comes first)."""
    assert_threads_keep_bytes(clib, monkeypatch, TYPES, DISTS["outliers"], _imatrix("dense"), chunk_rows=5)


def test_supported_lists_the_iquants():
    assert all(SUPPORTED[t] == size for t, size in
               {Q.IQ4_NL: (32, 18), Q.IQ4_XS: (256, 136), Q.IQ3_XXS: (256, 98), Q.IQ3_S: (256, 110)}.items())


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_non_finite_rows_are_refused(qtype):
    for bad_value in (float("nan"), float("inf"), -float("inf")):
        x = np.random.default_rng(3).standard_normal((5, N)).astype(np.float32)
        x[3, 300] = bad_value
        out = np.zeros((5, N // SUPPORTED[qtype][0] * SUPPORTED[qtype][1]), dtype=np.uint8)
        with pytest.raises(native.NonFiniteRow) as err:
            native.quantize_rows(int(qtype), x, "f32", out, None)
        assert err.value.row == 3
        with pytest.raises(ValueError, match="row 3 holds NaN or infinite"):
            quantize(x, qtype, _imatrix("dense"))


# Relative RMS error of gguf-py's decoding on N(0, 1) rows, measured 2026-12-06 (2-core x86-64 dev box) over three
# seeds: IQ4_NL/IQ4_XS 0.076-0.078, IQ3_XXS 0.211-0.216, IQ3_S 0.148-0.169 (seed to seed they move by under 0.003).
# A wrong layout decodes to errors near 1 or above.
TOLERANCE = {Q.IQ4_NL: 0.09, Q.IQ4_XS: 0.09, Q.IQ3_XXS: 0.24, Q.IQ3_S: 0.19}


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("imat", ["none", "dense"])
def test_gguf_py_dequantizes_close_to_input(qtype, imat):
    x = np.random.default_rng(5).standard_normal((32, N)).astype(np.float32)
    data = quantize(torch.from_numpy(x), qtype, _imatrix(imat))
    assert data.shape == (32, N // SUPPORTED[qtype][0] * SUPPORTED[qtype][1])
    back = gguf_quants.dequantize(data, qtype)
    assert back.shape == x.shape
    rel = float(np.sqrt(np.mean((back - x) ** 2)) / x.std())
    assert rel < TOLERANCE[qtype], f"{qtype.name}: relative RMS error {rel:.4f}"


def test_iq4_nl_hand_blocks():
    """Layout and sign convention on blocks derived by hand: byte j holds values j (low nibble) and j + 16."""
    x = np.zeros((1, 32), dtype=np.float32)
    # All zero: d = 0, every value at level 8 (the level 1, nearest to 0).
    assert quantize(x, Q.IQ4_NL).tobytes().hex(" ") == "00 00" + " 88" * 16
    # One value 127 (the only weight, x^2): level 15 (113) with d = 127/113 = 1.1239 (f16 0x3c7f); no candidate
    # scale fits strictly better.
    x[0, 5] = 127.0
    assert quantize(x, Q.IQ4_NL).tobytes().hex(" ") == "7f 3c" + " 88" * 5 + " 8f" + " 88" * 10
    # -127 at value 21: the scale turns negative (-127/113, 0xbc7f) and the value again takes level 15.
    x[0, 5], x[0, 21] = 0.0, -127.0
    assert quantize(x, Q.IQ4_NL).tobytes().hex(" ") == "7f bc" + " 88" * 5 + " f8" + " 88" * 10
