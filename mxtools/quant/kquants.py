"""K-quants Q4_K, Q5_K, Q6_K (256-value super-blocks), as llama.cpp quantizes them.

Without an importance matrix: `quantize_row_q{4,5,6}_K_ref` (make_qkx2_quants weighted by av_x + |x|
for Q4_K/Q5_K, make_qx_quants weighted by x^2 for Q6_K). With one: `quantize_row_q*_K_impl`
(make_qkx3_quants weighted by imatrix * sqrt(sigma2 + x^2) and make_qp_quants for the 6-bit sub-block
scales; Q6_K weights make_qx_quants by the raw imatrix). Source: ggml/src/ggml-quants.c.
"""

import numpy as np
from gguf import GGMLQuantizationType as T

from mxtools.quant.ggml_math import (
    GROUP_MAX_EPS,
    assemble,
    columns,
    f32,
    first_absmax,
    fp16_bits,
    fp16_round,
    make_qkx_quants,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
    seqsum,
)
from mxtools.quant.ggml_registry import register

QK_K = 32 * 8
# (rmin, rdelta, nstep) of the scale/min grid search, by (nmax, imatrix given): quantize_row_q{4,5}_K_{ref,impl}
_SEARCH = {(15, False): (-1.0, 0.1, 20), (15, True): (-0.9, 0.05, 36),
           (31, False): (-0.5, 0.1, 15), (31, True): (-0.9, 0.05, 36)}


def _sub_weights(x: np.ndarray, imatrix: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Sub-block columns [32, nb*8] of x and their search weights (ref: av_x + |x|; imatrix: qw*sqrt(sigma2+x^2))."""
    xs = columns(x, 32)
    if imatrix is None:
        av_x = np.sqrt(seqsum(xs * xs) / f32(32))
        return xs, av_x + np.abs(xs)
    big = columns(x, QK_K)
    sigma2 = f32(2) * seqsum(big * big) / f32(QK_K)
    qw = np.tile(columns(imatrix, 32), (1, x.shape[0]))
    return xs, qw * np.sqrt(np.repeat(sigma2, 8) + xs * xs)


def _byte(v: np.ndarray) -> np.ndarray:
    """C's implicit int -> uint8 conversion (modulo 256)."""
    return v & 0xFF


def _six_bit_scales(scales, mins, w, imatrix_path: bool):
    """Quantize the 8 sub-block scales and mins of each super-block to 6 bits.

    scales, mins: [nb, 8]. Returns (ls, lm int [nb, 8], d, dmin float32 [nb]) before fp16 rounding.
    """
    if imatrix_path:
        ls, d = make_qp_quants(np.ascontiguousarray(scales.T), 63, w)
        lm, dmin = make_qp_quants(np.ascontiguousarray(mins.T), 63, w)
        return ls.T, lm.T, d, dmin
    max_scale = np.maximum(scales.max(axis=1), f32(0))
    max_min = np.maximum(mins.max(axis=1), f32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, f32(63) / max_scale, f32(0))
        inv_min = np.where(max_min > 0, f32(63) / max_min, f32(0))
    ls = np.minimum(63, _byte(nearest_int(inv_scale[:, None] * scales)))
    lm = np.minimum(63, _byte(nearest_int(inv_min[:, None] * mins)))
    return ls, lm, max_scale / f32(63), max_min / f32(63)


def _pack_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """The 12-byte scales field: 6-bit scales and mins of 8 sub-blocks, in uint8 arithmetic like the C."""
    sc = np.zeros((len(ls), 12), dtype=np.int64)
    sc[:, 0:4] = ls[:, 0:4]
    sc[:, 4:8] = lm[:, 0:4]
    sc[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    sc[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    sc[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    return _byte(sc).astype(np.uint8)


def _unpack_scales(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """get_scale_min_k4 for j = 0..7: the (scale, min) values the decoder will read, [nb, 8] each."""
    q = sc.astype(np.int32)
    lo_sc, lo_m = q[:, 0:4] & 63, q[:, 4:8] & 63
    hi_sc = (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)
    hi_m = (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)
    return np.concatenate([lo_sc, hi_sc], axis=1), np.concatenate([lo_m, hi_m], axis=1)


def _requantize(xs, levels, d, dm, lo, hi):
    """Final pass: L = clip(nearest_int((x + dm)/d)) per sub-block column, keeping L where d == 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        new = np.clip(nearest_int((xs + dm) / d), lo, hi)
    return np.where(d != 0, new, levels.astype(np.int32))


def _qk_affine(x: np.ndarray, imatrix: np.ndarray | None, nmax: int):
    """Shared Q4_K/Q5_K body. Returns (d16, dmin16, scales[nb, 12], L[nb, 256])."""
    nb = x.size // QK_K
    xs, w = _sub_weights(x, imatrix)
    levels, scales, mins = make_qkx_quants(xs, w, nmax, *_SEARCH[nmax, imatrix is not None])
    sw = np.ascontiguousarray(seqsum(w).reshape(nb, 8).T) if imatrix is not None else None
    ls, lm, d, dmin = _six_bit_scales(scales.reshape(nb, 8), mins.reshape(nb, 8), sw, imatrix is not None)
    if nmax == 31:  # quantize_row_q5_K_impl clamps; the Q4_K one does not (a no-op unless wrapped)
        ls, lm = np.minimum(63, ls), np.minimum(63, lm)
    packed = _pack_scales(ls, lm)
    sc, m = _unpack_scales(packed)
    d_sub = (fp16_round(d)[:, None] * sc.astype(f32)).reshape(-1)
    dm_sub = (fp16_round(dmin)[:, None] * m.astype(f32)).reshape(-1)
    levels = _requantize(xs, levels, d_sub, dm_sub, 0, nmax)
    return fp16_bits(d), fp16_bits(dmin), packed, levels.T.reshape(nb, QK_K)


@register(T.Q4_K)
def quantize_q4_k(x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    """Q4_K: d, dmin (f16), scales[12], qs[128] (32-value groups: low nibbles then high nibbles)."""
    d, dmin, sc, levels = _qk_affine(x, imatrix, 15)
    q = levels.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).astype(np.uint8)
    return assemble(len(levels), d, dmin, sc, qs)


@register(T.Q5_K)
def quantize_q5_k(x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    """Q5_K: d, dmin (f16), scales[12], qh[32] (bit k of byte j: 5th bit of value 32k + j), qs[128]."""
    d, dmin, sc, levels = _qk_affine(x, imatrix, 31)
    q = levels.reshape(-1, 4, 2, 32)
    qs = ((q[:, :, 0, :] & 0xF) | ((q[:, :, 1, :] & 0xF) << 4)).astype(np.uint8)
    high = (levels.reshape(-1, 8, 32) >> 4) << np.arange(8)[None, :, None]
    qh = np.bitwise_or.reduce(high, axis=1).astype(np.uint8)
    return assemble(len(levels), d, dmin, sc, qh, qs)


def _q6_k_pack(levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[nb, 256] 6-bit levels -> ql[128] (low nibbles), qh[64] (2-bit high parts), per 128-value half."""
    q = levels.reshape(-1, 2, 4, 32)
    low = q & 0xF
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    qh = np.bitwise_or.reduce((q >> 4) << (2 * np.arange(4))[None, None, :, None], axis=2)
    return ql.reshape(-1, 128).astype(np.uint8), qh.reshape(-1, 64).astype(np.uint8)


@register(T.Q6_K)
def quantize_q6_k(x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    """Q6_K: ql[128], qh[64], scales int8[16], d (f16); value d * scale * (q - 32)."""
    nb = x.size // QK_K
    xs = columns(x, 16)
    qw = None if imatrix is None else np.tile(columns(imatrix, 16), (1, x.shape[0]))
    levels, scales = make_qx_quants(xs, 32, qw)
    scales = scales.reshape(nb, 16)
    max_scale = first_absmax(np.ascontiguousarray(scales.T))
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = f32(-128) / max_scale
        d = f32(1) / iscale
        sc = np.minimum(127, nearest_int(iscale[:, None] * scales)).astype(np.int8)
        d_sub = (fp16_round(d)[:, None] * sc.astype(f32)).reshape(-1)
        new = np.clip(nearest_int(xs / d_sub), -32, 31) + 32
    levels = np.where(d_sub != 0, new, levels).T.reshape(nb, QK_K)
    ql, qh = _q6_k_pack(levels)
    out = assemble(nb, ql, qh, sc, fp16_bits(d))
    out[zero] = 0  # the C memsets an all-zero super-block
    return out
