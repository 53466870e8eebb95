/*
 * lightning_inspect.core._kernels: the CPU reduction of one contiguous float32/float64 vector to the
 * row of lightning_inspect.core.stats.reduce_tensor, in two reads (every statistic, then the
 * histogram) instead of a dozen passes of separate torch calls.
 *
 * Optional: the package builds it where a C compiler is present; where it is not (or for other
 * dtypes, strides or non-finite values), the general path of stats.py does the work.
 *
 *   reduce_row(address, n, is_double, bins, row_address) -> bool
 *       reads the n values at `address` (torch's data_ptr(); never written, read with the GIL
 *       released) and writes the float64 row (FIELDS values in the order of
 *       lightning_inspect/core/row.py, then bins counts) at `row_address`. Returns False, with
 *       the row unspecified, where this path cannot be exact: a non-finite value, squares outside
 *       the dtype's range, a range too narrow or too wide to invert. The caller then takes the
 *       general path. The module's FIELDS constant is checked against row.py at import.
 *
 * Histogram: value x goes to bin floor((x - min) * bins / (max - min)), computed in the data's
 * dtype and clamped to [0, bins], with the values at the maximum in the last bin (as before).
 *
 * Accuracy: float32 vectors of up to WIDE_VALUES values are converted to float64 (in a buffer of
 * the calling thread) and reduced in float64 entirely, histogram included. Longer float32 vectors
 * are summed in float32 lanes over blocks of BLOCK_VALUES values, and the block sums in float64
 * (as close to float64 NumPy as a pairwise float32 sum); float64 values are summed in float64.
 * Squares of float32 values are float32, hence the range checks.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define LANES 16                 /* independent accumulators: the compiler vectorises across them */
#define ROWS 16                  /* float32 lane sums cover ROWS values before moving to float64 */
#define BLOCK_VALUES (LANES * ROWS)
#define INDEX_BLOCK 512          /* histogram positions computed (vectorised) before counting */
#define TABLES 4                 /* interleaved count tables: repeated bins do not wait on each other */
#define WIDE_VALUES 16384        /* float32 vectors up to this long are reduced in float64 */

#if defined(_MSC_VER)
#define THREAD_LOCAL __declspec(thread)
#else
#define THREAD_LOCAL __thread
#endif

/* On x86-64 with GCC or clang, the loops are also compiled for AVX2 and the loader picks the best
 * version the CPU runs (twice the vector width); elsewhere they are compiled once. */
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
#endif

typedef struct {
    double sum, sumsq, abs_sum, min, max;
    int64_t zeros;
} Moments;

VECTOR_CLONES static void moments_f32(const float *x, int64_t n, Moments *m) {
    double sum = 0.0, sumsq = 0.0, abs_sum = 0.0;
    int64_t zeros = 0;
    float lo[LANES], hi[LANES];
    for (int j = 0; j < LANES; j++) {
        lo[j] = INFINITY;
        hi[j] = -INFINITY;
    }
    int64_t i = 0;
    for (; i + BLOCK_VALUES <= n; i += BLOCK_VALUES) {
        float s[LANES] = {0}, q[LANES] = {0}, a[LANES] = {0};
        int32_t z[LANES] = {0};
        const float *block = x + i;
        for (int r = 0; r < ROWS; r++) {
            for (int j = 0; j < LANES; j++) {
                float f = block[r * LANES + j];
                s[j] += f;
                q[j] += f * f;
                a[j] += fabsf(f);
                lo[j] = f < lo[j] ? f : lo[j];
                hi[j] = f > hi[j] ? f : hi[j];
                z[j] += (f == 0.0f);
            }
        }
        double bs = 0.0, bq = 0.0, ba = 0.0;
        for (int j = 0; j < LANES; j++) {
            bs += s[j];
            bq += q[j];
            ba += a[j];
            zeros += z[j];
        }
        sum += bs;
        sumsq += bq;
        abs_sum += ba;
    }
    for (; i < n; i++) {
        float f = x[i];
        double v = f;
        sum += v;
        sumsq += (double)(f * f); /* a float32 square, like the blocks' */
        abs_sum += fabs(v);
        lo[0] = f < lo[0] ? f : lo[0];
        hi[0] = f > hi[0] ? f : hi[0];
        zeros += (f == 0.0f);
    }
    float l = INFINITY, h = -INFINITY;
    for (int j = 0; j < LANES; j++) {
        l = lo[j] < l ? lo[j] : l;
        h = hi[j] > h ? hi[j] : h;
    }
    m->sum = sum;
    m->sumsq = sumsq;
    m->abs_sum = abs_sum;
    m->min = l;
    m->max = h;
    m->zeros = zeros;
}

VECTOR_CLONES static void moments_f64(const double *x, int64_t n, Moments *m) {
    /* As moments_f32, with float64 lanes: the lane sums of each block go into float64 totals
     * (per-block accumulators keep the loop vectorisable; zeros are counted as float64). */
    double sum = 0.0, sumsq = 0.0, abs_sum = 0.0, zeros = 0.0;
    double lo[LANES / 2], hi[LANES / 2];
    for (int j = 0; j < LANES / 2; j++) {
        lo[j] = INFINITY;
        hi[j] = -INFINITY;
    }
    int64_t i = 0;
    for (; i + BLOCK_VALUES <= n; i += BLOCK_VALUES) {
        double s[LANES / 2] = {0}, q[LANES / 2] = {0}, a[LANES / 2] = {0}, z[LANES / 2] = {0};
        const double *block = x + i;
        for (int r = 0; r < 2 * ROWS; r++) {
            for (int j = 0; j < LANES / 2; j++) {
                double f = block[r * (LANES / 2) + j];
                s[j] += f;
                q[j] += f * f;
                a[j] += fabs(f);
                lo[j] = f < lo[j] ? f : lo[j];
                hi[j] = f > hi[j] ? f : hi[j];
                z[j] += (f == 0.0) ? 1.0 : 0.0;
            }
        }
        for (int j = 0; j < LANES / 2; j++) {
            sum += s[j];
            sumsq += q[j];
            abs_sum += a[j];
            zeros += z[j];
        }
    }
    for (; i < n; i++) {
        double f = x[i];
        sum += f;
        sumsq += f * f;
        abs_sum += fabs(f);
        lo[0] = f < lo[0] ? f : lo[0];
        hi[0] = f > hi[0] ? f : hi[0];
        zeros += (f == 0.0) ? 1.0 : 0.0;
    }
    *m = (Moments){sum, sumsq, abs_sum, INFINITY, -INFINITY, (int64_t)zeros};
    for (int j = 0; j < LANES / 2; j++) {
        m->min = lo[j] < m->min ? lo[j] : m->min;
        m->max = hi[j] > m->max ? hi[j] : m->max;
    }
}

VECTOR_CLONES static void centred_f32(const float *x, int64_t n, float mean, double *sum, double *sumsq) {
    double total = 0.0, total_sq = 0.0;
    int64_t i = 0;
    for (; i + BLOCK_VALUES <= n; i += BLOCK_VALUES) {
        float s[LANES] = {0}, q[LANES] = {0};
        const float *block = x + i;
        for (int r = 0; r < ROWS; r++) {
            for (int j = 0; j < LANES; j++) {
                float c = block[r * LANES + j] - mean;
                s[j] += c;
                q[j] += c * c;
            }
        }
        double bs = 0.0, bq = 0.0;
        for (int j = 0; j < LANES; j++) {
            bs += s[j];
            bq += q[j];
        }
        total += bs;
        total_sq += bq;
    }
    for (; i < n; i++) {
        float c = x[i] - mean;
        total += c;
        total_sq += (double)(c * c);
    }
    *sum = total;
    *sumsq = total_sq;
}

VECTOR_CLONES static void centred_f64(const double *x, int64_t n, double mean, double *sum, double *sumsq) {
    double total = 0.0, total_sq = 0.0;
    int64_t i = 0;
    for (; i + BLOCK_VALUES <= n; i += BLOCK_VALUES) {
        double s[LANES / 2] = {0}, q[LANES / 2] = {0};
        const double *block = x + i;
        for (int r = 0; r < 2 * ROWS; r++) {
            for (int j = 0; j < LANES / 2; j++) {
                double c = block[r * (LANES / 2) + j] - mean;
                s[j] += c;
                q[j] += c * c;
            }
        }
        for (int j = 0; j < LANES / 2; j++) {
            total += s[j];
            total_sq += q[j];
        }
    }
    for (; i < n; i++) {
        double c = x[i] - mean;
        total += c;
        total_sq += c * c;
    }
    *sum = total;
    *sumsq = total_sq;
}

/* Counts into TABLES interleaved tables of `width` uint32 counters, flushed into `counts` (int64)
 * before any counter can overflow. */
VECTOR_CLONES static int histogram_any(const void *data, int is_double, int64_t n, double lo, double factor,
                         int32_t bins, int64_t *counts) {
    const int64_t width = (int64_t)bins + 1;
    uint32_t *tables = calloc((size_t)(TABLES * width), sizeof(uint32_t));
    if (tables == NULL) return -1;
    int32_t index[INDEX_BLOCK];
    const float *xf = (const float *)data;
    const double *xd = (const double *)data;
    const float lo_f = (float)lo, factor_f = (float)factor, top_f = (float)bins;
    const double top_d = (double)bins;
    int64_t since_flush = 0;
    for (int64_t i = 0; i < n;) {
        int64_t m = n - i < INDEX_BLOCK ? n - i : INDEX_BLOCK;
        if (is_double) {
            for (int64_t j = 0; j < m; j++) {
                double p = (xd[i + j] - lo) * factor;
                p = p < 0.0 ? 0.0 : p;
                p = p > top_d ? top_d : p;
                index[j] = (int32_t)p;
            }
        } else {
            for (int64_t j = 0; j < m; j++) {
                float p = (xf[i + j] - lo_f) * factor_f;
                p = p < 0.0f ? 0.0f : p;
                p = p > top_f ? top_f : p;
                index[j] = (int32_t)p;
            }
        }
        int64_t j = 0;
        for (; j + TABLES <= m; j += TABLES) {
            for (int t = 0; t < TABLES; t++) tables[t * width + index[j + t]]++;
        }
        for (; j < m; j++) tables[index[j]]++;
        i += m;
        since_flush += m;
        if (since_flush > ((int64_t)1 << 31) || i == n) {
            for (int64_t k = 0; k < width; k++) {
                for (int t = 0; t < TABLES; t++) {
                    counts[k] += tables[t * width + k];
                    tables[t * width + k] = 0;
                }
            }
            since_flush = 0;
        }
    }
    free(tables);
    return 0;
}

/* Below these, the largest square nears the dtype's smallest normal number and sums of squares lose
 * precision; the general path rescales (there the tensor is rescaled). */
#define TINY_SQUARE_F32 1e-30
#define TINY_SQUARE_F64 1e-290
#define FIELDS 11 /* the row's fields (lightning_inspect/core/row.py): checked at import */

/* The whole row (see the header); 0 when the general path must decide, -1 when out of memory. */
static int reduce_row(const void *data, int is_double, int64_t n, int32_t bins, double *row) {
    static THREAD_LOCAL double wide[WIDE_VALUES];
    if (!is_double && n <= WIDE_VALUES) { /* short float32 vectors: every step in float64 */
        const float *xf = (const float *)data;
        for (int64_t i = 0; i < n; i++) wide[i] = xf[i];
        data = wide;
        is_double = 1;
    }
    Moments m;
    if (is_double)
        moments_f64((const double *)data, n, &m);
    else
        moments_f32((const float *)data, n, &m);
    if (!isfinite(m.abs_sum) || !isfinite(m.sumsq)) return 0;
    double scale = fmax(-m.min, m.max);
    if (0.0 < scale * scale && scale * scale < (is_double ? TINY_SQUARE_F64 : TINY_SQUARE_F32))
        return 0;
    double m2 = m.sumsq - m.sum * m.sum / (double)n;
    if (m2 < 0.5 * m.sumsq) { /* the mean is comparable to the spread: centre first */
        double residual, centred_sumsq;
        if (is_double)
            centred_f64((const double *)data, n, m.sum / (double)n, &residual, &centred_sumsq);
        else
            centred_f32((const float *)data, n, (float)(m.sum / (double)n), &residual, &centred_sumsq);
        m2 = fmax(centred_sumsq - residual * residual / (double)n, 0.0);
    }
    const double head[FIELDS] = {(double)n, (double)n, m.sum, m2, m.sumsq, m.abs_sum,
                                 m.min,     m.max,     (double)m.zeros, 0.0, 0.0};
    for (int k = 0; k < FIELDS; k++) row[k] = head[k];
    if (bins <= 0) return 1;
    double *counts = row + FIELDS;
    for (int32_t k = 0; k < bins; k++) counts[k] = 0.0;
    if (m.max == m.min) {
        counts[0] = (double)n;
        return 1;
    }
    double factor = (double)bins / (m.max - m.min);
    /* 0: a float64 range wider than float64 (hi - lo overflows); too large: a float32 range of
     * subnormals whose inverse overflows float32 (float64 arithmetic takes any other range) */
    if (!(0.0 < factor && factor < (is_double ? 1e300 : 1e30))) return 0;
    int64_t *exact = calloc((size_t)bins + 1, sizeof(int64_t));
    if (exact == NULL) return -1;
    int status = histogram_any(data, is_double, n, m.min, factor, bins, exact);
    if (status == 0) {
        for (int32_t k = 0; k < bins; k++) counts[k] = (double)exact[k];
        counts[bins - 1] += (double)exact[bins]; /* the maximum itself, in the closed last bin */
    }
    free(exact);
    return status == 0 ? 1 : -1;
}

static PyObject *py_reduce_row(PyObject *self, PyObject *args) {
    unsigned long long address, row_address;
    long long n;
    int is_double, bins, status;
    if (!PyArg_ParseTuple(args, "KLpiK", &address, &n, &is_double, &bins, &row_address)) return NULL;
    if (n < 1) {
        PyErr_Format(PyExc_ValueError, "reduce_row: n must be at least 1, got %lld", n);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    status = reduce_row((const void *)(uintptr_t)address, is_double, n, bins,
                        (double *)(uintptr_t)row_address);
    Py_END_ALLOW_THREADS
    if (status < 0) return PyErr_NoMemory();
    return PyBool_FromLong(status);
}

static PyMethodDef methods[] = {
    {"reduce_row", py_reduce_row, METH_VARARGS,
     "reduce_row(address, n, is_double, bins, row_address) -> bool: write the float64 row"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernels",
    "Two-read CPU reduction kernels of lightning_inspect (see core/stats.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__kernels(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "FIELDS", FIELDS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
