/* IQ1_S and IQ1_M: byte for byte as quantize_row_iq1_s_impl / quantize_row_iq1_m_impl of ggml-quants.c.
 *
 * Values are ternary (-1, 0, 1) shifted by +-delta (one shift per 32 values in IQ1_S, per 8 in IQ1_M). With three
 * levels the weighted least-squares problem of a sub-block is solved exhaustively: sorting the values, every
 * split into low / middle / high levels is scored from prefix sums (eight splits at a time, then ggml's sequential
 * comparison wherever one of the eight could win). The levels are then snapped onto the 2048-point codebook.
 * Float expressions keep ggml's evaluation order.
 */
#include <float.h>
#include <pthread.h>

#include "common.h"
#include "iq.h"
#include "iq1_grids.h"
#include "search.h"

#define QK_K 256
#define DELTA 0.125f

static iq_table table;
static int table_error;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void init_table(void) { table_error = mx_iq_build(&table, iq1_grid_2048, 2048, 3); }

int mx_iq1_prepare(void) {
    pthread_once(&once, init_table);
    return table_error ? -3 : 0;
}

static const float X_P[3] = {-1 + DELTA, DELTA, 1 + DELTA};
static const float X_M[3] = {-1 - DELTA, -DELTA, 1 - DELTA};

/* Indices of x[0..n) in ascending order of value, equal values (-0 and +0 among them) in their original order, as
 * glibc's qsort (a merge sort for arrays this small) leaves them: value j goes to the place counting the values
 * below it and the equal ones before it. */
MX_INLINE void sort_index(const float *x, int n, int *idx) {
    vf xs[4];
    vi pos[4];
    for (int c = 0; c < n / 8; ++c) {
        memcpy(&xs[c], x + 8 * c, sizeof xs[c]);
        pos[c] = (vi){0, 1, 2, 3, 4, 5, 6, 7} + 8 * c;
    }
    for (int j = 0; j < n; ++j) {
        const vf xj = splat(x[j]);
        vi below = splati(0);  /* -1 per value placed before value j */
        for (int c = 0; c < n / 8; ++c) below += (xs[c] < xj) | ((xs[c] == xj) & (pos[c] < j));
        below += __builtin_shuffle(below, (vi){4, 5, 6, 7, 0, 1, 2, 3});
        below += __builtin_shuffle(below, (vi){2, 3, 0, 1, 6, 7, 4, 5});
        below += __builtin_shuffle(below, (vi){1, 0, 3, 2, 5, 4, 7, 6});
        idx[-below[0]] = j;
    }
}

/* iq1_find_best_neighbour2: the list entry with the smallest sum w (scale xx[l] - x)^2. */
MX_CLONES static int best_neighbour(int key, const float *x, const float *w, float scale, const float *xx) {
    float tab[24];
    const float scaled[3] = {scale * xx[0], scale * xx[1], scale * xx[2]};
    iq_terms(x, w, scaled, tab);
    return iq_nearest(&table, key, tab);
}

/* The codebook index of a group's levels, or of its best neighbour (xx: its shifted values); *all_on_grid is
 * cleared when the levels were off the codebook. */
static int snap(const float *xb, const float *w, float scale, const float *xx, const int8_t *L, int *all_on_grid) {
    int key = 0;
    for (int j = 0; j < 8; ++j) key |= L[j] << 2 * j;
    const int g = table.map[key];
    if (g >= 0) return g;
    *all_on_grid = 0;
    return best_neighbour(key, xb, w, scale, xx);
}

/* sum w x q and sum w q^2 of group k at codebook point g, q = xx[level] (accumulated into *sqx, *sq2) */
static void group_sums(int g, const float *xb, const float *w, const float *xx, float *sqx, float *sq2) {
    const int8_t *pg = table.points + 8 * g;
    for (int j = 0; j < 8; ++j) {
        const float q = xx[(pg[j] - 1) / 2];
        *sqx += w[j] * q * xb[j];
        *sq2 += w[j] * q * q;
    }
}

/* ---- IQ1_S: d (f16), 32 low bytes of 11-bit grid indices, 8 uint16 (4 x 3 high index bits, 3-bit scale << 12,
 * shift sign << 15); 50 bytes per 256 values ------------------------------------------------------------------ */

typedef struct { float scale; int i1, i2, shift; } split_t;

/* Sequential ggml comparison of one candidate: accept when sumqx^2 > best sumq2. */
MX_INLINE void consider(split_t *b, float *best, float sqx, float sq2, int i1, int i2, int shift) {
    if (sq2 > 0 && sqx * sqx > *best * sq2) {
        b->scale = sqx / sq2;
        *best = b->scale * sqx;
        b->i1 = i1;
        b->i2 = i2;
        b->shift = shift;
    }
}

/* Candidate c of lane l at bit pos = 2 l + c (c = 0: shift +, 1: shift -). */
MX_INLINE void s_consider(split_t *b, float *best, const vf *q, const vf *w, int pos, int i1, int i2) {
    const int l = pos >> 1, c = pos & 1;
    consider(b, best, q[c][l], w[c][l], i1, i2 + l, 1 - 2 * c);
}

/* The best split of 32 sorted values (prefix sums sumx, sumw with 8 floats of padding) and its shift. */
MX_CLONES static split_t s_split(const float *sumx, const float *sumw, float max) {
    const int bs = 32;
    split_t b = {max, -1, -1, 0};
    float best = -FLT_MAX;
    const vf lane = {0, 1, 2, 3, 4, 5, 6, 7};
    for (int i1 = 0; i1 <= bs; ++i1) {
        const vf a = splat(sumx[i1] - sumx[0]), aw = splat(sumw[i1] - sumw[0]);
        for (int i2 = i1; i2 <= bs; i2 += 8) {
            vf X2, W2;
            memcpy(&X2, sumx + i2, sizeof X2);
            memcpy(&W2, sumw + i2, sizeof W2);
            const vf bx = X2 - splat(sumx[i1]), cx = splat(sumx[bs]) - X2;
            const vf bw = W2 - splat(sumw[i1]), cw = splat(sumw[bs]) - W2;
            const vf qp = a * X_P[0] + bx * X_P[1] + cx * X_P[2];
            const vf wp = aw * X_P[0] * X_P[0] + bw * X_P[1] * X_P[1] + cw * X_P[2] * X_P[2];
            const vf qm = a * X_M[0] + bx * X_M[1] + cx * X_M[2];
            const vf wm = aw * X_M[0] * X_M[0] + bw * X_M[1] * X_M[1] + cw * X_M[2] * X_M[2];
            const vi valid = lane <= splat((float)(bs - i2));
            const vi wp_ = valid & (wp > 0) & (qp * qp > splat(best) * wp);
            const vi wm_ = valid & (wm > 0) & (qm * qm > splat(best) * wm);
            /* candidate c of lane l (c = 0: shift +, 1: shift -) at bit 2 l + c: ggml's order */
            const vi bit = {1, 1 << 2, 1 << 4, 1 << 6, 1 << 8, 1 << 10, 1 << 12, 1 << 14};
            uint32_t mask = (uint32_t)or_lanes((wp_ & bit) | (wm_ & (bit << 1)))[0];
            const float before = best;  /* a candidate that lost to it loses to any larger best too */
            const vf q[2] = {qp, qm}, w[2] = {wp, wm};
            for (int pos = 0; mask; mask &= mask - 1) {
                pos = __builtin_ctz(mask);
                s_consider(&b, &best, q, w, pos, i1, i2);
                if (best < before)  /* the best went down: every later candidate, in order */
                    for (mask = 0, ++pos; pos < 16 && i2 + (pos >> 1) <= bs; ++pos)
                        s_consider(&b, &best, q, w, pos, i1, i2);
            }
        }
    }
    return b;
}

/* One 32-value sub-block: grid indices into y's qs and qh; returns its scale, shift in *shift (1 or -1). */
MX_INLINE float s_sub(const float *xb, const float *qw, float sigma2, uint8_t *qs, uint16_t *qh, int *shift) {
    float weight[32], sumx[33 + 8] = {0}, sumw[33 + 8] = {0};
    int idx[32];
    int8_t L[32];
    *shift = 1;
    for (int i = 0; i < 32; ++i) weight[i] = qw[i] * sqrtf(sigma2 + xb[i] * xb[i]);
    float max = fabsf(xb[0]);
    for (int i = 1; i < 32; ++i) max = max > fabsf(xb[i]) ? max : fabsf(xb[i]);
    if (max < 1e-12f) return 0;
    sort_index(xb, 32, idx);
    for (int j = 0; j < 32; ++j) {
        sumx[j + 1] = sumx[j] + weight[idx[j]] * xb[idx[j]];
        sumw[j + 1] = sumw[j] + weight[idx[j]];
    }
    split_t b = s_split(sumx, sumw, max);
    if (b.i1 < 0 || b.i2 < 0 || b.shift == 0) return 0;
    for (int j = 0; j < 32; ++j) L[idx[j]] = (int8_t)(j < b.i1 ? 0 : j < b.i2 ? 1 : 2);
    if (b.scale < 0) {
        for (int j = 0; j < 32; ++j) L[j] = (int8_t)(2 - L[j]);
        b.scale = -b.scale;
        b.shift = -b.shift;
    }
    const float *xx = b.shift == 1 ? X_P : X_M;
    int on = 1, index[4];
    for (int k = 0; k < 4; ++k) index[k] = snap(xb + 8 * k, weight + 8 * k, b.scale, xx, L + 8 * k, &on);
    if (!on) {
        float sumqx = 0, sumq2 = 0;
        for (int k = 0; k < 4; ++k) group_sums(index[k], xb + 8 * k, weight + 8 * k, xx, &sumqx, &sumq2);
        if (sumqx > 0 && sumq2 > 0) b.scale = sumqx / sumq2;
    }
    uint16_t h = 0;
    for (int k = 0; k < 4; ++k) {
        qs[k] = (uint8_t)(index[k] & 255);
        h |= (uint16_t)((index[k] >> 8) << 3 * k);
    }
    *qh = h;
    *shift = b.shift;
    return b.scale;
}

MX_CLONES void mx_iq1_s_row(const float *x, uint8_t *y, int64_t n, const float *qw) {
    for (int64_t ibl = 0; ibl < n / QK_K; ++ibl, x += QK_K, qw += QK_K, y += 50) {
        float sumx2 = 0;
        for (int i = 0; i < QK_K; ++i) sumx2 += x[i] * x[i];
        const float sigma2 = 2 * sumx2 / QK_K;
        uint16_t qh[8] = {0};
        float scales[8], max_scale = 0;
        int shifts[8];
        memset(y, 0, 50);
        for (int ib = 0; ib < 8; ++ib) {
            scales[ib] = s_sub(x + 32 * ib, qw + 32 * ib, sigma2, y + 2 + 4 * ib, qh + ib, &shifts[ib]);
            max_scale = max_scale > scales[ib] ? max_scale : scales[ib];
        }
        memcpy(y + 34, qh, 16);
        if (!max_scale) continue;
        const float d = max_scale / 15, id = 1 / d;
        put_f16(y, d * 1.125f);
        for (int ib = 0; ib < 8; ++ib) {
            int l = clampi(nearest_int(0.5f * (id * scales[ib] - 1)), 0, 7);
            if (shifts[ib] == -1) l |= 8;
            qh[ib] |= (uint16_t)(l << 12);
        }
        memcpy(y + 34, qh, 16);
    }
}

/* ---- IQ1_M: 32 low bytes of 11-bit grid indices, 16 bytes (2 x (3 high index bits, shift sign bit)), 8 bytes
 * of 3-bit scales whose spare high nibbles hold the f16 super-block scale; 56 bytes per 256 values ---------- */

/* Split sums of one half of a 16-value sub-block: prefix sums over the sorted values of that half only. */
typedef struct { float px[2][17 + 8], pw[2][17 + 8]; } halves_t;

/* Candidate k of lane l (k = 0: +,+  1: +,-  2: -,+  3: -,-: the shift of each half). */
MX_INLINE void m_consider(split_t *b, float *best, const vf *qx, const vf *q2, int pos, int i1, int i2) {
    const int l = pos >> 2, k = pos & 3;
    consider(b, best, qx[k][l], q2[k][l], i1, i2 + l, k);
}

/* The best split of 16 sorted values and the shifts of its two halves (b.shift = k above). */
MX_CLONES static split_t m_split(const halves_t *h, float max) {
    const int bs = 16;
    split_t b = {max, -1, -1, -1};
    float best = -FLT_MAX;
    const float p2 = X_P[2], m2 = X_M[2];
    const float cp1 = X_P[0] * X_P[0] - X_P[1] * X_P[1], cp2 = X_P[1] * X_P[1] - X_P[2] * X_P[2];
    const float cm1 = X_M[0] * X_M[0] - X_M[1] * X_M[1], cm2 = X_M[1] * X_M[1] - X_M[2] * X_M[2];
    const vf lane = {0, 1, 2, 3, 4, 5, 6, 7};
    for (int i1 = 0; i1 <= bs; ++i1)
        for (int i2 = i1; i2 <= bs; i2 += 8) {
            vf qxp[2], qxm[2], q2p[2], q2m[2];
            for (int s = 0; s < 2; ++s) {
                vf X2, W2;
                memcpy(&X2, h->px[s] + i2, sizeof X2);
                memcpy(&W2, h->pw[s] + i2, sizeof W2);
                const vf sx = splat(h->px[s][i1]) + X2;
                const float txs = h->px[s][bs], tws = h->pw[s][bs];
                qxp[s] = splat(txs * p2) - sx;
                qxm[s] = splat(txs * m2) - sx;
                q2p[s] = splat(tws * p2 * p2 + h->pw[s][i1] * cp1) + W2 * cp2;
                q2m[s] = splat(tws * m2 * m2 + h->pw[s][i1] * cm1) + W2 * cm2;
            }
            const vf qx[4] = {qxp[0] + qxp[1], qxp[0] + qxm[1], qxm[0] + qxp[1], qxm[0] + qxm[1]};
            const vf q2[4] = {q2p[0] + q2p[1], q2p[0] + q2m[1], q2m[0] + q2p[1], q2m[0] + q2m[1]};
            const vi valid = lane <= splat((float)(bs - i2));
            const vi bit = {1, 1 << 4, 1 << 8, 1 << 12, 1 << 16, 1 << 20, 1 << 24, 1 << 28};
            vi wins = splati(0);  /* candidate k of lane l at bit 4 l + k: ggml's order */
            for (int k = 0; k < 4; ++k)
                wins |= valid & (q2[k] > 0) & (qx[k] * qx[k] > splat(best) * q2[k]) & (bit << k);
            uint32_t mask = (uint32_t)or_lanes(wins)[0];
            const float before = best;  /* a candidate that lost to it loses to any larger best too */
            for (int pos = 0; mask; mask &= mask - 1) {
                pos = __builtin_ctz(mask);
                m_consider(&b, &best, qx, q2, pos, i1, i2);
                if (best < before)  /* the best went down: every later candidate, in order */
                    for (mask = 0, ++pos; pos < 32 && i2 + (pos >> 2) <= bs; ++pos)
                        m_consider(&b, &best, qx, q2, pos, i1, i2);
            }
        }
    return b;
}

static void m_weights(const float *xb, const float *qw, float sigma2, float *weight) {
    if (qw)
        for (int i = 0; i < 16; ++i) weight[i] = qw[i] * sqrtf(sigma2 + xb[i] * xb[i]);
    else
        for (int i = 0; i < 16; ++i) weight[i] = xb[i] * xb[i];
}

/* The shifted values of group k (0 or 1) of a sub-block with shift code `code` */
static const float *m_values(int code, int k) { return (k == 0 ? code < 2 : code % 2 == 0) ? X_P : X_M; }

/* One 16-value sub-block: grid indices into qs[2] and qh; returns its scale, shift code in *code. */
MX_INLINE float m_sub(const float *xb, const float *weight, uint8_t *qs, uint8_t *qh, int *code) {
    halves_t h;
    int idx[16];
    int8_t L[16];
    *code = 0;
    float max = fabsf(xb[0]);
    for (int i = 1; i < 16; ++i) max = max > fabsf(xb[i]) ? max : fabsf(xb[i]);
    if (max < 1e-7f) return 0;
    sort_index(xb, 16, idx);
    memset(&h, 0, sizeof h);
    for (int j = 0; j < 16; ++j) {
        const int i = idx[j], s = i < 8 ? 0 : 1;
        h.px[s][j + 1] = h.px[s][j] + weight[i] * xb[i];
        h.px[1 - s][j + 1] = h.px[1 - s][j];
        h.pw[s][j + 1] = h.pw[s][j] + weight[i];
        h.pw[1 - s][j + 1] = h.pw[1 - s][j];
    }
    split_t b = m_split(&h, max);
    if (b.i1 < 0 || b.i2 < 0 || b.shift < 0) return 0;
    for (int j = 0; j < 16; ++j) L[idx[j]] = (int8_t)(j < b.i1 ? 0 : j < b.i2 ? 1 : 2);
    if (b.scale < 0) {
        for (int j = 0; j < 16; ++j) L[j] = (int8_t)(2 - L[j]);
        b.scale = -b.scale;
        b.shift = 3 - b.shift;
    }
    int on = 1, index[2];
    for (int k = 0; k < 2; ++k)
        index[k] = snap(xb + 8 * k, weight + 8 * k, b.scale, m_values(b.shift, k), L + 8 * k, &on);
    if (!on) {
        float sumqx = 0, sumq2 = 0;
        for (int k = 0; k < 2; ++k)
            group_sums(index[k], xb + 8 * k, weight + 8 * k, m_values(b.shift, k), &sumqx, &sumq2);
        if (sumqx > 0 && sumq2 > 0) b.scale = sumqx / sumq2;
    }
    qs[0] = (uint8_t)(index[0] & 255);
    qs[1] = (uint8_t)(index[1] & 255);
    *qh = (uint8_t)((index[0] >> 8) | ((index[1] >> 8) << 4));
    *code = b.shift;
    return b.scale;
}

/* The super-block scale refit over all sub-blocks at their stored 3-bit scales; accumulates into *sqx, *sq2. */
static void m_refit(const float *xb, const float *weight, const uint8_t *qs, int qh, int code, int l, float *sqx,
                    float *sq2) {
    for (int k = 0; k < 2; ++k) {
        const float *xx = m_values(code, k);
        const int8_t *pg = table.points + 8 * (qs[k] + ((qh << (8 - 4 * k)) & 0x700));
        for (int j = 0; j < 8; ++j) {
            const float w = weight[8 * k + j], q = xx[(pg[j] - 1) / 2] * (2 * l + 1);
            *sqx += w * q * xb[8 * k + j];
            *sq2 += w * q * q;
        }
    }
}

MX_CLONES void mx_iq1_m_row(const float *x, uint8_t *y, int64_t n, const float *qw) {
    static const uint8_t masks[4] = {0x00, 0x80, 0x08, 0x88};
    for (int64_t ibl = 0; ibl < n / QK_K; ++ibl, x += QK_K, y += 56) {
        const float *qwb = qw ? qw + QK_K * ibl : 0;
        float sumx2 = 0, weight[16], scales[16], max_scale = 0;
        for (int i = 0; i < QK_K; ++i) sumx2 += x[i] * x[i];
        const float sigma2 = 2 * sumx2 / QK_K;
        int codes[16];
        memset(y, 0, 56);
        for (int ib = 0; ib < 16; ++ib) {
            m_weights(x + 16 * ib, qwb ? qwb + 16 * ib : 0, sigma2, weight);
            scales[ib] = m_sub(x + 16 * ib, weight, y + 2 * ib, y + 32 + ib, &codes[ib]);
            max_scale = max_scale > scales[ib] ? max_scale : scales[ib];
        }
        if (!max_scale) continue;
        uint16_t sc[4] = {0};
        float d = max_scale / 15, sumqx = 0, sumq2 = 0;
        const float id = 1 / d;
        for (int ib = 0; ib < 16; ++ib) {
            const int l = clampi(nearest_int(0.5f * (id * scales[ib] - 1)), 0, 7);
            sc[ib / 4] |= (uint16_t)(l << 3 * (ib % 4));
            y[32 + ib] |= masks[codes[ib]];
            m_weights(x + 16 * ib, qwb ? qwb + 16 * ib : 0, sigma2, weight);
            m_refit(x + 16 * ib, weight, y + 2 * ib, y[32 + ib], codes[ib], l, &sumqx, &sumq2);
        }
        if (sumq2 > 0) d = sumqx / sumq2;
        const uint16_t s = f32_to_f16(d * 1.1125f);
        sc[0] |= (uint16_t)((s & 0x000f) << 12);
        sc[1] |= (uint16_t)((s & 0x00f0) << 8);
        sc[2] |= (uint16_t)((s & 0x0f00) << 4);
        sc[3] |= (uint16_t)(s & 0xf000);
        memcpy(y + 48, sc, 8);
    }
}
