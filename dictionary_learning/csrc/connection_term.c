/* The pruned pass's connection term (dictionary_learning/sparse_ops.py: _CandidateContrib,
 * connection_contrib_all; docs/method.md §3), fp32, for a range of tokens b_lo..b_hi. Plain C
 * called through ctypes, one call per thread on its own tokens; the torch kernels beside it are
 * the reference (the sums add in another order: the two agree to fp32 rounding).
 *
 *   term[b, i] = sum over connections c of i of V[i, c] * f_b[J[i, c]]
 *
 * Most upstream features are off on a token (K of each dictionary's F), so the term is taken from
 * the upstream side: each active feature j of the token (value v) adds v * V to the features it
 * connects to, found in the transposed pattern (tcrow [n_up + 1]: j's entries q; trow[q]: the
 * feature i; Vt[q]: its virtual weight). A token then costs its A active features times their
 * connections (~33 each at gpt2-small widths), where reading every connection of the features
 * asked for costs N x C (23,200 at N 232, C 100). Upstream indices outside [0, n_up) (padding)
 * add nothing; a token lists each upstream feature at most once. */
#include <stdint.h>
#include <string.h>

/* row[F] += the token's upstream contributions */
static inline void scatter_token(int64_t A, int64_t n_up, const float *val, const int64_t *id,
                                 const int64_t *tcrow, const int32_t *trow, const float *Vt,
                                 float *row) {
    for (int64_t a = 0; a < A; a++) {
        int64_t j = id[a];
        if (j < 0 || j >= n_up) continue;
        float v = val[a];
        for (int64_t q = tcrow[j]; q < tcrow[j + 1]; q++) row[trow[q]] += v * Vt[q];
    }
}

/* every feature: out[b, :F] */
void connection_all(int64_t b_lo, int64_t b_hi, int64_t A, int64_t F, int64_t n_up,
                    const float *vals, const int64_t *idx, const int64_t *tcrow,
                    const int32_t *trow, const float *Vt, float *out) {
    for (int64_t b = b_lo; b < b_hi; b++) {
        float *row = out + b * F;
        memset(row, 0, F * sizeof *row);
        scatter_token(A, n_up, vals + b * A, idx + b * A, tcrow, trow, Vt, row);
    }
}

/* the candidates: out[b, n] = term[b, cand[b, n]]; row: [F] zeros on entry and on return */
void connection_candidates(int64_t b_lo, int64_t b_hi, int64_t A, int64_t N, int64_t F,
                           int64_t n_up, const float *vals, const int64_t *idx,
                           const int64_t *tcrow, const int32_t *trow, const float *Vt,
                           const int64_t *cand, float *row, float *out) {
    for (int64_t b = b_lo; b < b_hi; b++) {
        scatter_token(A, n_up, vals + b * A, idx + b * A, tcrow, trow, Vt, row);
        for (int64_t n = 0; n < N; n++) out[b * N + n] = row[cand[b * N + n]];
        memset(row, 0, F * sizeof *row);
    }
}

/* Gradients of the candidates' term, given g[b, n]: with grow[i] = the sum of g[b, n] over the
 * candidates n of the token that are feature i,
 *   g_vals[b, a] = sum over j's entries q of Vt[q] grow[trow[q]]   (j = idx[b, a])
 *   g_Vt[q]     += v grow[trow[q]]                                (this thread's, in Vt's order)
 * g_Vt (zeros on entry) or g_vals may be NULL when not needed; grow: [F] zeros on entry and on
 * return. */
void connection_candidates_backward(int64_t b_lo, int64_t b_hi, int64_t A, int64_t N,
                                    int64_t n_up, const float *vals, const int64_t *idx,
                                    const int64_t *tcrow, const int32_t *trow, const float *Vt,
                                    const int64_t *cand, const float *g, float *grow, float *g_Vt,
                                    float *g_vals) {
    for (int64_t b = b_lo; b < b_hi; b++) {
        const int64_t *cb = cand + b * N;
        for (int64_t n = 0; n < N; n++) grow[cb[n]] += g[b * N + n];
        for (int64_t a = 0; a < A; a++) {
            int64_t j = idx[b * A + a];
            float s = 0;
            if (j >= 0 && j < n_up) {
                float v = vals[b * A + a];
                for (int64_t q = tcrow[j]; q < tcrow[j + 1]; q++) {
                    float gr = grow[trow[q]];
                    if (gr == 0) continue; /* not a candidate, or no gradient: adds nothing */
                    s += Vt[q] * gr;
                    if (g_Vt) g_Vt[q] += v * gr;
                }
            }
            if (g_vals) g_vals[b * A + a] = s;
        }
        for (int64_t n = 0; n < N; n++) grow[cb[n]] = 0;
    }
}
