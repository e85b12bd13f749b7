/* The training step's candidate features (dictionary_learning/candidates.py; docs/method.md §3)
 * and the TopK's choice, for the tokens of parts part_lo .. part_hi (csrc/parts.h). Plain C
 * called through ctypes.
 *
 * top_features: each token's K highest pre-activations (fp32), then the next M - K, each part in
 * no set order. Ranks: the larger value first, NaN above every number, -0 as +0, the lower
 * feature first on ties. A radix select: the features above a floor (from the token before) kept,
 * a histogram of their values' top 11 bits; the bins above the K-th's (and then the M-th's) are
 * in whole, and only the features of those two bins are ranked (a sort of a few). One read of
 * the row, where torch's topk keeps a heap per row (~3x slower at F 12288, M 132).
 *
 * random_others: the first n distinct draws outside the token's top M, in draw order (the b-bit
 * fields of random words), found with a mark row of F bytes (zeros on entry and on return); the
 * torch code beside it (which sorts the draws) takes the same features from the same draws. */
#include <stdint.h>
#include <string.h>

#include "parts.h"

#define BIN_SHIFT 21 /* 2^11 bins */

/* The value's bits made to sort as the floats do (-0 as +0, NaN above +inf). */
static inline uint32_t value_key(float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    if (v != v) u = 0x7fc00000u;
    if (u == 0x80000000u) u = 0;
    return u ^ ((uint32_t)((int32_t)u >> 31) | 0x80000000u);
}

/* A feature's rank as one integer: its value's key, then the complement of its index. */
static inline uint64_t rank_key(float v, int64_t f) {
    return (uint64_t)value_key(v) << 32 | (uint32_t)~(uint32_t)f;
}

/* The float whose value_key is k (NaN where k is a NaN's key or below every number's). */
static inline float key_value(uint32_t k) {
    uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
    float v;
    memcpy(&v, &u, sizeof v);
    return v;
}

/* a[0..n) in descending order of their high 32 bits (the value's key), stable: an LSD radix sort
 * by bytes (no comparisons to mispredict). Keys in ascending feature order (as the rows are read)
 * come out in rank order: equal values keep the lower feature first. */
static void sort_desc(uint64_t *a, int64_t n, uint64_t *tmp) {
    uint64_t *src = a, *dst = tmp;
    int64_t count[256];
    for (int shift = 32; shift < 64; shift += 8) {
        memset(count, 0, sizeof count);
        for (int64_t i = 0; i < n; i++) count[(~src[i] >> shift) & 255]++;
        int64_t sum = 0, one_digit = 0;
        for (int d = 0; d < 256; d++) {
            int64_t c = count[d];
            one_digit |= c == n;
            count[d] = sum;
            sum += c;
        }
        if (one_digit) continue;
        for (int64_t i = 0; i < n; i++) dst[count[(~src[i] >> shift) & 255]++] = src[i];
        uint64_t *t = src;
        src = dst, dst = t;
    }
    if (src != a) memcpy(a, src, n * sizeof *a);
}

/* keys a[0..n) in descending order of their high 32 bits, stable: insertion for a few (the cut bin
 * of an unsorted selection, ~10 keys), else `sort_desc` */
static void sort_few_desc(uint64_t *a, int64_t n, uint64_t *tmp) {
    if (n > 32) {
        sort_desc(a, n, tmp);
        return;
    }
    for (int64_t i = 1; i < n; i++) {
        uint64_t k = a[i];
        int64_t j = i;
        for (; j > 0 && (a[j - 1] >> 32) < (k >> 32); j--) a[j] = a[j - 1];
        a[j] = k;
    }
}

/* The bin of a rank key, and the bin holding the m-th highest of the keys counted in hist (with
 * the number above it). */
static inline int64_t bin_of(uint64_t key) { return (int64_t)(key >> (32 + BIN_SHIFT)); }

static inline int64_t cut_bin(const int64_t *hist, int64_t top_bin, int64_t m, int64_t *above) {
    int64_t cut = top_bin;
    *above = 0;
    while (*above + hist[cut] < m) *above += hist[cut--];
    return cut;
}

/* out[b, :K] the top K, out[b, K:M] the next M - K (row stride N), each part in no set order (those
 * of higher bins first, then the ranked ones of the cut bin), for tokens b_lo .. b_hi of pre (row
 * stride S). Scratch: hist [2048] int64 (zeros on entry and on return), ranks [5 F] uint64.
 * Requires 1 <= K <= M <= F < 2^32. */
static void top_rows(int64_t b_lo, int64_t b_hi, int64_t F, int64_t S, int64_t K, int64_t M,
                     int64_t N, const float *pre, int64_t *hist, uint64_t *ranks, int64_t *out) {
    uint64_t *kept = ranks, *in_K = ranks + F, *mid = ranks + 2 * F, *in_M = ranks + 3 * F;
    uint64_t *tmp = ranks + 4 * F;
    uint32_t *at = (uint32_t *)tmp;
    /* A floor below the M-th highest, from the token before (tokens' rows are alike): only the
     * features at or above it are kept, and the work below is on those. A floor too high keeps
     * fewer than M: the row is read again without it. NaN: no floor. */
    float floor = 0.0f / 0.0f;
    for (int64_t b = b_lo; b < b_hi; b++) {
        const float *p = pre + b * S;
        int64_t *o = out + b * N;
        int64_t n_kept = 0;
        for (int pass = 0; pass < 2 && n_kept < M; pass++) {
            /* without a branch (one the CPU would mispredict for every kept feature): every
             * feature written, the count advanced past the kept ones */
            n_kept = 0;
            for (int64_t f = 0; f < F; f++) {
                at[n_kept] = (uint32_t)f;
                n_kept += !(p[f] < floor);
            }
            floor = 0.0f / 0.0f;
        }
        int64_t top_bin = 0;
        for (int64_t q = 0; q < n_kept; q++) {
            kept[q] = rank_key(p[at[q]], at[q]);
            int64_t bin = bin_of(kept[q]);
            hist[bin]++;
            top_bin = bin > top_bin ? bin : top_bin;
        }
        /* the bins of the K-th and the M-th highest (cut_K >= cut_M) */
        int64_t above_K, above_M;
        int64_t cut_K = cut_bin(hist, top_bin, K, &above_K);
        int64_t cut_M = cut_bin(hist, top_bin, M, &above_M);
        for (int64_t q = 0; q < n_kept; q++) hist[bin_of(kept[q])] = 0;
        /* above cut_K: in the top K; cut_K's bin: ranked; between: in the next M - K; cut_M's bin
         * (if below cut_K): ranked */
        int64_t n_top = 0, n_in_K = 0, n_mid = 0, n_in_M = 0;
        const int64_t split = cut_M < cut_K;
        for (int64_t q = 0; q < n_kept; q++) {
            /* each key written to all four, each count advanced where it belongs (no branch) */
            int64_t bin = bin_of(kept[q]);
            o[n_top] = (uint32_t)~(uint32_t)kept[q];
            in_K[n_in_K] = mid[n_mid] = in_M[n_in_M] = kept[q];
            n_top += bin > cut_K;
            n_in_K += bin == cut_K;
            n_mid += (bin > cut_M) & (bin < cut_K);
            n_in_M += (bin == cut_M) & split;
        }
        sort_few_desc(in_K, n_in_K, tmp);
        /* cut_K's bin: its best complete the top K, the rest follow (all of them if cut_M is
         * below, else only as many as the M take) */
        int64_t m = n_top;
        for (int64_t q = 0; q < n_in_K && m < M; q++) o[m++] = (uint32_t)~(uint32_t)in_K[q];
        for (int64_t q = 0; q < n_mid; q++) o[m++] = (uint32_t)~(uint32_t)mid[q];
        if (m < M) {
            sort_few_desc(in_M, n_in_M, tmp);
            for (int64_t q = 0; m < M; q++) o[m++] = (uint32_t)~(uint32_t)in_M[q];
        }
        /* the next token's floor: one bin below this one's cut bin */
        floor = cut_M > 0 ? key_value((uint32_t)(cut_M - 1) << BIN_SHIFT) : floor;
    }
}

/* The top K and the next M - K of B tokens' rows (see top_rows); scratch per part p: hist +
 * 2048 p, ranks + 5 F p. */
void top_features(int64_t part_lo, int64_t part_hi, int64_t n_parts, int64_t B, int64_t F,
                  int64_t S, int64_t K, int64_t M, int64_t N, const float *pre, int64_t *hist,
                  uint64_t *ranks, int64_t *out) {
#pragma omp parallel for schedule(static, 1) num_threads(part_hi - part_lo) \
    if (part_hi - part_lo > 1)
    for (int64_t p = part_lo; p < part_hi; p++)
        top_rows(part_start(B, p, n_parts), part_start(B, p + 1, n_parts), F, S, K, M, N, pre,
                 hist + ((int64_t)1 << (32 - BIN_SHIFT)) * p, ranks + 5 * F * p, out);
}

/* out[b, :n] from the top features top[b * top_stride + m], m < M, for B tokens, and their W random
 * 63-bit words: the draws are each word's `bits`-bit fields, lowest first (those >= F skipped).
 * Scratch per part p: mark + F p (zeros on entry and on return). short_rows[p]: the number of part
 * p's tokens whose draws held fewer than n usable ones (the rest of their row is unset). */
void random_others(int64_t part_lo, int64_t part_hi, int64_t n_parts, int64_t B, int64_t F,
                   int64_t M, const int64_t *top, int64_t top_stride, int64_t W,
                   const int64_t *words, int64_t bits, int64_t n, uint8_t *mark, int64_t *out,
                   int64_t *short_rows) {
    const int64_t per_word = 63 / bits, field = ((int64_t)1 << bits) - 1;
#pragma omp parallel for schedule(static, 1) num_threads(part_hi - part_lo) \
    if (part_hi - part_lo > 1)
    for (int64_t p = part_lo; p < part_hi; p++) {
        uint8_t *mk = mark + F * p;
        short_rows[p] = 0;
        for (int64_t b = part_start(B, p, n_parts); b < part_start(B, p + 1, n_parts); b++) {
            const int64_t *t = top + b * top_stride, *w = words + b * W;
            int64_t *o = out + b * n, got = 0;
            for (int64_t m = 0; m < M; m++) mk[t[m]] = 1;
            for (int64_t r = 0; r < W && got < n; r++)
                for (int64_t c = 0; c < per_word && got < n; c++) {
                    int64_t d = (w[r] >> (c * bits)) & field;
                    if (d >= F || mk[d]) continue;
                    mk[d] = 1;
                    o[got++] = d;
                }
            for (int64_t m = 0; m < M; m++) mk[t[m]] = 0;
            for (int64_t g = 0; g < got; g++) mk[o[g]] = 0;
            short_rows[p] += got < n;
        }
    }
}
