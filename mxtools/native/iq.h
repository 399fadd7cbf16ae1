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
    uint32_t *codes;       /* parallel to lists: each neighbour's levels, 3 bits per position, 4 added from position 4
                              on (iq_nearest); 8 entries of padding at the end */
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
 * of three values per position, w_i (scale v_l - x_i)^2, held by iq_terms in four vectors: tab[i % 4] has the three
 * terms of position i in lanes 0-2 (i < 4) or 4-6 (i >= 4). A neighbour's code gives 3 bits per position, its
 * level plus 4 from position 4 on, so one permutation per position picks the terms of eight neighbours, added in
 * ggml's order. Returns the codebook index. */
MX_INLINE int iq_nearest(const iq_table *t, int key, const vf *tab) {
    const int off = -t->map[key] - 1, n = t->lists[off];
    const uint32_t *codes = t->codes + off + 1;
    vf low = splat(FLT_MAX);
    vi at = splati(0), j8 = {0, 1, 2, 3, 4, 5, 6, 7};
    for (int j = 0; j < n; j += 8, j8 += 8) {
        vi c;
        memcpy(&c, codes + j, sizeof c);
        vf d2 = __builtin_shuffle(tab[0], c);
#pragma GCC unroll 8
        for (int i = 1; i < 8; ++i) d2 += __builtin_shuffle(tab[i % 4], c >> 3 * i);
        const vi better = (d2 < low) & (j8 < splati(n));
        low = pick(better, d2, low);
        at = picki(better, j8, at);
    }
    float best = low[0];
    int pick_j = at[0];  /* ggml finds no neighbour only when every distance is inf or NaN; the first entry here */
    for (int l = 1; l < NL; ++l)
        if (low[l] < best || (low[l] == best && at[l] < pick_j)) {
            best = low[l];
            pick_j = at[l];
        }
    return t->lists[off + 1 + pick_j];
}

/* The tables of iq_nearest for values x, weights w and the three level values scale * v_l. */
MX_INLINE void iq_terms(const float *x, const float *w, const float *scaled, vf *tab) {
    vf X, W, T[3];
    memcpy(&X, x, sizeof X);
    memcpy(&W, w, sizeof W);
    for (int l = 0; l < 3; ++l) {
        const vf diff = splat(scaled[l]) - X;
        T[l] = W * diff * diff;
    }
    const vf P = __builtin_shuffle(T[0], T[1], (vi){0, 8, 1, 9, 4, 12, 5, 13});
    const vf Q = __builtin_shuffle(T[0], T[1], (vi){2, 10, 3, 11, 6, 14, 7, 15});
    tab[0] = __builtin_shuffle(P, T[2], (vi){0, 1, 8, 8, 4, 5, 12, 12});
    tab[1] = __builtin_shuffle(P, T[2], (vi){2, 3, 9, 9, 6, 7, 13, 13});
    tab[2] = __builtin_shuffle(Q, T[2], (vi){0, 1, 10, 10, 4, 5, 14, 14});
    tab[3] = __builtin_shuffle(Q, T[2], (vi){2, 3, 11, 11, 6, 7, 15, 15});
}

/* The tables (iq_tables.c), each ready once mx_iq_prepare returned 0 for a type using it. */
enum { IQT_2XXS, IQT_2XS, IQT_2S, IQT_1, IQT_COUNT };
extern iq_table mx_iq_tables[IQT_COUNT];

/* ggml type ids of these encoders */
enum { T_IQ2_XXS = 16, T_IQ2_XS = 17, T_IQ1_S = 19, T_IQ2_S = 22, T_IQ1_M = 29 };

/* Row encoders (x: n values, n a multiple of 256; qw: n importance weights or NULL where ggml allows it), each
 * running the AVX2 build (iq1_avx2.c, iq2_avx2.c: iq1.c and iq2.c compiled with AVX2 enabled for the whole file,
 * which GCC vectorizes better than target_clones functions) where the CPU has it, else the build for any x86-64. */
#define MX_ROW(name) void name(const float *x, uint8_t *y, int64_t n, const float *qw)
#if defined(__x86_64__) && !defined(MX_NO_CLONES)
#define MX_IQ_AVX2
#define MX_ROWS(name) MX_ROW(name); MX_ROW(name##_base); MX_ROW(name##_avx2)
#else
#define MX_ROWS(name) MX_ROW(name); MX_ROW(name##_base)
#endif
MX_ROWS(mx_iq2_xxs_row);
MX_ROWS(mx_iq2_xs_row);
MX_ROWS(mx_iq2_s_row);
MX_ROWS(mx_iq1_s_row);
MX_ROWS(mx_iq1_m_row);

/* The name of an encoder of this build of iq1.c / iq2.c */
#ifdef MX_IQ_BUILD_AVX2
#define MX_ISA(name) name##_avx2
#else
#define MX_ISA(name) name##_base
#endif

/* Before encoding `type`: builds its tables; 0 when ready, -1 when the type needs an importance matrix and qw is
 * NULL (ggml_quantize_requires_imatrix: IQ2_XXS, IQ2_XS, IQ1_S), -3 when out of memory. 0 for other types. */
int mx_iq_prepare(int type, const float *qw);

#endif
