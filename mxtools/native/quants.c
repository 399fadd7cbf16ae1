/* GGML block quantizers producing exactly the bytes of llama.cpp's ggml_quantize_chunk.
 *
 * One entry point, mx_quantize_rows(type, x, y, nrows, n_per_row, imatrix): without an imatrix each type
 * follows quantize_row_<type>_ref, with one quantize_row_<type>_impl (ggml/src/ggml-quants.c). Row functions
 * keep ggml's arithmetic order; the expensive scale searches run eight sub-blocks at a time (search.h).
 */
#include <stdlib.h>

#include "common.h"
#include "iq34.h"
#include "iq.h"
#include "scalar.h"
#include "search.h"

#define QK 32
#define QK_K 256

enum { T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8,
       T_Q2_K = 10, T_Q3_K = 11, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14,
       T_IQ3_XXS = 18, T_IQ4_NL = 20, T_IQ3_S = 21, T_IQ4_XS = 23 };

typedef void (*row_fn)(const float *x, uint8_t *y, int64_t n, const float *qw);

/* ---- 32-value blocks ------------------------------------------------------------------------------------ */

static float absmax(const float *x, int n) {
    uint32_t m = 0;  /* |x| compared as integers: same order as floats for non-NaN values, and vectorizes */
    for (int j = 0; j < n; ++j) {
        uint32_t b = f32_bits(x[j]) & 0x7fffffffu;
        m = b > m ? b : m;
    }
    return f32_from_bits(m);
}

/* The signed value of the first element with the largest magnitude (ggml's `if (amax < fabsf(v))`). */
static float first_absmax(const float *x, int n) {
    const float amax = absmax(x, n);
    if (amax == 0) return 0.f;  /* all zeros (of either sign): ggml keeps its initial +0 */
    for (int j = 0; j < n; ++j)
        if (fabsf(x[j]) == amax) return x[j];
    return 0.f;
}

MX_CLONES static void q8_0_row(const float *x, uint8_t *y, int64_t n, const float *qw) {
    (void)qw;  /* Q8_0 has no importance-weighted path in ggml */
    const float half_down = 0x1.fffffep-2f;  /* v + copysign(this, v), truncated, is roundf(v) */
    for (int64_t b = 0; b < n / QK; ++b, x += QK, y += 34) {
        const float d = absmax(x, QK) / ((1 << 7) - 1);
        const float id = d ? 1.0f / d : 0.0f;
        put_f16(y, d);
        int8_t *q = (int8_t *)(y + 2);
        for (int j = 0; j < QK; ++j) {
            const float v = x[j] * id;
            q[j] = (int8_t)(int)(v + copysignf(half_down, v));
        }
    }
}

static void pack_nibbles(const int32_t *q, uint8_t *qs) {
    for (int j = 0; j < QK / 2; ++j) qs[j] = (uint8_t)((q[j] & 0x0f) | ((q[j + QK / 2] & 0x0f) << 4));
}

static void pack_high_bits(const int32_t *q, uint8_t *qh) {
    uint32_t h = 0;
    for (int j = 0; j < QK; ++j) h |= (uint32_t)((q[j] >> 4) & 1) << j;
    memcpy(qh, &h, 4);
}

/* quantize_row_q4_0_ref / q5_0_ref: d = max / -nmax, q = MIN(2 nmax - 1, (int8_t)(x/d + nmax + 0.5)). */
static void symmetric_ref(const float *x, int nmax, float *d_out, int32_t *q, float *par) {
    const float max = first_absmax(x, QK);
    const float d = max / -nmax;
    const float id = d ? 1.0f / d : 0.0f;
    if (par) { par[0] = id; par[1] = 0; par[2] = 1; }
    for (int j = 0; j < QK; ++j) {
        const int v = (int8_t)(x[j] * id + (nmax + 0.5f));
        q[j] = v < 2 * nmax - 1 ? v : 2 * nmax - 1;
    }
    *d_out = d;
}

/* quantize_row_q4_1_ref / q5_1_ref: d = (max - min) / nmax, q = (x - min)/d + 0.5 truncated. */
/* The first element equal to v (for a zero v: the first zero, whichever its sign), as ggml's min/max loops keep
 * the first of equal values. */
static float first_equal(const float *x, int n, float v) {
    for (int j = 0; j < n; ++j)
        if (x[j] == v) return x[j];
    return v;
}

MX_INLINE void affine_ref(const float *x, int nmax, float *d_out, float *m_out, int32_t *q, float *par) {
    vf lo, hi, v;
    memcpy(&lo, x, sizeof lo);
    hi = lo;
    for (int j = 8; j < QK; j += 8) {
        memcpy(&v, x + j, sizeof v);
        lo = pick(v < lo, v, lo);
        hi = pick(v > hi, v, hi);
    }
    float min = lo[0], max = hi[0];
    for (int k = 1; k < NL; ++k) {
        min = lo[k] < min ? lo[k] : min;
        max = hi[k] > max ? hi[k] : max;
    }
    if (min == 0) min = first_equal(x, QK, min);  /* only a zero's sign depends on which equal value came first */
    if (max == 0) max = first_equal(x, QK, max);
    const float d = (max - min) / nmax;
    const float id = d ? 1.0f / d : 0.0f;
    if (par) { par[0] = id; par[1] = min; par[2] = 1; }
    for (int j = 0; j < QK; ++j) {
        const int l = (int)((x[j] - min) * id + 0.5f);  /* 0 .. nmax + 1: int8/uint8 casts keep it */
        q[j] = nmax == 15 && l > 15 ? 15 : l;           /* Q4_1 clamps to 15; Q5_1 does not clamp */
    }
    *d_out = d;
    *m_out = min;
}

/* A plain left-to-right sum of squares (the mean square of a row or super-block is this over its length). */
static float sum_squares(const float *x, int64_t n) {
    float s = 0;
    for (int64_t j = 0; j < n; ++j) s += x[j] * x[j];
    return s;
}

/* Importance weights in lanes: qw * sqrt(sigma2 + x^2), sigma2 a mean square (of the row for the legacy types, of
 * the super-block for the K-quants). */
static void weights_lanes(int n, int m, const vf *xs, const float *qw, float sigma2, vf *w) {
    for (int k = 0; k < NL; ++k)
        for (int i = 0; i < n; ++i) w[i][k] = k < m ? qw[k * n + i] * sqrtf(sigma2 + xs[i][k] * xs[i][k]) : 0.f;
}

/* Legacy 32-value types: `nmax`, whether affine (Q4_1/Q5_1), whether 5-bit, and the bytes of one block.
 * sigma2 < 0: the importance weights use the mean square of this row (as ggml); else this value. par (NULL or
 * 3 floats per block) receives the parameters of the final rounding (see mx_quantize_grid). */
MX_INLINE void legacy_row_ex(const float *x, uint8_t *y, int64_t n, const float *qw, int nmax, int affine, int five,
                             float sigma2, float *par) {
    const int bytes = 2 + (affine ? 2 : 0) + (five ? 4 : 0) + 16;
    const int64_t nb = n / QK;
    if (sigma2 < 0) sigma2 = qw ? sum_squares(x, n) / n : 0.f;
    vf xs[QK], w[QK];
    vi L[QK];
    vf d = splat(0), mins = splat(0), rnd[3];
    for (int64_t b0 = 0; b0 < nb; b0 += NL) {
        const int m = nb - b0 < NL ? (int)(nb - b0) : NL;
        if (qw) {
            to_lanes(QK, m, x + b0 * QK, xs);
            weights_lanes(QK, m, xs, qw + b0 * QK, sigma2, w);
            if (affine)
                qkx_lanes_ex(QK, nmax, xs, w, L, &d, &mins, -0.9f, 0.05f, 36, 0, par ? rnd : 0);
            else  /* symmetric: levels -nmax/2 .. nmax/2 - 1 */
                qx_lanes_ex(QK, nmax / 2, xs, w, L, &d, par ? rnd : 0);
            if (par)
                for (int k = 0; k < m; ++k)
                    for (int c = 0; c < 3; ++c) par[3 * (b0 + k) + c] = rnd[c][k];
        }
        for (int k = 0; k < m; ++k) {
            const float *xb = x + (b0 + k) * QK;
            uint8_t *yb = y + (b0 + k) * bytes;
            int32_t q[QK];
            float dk, mk = 0;
            if (qw) {
                for (int i = 0; i < QK; ++i) q[i] = L[i][k];
                dk = d[k];
                mk = -mins[k];
            } else if (affine) {
                affine_ref(xb, nmax, &dk, &mk, q, par ? par + 3 * (b0 + k) : 0);
            } else {
                symmetric_ref(xb, nmax / 2, &dk, q, par ? par + 3 * (b0 + k) : 0);
            }
            put_f16(yb, dk);
            uint8_t *p = yb + 2;
            if (affine) { put_f16(p, mk); p += 2; }
            if (five) { pack_high_bits(q, p); p += 4; }
            pack_nibbles(q, p);
        }
    }
}

MX_INLINE void legacy_row(const float *x, uint8_t *y, int64_t n, const float *qw, int nmax, int affine, int five) {
    legacy_row_ex(x, y, n, qw, nmax, affine, five, -1.f, 0);
}

MX_CLONES static void q4_0_row(const float *x, uint8_t *y, int64_t n, const float *qw) { legacy_row(x, y, n, qw, 16, 0, 0); }
MX_CLONES static void q5_0_row(const float *x, uint8_t *y, int64_t n, const float *qw) { legacy_row(x, y, n, qw, 32, 0, 1); }
MX_CLONES static void q4_1_row(const float *x, uint8_t *y, int64_t n, const float *qw) { legacy_row(x, y, n, qw, 15, 1, 0); }
MX_CLONES static void q5_1_row(const float *x, uint8_t *y, int64_t n, const float *qw) { legacy_row(x, y, n, qw, 31, 1, 1); }

/* ---- K-quants (256-value super-blocks) ------------------------------------------------------------------ */


/* Search weights of sub-blocks in lanes: with an imatrix qw * sqrt(sigma2 + x^2) (and their sums sw);
 * without, av_x + |x| (Q4_K/Q5_K: av_x the RMS of the sub-block) or |x| (Q2_K: av_x = 0 is not used). */
static void k_weights(int n, const vf *xs, const float *qw, float sigma2, int rms, vf *w, float *sw) {
    if (qw) {
        weights_lanes(n, NL, xs, qw, sigma2, w);
        for (int k = 0; k < NL; ++k) sw[k] = 0;
        for (int i = 0; i < n; ++i)
            for (int k = 0; k < NL; ++k) sw[k] += w[i][k];
        return;
    }
    float av[NL];
    for (int k = 0; k < NL; ++k) av[k] = 0;
    if (rms) {
        for (int i = 0; i < n; ++i)
            for (int k = 0; k < NL; ++k) av[k] += xs[i][k] * xs[i][k];
        for (int k = 0; k < NL; ++k) av[k] = sqrtf(av[k] / n);
    }
    for (int i = 0; i < n; ++i)
        for (int k = 0; k < NL; ++k) w[i][k] = rms ? av[k] + fabsf(xs[i][k]) : fabsf(xs[i][k]);
}

/* The 12-byte scales field of Q4_K/Q5_K and its decoding (get_scale_min_k4). */
static void pack_scales_k4(const uint8_t *ls, const uint8_t *lm, uint8_t *sc) {
    for (int j = 0; j < 8; ++j) {
        if (j < 4) {
            sc[j] = ls[j];
            sc[j + 4] = lm[j];
        } else {
            sc[j + 4] = (uint8_t)((ls[j] & 0xf) | ((lm[j] & 0xf) << 4));
            sc[j - 4] |= (uint8_t)((ls[j] >> 4) << 6);
            sc[j] |= (uint8_t)((lm[j] >> 4) << 6);
        }
    }
}

static void scale_min_k4(int j, const uint8_t *q, int *d, int *m) {
    if (j < 4) {
        *d = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *d = (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* Q4_K (nmax 15) and Q5_K (nmax 31): d, dmin (f16), scales[12], [qh[32] for Q5_K], qs[128]. */
MX_INLINE void k_affine_row(const float *x, uint8_t *y, int64_t n, const float *qw, int nmax) {
    const int five = nmax == 31, bytes = five ? 176 : 144;
    vf xs[32], w[32];
    vi L[32];
    float scales[8], mins[8], sw[8];
    for (int64_t i = 0; i < n / QK_K; ++i, x += QK_K, y += bytes) {
        const float *qwb = qw ? qw + i * QK_K : 0;
        const float sigma2 = qw ? 2 * sum_squares(x, QK_K) / QK_K : 0.f;
        to_lanes(32, 8, x, xs);
        k_weights(32, xs, qwb, sigma2, 1, w, sw);
        vf sv, mv;
        if (qw)
            qkx_lanes(32, nmax, xs, w, L, &sv, &mv, -0.9f, 0.05f, 36, 0);
        else if (five)
            qkx_lanes(32, nmax, xs, w, L, &sv, &mv, -0.5f, 0.1f, 15, 0);
        else
            qkx_lanes(32, nmax, xs, w, L, &sv, &mv, -1.f, 0.1f, 20, 0);
        memcpy(scales, &sv, sizeof sv);
        memcpy(mins, &mv, sizeof mv);
        uint8_t ls[8], lm[8], sc[12] = {0};
        float d, dmin;
        if (qw) {
            d = make_qp_quants(8, 63, scales, ls, sw);
            dmin = make_qp_quants(8, 63, mins, lm, sw);
        } else {
            float max_scale = 0, max_min = 0;
            for (int j = 0; j < 8; ++j) {
                max_scale = scales[j] > max_scale ? scales[j] : max_scale;
                max_min = mins[j] > max_min ? mins[j] : max_min;
            }
            const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
            const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
            for (int j = 0; j < 8; ++j) {
                ls[j] = (uint8_t)nearest_int(inv_scale * scales[j]);
                lm[j] = (uint8_t)nearest_int(inv_min * mins[j]);
            }
            d = max_scale / 63.f;
            dmin = max_min / 63.f;
        }
        if (!qw || five)
            for (int j = 0; j < 8; ++j) {
                ls[j] = ls[j] < 63 ? ls[j] : 63;
                lm[j] = lm[j] < 63 ? lm[j] : 63;
            }
        pack_scales_k4(ls, lm, sc);
        put_f16(y, d);
        put_f16(y + 2, dmin);
        memcpy(y + 4, sc, 12);
        const float dr = f16_round(d), mr = f16_round(dmin);
        uint8_t q[QK_K];
        for (int j = 0; j < 8; ++j) {
            int s, m;
            scale_min_k4(j, sc, &s, &m);
            const float dj = dr * s, dm = mr * m;
            for (int ii = 0; ii < 32; ++ii)
                q[32 * j + ii] = (uint8_t)(dj ? clampi(nearest_int((x[32 * j + ii] + dm) / dj), 0, nmax) : L[ii][j]);
        }
        uint8_t *qs = y + 16;
        if (five) {
            uint8_t *qh = y + 16;
            qs = y + 48;
            memset(qh, 0, 32);
            for (int j = 0; j < QK_K; ++j) qh[j % 32] |= (uint8_t)((q[j] >> 4) << (j / 32));
        }
        for (int j = 0; j < QK_K; j += 64)
            for (int l = 0; l < 32; ++l) qs[j / 2 + l] = (uint8_t)((q[j + l] & 0xf) | ((q[j + l + 32] & 0xf) << 4));
    }
}

MX_CLONES static void q4_k_row(const float *x, uint8_t *y, int64_t n, const float *qw) { k_affine_row(x, y, n, qw, 15); }
MX_CLONES static void q5_k_row(const float *x, uint8_t *y, int64_t n, const float *qw) { k_affine_row(x, y, n, qw, 31); }

/* Two-bit packing of Q2_K/Q3_K: byte l of each 128-value half holds values l, l+32, l+64, l+96. */
static void pack_2bit(const uint8_t *q, uint8_t *qs) {
    for (int j = 0; j < QK_K; j += 128)
        for (int l = 0; l < 32; ++l)
            qs[j / 4 + l] = (uint8_t)(q[j + l] | (q[j + l + 32] << 2) | (q[j + l + 64] << 4) | (q[j + l + 96] << 6));
}

/* Sixteen 16-value sub-blocks into two lane groups: xs[g], weights w[g], sums sw[16]. */
static void sub16_lanes(const float *x, const float *qw, float sigma2, int rms, vf xs[2][16], vf w[2][16],
                        float *sw) {
    for (int g = 0; g < 2; ++g) {
        to_lanes(16, 8, x + 128 * g, xs[g]);
        k_weights(16, xs[g], qw ? qw + 128 * g : 0, sigma2, rms, w[g], sw + 8 * g);
    }
}

/* Q2_K: scales[16] (scale | min << 4), qs[64], d, dmin (f16). */
MX_CLONES static void q2_k_row(const float *x, uint8_t *y, int64_t n, const float *qw) {
    vf xs[2][16], w[2][16];
    vi L[2][16];
    for (int64_t i = 0; i < n / QK_K; ++i, x += QK_K, y += 84) {
        const float sigma2 = qw ? sum_squares(x, QK_K) / QK_K : 0.f;
        float scales[16], mins[16], sw[16];
        sub16_lanes(x, qw ? qw + i * QK_K : 0, sigma2, 0, xs, w, sw);
        for (int g = 0; g < 2; ++g) {
            vf sv, mv;
            if (qw)
                qkx_lanes(16, 3, xs[g], w[g], L[g], &sv, &mv, -0.9f, 0.05f, 36, 0);
            else
                qkx_lanes(16, 3, xs[g], w[g], L[g], &sv, &mv, -0.5f, 0.1f, 15, 1);
            memcpy(scales + 8 * g, &sv, sizeof sv);
            memcpy(mins + 8 * g, &mv, sizeof mv);
        }
        uint8_t *sc = y;
        float d, dmin;
        if (qw) {
            uint8_t ls[16], lm[16];
            d = make_qp_quants(16, 15, scales, ls, sw);
            dmin = make_qp_quants(16, 15, mins, lm, sw);
            for (int j = 0; j < 16; ++j) sc[j] = (uint8_t)(ls[j] | (lm[j] << 4));
        } else {
            float max_scale = 0, max_min = 0;
            for (int j = 0; j < 16; ++j) {
                max_scale = scales[j] > max_scale ? scales[j] : max_scale;
                max_min = mins[j] > max_min ? mins[j] : max_min;
            }
            for (int j = 0; j < 16; ++j) sc[j] = max_scale > 0 ? (uint8_t)nearest_int(15.f / max_scale * scales[j]) : 0;
            d = max_scale > 0 ? max_scale / 15.f : 0.f;
            for (int j = 0; j < 16; ++j)
                if (max_min > 0) sc[j] |= (uint8_t)(nearest_int(15.f / max_min * mins[j]) << 4);
            dmin = max_min > 0 ? max_min / 15.f : 0.f;
        }
        put_f16(y + 80, d);
        put_f16(y + 82, dmin);
        const float dr = f16_round(d), mr = f16_round(dmin);
        uint8_t q[QK_K];
        for (int j = 0; j < 16; ++j) {
            const float dj = dr * (sc[j] & 0xf), dm = mr * (sc[j] >> 4);
            for (int ii = 0; ii < 16; ++ii)
                q[16 * j + ii] = (uint8_t)(dj ? clampi(nearest_int((x[16 * j + ii] + dm) / dj), 0, 3) : L[j / 8][ii][j % 8]);
        }
        pack_2bit(q, y + 16);
    }
}

/* Q3_K: hmask[32], qs[64], scales[12], d (f16); value d * (sc - 32) * (q - 4). */
MX_CLONES static void q3_k_row(const float *x, uint8_t *y, int64_t n, const float *qw) {
    vf xs[2][16], w[2][16];
    vi L[2][16];
    for (int64_t i = 0; i < n / QK_K; ++i, x += QK_K, y += 110) {
        float scales[16], sw[16], d = 0;
        int8_t Lq[QK_K];
        uint8_t ls[16];
        int have_scales = 1;
        if (qw) {
            const float sigma2 = 2 * sum_squares(x, QK_K) / QK_K;
            sub16_lanes(x, qw + i * QK_K, sigma2, 0, xs, w, sw);
            for (int g = 0; g < 2; ++g) {
                vf sv;
                qx_lanes(16, 4, xs[g], w[g], L[g], &sv);
                memcpy(scales + 8 * g, &sv, sizeof sv);
            }
            for (int j = 0; j < 16; ++j)
                for (int ii = 0; ii < 16; ++ii) Lq[16 * j + ii] = (int8_t)L[j / 8][ii][j % 8];
            vf s1[16], w1[16];  /* the scales themselves, quantized by make_qx_quants in one lane */
            vi l1[16];
            vf d1;
            memset(s1, 0, sizeof s1);
            memset(w1, 0, sizeof w1);
            for (int j = 0; j < 16; ++j) { s1[j][0] = scales[j]; w1[j][0] = sw[j]; }
            qx_lanes(16, 32, s1, w1, l1, &d1);
            for (int j = 0; j < 16; ++j) ls[j] = (uint8_t)l1[j][0];
            d = d1[0];
        } else {
            for (int g = 0; g < 2; ++g) {
                vf sv;
                to_lanes(16, 8, x + 128 * g, xs[g]);
                q3_lanes(16, 4, xs[g], L[g], &sv);
                memcpy(scales + 8 * g, &sv, sizeof sv);
            }
            for (int j = 0; j < 16; ++j)
                for (int ii = 0; ii < 16; ++ii) Lq[16 * j + ii] = (int8_t)L[j / 8][ii][j % 8];
            float max_scale = 0, amax = 0;
            for (int j = 0; j < 16; ++j) {
                const float a = fabsf(scales[j]);
                if (a > amax) { amax = a; max_scale = scales[j]; }
            }
            if (max_scale) {
                const float iscale = -32.f / max_scale;
                for (int j = 0; j < 16; ++j) ls[j] = (uint8_t)(clampi((int8_t)nearest_int(iscale * scales[j]), -32, 31) + 32);
                d = 1 / iscale;
            } else {
                have_scales = 0;
            }
        }
        uint8_t *sc = y + 96;
        memset(sc, 0, 12);
        if (have_scales)
            for (int j = 0; j < 16; ++j) {
                const int l = ls[j];
                if (j < 8) sc[j] = (uint8_t)(l & 0xf); else sc[j - 8] |= (uint8_t)((l & 0xf) << 4);
                sc[j % 4 + 8] |= (uint8_t)((l >> 4) << (2 * (j / 4)));
            }
        put_f16(y + 108, d);
        const float dr = f16_round(d);
        uint8_t q[QK_K];
        for (int j = 0; j < 16; ++j) {
            int s = j < 8 ? sc[j] & 0xf : sc[j - 8] >> 4;
            s = (s | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32;
            const float dj = dr * s;
            for (int ii = 0; ii < 16; ++ii)
                q[16 * j + ii] = (uint8_t)(dj ? clampi(nearest_int(x[16 * j + ii] / dj), -4, 3) + 4 : Lq[16 * j + ii]);
        }
        uint8_t *hmask = y;
        memset(hmask, 0, 32);
        for (int j = 0; j < QK_K; ++j)
            if (q[j] > 3) {
                hmask[j % 32] |= (uint8_t)(1 << (j / 32));
                q[j] -= 4;
            }
        pack_2bit(q, y + 32);
    }
}

/* Q6_K: ql[128], qh[64], scales int8[16], d (f16); value d * scale * (q - 32). */
MX_CLONES static void q6_k_row(const float *x, uint8_t *y, int64_t n, const float *qw) {
    vf xs[2][16], w[2][16];
    vi L[2][16];
    for (int64_t i = 0; i < n / QK_K; ++i, x += QK_K, y += 210) {
        float scales[16];
        for (int g = 0; g < 2; ++g) {
            to_lanes(16, 8, x + 128 * g, xs[g]);
            if (qw) to_lanes(16, 8, qw + i * QK_K + 128 * g, w[g]);
            vf sv;
            qx_lanes(16, 32, xs[g], qw ? (const vf *)w[g] : 0, L[g], &sv);
            memcpy(scales + 8 * g, &sv, sizeof sv);
        }
        float max_scale = 0, max_abs = 0;
        for (int j = 0; j < 16; ++j) {
            const float a = fabsf(scales[j]);
            if (a > max_abs) { max_abs = a; max_scale = scales[j]; }
        }
        if (max_abs < GROUP_MAX_EPS) {
            memset(y, 0, 210);
            continue;
        }
        const float iscale = -128.f / max_scale;
        put_f16(y + 208, 1 / iscale);
        int8_t *sc = (int8_t *)(y + 192);
        for (int j = 0; j < 16; ++j) {
            const int l = nearest_int(iscale * scales[j]);
            sc[j] = (int8_t)(l < 127 ? l : 127);
        }
        const float dr = f16_round(1 / iscale);
        uint8_t q[QK_K];
        for (int j = 0; j < 16; ++j) {
            const float dj = dr * sc[j];
            for (int ii = 0; ii < 16; ++ii)
                q[16 * j + ii] = (uint8_t)(dj ? clampi(nearest_int(x[16 * j + ii] / dj), -32, 31) + 32 : L[j / 8][ii][j % 8]);
        }
        uint8_t *ql = y, *qh = y + 128;
        for (int j = 0; j < QK_K; j += 128, ql += 64, qh += 32)
            for (int l = 0; l < 32; ++l) {
                ql[l] = (uint8_t)((q[j + l] & 0xf) | ((q[j + l + 64] & 0xf) << 4));
                ql[l + 32] = (uint8_t)((q[j + l + 32] & 0xf) | ((q[j + l + 96] & 0xf) << 4));
                qh[l] = (uint8_t)((q[j + l] >> 4) | ((q[j + l + 32] >> 4) << 2) | ((q[j + l + 64] >> 4) << 4) |
                                  ((q[j + l + 96] >> 4) << 6));
            }
    }
}

/* ---- entry point ---------------------------------------------------------------------------------------- */

static row_fn row_function(int type, int64_t *block, int64_t *bytes) {
    switch (type) {
    case T_Q8_0: *block = QK; *bytes = 34; return q8_0_row;
    case T_Q4_0: *block = QK; *bytes = 18; return q4_0_row;
    case T_Q4_1: *block = QK; *bytes = 20; return q4_1_row;
    case T_Q5_0: *block = QK; *bytes = 22; return q5_0_row;
    case T_Q5_1: *block = QK; *bytes = 24; return q5_1_row;
    case T_Q2_K: *block = QK_K; *bytes = 84; return q2_k_row;
    case T_Q3_K: *block = QK_K; *bytes = 110; return q3_k_row;
    case T_Q4_K: *block = QK_K; *bytes = 144; return q4_k_row;
    case T_Q5_K: *block = QK_K; *bytes = 176; return q5_k_row;
    case T_Q6_K: *block = QK_K; *bytes = 210; return q6_k_row;
    case T_IQ4_NL: *block = QK; *bytes = 18; return mx_iq4_nl_row;
    case T_IQ4_XS: *block = QK_K; *bytes = 136; return mx_iq4_xs_row;
    case T_IQ3_XXS: *block = QK_K; *bytes = 98; return mx_iq3_xxs_row;
    case T_IQ3_S: *block = QK_K; *bytes = 110; return mx_iq3_s_row;
    case T_IQ2_XXS: *block = QK_K; *bytes = 66; return mx_iq2_xxs_row;
    case T_IQ2_XS: *block = QK_K; *bytes = 74; return mx_iq2_xs_row;
    case T_IQ2_S: *block = QK_K; *bytes = 82; return mx_iq2_s_row;
    case T_IQ1_S: *block = QK_K; *bytes = 50; return mx_iq1_s_row;
    case T_IQ1_M: *block = QK_K; *bytes = 56; return mx_iq1_m_row;
    default: return 0;
    }
}

/* Row input formats: float32, bfloat16 or float16 (converted one row at a time into a small buffer, so a bf16
 * matrix is never materialized in float32). */
enum { SRC_F32 = 0, SRC_BF16 = 1, SRC_F16 = 2 };

MX_CLONES static int row_to_f32(int src_type, const void *src, int64_t n, float *dst) {
    uint32_t bad = 0;  /* any exponent field all ones: inf or NaN */
    if (src_type == SRC_BF16) {
        const uint16_t *h = src;
        for (int64_t i = 0; i < n; ++i) {
            dst[i] = f32_from_bits((uint32_t)h[i] << 16);
            bad |= (h[i] & 0x7f80u) == 0x7f80u;
        }
    } else if (src_type == SRC_F16) {
        const uint16_t *h = src;
        for (int64_t i = 0; i < n; ++i) {
            dst[i] = f16_to_f32(h[i]);
            bad |= (h[i] & 0x7c00u) == 0x7c00u;
        }
    } else {
        const float *f = src;
        for (int64_t i = 0; i < n; ++i) bad |= (f32_bits(f[i]) & 0x7f800000u) == 0x7f800000u;
    }
    return bad == 0;
}

/* Quantize nrows rows of n_per_row values (src_type: SRC_F32, SRC_BF16, SRC_F16) into y; returns the bytes
 * written, -1 for an unknown type, a row length that is not a multiple of the block size or a missing imatrix that
 * the type needs (IQ2_XXS, IQ2_XS, IQ1_S), -2 for a row holding
 * inf or NaN (its index in *bad_row; nothing after it is written), -3 when out of memory. Thread-safe; callers
 * split rows across threads. */
MX_EXPORT int64_t mx_quantize_rows(int type, int src_type, const void *x, uint8_t *y, int64_t nrows, int64_t n_per_row,
                                   const float *imatrix, int64_t *bad_row) {
    int64_t block = 0, bytes = 0;
    row_fn fn = row_function(type, &block, &bytes);
    if (!fn || n_per_row <= 0 || n_per_row % block || src_type < 0 || src_type > 2) return -1;
    const int prepared = mx_iq_prepare(type, imatrix);  /* i-quant tables; -1 when the imatrix it needs is NULL */
    if (prepared) return prepared;
    const int64_t row_bytes = n_per_row / block * bytes;
    const size_t elem = src_type == SRC_F32 ? 4 : 2;
    float *tmp = src_type == SRC_F32 ? 0 : malloc((size_t)n_per_row * sizeof(float));
    if (src_type != SRC_F32 && !tmp) return -3;
    for (int64_t r = 0; r < nrows; ++r) {
        const void *row = (const uint8_t *)x + (size_t)r * n_per_row * elem;
        const float *f = src_type == SRC_F32 ? row : tmp;
        if (!row_to_f32(src_type, row, n_per_row, tmp ? tmp : (float *)row)) {
            *bad_row = r;
            free(tmp);
            return -2;
        }
        fn(f, y + r * row_bytes, n_per_row, imatrix);
    }
    free(tmp);
    return nrows * row_bytes;
}

/* ---- GPTQ onto ggml's grids (mxtools/quant/gguf_gptq.py) ------------------------------------------------ */

/* The mean square of each row (sum of squares left to right, over n): the sigma2 of the legacy types' weights. */
MX_EXPORT void mx_mean_squares(const float *x, int64_t nrows, int64_t n, float *out) {
    for (int64_t r = 0; r < nrows; ++r) out[r] = sum_squares(x + r * n, n) / n;
}

/* Quantize float32 rows exactly as mx_quantize_rows, and for the 32-value types also write the parameters of
 * ggml's final rounding step, 3 floats (a, b, live) per block, to par:
 *   Q8_0:                q = roundf(x * a)
 *   Q4_0/Q5_0, no qw:    q = MIN(2 nmax - 1, (int)(x * a + nmax + 0.5))
 *   Q4_1/Q5_1, no qw:    q = (int)((x - b) * a + 0.5), at most nmax
 *   Q4_0/Q5_0, with qw:  q = live ? clamp(nearest_int(a * x), -nmax, nmax - 1) + nmax : 0
 *   Q4_1/Q5_1, with qw:  q = live ? clamp(nearest_int(a * (x - b)), 0, nmax) : 0
 * sigma2 (NULL, or one per row) replaces the row's own mean square in the legacy types' importance weights, so a
 * slice of a row quantizes as it would inside the whole row. The K-quants re-derive every level from the stored
 * scales (par is not written for them). Returns the bytes written or -1 for a bad type or row length. */
MX_EXPORT int64_t mx_quantize_grid(int type, const float *x, uint8_t *y, int64_t nrows, int64_t n,
                                   const float *qw, const float *sigma2, float *par) {
    int64_t block = 0, bytes = 0;
    row_fn fn = row_function(type, &block, &bytes);
    if (!fn || n <= 0 || n % block) return -1;
    const int prepared = mx_iq_prepare(type, qw);
    if (prepared) return prepared;
    const int64_t row_bytes = n / block * bytes, nb = n / block;
    for (int64_t r = 0; r < nrows; ++r) {
        const float *xr = x + r * n;
        uint8_t *yr = y + r * row_bytes;
        float *pr = par ? par + 3 * r * nb : 0;
        const float s2 = sigma2 ? sigma2[r] : -1.f;
        switch (type) {
        case T_Q4_0: legacy_row_ex(xr, yr, n, qw, 16, 0, 0, s2, pr); break;
        case T_Q5_0: legacy_row_ex(xr, yr, n, qw, 32, 0, 1, s2, pr); break;
        case T_Q4_1: legacy_row_ex(xr, yr, n, qw, 15, 1, 0, s2, pr); break;
        case T_Q5_1: legacy_row_ex(xr, yr, n, qw, 31, 1, 1, s2, pr); break;
        case T_Q8_0:
            fn(xr, yr, n, qw);
            for (int64_t b = 0; pr && b < nb; ++b) {
                const float d = absmax(xr + b * QK, QK) / ((1 << 7) - 1);
                pr[3 * b] = d ? 1.0f / d : 0.0f;
                pr[3 * b + 1] = 0;
                pr[3 * b + 2] = 1;
            }
            break;
        default: fn(xr, yr, n, qw);
        }
    }
    return nrows * row_bytes;
}
