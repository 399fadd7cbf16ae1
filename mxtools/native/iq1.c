/* IQ1_S and IQ1_M: byte for byte as quantize_row_iq1_s_impl / quantize_row_iq1_m_impl of ggml-quants.c.
 *
 * Values are ternary (-1, 0, 1) shifted by +-delta (one shift per 32 values in IQ1_S, per 8 in IQ1_M). With three
 * levels the weighted least-squares problem of a sub-block is solved exhaustively: sorting the values, every
 * split into low / middle / high levels is scored from prefix sums, eight splits at a time, and ggml's sequential
 * choice among them replayed (iq1_split.h). The levels are then snapped onto the 2048-point codebook. Float
 * expressions keep ggml's evaluation order. Compiled twice: for any x86-64 and, through iq1_avx2.c, for AVX2.
 */
#include <float.h>

#include "common.h"
#include "iq.h"
#include "iq1_split.h"
#include "search.h"

#define QK_K 256
#define DELTA 0.125f

#define table (mx_iq_tables[IQT_1])

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
static int best_neighbour(int key, const float *x, const float *w, float scale, const float *xx) {
    vf tab[4];
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

/* Whether sum |w x| and sum |w| are below 2^100: then every sum of a split search is finite. */
static int bounded(const float *w, const float *x, int n) {
    float a = 0, b = 0;
    for (int i = 0; i < n; ++i) {
        a += fabsf(w[i] * x[i]);
        b += fabsf(w[i]);
    }
    return a < 0x1p100f && b < 0x1p100f;
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

/* Every split of 32 sorted values (prefix sums sumx, sumw, NaN past the end) with shift + (k = 0) and - (k = 1),
 * into s: ggml's sums, in its order. */
static void s_candidates(const float *sumx, const float *sumw, split_cands *s) {
    const int bs = 32;
    int j = 0;
    for (int i1 = 0; i1 <= bs; ++i1) {
        const vf a = splat(sumx[i1] - sumx[0]), aw = splat(sumw[i1] - sumw[0]);
        for (int i2 = i1; i2 <= bs; i2 += 8, ++j) {
            vf X2, W2;
            memcpy(&X2, sumx + i2, sizeof X2);
            memcpy(&W2, sumw + i2, sizeof W2);
            const vf bx = X2 - splat(sumx[i1]), cx = splat(sumx[bs]) - X2;
            const vf bw = W2 - splat(sumw[i1]), cw = splat(sumw[bs]) - W2;
            cand_put(s, j, 0, a * X_P[0] + bx * X_P[1] + cx * X_P[2],
                     aw * X_P[0] * X_P[0] + bw * X_P[1] * X_P[1] + cw * X_P[2] * X_P[2]);
            cand_put(s, j, 1, a * X_M[0] + bx * X_M[1] + cx * X_M[2],
                     aw * X_M[0] * X_M[0] + bw * X_M[1] * X_M[1] + cw * X_M[2] * X_M[2]);
            s->top[j] = vmax_nan(s->v[j][2][1], vmax_nan(s->v[j][2][0], splat(-INFINITY)));
            s->i1[j] = (uint8_t)i1;
            s->i2[j] = (uint8_t)i2;
        }
    }
    s->n = j;
}

static split_t s_split(const float *sumx, const float *sumw, int finite) {
    split_cands s;
    s_candidates(sumx, sumw, &s);
    return split_winner(&s, 2, finite);
}

/* One 32-value sub-block: grid indices into y's qs and qh; returns its scale, shift in *shift (1 or -1). */
MX_INLINE float s_sub(const float *xb, const float *qw, float sigma2, uint8_t *qs, uint16_t *qh, int *shift) {
    float weight[32], sumx[33 + 8], sumw[33 + 8];
    int idx[32];
    int8_t L[32];
    *shift = 1;
    for (int i = 0; i < 32; ++i) weight[i] = qw[i] * sqrtf(sigma2 + xb[i] * xb[i]);
    float max = fabsf(xb[0]);
    for (int i = 1; i < 32; ++i) max = max > fabsf(xb[i]) ? max : fabsf(xb[i]);
    if (max < 1e-12f) return 0;
    sort_index(xb, 32, idx);
    sumx[0] = sumw[0] = 0;
    for (int j = 0; j < 32; ++j) {
        sumx[j + 1] = sumx[j] + weight[idx[j]] * xb[idx[j]];
        sumw[j + 1] = sumw[j] + weight[idx[j]];
    }
    for (int j = 33; j < 33 + 8; ++j) sumx[j] = sumw[j] = __builtin_nanf("");
    split_t b = s_split(sumx, sumw, bounded(weight, xb, 32));
    if (b.i1 < 0) return 0;
    int sh = 1 - 2 * b.k;
    for (int j = 0; j < 32; ++j) L[idx[j]] = (int8_t)(j < b.i1 ? 0 : j < b.i2 ? 1 : 2);
    if (b.scale < 0) {
        for (int j = 0; j < 32; ++j) L[j] = (int8_t)(2 - L[j]);
        b.scale = -b.scale;
        sh = -sh;
    }
    const float *xx = sh == 1 ? X_P : X_M;
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
    *shift = sh;
    return b.scale;
}

void MX_ISA(mx_iq1_s_row)(const float *x, uint8_t *y, int64_t n, const float *qw) {
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

/* Split sums of the halves of a 16-value sub-block: prefix sums over the sorted values of one half only (NaN past
 * the end), and what ggml's candidate sums take from them, per half: w[i] * cp2 and w[i] * cm2 of each prefix i,
 * and per first split point i1: tws p2 p2 + w[i1] cp1 and tws m2 m2 + w[i1] cm1 (tws, txs: the half's totals). */
typedef struct {
    float px[2][17 + 8], pw[2][17 + 8];
    float wp[2][17 + 8], wm[2][17 + 8], ap[2][17], am[2][17], tp[2], tm[2];
} halves_t;

static const float P2 = 1 + DELTA, M2 = 1 - DELTA;
#define CP1 (X_P[0] * X_P[0] - X_P[1] * X_P[1])
#define CP2 (X_P[1] * X_P[1] - X_P[2] * X_P[2])
#define CM1 (X_M[0] * X_M[0] - X_M[1] * X_M[1])
#define CM2 (X_M[1] * X_M[1] - X_M[2] * X_M[2])

static void halves_terms(halves_t *h) {
    for (int s = 0; s < 2; ++s) {
        const float txs = h->px[s][16], tws = h->pw[s][16];
        h->tp[s] = txs * P2;
        h->tm[s] = txs * M2;
        for (int i = 0; i < 17 + 8; ++i) {
            h->wp[s][i] = h->pw[s][i] * CP2;
            h->wm[s][i] = h->pw[s][i] * CM2;
        }
        for (int i = 0; i < 17; ++i) {
            h->ap[s][i] = tws * P2 * P2 + h->pw[s][i] * CP1;
            h->am[s][i] = tws * M2 * M2 + h->pw[s][i] * CM1;
        }
    }
}

/* Half s's sums for first split point i1 and second split points i2.. i2 + 7: qx and q2 with shift + and -. */
MX_INLINE void half_sums(const halves_t *h, int s, int i1, int i2, vf *qxp, vf *qxm, vf *q2p, vf *q2m) {
    vf X2, WP, WM;
    memcpy(&X2, h->px[s] + i2, sizeof X2);
    memcpy(&WP, h->wp[s] + i2, sizeof WP);
    memcpy(&WM, h->wm[s] + i2, sizeof WM);
    const vf sx = splat(h->px[s][i1]) + X2;
    *qxp = splat(h->tp[s]) - sx;
    *qxm = splat(h->tm[s]) - sx;
    *q2p = splat(h->ap[s][i1]) + WP;
    *q2m = splat(h->am[s][i1]) + WM;
}

/* Every split of 16 sorted values with the shifts of its two halves (k = 0: +,+  1: +,-  2: -,+  3: -,-) into
 * s: ggml's sums, in its order (qx = (txs p2 - (px[i1] + px[i2])) + ..., q2 = (ap[i1] + wp[i2]) + ...). */
static void m_candidates(const halves_t *h, split_cands *s) {
    int j = 0;
    for (int i1 = 0; i1 <= 16; ++i1)
        for (int i2 = i1; i2 <= 16; i2 += 8, ++j) {
            vf qxp0, qxm0, q2p0, q2m0, qxp1, qxm1, q2p1, q2m1;
            half_sums(h, 0, i1, i2, &qxp0, &qxm0, &q2p0, &q2m0);
            half_sums(h, 1, i1, i2, &qxp1, &qxm1, &q2p1, &q2m1);
            cand_put(s, j, 0, qxp0 + qxp1, q2p0 + q2p1);
            cand_put(s, j, 1, qxp0 + qxm1, q2p0 + q2m1);
            cand_put(s, j, 2, qxm0 + qxp1, q2m0 + q2p1);
            cand_put(s, j, 3, qxm0 + qxm1, q2m0 + q2m1);
            const vf t01 = vmax_nan(s->v[j][2][1], vmax_nan(s->v[j][2][0], splat(-INFINITY)));
            s->top[j] = vmax_nan(s->v[j][2][3], vmax_nan(s->v[j][2][2], t01));
            s->i1[j] = (uint8_t)i1;
            s->i2[j] = (uint8_t)i2;
        }
    s->n = j;
}

static split_t m_split(const halves_t *h, int finite) {
    split_cands s;
    m_candidates(h, &s);
    return split_winner(&s, 4, finite);
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
    for (int s = 0; s < 2; ++s)
        for (int j = 17; j < 17 + 8; ++j) h.px[s][j] = h.pw[s][j] = __builtin_nanf("");
    halves_terms(&h);
    split_t b = m_split(&h, bounded(weight, xb, 16));
    if (b.i1 < 0) return 0;
    int code_k = b.k;
    for (int j = 0; j < 16; ++j) L[idx[j]] = (int8_t)(j < b.i1 ? 0 : j < b.i2 ? 1 : 2);
    if (b.scale < 0) {
        for (int j = 0; j < 16; ++j) L[j] = (int8_t)(2 - L[j]);
        b.scale = -b.scale;
        code_k = 3 - code_k;
    }
    int on = 1, index[2];
    for (int k = 0; k < 2; ++k)
        index[k] = snap(xb + 8 * k, weight + 8 * k, b.scale, m_values(code_k, k), L + 8 * k, &on);
    if (!on) {
        float sumqx = 0, sumq2 = 0;
        for (int k = 0; k < 2; ++k)
            group_sums(index[k], xb + 8 * k, weight + 8 * k, m_values(code_k, k), &sumqx, &sumq2);
        if (sumqx > 0 && sumq2 > 0) b.scale = sumqx / sumq2;
    }
    qs[0] = (uint8_t)(index[0] & 255);
    qs[1] = (uint8_t)(index[1] & 255);
    *qh = (uint8_t)((index[0] >> 8) | ((index[1] >> 8) << 4));
    *code = code_k;
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

void MX_ISA(mx_iq1_m_row)(const float *x, uint8_t *y, int64_t n, const float *qw) {
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
