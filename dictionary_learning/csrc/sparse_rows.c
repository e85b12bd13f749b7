/* Sampled products over a CSR pattern with the table read in cache-sized blocks, fp32
 * (dictionary_learning/sparse_ops.py: _BlockedDot, for the virtual weights and the candidates'
 * x0 term of the pruned pass; docs/method.md §3). Plain C called through ctypes, for the rows of
 * parts part_lo .. part_hi (csrc/parts.h: ranges of about equal entries); each output entry or
 * row is written by one part in a fixed order, so the results do not depend on the thread count.
 *
 *   rows_dot:   out[q] = A[r] . T[cols[q]]             for the entries q of row r
 *   rows_axpy:  out[r] = sum over q of g[q] T[cols[q]]  (entries with g[q] = 0 skipped)
 *   by_feature: the pattern of a [B, N] table of feature indices, by feature (a counting sort)
 *
 * The table T may be several tensors' rows one after the other (the decoders of a transcoder's
 * upstream modules, for its virtual weights in one call): tables[u] holds rows T_lo[u] ..
 * T_lo[u + 1] - 1.
 *
 * Why blocks: the table T (an upstream decoder, 37-75 MB at gpt2-small widths) does not fit the
 * cache, and a random row of it costs a trip to memory (~23 GB/s here, against ~40 from L3). T is
 * taken in blocks of block_rows rows; every row's entries in a block are done before the next
 * block, a per-row cursor keeping its place (columns ascend within a row). T is then read from
 * memory once per call and A (or out) once per block. One block of all rows: columns in any
 * order. */
#include <stdint.h>
#include <string.h>

#include "parts.h"

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

/* Row t of the tables (T_lo ascending, t < T_lo[n_tables]). */
static inline const float *table_row(const float *const *T, const int64_t *T_lo,
                                     int64_t n_tables, int64_t t, int64_t D) {
    int64_t u = 0;
    while (u + 1 < n_tables && t >= T_lo[u + 1]) u++;
    return T[u] + (t - T_lo[u]) * D;
}

CLONES
static void dot_rows(int64_t r_lo, int64_t r_hi, int64_t D, const int64_t *row_ptr,
                     const int64_t *cols, const int64_t *out_pos, const float *A,
                     const float *const *T, const int64_t *T_lo, int64_t n_tables,
                     int64_t block_rows, int64_t *cursor, float *out) {
    for (int64_t r = r_lo; r < r_hi; r++) cursor[r] = row_ptr[r];
    for (int64_t lo = 0; lo < T_lo[n_tables]; lo += block_rows) {
        int64_t hi = lo + block_rows;
        for (int64_t r = r_lo; r < r_hi; r++) {
            const float *a = A + r * D;
            int64_t q = cursor[r], end = row_ptr[r + 1];
            for (; q < end && cols[q] < hi; q++)
                out[out_pos ? out_pos[q] : q] = dot(a, table_row(T, T_lo, n_tables, cols[q], D),
                                                    D);
            cursor[r] = q;
        }
    }
}

/* out[r] (D floats, written here: rows without entries become 0) = the sum over the row's
 * entries q, in order, of g[g_pos ? g_pos[q] : q] * T[cols[q]]. */
CLONES
static void axpy_rows(int64_t r_lo, int64_t r_hi, int64_t D, const int64_t *row_ptr,
                      const int64_t *cols, const int64_t *g_pos, const float *g,
                      const float *const *T, const int64_t *T_lo, int64_t n_tables,
                      int64_t block_rows, int64_t *cursor, float *out) {
    for (int64_t r = r_lo; r < r_hi; r++) {
        cursor[r] = row_ptr[r];
        for (int64_t d = 0; d < D; d++) out[r * D + d] = 0;
    }
    for (int64_t lo = 0; lo < T_lo[n_tables]; lo += block_rows) {
        int64_t hi = lo + block_rows;
        for (int64_t r = r_lo; r < r_hi; r++) {
            float *restrict o = out + r * D;
            int64_t q = cursor[r], end = row_ptr[r + 1];
            for (; q < end && cols[q] < hi; q++) {
                const float gq = g[g_pos ? g_pos[q] : q];
                /* most gradients are 0 (candidates not chosen, connections to upstream features
                 * that never fired with the feature): they add nothing, skip their rows */
                if (gq == 0) continue;
                const float *restrict t = table_row(T, T_lo, n_tables, cols[q], D);
                for (int64_t d = 0; d < D; d++) o[d] += gq * t[d];
            }
            cursor[r] = q;
        }
    }
}

typedef void rows_fn(int64_t, int64_t, int64_t, const int64_t *, const int64_t *,
                     const int64_t *, const float *, const float *const *, const int64_t *,
                     int64_t, int64_t, int64_t *, float *);

/* fn over the R rows of the pattern, by parts; cursor [R] scratch */
static void by_parts(rows_fn *fn, int64_t part_lo, int64_t part_hi, int64_t n_parts, int64_t R,
                     int64_t D, const int64_t *row_ptr, const int64_t *cols, const int64_t *pos,
                     const float *X, const float *const *T, const int64_t *T_lo,
                     int64_t n_tables, int64_t block_rows, int64_t *cursor, float *out) {
#pragma omp parallel for schedule(static, 1) num_threads(part_hi - part_lo) \
    if (part_hi - part_lo > 1)
    for (int64_t p = part_lo; p < part_hi; p++)
        fn(part_start_by_entries(row_ptr, R, p, n_parts),
           part_start_by_entries(row_ptr, R, p + 1, n_parts), D, row_ptr, cols, pos, X, T, T_lo,
           n_tables, block_rows, cursor, out);
}

void rows_dot(int64_t part_lo, int64_t part_hi, int64_t n_parts, int64_t R, int64_t D,
              const int64_t *row_ptr, const int64_t *cols, const int64_t *out_pos,
              const float *A, const float *const *T, const int64_t *T_lo, int64_t n_tables,
              int64_t block_rows, int64_t *cursor, float *out) {
    by_parts(dot_rows, part_lo, part_hi, n_parts, R, D, row_ptr, cols, out_pos, A, T, T_lo,
             n_tables, block_rows, cursor, out);
}

void rows_axpy(int64_t part_lo, int64_t part_hi, int64_t n_parts, int64_t R, int64_t D,
               const int64_t *row_ptr, const int64_t *cols, const int64_t *g_pos, const float *g,
               const float *const *T, const int64_t *T_lo, int64_t n_tables, int64_t block_rows,
               int64_t *cursor, float *out) {
    by_parts(axpy_rows, part_lo, part_hi, n_parts, R, D, row_ptr, cols, g_pos, g, T, T_lo,
             n_tables, block_rows, cursor, out);
}

/* The entries e = b N + n of cand [B, N] (features in [0, F)) by feature, tokens ascending within
 * a feature (a stable counting sort): row_ptr [F + 1], tok[q] = b and pos[q] = e of entry q. With
 * g (NULL: all entries), only those whose g[e] is not 0. cursor: [F] scratch. Returns the number
 * of entries, or -1 if a feature is outside [0, F) (nothing else is then valid). */
int64_t by_feature(int64_t B, int64_t N, int64_t F, const int64_t *cand, const float *g,
                   int64_t *row_ptr, int64_t *cursor, int64_t *tok, int64_t *pos) {
    memset(row_ptr, 0, (F + 1) * sizeof *row_ptr);
    for (int64_t e = 0; e < B * N; e++) {
        if (cand[e] < 0 || cand[e] >= F) return -1;
        row_ptr[cand[e] + 1] += !g || g[e] != 0;
    }
    for (int64_t f = 0; f < F; f++) row_ptr[f + 1] += row_ptr[f];
    memcpy(cursor, row_ptr, F * sizeof *cursor);
    for (int64_t e = 0; e < B * N; e++) {
        if (g && g[e] == 0) continue;
        int64_t q = cursor[cand[e]]++;
        tok[q] = e / N;
        pos[q] = e;
    }
    return row_ptr[F];
}
