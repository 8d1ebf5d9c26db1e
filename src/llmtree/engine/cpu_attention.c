/* Rotary embedding with the KV-cache write, and attention, for llmtree's CPU forward.
 *
 * lt_rope_attention does one layer's: the query and key heads rotated in place and the keys and
 * values written into the slot cache, then an attention kernel for one-token queries that reads
 * the slot cache in place (no mask, no gather) and never depends on the other rows of the batch.
 * The rounding steps are those of the PyTorch code it replaces. Built with cpu_kernels.c into
 * one library (kernel_build.py); every index that addresses the cache is checked here as well as
 * by the caller: an out-of-range row is skipped, never written.
 */

#include "cpu_bf16.h"

/* The cache layout. Values are [slots, kv_heads, max_len, head_dim]: one row per position, which
 * is what the weighted sum of values reads. Keys are stored in blocks of KEY_BLOCK positions,
 * [slots, kv_heads, max_len / KEY_BLOCK, head_dim, KEY_BLOCK]: the scores of a block are then
 * head_dim vertical multiply-adds over KEY_BLOCK lanes, with no horizontal sums. max_len is a
 * multiple of KEY_BLOCK (the caller rounds the cache up). */
#define KEY_BLOCK 16

static inline int64_t key_offset(int64_t slot, int64_t head, int64_t pos, int64_t kv_heads,
                                 int64_t head_dim, int64_t max_len) {
    return (slot * kv_heads + head) * max_len * head_dim + (pos / KEY_BLOCK) * head_dim * KEY_BLOCK +
           pos % KEY_BLOCK;
}

/* Rotary embedding of the query and key heads of each row of qkv ([rows, heads + 2 kv_heads,
 * head_dim]), in place, and the row's rotated keys and its values written into the layer's cache
 * at (slots[r], positions[r]). cos/sin are the [max_len, head_dim] tables; sin has its first half
 * negated, so rotate_half(x) * sin == roll(x, half) * sin. */
static void rope_store(bf16 *qkv, const bf16 *cos_table, const bf16 *sin_table,
                   const int64_t *slots, const int64_t *positions, int64_t rows, int64_t heads,
                   int64_t kv_heads, int64_t head_dim, bf16 *k_cache, bf16 *v_cache,
                   int64_t num_slots, int64_t max_len, int num_threads) {
    int64_t half = head_dim / 2, width = (heads + 2 * kv_heads) * head_dim;
    if (head_dim > 512 || max_len % KEY_BLOCK) return;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (num_threads > 1 && rows >= PARALLEL_MIN_ROWS)
    for (int64_t r = 0; r < rows; r++) {
        bf16 tmp[512];
        int64_t slot = slots[r], pos = positions[r];
        if (pos < 0 || pos >= max_len) continue;
        bf16 *row = qkv + r * width;
        const bf16 *c = cos_table + pos * head_dim, *s = sin_table + pos * head_dim;
        for (int64_t h = 0; h < heads + kv_heads; h++) {
            bf16 *x = row + h * head_dim;
            memcpy(tmp, x, (size_t)head_dim * sizeof(bf16));
            for (int64_t i = 0; i < half; i++) {
                float a = bf2f(f2bf(bf2f(tmp[i]) * bf2f(c[i])));
                float b = bf2f(f2bf(bf2f(tmp[i + half]) * bf2f(s[i])));
                x[i] = f2bf(a + b);
            }
            for (int64_t i = half; i < head_dim; i++) {
                float a = bf2f(f2bf(bf2f(tmp[i]) * bf2f(c[i])));
                float b = bf2f(f2bf(bf2f(tmp[i - half]) * bf2f(s[i])));
                x[i] = f2bf(a + b);
            }
        }
        if (slot < 0 || slot >= num_slots) continue;
        for (int64_t h = 0; h < kv_heads; h++) {
            const bf16 *key = row + (heads + h) * head_dim;
            bf16 *k = k_cache + key_offset(slot, h, pos, kv_heads, head_dim, max_len);
            for (int64_t d = 0; d < head_dim; d++) k[d * KEY_BLOCK] = key[d];
            memcpy(v_cache + ((slot * kv_heads + h) * max_len + pos) * head_dim,
                   row + (heads + kv_heads + h) * head_dim, (size_t)head_dim * sizeof(bf16));
        }
    }
}

#define MAX_GROUPS 8
#define PARALLEL_MIN_POSITIONS 2048

#if defined(__AVX512F__)
static inline __m512 load16(const bf16 *p) {
    __m256i raw = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
#endif

#define INLINE static inline __attribute__((always_inline))

/* scores[g * stride + t] = q[g] . key(t) for the keys t < blocks * KEY_BLOCK, a block at a time
 * (two at once where there are two: twice the independent sums in flight). Each score is summed
 * over d in order, whatever the blocking. Inlined with constant groups and head_dim (see
 * attend), so the sums stay in registers. */
INLINE void score_blocks(const float *restrict q, const bf16 *restrict keys, int64_t blocks,
                         int64_t groups, int64_t head_dim, float *restrict scores,
                         int64_t stride) {
#if defined(__AVX512F__)
    if (KEY_BLOCK == 16 && groups <= MAX_GROUPS) {
        int64_t b = 0;
        for (; b + 2 <= blocks; b += 2) {
            const bf16 *k0 = keys + b * head_dim * KEY_BLOCK, *k1 = k0 + head_dim * KEY_BLOCK;
            __m512 acc0[MAX_GROUPS], acc1[MAX_GROUPS];
            for (int64_t g = 0; g < groups; g++) acc0[g] = acc1[g] = _mm512_setzero_ps();
            for (int64_t d = 0; d < head_dim; d++) {
                __m512 x0 = load16(k0 + d * KEY_BLOCK), x1 = load16(k1 + d * KEY_BLOCK);
                for (int64_t g = 0; g < groups; g++) {
                    __m512 qd = _mm512_set1_ps(q[g * head_dim + d]);
                    acc0[g] = _mm512_fmadd_ps(qd, x0, acc0[g]);
                    acc1[g] = _mm512_fmadd_ps(qd, x1, acc1[g]);
                }
            }
            for (int64_t g = 0; g < groups; g++) {
                _mm512_storeu_ps(scores + g * stride + b * KEY_BLOCK, acc0[g]);
                _mm512_storeu_ps(scores + g * stride + (b + 1) * KEY_BLOCK, acc1[g]);
            }
        }
        for (; b < blocks; b++) {
            const bf16 *k0 = keys + b * head_dim * KEY_BLOCK;
            __m512 acc0[MAX_GROUPS];
            for (int64_t g = 0; g < groups; g++) acc0[g] = _mm512_setzero_ps();
            for (int64_t d = 0; d < head_dim; d++) {
                __m512 x0 = load16(k0 + d * KEY_BLOCK);
                for (int64_t g = 0; g < groups; g++)
                    acc0[g] = _mm512_fmadd_ps(_mm512_set1_ps(q[g * head_dim + d]), x0, acc0[g]);
            }
            for (int64_t g = 0; g < groups; g++)
                _mm512_storeu_ps(scores + g * stride + b * KEY_BLOCK, acc0[g]);
        }
        return;
    }
#endif
    for (int64_t b = 0; b < blocks; b++)
        for (int64_t g = 0; g < groups; g++) {
            float acc[KEY_BLOCK] = {0};
            const float *qg = q + g * head_dim;
            const bf16 *block = keys + b * head_dim * KEY_BLOCK;
            for (int64_t d = 0; d < head_dim; d++) {
                const bf16 *k = block + d * KEY_BLOCK;
                float qd = qg[d];
                for (int64_t lane = 0; lane < KEY_BLOCK; lane++) acc[lane] += qd * bf2f(k[lane]);
            }
            for (int64_t lane = 0; lane < KEY_BLOCK; lane++)
                scores[g * stride + b * KEY_BLOCK + lane] = acc[lane];
        }
}

/* scores[t] = softmax(scores[:length])[t], in float32. The maximum and the sum are reduced
 * across vector lanes (the sum's order is not position order). */
INLINE void softmax(float *restrict scores, int64_t length) {
    float top = scores[0], total = 0.0f;
#pragma omp simd reduction(max : top)
    for (int64_t t = 1; t < length; t++) top = scores[t] > top ? scores[t] : top;
#pragma omp simd reduction(+ : total)
    for (int64_t t = 0; t < length; t++) {
        scores[t] = fexp(scores[t] - top);
        total += scores[t];
    }
    float inv = 1.0f / total;
#pragma omp simd
    for (int64_t t = 0; t < length; t++) scores[t] *= inv;
}

/* acc[g * head_dim + d] = sum over t < length of p[g * stride + t] * values[t][d]. */
INLINE void weigh_values(const float *restrict p, int64_t stride, const bf16 *restrict values,
                         int64_t length, int64_t groups, int64_t head_dim, float *restrict acc) {
#if defined(__AVX512F__)
    if (head_dim == 64 && groups <= 4) {  /* every accumulator in a register: one pass */
        __m512 sum[4][4];
        for (int64_t g = 0; g < groups; g++)
            for (int64_t c = 0; c < 4; c++) sum[g][c] = _mm512_setzero_ps();
        for (int64_t t = 0; t < length; t++) {
            const bf16 *row = values + t * 64;
            __m512 v0 = load16(row), v1 = load16(row + 16), v2 = load16(row + 32),
                   v3 = load16(row + 48);
            for (int64_t g = 0; g < groups; g++) {
                __m512 w = _mm512_set1_ps(p[g * stride + t]);
                sum[g][0] = _mm512_fmadd_ps(w, v0, sum[g][0]);
                sum[g][1] = _mm512_fmadd_ps(w, v1, sum[g][1]);
                sum[g][2] = _mm512_fmadd_ps(w, v2, sum[g][2]);
                sum[g][3] = _mm512_fmadd_ps(w, v3, sum[g][3]);
            }
        }
        for (int64_t g = 0; g < groups; g++)
            for (int64_t c = 0; c < 4; c++) _mm512_storeu_ps(acc + g * 64 + c * 16, sum[g][c]);
        return;
    }
    if (head_dim % 16 == 0 && groups <= MAX_GROUPS) {
        for (int64_t d = 0; d < head_dim; d += 16) {
            __m512 sum[MAX_GROUPS];
            for (int64_t g = 0; g < groups; g++) sum[g] = _mm512_setzero_ps();
            for (int64_t t = 0; t < length; t++) {
                __m512 v = load16(values + t * head_dim + d);
                for (int64_t g = 0; g < groups; g++)
                    sum[g] = _mm512_fmadd_ps(_mm512_set1_ps(p[g * stride + t]), v, sum[g]);
            }
            for (int64_t g = 0; g < groups; g++) _mm512_storeu_ps(acc + g * head_dim + d, sum[g]);
        }
        return;
    }
#endif
    memset(acc, 0, sizeof(float) * (size_t)(groups * head_dim));
    for (int64_t t = 0; t < length; t++) {
        const bf16 *restrict v = values + t * head_dim;
        for (int64_t g = 0; g < groups; g++) {
            float weight = p[g * stride + t];
            float *restrict ag = acc + g * head_dim;
            for (int64_t d = 0; d < head_dim; d++) ag[d] += weight * bf2f(v[d]);
        }
    }
}

/* One row's attention for one kv head and the `groups` query heads that share it: q (bf16,
 * already rotated) over the first `length` cached keys and values, into o. qf, scores (groups *
 * stride floats) and acc are the thread's scratch. */
INLINE void attend(const bf16 *q, const bf16 *keys, const bf16 *values, int64_t length,
                   int64_t groups, int64_t head_dim, float scale, float *restrict qf,
                   float *restrict scores, int64_t stride, float *restrict acc, bf16 *o) {
    for (int64_t i = 0; i < groups * head_dim; i++) qf[i] = bf2f(q[i]) * scale;
    score_blocks(qf, keys, (length + KEY_BLOCK - 1) / KEY_BLOCK, groups, head_dim, scores, stride);
    for (int64_t g = 0; g < groups; g++) softmax(scores + g * stride, length);
    weigh_values(scores, stride, values, length, groups, head_dim, acc);
    for (int64_t i = 0; i < groups * head_dim; i++) o[i] = f2bf(acc[i]);
}

/* Attention of one query token per row over its own slot's first lengths[r] cached positions:
 * decode rows (length = position + 1) and prompt rows alike, so causality is just the length.
 * q is read from qkv rows (the first `heads` heads, already rotated); the heads sharing a kv head
 * are done together so each key and value is read once. out is [rows, heads * head_dim].
 * Softmax in float32; a row's result depends only on that row's query and cache. */
static void attention(const bf16 *qkv, int64_t row_stride, const bf16 *k_cache, const bf16 *v_cache,
                  const int64_t *slots, const int64_t *lengths, int64_t rows, int64_t heads,
                  int64_t kv_heads, int64_t head_dim, int64_t num_slots, int64_t max_len,
                  float scale, bf16 *out, int num_threads) {
    int64_t groups = heads / kv_heads, items = rows * kv_heads, work = 0;
    if (max_len % KEY_BLOCK) return;
    for (int64_t r = 0; r < rows; r++) work += lengths[r] > 0 ? lengths[r] : 0;
    /* waking the other threads costs tens of microseconds: only worth it for enough positions */
    int parallel = num_threads > 1 && items > 1 && work * kv_heads >= PARALLEL_MIN_POSITIONS;
#pragma omp parallel num_threads(num_threads) if (parallel)
    {
        float *qf = malloc(sizeof(float) * (size_t)(groups * head_dim));
        float *acc = malloc(sizeof(float) * (size_t)(groups * head_dim));
        float *scores = malloc(sizeof(float) * (size_t)(groups * max_len));
#pragma omp for schedule(dynamic, 4)
        for (int64_t item = 0; item < items; item++) {
            int64_t r = item / kv_heads, h = item % kv_heads;
            int64_t slot = slots[r], length = lengths[r];
            bf16 *o = out + r * heads * head_dim + h * groups * head_dim;
            if (!qf || !acc || !scores || slot < 0 || slot >= num_slots || length <= 0) {
                memset(o, 0, sizeof(bf16) * (size_t)(groups * head_dim));
                continue;
            }
            if (length > max_len) length = max_len;
            const bf16 *q = qkv + r * row_stride + h * groups * head_dim;
            const bf16 *keys = k_cache + key_offset(slot, h, 0, kv_heads, head_dim, max_len);
            const bf16 *values = v_cache + (slot * kv_heads + h) * max_len * head_dim;
            /* the model's shapes get their own copy with constant sizes: sums in registers */
            if (head_dim == 64 && groups == 3)  /* SmolLM2-135M */
                attend(q, keys, values, length, 3, 64, scale, qf, scores, max_len, acc, o);
            else if (head_dim == 64 && groups == 1)
                attend(q, keys, values, length, 1, 64, scale, qf, scores, max_len, acc, o);
            else if (head_dim == 64 && groups == 2)
                attend(q, keys, values, length, 2, 64, scale, qf, scores, max_len, acc, o);
            else if (head_dim == 64 && groups == 4)
                attend(q, keys, values, length, 4, 64, scale, qf, scores, max_len, acc, o);
            else
                attend(q, keys, values, length, groups, head_dim, scale, qf, scores, max_len, acc,
                       o);
        }
        free(qf);
        free(acc);
        free(scores);
    }
}

/* One layer's attention: rope_store, then attention over the same rows, in one call. */
void lt_rope_attention(bf16 *qkv, const bf16 *cos_table, const bf16 *sin_table,
                       const int64_t *slots, const int64_t *positions, const int64_t *lengths,
                       int64_t rows, int64_t heads, int64_t kv_heads, int64_t head_dim,
                       bf16 *k_cache, bf16 *v_cache, int64_t num_slots, int64_t max_len,
                       float scale, bf16 *out, int num_threads) {
    rope_store(qkv, cos_table, sin_table, slots, positions, rows, heads, kv_heads, head_dim,
                  k_cache, v_cache, num_slots, max_len, num_threads);
    attention(qkv, (heads + 2 * kv_heads) * head_dim, k_cache, v_cache, slots, lengths, rows,
                 heads, kv_heads, head_dim, num_slots, max_len, scale, out, num_threads);
}
