/* Top C upstream connections of downstream features from their co-active virtual weights
 * (docs/method.md §4). Plain C, called through ctypes by find_top_connections.py, which keeps the
 * torch route beside it as the reference: the same fp32 operations in the same order, so the
 * same values bit for bit. Build without -ffast-math and with -ffp-contract=off (no fused
 * multiply-add, no reciprocal for the division).
 *
 * For each downstream feature i of f_lo..f_hi:
 *   1. a[g] = sum over its active slots s (tokens in order) of the token's upstream values:
 *      sums[up_g[t, a]] += up_val[t, a] for every upstream slot a of token t = tok[s];
 *   2. I = V[s, a] * a[g] / n_f[i] at the last slot where g occurs, then a[g] = 0: the scratch
 *      row is all zeros again after the feature, and an earlier occurrence of g gives I = 0,
 *      which is no connection;
 *   3. the c largest |I| > 0 kept in a heap: larger first and, for equal values, the lower
 *      column first, also at the cut (the rule of _topk_rows); rows with fewer pad with 0 / -1.
 */
#include <math.h>
#include <stdint.h>

typedef struct {
    float v;
    int64_t g;
} entry;

/* x ranks below y: a smaller value, or the same value and a larger column */
static inline int worse(entry x, entry y) { return x.v < y.v || (x.v == y.v && x.g > y.g); }

/* the heap keeps its worst entry at the root */
static void sift_down(entry *h, int64_t n, int64_t i) {
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, w = i;
        if (l < n && worse(h[l], h[w])) w = l;
        if (r < n && worse(h[r], h[w])) w = r;
        if (w == i) return;
        entry t = h[i];
        h[i] = h[w];
        h[w] = t;
        i = w;
    }
}

static void sift_up(entry *h, int64_t i) {
    while (i > 0) {
        int64_t p = (i - 1) / 2;
        if (!worse(h[i], h[p])) return;
        entry t = h[i];
        h[i] = h[p];
        h[p] = t;
        i = p;
    }
}

/* start: F + 1 slot offsets of the features; tok: [S] token of each slot (sorted by feature);
 * V: [n, A] co-active weights of slots r0..r0 + n; up_val, up_g: [T, A] upstream values / sigma
 * and their global columns; n_f: [F] tokens where each feature is active (at least 1);
 * sums: [G] zeros (scratch, zeros again on return); heap: [c];
 * out_v, out_g: [f_hi - f_lo, c]. */
void coactive_top(int64_t f_lo, int64_t f_hi, const int64_t *start, const int64_t *tok,
                  int64_t r0, const float *V, int64_t A, const float *up_val,
                  const int32_t *up_g, const float *n_f, int64_t c, float *sums, entry *heap,
                  float *out_v, int64_t *out_g) {
    for (int64_t i = f_lo; i < f_hi; i++) {
        int64_t s0 = start[i], s1 = start[i + 1], n = 0;
        for (int64_t s = s0; s < s1; s++) {
            const float *val = up_val + tok[s] * A;
            const int32_t *g = up_g + tok[s] * A;
            for (int64_t a = 0; a < A; a++) sums[g[a]] += val[a];
        }
        /* the last token first: a pair co-active on several tokens takes the V of its last
         * one, as the torch route's writes in token order leave it (the GEMM's rounding can
         * differ between token batches of other shapes) */
        for (int64_t s = s1 - 1; s >= s0; s--) {
            const float *v = V + (s - r0) * A;
            const int32_t *g = up_g + tok[s] * A;
            for (int64_t a = 0; a < A; a++) {
                float prod = v[a] * sums[g[a]];
                entry e = {fabsf(prod / n_f[i]), g[a]};
                sums[g[a]] = 0;
                if (!(e.v > 0)) continue;
                if (n < c) {
                    heap[n] = e;
                    sift_up(heap, n++);
                } else if (c > 0 && worse(heap[0], e)) {
                    heap[0] = e;
                    sift_down(heap, n, 0);
                }
            }
        }
        float *ov = out_v + (i - f_lo) * c;
        int64_t *og = out_g + (i - f_lo) * c;
        for (int64_t m = n; m < c; m++) {
            ov[m] = 0;
            og[m] = -1;
        }
        /* pop the worst to the back: best first */
        for (int64_t m = n; m > 0; m--) {
            ov[m - 1] = heap[0].v;
            og[m - 1] = heap[0].g;
            heap[0] = heap[m - 1];
            sift_down(heap, m - 1, 0);
        }
    }
}
