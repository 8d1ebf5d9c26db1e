/* The quantized matrix products of llmtree's CPU forward: y[m, n] = x[m, k] @ w[n, k]^T for the
 * few rows of a decode step, with w in the 8-bit and 4-bit blocks of a GGUF file.
 *
 * lt_q8_linear multiplies a few rows by a weight held as 8-bit integers with one scale per 32
 * inputs (llama.cpp's Q8_0 blocks, in which GGUF files keep the token embedding that is also the
 * output head): half the bytes of bf16, and the exact values of the file. A step that samples one
 * sequence reads the 28 MB head of SmolLM2 instead of 57. Rows are taken Q8_ROWS at a time, each
 * group of 32 weights converted to float once for all of them.
 *
 * lt_q4_linear does the same for the 4-bit layers (llama.cpp's Q4_1 blocks: values 0..15 times a
 * float16 scale plus a float16 minimum per 32 inputs) the way llama.cpp does on a CPU: the inputs
 * rounded to 8 bits per group of 32 (Q8_1), multiplied by the 4-bit values in integers with
 * AVX-512 VNNI, the outputs in the vector lanes: a block of 16 outputs is one vector of sums, so
 * no horizontal additions, and the scales apply once per group. Up to 8 rows share one pass over
 * the weight. Measured, the 120 products of SmolLM2 with nothing in cache: 2.4x faster than AMX
 * bf16 at one row, 1.9x at 8, even at 16; against the float version of this kernel (the weights
 * converted to float, times the bf16 inputs) 1.16x at one row, 1.69x at 4, 1.9x at 8.
 *
 * Built with cpu_kernels.c, cpu_matmul.c and cpu_layers.c into one library by
 * llmtree/engine/kernel_build.py; lt_q8_fast() and lt_q4_fast() say whether the vector paths
 * are here (the caller keeps other products otherwise).
 */

#include "cpu_work.h"

#if defined(__AVX512F__)
#include <immintrin.h>

/* 1 when lt_q8_linear has its vector path here (the caller keeps bf16 products otherwise). */
int lt_q8_fast(void) { return 1; }
#else
int lt_q8_fast(void) { return 0; }
#endif

#define Q8_GROUP 32
#define Q8_ROWS 4
#define Q8_AHEAD 8
#define Q8_BLOCK 256 /* outputs a thread claims at a time */

/* Output j of every row: the groups of row j of q against the rows of xf (float copies of x). */
static inline void q8_output(const int8_t *row, const float *d, const float *xf, int64_t m,
                             int64_t k, bf16 *out, int64_t ldo) {
    int64_t groups = k / Q8_GROUP;
#if defined(__AVX512F__)
    for (int64_t line = 0; line < k; line += 64)
        _mm_prefetch((const char *)(row + Q8_AHEAD * k + line), _MM_HINT_T0);
    __m512 acc[Q8_ROWS];
    for (int64_t r = 0; r < m; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const __m128i *bytes = (const __m128i *)(row + g * Q8_GROUP);
        __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(bytes)));
        __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(bytes + 1)));
        __m512 scale = _mm512_set1_ps(d[g]);
        for (int64_t r = 0; r < m; r++) {
            const float *xg = xf + r * k + g * Q8_GROUP;
            __m512 sum = _mm512_fmadd_ps(w1, _mm512_load_ps(xg + 16),
                                         _mm512_mul_ps(w0, _mm512_load_ps(xg)));
            acc[r] = _mm512_fmadd_ps(sum, scale, acc[r]);
        }
    }
    for (int64_t r = 0; r < m; r++) out[r * ldo] = f2bf(_mm512_reduce_add_ps(acc[r]));
#else
    for (int64_t r = 0; r < m; r++) {
        float acc = 0.0f;
        for (int64_t g = 0; g < groups; g++) {
            float sum = 0.0f;
            for (int64_t i = 0; i < Q8_GROUP; i++)
                sum += (float)row[g * Q8_GROUP + i] * xf[r * k + g * Q8_GROUP + i];
            acc += sum * d[g];
        }
        out[r * ldo] = f2bf(acc);
    }
#endif
}

/* out[m, n] (row stride ldo) = x[m, k] (row stride ldx) @ w^T for m <= Q8_ROWS, where w[j, i] =
 * q[j, i] * scales[j, i / 32] and k is a multiple of 32. Each group of 32 products is summed in
 * float, scaled, and added to the output's float sum; the sum is rounded once to bf16. Threads
 * claim Q8_BLOCK outputs at a time (claim_block), reading q front to back within their range. */
static void q8_rows(const bf16 *x, int64_t ldx, int64_t m, const int8_t *q, const float *scales,
                    int64_t n, int64_t k, bf16 *out, int64_t ldo, int num_threads, float *xf) {
    for (int64_t r = 0; r < m; r++)
        for (int64_t i = 0; i < k; i++) xf[r * k + i] = bf2f(x[r * ldx + i]);
    int64_t blocks = (n + Q8_BLOCK - 1) / Q8_BLOCK;
    _Atomic uint64_t ranges[MAX_THREADS];
    if (num_threads > MAX_THREADS) num_threads = MAX_THREADS;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1 && blocks > 1)
    {
        share_blocks(ranges, blocks);
        for (int64_t block; (block = claim_block(ranges)) >= 0;) {
            int64_t end = (block + 1) * Q8_BLOCK < n ? (block + 1) * Q8_BLOCK : n;
            for (int64_t j = block * Q8_BLOCK; j < end; j++)
                q8_output(q + j * k, scales + j * (k / Q8_GROUP), xf, m, k, out + j, ldo);
        }
    }
}

/* out[m, n] (row stride ldo) = x[m, k] (row stride ldx) @ w^T as above, for any m. */
void lt_q8_linear(const bf16 *x, int64_t ldx, int64_t m, const int8_t *q, const float *scales,
                  int64_t n, int64_t k, bf16 *out, int64_t ldo, int num_threads) {
    if (k % Q8_GROUP) return;
    float *xf = aligned_alloc(64, (size_t)(Q8_ROWS * k) * sizeof(float));
    if (!xf) return;
    for (int64_t r = 0; r < m; r += Q8_ROWS) {
        int64_t rows = m - r < Q8_ROWS ? m - r : Q8_ROWS;
        q8_rows(x + r * ldx, ldx, rows, q, scales, n, k, out + r * ldo, ldo, num_threads, xf);
    }
    free(xf);
}

#define Q4_GROUP 32
#define Q4_LANES 16 /* outputs per block: one vector of sums each */
#define Q4_ROWS 8 /* rows per pass over the weight */
#define Q4_STRIDE (Q4_GROUP / 2 * Q4_LANES + 4 * Q4_LANES) /* bytes per group of a block: 320 */
#define Q4_AHEAD 4                                       /* groups prefetched ahead */

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
/* 1 when lt_q4_linear has its vector path here (the caller keeps other products otherwise). */
int lt_q4_fast(void) { return 1; }
#else
int lt_q4_fast(void) { return 0; }
#endif

/* Quantizes m rows of x (row stride ldx, k inputs) as llama.cpp's Q8_1 blocks: per group of 32
 * inputs, d = max |x| / 127, q = x / d rounded to the nearest integer (ties to even) and the
 * group's sum d * sum(q). xq[m, k], xd[m, groups], xs[m, groups]. The caller's exact reference
 * (tests/test_engine_matmul.py) repeats these float32 steps. */
static void q8_quantize_rows(const bf16 *x, int64_t ldx, int64_t m, int64_t k, int8_t *xq,
                             float *xd, float *xs) {
    int64_t groups = k / Q4_GROUP;
    for (int64_t r = 0; r < m; r++)
        for (int64_t g = 0; g < groups; g++) {
            const bf16 *in = x + r * ldx + g * Q4_GROUP;
            int8_t *q = xq + r * k + g * Q4_GROUP;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
            __m512 a = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)in)), 16));
            __m512 b = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(in + 16))), 16));
            float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
            float d = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(inv)));
            __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, _mm512_set1_ps(inv)));
            _mm_storeu_si128((__m128i *)q, _mm512_cvtsepi32_epi8(qa));
            _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtsepi32_epi8(qb));
            int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
#else
            float amax = 0.0f;
            for (int i = 0; i < Q4_GROUP; i++) amax = fmaxf(amax, fabsf(bf2f(in[i])));
            float d = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            int sum = 0;
            for (int i = 0; i < Q4_GROUP; i++) {
                int v = (int)nearbyintf(bf2f(in[i]) * inv);
                q[i] = (int8_t)v;
                sum += v;
            }
#endif
            xd[r * groups + g] = d;
            xs[r * groups + g] = d * (float)sum;
        }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
/* Rounds 16 float sums to bf16 (nearest even) into out. */
static inline void store_bf16x16(bf16 *out, __m512 sums) {
    __m512i bits = _mm512_castps_si512(sums);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    bits = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    _mm256_storeu_si256((__m256i *)out, _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
}

/* One block of Q4_LANES outputs for m rows, m a constant where inlined (the sums then stay in
 * registers). A group's 256 bytes of 4-bit values are four loads of 64; the low halves of a load
 * are the weights of inputs 4c .. 4c + 3 of its 16 outputs, the high halves those of inputs
 * 16 + 4c .. 16 + 4c + 3, four bytes per output lane, which is what vpdpbusd multiplies by the
 * four 8-bit inputs broadcast to every lane (unsigned weights 0..15 times signed inputs, summed
 * in 32 bits: exact). The integer sum of a group is then scaled by the weights' scales times
 * the inputs' scale, plus the weights' minimums times the inputs' group sum. */
static inline __attribute__((always_inline)) void q4_block(const uint8_t *w, const int8_t *xq,
                                                           const float *xd, const float *xs,
                                                           const int64_t m, int64_t k, bf16 *out,
                                                           int64_t ldo) {
    int64_t groups = k / Q4_GROUP;
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    __m512 acc[Q4_ROWS];
    for (int64_t r = 0; r < m; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *group = w + g * Q4_STRIDE;
        for (int line = 0; line < Q4_STRIDE; line += 64)
            _mm_prefetch((const char *)group + Q4_AHEAD * Q4_STRIDE + line, _MM_HINT_T0);
        const int chains = m < 4 ? 2 : 1; /* few rows: two chains of sums each, to overlap */
        __m512i dot[2][Q4_ROWS];
        for (int64_t r = 0; r < m; r++) dot[0][r] = dot[1][r] = _mm512_setzero_si512();
        for (int c = 0; c < 4; c++) {
            __m512i bytes = _mm512_loadu_si512((const void *)(group + 64 * c));
            __m512i lo = _mm512_and_si512(bytes, low4);
            __m512i hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low4);
            for (int64_t r = 0; r < m; r++) {
                const int32_t *quads = (const int32_t *)(xq + r * k + g * Q4_GROUP);
                __m512i *sums = &dot[c % chains][r];
                *sums = _mm512_dpbusd_epi32(*sums, lo, _mm512_set1_epi32(quads[c]));
                *sums = _mm512_dpbusd_epi32(*sums, hi, _mm512_set1_epi32(quads[c + 4]));
            }
        }
        const __m256i *halves = (const __m256i *)(group + Q4_GROUP / 2 * Q4_LANES);
        __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256(halves));
        __m512 minimum = _mm512_cvtph_ps(_mm256_loadu_si256(halves + 1));
        for (int64_t r = 0; r < m; r++) {
            __m512 sum = _mm512_cvtepi32_ps(_mm512_add_epi32(dot[0][r], dot[1][r]));
            __m512 step = _mm512_mul_ps(scale, _mm512_set1_ps(xd[r * groups + g]));
            acc[r] = _mm512_fmadd_ps(sum, step, acc[r]);
            acc[r] = _mm512_fmadd_ps(minimum, _mm512_set1_ps(xs[r * groups + g]), acc[r]);
        }
    }
    for (int64_t r = 0; r < m; r++) store_bf16x16(out + r * ldo, acc[r]);
}
#else
static inline float half_to_float(uint16_t h) {
    uint32_t exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    float f;
    if (exponent == 0x1f)
        f = mantissa ? NAN : INFINITY;
    else
        f = exponent ? ldexpf((float)(mantissa | 0x400), (int)exponent - 25)
                     : ldexpf((float)mantissa, -24);
    return h & 0x8000 ? -f : f;
}

/* The same sums one output at a time (machines without AVX-512 VNNI). */
static void q4_block(const uint8_t *w, const int8_t *xq, const float *xd, const float *xs,
                     const int64_t m, int64_t k, bf16 *out, int64_t ldo) {
    int64_t groups = k / Q4_GROUP;
    for (int64_t r = 0; r < m; r++)
        for (int64_t lane = 0; lane < Q4_LANES; lane++) {
            float acc = 0.0f;
            for (int64_t g = 0; g < groups; g++) {
                const uint8_t *group = w + g * Q4_STRIDE;
                const int8_t *x = xq + r * k + g * Q4_GROUP;
                int32_t dot = 0;
                for (int c = 0; c < 4; c++)
                    for (int b = 0; b < 4; b++) {
                        uint8_t byte = group[64 * c + 4 * lane + b];
                        dot += (byte & 0xf) * x[4 * c + b] + (byte >> 4) * x[16 + 4 * c + b];
                    }
                uint16_t scale, minimum;
                memcpy(&scale, group + Q4_GROUP / 2 * Q4_LANES + 2 * lane, 2);
                memcpy(&minimum, group + Q4_GROUP / 2 * Q4_LANES + 2 * Q4_LANES + 2 * lane, 2);
                acc += (float)dot * (half_to_float(scale) * xd[r * groups + g]);
                acc += half_to_float(minimum) * xs[r * groups + g];
            }
            out[r * ldo + lane] = f2bf(acc);
        }
}
#endif

/* out[m, n] (row stride ldo) = x[m, k] (row stride ldx) @ w^T for m <= Q4_ROWS, where w[j, i] =
 * q[j, i] * scale[j, g] + minimum[j, g] for the group g = i / 32 of input i, q 4-bit, and x is
 * taken as its Q8_1 form (q8_quantize_rows): llama.cpp's Q4_1 x Q8_1 product. The weight is
 * packed (linear.to_q4) in blocks of Q4_LANES outputs, each block's groups in input order and
 * each group in Q4_STRIDE bytes: four times 64 bytes, byte 4j + b of the c-th holding input
 * 4c + b (low half) and input 16 + 4c + b (high half) of output j, then the 16 outputs' float16
 * scales, then their float16 minimums. A thread streams its range of blocks front to back, and
 * takes blocks from another's range when done (claim_block). Sums are float, rounded once to
 * bf16. */
static void q4_rows(const bf16 *x, int64_t ldx, int64_t m, const uint8_t *packed, int64_t n,
                    int64_t k, bf16 *out, int64_t ldo, int num_threads, int8_t *xq, float *xd,
                    float *xs) {
    q8_quantize_rows(x, ldx, m, k, xq, xd, xs);
    int64_t blocks = n / Q4_LANES, block_bytes = k / Q4_GROUP * Q4_STRIDE;
    _Atomic uint64_t ranges[MAX_THREADS];
    if (num_threads > MAX_THREADS) num_threads = MAX_THREADS;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1 && blocks > 1)
    {
        share_blocks(ranges, blocks);
        for (int64_t b; (b = claim_block(ranges)) >= 0;) {
            const uint8_t *w = packed + b * block_bytes;
            bf16 *o = out + b * Q4_LANES;
            switch (m) { /* a constant m per call keeps the sums in registers */
            case 1: q4_block(w, xq, xd, xs, 1, k, o, ldo); break;
            case 2: q4_block(w, xq, xd, xs, 2, k, o, ldo); break;
            case 3: q4_block(w, xq, xd, xs, 3, k, o, ldo); break;
            case 4: q4_block(w, xq, xd, xs, 4, k, o, ldo); break;
            case 5: q4_block(w, xq, xd, xs, 5, k, o, ldo); break;
            case 6: q4_block(w, xq, xd, xs, 6, k, o, ldo); break;
            case 7: q4_block(w, xq, xd, xs, 7, k, o, ldo); break;
            default: q4_block(w, xq, xd, xs, Q4_ROWS, k, o, ldo); break;
            }
        }
    }
}

/* out[m, n] (row stride ldo) = x[m, k] (row stride ldx) @ w^T as above, for any m; n a multiple
 * of Q4_LANES and k of Q4_GROUP. */
void lt_q4_linear(const bf16 *x, int64_t ldx, int64_t m, const uint8_t *packed, int64_t n,
                  int64_t k, bf16 *out, int64_t ldo, int num_threads) {
    if (k % Q4_GROUP || n % Q4_LANES) return;
    int64_t groups = k / Q4_GROUP;
    float *xd = aligned_alloc(64, (size_t)(2 * Q4_ROWS * groups + Q4_ROWS * k / 4) * sizeof(float));
    if (!xd) return;
    float *xs = xd + Q4_ROWS * groups;
    int8_t *xq = (int8_t *)(xs + Q4_ROWS * groups);
    for (int64_t r = 0; r < m; r += Q4_ROWS) {
        int64_t rows = m - r < Q4_ROWS ? m - r : Q4_ROWS;
        q4_rows(x + r * ldx, ldx, rows, packed, n, k, out + r * ldo, ldo, num_threads, xq, xd, xs);
    }
    free(xd);
}
