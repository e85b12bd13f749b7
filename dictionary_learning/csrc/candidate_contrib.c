/* The pruned pass's connection term at each token's candidate features, and its gradients
 * (dictionary_learning/sparse_ops.py: _CandidateContrib; docs/method.md §3), fp32, for a range
 * of tokens b_lo..b_hi. Plain C called through ctypes, one call per thread on its own tokens;
 * the torch kernel beside it is the reference (the sums over connections add in another order,
 * so the two agree to fp32 rounding, not bit for bit).
 *
 *   out[b, n] = sum_c V[f, c] * table_b[J[f, c]],   f = cand[b, n],
 *
 * table_b the token's upstream activations scattered into a row of G = n_up + 1 (column n_up is
 * the padding of J, always 0), built in a scratch row and cleared after the token, so nothing of
 * size [b, N, C] is formed. */
#include <stdint.h>

void candidate_forward(int64_t b_lo, int64_t b_hi, int64_t N, int64_t A, int64_t C,
                       const float *vals, const int64_t *idx, const float *V, const int64_t *J,
                       const int64_t *cand, float *table, float *out) {
    for (int64_t b = b_lo; b < b_hi; b++) {
        const float *val = vals + b * A;
        const int64_t *id = idx + b * A;
        for (int64_t a = 0; a < A; a++) table[id[a]] = val[a];
        for (int64_t n = 0; n < N; n++) {
            int64_t f = cand[b * N + n];
            const float *v = V + f * C;
            const int64_t *j = J + f * C;
            /* eight partial sums: one would wait on each addition's latency */
            float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            int64_t c = 0;
            for (; c + 8 <= C; c += 8)
                for (int k = 0; k < 8; k++) s[k] += v[c + k] * table[j[c + k]];
            for (; c < C; c++) s[c % 8] += v[c] * table[j[c]];
            out[b * N + n] = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
        }
        for (int64_t a = 0; a < A; a++) table[id[a]] = 0;
    }
}

/* g_V[f, c] += g[b, n] table_b[J[f, c]] and g_vals[b, a] = sum of g[b, n] V[f, c] over the
 * (n, c) with J[f, c] = idx[b, a]: only connections to the token's active features count (the
 * others read zeros), found by a mark row. g_V (this thread's [F, C], zeros on entry) or g_vals
 * may be NULL when not needed; table, g_table: [G] zeros, mark: [G] zeros, all zeros again on
 * return. */
void candidate_backward(int64_t b_lo, int64_t b_hi, int64_t N, int64_t A, int64_t C,
                        const float *vals, const int64_t *idx, const float *V, const int64_t *J,
                        const int64_t *cand, const float *g, float *table, float *g_table,
                        uint8_t *mark, float *g_V, float *g_vals) {
    for (int64_t b = b_lo; b < b_hi; b++) {
        const float *val = vals + b * A;
        const int64_t *id = idx + b * A;
        for (int64_t a = 0; a < A; a++) {
            table[id[a]] = val[a];
            mark[id[a]] = 1;
        }
        for (int64_t n = 0; n < N; n++) {
            int64_t f = cand[b * N + n];
            float gb = g[b * N + n];
            const float *v = V + f * C;
            const int64_t *j = J + f * C;
            for (int64_t c = 0; c < C; c++) {
                if (!mark[j[c]]) continue;
                if (g_V) g_V[f * C + c] += gb * table[j[c]];
                if (g_vals) g_table[j[c]] += gb * v[c];
            }
        }
        if (g_vals)  /* all read before any is cleared (an index may repeat) */
            for (int64_t a = 0; a < A; a++) g_vals[b * A + a] = g_table[id[a]];
        for (int64_t a = 0; a < A; a++) {
            table[id[a]] = 0;
            g_table[id[a]] = 0;
            mark[id[a]] = 0;
        }
    }
}
