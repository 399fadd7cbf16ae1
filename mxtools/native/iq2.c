/* IQ2_XXS, IQ2_XS and IQ2_S: byte for byte as quantize_row_iq2_{xxs,xs,s}_impl of ggml-quants.c (the codebook
 * tables in iq_tables.c). Compiled twice: for any x86-64 and, through iq2_avx2.c, for AVX2 (iq.h: MX_ISA).
 *
 * A sub-block (32 values for IQ2_XXS, 16 for the others) is quantized in magnitudes, the signs stored apart
 * (IQ2_XXS and IQ2_XS keep an even number of negatives per 8 values by flipping the least important one). A
 * sweep over inverse scales rounds each group of 8 magnitudes to levels {0, 1, 2}, snaps it onto the codebook
 * (run_trials, iq2_snap) and keeps the scale with the best weighted least-squares fit; the super-block stores one
 * f16 scale and a 4-bit scale per sub-block. Float expressions keep ggml's evaluation order.
 */
#include <float.h>
#include <stdlib.h>

#include "common.h"
#include "iq.h"
#include "scalar.h"
#include "search.h"

#define QK_K 256

/* ---- snapping a group of 8 onto the codebook ------------------------------------------------------------ */

/* iq2_find_best_neighbour: the list entry with the smallest sum w (scale q - x)^2, q = 2 l + 1. */
MX_INLINE int best_neighbour(const iq_table *t, int key, const float *x, const float *w, float scale) {
    vf tab[4];
    const float scaled[3] = {scale * 1.f, scale * 3.f, scale * 5.f};
    iq_terms(x, w, scaled, tab);
    return iq_nearest(t, key, tab);
}

/* Round x * id to levels 0..2 ((id x - 1) / 2 to nearest), then onto the codebook: *on_grid says whether the
 * rounded point was a codebook point; off it, the neighbour that fits best at `scale`. Returns the point's packed
 * levels (its key: t->map gives its index). */
MX_INLINE int iq2_snap(const iq_table *t, const float *x, const float *wa, float id, float scale, int *on_grid) {
    vf X;
    memcpy(&X, x, sizeof X);
    const int key = or_lanes(vnearest(0.5f * (splat(id) * X - 1), 0, 2) << (vi){0, 2, 4, 6, 8, 10, 12, 14})[0];
    *on_grid = iq_on_grid(t, key);
    return *on_grid ? key : t->grid[best_neighbour(t, key, x, wa, scale)];
}

/* The sweep's trials side by side: group g of trial k snapped to the packed levels code[g][k] (lanes: trials). */
#define MAX_TRIALS 24
typedef struct {
    int32_t code[4][MAX_TRIALS + NL];
    int on[MAX_TRIALS][4];
} trials_t;

/* The packed levels of 8 values x at eight inverse scales ids (lanes: trials), (id x - 1) / 2 rounded into 0..2. */
MX_INLINE vi trial_keys(const float *x, vf ids) {
    vi key = splati(0);
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) key |= vnearest(0.5f * (ids * splat(x[i]) - 1), 0, 2) << 2 * i;
    return key;
}

/* Trials k < ntrial: the n values snapped group by group at inverse scale ids[k] (neighbours judged at 1 / ids[k]).
 * All the rounded keys first, eight trials at a time; then a neighbour search for each one off the codebook. */
MX_INLINE void run_trials(const iq_table *t, int n, int ntrial, const float *xval, const float *waux, const float *ids,
                          trials_t *tr) {
    int todo[4 * MAX_TRIALS], m = 0;
    for (int g = 0; g < n / 8; ++g)
        for (int k0 = 0; k0 < ntrial; k0 += NL) {
            vf id;
            memcpy(&id, ids + k0, sizeof id);
            const vi keys = trial_keys(xval + 8 * g, id);
            memcpy(tr->code[g] + k0, &keys, sizeof keys);
        }
    for (int k = 0; k < ntrial; ++k)
        for (int g = 0; g < n / 8; ++g) {
            const int on = iq_on_grid(t, tr->code[g][k]);
            tr->on[k][g] = on;
            todo[m] = 4 * k + g;
            m += !on;
        }
    for (int i = 0; i < m; ++i) {
        const int k = todo[i] >> 2, g = todo[i] & 3;
        tr->code[g][k] = t->grid[best_neighbour(t, tr->code[g][k], xval + 8 * g, waux + 8 * g, 1 / ids[k])];
    }
}

/* sum w x q and sum w q^2 (q = 2 l + 1) over the n values of each of ntrial trials, in ggml's order ((w x) q,
 * (w q) q), eight trials at a time. */
MX_INLINE void trial_sums(int n, int ntrial, const float *w, const float *x, trials_t *tr, float *sqx, float *sq2) {
    for (int g = 0; g < n / 8; ++g)
        for (int k = ntrial; k < MAX_TRIALS; ++k) tr->code[g][k] = 0;  /* unused lanes */
    for (int k0 = 0; k0 < ntrial; k0 += NL) {
        vf a = splat(0), b = splat(0);
        for (int g = 0; g < n / 8; ++g) {
            vi c;
            memcpy(&c, tr->code[g] + k0, sizeof c);
            for (int i = 8 * g; i < 8 * g + 8; ++i, c >>= 2) {
                const vf q = tof((c & 3) * 2 + 1);
                a += splat(w[i] * x[i]) * q;
                b += splat(w[i]) * q * q;
            }
        }
        memcpy(sqx + k0, &a, sizeof a);
        memcpy(sq2 + k0, &b, sizeof b);
    }
}

/* The same sums for one set of groups' packed levels. */
MX_INLINE void code_sums(int n, const float *w, const float *x, const int *codes, float *sqx, float *sq2) {
    float sumqx = 0, sumq2 = 0;
    for (int i = 0; i < n; ++i) {
        const float q = 2 * ((codes[i / 8] >> 2 * (i % 8)) & 3) + 1;
        sumqx += w[i] * x[i] * q;
        sumq2 += w[i] * q * q;
    }
    *sqx = sumqx;
    *sq2 = sumq2;
}

/* Magnitudes of 8 values and their sign bits; with `even`, the least important value (smallest w x^2, the first
 * of equals) is flipped when the count of negatives is odd, and 7 bits are kept. */
static uint8_t magnitudes(const float *x, const float *w, float *xval, int even) {
    int nflip = 0;
    uint8_t s = 0;
    for (int i = 0; i < 8; ++i) {
        if (x[i] >= 0) {
            xval[i] = x[i];
        } else {
            xval[i] = -x[i];
            ++nflip;
            s |= (uint8_t)(1 << i);
        }
    }
    if (!even) return s;
    if (nflip % 2) {
        int imin = 0;
        float min = w[0] * x[0] * x[0];
        for (int i = 1; i < 8; ++i) {
            const float ax = w[i] * x[i] * x[i];
            if (ax < min) { min = ax; imin = i; }
        }
        xval[imin] = -xval[imin];
        s ^= (uint8_t)(1 << imin);
    }
    return s & 127;
}

static float max_of(const float *x, int n) {
    float m = x[0];
    for (int i = 1; i < n; ++i) m = m > x[i] ? m : x[i];
    return m;
}

static float sum_sq256(const float *x) {
    float s = 0;
    for (int i = 0; i < QK_K; ++i) s += x[i] * x[i];
    return s;
}

/* The 4-bit sub-block scale: nearest (id s - 1) / 2 in 0..15. */
MX_INLINE int scale4(float id, float s) { return clampi(nearest_int(0.5f * (id * s - 1)), 0, 15); }

/* ---- IQ2_XXS: d (f16), then per 32 values a uint32 of 4 grid indices and a uint32 of 4 x 7 sign bits and a
 * 4-bit scale (66 bytes per 256 values) ---------------------------------------------------------------------- */

/* The scale sweep of one 32-value sub-block from make_qp_quants' scale: the groups' packed levels in codes[4];
 * returns the fitted scale (possibly negative). */
static float xxs_sweep(const iq_table *t, const float *xval, const float *weight, const float *waux,
                                 float scale, int *codes) {
    const float eff_max = scale * 3;
    float best = 0, sqx[MAX_TRIALS], sq2[MAX_TRIALS];
    trials_t tr;
    int on_grid;
    float ids[MAX_TRIALS] = {0};
    for (int is = -6; is <= 6; ++is) ids[is + 6] = (2 * 3 - 1 + is * 0.1f) / eff_max;
    run_trials(t, 32, 13, xval, waux, ids, &tr);
    trial_sums(32, 13, weight, xval, &tr, sqx, sq2);
    for (int k = 0; k < 13; ++k)
        if (sq2[k] > 0 && sqx[k] * sqx[k] > best * sq2[k]) {
            scale = sqx[k] / sq2[k];
            best = scale * sqx[k];
            for (int g = 0; g < 4; ++g) codes[g] = tr.code[g][k];
        }
    if (scale > 0) {  /* one more rounding at the chosen scale, every group re-snapped (always reached when no
                         trial won: make_qp_quants' levels are never kept) */
        const float id = 1 / scale;
        for (int g = 0; g < 4; ++g) codes[g] = iq2_snap(t, xval + 8 * g, waux + 8 * g, id, scale, &on_grid);
        float sumqx, sumq2;
        code_sums(32, weight, xval, codes, &sumqx, &sumq2);
        if (sumq2 > 0) scale = sumqx / sumq2;
    }
    return scale;
}

/* One sub-block: writes its two words (scale bits left 0) and returns its scale (0 for a flat one). */
static float xxs_sub(const iq_table *t, const float *xb, const float *qw, float sigma2, uint32_t *q2) {
    float weight[32], waux[32], xval[32];
    uint8_t L[32], signs[4];
    int codes[4] = {0};
    for (int i = 0; i < 32; ++i) weight[i] = qw[i] * sqrtf(sigma2 + xb[i] * xb[i]);
    for (int i = 0; i < 32; ++i) waux[i] = sqrtf(weight[i]);
    for (int k = 0; k < 4; ++k) signs[k] = magnitudes(xb + 8 * k, weight + 8 * k, xval + 8 * k, 1);
    if (max_of(xval, 32) < GROUP_MAX_EPS) return 0;
    const float start = make_qp_quants(32, 4, xval, L, weight);
    if (start * 3 <= 0) return 0;
    float scale = xxs_sweep(t, xval, weight, waux, start, codes);
    if (scale < 0) {
        scale = -scale;
        for (int k = 0; k < 4; ++k) signs[k] = (uint8_t)(~signs[k] & 127);
    }
    for (int k = 0; k < 4; ++k) {
        q2[0] |= (uint32_t)t->map[codes[k]] << 8 * k;
        q2[1] |= (uint32_t)signs[k] << 7 * k;
    }
    return scale;
}

void MX_ISA(mx_iq2_xxs_row)(const float *x, uint8_t *y, int64_t n, const float *qw) {
    const iq_table *t = &mx_iq_tables[IQT_2XXS];
    for (int64_t ibl = 0; ibl < n / QK_K; ++ibl, x += QK_K, qw += QK_K, y += 66) {
        const float sigma2 = sum_sq256(x) / QK_K;
        uint32_t q2[16] = {0};
        float scales[8], max_scale = 0;
        for (int ib = 0; ib < 8; ++ib) {
            scales[ib] = xxs_sub(t, x + 32 * ib, qw + 32 * ib, sigma2, q2 + 2 * ib);
            max_scale = max_scale > scales[ib] ? max_scale : scales[ib];
        }
        memset(y, 0, 66);
        if (!max_scale) continue;
        const float d = max_scale / 31, id = 1 / d;
        put_f16(y, d);
        for (int ib = 0; ib < 8; ++ib) q2[2 * ib + 1] |= (uint32_t)scale4(id, scales[ib]) << 28;
        memcpy(y + 2, q2, 64);
    }
}

/* ---- IQ2_XS and IQ2_S: 16-value sub-blocks of two groups ----------------------------------------------- */

/* The scale sweep of one 16-value sub-block (max: its largest magnitude): the groups' packed levels in codes[2];
 * returns the scale. */
static float sub16_sweep(const iq_table *t, const float *xval, const float *weight, const float *waux,
                                   float max, int *codes) {
    float best = 0, scale = max / (2 * 3 - 1), sqx[MAX_TRIALS], sq2[MAX_TRIALS];
    int on[2] = {1, 1};
    trials_t tr;
    codes[0] = codes[1] = 0;  /* levels 0 (a codebook point of every grid) unless a trial wins */
    float ids[MAX_TRIALS] = {0};
    for (int is = -9; is <= 9; ++is) ids[is + 9] = (2 * 3 - 1 + is * 0.1f) / max;
    run_trials(t, 16, 19, xval, waux, ids, &tr);
    trial_sums(16, 19, weight, xval, &tr, sqx, sq2);
    for (int k = 0; k < 19; ++k)
        if (sq2[k] > 0 && sqx[k] * sqx[k] > best * sq2[k]) {
            scale = sqx[k] / sq2[k];
            best = scale * sqx[k];
            for (int g = 0; g < 2; ++g) {
                codes[g] = tr.code[g][k];
                on[g] = tr.on[k][g];
            }
        }
    if ((!on[0] || !on[1]) && scale > 0) {  /* groups that were snapped: once more at the chosen scale */
        const float id = 1 / scale;
        int dummy;
        for (int g = 0; g < 2; ++g)
            if (!on[g]) codes[g] = iq2_snap(t, xval + 8 * g, waux + 8 * g, id, scale, &dummy);
        float sumqx, sumq2;
        code_sums(16, weight, xval, codes, &sumqx, &sumq2);
        if (sumq2 > 0) scale = sumqx / sumq2;
    }
    return scale;
}

/* One 16-value sub-block with its weights: grid indices and sign bytes in g[2], s[2] and its scale in *scale;
 * returns 0 for a flat sub-block (largest magnitude below eps: nothing written, scale 0). */
static int sub16(const iq_table *t, const float *xb, const float *weight, int even, float eps, int *g, uint8_t *s,
                 float *scale) {
    float waux[16], xval[16];
    int codes[2];
    *scale = 0;
    for (int i = 0; i < 16; ++i) waux[i] = sqrtf(weight[i]);
    for (int k = 0; k < 2; ++k) s[k] = magnitudes(xb + 8 * k, weight + 8 * k, xval + 8 * k, even);
    const float max = max_of(xval, 16);
    if (max < eps) return 0;
    float sc = sub16_sweep(t, xval, weight, waux, max, codes);
    if (sc < 0) {
        sc = -sc;
        for (int k = 0; k < 2; ++k) s[k] = (uint8_t)(even ? ~s[k] & 127 : ~s[k]);
    }
    for (int k = 0; k < 2; ++k) g[k] = t->map[codes[k]];
    *scale = sc;
    return 1;
}

/* IQ2_XS: d (f16), 32 uint16 (9-bit grid index | 7 sign bits << 9), 8 bytes of two 4-bit scales (74 bytes). */
void MX_ISA(mx_iq2_xs_row)(const float *x, uint8_t *y, int64_t n, const float *qw) {
    const iq_table *t = &mx_iq_tables[IQT_2XS];
    for (int64_t ibl = 0; ibl < n / QK_K; ++ibl, x += QK_K, qw += QK_K, y += 74) {
        const float sigma2 = sum_sq256(x) / QK_K;
        uint16_t q2[32] = {0};
        float scales[16], max_scale = 0;
        for (int ib = 0; ib < 16; ++ib) {
            float weight[16];
            const float *xb = x + 16 * ib;
            for (int i = 0; i < 16; ++i) weight[i] = qw[16 * ib + i] * sqrtf(sigma2 + xb[i] * xb[i]);
            int g[2];
            uint8_t s[2];
            if (!sub16(t, xb, weight, 1, GROUP_MAX_EPS, g, s, &scales[ib])) continue;
            for (int k = 0; k < 2; ++k) q2[2 * ib + k] = (uint16_t)(g[k] | (s[k] << 9));
            max_scale = max_scale > scales[ib] ? max_scale : scales[ib];
        }
        memset(y, 0, 74);
        if (!max_scale) continue;
        const float d = max_scale / 31, id = 1 / d;
        put_f16(y, d);
        memcpy(y + 2, q2, 64);
        for (int ib = 0; ib < 16; ++ib) y[66 + ib / 2] |= (uint8_t)(scale4(id, scales[ib]) << 4 * (ib % 2));
    }
}

/* IQ2_S: d (f16), 32 low bytes of 10-bit grid indices, 32 sign bytes, 8 bytes of the indices' high 2 bits, 8 bytes
 * of two 4-bit scales (82 bytes). Without an importance matrix the weights are sigma2 / 4 + x^2. */
void MX_ISA(mx_iq2_s_row)(const float *x, uint8_t *y, int64_t n, const float *qw) {
    const iq_table *t = &mx_iq_tables[IQT_2S];
    for (int64_t ibl = 0; ibl < n / QK_K; ++ibl, x += QK_K, y += 82) {
        const float sigma2 = 2 * sum_sq256(x) / QK_K;
        float scales[16], max_scale = 0;
        memset(y, 0, 82);
        for (int ib = 0; ib < 16; ++ib) {
            float weight[16];
            const float *xb = x + 16 * ib;
            if (qw)
                for (int i = 0; i < 16; ++i) weight[i] = qw[QK_K * ibl + 16 * ib + i] * sqrtf(sigma2 + xb[i] * xb[i]);
            else
                for (int i = 0; i < 16; ++i) weight[i] = 0.25f * sigma2 + xb[i] * xb[i];
            int g[2];
            uint8_t s[2];
            if (!sub16(t, xb, weight, 0, 1e-8f, g, s, &scales[ib])) continue;
            for (int k = 0; k < 2; ++k) {
                const int i8 = 2 * ib + k;
                y[2 + i8] = (uint8_t)(g[k] & 255);
                y[66 + i8 / 4] |= (uint8_t)((g[k] >> 8) << 2 * (i8 % 4));
                y[34 + i8] = s[k];
            }
            max_scale = max_scale > scales[ib] ? max_scale : scales[ib];
        }
        if (!max_scale) continue;
        const float d = max_scale / 31, id = 1 / d;
        put_f16(y, d * 0.9875f);
        for (int ib = 0; ib < 16; ++ib) y[74 + ib / 2] |= (uint8_t)(scale4(id, scales[ib]) << 4 * (ib % 2));
    }
}
