/* What every CPU kernel shares: bf16 conversions with PyTorch's rounding, a vectorisable exp,
 * and from how many rows the fused kernels share rows between threads. */

#ifndef LLMTREE_CPU_BF16_H
#define LLMTREE_CPU_BF16_H

#include <math.h>
#include <stdint.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16;

/* Rows are independent: from PARALLEL_MIN_ROWS rows on they are shared between the threads. */
#define PARALLEL_MIN_ROWS 8

static inline float bf2f(bf16 b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even, as c10::BFloat16 does; NaN stays NaN. Branch-free, so it vectorises. */
static inline bf16 f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = (u >> 16) | 0x40u;
    return (bf16)((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

/* exp(x) to about 1 ulp (Cephes' polynomial). The rounding to an integer power of two is done
 * by adding 1.5 * 2^23, not by floorf or a float-to-int conversion, so loops over it vectorise. */
static inline float fexp(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    float shifted = x * 1.44269504088896341f + 12582912.0f;
    float n = shifted - 12582912.0f;
    uint32_t n_bits;
    memcpy(&n_bits, &shifted, sizeof n_bits);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    uint32_t bits = (n_bits - 0x4b400000u + 127u) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

#endif
