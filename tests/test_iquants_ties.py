"""Rows whose candidate scales tie exactly: the 2-bit and 1-bit i-quant searches must keep llama.cpp's winner
among equals (its scans keep the first best of their order, and a later candidate whose rounded score only matches
the best may still replace it), byte for byte.

Ties come from values drawn from a few levels, weights that are zero or powers of two (sums exact in float), values
in +-pairs and sub-blocks with a silent half: many splits and scales then give identical sums."""

import numpy as np
import pytest
from ggml_clib import assert_same_rows
from gguf import GGMLQuantizationType as Q

from mxtools.io.ggml_blocks import quantize

TYPES = [Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ1_S, Q.IQ1_M]
N = 512


def _families() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(77)
    rows = 48
    levels = rng.integers(-2, 3, (rows, N)) * 0.01
    powers = np.sign(rng.standard_normal((rows, N))) * 2.0 ** rng.integers(-8, -4, (rows, N))
    pairs = rng.integers(1, 5, (rows, N // 2)) * 0.25
    pairs = np.stack([pairs, -pairs], axis=-1).reshape(rows, N)
    half = rng.standard_normal((rows, N)) * 0.02
    half.reshape(rows, -1, 16)[:, :, 8:] = 0
    two = np.where(rng.random((rows, N)) < 0.5, 0.03, -0.01)
    on_off = (rng.random(N) < 0.5).astype(np.float32)          # dead columns: zero weights
    pow2 = 2.0 ** rng.integers(-2, 3, N)                        # exact products
    ones = np.ones(N)
    return {
        "levels/on_off": (levels, on_off),
        "levels/ones": (levels, ones),
        "powers/pow2": (powers, pow2),
        "powers/on_off": (powers, on_off * pow2),
        "pairs/ones": (pairs, ones),
        "half/ones": (half, ones),
        "half/on_off": (half, on_off),
        "two/pow2": (two, pow2),
    }


FAMILIES = {k: (x.astype(np.float32), w.astype(np.float32)) for k, (x, w) in _families().items()}


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_ties_match_llama_cpp(clib, qtype):
    for name, (x, qw) in FAMILIES.items():
        assert_same_rows(quantize(x, qtype, qw), clib.quantize(x, int(qtype), qw), f"{qtype.name} {name}")
