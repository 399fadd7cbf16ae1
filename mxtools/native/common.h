/* Shared arithmetic of mxtools' native kernels.
 *
 * Everything here must give the same bits as llama.cpp's ggml-base (built for baseline x86-64, no fused
 * multiply-add): the library is compiled with -ffp-contract=off and without -ffast-math, and every float
 * expression keeps the C evaluation order of ggml-quants.c.
 */
#ifndef MX_COMMON_H
#define MX_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#define MX_EXPORT __attribute__((visibility("default")))
#define MX_INLINE static inline __attribute__((always_inline))
/* Hot row functions get an AVX2 clone chosen at load time; the default clone runs on any x86-64. */
#if defined(__x86_64__) && !defined(MX_NO_CLONES)
#define MX_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MX_CLONES
#endif

#define GROUP_MAX_EPS 1e-15f

MX_INLINE uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
MX_INLINE float f32_from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* llama.cpp's nearest_int: round half to even through the 1.5 * 2^23 constant, wrapping outside 2^22. */
MX_INLINE int nearest_int(float v) {
    int32_t i;
    float t = v + 12582912.f;
    memcpy(&i, &t, 4);
    return (i & 0x007fffff) - 0x00400000;
}

MX_INLINE int clampi(int v, int lo, int hi) {
    v = v < lo ? lo : v;
    v = v > hi ? hi : v;
    return v;
}

/* IEEE binary32 -> binary16, round to nearest even, subnormals kept, NaN kept quiet (GGML_FP32_TO_FP16). */
MX_INLINE uint16_t f32_to_f16(float f) {
    const float to_inf = f32_from_bits(0x77800000u);   /* 2^112 */
    const float to_zero = f32_from_bits(0x08800000u);  /* 2^-110 */
    float base = (fabsf(f) * to_inf) * to_zero;
    const uint32_t w = f32_bits(f), shl1 = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1 & 0xff000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f32_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007c00u) + (bits & 0x00000fffu);
    return (uint16_t)((sign >> 16) | (shl1 > 0xff000000u ? 0x7e00u : nonsign));
}

/* binary16 -> binary32, exact (GGML_FP16_TO_FP32). */
MX_INLINE float f16_to_f32(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    const float exp_scale = f32_from_bits(0x07800000u);  /* 2^-112 */
    const float normal = f32_from_bits((two_w >> 4) + (0xe0u << 23)) * exp_scale;
    const float denormal = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t r = two_w < (1u << 27) ? f32_bits(denormal) : f32_bits(normal);
    return f32_from_bits(sign | r);
}

MX_INLINE float f16_round(float f) { return f16_to_f32(f32_to_f16(f)); }

MX_INLINE void put_f16(uint8_t *dst, float f) { uint16_t h = f32_to_f16(f); memcpy(dst, &h, 2); }

#endif
