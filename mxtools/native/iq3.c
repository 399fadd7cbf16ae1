/* IQ3_XXS (256-value super-blocks: f16 d, 64 grid indices, 8 x 32 bits of 4-bit scale and 4 x 7 sign bits) and
 * IQ3_S (f16 d, 64 low index bytes, 8 high-bit bytes, 32 sign bytes, 4 bytes of paired 4-bit scales), byte for
 * byte as ggml's quantize_iq3_xxs / quantize_iq3_s.
 *
 * Each group of four magnitudes is one point of a grid of 4-vectors with odd coordinates 1..15 (iq3_grids.h).
 * Per 32-value sub-block: weights qw * sqrt(sigma2 + x^2) (x^2 without an imatrix), signs split off, then a sweep
 * over candidate inverse scales; each rounds every group to levels 0..7, looks the point up in a 4096-entry map
 * and, when it is off the grid, takes the best of its precomputed neighbours (those in the nearest two (IQ3_XXS)
 * or three (IQ3_S) distance shells); a weighted least-squares fit gives the scale and the best fit wins.
 * The eight sub-blocks of a super-block run the sweep side by side (search.h lanes; every per-sub-block sum in
 * ggml's order), and a neighbour search weighs eight neighbours at a time. The neighbour tables are built once,
 * on first use (pthread_once), and the results do not depend on which thread builds them.
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

/* Neighbours of one off-grid point, eight at a time: the grid coordinates (2l + 1) of each and a key: its
 * position in the list times 4096 plus its levels l as a 12-bit code (three bits per coordinate, as the map's
 * index), so the least key among equal errors is the first neighbour's and carries its levels. */
typedef struct {
    float coord[4][8];
    int32_t key[8];
} nb_block;

/* The grid as signed bytes, and the map from a 12-bit point (three bits per coordinate) to its grid index or, for
 * a point off the grid, to -(1 + its first neighbour block); count[u] is the number of its neighbours (those of
 * the nearest two (IQ3_XXS) or three (IQ3_S) distinct distances, in (distance, index) order). */
typedef struct {
    int8_t grid[512][4];
    int32_t map[MAP_SIZE];
    uint8_t count[MAP_SIZE];
    nb_block *blocks;
} iq3_table;

/* Blocks the two grids need (lists of up to 36 and 38 neighbours, rounded up to blocks of 8). */
#define BLOCKS_256 4288
#define BLOCKS_512 4557
static nb_block blocks_256[BLOCKS_256], blocks_512[BLOCKS_512];
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

static void build_table(iq3_table *t, const uint16_t *packed, int size, int shells, nb_block *store, int cap) {
    for (int k = 0; k < size; ++k)
        for (int i = 0; i < 4; ++i) t->grid[k][i] = (int8_t)(2 * ((packed[k] >> (3 * i)) & 7) + 1);
    for (int u = 0; u < MAP_SIZE; ++u) t->map[u] = -1;
    for (int k = 0; k < size; ++k) t->map[packed[k]] = k;
    int used = 0;
    t->blocks = store;
    for (int u = 0; u < MAP_SIZE; ++u) {
        if (t->map[u] >= 0) continue;
        uint16_t nb[64];
        const int n = shell_points(t, size, u, shells, nb);
        if (used + (n + 7) / 8 > cap) abort();  /* cap is the exact count for these grids */
        t->map[u] = -(used + 1);
        t->count[u] = (uint8_t)n;
        for (int j = 0; j < n; ++j) {
            nb_block *b = &store[used + j / 8];
            for (int i = 0; i < 4; ++i) b->coord[i][j % 8] = t->grid[nb[j]][i];
            b->key[j % 8] = (j << 12) | packed[nb[j]];
        }
        used += (n + 7) / 8;
    }
}

static void init_256(void) { build_table(&table_256, IQ3_GRID_256, 256, 2, blocks_256, BLOCKS_256); }
static void init_512(void) { build_table(&table_512, IQ3_GRID_512, 512, 3, blocks_512, BLOCKS_512); }

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
 * order i = 0..3 as ggml does (the first of equal ones: ggml scans the list with a strict <); x_i = xv[stride i],
 * w_i = w[stride i]. Eight neighbours per step; returns the neighbour's levels as a 12-bit code. */
MX_INLINE int best_neighbour(const iq3_table *t, int u, const float *xv, const float *w, int stride, float scale) {
    const nb_block *b = &t->blocks[-t->map[u] - 1], *b0 = b;
    const int n = t->count[u];
    const vi iota = {0, 1, 2, 3, 4, 5, 6, 7};
    const vf sv = bcast(&scale), x0 = bcast(xv), x1 = bcast(xv + stride), x2 = bcast(xv + 2 * stride);
    const vf x3 = bcast(xv + 3 * stride), w0 = bcast(w), w1 = bcast(w + stride), w2 = bcast(w + 2 * stride);
    const vf w3 = bcast(w + 3 * stride);
    vf best = splat(FLT_MAX);
    vi key = splati(INT32_MAX);
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
        vi keys;
        memcpy(&keys, b->key, sizeof keys);
        best = pick(better, d2, best);
        key = picki(better, keys, key);
    }
    vi e = (vi)best;  /* errors are >= 0 (or FLT_MAX): their bits order as integers */
    for (int h = 4; h >= 1; h /= 2) {  /* the least (error, key) pair in every lane */
        const vi oe = __builtin_shuffle(e, (iota + h) & 7), ok = __builtin_shuffle(key, (iota + h) & 7);
        const vi take = (oe < e) | ((oe == e) & (ok < key));
        e = picki(take, oe, e);
        key = picki(take, ok, key);
    }
    /* no finite error at all: ggml would stop; keep the first neighbour */
    return (key[0] == INT32_MAX ? b0->key[0] : key[0]) & 4095;
}

/* The eight sub-blocks of a super-block side by side (lane k: sub-block k; see search.h): magnitudes x, weights
 * w and their square roots wa (the neighbour search's weights), the best levels L and which groups of four were
 * on the grid when rounded (on, a lane mask per group). */
typedef struct {
    vf x[32], w[32], wa[32];
    vi L[32], on[8];
} iq3_lanes;

/* Bit k of `bits` as a lane mask (all ones in lane k). */
MX_INLINE vi lane_mask(int bits) { return ((splati(bits) >> (vi){0, 1, 2, 3, 4, 5, 6, 7}) & splati(1)) != 0; }

/* Round group k of the lanes in `todo` (a bit per lane) with inverse scales id onto levels 0..7 and, off the
 * grid, replace the point by its best neighbour for `scale`. Writes the levels of those lanes to L[0..3] and, if
 * on is not NULL, the on-grid mask. */
MX_INLINE void snap_lanes(const iq3_table *t, const iq3_lanes *s, int k, vf id, vf scale, int todo, vi *L, vi *on) {
    vi u = splati(0);
    for (int i = 0; i < 4; ++i) u |= vnearest(splat(0.5f) * (id * s->x[4 * k + i] - splat(1.f)), 0, 7) << (3 * i);
    int off = 0;
    for (int lane = 0; lane < NL; ++lane) off |= (t->map[u[lane]] < 0) << lane;
    off &= todo;
    int32_t codes[NL];  /* on the grid: the rounded point itself */
    memcpy(codes, &u, sizeof codes);
    for (int rest = off; rest; rest &= rest - 1) {
        const int lane = __builtin_ctz(rest);
        codes[lane] = best_neighbour(t, codes[lane], &s->x[4 * k][lane], &s->wa[4 * k][lane], NL, scale[lane]);
    }
    memcpy(&u, codes, sizeof codes);
    const vi mask = lane_mask(todo);
    for (int i = 0; i < 4; ++i) L[i] = picki(mask, (u >> (3 * i)) & splati(7), L[i]);
    if (on) *on = ~lane_mask(off);
}

/* Weighted least squares of x on the odd levels 2L + 1 in each lane: sum w x q and sum w q^2. */
MX_INLINE void level_fit(const iq3_lanes *s, const vi *L, vf *sumqx, vf *sumq2) {
    vf sx = splat(0), s2 = splat(0);
    for (int i = 0; i < 32; ++i) {
        const vf q = tof(L[i] * 2 + 1);
        sx += s->w[i] * s->x[i] * q;
        s2 += s->w[i] * q * q;
    }
    *sumqx = sx;
    *sumq2 = s2;
}

/* The sweep over candidate inverse scales (15 + 0.2 is) / max of the live lanes; keeps each lane's best levels in
 * s->L; returns the scales. */
MX_INLINE vf sweep(const iq3_table *t, iq3_lanes *s, vf max, int live, int steps, int on_grid_init) {
    vf best = splat(0), scale = max / splat(15.f);
    vi Laux[32], on_aux[8];
    for (int k = 0; k < 8; ++k) s->on[k] = splati(on_grid_init ? -1 : 0);
    for (int i = 0; i < 32; ++i) s->L[i] = Laux[i] = splati(0);
    for (int is = -steps; is <= steps; ++is) {
        const vf id = splat(15 + is * 0.2f) / max;
        const vf this_scale = splat(1.f) / id;
        for (int k = 0; k < 8; ++k) snap_lanes(t, s, k, id, this_scale, live, Laux + 4 * k, on_aux + k);
        vf sumqx, sumq2;
        level_fit(s, Laux, &sumqx, &sumq2);
        const vi better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2);
        scale = pick(better, sumqx / sumq2, scale);
        best = pick(better, scale * sumqx, best);
        for (int i = 0; i < 32; ++i) s->L[i] = picki(better, Laux[i], s->L[i]);
        for (int k = 0; k < 8; ++k) s->on[k] = picki(better, on_aux[k], s->on[k]);
    }
    return scale;
}

/* Lanes with groups off the grid and a positive scale: re-round those groups (IQ3_S: all groups) with the
 * fitted scale and refit it. */
MX_INLINE vf refit(const iq3_table *t, iq3_lanes *s, vf scale, int live, int all) {
    vi off = splati(0);
    for (int k = 0; k < 8; ++k) off |= ~s->on[k];
    const vi redo = off & (scale > 0);
    int todo = 0;
    for (int lane = 0; lane < NL; ++lane) todo |= (redo[lane] & 1) << lane;
    todo &= live;
    if (!todo) return scale;
    const vf id = splat(1.f) / scale;
    for (int k = 0; k < 8; ++k) {
        int lanes = todo;
        for (int lane = 0; lane < NL; ++lane) lanes &= ~((!all && s->on[k][lane]) << lane);
        snap_lanes(t, s, k, id, scale, lanes, s->L + 4 * k, 0);
    }
    vf sumqx, sumq2;
    level_fit(s, s->L, &sumqx, &sumq2);
    const vi mask = lane_mask(todo);
    return pick(mask & (sumq2 > 0), sumqx / sumq2, scale);
}

/* Magnitudes and sign bits of 8 values; IQ3_XXS keeps an even number of negatives by flipping the value of
 * least w x^2 (its magnitude goes negative). */
MX_INLINE uint8_t split_signs(const float *xb, const float *weight, float *xval, int even) {
    int flips = 0, s = 0;
    for (int i = 0; i < 8; ++i) {
        const int neg = !(xb[i] >= 0);
        xval[i] = neg ? -xb[i] : xb[i];
        flips += neg;
        s |= neg << i;
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

/* Weights, magnitudes and signs of the 8 sub-blocks of super-block x into lanes; returns the live lanes (a bit
 * each: ggml skips a sub-block whose largest magnitude is below EPS_XXS (IQ3_XXS) or zero (IQ3_S)). */
MX_INLINE int prepare(const float *x, const float *qw, float sigma2, int xxs, iq3_lanes *s, vf *max,
                      uint8_t signs[8][4]) {
    float weight[256], waux[256], xval[256];
    for (int i = 0; i < 256; ++i) weight[i] = qw ? qw[i] * sqrtf(sigma2 + x[i] * x[i]) : x[i] * x[i];
    for (int i = 0; i < 256; ++i) waux[i] = sqrtf(weight[i]);
    int live = 0;
    for (int ib = 0; ib < 8; ++ib) {
        for (int k = 0; k < 4; ++k) {
            const int j = 32 * ib + 8 * k;
            signs[ib][k] = (uint8_t)(split_signs(x + j, weight + j, xval + j, xxs) & (xxs ? 127 : 255));
        }
    }
    to_lanes(32, 8, xval, s->x);
    vf m = s->x[0];
    for (int i = 1; i < 32; ++i) m = pick(m > s->x[i], m, s->x[i]);  /* ggml's MAX, value by value */
    for (int ib = 0; ib < 8; ++ib) live |= !(xxs ? m[ib] < EPS_XXS : !m[ib]) << ib;
    *max = m;
    to_lanes(32, 8, weight, s->w);
    to_lanes(32, 8, waux, s->wa);
    return live;
}

/* One super-block: grid indices idx[8][8], sign bytes signs[8][4] and scales[8] of the sub-blocks (-1: skipped). */
MX_INLINE void super_block(const iq3_table *t, int xxs, const float *x, const float *qw, float sigma2,
                           uint16_t idx[8][8], uint8_t signs[8][4], float *scales) {
    iq3_lanes s;
    vf max;
    const int live = prepare(x, qw, sigma2, xxs, &s, &max, signs);
    vf scale = sweep(t, &s, max, live, xxs ? 15 : 9, xxs);
    scale = refit(t, &s, scale, live, !xxs);
    for (int ib = 0; ib < 8; ++ib) {
        scales[ib] = -1.f;
        if (!(live >> ib & 1)) continue;
        scales[ib] = scale[ib];
        if (scale[ib] < 0) {
            scales[ib] = -scale[ib];
            for (int k = 0; k < 4; ++k) signs[ib][k] = (uint8_t)(xxs ? ~signs[ib][k] & 127 : ~signs[ib][k]);
        }
        for (int k = 0; k < 8; ++k) {
            int u = 0;
            for (int i = 0; i < 4; ++i) u |= s.L[4 * k + i][ib] << (3 * i);
            idx[ib][k] = (uint16_t)(t->map[u] >= 0 ? t->map[u] : 0);  /* always on the grid by construction */
        }
    }
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
        uint16_t idx[8][8];
        uint8_t signs[8][4];
        super_block(&table_256, 1, x, qw ? qw + 256 * ibl : 0, sigma2, idx, signs, scales);
        for (int ib = 0; ib < 8; ++ib) {
            const float scale = scales[ib];
            scales[ib] = scale < 0 ? 0 : scale;
            if (scale < 0) continue;
            for (int k = 0; k < 8; ++k) qs[8 * ib + k] = (uint8_t)idx[ib][k];
            sas[ib] = signs[ib][0] | (signs[ib][1] << 7) | (signs[ib][2] << 14) | ((uint32_t)signs[ib][3] << 21);
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
        uint16_t idx[8][8];
        uint8_t sub_signs[8][4];
        super_block(&table_512, 0, x, qw ? qw + 256 * ibl : 0, sigma2, idx, sub_signs, scales);
        for (int ib = 0; ib < 8; ++ib) {
            const float scale = scales[ib];
            scales[ib] = scale < 0 ? 0 : scale;
            if (scale < 0) continue;
            for (int k = 0; k < 8; ++k) {
                qs[k] = (uint8_t)(idx[ib][k] & 255);
                qh[ib] |= (uint8_t)((idx[ib][k] >> 8) << k);
            }
            memcpy(signs, sub_signs[ib], 4);
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
