/* bf16 matrix products on Intel AMX for llmtree's CPU forward: y[m, n] = x[m, k] @ w[n, k]^T.
 *
 * A decode step multiplies a few rows by every weight of the model, so it is bound by reading the
 * weights: each one should come from memory once per step, at the memory's speed, and the call
 * itself should cost nothing. oneDNN's packed products get about 6 GB/s out of this machine's
 * 15 at 32 rows and cost tens of microseconds a call; these reach its streaming speed.
 *
 * The weight is packed once (lt_amx_pack) into the tile layout the AMX unit reads: for every
 * block of 32 output columns and every 32 inputs, two 1 KiB tiles (16 columns each) of 16 rows,
 * where row r holds inputs 2r and 2r+1 of each column side by side (the "VNNI" pairs). A thread
 * owns a range of whole column blocks, so it streams its part of the weight front to back, and
 * when done takes blocks from the back of a range not done yet (claim_block): a thread the OS
 * preempts for the gateway or the root no longer stalls the whole step (measured with a process
 * busy 0.7 ms in every 4.7 beside the engine: 32-row steps 1.07-1.12x faster, alone 1.0x); software
 * prefetch keeps PREFETCH_AHEAD blocks of 32 inputs in flight, which the hardware prefetcher
 * alone does not (measured: 24 -> 17 ms for a 32-row step). Rows are taken 32 at a time
 * (2 x 2 tiles of 16 x 16 float sums), the weight tiles of a column block staying in L2 for the
 * next 32 rows. Sums are float32, rounded once to bf16 (nearest even), as oneDNN does.
 *
 * Built with cpu_kernels.c, cpu_quant.c and cpu_layers.c into one library by
 * llmtree/engine/kernel_build.py; lt_amx_init() says whether this CPU and kernel let the process
 * use AMX, and the caller keeps oneDNN otherwise.
 */

#include "cpu_work.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define PREFETCH_AHEAD 4

typedef struct __attribute__((aligned(64))) {
    uint8_t palette, start_row;
    uint8_t reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} tile_config;

/* 0 when this thread's process may use the AMX tiles (Linux asks each process to request them). */
int lt_amx_init(void) { return (int)syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); }

/* w [n, k] row-major -> packed [n / 32][k / 32][2][16][16][2]; n and k are multiples of 32. */
void lt_amx_pack(const bf16 *w, int64_t n, int64_t k, bf16 *packed) {
    int64_t k_blocks = k / 32;
    for (int64_t nb = 0; nb < n / 32; nb++)
        for (int64_t kb = 0; kb < k_blocks; kb++)
            for (int64_t half = 0; half < 2; half++) {
                bf16 *tile = packed + ((nb * k_blocks + kb) * 2 + half) * 512;
                const bf16 *src = w + (nb * 32 + half * 16) * k + kb * 32;
                for (int64_t r = 0; r < 16; r++)
                    for (int64_t c = 0; c < 16; c++) {
                        tile[r * 32 + c * 2] = src[c * k + 2 * r];
                        tile[r * 32 + c * 2 + 1] = src[c * k + 2 * r + 1];
                    }
            }
}

/* Rounds the first `rows` rows of a 16 x 16 float tile to bf16 into out (row stride ldo). */
static inline void store_rows(const float *sums, bf16 *out, int64_t ldo, int64_t rows) {
    for (int64_t r = 0; r < rows; r++) {
        __m256bh v = _mm512_cvtneps_pbh(_mm512_load_ps(sums + r * 16));
        _mm256_storeu_si256((__m256i *)(out + r * ldo), (__m256i)v);
    }
}

static inline void prefetch_block(const bf16 *block) {
    const char *p = (const char *)block;
    for (int line = 0; line < 2048; line += 64) _mm_prefetch(p + line, _MM_HINT_T0);
}

/* out[m, n] (row stride ldo) = a[m, k] (row stride lda) @ w^T, w packed by lt_amx_pack. The caller
 * has had lt_amx_init() return 0. Any m >= 1; n and k multiples of 32. */
void lt_amx_linear(const bf16 *a, int64_t lda, int64_t m, const bf16 *packed, int64_t n, int64_t k,
                   bf16 *out, int64_t ldo, int num_threads) {
    int64_t k_blocks = k / 32, n_blocks = n / 32;
    int64_t full = m / 16, tail = m % 16, tiles = full + (tail > 0);
    /* the last, partial tile of rows is read from a zero-padded copy: a tile load reads 16 rows */
    bf16 *padded = NULL;
    if (tail) {
        padded = aligned_alloc(64, (size_t)(16 * k) * sizeof(bf16));
        if (!padded) return;
        memset(padded, 0, (size_t)(16 * k) * sizeof(bf16));
        for (int64_t r = 0; r < tail; r++)
            memcpy(padded + r * k, a + (full * 16 + r) * lda, (size_t)k * sizeof(bf16));
    }
    _Atomic uint64_t ranges[MAX_THREADS];
    if (num_threads > MAX_THREADS) num_threads = MAX_THREADS;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1 && n_blocks > 1)
    {
        tile_config config = {0};
        config.palette = 1;
        for (int t = 0; t < 8; t++) {
            config.rows[t] = 16;
            config.bytes_per_row[t] = 64;
        }
        _tile_loadconfig(&config);
        float sums[4][256] __attribute__((aligned(64)));
        share_blocks(ranges, n_blocks);
        for (int64_t nb; (nb = claim_block(ranges)) >= 0;) {
            const bf16 *w = packed + nb * k_blocks * 1024;
            for (int64_t t = 0; t < tiles; t += 2) {
                int two = t + 1 < tiles;
                const bf16 *a0 = t < full ? a + t * 16 * lda : padded;
                const bf16 *a1 = t + 1 < full ? a + (t + 1) * 16 * lda : padded;
                int64_t s0 = (t < full ? lda : k) * 2, s1 = (t + 1 < full ? lda : k) * 2;
                _tile_zero(4);
                _tile_zero(5);
                _tile_zero(6);
                _tile_zero(7);
                for (int64_t kb = 0; kb < k_blocks; kb++) {
                    prefetch_block(w + (kb + PREFETCH_AHEAD) * 1024);
                    _tile_loadd(2, w + kb * 1024, 64);
                    _tile_loadd(3, w + kb * 1024 + 512, 64);
                    _tile_loadd(0, a0 + kb * 32, s0);
                    _tile_dpbf16ps(4, 0, 2);
                    _tile_dpbf16ps(5, 0, 3);
                    if (two) {
                        _tile_loadd(1, a1 + kb * 32, s1);
                        _tile_dpbf16ps(6, 1, 2);
                        _tile_dpbf16ps(7, 1, 3);
                    }
                }
                bf16 *o = out + t * 16 * ldo + nb * 32;
                int64_t rows0 = t < full ? 16 : tail;
                _tile_stored(4, sums[0], 64);
                _tile_stored(5, sums[1], 64);
                store_rows(sums[0], o, ldo, rows0);
                store_rows(sums[1], o + 16, ldo, rows0);
                if (two) {
                    int64_t rows1 = t + 1 < full ? 16 : tail;
                    _tile_stored(6, sums[2], 64);
                    _tile_stored(7, sums[3], 64);
                    store_rows(sums[2], o + 16 * ldo, ldo, rows1);
                    store_rows(sums[3], o + 16 * ldo + 16, ldo, rows1);
                }
            }
        }
        _tile_release();
    }
    free(padded);
}

#else /* no AMX in this compiler or CPU: the caller keeps oneDNN */

int lt_amx_init(void) { return -1; }

void lt_amx_pack(const bf16 *w, int64_t n, int64_t k, bf16 *packed) {
    (void)w, (void)n, (void)k, (void)packed;
}

void lt_amx_linear(const bf16 *a, int64_t lda, int64_t m, const bf16 *packed, int64_t n, int64_t k,
                   bf16 *out, int64_t ldo, int num_threads) {
    (void)a, (void)lda, (void)m, (void)packed, (void)n, (void)k, (void)out, (void)ldo;
    (void)num_threads;
}

#endif
