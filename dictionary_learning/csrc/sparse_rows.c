/* Sampled products over a CSR pattern with the table read in cache-sized blocks, fp32
 * (dictionary_learning/sparse_ops.py: blocked_dot, the virtual weights and the candidates' x0
 * term of the pruned pass; docs/method.md §3). Plain C called through ctypes, one call per thread
 * on its own rows; each output row or entry is written by one thread in a fixed order, so the
 * results do not depend on the thread count.
 *
 *   rows_dot:   out[q]  = A[r] . T[cols[q]]           for the entries q of row r
 *   rows_axpy:  out[r]  = sum over q of g[q] T[cols[q]]
 *
 * Why blocks: the table T (an upstream decoder, 37-113 MB at gpt2-small widths) does not fit the
 * cache, and random rows of it cost a trip to memory each (memory-bound: ~23 GB/s here). The
 * table comes in blocks of rows [lo, hi) that fit the L3 cache; every row's entries in that block
 * are done before the next block, a per-row cursor keeping its place (columns ascend within a
 * row). T is read from memory once per call and A once per block.
 *
 * Blocks may come from several tensors (one per upstream dictionary): block k covers the
 * columns [lo_k, hi_k) of the pattern, found at blk_table[k] + (col - blk_off[k]) * D. Columns
 * in no block (the padding index) are skipped: their out entries stay as the caller set them. */
#include <stdint.h>

#define LANES 16

/* LANES partial sums: one would wait on each addition's latency; summed pairwise at the end. */
static inline float dot(const float *a, const float *b, int64_t D) {
    float s[LANES] = {0};
    int64_t d = 0;
    for (; d + LANES <= D; d += LANES)
        for (int k = 0; k < LANES; k++) s[k] += a[d + k] * b[d + k];
    for (; d < D; d++) s[d % LANES] += a[d] * b[d];
    for (int w = LANES / 2; w >= 1; w /= 2)
        for (int k = 0; k < w; k++) s[k] += s[k + w];
    return s[0];
}

/* An AVX2 build beside the portable one, picked at load time on x86-64 Linux (the same
 * operations in the same order: the same results); elsewhere the portable one alone. */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

CLONES
void rows_dot(int64_t r_lo, int64_t r_hi, int64_t D, const int64_t *row_ptr, const int64_t *cols,
              const int64_t *out_pos, const float *A, int64_t nb, const int64_t *blk_lo,
              const int64_t *blk_hi, const int64_t *blk_off, const float *const *blk_table,
              int64_t *cursor, float *out) {
    for (int64_t r = r_lo; r < r_hi; r++) cursor[r] = row_ptr[r];
    for (int64_t k = 0; k < nb; k++) {
        int64_t lo = blk_lo[k], hi = blk_hi[k], off = blk_off[k];
        const float *T = blk_table[k];
        for (int64_t r = r_lo; r < r_hi; r++) {
            const float *a = A + r * D;
            int64_t q = cursor[r], end = row_ptr[r + 1];
            for (; q < end && cols[q] < hi; q++)
                if (cols[q] >= lo) out[out_pos ? out_pos[q] : q] = dot(a, T + (cols[q] - off) * D, D);
            cursor[r] = q;
        }
    }
}

/* out[r] (D floats, written here: rows without entries become 0) = sum over the row's entries q
 * in order of g[g_pos ? g_pos[q] : q] * T[cols[q]]. */
CLONES
void rows_axpy(int64_t r_lo, int64_t r_hi, int64_t D, const int64_t *row_ptr, const int64_t *cols,
               const int64_t *g_pos, const float *g, int64_t nb, const int64_t *blk_lo,
               const int64_t *blk_hi, const int64_t *blk_off, const float *const *blk_table,
               int64_t *cursor, float *out) {
    for (int64_t r = r_lo; r < r_hi; r++) {
        cursor[r] = row_ptr[r];
        for (int64_t d = 0; d < D; d++) out[r * D + d] = 0;
    }
    for (int64_t k = 0; k < nb; k++) {
        int64_t lo = blk_lo[k], hi = blk_hi[k], off = blk_off[k];
        const float *T = blk_table[k];
        for (int64_t r = r_lo; r < r_hi; r++) {
            float *restrict o = out + r * D;
            int64_t q = cursor[r], end = row_ptr[r + 1];
            for (; q < end && cols[q] < hi; q++) {
                if (cols[q] < lo) continue;
                const float gq = g[g_pos ? g_pos[q] : q];
                const float *restrict t = T + (cols[q] - off) * D;
                for (int64_t d = 0; d < D; d++) o[d] += gq * t[d];
            }
            cursor[r] = q;
        }
    }
}
