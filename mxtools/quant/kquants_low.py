"""K-quants Q2_K and Q3_K (256-value super-blocks of sixteen 16-value sub-blocks), as llama.cpp does them.

Q2_K: ref = make_qkx2_quants with mean-absolute error, 4-bit sub-block scales/mins scaled by max;
imatrix = make_qkx3_quants weighted by imatrix * sqrt(sigma2 + x^2), scales/mins via make_qp_quants.
Q3_K: ref = make_q3_quants (x^2-weighted coordinate descent), 6-bit signed sub-block scales;
imatrix = make_qx_quants for the values and again for the scales. Source: ggml/src/ggml-quants.c.
"""

import numpy as np
from gguf import GGMLQuantizationType as T

from mxtools.quant.ggml_math import (
    assemble,
    columns,
    f32,
    first_absmax,
    fp16_bits,
    fp16_round,
    make_q3_quants,
    make_qkx_quants,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
    seqsum,
)
from mxtools.quant.ggml_registry import register

QK_K = 256


def _sub16(x: np.ndarray, imatrix: np.ndarray | None, sigma_factor: int):
    """Sub-block columns [16, nb*16] and, with an imatrix, weights qw * sqrt(sigma2 + x^2) and their sums."""
    xs = columns(x, 16)
    if imatrix is None:
        return xs, None, None
    big = columns(x, QK_K)
    sigma2 = f32(sigma_factor) * seqsum(big * big) / f32(QK_K)
    qw = np.tile(columns(imatrix, 16), (1, x.shape[0]))
    w = qw * np.sqrt(np.repeat(sigma2, 16) + xs * xs)
    return xs, w, seqsum(w)


def _pack_2bit(levels: np.ndarray) -> np.ndarray:
    """[nb, 256] 2-bit levels -> qs[64]: byte l of each 128-value half holds values l, l+32, l+64, l+96."""
    q = levels.reshape(-1, 2, 4, 32) << (2 * np.arange(4))[None, None, :, None]
    return np.bitwise_or.reduce(q, axis=2).reshape(-1, 64).astype(np.uint8)


def _requantize_affine(xs, levels, d, dm, nmax):
    """L = clip(nearest_int((x + dm)/d), 0, nmax) per sub-block column, keeping L where d == 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        new = np.clip(nearest_int((xs + dm) / d), 0, nmax)
    return np.where(d != 0, new, levels.astype(np.int32))


def _q2_scales_ref(scales, mins):
    """quantize_row_q2_K_ref: 4-bit scale | 4-bit min per sub-block, d = max_scale/15, dmin = max_min/15."""
    max_scale = np.maximum(scales.max(axis=1), f32(0))[:, None]
    max_min = np.maximum(mins.max(axis=1), f32(0))[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        ls = np.where(max_scale > 0, nearest_int((f32(15) / max_scale) * scales), 0)
        lm = np.where(max_min > 0, nearest_int((f32(15) / max_min) * mins), 0)
    d = np.where(max_scale > 0, max_scale / f32(15), f32(0))[:, 0]
    dmin = np.where(max_min > 0, max_min / f32(15), f32(0))[:, 0]
    return (ls | (lm << 4)) & 0xFF, d, dmin


@register(T.Q2_K)
def quantize_q2_k(x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    """Q2_K: scales[16] (scale | min << 4), qs[64], d, dmin (f16); value d*sc*q - dmin*m."""
    nb = x.size // QK_K
    xs, w, sw = _sub16(x, imatrix, 1)
    if imatrix is None:
        levels, scales, mins = make_qkx_quants(xs, np.abs(xs), 3, -0.5, 0.1, 15, use_mad=True)
        sc, d, dmin = _q2_scales_ref(scales.reshape(nb, 16), mins.reshape(nb, 16))
    else:
        levels, scales, mins = make_qkx_quants(xs, w, 3, -0.9, 0.05, 36)
        sw = np.ascontiguousarray(sw.reshape(nb, 16).T)
        ls, d = make_qp_quants(np.ascontiguousarray(scales.reshape(nb, 16).T), 15, sw)
        lm, dmin = make_qp_quants(np.ascontiguousarray(mins.reshape(nb, 16).T), 15, sw)
        sc = (ls.T | (lm.T << 4)) & 0xFF
    d_sub = (fp16_round(d)[:, None] * (sc & 0xF).astype(f32)).reshape(-1)
    dm_sub = (fp16_round(dmin)[:, None] * (sc >> 4).astype(f32)).reshape(-1)
    levels = _requantize_affine(xs, levels, d_sub, dm_sub, 3).T.reshape(nb, QK_K)
    return assemble(nb, sc.astype(np.uint8), _pack_2bit(levels), fp16_bits(d), fp16_bits(dmin))


def _q3_pack_scales(l: np.ndarray) -> np.ndarray:
    """16 six-bit scales (0..63) -> 12 bytes: low nibbles in bytes 0..7, 2-bit high parts in bytes 8..11."""
    sc = np.zeros((len(l), 12), dtype=np.int64)
    sc[:, 0:8] = (l[:, 0:8] & 0xF) | ((l[:, 8:16] & 0xF) << 4)
    high = (l >> 4).reshape(-1, 4, 4) << (2 * np.arange(4))[None, :, None]
    sc[:, 8:12] = np.bitwise_or.reduce(high, axis=1)
    return (sc & 0xFF).astype(np.uint8)


def _q3_unpack_scales(sc: np.ndarray) -> np.ndarray:
    """The signed sub-block scales (-32..31) the decoder reads back, [nb, 16]."""
    q = sc.astype(np.int32)
    low = np.concatenate([q[:, 0:8] & 0xF, q[:, 0:8] >> 4], axis=1)
    j = np.arange(16)
    high = (q[:, 8 + j % 4] >> (2 * (j // 4))) & 3
    return (low | (high << 4)) - 32


def _q3_scales_ref(scales: np.ndarray):
    """quantize_row_q3_K_ref: scales quantized against the largest-magnitude one, d = 1/iscale."""
    max_scale = first_absmax(np.ascontiguousarray(scales.T))
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = f32(-32) / max_scale
        l = nearest_int(iscale[:, None] * scales).astype(np.int8).astype(np.int32)  # int8_t l = ...
        d = np.where(max_scale != 0, f32(1) / iscale, f32(0))
    l = np.clip(l, -32, 31) + 32
    l[max_scale == 0] = 0  # the C leaves the scales memset to zero
    return l, d


@register(T.Q3_K)
def quantize_q3_k(x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    """Q3_K: hmask[32], qs[64], scales[12], d (f16); value d * (sc - 32) * (q - 4)."""
    nb = x.size // QK_K
    xs, w, sw = _sub16(x, imatrix, 2)
    if imatrix is None:
        levels, scales = make_q3_quants(xs, 4)
        ls, d = _q3_scales_ref(scales.reshape(nb, 16))
    else:
        levels, scales = make_qx_quants(xs, 4, w)
        ls, d = make_qx_quants(np.ascontiguousarray(scales.reshape(nb, 16).T), 32,
                               np.ascontiguousarray(sw.reshape(nb, 16).T))
        ls = ls.T
    packed = _q3_pack_scales(ls)
    d_sub = (fp16_round(d)[:, None] * _q3_unpack_scales(packed).astype(f32)).reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        new = np.clip(nearest_int(xs / d_sub), -4, 3) + 4
    levels = np.where(d_sub != 0, new, levels).T.reshape(nb, QK_K)
    high = levels > 3
    hmask = np.bitwise_or.reduce(high.reshape(-1, 8, 32) << np.arange(8)[None, :, None], axis=1)
    qs = _pack_2bit(np.where(high, levels - 4, levels))
    return assemble(nb, hmask.astype(np.uint8), qs, packed, fp16_bits(d))
