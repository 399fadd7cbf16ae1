"""GGML block quantizers: byte-identical to llama.cpp's C code, decodable by gguf-py, exact on hand blocks."""


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

from mxtools.io.ggml_blocks import SUPPORTED, quantize

TYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
N = 512  # two K-quant super-blocks, sixteen 32-value blocks per row


def _distributions() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    rows = 160
    normal = rng.standard_normal((rows, N))
    outliers = normal * np.where(rng.random((rows, N)) < 0.01, 40.0, 1.0)
    return {
        "normal": normal * 0.02,
        "heavy": rng.standard_t(2.0, (rows, N)) * 0.01,  # Student t(2): very heavy tails
        "outliers": outliers,
        "shifted": np.abs(normal) + 0.3,  # all positive: exercises the min of the affine types
    }


DISTS = {k: v.astype(np.float32) for k, v in _distributions().items()}


def _imatrix(kind: str) -> np.ndarray | None:
    rng = np.random.default_rng(99)
    if kind == "none":
        return None
    qw = rng.exponential(1.0, N)
    if kind == "sparse":  # real imatrices have dead columns: zero weights stress the weighted fits
        qw *= rng.random(N) < 0.3
    return qw.astype(np.float32)


def _edge_rows() -> np.ndarray:
    """Degenerate rows: zero, one outlier, all negative, subnormal-f16 scales, constant, integer grids."""
    rng = np.random.default_rng(7)
    one = np.zeros(N)
    one[37] = 3.0
    rows = [np.zeros(N), one, -np.abs(rng.standard_normal(N)) - 0.1, rng.standard_normal(N) * 1e-6,
            rng.standard_normal(N) * 1e-30, np.full(N, 0.7), rng.integers(-8, 8, N) * 1.0,
            rng.integers(-3, 4, N) * 0.5, rng.standard_normal(N) * 60000.0]
    # signed zeros where the block's min (or max) is zero: which zero comes first decides the stored sign
    signed = np.where(rng.random(N) < 0.5, -0.0, 0.0)
    some = rng.random(N) < 0.5
    rows += [np.where(some, np.abs(rng.standard_normal(N)), signed),
             np.where(some, -np.abs(rng.standard_normal(N)), signed),
             signed]
    return np.array(rows, dtype=np.float32)


# 1. Differential, byte for byte, against llama.cpp's C quantizer.

@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("imat", ["none", "dense", "sparse"])
def test_matches_llama_cpp(clib, qtype, imat):
    assert_rows_like_llama_cpp(clib, qtype, DISTS, _imatrix(imat), f"imatrix={imat}")


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("imat", ["none", "dense"])
def test_edge_rows_match_llama_cpp(clib, qtype, imat):
    assert_encodes_like_llama_cpp(clib, qtype, _edge_rows(), _imatrix(imat), "edge rows")


def test_chunking_and_threads_do_not_change_bytes(clib, monkeypatch):
    assert_threads_keep_bytes(clib, monkeypatch, (Q.Q4_0, Q.Q4_K), DISTS["normal"], _imatrix("dense"), chunk_rows=3)


# 2. Independent layout check: gguf-py's decoder gets the input back.

TOLERANCE = {Q.Q8_0: 0.008, Q.Q6_K: 0.025, Q.Q5_K: 0.05, Q.Q5_1: 0.05, Q.Q5_0: 0.06,
             Q.Q4_K: 0.09, Q.Q4_1: 0.1, Q.Q4_0: 0.11, Q.Q3_K: 0.18, Q.Q2_K: 0.35}  # relative RMS error on N(0,1) data


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("imat", ["none", "dense"])
def test_gguf_py_dequantizes_close_to_input(qtype, imat):
    x = np.random.default_rng(5).standard_normal((32, N)).astype(np.float32)
    data = quantize(torch.from_numpy(x), qtype, _imatrix(imat))
    back = gguf_quants.dequantize(data, qtype)
    assert back.shape == x.shape
    rel = float(np.sqrt(np.mean((back - x) ** 2)) / x.std())
    assert rel < TOLERANCE[qtype], f"{qtype.name}: relative RMS error {rel:.4f}"


def test_gguf_py_agrees_on_q8_0_and_q4_0_bytes():
    """gguf-py's own numpy quantizer (a third implementation) writes the same Q8_0/Q4_0 bytes."""
    x = DISTS["normal"]
    for qtype in (Q.Q8_0, Q.Q4_0):
        np.testing.assert_array_equal(quantize(x, qtype), gguf_quants.quantize(x, qtype))


# 3. Hand-derived blocks.

def _block(values: dict[int, float]) -> np.ndarray:
    x = np.zeros((1, 32), dtype=np.float32)
    for i, v in values.items():
        x[0, i] = v
    return x


def _hex(data: np.ndarray) -> str:
    return data.tobytes().hex(" ")


def test_q8_0_hand_blocks():
    zero = "00 " * 34
    assert _hex(quantize(_block({}), Q.Q8_0)) == zero.strip()
    # amax 127 -> d = 1.0 (f16 0x3c00); roundf rounds halves away from zero: 0.5 -> 1, -2.5 -> -3.
    got = quantize(_block({0: 0.5, 1: -2.5, 2: 1.49, 3: 127.0, 4: -126.5}), Q.Q8_0)
    assert _hex(got) == "00 3c 01 fd 01 7f 81" + " 00" * 27
    # Only negative values: d = 127/127, q = x.
    neg = np.array([[-(i * 4 + 3) for i in range(31)] + [-127]], dtype=np.float32)
    expect = bytes([0x00, 0x3C]) + bytes((v + 256) % 256 for v in neg[0].astype(int))
    assert quantize(neg, Q.Q8_0).tobytes() == expect
    # One tiny outlier: d = 1e-7 is an f16 subnormal (2 * 2**-24); q uses the unrounded d, so 127.
    assert _hex(quantize(_block({0: 1.27e-5}), Q.Q8_0)) == "02 00 7f" + " 00" * 31


def test_q4_0_hand_blocks():
    # All zero: max stays +0, d = 0 / -8 = -0.0 (f16 0x8000), every level 8.
    assert _hex(quantize(_block({}), Q.Q4_0)) == "00 80" + " 88" * 16
    # One outlier 8.0: d = 8 / -8 = -1 (0xbc00); element 5 -> level 0, its nibble partner (21) stays 8.
    assert _hex(quantize(_block({5: 8.0}), Q.Q4_0)) == "00 bc" + " 88" * 5 + " 80" + " 88" * 10
    # Only negative values -1..-32: d = -32 / -8 = 4 (0x4400), q_j = trunc(8.5 - (j+1)/4).
    q = [(34 - (j + 1)) // 4 for j in range(32)]
    packed = bytes(q[j] | (q[j + 16] << 4) for j in range(16))
    neg = -np.arange(1, 33, dtype=np.float32)[None, :]
    assert quantize(neg, Q.Q4_0).tobytes() == bytes([0x00, 0x44]) + packed
    # Subnormal scale: d = -1e-6 / -8 = 1.25e-7 -> f16 0x0002; element 0 -> level 0.
    assert _hex(quantize(_block({0: -1e-6}), Q.Q4_0)) == "02 00 80" + " 88" * 15


# API contract.

def test_supported_lists_every_type():
    assert set(TYPES) <= set(SUPPORTED)  # the i-quants: tests/test_iquants.py, tests/test_iquants_low.py
    assert all(SUPPORTED[t][0] in (32, 256) for t in SUPPORTED)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="TQ2_0 cannot be quantized here; supported: Q8_0"):
        quantize(torch.zeros(2, 256), Q.TQ2_0)
    with pytest.raises(ValueError, match="multiple of 256, got 288"):
        quantize(torch.zeros(2, 288), Q.Q4_K)
    with pytest.raises(ValueError, match="multiple of 32, got 40"):
        quantize(torch.zeros(2, 40), Q.Q8_0)
    with pytest.raises(ValueError, match="imatrix has 31 values, the rows have 32"):
        quantize(torch.zeros(2, 32), Q.Q4_0, torch.ones(31))
    with pytest.raises(ValueError, match="imatrix holds NaN"):
        quantize(torch.zeros(2, 32), Q.Q4_0, torch.full((32,), float("inf")))
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.zeros(2, 2, 32), Q.Q4_0)
    bad = torch.zeros(4, 32)
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize(bad, Q.Q4_0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reads_16_bit_rows_directly(dtype):
    """bf16/f16 rows are widened in C one row at a time: same bytes as quantizing the float32 matrix."""
    x = torch.randn(37, 512, dtype=dtype)
    qw = torch.rand(512)
    for qtype in (Q.Q6_K, Q.Q4_K, Q.Q8_0):
        block, size = SUPPORTED[qtype]
        out = quantize(x, qtype, qw)
        assert out.dtype == np.uint8 and out.shape == (37, 512 // block * size)
        np.testing.assert_array_equal(out, quantize(x.float(), qtype, qw))
    bad = x.clone()
    bad[21, 5] = float("inf")
    with pytest.raises(ValueError, match="row 21 holds NaN"):
        quantize(bad, Q.Q4_K)
