/* IQ3_XXS (256-value super-blocks: f16 d, 64 grid indices, 8 x 32 bits of 4-bit scale and 4 x 7 sign bits) and
 * IQ3_S (f16 d, 64 low index bytes, 8 high-bit bytes, 32 sign bytes, 4 bytes of paired 4-bit scales), byte for
 * byte as ggml's quantize_iq3_xxs / quantize_iq3_s.
 *
 * Each group of four magnitudes is one point of a grid of 4-vectors with odd coordinates 1..15 (iq3_grids.h).
 * Per 32-value sub-block: weights qw * sqrt(sigma2 + x^2) (x^2 without an imatrix), signs split off, then a sweep
 * over candidate inverse scales; each rounds every group to levels 0..7, looks the point up in a 4096-entry map
 * and, when it is off the grid, takes the best of its precomputed neighbours (those in the nearest two (IQ3_XXS)
 * or three (IQ3_S) distance shells); a weighted least-squares fit gives the scale and the best fit wins.
 */
#include <float.h>
#include <pthread.h>
#include <stdlib.h>

#include "common.h"
#include "iq34.h"
#include "iq3_grids.h"
#include "search.h"

#define MAP_SIZE 4096
#define XXS_BYTES 98
#define S_BYTES 110
#define EPS_XXS 1e-8f

/* Neighbours of one off-grid point, eight at a time: the grid coordinates (2l + 1) of each and its grid index. */
typedef struct {
    float coord[4][8];
    uint16_t index[8];
} nb_block;

/* The grid as signed bytes, and the map from a 12-bit point (three bits per coordinate) to its grid index or, for
 * a point off the grid, to -(1 + its first neighbour block); count[u] is the number of its neighbours (those of
 * the nearest two (IQ3_XXS) or three (IQ3_S) distinct distances, in (distance, index) order). */
#define MAX_BLOCKS 8192
typedef struct {
    int8_t grid[512][4];
    int32_t map[MAP_SIZE];
    uint8_t count[MAP_SIZE];
    nb_block blocks[MAX_BLOCKS];
} iq3_table;

static iq3_table table_256, table_512;
static pthread_once_t once_256 = PTHREAD_ONCE_INIT, once_512 = PTHREAD_ONCE_INIT;

/* The points of the nearest `shells` distinct distances from point u, in (distance, index) order (at most 64). */
static int shell_points(const iq3_table *t, int size, int u, int shells, uint16_t *out) {
    int d2[512], pos[4], n = 0, last = -1;
    for (int i = 0; i < 4; ++i) pos[i] = 2 * ((u >> (3 * i)) & 7) + 1;
    for (int j = 0; j < size; ++j) {
        d2[j] = 0;
        for (int i = 0; i < 4; ++i) d2[j] += (t->grid[j][i] - pos[i]) * (t->grid[j][i] - pos[i]);
    }
    for (int s = 0; s < shells; ++s) {
        int next = 1 << 30;
        for (int j = 0; j < size; ++j)
            if (d2[j] > last && d2[j] < next) next = d2[j];
        for (int j = 0; j < size && n < 64; ++j)
            if (d2[j] == next) out[n++] = (uint16_t)j;
        last = next;
    }
    return n;
}

static void build_table(iq3_table *t, const uint16_t *packed, int size, int shells) {
    for (int k = 0; k < size; ++k)
        for (int i = 0; i < 4; ++i) t->grid[k][i] = (int8_t)(2 * ((packed[k] >> (3 * i)) & 7) + 1);
    for (int u = 0; u < MAP_SIZE; ++u) t->map[u] = -1;
    for (int k = 0; k < size; ++k) t->map[packed[k]] = k;
    int used = 0;
    for (int u = 0; u < MAP_SIZE; ++u) {
        if (t->map[u] >= 0) continue;
        uint16_t nb[64];
        const int n = shell_points(t, size, u, shells, nb);
        if (used + (n + 7) / 8 > MAX_BLOCKS) abort();  /* these grids need about 6,000 blocks */
        t->map[u] = -(used + 1);
        t->count[u] = (uint8_t)n;
        for (int j = 0; j < n; ++j) {
            nb_block *b = &t->blocks[used + j / 8];
            for (int i = 0; i < 4; ++i) b->coord[i][j % 8] = t->grid[nb[j]][i];
            b->index[j % 8] = nb[j];
        }
        used += (n + 7) / 8;
    }
}

static void init_256(void) { build_table(&table_256, IQ3_GRID_256, 256, 2); }
static void init_512(void) { build_table(&table_512, IQ3_GRID_512, 512, 3); }

MX_INLINE vf bcast(const float *v) {
    vf r;
    memcpy(&r, v, 4);
    return __builtin_shuffle(r, splati(0));
}

MX_INLINE vf load8(const float *v) {
    vf r;
    memcpy(&r, v, sizeof r);
    return r;
}

/* The neighbour of off-grid point u with the least weighted error sum_i w_i (scale g_i - x_i)^2, summed in
 * order i = 0..3 as ggml does (the first of equal ones: ggml scans the list with a strict <). Eight neighbours
 * per step; writes the levels to L. */
MX_INLINE void best_neighbour(const iq3_table *t, int u, const float *xv, const float *w, float scale, int8_t *L) {
    const nb_block *b = &t->blocks[-t->map[u] - 1], *b0 = b;
    const int n = t->count[u];
    const vi iota = {0, 1, 2, 3, 4, 5, 6, 7};
    const vf sv = bcast(&scale), x0 = bcast(xv), x1 = bcast(xv + 1), x2 = bcast(xv + 2), x3 = bcast(xv + 3);
    const vf w0 = bcast(w), w1 = bcast(w + 1), w2 = bcast(w + 2), w3 = bcast(w + 3);
    vf best = splat(FLT_MAX);
    vi pos = splati(64);
    for (int c = 0; c < n; c += 8, ++b) {
        vf d2 = splat(0), diff;
        diff = sv * load8(b->coord[0]) - x0;
        d2 += w0 * diff * diff;
        diff = sv * load8(b->coord[1]) - x1;
        d2 += w1 * diff * diff;
        diff = sv * load8(b->coord[2]) - x2;
        d2 += w2 * diff * diff;
        diff = sv * load8(b->coord[3]) - x3;
        d2 += w3 * diff * diff;
        const vi better = (iota + c < n) & (d2 < best);
        best = pick(better, d2, best);
        pos = picki(better, iota + c, pos);
    }
    vf m = best;  /* the least error, in every lane */
    for (int h = 4; h >= 1; h /= 2) {
        const vf o = __builtin_shuffle(m, (iota + h) & 7);
        m = pick(o < m, o, m);
    }
    pos = picki(best == m, pos, splati(64));  /* its first position */
    for (int h = 4; h >= 1; h /= 2) {
        const vi o = __builtin_shuffle(pos, (iota + h) & 7);
        pos = picki(o < pos, o, pos);
    }
    const int p = pos[0] < n ? pos[0] : 0;  /* no finite error at all: ggml would stop; keep the first neighbour */
    const int8_t *g = t->grid[b0[p / 8].index[p % 8]];
    for (int i = 0; i < 4; ++i) L[i] = (int8_t)((g[i] - 1) / 2);
}

/* Round group k's four magnitudes with inverse scale id onto levels 0..7; off the grid, move to the best
 * neighbour for `scale`. Returns whether the rounded point was on the grid. */
MX_INLINE int snap_group(const iq3_table *t, const float *xv, const float *waux, float id, float scale, int8_t *L) {
    int u = 0;
    for (int i = 0; i < 4; ++i) {
        L[i] = (int8_t)clampi(nearest_int(0.5f * (id * xv[i] - 1)), 0, 7);
        u |= L[i] << (3 * i);
    }
    if (t->map[u] >= 0) return 1;
    best_neighbour(t, u, xv, waux, scale, L);
    return 0;
}

/* Weighted least squares of xval on the odd levels 2L + 1: sum w x q and sum w q^2. */
MX_INLINE void level_fit(const float *weight, const float *xval, const int8_t *L, float *sumqx, float *sumq2) {
    float sx = 0, s2 = 0;
    for (int i = 0; i < 32; ++i) {
        const float q = 2 * L[i] + 1;
        sx += weight[i] * xval[i] * q;
        s2 += weight[i] * q * q;
    }
    *sumqx = sx;
    *sumq2 = s2;
}

/* One sub-block's state: magnitudes, weights (and their square roots for the neighbour search), levels. */
typedef struct {
    float weight[32], waux[32], xval[32];
    int8_t L[32];
    int on_grid[8];
} iq3_sub;

/* The sweep over candidate inverse scales (15 + 0.2 is) / max; keeps the best levels in s->L; returns the scale. */
MX_INLINE float sweep(const iq3_table *t, iq3_sub *s, float max, int steps, int on_grid_init) {
    float best = 0, scale = max / 15;
    int8_t Laux[32];
    int on_aux[8];
    for (int k = 0; k < 8; ++k) s->on_grid[k] = on_grid_init;
    for (int is = -steps; is <= steps; ++is) {
        const float id = (15 + is * 0.2f) / max;
        const float this_scale = 1 / id;
        for (int k = 0; k < 8; ++k)
            on_aux[k] = snap_group(t, s->xval + 4 * k, s->waux + 4 * k, id, this_scale, Laux + 4 * k);
        float sumqx, sumq2;
        level_fit(s->weight, s->xval, Laux, &sumqx, &sumq2);
        if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
            scale = sumqx / sumq2;
            best = scale * sumqx;
            memcpy(s->L, Laux, 32);
            memcpy(s->on_grid, on_aux, sizeof on_aux);
        }
    }
    return scale;
}

/* With groups off the grid and a positive scale: re-round those groups (IQ3_S: all) with the fitted scale and
 * refit it. */
MX_INLINE float refit(const iq3_table *t, iq3_sub *s, float scale, int all) {
    int off = 0;
    for (int k = 0; k < 8; ++k) off += !s->on_grid[k];
    if (!off || !(scale > 0)) return scale;
    const float id = 1 / scale;
    for (int k = 0; k < 8; ++k)
        if (all || !s->on_grid[k]) snap_group(t, s->xval + 4 * k, s->waux + 4 * k, id, scale, s->L + 4 * k);
    float sumqx, sumq2;
    level_fit(s->weight, s->xval, s->L, &sumqx, &sumq2);
    return sumq2 > 0 ? sumqx / sumq2 : scale;
}

MX_INLINE void sub_weights(const float *xb, const float *qw, float sigma2, iq3_sub *s) {
    for (int i = 0; i < 32; ++i) s->weight[i] = qw ? qw[i] * sqrtf(sigma2 + xb[i] * xb[i]) : xb[i] * xb[i];
    for (int i = 0; i < 32; ++i) s->waux[i] = sqrtf(s->weight[i]);
}

/* Magnitudes and sign bits of 8 values; IQ3_XXS keeps an even number of negatives by flipping the value of
 * least w x^2 (its magnitude goes negative). */
MX_INLINE uint8_t split_signs(const float *xb, const float *weight, float *xval, int even) {
    int flips = 0, s = 0;
    for (int i = 0; i < 8; ++i) {
        xval[i] = xb[i] >= 0 ? xb[i] : -xb[i];
        if (!(xb[i] >= 0)) {
            ++flips;
            s |= 1 << i;
        }
    }
    if (even && flips % 2) {
        int imin = 0;
        float min = weight[0] * xb[0] * xb[0];
        for (int i = 1; i < 8; ++i) {
            const float ax = weight[i] * xb[i] * xb[i];
            if (ax < min) {
                min = ax;
                imin = i;
            }
        }
        xval[imin] = -xval[imin];
        s ^= 1 << imin;
    }
    return (uint8_t)s;
}

/* Quantize one 32-value sub-block: grid indices idx[8], sign bytes signs[4]; returns the scale, or -1 for a
 * sub-block ggml skips (largest magnitude below EPS_XXS for IQ3_XXS, zero for IQ3_S). */
MX_INLINE float sub_block(const iq3_table *t, int xxs, const float *xb, const float *qw, float sigma2, uint16_t *idx,
                       uint8_t *signs) {
    iq3_sub s;
    sub_weights(xb, qw, sigma2, &s);
    for (int k = 0; k < 4; ++k)
        signs[k] = (uint8_t)(split_signs(xb + 8 * k, s.weight + 8 * k, s.xval + 8 * k, xxs) & (xxs ? 127 : 255));
    float max = s.xval[0];
    for (int i = 1; i < 32; ++i) max = max > s.xval[i] ? max : s.xval[i];
    if (xxs ? max < EPS_XXS : !max) return -1.f;
    memset(s.L, 0, sizeof s.L);
    float scale = sweep(t, &s, max, xxs ? 15 : 9, xxs);
    scale = refit(t, &s, scale, !xxs);
    if (scale < 0) {
        scale = -scale;
        for (int k = 0; k < 4; ++k) signs[k] = (uint8_t)(xxs ? ~signs[k] & 127 : ~signs[k]);
    }
    for (int k = 0; k < 8; ++k) {
        int u = 0;
        for (int i = 0; i < 4; ++i) u |= s.L[4 * k + i] << (3 * i);
        idx[k] = (uint16_t)(t->map[u] >= 0 ? t->map[u] : 0);  /* always on the grid by construction */
    }
    return scale;
}

MX_INLINE float sigma2_of(const float *x) {
    float sumx2 = 0;
    for (int i = 0; i < 256; ++i) sumx2 += x[i] * x[i];
    return 2 * sumx2 / 256;
}

MX_CLONES void mx_iq3_xxs_row(const float *x, uint8_t *y, int64_t n, const float *qw) {
    pthread_once(&once_256, init_256);
    for (int64_t ibl = 0; ibl < n / 256; ++ibl, x += 256, y += XXS_BYTES) {
        const float sigma2 = sigma2_of(x);
        uint8_t *qs = y + 2;
        uint32_t sas[8] = {0};
        float scales[8], max_scale = 0;
        memset(y, 0, XXS_BYTES);
        for (int ib = 0; ib < 8; ++ib) {
            uint16_t idx[8];
            uint8_t signs[4];
            const float scale = sub_block(&table_256, 1, x + 32 * ib, qw ? qw + 256 * ibl + 32 * ib : 0, sigma2,
                                          idx, signs);
            scales[ib] = scale < 0 ? 0 : scale;
            if (scale < 0) continue;
            for (int k = 0; k < 8; ++k) qs[8 * ib + k] = (uint8_t)idx[k];
            sas[ib] = signs[0] | (signs[1] << 7) | (signs[2] << 14) | ((uint32_t)signs[3] << 21);
            max_scale = max_scale > scale ? max_scale : scale;
        }
        if (!max_scale) continue;
        const float d = max_scale / 31;
        put_f16(y, d * 1.0125f);
        const float id = 1 / d;
        for (int ib = 0; ib < 8; ++ib)
            sas[ib] |= (uint32_t)clampi(nearest_int(0.5f * (id * scales[ib] - 1)), 0, 15) << 28;
        memcpy(qs + 64, sas, sizeof sas);
    }
}

/* IQ3_S: a skipped (all-zero) sub-block does not advance ggml's index and sign pointers, so the sub-blocks after
 * it are stored one slot earlier (their high index bits and scales stay in place). */
MX_CLONES void mx_iq3_s_row(const float *x, uint8_t *y, int64_t n, const float *qw) {
    pthread_once(&once_512, init_512);
    for (int64_t ibl = 0; ibl < n / 256; ++ibl, x += 256, y += S_BYTES) {
        const float sigma2 = sigma2_of(x);
        uint8_t *qs = y + 2, *qh = y + 66, *signs = y + 74, *sc = y + 106;
        float scales[8], max_scale = 0;
        memset(y, 0, S_BYTES);
        for (int ib = 0; ib < 8; ++ib) {
            uint16_t idx[8];
            uint8_t sub_signs[4];
            const float scale = sub_block(&table_512, 0, x + 32 * ib, qw ? qw + 256 * ibl + 32 * ib : 0, sigma2,
                                          idx, sub_signs);
            scales[ib] = scale < 0 ? 0 : scale;
            if (scale < 0) continue;
            for (int k = 0; k < 8; ++k) {
                qs[k] = (uint8_t)(idx[k] & 255);
                qh[ib] |= (uint8_t)((idx[k] >> 8) << k);
            }
            memcpy(signs, sub_signs, 4);
            qs += 8;
            signs += 4;
            max_scale = max_scale > scale ? max_scale : scale;
        }
        if (!max_scale) continue;
        const float d = max_scale / 31;
        put_f16(y, d * 1.033f);
        const float id = 1 / d;
        for (int ib = 0; ib < 8; ib += 2) {
            const int l1 = clampi(nearest_int(0.5f * (id * scales[ib] - 1)), 0, 15);
            const int l2 = clampi(nearest_int(0.5f * (id * scales[ib + 1] - 1)), 0, 15);
            sc[ib / 2] = (uint8_t)(l1 | (l2 << 4));
        }
    }
}
