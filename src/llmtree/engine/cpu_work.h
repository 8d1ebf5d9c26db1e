/* What the matrix products share (cpu_matmul.c, cpu_quant.c): the blocks of work a thread takes
 * from its own range first and from another's when done (and, from cpu_bf16.h, the bf16
 * conversions every kernel uses). */

#ifndef LLMTREE_CPU_WORK_H
#define LLMTREE_CPU_WORK_H

#include <omp.h>
#include <stdatomic.h>

#include "cpu_bf16.h" /* bf16, bf2f, f2bf */

#define MAX_THREADS 256

/* A thread's blocks of work [lo, hi) in one word, so that taking one is a single compare-and-swap. */
static inline uint64_t pack_range(int64_t lo, int64_t hi) { return (uint64_t)hi << 32 | (uint64_t)lo; }

/* Called by every thread of a parallel region, with one range slot per thread: gives the calling
 * thread its even share of `blocks` work blocks, and waits until every thread has its share. */
static inline void share_blocks(_Atomic uint64_t *ranges, int64_t blocks) {
    int me = omp_get_thread_num(), team = omp_get_num_threads();
    atomic_store_explicit(&ranges[me], pack_range(blocks * me / team, blocks * (me + 1) / team),
                          memory_order_relaxed);
#pragma omp barrier
}

/* The next block for the calling thread: the front of its own range, else (its range done) the
 * back of another's. A thread the OS preempts mid-step would otherwise hold the whole step up at
 * the join while the other core idles: on a machine shared with the gateway, the root and other
 * workers, the others take over its remaining blocks instead. -1 when no block is left. */
static inline int64_t claim_block(_Atomic uint64_t *ranges) {
    int me = omp_get_thread_num(), team = omp_get_num_threads();
    for (int i = 0; i < team; i++) {
        int owner = (me + i) % team;
        uint64_t range = atomic_load_explicit(&ranges[owner], memory_order_relaxed);
        for (;;) {
            int64_t lo = (int64_t)(range & 0xffffffffu), hi = (int64_t)(range >> 32);
            if (lo >= hi) break;
            int own = owner == me;
            uint64_t taken = own ? pack_range(lo + 1, hi) : pack_range(lo, hi - 1);
            if (atomic_compare_exchange_weak_explicit(&ranges[owner], &range, taken,
                                                      memory_order_relaxed, memory_order_relaxed))
                return own ? lo : hi - 1;
        }
    }
    return -1;
}

#endif
