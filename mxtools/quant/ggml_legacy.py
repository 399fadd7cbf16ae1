"""The 32-value GGML block types Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, as llama.cpp quantizes them.

Without an importance matrix these follow `quantize_row_*_ref`; with one, `quantize_row_q*_impl`
(weights imatrix * sqrt(sigma2 + x^2), sigma2 the mean square of the whole row). Q8_0 has no imatrix path.
Source: ggml/src/ggml-quants.c of the llama.cpp bundled with llama-cpp-python 0.3.x.
"""

import numpy as np
from gguf import GGMLQuantizationType as T

from mxtools.quant.ggml_math import (
    assemble,
    columns,
    f32,
    fp16_bits,
    make_qkx_quants,
    make_qx_quants,
    seqsum,
)
from mxtools.quant.ggml_registry import register

QK = 32
_HALF_DOWN = np.nextafter(f32(0.5), f32(0))  # v + copysign(this, v) truncated == roundf(v)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """[nb, 32] levels -> [nb, 16] bytes: element j in the low nibble, element j + 16 in the high one."""
    return ((q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)).astype(np.uint8)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """[nb, 32] 5-bit levels -> [nb, 4] bytes: a little-endian u32 whose bit j is bit 4 of element j."""
    return np.packbits(((q >> 4) & 1).astype(np.uint8), axis=1, bitorder="little")


def _inverse(d: np.ndarray) -> np.ndarray:
    """`d ? 1.0f/d : 0.0f`."""
    with np.errstate(divide="ignore"):
        return np.where(d != 0, f32(1) / d, f32(0))


def _absmax_signed(xb: np.ndarray) -> np.ndarray:
    """Per block (row of xb), the signed value of the first element with the largest magnitude."""
    idx = np.argmax(np.abs(xb), axis=1)
    return np.take_along_axis(xb, idx[:, None], axis=1)[:, 0]


def _row_weights(x: np.ndarray, imatrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Block columns of x and the llama.cpp weights imatrix * sqrt(sigma2 + x^2), both [32, nb]."""
    rows, n = x.shape
    sigma2 = seqsum(columns(x, n) ** 2) / f32(n)  # sequential over the whole row, like the C loop
    xc = columns(x, QK)
    sig = np.repeat(sigma2, n // QK)[None, :]
    qw = np.tile(columns(imatrix, QK), (1, rows))
    return xc, qw * np.sqrt(sig + xc * xc)


@register(T.Q8_0)
def quantize_q8_0(x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    """Q8_0: d = amax/127 (f16), q = roundf(x/d) as int8. The imatrix is ignored, as in llama.cpp."""
    xb = x.reshape(-1, QK)
    d = np.abs(xb).max(axis=1) / f32(127)
    v = xb * _inverse(d)[:, None]
    v += np.copysign(_HALF_DOWN, v)
    return assemble(len(xb), fp16_bits(d), v.astype(np.int8))


def _ref_symmetric(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """quantize_row_q4_0_ref / q5_0_ref: d = max / -nmax, q = MIN(2nmax-1, (int8)(x/d + nmax + 0.5))."""
    xb = x.reshape(-1, QK)
    d = _absmax_signed(xb) / f32(-nmax)
    v = xb * _inverse(d)[:, None]
    v += f32(nmax + 0.5)
    return d, np.minimum(2 * nmax - 1, v.astype(np.int32))


def _ref_affine(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """quantize_row_q4_1_ref / q5_1_ref: d = (max - min)/nmax, q = (int)((x - min)/d + 0.5)."""
    xb = x.reshape(-1, QK)
    lo, hi = xb.min(axis=1), xb.max(axis=1)
    d = (hi - lo) / f32(nmax)
    v = (xb - lo[:, None]) * _inverse(d)[:, None]
    v += f32(0.5)
    q = v.astype(np.int32)
    return d, lo, (np.minimum(nmax, q) if nmax == 15 else q & 0xFF)  # Q5_1 casts to uint8, no MIN


def _imatrix_symmetric(x, imatrix, nmax):
    """quantize_row_q4_0_impl / q5_0_impl: make_qx_quants weighted by the imatrix."""
    xc, w = _row_weights(x, imatrix)
    levels, d = make_qx_quants(xc, nmax, w)
    return d, levels.T


def _imatrix_affine(x, imatrix, nmax):
    """quantize_row_q4_1_impl / q5_1_impl: make_qkx3_quants weighted by the imatrix."""
    xc, w = _row_weights(x, imatrix)
    levels, d, the_min = make_qkx_quants(xc, w, nmax, -0.9, 0.05, 36)
    return d, -the_min, levels.T.astype(np.int32)


@register(T.Q4_0)
def quantize_q4_0(x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    """Q4_0: d (f16), 16 bytes of nibbles; value d * (q - 8)."""
    d, q = _ref_symmetric(x, 8) if imatrix is None else _imatrix_symmetric(x, imatrix, 8)
    return assemble(len(q), fp16_bits(d), _nibbles(q))


@register(T.Q5_0)
def quantize_q5_0(x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    """Q5_0: d (f16), qh u32 of 5th bits, 16 bytes of nibbles; value d * (q - 16)."""
    d, q = _ref_symmetric(x, 16) if imatrix is None else _imatrix_symmetric(x, imatrix, 16)
    return assemble(len(q), fp16_bits(d), _high_bits(q), _nibbles(q))


@register(T.Q4_1)
def quantize_q4_1(x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    """Q4_1: d, m (f16), 16 bytes of nibbles; value d * q + m."""
    d, m, q = _ref_affine(x, 15) if imatrix is None else _imatrix_affine(x, imatrix, 15)
    return assemble(len(q), fp16_bits(d), fp16_bits(m), _nibbles(q))


@register(T.Q5_1)
def quantize_q5_1(x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    """Q5_1: d, m (f16), qh u32 of 5th bits, 16 bytes of nibbles; value d * q + m."""
    d, m, q = _ref_affine(x, 31) if imatrix is None else _imatrix_affine(x, imatrix, 31)
    return assemble(len(q), fp16_bits(d), fp16_bits(m), _high_bits(q), _nibbles(q))
