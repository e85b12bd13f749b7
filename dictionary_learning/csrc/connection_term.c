/* The pruned pass's connection term (dictionary_learning/sparse_ops.py: _CandidateContrib,
 * connection_contrib_all; docs/method.md §3), fp32, for the B tokens in parts (csrc/parts.h: the
 * tokens of parts part_lo .. part_hi). Plain C called through ctypes; the torch kernels beside it
 * are the reference (the sums add in another order: the two agree to fp32 rounding).
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

#include "parts.h"

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
void connection_all(int64_t part_lo, int64_t part_hi, int64_t n_parts, int64_t B, int64_t A,
                    int64_t F, int64_t n_up, const float *vals, const int64_t *idx,
                    const int64_t *tcrow, const int32_t *trow, const float *Vt, float *out) {
#pragma omp parallel for schedule(static, 1) num_threads(part_hi - part_lo) \
    if (part_hi - part_lo > 1)
    for (int64_t p = part_lo; p < part_hi; p++) {
        for (int64_t b = part_start(B, p, n_parts); b < part_start(B, p + 1, n_parts); b++) {
            float *row = out + b * F;
            memset(row, 0, F * sizeof *row);
            scatter_token(A, n_up, vals + b * A, idx + b * A, tcrow, trow, Vt, row);
        }
    }
}

/* the candidates: out[b, n] = term[b, cand[b, n]]; rows: [n_parts, F] zeros on entry and on
 * return (part p's scratch row: rows + F p) */
void connection_candidates(int64_t part_lo, int64_t part_hi, int64_t n_parts, int64_t B,
                           int64_t A, int64_t N, int64_t F, int64_t n_up, const float *vals,
                           const int64_t *idx, const int64_t *tcrow, const int32_t *trow,
                           const float *Vt, const int64_t *cand, float *rows, float *out) {
#pragma omp parallel for schedule(static, 1) num_threads(part_hi - part_lo) \
    if (part_hi - part_lo > 1)
    for (int64_t p = part_lo; p < part_hi; p++) {
        float *row = rows + F * p;
        for (int64_t b = part_start(B, p, n_parts); b < part_start(B, p + 1, n_parts); b++) {
            scatter_token(A, n_up, vals + b * A, idx + b * A, tcrow, trow, Vt, row);
            for (int64_t n = 0; n < N; n++) out[b * N + n] = row[cand[b * N + n]];
            memset(row, 0, F * sizeof *row);
        }
    }
}

/* Gradients of the candidates' term, given g[b, n]: with grow[i] = the sum of g[b, n] over the
 * candidates n of the token that are feature i,
 *   g_vals[b, a] = sum over j's entries q of Vt[q] grow[trow[q]]   (j = idx[b, a])
 *   g_Vt[p][q]  += v grow[trow[q]]                                (part p's, in Vt's order)
 * g_Vt ([n_parts, n_Vt], zeros on entry) or g_vals may be NULL when not needed; grows:
 * [n_parts, F] zeros on entry and on return. */
void connection_candidates_backward(int64_t part_lo, int64_t part_hi, int64_t n_parts, int64_t B,
                                    int64_t A, int64_t N, int64_t F, int64_t n_up, int64_t n_Vt,
                                    const float *vals, const int64_t *idx, const int64_t *tcrow,
                                    const int32_t *trow, const float *Vt, const int64_t *cand,
                                    const float *g, float *grows, float *g_Vt, float *g_vals) {
#pragma omp parallel for schedule(static, 1) num_threads(part_hi - part_lo) \
    if (part_hi - part_lo > 1)
    for (int64_t p = part_lo; p < part_hi; p++) {
        float *grow = grows + F * p, *gV = g_Vt ? g_Vt + n_Vt * p : NULL;
        for (int64_t b = part_start(B, p, n_parts); b < part_start(B, p + 1, n_parts); b++) {
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
                        if (gV) gV[q] += v * gr;
                    }
                }
                if (g_vals) g_vals[b * A + a] = s;
            }
            for (int64_t n = 0; n < N; n++) grow[cb[n]] = 0;
        }
    }
}
