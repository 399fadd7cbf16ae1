"""GPTQ onto llama.cpp's block grids (mxtools/quant/gguf_gptq.py).

Judges: llama.cpp's own quantizer (ggml_quantize_chunk in the libggml that llama-cpp-python ships) for the bytes
with the error feedback off; gguf-py's independent decoder for the dequantized weight; llama.cpp for loading the
files; our `convert` (byte-identical to llama-quantize, test_mixes.py) for names, types and shapes.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ggml_clib import GGML, find_library
from gguf import quants as gguf_quants

from mxtools.quant.ggml_blocks import SUPPORTED
from mxtools.quant.gguf_gptq import encode_block, pack, quantize_matrix, unpack
from mxtools.quant.gptq import Hessian

TYPES = list(SUPPORTED)
COLS = 1024  # four super-blocks, 32 legacy blocks


@pytest.fixture(scope="module")
def ggml():
    path = find_library()
    if path is None:
        pytest.fail("llama.cpp's libggml is not installed; `make test` installs every judge", pytrace=False)
    return GGML(path)


def _weights(seed: int = 0) -> np.ndarray:
    """Rows of several scales and shapes, with the edge cases of ggml's searches: an all-zero row, zero and
    constant blocks, a row whose small sub-blocks get zero scales, an outlier."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((48, COLS)) * rng.uniform(0.01, 0.2, (48, 1))).astype(np.float32)
    x[1] = 0
    x[2, :64] = 0
    x[3, 32:96] = 0.125
    x[4, :256] *= 1e-4  # sub-blocks far below the super-block's largest: their 6-bit scales round to 0
    x[5, 7] = 3.0
    x[6] = np.abs(x[6])
    return x


def _imatrix(seed: int = 1) -> np.ndarray:
    q = np.random.default_rng(seed).uniform(0, 1, COLS).astype(np.float32) ** 4 * 5
    q[:40] = 0  # columns no token reached
    return q


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("weighted", [False, True], ids=["ref", "imatrix"])
def test_without_feedback_bytes_equal_llama_cpp(ggml, qtype, weighted):
    """Block by block: ggml's search, its scale quantization, its final rounding and its packing."""
    x, qw = _weights(), _imatrix() if weighted else None
    ours = quantize_matrix(torch.from_numpy(x), qtype, weights=qw, feedback=False)
    theirs = ggml.quantize(x, int(qtype), qw)
    assert ours.method == "rtn" and ours.data.shape == theirs.shape
    bad = int((ours.data != theirs).any(1).sum())
    assert bad == 0, f"{qtype.name}: {bad} of {len(x)} rows differ from llama.cpp's"


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_levels_unpack_and_pack_back(qtype):
    block = SUPPORTED[qtype][0]
    y, _ = encode_block(qtype, _weights()[:, :block].copy(), None, None)
    q = unpack(qtype, y)
    again = y.copy()
    pack(qtype, again, np.zeros_like(q))
    assert not np.array_equal(again, y)
    pack(qtype, again, q)
    np.testing.assert_array_equal(again, y)


def _correlated(cols: int, n: int = 2048, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    return torch.randn(n, cols, generator=g) @ mix * torch.rand(cols, generator=g).mul(2)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_feedback_lowers_output_error_and_dequantizes_as_gguf_py(qtype):
    """GPTQ's output error against the imatrix rounding of the same weight (importance from the same inputs).
    Measured 0.56-0.68 for every type with these seeds; the limit leaves room for that spread."""
    cols = 512
    w = torch.from_numpy(_weights()[:, :cols].copy())
    x = _correlated(cols)
    hess = Hessian(cols)
    hess.add(x)
    gptq = quantize_matrix(w, qtype, hess.matrix())
    rtn = quantize_matrix(w, qtype, weights=x.square().mean(0), feedback=False)
    back = gguf_quants.dequantize(gptq.data, qtype).reshape(w.shape)
    np.testing.assert_array_equal(back, gptq.weight.numpy())
    err = [float((x @ (w - q.weight).T).square().mean()) for q in (gptq, rtn)]
    assert gptq.method == "gptq" and gptq.loss > 0 and err[0] < 0.8 * err[1], f"{qtype.name}: {err}"
