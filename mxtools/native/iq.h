/* The 2-bit and 1-bit i-quants (IQ2_XXS, IQ2_XS, IQ2_S in iq2.c; IQ1_S, IQ1_M in iq1.c): codebook tables and row
 * encoders producing exactly the bytes of llama.cpp's ggml_quantize_chunk.
 *
 * Every encoder rounds a group of eight values to levels {0, 1, 2} (codebook values 1, 3, 5), packs the levels
 * into a 16-bit key (two bits per value) and looks the key up: a codebook point, or a list of the codebook points
 * nearest to it (all points at the `nwant` smallest distinct squared distances, ordered by distance, then index,
 * as ggml's iq2xs_init_impl orders them), among which the best weighted fit is chosen.
 */
#ifndef MX_IQ_H
#define MX_IQ_H

#include <float.h>
#include <stdint.h>

#include "search.h"

#define IQ_MAP_SIZE 43692  /* keys with every 2-bit field at most 2 are below 0xaaab */
#define IQ_MAX_LIST 512    /* longest neighbour list a table may hold (the longest, of IQ2_XS, has 292) */

typedef struct {
    const uint16_t *grid;  /* packed codebook, ngrid entries */
    int ngrid;
    int32_t *map;          /* key -> codebook index (>= 0), or -(offset + 1) of its neighbour list */
    uint16_t *lists;       /* neighbour lists: a count, then that many codebook indices */
    uint16_t *codes;       /* parallel to lists: each neighbour's packed levels (8 entries of padding at the end) */
    int8_t *points;        /* codebook points unpacked, 8 values 2 l + 1 per entry */
    uint32_t on[IQ_MAP_SIZE / 32 + 1];  /* bit key: key is a codebook point (a small copy of map >= 0) */
} iq_table;

MX_INLINE int iq_on_grid(const iq_table *t, int key) { return (t->on[key >> 5] >> (key & 31)) & 1; }

/* The bitwise OR of the 8 lanes (in every lane). */
MX_INLINE vi or_lanes(vi v) {
    v |= __builtin_shuffle(v, (vi){4, 5, 6, 7, 0, 1, 2, 3});
    v |= __builtin_shuffle(v, (vi){2, 3, 0, 1, 6, 7, 4, 5});
    return v | __builtin_shuffle(v, (vi){1, 0, 3, 2, 5, 4, 7, 6});
}

/* The neighbour of `key`'s list nearest to x in sum_i w_i (scale v_l - x_i)^2 over its positions i (v_l the value
 * of the neighbour's level l there); the first of equals, as ggml's strict `<` scan keeps it. Every term has one
 * of three values per position: tab[8 l + i] = w_i (scale v_l - x_i)^2 (iq_terms), so the distance of a neighbour
 * is a sum of table entries in ggml's order, eight neighbours at a time. Returns the codebook index. */
MX_INLINE int iq_nearest(const iq_table *t, int key, const float *tab) {
    typedef uint16_t vu16 __attribute__((vector_size(16)));
    const int off = -t->map[key] - 1, n = t->lists[off];
    const vf lane = {0, 1, 2, 3, 4, 5, 6, 7};
    float d2s[IQ_MAX_LIST + 8];
    vf low = splat(FLT_MAX);
    for (int j = 0; j < n; j += 8) {
        vu16 c16;
        memcpy(&c16, t->codes + off + 1 + j, sizeof c16);
        vi c = __builtin_convertvector(c16, vi);
        vf d2 = splat(0);
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i, c >>= 2) {
            const vi f = c & splati(3);
            d2 += pick(f == splati(0), splat(tab[i]), pick(f == splati(1), splat(tab[8 + i]), splat(tab[16 + i])));
        }
        memcpy(d2s + j, &d2, sizeof d2);
        low = pick((d2 < low) & (lane < splat((float)(n - j))), d2, low);
    }
    float best = FLT_MAX;
    for (int k = 0; k < NL; ++k) best = low[k] < best ? low[k] : best;
    int pick_j = 0;  /* ggml finds no neighbour only when every distance is inf or NaN; the first entry here */
    if (best < FLT_MAX)
        while (d2s[pick_j] != best) ++pick_j;  /* the first neighbour at the smallest distance */
    return t->lists[off + 1 + pick_j];
}

/* The table of iq_nearest for values x, weights w and the three level values scale * v_l. */
MX_INLINE void iq_terms(const float *x, const float *w, const float *scaled, float *tab) {
    vf X, W;
    memcpy(&X, x, sizeof X);
    memcpy(&W, w, sizeof W);
    for (int l = 0; l < 3; ++l) {
        const vf diff = splat(scaled[l]) - X;
        const vf term = W * diff * diff;
        memcpy(tab + 8 * l, &term, sizeof term);
    }
}

/* Build a table (once per process; callers serialize with pthread_once). Returns 0, or -1 when out of memory. */
int mx_iq_build(iq_table *t, const uint16_t *grid, int ngrid, int nwant);

/* ggml type ids of these encoders */
enum { T_IQ2_XXS = 16, T_IQ2_XS = 17, T_IQ1_S = 19, T_IQ2_S = 22, T_IQ1_M = 29 };

/* Row encoders (x: n values, n a multiple of 256; qw: n importance weights or NULL where ggml allows it). */
void mx_iq2_xxs_row(const float *x, uint8_t *y, int64_t n, const float *qw);
void mx_iq2_xs_row(const float *x, uint8_t *y, int64_t n, const float *qw);
void mx_iq2_s_row(const float *x, uint8_t *y, int64_t n, const float *qw);
void mx_iq1_s_row(const float *x, uint8_t *y, int64_t n, const float *qw);
void mx_iq1_m_row(const float *x, uint8_t *y, int64_t n, const float *qw);

/* Before encoding `type`: builds its tables; 0 when ready, -1 when the type needs an importance matrix and qw is
 * NULL (ggml_quantize_requires_imatrix: IQ2_XXS, IQ2_XS, IQ1_S), -3 when out of memory. 0 for other types. */
int mx_iq_prepare(int type, const float *qw);
int mx_iq1_prepare(void);

#endif
