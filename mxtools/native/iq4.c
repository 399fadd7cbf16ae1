/* IQ4_NL (32-value blocks: f16 d, 16 bytes of 4-bit level indices) and IQ4_XS (256-value super-blocks: f16 d,
 * 6-bit sub-block scales, 128 bytes of indices), both on the 16 levels of iq_levels.h, byte for byte as ggml's
 * quantize_iq4_nl / quantize_iq4_xs (quantize_row_iq4_nl_impl with ntry 7: ggml_quantize_chunk takes that path
 * with and without an imatrix).
 *
 * Per 32-value block: weights qw * sqrt(sigma2 + x^2) (x^2 without an imatrix), a first scale max / 127, then 15
 * candidate inverse scales (itry - 127) / max, each mapping every value to its nearest level and refitting the
 * scale by weighted least squares; the best fit wins. The search runs eight blocks at a time (search.h lanes),
 * every per-block sum in ggml's order.
 */
#include "common.h"
#include "iq34.h"
#include "iq_levels.h"
#include "search.h"

#define IQ4_XS_BYTES 136
#define IQ4_NL_BYTES 18

/* The midpoints and level steps as 8-lane constants. */
typedef struct {
    vf mid[15];
    vi step[15];
} iq4_consts;

MX_INLINE void iq4_init(iq4_consts *c) {
    for (int j = 0; j < 15; ++j) {
        c->mid[j] = splat(IQ4_MIDPOINTS[j]);
        c->step[j] = splati(IQ4_LEVELS[j + 1] - IQ4_LEVELS[j]);
    }
}

/* best_index_int8 on 8 lanes: the number of midpoints at or below x. */
MX_INLINE vi iq4_index(const iq4_consts *c, vf x) {
    vi l = splati(0);
    for (int j = 0; j < 15; ++j) l += (x < c->mid[j]) + 1;
    return l;
}

/* The level itself (as a float) of the nearest index: -127 plus the steps of the midpoints passed. */
MX_INLINE vf iq4_level(const iq4_consts *c, vf x) {
    vi q = splati(IQ4_LEVELS[0]);
    for (int j = 0; j < 15; ++j) q += ~(x < c->mid[j]) & c->step[j];
    return tof(q);
}

/* One candidate inverse scale id: sum w q x and sum w q^2 over the 32 values of each lane. */
MX_INLINE void iq4_fit(const iq4_consts *c, const vf *x, const vf *w, vf id, vf *sumqx, vf *sumq2) {
    vf sx = splat(0), s2 = splat(0);
    for (int j = 0; j < 32; ++j) {
        const vf q = iq4_level(c, id * x[j]);
        sx += w[j] * q * x[j];
        s2 += w[j] * q * q;
    }
    *sumqx = sx;
    *sumq2 = s2;
}

/* The fitted scale of each lane's 32 values (0 for a block whose largest |x| is below GROUP_MAX_EPS). */
MX_INLINE vf iq4_lane_scales(const iq4_consts *c, const vf *x, const vf *w) {
    vf amax = splat(0), mx = splat(0), sumqx, sumq2;
    for (int j = 0; j < 32; ++j) {
        const vi bigger = vabs(x[j]) > amax;
        amax = pick(bigger, vabs(x[j]), amax);
        mx = pick(bigger, x[j], mx);
    }
    vf d = -mx / splat((float)IQ4_LEVELS[0]);
    iq4_fit(c, x, w, 1 / d, &sumqx, &sumq2);
    d = pick(sumq2 > 0, sumqx / sumq2, splat(0));
    vf best = d * sumqx;
    for (int itry = -7; itry <= 7; ++itry) {
        iq4_fit(c, x, w, splat((float)(itry + IQ4_LEVELS[0])) / mx, &sumqx, &sumq2);
        const vi better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2);
        d = pick(better, sumqx / sumq2, d);
        best = pick(better, d * sumqx, best);
    }
    return pick(amax >= GROUP_MAX_EPS, d, splat(0));
}

/* Weights of m <= 8 consecutive blocks x, in lanes; sigma2[k] is the sigma^2 of block k (2 * mean square of its
 * super-block). Computed in memory order first, so the square roots vectorize. */
MX_INLINE void iq4_weights(int m, const float *x, const vf *xs, const float *qw, const float *sigma2, vf *w) {
    if (!qw) {
        for (int j = 0; j < 32; ++j) w[j] = xs[j] * xs[j];
        return;
    }
    float flat[NL * 32];
    for (int k = 0; k < m; ++k)
        for (int j = 0; j < 32; ++j) flat[32 * k + j] = qw[32 * k + j] * sqrtf(sigma2[k] + x[32 * k + j] * x[32 * k + j]);
    to_lanes(32, m, flat, w);
}

/* 32 indices of one lane into ggml's nibble order: byte j holds values j (low) and j + 16 (high). */
MX_INLINE void pack_iq4(const vi *L, int k, uint8_t *qs) {
    for (int j = 0; j < 16; ++j) qs[j] = (uint8_t)(L[j][k] | (L[j + 16][k] << 4));
}

MX_CLONES void mx_iq4_nl_row(const float *x, uint8_t *y, int64_t n, const float *qw) {
    const int64_t nb = n / 32;
    vf xs[32], w[32];
    vi L[32];
    iq4_consts c;
    iq4_init(&c);
    for (int64_t b0 = 0; b0 < nb; b0 += NL) {
        const int m = nb - b0 < NL ? (int)(nb - b0) : NL;
        float sigma2[NL] = {0};
        for (int k = 0; k < m; ++k) {
            const float *xb = x + (b0 + k) * 32;
            for (int j = 0; j < 32; ++j) sigma2[k] += xb[j] * xb[j];
            sigma2[k] *= 2.f / 32;
        }
        to_lanes(32, m, x + b0 * 32, xs);
        iq4_weights(m, x + b0 * 32, xs, qw ? qw + b0 * 32 : 0, sigma2, w);
        const vf d = iq4_lane_scales(&c, xs, w);
        const vf id = pick(d != 0, 1 / d, splat(0));
        for (int j = 0; j < 32; ++j) L[j] = iq4_index(&c, id * xs[j]);
        for (int k = 0; k < m; ++k) {
            uint8_t *yb = y + (b0 + k) * IQ4_NL_BYTES;
            put_f16(yb, d[k]);
            pack_iq4(L, k, yb + 2);
        }
    }
}

/* One IQ4_XS super-block from its eight sub-block scales: d = -max_scale / 32 (max_scale the first of largest
 * magnitude), 6-bit sub-scales l in [-32, 31] stored as l + 32, and every value re-mapped with the scale d * l. */
MX_INLINE void iq4_xs_pack(const vf *xs, const float *scales, uint8_t *y) {
    float amax = 0, max_scale = 0;
    for (int k = 0; k < NL; ++k)
        if (fabsf(scales[k]) > amax) {
            amax = fabsf(scales[k]);
            max_scale = scales[k];
        }
    const float d = -max_scale / 32;
    const float id = d ? 1 / d : 0.f;
    put_f16(y, d);
    uint16_t scales_h = 0;
    uint8_t *scales_l = y + 4;
    vf idl;
    for (int k = 0; k < NL; ++k) {
        const int l = clampi(nearest_int(id * scales[k]), -32, 31);
        const float dl = d * l;
        idl[k] = dl ? 1 / dl : 0.f;
        const int s = l + 32;
        if (k % 2 == 0) scales_l[k / 2] = (uint8_t)(s & 0xf); else scales_l[k / 2] |= (uint8_t)((s & 0xf) << 4);
        scales_h |= (uint16_t)((s >> 4) << (2 * k));
    }
    memcpy(y + 2, &scales_h, 2);
    vi L[32];
    iq4_consts c;
    iq4_init(&c);
    for (int j = 0; j < 32; ++j) L[j] = iq4_index(&c, idl * xs[j]);
    for (int k = 0; k < NL; ++k) pack_iq4(L, k, y + 8 + 16 * k);
}

MX_CLONES void mx_iq4_xs_row(const float *x, uint8_t *y, int64_t n, const float *qw) {
    vf xs[32], w[32];
    iq4_consts c;
    iq4_init(&c);
    for (int64_t i = 0; i < n / 256; ++i, x += 256, y += IQ4_XS_BYTES) {
        float s = 0, sigma2[NL];
        for (int j = 0; j < 256; ++j) s += x[j] * x[j];
        s *= 2.f / 256;
        for (int k = 0; k < NL; ++k) sigma2[k] = s;
        to_lanes(32, NL, x, xs);
        iq4_weights(NL, x, xs, qw ? qw + i * 256 : 0, sigma2, w);
        float scales[NL];
        const vf d = iq4_lane_scales(&c, xs, w);
        memcpy(scales, &d, sizeof d);
        iq4_xs_pack(xs, scales, y);
    }
}
