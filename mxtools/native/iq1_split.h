/* The split searches of IQ1_S and IQ1_M (iq1.c) in two passes, byte for byte as ggml's single sequential scan.
 *
 * ggml scores every candidate c (a split of the sorted values, and a shift sign) in a fixed order: with qx_c and
 * q2_c its weighted sums, c is accepted when q2_c > 0 and qx_c * qx_c > best * q2_c, and then best becomes
 * B_c = (qx_c / q2_c) * qx_c (float operations, rounded as written). The last accepted candidate wins.
 *
 * Pass one computes qx, q2 and B of every candidate, eight at a time (NaN stands for "never accepted": padding
 * lanes and q2 <= 0). Pass two replays ggml's scan without visiting the ~30 candidates it accepts on the way up:
 * let c* be the first candidate with the largest B and X the largest B before it (at least ggml's start value
 * -FLT_MAX). Whatever ggml's best b is on reaching c*, it is -FLT_MAX or the B of an earlier candidate it accepted
 * (never NaN while the sums are finite, which the caller checks), so b <= X, and rounding is monotonic:
 * fl(b q2*) <= fl(X q2*). So when qx* qx* > fl(X q2*), ggml accepts c* whatever
 * happened before, and its state after c* is (B*, c*) exactly. From there the scan goes on as ggml's, eight
 * candidates at a time; when the test fails (near ties) the whole scan is replayed from the start.
 *
 * Chunk j holds 8 lanes (consecutive second split points i2) and K candidates per lane; candidate k of lane l
 * comes at position K l + k of the chunk, chunks in ggml's order.
 */
#ifndef MX_IQ1_SPLIT_H
#define MX_IQ1_SPLIT_H

#include <float.h>

#include "iq.h"
#include "search.h"

#define SPLIT_MAX_CHUNKS 85  /* IQ1_S: 33 first split points, each with ceil((33 - i1) / 8) chunks */

typedef struct {
    vf v[SPLIT_MAX_CHUNKS][3][4];  /* per chunk: qx[k], q2[k], B[k] (NaN where no candidate) */
    vf top[SPLIT_MAX_CHUNKS];      /* per chunk and lane: the largest B over k (-inf when none) */
    uint8_t i1[SPLIT_MAX_CHUNKS], i2[SPLIT_MAX_CHUNKS];  /* the chunk's first split point and its lane 0's second */
    int n;
} split_cands;

typedef struct { float scale; int i1, i2, k; } split_t;  /* the winner: i1 < 0 when ggml accepts none */

/* Stores candidate vectors qx, q2 as set k of chunk j (q2 <= 0 and NaN lanes become NaN). */
MX_INLINE void cand_put(split_cands *s, int j, int k, vf qx, vf q2) {
    const vf q2m = pick(q2 > 0, q2, splat(__builtin_nanf("")));
    const vf b = qx / q2m * qx;
    s->v[j][0][k] = qx;
    s->v[j][1][k] = q2m;
    s->v[j][2][k] = b;
}

MX_INLINE vf vmax_nan(vf a, vf acc) { return pick(a > acc, a, acc); }  /* NaN lanes of a leave acc */

MX_INLINE float hmax(vf v) {
    float m = v[0];
    for (int l = 1; l < NL; ++l) m = v[l] > m ? v[l] : m;
    return m;
}

/* Bit K l + k set where candidate (l, k) of chunk j would be accepted at best value `best`. */
MX_INLINE uint64_t accept_bits(const split_cands *s, int K, int j, float best) {
    const vi bit = {1, 1 << K, 1 << 2 * K, 1 << 3 * K, 1 << 4 * K, 1 << 5 * K, 1 << 6 * K, 1 << 7 * K};
    vi any = splati(0);
    for (int k = 0; k < K; ++k) {
        const vf qx = s->v[j][0][k];
        any |= (qx * qx > splat(best) * s->v[j][1][k]) & (bit << k);
    }
    return (uint32_t)or_lanes(any)[0];
}

/* Whether any candidate of chunks j.. would be accepted at `best` (one test for all of them). */
MX_INLINE int any_accepted(const split_cands *s, int K, int j, float best) {
    vi any = splati(0);
    for (; j < s->n; ++j)
        for (int k = 0; k < K; ++k) {
            const vf qx = s->v[j][0][k];
            any |= qx * qx > splat(best) * s->v[j][1][k];
        }
    return or_lanes(any)[0] != 0;
}

/* ggml's scan over chunk j from position `from` on, at best value *best; updates *best and the winner. */
MX_INLINE void scan_chunk(const split_cands *s, int K, int j, int from, float *best, int *wj, int *wpos) {
    uint64_t m = accept_bits(s, K, j, *best) >> from << from;
    while (m) {
        const int pos = __builtin_ctzll(m);
        *best = s->v[j][2][pos % K][pos / K];
        *wj = j;
        *wpos = pos;
        m = accept_bits(s, K, j, *best) >> pos >> 1 << pos << 1;
    }
}

/* ggml's scan over chunks j.. */
MX_INLINE void scan_from(const split_cands *s, int K, int j, float *best, int *wj, int *wpos) {
    for (; j < s->n; ++j) scan_chunk(s, K, j, 0, best, wj, wpos);
}

/* The first (chunk, position) whose B is the largest; *jmax < 0 when no candidate has a B. */
MX_INLINE float first_max(const split_cands *s, int K, int *jmax, int *pmax) {
    vf acc = splat(-INFINITY);
    vi at = splati(0), jv = splati(0);
    for (int j = 0; j < s->n; ++j, jv += 1) {
        const vi gt = s->top[j] > acc;
        acc = pick(gt, s->top[j], acc);
        at = picki(gt, jv, at);
    }
    const float M = hmax(acc);
    int jj = -1, ll = 0;
    for (int l = 0; l < NL; ++l)
        if (acc[l] == M && M > -INFINITY && (jj < 0 || at[l] < jj)) { jj = at[l]; ll = l; }
    int kk = 0;
    if (jj >= 0)
        while (kk < K - 1 && s->v[jj][2][kk][ll] != M) ++kk;  /* found: top is the largest B over k */
    *jmax = jj;
    *pmax = K * ll + kk;
    return M;
}

/* The largest B before position p of chunk j, at least -FLT_MAX. */
MX_INLINE float max_before(const split_cands *s, int K, int j, int p) {
    vf acc = splat(-FLT_MAX);
    for (int i = 0; i < j; ++i) acc = vmax_nan(s->top[i], acc);
    float X = hmax(acc);
    for (int q = 0; q < p; ++q) {
        const float b = s->v[j][2][q % K][q / K];
        X = b > X ? b : X;
    }
    return X;
}

/* Pass two (see the top of this file): ggml's winner among the candidates of s. `finite`: every qx and q2 is
 * known to be finite, so no B is NaN where ggml would accept (else the whole scan is replayed). */
MX_INLINE split_t split_winner(const split_cands *s, int K, int finite) {
    int wj = -1, wpos = 0, jj = -1, pp = 0;
    float best = -FLT_MAX;
    const float M = finite ? first_max(s, K, &jj, &pp) : 0;
    const float X = jj >= 0 ? max_before(s, K, jj, pp) : 0;
    const float qx = s->v[jj < 0 ? 0 : jj][0][pp % K][pp / K], q2 = s->v[jj < 0 ? 0 : jj][1][pp % K][pp / K];
    if (jj >= 0 && qx * qx > X * q2) {  /* ggml accepts the largest B, whatever came before */
        best = M;
        wj = jj;
        wpos = pp;
        scan_chunk(s, K, jj, pp + 1, &best, &wj, &wpos);
        if (any_accepted(s, K, jj + 1, best)) scan_from(s, K, jj + 1, &best, &wj, &wpos);
    } else if (jj >= 0 || !finite) {
        scan_from(s, K, 0, &best, &wj, &wpos);
    }
    split_t w = {0, -1, -1, -1};
    if (wj < 0) return w;
    const int l = wpos / K, k = wpos % K;
    w.scale = s->v[wj][0][k][l] / s->v[wj][1][k][l];
    w.i1 = s->i1[wj];
    w.i2 = s->i2[wj] + l;
    w.k = k;
    return w;
}

#endif
