/* Float format conversions for the conversion writers: bf16 -> f16 / f32 and f32 -> f16, round to nearest
 * even with subnormals kept (the results of torch's and numpy's casts). Uses the F16C instructions when the CPU
 * has them (checked at run time), the bit-exact software conversion of common.h otherwise. */
#include <immintrin.h>

#include "common.h"

MX_INLINE float bf16_to_f32(uint16_t h) { return f32_from_bits((uint32_t)h << 16); }

__attribute__((target("avx2,f16c"))) static void bf16_to_f16_f16c(const uint16_t *src, uint16_t *dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(src + i));
        __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_castsi256_ps(w), _MM_FROUND_TO_NEAREST_INT));
    }
    for (; i < n; ++i) dst[i] = f32_to_f16(bf16_to_f32(src[i]));
}

__attribute__((target("avx2,f16c"))) static void f32_to_f16_f16c(const float *src, uint16_t *dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; ++i) dst[i] = f32_to_f16(src[i]);
}

static int has_f16c(void) {
    static int cached = -1;
    if (cached < 0) cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    return cached;
}

MX_EXPORT void mx_bf16_to_f16(const uint16_t *src, uint16_t *dst, int64_t n) {
    if (has_f16c()) {
        bf16_to_f16_f16c(src, dst, n);
        return;
    }
    for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_f16(bf16_to_f32(src[i]));
}

MX_EXPORT void mx_f32_to_f16(const float *src, uint16_t *dst, int64_t n) {
    if (has_f16c()) {
        f32_to_f16_f16c(src, dst, n);
        return;
    }
    for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_f16(src[i]);
}

MX_EXPORT void mx_bf16_to_f32(const uint16_t *src, float *dst, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
}

/* For tests: the software conversion, whatever the CPU. */
MX_EXPORT void mx_f32_to_f16_soft(const float *src, uint16_t *dst, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_f16(src[i]);
}
