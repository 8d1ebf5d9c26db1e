/* The decoder layers of llmtree's Llama forward in one call: the loop of
 * LlamaForward._forward_native, kernel for kernel, without going back to Python between them.
 *
 * A decode step of SmolLM2-135M makes about 240 kernel calls; from Python each costs a ctypes
 * call and the Python around it (a few microseconds each, about 2 ms of a 13 ms one-row step).
 * Here the same kernels run in the same order on the same buffers, so the result is the Python
 * loop's, bit for bit. Built with the other kernels into one library (kernel_build.py); driven
 * by native_layers.py, which only uses it where every product of every layer has its AMX form
 * (and its 4-bit form when a step asks for it) and no bias.
 */

#include <stdint.h>

typedef uint16_t bf16;

/* From cpu_kernels.c and cpu_matmul.c. */
void lt_add_rms_norm(bf16 *x, const bf16 *delta, const bf16 *w, bf16 *out, int64_t rows,
                     int64_t dim, float eps, int num_threads);
void lt_silu_mul(const bf16 *gate_up, bf16 *out, int64_t rows, int64_t inter, int num_threads);
void lt_rope_attention(bf16 *qkv, const bf16 *cos_table, const bf16 *sin_table,
                       const int64_t *slots, const int64_t *positions, const int64_t *lengths,
                       int64_t rows, int64_t heads, int64_t kv_heads, int64_t head_dim,
                       bf16 *k_cache, bf16 *v_cache, int64_t num_slots, int64_t max_len,
                       float scale, bf16 *out, int num_threads);
void lt_amx_linear(const bf16 *a, int64_t lda, int64_t m, const bf16 *packed, int64_t n, int64_t k,
                   bf16 *out, int64_t ldo, int num_threads);
void lt_q4_linear(const bf16 *x, int64_t ldx, int64_t m, const uint8_t *packed, int64_t n,
                  int64_t k, bf16 *out, int64_t ldo, int num_threads);

/* One weight: its AMX tile form, and its 4-bit form or NULL. out_features x in_features. */
typedef struct {
    const bf16 *amx;
    const uint8_t *q4;
    int64_t n, k;
} lt_weight;

/* One layer. next_norm is the next layer's input norm; the model's final norm for the last. */
typedef struct {
    lt_weight qkv, o, gate_up, down;
    const bf16 *post_norm, *next_norm;
    bf16 *k_cache, *v_cache;
} lt_layer;

/* The step's shapes and the buffers it works in (contiguous rows, made by the caller). */
typedef struct {
    int64_t rows, small; /* rows, and how many of the first take the 4-bit forms */
    int64_t heads, kv_heads, head_dim, num_slots, max_len, hidden_size, inter;
    float scale, eps;
    const bf16 *cos, *sin;
    const int64_t *slots, *positions, *lengths;
    bf16 *x, *hidden, *qkv, *attention, *delta, *gate_up, *activation;
} lt_step;

/* out = x @ w^T as Linear computes it: the first `small` rows by the 4-bit form, the rest on AMX. */
static void product(const lt_weight *w, const bf16 *x, int64_t rows, int64_t small, bf16 *out,
                    int num_threads) {
    if (small > 0) {
        if (small > rows) small = rows;
        lt_q4_linear(x, w->k, small, w->q4, w->n, w->k, out, w->n, num_threads);
        x += small * w->k, out += small * w->n, rows -= small;
    }
    if (rows > 0) lt_amx_linear(x, w->k, rows, w->amx, w->n, w->k, out, w->n, num_threads);
}

/* x is the residual stream on entry and hidden its first layer's input norm; on return x is the
 * residual after the last layer and hidden its final norm (every row: the caller picks the rows
 * it samples, whose values are those of a norm of those rows alone). Returns 0, or -1, having
 * computed nothing, when a weight lacks the form the step asks for. */
int lt_layers(const lt_layer *layers, int64_t count, const lt_step *s, int num_threads) {
    for (int64_t i = 0; i < count; i++) {
        const lt_layer *l = &layers[i];
        if (!l->qkv.amx || !l->o.amx || !l->gate_up.amx || !l->down.amx || !l->next_norm)
            return -1;
        if (s->small > 0 && (!l->qkv.q4 || !l->o.q4 || !l->gate_up.q4 || !l->down.q4)) return -1;
    }
    int64_t rows = s->rows, small = s->small;
    for (int64_t i = 0; i < count; i++) {
        const lt_layer *l = &layers[i];
        product(&l->qkv, s->hidden, rows, small, s->qkv, num_threads);
        lt_rope_attention(s->qkv, s->cos, s->sin, s->slots, s->positions, s->lengths, rows,
                          s->heads, s->kv_heads, s->head_dim, l->k_cache, l->v_cache,
                          s->num_slots, s->max_len, s->scale, s->attention, num_threads);
        product(&l->o, s->attention, rows, small, s->delta, num_threads);
        lt_add_rms_norm(s->x, s->delta, l->post_norm, s->hidden, rows, s->hidden_size, s->eps,
                        num_threads);
        product(&l->gate_up, s->hidden, rows, small, s->gate_up, num_threads);
        lt_silu_mul(s->gate_up, s->activation, rows, s->inter, num_threads);
        product(&l->down, s->activation, rows, small, s->delta, num_threads);
        lt_add_rms_norm(s->x, s->delta, l->next_norm, s->hidden, rows, s->hidden_size, s->eps,
                        num_threads);
    }
    return 0;
}
