/* Snapping one group of values onto an i-quant codebook at a fixed scale: the rounding step of GPTQ on the
 * i-quants (mxtools/quant/gguf_iq.py).
 *
 * ggml's encoders choose a block's scales and its codebook points together; GPTQ keeps the scales the encoder
 * chose and then, group by group, picks the point (with its signs, or for IQ1 its shift) that best fits the
 * error-updated values under those scales. The search here is exhaustive: every point of the codebook (256 to
 * 2048 of them), the weighted squared error sum_i w_i (x_i - v_i)^2 with v the value llama.cpp dequantizes the
 * point to, eight points at a time. The first point of the smallest error wins.
 *
 * Signs: the best sign of each value is its own (the sign of x relative to the scale's). Where the type stores
 * fewer sign bits than values (IQ2_XXS, IQ2_XS and IQ3_XXS keep an even number of negatives per 8 values), a
 * point whose count of negatives has the wrong parity flips the value that costs least to flip (4 w a s p for
 * magnitude a and point value p), the cost counted into the point's error.
 */
#include <float.h>
#include <pthread.h>
#include <stdlib.h>

#include "common.h"
#include "iq1_grids.h"
#include "iq2_grids.h"
#include "iq3_grids.h"
#include "search.h"

enum { S_IQ2_XXS, S_IQ2_XS, S_IQ2_S, S_IQ3_XXS, S_IQ3_S, S_IQ1_S, S_IQ1_M, S_COUNT };

/* Points transposed in groups of 8: pts[(j / 8) * g * 8 + i * 8 + j % 8] = value i of point j (magnitudes for the
 * signed types, ternary l - 1 for IQ1), so one vector holds value i of eight points. */
typedef struct {
    int n, g;
    float *pts;
} book_t;

static book_t books[S_COUNT];
static int book_error;
static pthread_once_t books_once = PTHREAD_ONCE_INIT;

static const float IQ2_VALUES[3] = {8, 25, 43};                 /* iq2xxs/iq2xs/iq2s grid bytes 0x08 0x19 0x2b */
static const float IQ3XXS_VALUES[8] = {4, 12, 20, 28, 36, 44, 52, 62};
static const float IQ3S_VALUES[8] = {1, 3, 5, 7, 9, 11, 13, 15};
static const float IQ1_VALUES[3] = {-1, 0, 1};

static int build(book_t *b, const uint16_t *grid, int n, int g, int bits, const float *values) {
    b->n = n;
    b->g = g;
    b->pts = malloc((size_t)n * g * sizeof(float));
    if (!b->pts) return -1;
    for (int j = 0; j < n; ++j)
        for (int i = 0; i < g; ++i)
            b->pts[(j / 8) * g * 8 + i * 8 + j % 8] = values[(grid[j] >> (bits * i)) & ((1 << bits) - 1)];
    return 0;
}

static void build_all(void) {
    book_error |= build(&books[S_IQ2_XXS], iq2_grid_256, 256, 8, 2, IQ2_VALUES);
    book_error |= build(&books[S_IQ2_XS], iq2_grid_512, 512, 8, 2, IQ2_VALUES);
    book_error |= build(&books[S_IQ2_S], iq2_grid_1024, 1024, 8, 2, IQ2_VALUES);
    book_error |= build(&books[S_IQ3_XXS], IQ3_GRID_256, 256, 4, 3, IQ3XXS_VALUES);
    book_error |= build(&books[S_IQ3_S], IQ3_GRID_512, 512, 4, 3, IQ3S_VALUES);
    book_error |= build(&books[S_IQ1_S], iq1_grid_2048, 2048, 8, 2, IQ1_VALUES);
    books[S_IQ1_M] = books[S_IQ1_S];
}

/* ggml type id -> book, and the sign rule: 0 free signs, 1 an even count of negatives per group, 2 a parity
 * given per row (IQ3_XXS: the second four of eight), 3 no signs and a shift given per row (IQ1_S), 4 no signs and
 * the shift chosen (IQ1_M). */
static int book_of(int type, int *rule) {
    switch (type) {
    case 16: *rule = 1; return S_IQ2_XXS;
    case 17: *rule = 1; return S_IQ2_XS;
    case 22: *rule = 0; return S_IQ2_S;
    case 18: *rule = 2; return S_IQ3_XXS;
    case 21: *rule = 0; return S_IQ3_S;
    case 19: *rule = 3; return S_IQ1_S;
    case 29: *rule = 4; return S_IQ1_M;
    default: return -1;
    }
}

#define IQ1_DELTA 0.125f

/* The best point for magnitudes a (signed values for IQ1, shifted by `shift` units of the scale), weights w and
 * scale s; with `flip`, points whose parity is wrong pay their cheapest flip. Writes the error. */
MX_CLONES static int best_point(const book_t *b, const float *a, const float *w, float s, float shift, int flip,
                                float *err_out) {
    const int g = b->g;
    vf A[8], W[8], WA4[8];
    for (int i = 0; i < g; ++i) {
        A[i] = splat(a[i]);
        W[i] = splat(w[i]);
        WA4[i] = splat(4 * w[i] * a[i] * s);
    }
    const vf S = splat(s), SH = splat(shift);
    const vf lane = {0, 1, 2, 3, 4, 5, 6, 7};
    vf best = splat(FLT_MAX), where = splat(0);
    for (int j0 = 0; j0 < b->n; j0 += 8) {
        const float *p = b->pts + (size_t)j0 * g;
        vf err = splat(0), cheapest = splat(FLT_MAX);
        for (int i = 0; i < g; ++i) {
            vf P;
            memcpy(&P, p + 8 * i, sizeof P);
            const vf d = A[i] - S * (P + SH);
            err += W[i] * d * d;
            if (flip) {
                const vf c = WA4[i] * P;
                cheapest = pick(c < cheapest, c, cheapest);
            }
        }
        if (flip) err += cheapest;
        const vi better = err < best;
        best = pick(better, err, best);
        where = pick(better, lane + splat((float)j0), where);
    }
    float e = FLT_MAX;
    int j = 0;
    for (int k = 0; k < 8; ++k)
        if (best[k] < e || (best[k] == e && (int)where[k] < j)) { e = best[k]; j = (int)where[k]; }
    *err_out = e;
    return j;
}

/* One row: the point index, the sign bits (IQ1_M: the shift bit, 1 for -delta) and the values llama.cpp decodes. */
static void snap_row(const book_t *b, int rule, const float *x, const float *w, float scale, int given,
                     int32_t *index, int32_t *bits, float *out) {
    const int g = b->g;
    float a[8], err;
    int neg = 0, odd = 0;
    const float s = fabsf(scale);
    if (rule >= 3) {  /* IQ1: values are signed, the shift is one of two */
        const int nshift = rule == 4 ? 2 : 1;
        int bestj = 0, bests = given;
        float beste = FLT_MAX;
        for (int t = 0; t < nshift; ++t) {
            const int sh = rule == 4 ? t : given;
            const int j = best_point(b, x, w, scale, sh ? -IQ1_DELTA : IQ1_DELTA, 0, &err);
            if (err < beste) { beste = err; bestj = j; bests = sh; }
        }
        *index = bestj;
        *bits = bests;
        const float delta = bests ? -IQ1_DELTA : IQ1_DELTA;
        for (int i = 0; i < g; ++i) out[i] = scale * (b->pts[(bestj / 8) * g * 8 + i * 8 + bestj % 8] + delta);
        return;
    }
    for (int i = 0; i < g; ++i) {
        a[i] = fabsf(x[i]);
        if ((x[i] < 0) != (scale < 0)) { neg |= 1 << i; odd ^= 1; }
    }
    const int want = rule == 1 ? 0 : given;
    const int flip = rule != 0 && odd != want;
    const int j = best_point(b, a, w, s, 0, flip, &err);
    const float *p = b->pts + (size_t)(j / 8) * g * 8 + j % 8;
    if (flip) {  /* the cheapest flip of this point (the first of equals) */
        int at = 0;
        float c = FLT_MAX;
        for (int i = 0; i < g; ++i) {
            const float ci = 4 * w[i] * a[i] * s * p[8 * i];
            if (ci < c) { c = ci; at = i; }
        }
        neg ^= 1 << at;
    }
    *index = j;
    *bits = neg;
    for (int i = 0; i < g; ++i) out[i] = scale * p[8 * i] * ((neg >> i) & 1 ? -1.f : 1.f);
}

/* Snap `rows` groups x [rows, g] (g = 8, or 4 for IQ3) with weights w [g] at scales scale [rows]; given [rows]
 * (IQ3_XXS: the parity the group's negatives must have, -1 free; IQ1_S: the shift bit) may be NULL otherwise.
 * Writes index, bits [rows] and out [rows, g]. Returns g, -1 for a type without a codebook, -3 out of memory. */
MX_EXPORT int64_t mx_iq_snap(int type, const float *x, int64_t rows, const float *w, const float *scale,
                             const int32_t *given, int32_t *index, int32_t *bits, float *out) {
    int rule;
    const int k = book_of(type, &rule);
    if (k < 0) return -1;
    pthread_once(&books_once, build_all);
    if (book_error) return -3;
    const book_t *b = &books[k];
    for (int64_t r = 0; r < rows; ++r) {
        int rr = rule, gv = given ? given[r] : 0;
        if (rule == 2 && gv < 0) rr = 0;  /* IQ3_XXS's first four: any parity */
        snap_row(b, rr, x + r * b->g, w, scale[r], gv, index + r, bits + r, out + r * b->g);
    }
    return b->g;
}
