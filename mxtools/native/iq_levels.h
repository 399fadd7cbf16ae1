/* The 16 non-uniform levels of IQ4_NL and IQ4_XS (kvalues_iq4nl of ggml-common.h) and the nearest-level search. */
#ifndef MX_IQ_LEVELS_H
#define MX_IQ_LEVELS_H

#include <stdint.h>

static const int8_t IQ4_LEVELS[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

/* Midpoints of neighbouring levels. ggml's best_index_int8 returns level j - 1 when x - v[j-1] < v[j] - x and j
 * otherwise (x between the two). Near a midpoint both differences are exact in float (every midpoint m satisfies
 * |v[j] - v[j-1]| / 2 < 2^24 ulp(m)), so the test is x < m exactly, and the index is the number of midpoints m
 * with !(x < m): also 15 for NaN, as the binary search gives. Checked against ggml's search on every float
 * between -130 and 116 (2,246,705,154 values, all equal; 2026-12-06, 2-core x86-64 dev box). */
static const float IQ4_MIDPOINTS[15] = {-115.5f, -93.5f, -74.f, -57.f, -42.f, -28.5f, -16.f, -4.5f,
                                        7.f, 19.f, 31.5f, 45.5f, 61.f, 79.f, 101.f};

#endif
