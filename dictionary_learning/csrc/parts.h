/* Parts of a kernel's work (dictionary_learning/native.py: `run`). Each exported kernel takes
 * (part_lo, part_hi, n_parts, ...) and does parts part_lo .. part_hi of n_parts, each a range of
 * rows that no other part writes:
 *
 *     #pragma omp parallel for schedule(static, 1) num_threads(part_hi - part_lo) if (...)
 *     for (int64_t p = part_lo; p < part_hi; p++) { rows part_rows(p) ... }
 *
 * Built with OpenMP (linked against torch's own libgomp), one call runs the parts on torch's
 * threads; built without, the pragma is ignored and Python calls the kernel once per part from
 * its threads. Either way part p covers the same rows and uses scratch row p: the same results. */
#include <stdint.h>

/* Whether this library runs its parts on OpenMP threads. */
int scae_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* The first of part p's rows of n rows cut into n_parts about equal ranges (p = n_parts: n). */
static inline int64_t part_start(int64_t n, int64_t p, int64_t n_parts) {
    return n * p / n_parts;
}

/* The first of part p's rows of a CSR pattern (row_ptr [n_rows + 1]) cut into n_parts ranges of
 * about equal entries: the first row whose entries start at or after p / n_parts of them. */
static inline int64_t part_start_by_entries(const int64_t *row_ptr, int64_t n_rows, int64_t p,
                                            int64_t n_parts) {
    if (p >= n_parts) return n_rows;
    int64_t target = row_ptr[n_rows] * p / n_parts, lo = 0, hi = n_rows;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (row_ptr[mid] < target) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}
