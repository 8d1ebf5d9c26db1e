/* Fused bf16 kernels for the CPU decode path of llmtree's Llama forward.
 *
 * Eager PyTorch spends most of a small decode step dispatching tiny operators (an RMS norm is
 * seven of them, rotary embedding four, a cache write two more); on a two-core CPU each costs
 * 5-15 us whatever its size. These kernels do each of those jobs in one pass, with the same
 * rounding steps as the PyTorch code they replace (every intermediate that PyTorch rounds to
 * bf16 is rounded here too). Rotary embedding with the cache write, and attention, are in
 * cpu_attention.c.
 *
 * Built once per machine by llmtree/engine/kernel_build.py (cc -O3 -march=native -fopenmp),
 * called through ctypes (native.py). Threads come from the OpenMP runtime PyTorch already
 * loaded (same soname), so the kernels share PyTorch's thread pool instead of adding one.
 */

#include "cpu_bf16.h"

static void rms_row(const bf16 *x, const bf16 *w, bf16 *out, int64_t dim, float eps) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < dim; i++) {
        float f = bf2f(x[i]);
        sum += f * f;
    }
    float r = 1.0f / sqrtf(sum / (float)dim + eps);
#pragma omp simd
    for (int64_t i = 0; i < dim; i++) out[i] = f2bf(bf2f(f2bf(bf2f(x[i]) * r)) * bf2f(w[i]));
}

/* out[r] = rms_norm(x[r]) * w, Hugging Face's order: float32 norm, rounded, times the weight. */

void lt_rms_norm(const bf16 *x, int64_t x_stride, const bf16 *w, bf16 *out, int64_t rows,
                 int64_t dim, float eps, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (num_threads > 1 && rows >= PARALLEL_MIN_ROWS)
    for (int64_t r = 0; r < rows; r++) rms_row(x + r * x_stride, w, out + r * dim, dim, eps);
}

/* x += delta (the residual, in place), then out = rms_norm(x) * w. */
void lt_add_rms_norm(bf16 *x, const bf16 *delta, const bf16 *w, bf16 *out, int64_t rows,
                     int64_t dim, float eps, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (num_threads > 1 && rows >= PARALLEL_MIN_ROWS)
    for (int64_t r = 0; r < rows; r++) {
        bf16 *xr = x + r * dim;
        const bf16 *dr = delta + r * dim;
#pragma omp simd
        for (int64_t i = 0; i < dim; i++) xr[i] = f2bf(bf2f(xr[i]) + bf2f(dr[i]));
        rms_row(xr, w, out + r * dim, dim, eps);
    }
}

/* out = silu(gate) * up, where each row of gate_up is [gate | up]. */
void lt_silu_mul(const bf16 *gate_up, bf16 *out, int64_t rows, int64_t inter, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (num_threads > 1 && rows >= PARALLEL_MIN_ROWS)
    for (int64_t r = 0; r < rows; r++) {
        const bf16 *restrict g = gate_up + r * 2 * inter;
        const bf16 *restrict u = g + inter;
        bf16 *restrict o = out + r * inter;
        for (int64_t i = 0; i < inter; i++) {
            float x = bf2f(g[i]);
            float s = bf2f(f2bf(x / (1.0f + fexp(-x))));
            o[i] = f2bf(s * bf2f(u[i]));
        }
    }
}

/* Index of the first largest value of each row (greedy decoding). bf16 values are mapped to
 * unsigned keys that sort like the numbers, so the maximum is an integer reduction that
 * vectorises; a second pass finds where it first occurs. */
static inline uint16_t order_key(bf16 b) {
    return (uint16_t)((b & 0x8000u) ? (uint16_t)~b : (uint16_t)(b | 0x8000u));
}

void lt_argmax(const bf16 *logits, int64_t rows, int64_t vocab, int64_t *out) {
    for (int64_t r = 0; r < rows; r++) {
        const bf16 *row = logits + r * vocab;
        uint16_t best = 0;
        for (int64_t i = 0; i < vocab; i++) {
            uint16_t key = order_key(row[i]);
            best = key > best ? key : best;
        }
        int64_t index = 0;
        for (int64_t i = 0; i < vocab; i++) {
            if (order_key(row[i]) == best) {
                index = i;
                break;
            }
        }
        out[r] = index;
    }
}
