# The compiled kernels of cylsm, included by one module per CPU level (_kernels_baseline.pyx,
# _kernels_v3.pyx, _kernels_v4.pyx): the same source, compiled with different -march flags.
"""Compiled kernels of cylsm.

Every kernel works on C-contiguous buffers laid out as (outer, n, inner) and reduces over the
middle axis; ``cylsm._api`` has already validated and normalised the arguments, so nothing here
checks them again.  The Python backend (``cylsm/_python.py``) implements the same functions with
the same signatures and is the readable statement of the algorithms.

Three loop shapes:

* row kernels (inner == 1): a row is cut into blocks of BLOCK elements summed in W lanes, and
  blocks into superblocks of SUPER elements; one long row is shared by the threads superblock
  by superblock;
* short rows (n < SHORT): TILE rows (a few rows: 32 bytes' worth) are transposed into a
  buffer and reduced by the column kernel, one lane per row;
* column kernels (inner > 1): up to JB neighbouring columns are walked together, contiguously
  (the backward ops: up to BACK_COLS, see back_width).

Accuracy: x - max is formed exactly (its rounding error enters exp's reduced argument); the
elements equal to the maximum are counted, not summed (each contributes exactly 1), and
log_softmax/logsumexp use log1p of the count - 1 plus the sum of the rest; partial sums are
added with TwoSum and combined in a fixed order, so long rows do not drift and the results do
not depend on the number of threads.  float32 data uses a float32 exp (twice the lanes) whose
results are scaled into double exactly, and accumulates in double: no term is rounded to
float's subnormal grid.  float32 log_softmax_backward forms its output in float where a row
allows it, within 1.5 units of 2^-24 of its terms (see log_softmax_grad_float).

Memory: a long row's output pass walks its superblocks last first (those the statistics pass
read last are still cached); softmax and logsumexp_backward rows up to KEEP_BYTES, and short
rows, store the exps of the sum pass and rescale them instead of a second exp; softmax_backward
writes outputs of STREAM_BYTES or more past the cache (streamed_output).
"""
from cython.parallel cimport prange, parallel, threadid
from libc.math cimport log1p, log, fabs, fma, fmaf, copysign, INFINITY, NAN
from libc.stdint cimport int32_t, int64_t, uintptr_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy
from cpython.ref cimport Py_INCREF
cimport numpy as cnp

import os as _os

import numpy

cnp.import_array()

cdef extern from "cylsm_exp.h" nogil:
    double cylsm_exp(double x) noexcept
    double cylsm_two_diff(double a, double b, double* lo) noexcept
    double cylsm_two_prod(double a, double b, double* lo) noexcept
    double cylsm_expf_wide(float x) noexcept
    double cylsm_exp_nonpos(double x, double lo) noexcept
    double cylsm_exp_nonpos_arg(double x, double lo, double* s) noexcept
    double cylsm_exp_nonpos_value(double r, double s) noexcept
    double cylsm_exp_nonpos_scaled_value(double r, double s) noexcept
    const double CYLSM_UNSCALE64   # 2^-600
    float cylsm_expf_nonpos_scaled(float x, float lo) noexcept
    float cylsm_expf_nonpos_scaled_arg(float x, float lo, float* s) noexcept
    float cylsm_expf_nonpos_scaled_value(float r, float s) noexcept
    const double CYLSM_UNSCALE     # 2^-64
    const bint CYLSM_FMA
    float cylsm_two_difff(float a, float b, float* lo) noexcept
    float cylsm_zero_if_equalf(float e, float v, float m) noexcept
    int32_t cylsm_key32(float x) noexcept
    float cylsm_unkey32(int32_t k) noexcept
    int64_t cylsm_key64(double x) noexcept
    double cylsm_log1p(double t) noexcept
    double cylsm_log1p_dd(double t, double tlo, double* lo) noexcept
    double cylsm_unkey64(int64_t k) noexcept

ctypedef fused floating:
    float
    double

ctypedef fused sums:     # (a type only as a compile-time switch, its value is not used)
    char    # the sums of a column or tile kernel: in runs, added with TwoSum
    short   # every addition exact (float64 logsumexp, see add_exact); a separate compiled
            # copy, so that the other ops' loops stay as they were (a runtime flag made GCC
            # compile them differently: float64 axis-0 softmax 1.5x slower)


ctypedef fused lanes:    # the width of a tile of short rows (a compile-time switch, as sums)
    int     # TILE lanes
    long    # narrow: a tile of a few rows computes no more copies of its last row than that
    short   # narrow for logsumexp: EXACT_LANES


cdef inline Py_ssize_t tile_width(lanes kind, floating data) noexcept nogil:
    """The lanes of a tile of short rows of the type of data (whose value is not used): TILE,
    or narrow, NARROW bytes: a 256-bit vector (fewer lanes than that vectorize poorly), or for
    logsumexp EXACT_LANES (see stats_short_rows)."""
    if lanes is int:
        return TILE
    elif lanes is long:
        return NARROW // sizeof(floating)
    else:
        return EXACT_LANES


cdef inline floating exp_arg(floating a, floating b, floating* s) noexcept nogil:
    """The first half of exp_diff_s(a, b) (see cylsm_exp_nonpos): the reduced argument of
    exp(a - b), a - b formed exactly, and its scale in s; exp_value(r, s) is the exp."""
    cdef floating lo, d
    if floating is float:
        d = cylsm_two_difff(a, b, &lo)
        return cylsm_expf_nonpos_scaled_arg(d, lo, s)
    else:
        d = cylsm_two_diff(a, b, &lo)
        return cylsm_exp_nonpos_arg(d, lo, s)


cdef inline floating exp_value(floating r, floating s) noexcept nogil:
    if floating is float:
        return cylsm_expf_nonpos_scaled_value(r, s)
    else:
        return cylsm_exp_nonpos_value(r, s)


cdef inline floating exp_value_scaled(floating r, floating s) noexcept nogil:
    """exp_value scaled for a sum or to be stored (softmax and logsumexp_backward keep their
    exps): times 2^64 for float data (exp_value itself), 2^600 for double; sum_unscale undoes
    it."""
    if floating is float:
        return cylsm_expf_nonpos_scaled_value(r, s)
    else:
        return cylsm_exp_nonpos_scaled_value(r, s)


cdef inline floating exp_diff_scaled(floating a, floating b) noexcept nogil:
    """exp_diff_s(a, b) scaled for a sum as exp_value_scaled."""
    cdef floating s
    cdef floating r = exp_arg(a, b, &s)
    return exp_value_scaled(r, s)


cdef inline double sum_unscale(floating kind) noexcept nogil:
    """What turns a sum of exp_value_scaled results into its value (exactly, but where that is
    below 2^-1022); for float data unscale's 2^-64.  Scaled, an exp is never subnormal: it is
    rounded once (by the unscaling of the total, or of the output it is a factor of), not once
    per term, and no subnormal operand slows the arithmetic."""
    if floating is float:
        return CYLSM_UNSCALE
    else:
        return CYLSM_UNSCALE64


cdef inline floating exp_diff_s(floating a, floating b) noexcept nogil:
    """exp(a - b) for a <= b (or NaN), with a - b formed exactly: its rounding would otherwise
    cost up to |a - b|/2 ulp (e.g. 20 ulp of every term 40 below the maximum).  Scaled: for
    float data times 2^64 (never subnormal, see cylsm_expf_nonpos_scaled), to be unscaled by
    unscale() (exactly, in double)."""
    cdef floating s
    cdef floating r = exp_arg(a, b, &s)
    return exp_value(r, s)


cdef inline floating unless_max(floating e, floating v, floating m) noexcept nogil:
    """e, or 0 where v == m: the term of a sum that leaves the maxima out (they are counted
    apart), as a 0 term (part + 0 is part).  Float terms are masked before they are widened
    (see cylsm_zero_if_equalf)."""
    if floating is float:
        return cylsm_zero_if_equalf(e, v, m)
    else:
        return 0 if v == m else e


cdef inline floating kept_term(floating e, floating v, floating m) noexcept nogil:
    """The term of a sum whose exps are also stored (softmax, logsumexp_backward keep them):
    float data sums every e, the maxima too (in double lanes a 1 next to the others costs the
    sum about 2^-50 of itself, nothing a float result shows, and leaving it out costs an
    operation per element); the caller then counts no maxima apart (see kept_ones).  Double
    data leaves them out (unless_max): with the 1s in, a softmax of many equal terms below one
    maximum was 1.7 ulp off."""
    if floating is float:
        return e
    else:
        return unless_max(e, v, m)


cdef inline bint kept_ones(floating kind) noexcept nogil:
    """Whether the sums whose exps are stored count the maxima apart (see kept_term)."""
    return floating is double


cdef inline double unscale(floating kind) noexcept nogil:
    """What turns exp_diff_s results, or sums and products of them, into exact doubles: 2^-64
    for float data, 1 for double (kind only selects the type).  Sums of the scaled values,
    unscaled once, are the same bits as sums of unscaled ones, at a multiplication less per
    term."""
    if floating is float:
        return CYLSM_UNSCALE
    else:
        return 1.0


cdef inline double exp_wide(floating a) noexcept nogil:
    """exp(a) as a double, as accurate as the data's precision (float data: float arithmetic,
    without float's underflow and overflow; see cylsm_expf_wide)."""
    if floating is float:
        return cylsm_expf_wide(a)
    else:
        return cylsm_exp(a)


cdef inline double log_softmax_grad(floating g, floating y, double G) noexcept nogil:
    """log_softmax_backward's output g - exp(y) * G in double (G: the sum of the line's g), to
    be rounded once to the data type; the float path is log_softmax_grad_float's."""
    return g - exp_wide(y) * G


cdef inline bint softmax_grad_float_ok(double M) noexcept nogil:
    """Whether softmax_backward's output for a line whose sum(g * p) is M may be formed in
    float (softmax_grad_float): |M| < 2^100.  Then neither difference there can overflow (g's
    largest float minus M rounds to at most FLT_MAX); inf and NaN sums stay in double."""
    return fabs(M) < CYLSM_SOFTMAX_GRAD_FLOAT_MAX     # 2^100 (cylsm_tile.h)


cdef inline float softmax_grad_float(float p, float g, float Mh, float Ml) noexcept nogil:
    """softmax_backward's output p * (g - M) in float, M = Mh + Ml being the line's sum(g * p)
    split into two floats: where g and M cancel, g - Mh is exact (Sterbenz), so the cancellation
    costs nothing (a single float for M would be off by 2^-24 of M there, see
    test_softmax_backward_cancellation); elsewhere each of the three roundings is relative to
    the result.  At most 2.5 ulp of the result (two roundings of at most one ulp each, the
    product's half; against half an ulp in double, which converts every element: 1.3-1.4x the
    time of these loops), and at most 3 units of 2^-24 of p * (|g| + sum|g * p|) (measured:
    2.5, against 3.6 for the plain float formula that torch and jax evaluate)."""
    return p * ((g - Mh) - Ml)


cdef inline double exp_diff2(double a, double b, double c) noexcept nogil:
    """exp((a - b) - c) for a <= b and c >= 0, both differences formed exactly."""
    cdef double lo1, lo2
    cdef double d = cylsm_two_diff(a, b, &lo1)
    d = cylsm_two_diff(d, c, &lo2)
    return cylsm_exp_nonpos(d, lo1 + lo2)

cdef inline floating* align64(floating* p) noexcept nogil:
    """p rounded up to a multiple of 64 bytes (a buffer declared 64 bytes longer than it needs).
    As plain local arrays, the tile buffers of short rows got whatever alignment the frame
    layout gave them: moved by 40 bytes from a cache line's start, the tile made float64
    logsumexp over rows of 32 1.38x slower (measured by offsetting it element by element:
    0, 64 and 96 bytes alike fast, 8-56 slow)."""
    return <floating*>((<uintptr_t>p + 63) & ~(<uintptr_t>63))


cdef extern from "cylsm_tile.h" nogil:
    void cylsm_transpose_f32(const float* src, Py_ssize_t ss, float* dst, Py_ssize_t ds,
                             Py_ssize_t rows, Py_ssize_t cols) noexcept
    void cylsm_transpose_f64(const double* src, Py_ssize_t ss, double* dst, Py_ssize_t ds,
                             Py_ssize_t rows, Py_ssize_t cols) noexcept
    void cylsm_transpose_in_f32(const float* src, Py_ssize_t ss, float* dst, Py_ssize_t ds,
                                Py_ssize_t rows, Py_ssize_t cols) noexcept
    void cylsm_transpose_in_f64(const double* src, Py_ssize_t ss, double* dst, Py_ssize_t ds,
                                Py_ssize_t rows, Py_ssize_t cols) noexcept
    void cylsm_split_factor(double fs, float* fh, float* fl) noexcept
    float cylsm_times_factor(float e, float fh, float fl) noexcept
    void cylsm_tile_times_factor(const float* e, float* t, Py_ssize_t n, Py_ssize_t v,
                                 const float* fh, const float* fl) noexcept
    double cylsm_sum_lanes16(const double* acc) noexcept
    const bint CYLSM_VECTORS
    const double CYLSM_SOFTMAX_GRAD_FLOAT_MAX
    void cylsm_softmax_bwd_rows_f32(const float* g, const float* p, float* out, Py_ssize_t R,
                                    Py_ssize_t n) noexcept
    double cylsm_dot_f32(const float* g, const float* p, Py_ssize_t n) noexcept
    void cylsm_log_softmax_rows_f32(const float* x, float* out, Py_ssize_t R, Py_ssize_t n,
                                    const double* M, const double* L) noexcept


cdef inline void transpose(const floating* src, Py_ssize_t ss, floating* dst, Py_ssize_t ds,
                           Py_ssize_t rows, Py_ssize_t cols) noexcept nogil:
    """dst[c * ds + r] = src[r * ss + c] for r < rows, c < cols (see cylsm_tile.h)."""
    if floating is float:
        cylsm_transpose_f32(src, ss, dst, ds, rows, cols)
    else:
        cylsm_transpose_f64(src, ss, dst, ds, rows, cols)


cdef inline void transpose_in(const floating* src, Py_ssize_t ss, floating* dst,
                              Py_ssize_t ds, Py_ssize_t rows, Py_ssize_t cols) noexcept nogil:
    """transpose, for a tile's input: inlined (see cylsm_tile.h)."""
    if floating is float:
        cylsm_transpose_in_f32(src, ss, dst, ds, rows, cols)
    else:
        cylsm_transpose_in_f64(src, ss, dst, ds, rows, cols)

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define CYLSM_OPENMP 1
    #else
    #define CYLSM_OPENMP 0
    static int omp_get_max_threads(void) { return 1; }
    #endif
    """
    const int CYLSM_OPENMP
    int omp_get_max_threads() noexcept nogil

cdef extern from *:
    """
    /* GNU libgomp cannot start a parallel region in a child forked after the parent ran one
       (the child hangs); the child runs its kernels on one thread instead. */
    #if defined(_OPENMP) && defined(__GNUC__) && !defined(__clang__) && !defined(_WIN32)
    #include <pthread.h>
    static void cylsm_one_thread(void) { omp_set_num_threads(1); }
    static void cylsm_fork_guard(void) { pthread_atfork(NULL, NULL, cylsm_one_thread); }
    #else
    static void cylsm_fork_guard(void) {}
    #endif
    """
    void cylsm_fork_guard() noexcept

cylsm_fork_guard()

cdef enum:
    W = 16            # lanes of a row kernel (cylsm_sum_lanes16 adds them)
    BLOCK = 2048      # elements of a row summed in lanes before the compensated add
    SUPER = 131072    # elements of a row reduced by one thread (a multiple of BLOCK)
    KEEP_BYTES = 8388608  # softmax and logsumexp_backward rows (and panels of JB columns) up
                          # to this size keep the exps of their sum pass (rereading them from
                          # L2/L3 beats a second exp; measured up to 8 MB on a 32 MB L3, and
                          # no slower past it)
    KEEP_SUPER = 16       # superblocks of such a row, at most: KEEP_BYTES / (SUPER * 4)
    AHEAD_BYTES = 2097152 # rows up to this size fetch the next row during their sum pass
    KC = 128          # rows of a column kernel summed before the compensated add
    RUN64 = 8         # float64: groups of W (row kernels) or rows (column kernels) summed
                      # before the compensated add: a plain sum of many equal terms rounds the
                      # same way each time (25 ulp in log_softmax over 128 of them)
    SPLIT = 256       # elements whose exps' arguments a sum loop forms before the exps
                      # (block_sumexp, tile_stats; a multiple of W and of TILE)
    SHORT = 256       # rows shorter than this are processed TILE rows at a time, transposed
    TILE = 16
    NARROW = 32       # bytes of a row of a narrow tile (see lanes)
    EXACT_LANES = 8   # lanes of a narrow tile of logsumexp (see stats_short_rows)
    CHUNK = 512       # elements whose weights (b=, where=) a weighted row kernel gathers at once
    GROUP = 1024      # elements of short rows logsumexp(where=) masks into a buffer at a time
    JB = 64           # columns walked together by a column kernel
    BACK_COLS = 4096  # columns walked together by a backward column kernel, at most (see
                      # back_width)
    BACK_RUN = 4096   # bytes: the shortest runs the threads' backward column tasks are cut to
    MAX_RUN = 4096    # rows of a column kernel whose maxima are counted before they are merged
    MIN_PARALLEL = 32768   # fewer elements than this: one thread
    GIL_BYTES = 4096  # the shortcut keeps the GIL for inputs this small
    STREAM_BYTES = 8388608  # softmax_backward's row outputs this large are streamed (see
                            # streamed_output): a quarter of this machine's L3
    STREAM_CHUNK = 1024     # elements of such an output computed into a buffer at a time


cdef extern from "cylsm_cpu.h":
    int cylsm_cpu_level() noexcept
    const char* CYLSM_BUILD_FLAGS
    void cylsm_prefetch(const void* p) noexcept nogil
    void cylsm_prefetchw(const void* p) noexcept nogil


def cpu_level():
    """The best kernel level this CPU (and OS) can run: 0 baseline, 3 x86-64-v3, 4 x86-64-v4."""
    return cylsm_cpu_level()


cdef extern from *:
    """
    #if defined(__VERSION__)
    #define CYLSM_COMPILER __VERSION__
    #elif defined(_MSC_FULL_VER)
    #define CYLSM_STR2(x) #x
    #define CYLSM_STR(x) CYLSM_STR2(x)
    #define CYLSM_COMPILER "MSVC " CYLSM_STR(_MSC_FULL_VER)
    #else
    #define CYLSM_COMPILER "unknown"
    #endif
    #ifndef CYLSM_OPENMP_FLAGS
    #define CYLSM_OPENMP_FLAGS ""
    #endif
    """
    const char* CYLSM_COMPILER
    const char* CYLSM_OPENMP_FLAGS


def build_info():
    """How these kernels were compiled: compiler, OpenMP flags."""
    return {
        "compiler": CYLSM_COMPILER.decode(),
        "build_flags": CYLSM_BUILD_FLAGS.decode(),
        "openmp_flags": CYLSM_OPENMP_FLAGS.decode(),
    }


def openmp_enabled():
    """True when the kernels were compiled with OpenMP."""
    return bool(CYLSM_OPENMP)


def max_threads():
    """The number of threads a large call may use (OMP_NUM_THREADS, threadpoolctl limits)."""
    return omp_get_max_threads()


cdef inline int n_threads(Py_ssize_t size) noexcept nogil:
    return 1 if size < MIN_PARALLEL else omp_get_max_threads()


# ---------------------------------------------------------------------------------------------
# Building blocks


cdef inline void add_exact(double* total, double* comp, double v) noexcept nogil:
    """total + comp += v for 0 <= v <= 1 <= total (Fast2Sum: 3 operations for TwoSum's 6), or
    all three scaled by one power of two, as the float64 sums are (see sum_unscale).  The exps
    of a line's sum pass are at most 1: a total started at 1 (taken off at the end, exactly)
    keeps every rounding error of the sum in comp.  The float64 logsumexp of short
    rows and of columns sums this way: a plain sum of a few terms can be off by a few ulps,
    which log1p passes on to the logsumexp, beyond SPEC's bound where it is below 1."""
    cdef double s = total[0] + v
    comp[0] += v - (s - total[0])
    total[0] = s


cdef inline void two_sum_add(double* total, double* comp, double v) noexcept nogil:
    """total + comp += v, keeping the rounding error of the addition in comp (Knuth's TwoSum)."""
    cdef double s = total[0] + v
    cdef double bb = s - total[0]
    comp[0] += (total[0] - (s - bb)) + (v - bb)
    total[0] = s


cdef inline void dot2_add(double* hi, double* lo, double a, double b) noexcept nogil:
    """hi + lo += a * b, the product split exactly (cylsm_two_prod), its rounded part added to
    hi by TwoSum and both errors gathered in lo: a sum of products as if in twice the precision
    (Ogita, Rump and Oishi's Dot2).  float64 softmax_backward's sum(g * p): where some g is
    close to it, p * (g - sum) has few correct bits unless the sum has more than a double's."""
    cdef double e
    cdef double h = cylsm_two_prod(a, b, &e)
    cdef double t = hi[0] + h
    cdef double bb = t - hi[0]
    lo[0] += ((hi[0] - (t - bb)) + (h - bb)) + e
    hi[0] = t


cdef inline double split_sum(double t, double c, double* lo) noexcept nogil:
    """t + c (a compensated sum) rounded, and in lo what that leaves out.  Where c is not finite
    (t is inf or NaN, or an error term was: see cylsm_two_prod), t alone, lo 0: the plain sum."""
    cdef double m = t + c
    if not (-INFINITY < c < INFINITY):
        lo[0] = 0.0
        return t
    lo[0] = c - (m - t) if -INFINITY < m < INFINITY else 0.0
    return m


cdef inline void panel_max(const floating* p, Py_ssize_t K, Py_ssize_t w, Py_ssize_t s,
                           floating* m, double* ones) noexcept nogil:
    """OUT m[j]: max over k < K of p[k*s + j], NaN ignored (-inf if nothing is greater);
    OUT ones[j] unless ones is NULL: the number of k with p[k*s + j] == m[j].
    The counts are kept in the data type (exact: a run is far shorter than 2^24 rows) and
    merged into ones run by run: double counts made GCC widen every comparison of float data,
    a third of the time of a float32 column logsumexp."""
    cdef Py_ssize_t k, k0, k1, j
    cdef const floating* row
    cdef floating v
    cdef floating rm[JB]
    cdef floating rc[JB]
    for j in range(w):
        m[j] = -INFINITY
    if ones == NULL:
        for k in range(K):
            row = p + k * s
            for j in range(w):
                v = row[j]
                m[j] = v if v > m[j] else m[j]
        return
    for j in range(w):
        ones[j] = 0
    k0 = 0
    while k0 < K:
        k1 = k0 + MAX_RUN if K - k0 > MAX_RUN else K
        for j in range(w):
            rm[j] = -INFINITY
            rc[j] = 0
        for k in range(k0, k1):
            row = p + k * s
            for j in range(w):
                v = row[j]
                rc[j] = 1 if v > rm[j] else rc[j] + (1 if v == rm[j] else 0)
                rm[j] = v if v > rm[j] else rm[j]
        for j in range(w):
            ones[j] = rc[j] if rm[j] > m[j] else ones[j] + (rc[j] if rm[j] == m[j] else 0)
            m[j] = rm[j] if rm[j] > m[j] else m[j]
        k0 = k1


cdef inline void prefetch_panel_row(const floating* r) noexcept nogil:
    """Prefetch the JB elements at r (a row of a column panel) for reading."""
    cdef Py_ssize_t i
    cdef Py_ssize_t step = 64 // sizeof(floating)
    i = 0
    while i < JB:
        cylsm_prefetch(r + i)
        i += step


cdef inline void panel_sumexp(const floating* p, Py_ssize_t K, Py_ssize_t w, Py_ssize_t s,
                              const floating* m, double* tot, double* part, double* comp,
                              floating* store, sums kind) noexcept nogil:
    """OUT tot[j] + comp[j]: the sum over k < K of exp(p[k*s + j] - m[j]) where p[k*s + j] !=
    m[j] (the others contribute exactly 1 each; panel_max counts them), for float data over
    all k when store is not NULL (see kept_term); part: scratch of w.
    float64 with kind short: every addition keeps its rounding error, in comp (see
    add_exact); else comp is 0.
    When store is not NULL (not with kind short), each exp is also stored at store[k*s + j], in
    the data type and scaled as the sums are (see sum_unscale: never subnormal, so that a large
    factor does not bring out the rounding of a subnormal); in a column whose m is not finite,
    the column itself is stored instead (then it is there for the output formula even when
    store is p).
    Along the way the next panel (the JB columns that follow, usually this thread's next
    task) is prefetched, so that its max pass reads from cache: 5-15% faster column kernels.
    (The backward ops' panel_sum got slower with the same prefetch.)"""
    cdef Py_ssize_t k, k0, k1, j
    cdef Py_ssize_t run = RUN64 if floating is double else KC
    cdef const floating* row
    cdef floating* srow
    cdef floating v, es
    cdef double e
    for j in range(w):
        tot[j] = 0.0
        comp[j] = 0.0
    if floating is double and sums is short:    # (the 1 each total starts at, scaled too)
        for j in range(w):
            part[j] = 1.0 / sum_unscale(m[0])
        for k in range(K):
            row = p + k * s
            prefetch_panel_row(row + JB)
            for j in range(w):
                v = row[j]
                add_exact(&part[j], &comp[j], 0.0 if v == m[j] else exp_diff_scaled(v, m[j]))
        for j in range(w):
            tot[j] = (part[j] - 1.0 / sum_unscale(m[0])) * sum_unscale(m[0])
            comp[j] *= sum_unscale(m[0])
        return
    k0 = 0
    while k0 < K:
        k1 = k0 + run if k0 + run < K else K
        for j in range(w):
            part[j] = 0.0
        if store == NULL:
            for k in range(k0, k1):
                row = p + k * s
                prefetch_panel_row(row + JB)
                for j in range(w):
                    v = row[j]
                    es = exp_diff_scaled(v, m[j])     # see sum_unscale
                    part[j] += unless_max(es, v, m[j])
        else:
            for k in range(k0, k1):
                row = p + k * s
                srow = store + k * s
                prefetch_panel_row(row + JB)
                for j in range(w):
                    v = row[j]
                    es = exp_diff_scaled(v, m[j])
                    srow[j] = es if -INFINITY < m[j] < INFINITY else v
                    part[j] += kept_term(es, v, m[j])
        for j in range(w):
            two_sum_add(&tot[j], &comp[j], part[j])
        k0 = k1
    for j in range(w):
        tot[j] = (tot[j] + comp[j]) * sum_unscale(m[0])
        comp[j] = 0.0


cdef inline void panel_sum(const floating* g, const floating* q, Py_ssize_t K, Py_ssize_t w,
                    Py_ssize_t s, double* tot, double* part, double* comp) noexcept nogil:
    """OUT tot[j] = sum over k < K of g[k*s + j] * q[k*s + j] (of g alone when q is NULL),
    OUT comp[j] what that rounded sum leaves out: for double data and q, the sum in twice the
    precision (dot2_add), split by split_sum; else 0."""
    cdef Py_ssize_t k, k0, k1, j
    cdef const floating* grow
    cdef const floating* qrow
    for j in range(w):
        tot[j] = 0.0
        comp[j] = 0.0
    if floating is double and q != NULL:
        for k in range(K):
            grow = g + k * s
            qrow = q + k * s
            for j in range(w):
                dot2_add(&tot[j], &comp[j], grow[j], qrow[j])
        for j in range(w):
            tot[j] = split_sum(tot[j], comp[j], &comp[j])
        return
    k0 = 0
    while k0 < K:
        k1 = k0 + KC if k0 + KC < K else K
        for j in range(w):
            part[j] = 0.0
        if q == NULL:
            for k in range(k0, k1):
                grow = g + k * s
                for j in range(w):
                    part[j] += grow[j]
        else:
            for k in range(k0, k1):
                grow = g + k * s
                qrow = q + k * s
                for j in range(w):
                    part[j] += <double>grow[j] * <double>qrow[j]
        for j in range(w):
            two_sum_add(&tot[j], &comp[j], part[j])
        k0 = k1
    for j in range(w):
        tot[j] += comp[j]
        comp[j] = 0.0


cdef double nonfinite_stats(const floating* p, Py_ssize_t n, Py_ssize_t s, double* S) noexcept nogil:
    """For a line whose max is +-inf (or that has only NaN and -inf): returns L and sets S so that
    the output formulas give SPEC's special values: L = NaN if the line has a NaN, else 0; S = NaN."""
    cdef Py_ssize_t k
    S[0] = NAN
    for k in range(n):
        if p[k * s] != p[k * s]:
            return NAN
    return 0.0


# ---------------------------------------------------------------------------------------------
# Statistics of one row / one block of columns: max M, L = log(sum exp(x - M)), S = sum exp(x - M).
# For a finite M, L = log1p((c - 1) + t) and S = c + t, with c the number of elements equal to M
# and t the sum over the others: the terms that are exactly 1 are kept out of the small sum.


cdef inline int64_t key(floating v) noexcept nogil:
    """An order-preserving integer key of v (see cylsm_key32/64)."""
    if floating is float:
        return cylsm_key32(v)
    else:
        return cylsm_key64(v)


cdef inline floating unkey(int64_t k, floating* kind) noexcept nogil:
    """The value whose key is k (kind only selects the type)."""
    if floating is float:
        return cylsm_unkey32(<int32_t>k)
    else:
        return cylsm_unkey64(k)


cdef inline int64_t block_max(const floating* x, Py_ssize_t n) noexcept nogil:
    """The largest key of x[0:n] (n >= 1): integer max reductions vectorize (IEEE ones do not
    without -ffast-math).  Negative NaNs rank below -inf, positive ones above +inf: either way a
    row holding a NaN ends up NaN."""
    cdef Py_ssize_t i
    cdef int32_t k32, m32 = cylsm_key32(-INFINITY)
    cdef int64_t k64, m64 = cylsm_key64(-INFINITY)
    if floating is float:
        for i in range(n):
            k32 = cylsm_key32(x[i])
            m32 = k32 if k32 > m32 else m32
        return m32
    else:
        for i in range(n):
            k64 = cylsm_key64(x[i])
            m64 = k64 if k64 > m64 else m64
        return m64


cdef inline Py_ssize_t count_equal(const floating* x, Py_ssize_t n, floating v) noexcept nogil:
    """The number of elements of x[0:n] (n <= BLOCK) equal to v (+0 and -0 are equal, as in
    the sums).  Counted in lanes of the data's width: a 64-bit count of float data made GCC
    widen every comparison, 70% of the time of a float32 row's max pass."""
    cdef Py_ssize_t i
    cdef int32_t c32 = 0
    cdef int64_t c64 = 0
    if floating is float:
        for i in range(n):
            c32 += x[i] == v
        return c32
    else:
        for i in range(n):
            c64 += x[i] == v
        return c64


cdef floating super_max(const floating* x, Py_ssize_t n, double* count) noexcept nogil:
    """The maximum of x[0:n] (n <= SUPER; see block_max for NaN), and in count the number of
    elements equal to it (when count is not NULL).  Block by block, so that the counting pass
    reads from L1.  (Counting along with the maximum, in lanes, would be one pass, but the
    compiler does not vectorize that.)"""
    cdef Py_ssize_t b = 0, bn, c = 0
    cdef int64_t mk = key(<floating>-INFINITY), bk
    cdef floating m = -INFINITY, bm
    while b < n:
        bn = BLOCK if n - b > BLOCK else n - b
        bk = block_max(x + b, bn)
        bm = unkey(bk, &bm)
        if count == NULL:
            pass
        elif bm == m:
            c += count_equal(x + b, bn, bm)
        elif bk > mk:
            c = count_equal(x + b, bn, bm)
        mk = bk if bk > mk else mk
        m = unkey(mk, &m)
        b += BLOCK
    if count != NULL:
        count[0] = c
    return m


cdef inline double block_sumexp(const floating* x, Py_ssize_t n, floating mx, floating* store,
                                const floating* ahead, const floating* ahead_w) noexcept nogil:
    """The sum of exp(x[i] - mx) over the i < n with x[i] != mx (those contribute exactly 1
    each and are counted apart, so that the small terms are never rounded against them), in W
    lanes, added to compensated lane totals after each run of groups (float64: RUN64 groups;
    float32, accumulated in double: the whole block); the lanes are combined with TwoSum.
    The exps are scaled (see sum_unscale) and also stored in store[i] when store is not NULL;
    float data then sums the maxima too (kept_term).  The lane sums are local arrays, so they
    stay in registers (through a pointer they would make a round trip to memory at every step; GCC
    still spills some of the float32 ones to the stack).  ahead[0:n] is prefetched for reading
    and ahead_w[0:n] for writing along the way, so that the memory traffic of the next row
    overlaps the arithmetic of this one (callers with nothing to fetch point them at the data
    that follows x: a condition in the loop would keep the compiler from vectorizing it).
    SPLIT elements at a time, the exps' reduced arguments are formed into a buffer and then
    the exps from them (exp_arg, exp_value): one long dependency chain per element (exact
    difference, reduction, polynomial, scaling, sum) kept the processor from overlapping enough
    elements; split, the sums take 0.76-0.95 of the time (float32 more), with the same bits."""
    cdef double acc[W]
    cdef double tot[W]
    cdef double comp[W]
    cdef floating R[SPLIT]       # a run's reduced arguments and scales (see exp_arg)
    cdef floating Sc[SPLIT]
    cdef Py_ssize_t g, g0, g1, c0, c1, j, i, k, ng = n // W
    cdef Py_ssize_t run = RUN64 if floating is double else BLOCK // W
    cdef floating v, es, sc
    cdef double e
    cdef double t = 0.0, c = 0.0
    for j in range(W):
        tot[j] = 0.0
        comp[j] = 0.0
    g0 = 0
    while g0 < ng:
        g1 = g0 + run if g0 + run < ng else ng
        for j in range(W):
            acc[j] = 0.0
        c0 = g0
        while c0 < g1:      # SPLIT elements at a time: their arguments, then their exps
            c1 = c0 + SPLIT // W if c0 + SPLIT // W < g1 else g1
            for g in range(c0, c1):
                prefetch_group(ahead + g * W, ahead_w + g * W)
                for j in range(W):
                    k = (g - c0) * W + j
                    v = x[g * W + j]
                    R[k] = exp_arg(v, mx, &sc)
                    Sc[k] = sc
            if store == NULL:
                for g in range(c0, c1):
                    for j in range(W):
                        k = (g - c0) * W + j
                        es = exp_value_scaled(R[k], Sc[k])     # see sum_unscale
                        acc[j] += unless_max(es, x[g * W + j], mx)
            else:
                for g in range(c0, c1):
                    for j in range(W):
                        k = (g - c0) * W + j
                        v = x[g * W + j]                # read first: store may be x
                        es = exp_value_scaled(R[k], Sc[k])
                        store[g * W + j] = es
                        acc[j] += kept_term(es, v, mx)
            c0 = c1
        for j in range(W):
            two_sum_add(&tot[j], &comp[j], acc[j])
        g0 = g1
    if n % W:           # the lanes past n read nothing (masked): no scalar tail loop
        for j in range(W):
            i = ng * W + j
            v = x[i] if i < n else mx
            e = exp_diff_scaled(v, mx)
            acc[j] = 0.0 if v == mx and (store == NULL or kept_ones(v) or i >= n) else e
        for j in range(W):
            two_sum_add(&tot[j], &comp[j], acc[j])
        if store != NULL:
            for i in range(ng * W, n):
                store[i] = exp_diff_scaled(x[i], mx)
    for j in range(W):
        two_sum_add(&t, &c, tot[j])
        c += comp[j]
    return (t + c) * sum_unscale(mx)


cdef inline void prefetch_group(const floating* r, const floating* w) noexcept nogil:
    """Prefetch the W elements at r for reading and at w for writing: one or two cache lines
    each.  Prefetches never fault, so r and w may point past the end of an array."""
    cylsm_prefetch(r)
    cylsm_prefetchw(w)
    if sizeof(floating) * W > 64:
        cylsm_prefetch(r + W // 2)
        cylsm_prefetchw(w + W // 2)


cdef double super_sum(const floating* x, Py_ssize_t n, floating mx, floating* store,
                      const floating* ahead, const floating* ahead_w) noexcept nogil:
    """The sum of exp(x - mx) over the elements of x[0:n] (n <= SUPER) other than mx: lane
    sums within blocks of BLOCK, the blocks added with TwoSum.  The exps are also stored in
    store[0:n] when store is not NULL; ahead, ahead_w: see block_sumexp."""
    cdef Py_ssize_t b = 0, bn
    cdef double t = 0.0, c = 0.0
    while b < n:
        bn = BLOCK if n - b > BLOCK else n - b
        two_sum_add(&t, &c, block_sumexp(x + b, bn, mx, NULL if store == NULL else store + b,
                                         ahead + b, ahead_w + b))
        b += BLOCK
    return t + c


cdef inline Py_ssize_t super_len(Py_ssize_t n, Py_ssize_t k) noexcept nogil:
    return SUPER if n - k * SUPER > SUPER else n - k * SUPER


cdef double super_stats(const floating* x, Py_ssize_t n, double* m, double* count,
                        floating* store, const floating* ahead,
                        const floating* ahead_w) noexcept nogil:
    """Statistics of x[0:n] (n <= SUPER) in one read from memory (the sum pass finds the
    superblock in cache): OUT m: its maximum; OUT count: the number of elements equal to it;
    returns the sum of exp(x - m) over the others (0 if m is infinite, NaN if it is NaN).
    When store is not NULL and m is finite, float data sums the maxima too and count is 0 (see
    kept_term).  store, ahead, ahead_w: see super_sum."""
    cdef bint whole = store != NULL and not kept_ones(x[0])    # see kept_term
    cdef floating mx = super_max(x, n, NULL if whole else count)
    m[0] = mx
    if whole:           # the maxima are in the sum
        count[0] = 0.0
    if -INFINITY < mx < INFINITY:
        return super_sum(x, n, mx, store, ahead, ahead_w)
    return mx if mx != mx else 0.0


cdef void row_stats(const floating* x, Py_ssize_t n, double* M, double* L, double* S,
                    double* Q, int nt, floating* store, double* scale, const floating* ahead,
                    const floating* ahead_w) noexcept nogil:
    """M: max of the row (NaN ignored); with t the sum of exp(x - M) over the elements other
    than M and c >= 1 the number of elements equal to M: L = log1p((c - 1) + t), S = c + t,
    and Q the logsumexp M + L (see lse_parts).  The row is cut into superblocks of SUPER
    elements, each reduced by one thread to its own maximum m, count and sum (one pass over
    memory: blocks of BLOCK summed in lanes, blocks added with TwoSum); the superblocks are
    then combined in order, with TwoSum, those with m < M scaled by exp(m - M) in double: long
    rows do not drift, and the result is the same for any number of threads nt.  When store is
    not NULL and M is finite, exp(x - m) is stored there, with m the maximum of each
    superblock, and exp(m - M) in scale[k] for superblock k (0 where m is -inf: nothing was
    stored there); softmax then needs no second exp, and only S: L is left 0 (NaN if t is) and
    Q is M + L (for float data c is then 0 and t the whole sum, see kept_term).  ahead,
    ahead_w: what to prefetch while superblock k is summed, from ahead + k * SUPER and
    ahead_w + k * SUPER on (see block_sumexp): the next row, or for a long row ahead = x +
    SUPER, the next superblock, which is then in cache when its max pass reads it (logsumexp
    of a 64 MB row 20% faster)."""
    cdef Py_ssize_t ns = (n + SUPER - 1) // SUPER, k
    cdef int64_t mk = key(<floating>-INFINITY)
    cdef floating mx
    cdef double t = 0.0, c = 0.0, ones = 0.0, m_k, ones_k, sum_k, f_k
    cdef double one[3]
    cdef double* sval = one                 # per superblock: max, count, sum
    cdef bint par = nt > 1 and ns > 1       # superblocks reduced in parallel, kept in scratch
    if ns > 1:
        sval = <double*>malloc(3 * ns * sizeof(double))
        if sval == NULL:                    # the same result, one superblock at a time
            par = False
    if sval != NULL and ns > 1 or ns == 1:
        if par:
            for k in prange(ns, nogil=True, num_threads=nt, schedule="static"):
                sval[3 * k + 2] = super_stats(
                    x + k * SUPER, super_len(n, k), &sval[3 * k], &sval[3 * k + 1],
                    <floating*>NULL if store == NULL else store + k * SUPER,
                    ahead + k * SUPER, ahead_w + k * SUPER)
        else:
            for k in range(ns):
                sval[3 * k + 2] = super_stats(
                    x + k * SUPER, super_len(n, k), &sval[3 * k], &sval[3 * k + 1],
                    <floating*>NULL if store == NULL else store + k * SUPER,
                    ahead + k * SUPER, ahead_w + k * SUPER)
        for k in range(ns):
            mk = max_key(mk, key(<floating>sval[3 * k]))
    else:
        for k in range(ns):     # no scratch (out of memory): a second pass, same result
            mk = max_key(mk, key(super_max(x + k * SUPER, super_len(n, k), &ones_k)))
    mx = unkey(mk, &mx)
    M[0] = mx
    if not (-INFINITY < mx < INFINITY):
        L[0] = nonfinite_stats(x, n, 1, S)
        Q[0] = mx + L[0]
    else:
        for k in range(ns):
            if sval != NULL:
                m_k = sval[3 * k]
                ones_k = sval[3 * k + 1]
                sum_k = sval[3 * k + 2]
            else:
                sum_k = super_stats(x + k * SUPER, super_len(n, k), &m_k, &ones_k,
                                    <floating*>NULL if store == NULL else store + k * SUPER,
                                    ahead + k * SUPER, ahead_w + k * SUPER)
            if m_k == mx:
                ones += ones_k
                two_sum_add(&t, &c, sum_k)
                if scale != NULL:
                    scale[k] = 1.0
            else:               # m_k < mx: exp(m_k - mx) is 0 for -inf, NaN stays NaN
                f_k = exp_diff_s[double](m_k, mx)
                two_sum_add(&t, &c, (ones_k + sum_k) * f_k)
                if scale != NULL:
                    scale[k] = f_k
        if store != NULL:       # only S is used (see finish_stats)
            L[0] = 0.0 * (t + c)
            Q[0] = mx + L[0]
        elif floating is double:
            L[0] = lse_parts(mx, ones, t, c, Q)
        else:                   # (M + L in double is far more than float needs)
            L[0] = log1p((ones - 1.0) + (t + c))
            Q[0] = mx + L[0]
        S[0] = ones + (t + c)
    if ns > 1:
        free(sval)


cdef inline int64_t max_key(int64_t a, int64_t b) noexcept nogil:
    return a if a > b else b


cdef void col_stats(const floating* x, Py_ssize_t n, Py_ssize_t w, Py_ssize_t s,
                    double* M, double* L, double* S, double* Q, floating* store,
                    sums kind) noexcept nogil:
    """M, L, S (see row_stats) of w <= JB neighbouring columns of n elements, s apart, and
    when Q is not NULL their logsumexps (see finish_stats); store, kind: see panel_sumexp."""
    cdef floating m[JB]
    cdef double tot[JB]
    cdef double part[JB]
    cdef double comp[JB]
    cdef double ones[JB]
    cdef Py_ssize_t j
    cdef double* count = ones
    if store != NULL and not kept_ones(x[0]):   # counted in the sums (see kept_term)
        count = NULL
        for j in range(w):
            ones[j] = 0.0
    if w == JB:     # a constant width: the compiler keeps the panel's lanes in registers
        panel_max(x, n, JB, s, m, count)
        panel_sumexp(x, n, JB, s, m, tot, part, comp, store, kind)
    else:
        panel_max(x, n, w, s, m, count)
        panel_sumexp(x, n, w, s, m, tot, part, comp, store, kind)
    finish_stats(x, n, w, s, m, ones, tot, comp, M, L, S, Q, store == NULL)


cdef inline void finish_stats(const floating* x, Py_ssize_t n, Py_ssize_t w, Py_ssize_t s,
                              const floating* m, const double* ones, const double* tot,
                              const double* comp, double* M, double* L, double* S,
                              double* Q, bint logs) noexcept nogil:
    """M, L, S of w columns from their maxima m, counts of maxima and sums tot + comp of the
    rest, and when Q is not NULL their logsumexps M + L (float64: see lse_parts); the logs of
    all columns at once (vectorized), the non-finite columns then fixed one by one.  Without
    logs (where the exps are kept, only S is used) the finite columns get L = 0 (NaN where S
    is, for special_column): their log1p was a tenth of the time of float32 softmax over rows
    of 32."""
    cdef Py_ssize_t j
    if floating is double and Q != NULL:
        for j in range(w):
            L[j] = lse_parts(m[j], ones[j], tot[j], comp[j], &Q[j])
    elif logs or Q != NULL:
        for j in range(w):
            L[j] = cylsm_log1p((ones[j] - 1.0) + (tot[j] + comp[j]))
    else:               # 0, or NaN where the sum is (a NaN below a finite max)
        for j in range(w):
            L[j] = 0.0 * (tot[j] + comp[j])
    for j in range(w):
        M[j] = m[j]
        S[j] = ones[j] + (tot[j] + comp[j])
    for j in range(w):
        if not (-INFINITY < M[j] < INFINITY):
            L[j] = nonfinite_stats(x + j, n, s, &S[j])
    if Q != NULL:
        for j in range(w):
            if floating is float or not (-INFINITY < M[j] < INFINITY):
                Q[j] = M[j] + L[j]


cdef inline double lse_parts(double M, double ones, double t, double c,
                             double* Q) noexcept nogil:
    """L = log1p((ones - 1) + t + c) of a line whose finite max is M, with ones >= 1 maximal
    elements and t + c the sum of the exps of the others (c: a correction of t); OUT Q the
    logsumexp M + L, rounded once from M + L held in two doubles: where M and L cancel (M < 0
    < L), a rounded L alone would cost up to an ulp of L, more than SPEC's bound of an eps
    for |Q| < 1."""
    cdef double a = ones - 1.0
    cdef double T = a + t, bb, Tlo, lo, hi, q, e
    bb = T - a                              # TwoSum: T + Tlo = a + t exactly
    Tlo = ((a - (T - bb)) + (t - bb)) + c
    hi = cylsm_log1p_dd(T, Tlo, &lo)
    q = M + hi                              # TwoSum again
    bb = q - M
    e = (M - (q - bb)) + (hi - bb)
    Q[0] = q + (e + lo)
    return hi


# ---------------------------------------------------------------------------------------------
# One row (inner == 1) or one block of w <= JB columns (inner > 1) of each operation.  Each call
# is made by one thread and keeps its scratch on its own stack.

cdef enum:
    OP_LOG_SOFTMAX
    OP_SOFTMAX
    OP_LOGSUMEXP
    OP_LOGSUMEXP_BACKWARD     # g holds one upstream gradient per row / column
    OP_LOG_SOFTMAX_BACKWARD   # out = g - exp(q) * sum(g)
    OP_SOFTMAX_BACKWARD       # out = q * (g - sum(g * q))


cdef inline floating normalize(double e, double S, double R, floating kind) noexcept nogil:
    """e / S in the data type (that of kind, whose value is not used), for an exp e scaled as
    the sums are (see sum_unscale) and R = (1 / S) * unscale(kind).  float32 data multiplies by
    R in double: the product is within 2^-52 of the quotient, far below float32's rounding, and
    a division costs several times more.  float64 data takes the correctly rounded quotient
    (kept_quotient)."""
    if floating is float:
        return <float>(e * R)
    else:
        return kept_quotient(e, S, R)


cdef inline double kept_quotient(double e, double S, double R) noexcept nogil:
    """(e / S) * 2^-600 for a double exp e scaled as the sums are (see sum_unscale) and a sum
    S >= 1, R = 1/S rounded: e / S correctly rounded, then unscaled (a subnormal result is
    rounded once more, within 3/4 of its spacing; unscaled, the exps were rounded there before
    the division).  Where the target has a fused multiply-add, e * R corrected once: by
    Markstein's theorem, q = e R is within an ulp of e / S and R within half an ulp of 1 / S,
    so q + (e - q S) R (the remainder exact, by the fma) rounds to e / S, when nothing
    underflows; scaled, nothing does where the result is not 0 (e / S >= 2^-476, e and the
    remainder normal).  Checked against division on 2e8 pairs, midpoints included.  A
    division costs several times more: float64 softmax rows take 0.90 of the time."""
    cdef double q, r
    if CYLSM_FMA:
        q = e * R
        r = fma(-q, S, e)
        return fma(r, R, q) * CYLSM_UNSCALE64
    return (e / S) * CYLSM_UNSCALE64


cdef inline void kept_factors(double fs, floating kind, double* a, double* b) noexcept nogil:
    """a and b such that (e * a) * b is e * fs unscaled, for a stored exp e (scaled, see
    sum_unscale) of the data type of kind: a = fs * 2^-64 and b = 1 for float data; for double
    the same with 2^-600 where that product is normal (|fs| >= 2^-422), else a = fs and b =
    2^-600 (fs * 2^-600 would lose bits to the subnormal range, or all of them)."""
    a[0] = fs * sum_unscale(kind)
    b[0] = 1.0
    if floating is double and fabs(fs) < 9.232978617785736e-128:   # 2^-422
        a[0] = fs
        b[0] = CYLSM_UNSCALE64


cdef void stats_row(int op, const floating* x, const floating* g, floating* out,
                    Py_ssize_t n, int nt) noexcept nogil:
    """IN x: a row of n; IN g: its upstream gradient (OP_LOGSUMEXP_BACKWARD); OUT out.
    nt threads work on this one row (superblock by superblock)."""
    cdef double M, L, S, Q
    cdef double scale[KEEP_SUPER]
    cdef Py_ssize_t k, ns = (n + SUPER - 1) // SUPER
    cdef floating gr = g[0] if op == OP_LOGSUMEXP_BACKWARD else 0
    # softmax (or its multiple, logsumexp_backward) of a row that stays in cache: keep the
    # exps of the sum pass in out (for any nt, so that the result does not depend on it)
    cdef bint keep = ((op == OP_SOFTMAX or op == OP_LOGSUMEXP_BACKWARD)
                      and n * sizeof(floating) <= KEEP_BYTES)
    # a row that fits in cache fetches the next row (rows are contiguous), and the output it
    # writes next: its own, or with keep the next row's (its own is written right away); a
    # longer row fetches its next superblock (see row_stats)
    cdef bint ahead = nt == 1 and n * sizeof(floating) <= AHEAD_BYTES
    cdef const floating* ahead_w = x + BLOCK
    if ahead and op != OP_LOGSUMEXP:
        ahead_w = out + n if keep else out
    row_stats(x, n, &M, &L, &S, &Q, nt, out if keep else <floating*>NULL,
              &scale[0] if keep else <double*>NULL,
              x + n if ahead else x + SUPER, ahead_w)
    if keep and -INFINITY < M < INFINITY:
        if nt > 1 and ns > 1:
            for k in prange(ns, nogil=True, num_threads=nt, schedule="static"):
                kept_super(op, out + k * SUPER, super_len(n, k), scale[k], S, gr)
        else:
            for k in range(ns):
                kept_super(op, out + k * SUPER, super_len(n, k), scale[k], S, gr)
    elif op == OP_LOGSUMEXP:
        out[0] = <floating>Q
    else:
        row_outputs(op, x, g, out, n, M, L, S, nt)


cdef inline void kept_super(int op, floating* o, Py_ssize_t n, double scale, double S,
                            floating gr) noexcept nogil:
    """The output of a kept superblock of n (stats_row): its exps exp(x - m) in o, scale =
    exp(m - M), S the row's sum of exp(x - M): o * scale / S, times gr for logsumexp_backward.
    The exps are scaled (see sum_unscale: never subnormal, so that a large gr does not bring out
    a subnormal's rounding); the factors take the unscaling (fs: the factor without it)."""
    cdef Py_ssize_t i
    cdef double fs = (1.0 / S) * scale if op == OP_SOFTMAX else scale * (gr / S)
    cdef double a, b, R = 1.0 / S
    cdef float fh, fl
    if scale == 0.0:     # m == -inf: nothing was stored; or the terms underflow
        for i in range(n):
            o[i] = 0.0
    elif op == OP_SOFTMAX and floating is double:   # the quotient, as normalize (o * 1.0 is o)
        for i in range(n):
            o[i] = kept_quotient(o[i] * scale, S, R)
    elif floating is float and float_factor_ok(fs):
        cylsm_split_factor(fs, &fh, &fl)
        for i in range(n):
            o[i] = cylsm_times_factor(o[i], fh, fl)
    else:
        kept_factors(fs, gr, &a, &b)
        for i in range(n):
            o[i] = <floating>((o[i] * a) * b)


cdef inline bint float_factor_ok(double fs) noexcept nogil:
    """Whether scaled float exps (see sum_unscale) may be multiplied by fs (and unscaled) in float
    (cylsm_times_factor): where the target has a fused multiply-add, fs is 0 or 2^-100 <= |fs| <=
    2^62 (not NaN): fs rounded is then a normal float, the rest loses at most 2^-50 of fs to
    float's subnormal grid, and no product of an exp (at most 2^64) with it overflows."""
    return CYLSM_FMA and (fs == 0.0 or 7.888609052210118e-31 <= fabs(fs) <= 4.611686018427388e18)


cdef void tile_stats(const floating* T, Py_ssize_t n, double* M, double* L, double* S,
                     double* Q, floating* E, sums kind, lanes tw) noexcept nogil:
    """col_stats of the V = tile_width(tw, ...) columns of T (n x V, contiguous, n < SHORT; Q as
    there), with the width fixed at compile time so that the lanes stay in registers.  Each
    lane's arithmetic is the same at either width: the same bits.  When E is not NULL, the exps
    of the sum pass are stored there (as T, scaled: see sum_unscale), and float data sums the
    maxima too (see kept_term).  kind: see
    panel_sumexp."""
    cdef floating m[TILE]
    cdef double ones[TILE]
    cdef double part[TILE]
    cdef double tot[TILE]
    cdef double comp[TILE]
    cdef floating Ra[SPLIT]      # (see block_sumexp)
    cdef floating Sc[SPLIT]
    cdef Py_ssize_t k, k0, k1, c0, c1, i, j
    cdef Py_ssize_t run = RUN64 if floating is double else KC
    cdef floating v, e, sc
    cdef int32_t count[TILE]
    cdef int32_t m32[TILE]
    cdef int64_t m64[TILE]
    cdef int32_t k32
    cdef int64_t k64
    cdef Py_ssize_t V = tile_width(tw, <floating>0)
    for j in range(V):
        m32[j] = cylsm_key32(-INFINITY)
        m64[j] = cylsm_key64(-INFINITY)
        count[j] = 0
        tot[j] = 0.0
        comp[j] = 0.0
    # the maxima over integer keys, which vectorize (see block_max); the counts and sums then
    # compare as floats, so +0 and -0 are both counted and both left out of the sums (see
    # unless_max)
    if floating is float:
        for k in range(n):
            for j in range(V):
                k32 = cylsm_key32(T[k * V + j])
                m32[j] = k32 if k32 > m32[j] else m32[j]
        for j in range(V):
            m[j] = cylsm_unkey32(m32[j])
    else:
        for k in range(n):
            for j in range(V):
                k64 = cylsm_key64(T[k * V + j])
                m64[j] = k64 if k64 > m64[j] else m64[j]
        for j in range(V):
            m[j] = cylsm_unkey64(m64[j])
    if E == NULL or kept_ones(T[0]):
        for k in range(n):
            for j in range(V):
                count[j] += T[k * V + j] == m[j]
    for j in range(V):
        ones[j] = count[j]
    k0 = 0
    if floating is double and sums is short:    # one exact sum (add_exact), scaled as below
        for j in range(V):
            part[j] = 1.0 / sum_unscale(m[0])
        for k in range(n):
            for j in range(V):
                v = T[k * V + j]
                add_exact(&part[j], &comp[j], 0.0 if v == m[j] else exp_diff_scaled(v, m[j]))
        for j in range(V):
            tot[j] = part[j] - 1.0 / sum_unscale(m[0])
        k0 = n
    while k0 < n:
        k1 = k0 + run if k0 + run < n else n
        for j in range(V):
            part[j] = 0.0
        c0 = k0
        while c0 < k1:      # the arguments, then the exps, as in block_sumexp
            c1 = c0 + SPLIT // V if c0 + SPLIT // V < k1 else k1
            for k in range(c0, c1):
                for j in range(V):
                    i = (k - c0) * V + j
                    Ra[i] = exp_arg(T[k * V + j], m[j], &sc)
                    Sc[i] = sc
            if E == NULL:
                for k in range(c0, c1):
                    for j in range(V):
                        i = (k - c0) * V + j
                        e = exp_value_scaled(Ra[i], Sc[i])     # see sum_unscale
                        part[j] += unless_max(e, T[k * V + j], m[j])
            else:
                for k in range(c0, c1):
                    for j in range(V):
                        i = (k - c0) * V + j
                        v = T[k * V + j]
                        e = exp_value_scaled(Ra[i], Sc[i])
                        E[k * V + j] = e
                        part[j] += kept_term(e, v, m[j])
            c0 = c1
        if floating is double and E != NULL:    # (unscaled here: at the end, the loop
            for j in range(V):                  # above went scalar; the kept exps' sums
                part[j] *= sum_unscale(m[0])    # are at least 1, with the maxima)
        for j in range(V):
            two_sum_add(&tot[j], &comp[j], part[j])
        k0 = k1
    if floating is float:
        for j in range(V):
            tot[j] = (tot[j] + comp[j]) * unscale(m[0])
            comp[j] = 0.0
    elif E == NULL:
        for j in range(V):
            tot[j] *= sum_unscale(m[0])
            comp[j] *= sum_unscale(m[0])
    finish_stats(T, n, V, V, m, ones, tot, comp, M, L, S, Q, E == NULL)


cdef void stats_short_rows(int op, const floating* x, const floating* g, floating* out,
                           Py_ssize_t R, Py_ssize_t n) noexcept nogil:
    """stats_row for R <= TILE rows of n < SHORT elements (g and out advance by one per row
    for OP_LOGSUMEXP_BACKWARD / OP_LOGSUMEXP).  A row that short leaves the row kernel's lanes
    mostly idle, so the tile is transposed into a buffer and the column kernel works across the
    rows, one lane per row.  Each row's result depends on that row alone (a lane's arithmetic
    is the same in every lane and at either tile width).  softmax and logsumexp_backward keep
    the exps of the sum pass (as computed: the same results as a second exp)."""
    if op == OP_LOGSUMEXP and R <= EXACT_LANES:     # (not 4 float64 lanes: GCC unrolls a
        short_tile(op, x, g, out, R, n, <short>0)   # loop over 4 whole, then takes each
                                                    # lane's exp in scalar code)
    elif R <= tile_width(<long>0, <floating>0):     # a few rows: not TILE - R copies of the last
        short_tile(op, x, g, out, R, n, <long>0)
    else:
        short_tile(op, x, g, out, R, n, <int>0)


cdef inline void short_tile(int op, const floating* x, const floating* g, floating* out,
                            Py_ssize_t R, Py_ssize_t n, lanes tw) noexcept nogil:
    """stats_short_rows in a tile of V = tile_width(tw, ...) >= R lanes."""
    cdef floating Tb[SHORT * TILE + 16]     # T and E at 64 bytes (see align64)
    cdef floating Eb[SHORT * TILE + 16]
    cdef floating* T = align64(&Tb[0])
    cdef floating* E = align64(&Eb[0])
    cdef double M[TILE]
    cdef double L[TILE]
    cdef double S[TILE]
    cdef double Q[TILE]
    cdef Py_ssize_t r, k
    cdef Py_ssize_t V = tile_width(tw, <floating>0)
    cdef bint keep = op == OP_SOFTMAX or op == OP_LOGSUMEXP_BACKWARD
    cdef bint finite = True
    if R == V:
        transpose_in(x, n, T, V, V, n)
    else:                           # a short last tile repeats its last row
        for k in range(n):
            for r in range(V):
                T[k * V + r] = x[(r if r < R else R - 1) * n + k]
    if op == OP_LOGSUMEXP:
        tile_stats(T, n, M, L, S, Q, <floating*>NULL, <short>0, tw)
    else:
        tile_stats(T, n, M, L, S, <double*>NULL, E if keep else <floating*>NULL, <char>0, tw)
    if keep:            # the outputs, across the rows (vectorized), into T; then transposed
        kept_tile(op, E, T, n, g, R, S, tw)
        for r in range(R):
            finite = finite and -INFINITY < M[r] < INFINITY
        if finite and R == V:   # every row kept: the tile is the output, transposed
            transpose(T, V, out, n, n, V)
            return
    if floating is float and op == OP_LOG_SOFTMAX and CYLSM_VECTORS:
        cylsm_log_softmax_rows_f32(x, out, R, n, M, L)     # row_output's, in one call
        return
    for r in range(R):
        if keep and -INFINITY < M[r] < INFINITY:
            for k in range(n):
                out[r * n + k] = T[k * V + r]
        elif op == OP_LOGSUMEXP:
            out[r] = <floating>Q[r]
        else:
            row_output(op, x + r * n, g + r if op == OP_LOGSUMEXP_BACKWARD else g,
                       out + r * n, n, M[r], L[r], S[r])


cdef inline void kept_tile(int op, const floating* E, floating* T, Py_ssize_t n, const floating* g,
                           Py_ssize_t R, const double* S, lanes tw) noexcept nogil:
    """OUT T (n x V, V = tile_width(tw, ...)): softmax (op OP_SOFTMAX) or logsumexp_backward
    (gradients g[0:R]) of the rows of a tile whose exps are E (n x V, relative to each row's
    maximum) and whose sums of them are S, as the kept rows of stats_row: E / S, and
    E * (g / S).  E is scaled (see sum_unscale): the factors take the unscaling.  float data
    multiplies in float as kept_super does (cylsm_times_factor) when every lane's factor allows
    it."""
    cdef double f[TILE]
    cdef double b[TILE]
    cdef float fh[TILE]
    cdef float fl[TILE]
    cdef Py_ssize_t k, j
    cdef Py_ssize_t V = tile_width(tw, <floating>0)
    cdef bint in_float = floating is float
    if floating is float:
        for j in range(V):
            f[j] = 1.0 / S[j] if op == OP_SOFTMAX else g[j if j < R else R - 1] / S[j]
            in_float = in_float & float_factor_ok(f[j])     # (&: a loop without branches)
        if in_float:
            for j in range(V):
                cylsm_split_factor(f[j], &fh[j], &fl[j])
    if floating is float and in_float:
        cylsm_tile_times_factor(E, T, n, V, fh, fl)
    elif op == OP_SOFTMAX:
        for j in range(V):
            f[j] = (1.0 / S[j]) * unscale(T[0])
        for k in range(n):
            for j in range(V):
                T[k * V + j] = normalize(E[k * V + j], S[j], f[j], T[0])
    else:
        for j in range(V):
            kept_factors(g[j if j < R else R - 1] / S[j], T[0], &f[j], &b[j])
        for k in range(n):
            for j in range(V):
                T[k * V + j] = <floating>((E[k * V + j] * f[j]) * b[j])


cdef inline bint nonpositive(const float* y, Py_ssize_t n) noexcept nogil:
    """Whether no y is > 0 (NaN is not)."""
    cdef Py_ssize_t i
    cdef int c = 0
    for i in range(n):
        c += y[i] > 0
    return c == 0


cdef inline bint grad_float_ok(double M) noexcept nogil:
    """Whether log_softmax_backward's output for a line whose gradient sums to M may be formed
    in float (see log_softmax_grad_float)."""
    return CYLSM_FMA and (M == 0.0 or 4.0 * CYLSM_UNSCALE <= fabs(M) <= 68719476736.0)  # 2^36


cdef bint log_softmax_grad_float(const float* y, const float* g, float* out, Py_ssize_t n,
                                 double M) noexcept nogil:
    """out = g - exp(y) * M for a row (or superblock) of float data, M being the sum of the row's
    gradient g: log_softmax_backward's output, rounded once.  Whether it was done (if not,
    row_output does it in double): where the target has a fused multiply-add and M is 0 or
    within 2^-62..2^36, in float with twice the lanes (15-30% faster): the scaled exp (about 1.0
    ulp, against exp_wide's 1.4) times M rounded to float (half an ulp) in one fused
    multiply-add.  Worst error measured, in units of 2^-24 (|g| + exp(y) sum |g|): 1.5, against
    1.1 in double and 2.3 for the plain float formula that torch and jax evaluate.  (Within
    those bounds M's float is normal, and the exps that the scaled exp flushes to 0 contribute
    less than half of float's smallest subnormal.) The scaled exp needs y <= 0, as log_softmax
    gives (NaN is fine): the y > 0 are counted on the way, and if there are any, the row is left
    to be done again.  In place (out is y or g) that would be too late: the y are checked first
    (which costs a pass, stalled on loads). The result depends on the row alone, not on its
    neighbours nor on out.  Out of line, one call per row: a variant that took a tile of short
    rows at once made GCC stop inlining row_output and run_task (10-20% slower short rows of the
    other backward ops)."""
    cdef Py_ssize_t i
    cdef int positive = 0
    cdef float Ms, v
    if grad_float_ok(M) and ((out != y and out != g) or nonpositive(y, n)):
        Ms = <float>(M * CYLSM_UNSCALE)     # the exps are scaled by 2^64
        for i in range(n):
            v = y[i]            # read once: out may be y
            out[i] = fmaf(-cylsm_expf_nonpos_scaled(v, 0.0), Ms, g[i])
            positive += v > 0
        return positive == 0
    return False


cdef void softmax_output(const floating* x, floating* out, Py_ssize_t n, floating M, double S,
                         double R) noexcept nogil:
    """softmax's output exp(x - M) / S for a row (or superblock) whose exps were not kept (R: as
    normalize takes it): the arguments, then the exps, SPLIT at a time as in
    block_sumexp (1x16M: 0.90-0.93 of the time).  Out of line: its buffers in row_output, which
    every row of the other ops calls, made short rows of the backward ops 9-16% slower.  (The
    same for logsumexp_backward's long rows, 0.89-0.94, made softmax_backward's short rows 3%
    slower, GCC inlining row_output differently: not done.)"""
    cdef floating Ra[SPLIT]
    cdef floating Sc[SPLIT]
    cdef floating sc
    cdef Py_ssize_t i, i0 = 0, i1
    while i0 < n:           # (x[i0:i1] read before out[i0:i1] is written: out may be x)
        i1 = i0 + SPLIT if i0 + SPLIT < n else n
        for i in range(i0, i1):
            Ra[i - i0] = exp_arg(x[i], M, &sc)
            Sc[i - i0] = sc
        for i in range(i0, i1):
            out[i] = normalize(exp_value_scaled(Ra[i - i0], Sc[i - i0]), S, R, sc)
        i0 = i1


cdef inline void row_output(int op, const floating* x, const floating* g, floating* out,
                            Py_ssize_t n, double M, double L, double S) noexcept nogil:
    """The output of op for a row of n whose statistics are M, L, S.  For the backward ops of
    log_softmax and softmax, x is the forward output, g the row's gradient and M its sum
    (softmax: of g * x; M + L, L being what the rounded M leaves out: see row_sum)."""
    cdef double gr, R = 1.0 / S
    cdef Py_ssize_t i
    cdef float Mh, Ml
    if op == OP_LOG_SOFTMAX:
        if floating is float and CYLSM_VECTORS:
            cylsm_log_softmax_rows_f32(x, out, 1, n, &M, &L)    # the same, in intrinsics
            return
        for i in range(n):
            out[i] = <floating>((x[i] - M) - L)
    elif op == OP_SOFTMAX:
        softmax_output(x, out, n, <floating>M, S, R * unscale(x[0]))
    elif op == OP_LOG_SOFTMAX_BACKWARD:     # in double, rounded once, unless in float
        if floating is float:
            if log_softmax_grad_float(x, g, out, n, M):
                return
        for i in range(n):
            out[i] = <floating>log_softmax_grad(g[i], x[i], M)
    elif op == OP_SOFTMAX_BACKWARD:
        if floating is float:
            if softmax_grad_float_ok(M):
                Mh = <float>M
                Ml = <float>(M - Mh)
                for i in range(n):
                    out[i] = softmax_grad_float(x[i], g[i], Mh, Ml)
                return
        for i in range(n):
            out[i] = <floating>(x[i] * ((g[i] - M) - L))
    else:
        gr = g[0]
        if M == -INFINITY:      # logsumexp is -inf: the gradient is exactly 0
            gr = 0.0
            M = 0.0
        if floating is float:   # exp(x - M) in float (exact difference, scaled: see unscale),
            gr = gr * cylsm_exp(-L) * CYLSM_UNSCALE      # exp(-L) once in double
            for i in range(n):
                out[i] = <floating>(gr * exp_diff_s(x[i], <floating>M))
        else:
            for i in range(n):
                out[i] = <floating>(gr * exp_diff2(x[i], M, L))


cdef extern from "cylsm_stream.h" nogil:
    const bint CYLSM_STREAMING
    void cylsm_stream_f32(float* d, const float* s, Py_ssize_t n) noexcept
    void cylsm_stream_f64(double* d, const double* s, Py_ssize_t n) noexcept
    void cylsm_stream_fence() noexcept


cdef void streamed_output(const floating* p, const floating* g, floating* out, Py_ssize_t n,
                          double M, double L) noexcept nogil:
    """softmax_backward's row_output for a row (or superblock), STREAM_CHUNK elements at a
    time into a buffer, then copied to out by streaming stores (cylsm_stream.h): the same
    values, without reading out's lines into the cache first.  run() streams softmax_backward's
    rows (not short ones) into an out of STREAM_BYTES or more that is neither input: its output
    pass reads p and g from the cache (its sum pass read them), so the output's lines are the
    one stream to memory it can save (rows of 1024 to 262144 and one long row, both dtypes, 1
    and 2 threads: 0.75-0.95 of the time; float64 rows of 1024 at one thread 0.86-1.07).  Not
    done, as measured slower: short rows (1.04-1.45: a tile's output is 2 KiB), in place
    (1.3-2.1: out's lines are cached), log_softmax_backward (1.1-1.3: its output pass reads p
    from memory); log_softmax's output was no faster."""
    cdef floating space[STREAM_CHUNK + 16]      # (64 bytes or more to align: see align64)
    cdef floating* buf = align64(&space[0])
    cdef Py_ssize_t i = 0, m
    while i < n:
        m = STREAM_CHUNK if n - i > STREAM_CHUNK else n - i
        row_output(OP_SOFTMAX_BACKWARD, p + i, g + i, buf, m, M, L, 1.0)
        if floating is float:
            cylsm_stream_f32(out + i, buf, m)
        else:
            cylsm_stream_f64(out + i, buf, m)
        i += m


cdef void row_outputs(int op, const floating* x, const floating* g, floating* out,
                      Py_ssize_t n, double M, double L, double S, int nt) noexcept nogil:
    """row_output for a row, by nt threads, superblock by superblock and last first: the
    superblocks that the statistics pass read last are still in the cache.  With the same
    static schedule as that pass, each thread starts on superblocks read last by a thread."""
    cdef Py_ssize_t ns = (n + SUPER - 1) // SUPER, k, kk
    cdef bint per_element_g = op == OP_LOG_SOFTMAX_BACKWARD or op == OP_SOFTMAX_BACKWARD
    if ns == 1:
        row_output(op, x, g, out, n, M, L, S)
    elif nt > 1:
        for k in prange(ns, nogil=True, num_threads=nt, schedule="static"):
            kk = ns - 1 - k
            row_output(op, x + kk * SUPER, g + kk * SUPER if per_element_g else g,
                       out + kk * SUPER, super_len(n, kk), M, L, S)
    else:
        for k in range(ns - 1, -1, -1):
            row_output(op, x + k * SUPER, g + k * SUPER if per_element_g else g,
                       out + k * SUPER, super_len(n, k), M, L, S)


cdef void streamed_row(const floating* g, const floating* p, floating* out, Py_ssize_t n,
                       int nt) noexcept nogil:
    """backward_row for softmax_backward, its output by streamed_output (with threads, each
    fences its stores after each superblock; run() fences the calling thread's)."""
    cdef Py_ssize_t ns = (n + SUPER - 1) // SUPER, k, kk
    cdef double L
    cdef double M = row_sum(g, p, n, nt, &L)
    if nt > 1 and ns > 1:
        for k in prange(ns, nogil=True, num_threads=nt, schedule="static"):
            kk = ns - 1 - k
            streamed_output(p + kk * SUPER, g + kk * SUPER, out + kk * SUPER,
                            super_len(n, kk), M, L)
            cylsm_stream_fence()
    else:
        for k in range(ns - 1, -1, -1):
            streamed_output(p + k * SUPER, g + k * SUPER, out + k * SUPER, super_len(n, k), M, L)


cdef void stats_cols(int op, const floating* x, const floating* g, floating* out,
                     Py_ssize_t n, Py_ssize_t w, Py_ssize_t s) noexcept nogil:
    """As stats_row for w neighbouring columns, s apart; g and out (OP_LOGSUMEXP) hold w values.
    softmax and logsumexp_backward keep the exps of the sum pass in out, as stats_row does,
    where the panel of JB columns fits in KEEP_BYTES: one exp per element instead of two."""
    cdef double M[JB]
    cdef double L[JB]
    cdef double S[JB]
    cdef Py_ssize_t j
    cdef double R[JB]
    cdef bint keep = ((op == OP_SOFTMAX or op == OP_LOGSUMEXP_BACKWARD)
                      and n * JB * sizeof(floating) <= KEEP_BYTES)
    if op == OP_LOGSUMEXP:          # (R holds the logsumexps)
        col_stats(x, n, w, s, M, L, S, R, <floating*>NULL, <short>0)
        for j in range(w):
            out[j] = <floating>R[j]
        return
    if keep:
        kept_cols(op, x, g, out, n, w, s)
        return
    col_stats(x, n, w, s, M, L, S, <double*>NULL, <floating*>NULL, <char>0)
    for j in range(w):
        R[j] = (1.0 / S[j]) * unscale(x[0])     # (see normalize)
    if op == OP_LOGSUMEXP_BACKWARD:
        for j in range(w):
            S[j] = g[j]             # S now holds the upstream gradient (float: times exp(-L),
            if M[j] == -INFINITY:   # and scaled)
                S[j] = 0.0
                M[j] = 0.0
            if floating is float:
                S[j] = S[j] * cylsm_exp(-L[j]) * CYLSM_UNSCALE
    if w == JB:     # a constant width, as in col_stats
        panel_output(op, x, out, n, JB, s, M, L, S, R)
    else:
        panel_output(op, x, out, n, w, s, M, L, S, R)


cdef void kept_cols(int op, const floating* x, const floating* g, floating* out,
                    Py_ssize_t n, Py_ssize_t w, Py_ssize_t s) noexcept nogil:
    """stats_cols for softmax and logsumexp_backward with their exps kept in out."""
    cdef double M[JB]
    cdef double L[JB]
    cdef double S[JB]
    cdef double F[JB]
    cdef double B[JB]
    cdef Py_ssize_t j
    col_stats(x, n, w, s, M, L, S, <double*>NULL, out, <char>0)
    for j in range(w):      # the factors of a kept (scaled) column (see panel_kept)
        if op == OP_SOFTMAX:
            F[j] = (1.0 / S[j]) * unscale(x[0])
        else:
            kept_factors(g[j] / S[j], x[0], &F[j], &B[j])
        if S[j] != S[j]:    # the max is not finite (S is NaN): out holds x's column
            special_column(op, out + j, n, s, M[j], L[j],
                           g[j] if op == OP_LOGSUMEXP_BACKWARD else 0.0)
            F[j] = 1.0      # (softmax's is NaN throughout, as normalize leaves it)
            B[j] = 1.0
    if w == JB:
        panel_kept(op, out, n, JB, s, S, F, B)
    else:
        panel_kept(op, out, n, w, s, S, F, B)


cdef inline void panel_kept(int op, floating* out, Py_ssize_t n, Py_ssize_t w, Py_ssize_t s,
                            const double* S, const double* F, const double* B) noexcept nogil:
    """The output pass of stats_cols over the exps it kept in out: softmax normalizes them by
    S[j] (F[j]: R as normalize takes it), the same bits as panel_output; logsumexp_backward
    multiplies them by F[j], then for float64 by B[j] (see kept_factors)."""
    cdef Py_ssize_t i, j
    cdef floating* orow
    for i in range(n):
        orow = out + i * s
        if op == OP_SOFTMAX:
            for j in range(w):
                orow[j] = normalize(orow[j], S[j], F[j], orow[0])
        elif floating is float:
            for j in range(w):
                orow[j] = <floating>(orow[j] * F[j])
        else:
            for j in range(w):
                orow[j] = (orow[j] * F[j]) * B[j]


cdef void special_column(int op, floating* o, Py_ssize_t n, Py_ssize_t s, double M, double L,
                         double g) noexcept nogil:
    """In place over a column o (n elements, s apart) whose max M is not finite (L: 0, or NaN
    if it has a NaN), what panel_output gives there: softmax NaN; logsumexp_backward (upstream
    gradient g) NaN at +inf entries and g * 0 elsewhere, 0 where M is -inf, NaN throughout
    where L is NaN.  (Not panel_output itself: a third call of it made GCC stop inlining it,
    and the column log_softmax got 4-11% slower.)"""
    cdef Py_ssize_t i
    cdef double f = NAN if op == OP_SOFTMAX else (0.0 if M == -INFINITY else g) * (L * 0.0 + 1.0)
    for i in range(n):
        o[i * s] = <floating>(f * (NAN if o[i * s] == INFINITY else 0.0))


cdef inline void panel_output(int op, const floating* x, floating* out, Py_ssize_t n,
                              Py_ssize_t w, Py_ssize_t s, const double* M, const double* L,
                              const double* S, const double* R) noexcept nogil:
    """The output pass of stats_cols (logsumexp_backward: S holds the gradients)."""
    cdef Py_ssize_t i, j
    cdef const floating* xr
    cdef floating* orow
    for i in range(n):
        xr = x + i * s
        orow = out + i * s
        if op == OP_LOG_SOFTMAX:
            for j in range(w):
                orow[j] = <floating>((xr[j] - M[j]) - L[j])
        elif op == OP_SOFTMAX:      # R[j]: as normalize takes it
            for j in range(w):
                orow[j] = normalize(exp_diff_scaled(xr[j], <floating>M[j]), S[j], R[j], xr[0])
        elif floating is float:     # S[j] holds grad * exp(-L), scaled as the exps are
            for j in range(w):
                orow[j] = <floating>(S[j] * exp_diff_s(xr[j], <floating>M[j]))
        else:
            for j in range(w):
                orow[j] = <floating>(S[j] * exp_diff2(xr[j], M[j], L[j]))


cdef inline double block_sum(const floating* g, const floating* q, Py_ssize_t n) noexcept nogil:
    """The sum of g[0:n] (times q when q is not NULL) in W lanes held in registers.  (Software
    prefetching, as in block_sumexp, made the backward ops slower: the hardware prefetcher
    keeps up with their cheap loops.)"""
    cdef double acc[W]
    cdef Py_ssize_t b, j, i, nb = n // W
    cdef double t = 0.0
    if floating is float and CYLSM_VECTORS:
        return cylsm_dot_f32(g, q, n)       # the same, in intrinsics
    for j in range(W):
        acc[j] = 0.0
    if q == NULL:
        for b in range(nb):
            for j in range(W):
                acc[j] += g[b * W + j]
    else:
        for b in range(nb):
            for j in range(W):
                acc[j] += <double>g[b * W + j] * <double>q[b * W + j]
    t = cylsm_sum_lanes16(acc)  # a fixed pairwise order (W == 16)
    for i in range(nb * W, n):
        t += g[i] if q == NULL else <double>g[i] * <double>q[i]
    return t


cdef inline double block_dot2(const floating* g, const floating* q, Py_ssize_t n,
                              double* lo) noexcept nogil:
    """block_sum of g * q for double data in twice the precision (dot2_add) in W lanes: the
    sum's high part, and its low part added to lo."""
    cdef double hi_[W]
    cdef double lo_[W]
    cdef Py_ssize_t b, j, i, nb = n // W
    cdef double t = 0.0
    if nb == 0:
        for i in range(n):
            dot2_add(&t, &lo[0], g[i], q[i])
        return t
    for j in range(W):      # the first W products start the lanes (zeroing them took a fifth
        hi_[j] = cylsm_two_prod(g[j], q[j], &lo_[j])    # of the time on rows of 32)
    for b in range(1, nb):
        for j in range(W):
            dot2_add(&hi_[j], &lo_[j], g[b * W + j], q[b * W + j])
    fold_two_sums(hi_, lo_, W // 2)    # the lanes added pairwise: a short chain, for short rows
    fold_two_sums(hi_, lo_, W // 4)
    fold_two_sums(hi_, lo_, W // 8)
    fold_two_sums(hi_, lo_, W // 16)
    for i in range(nb * W, n):
        dot2_add(&hi_[0], &lo_[0], g[i], q[i])
    lo[0] += lo_[0]
    return hi_[0]


cdef inline void fold_two_sums(double* hi, double* lo, Py_ssize_t h) noexcept nogil:
    """hi[j] + lo[j] += hi[j + h] + lo[j + h] for j < h, the addition of the hi by TwoSum."""
    cdef Py_ssize_t j
    cdef double t, bb
    for j in range(h):
        t = hi[j] + hi[j + h]
        bb = t - hi[j]
        lo[j] += lo[j + h] + ((hi[j] - (t - bb)) + (hi[j + h] - bb))
        hi[j] = t


cdef double super_rsum(const floating* g, const floating* q, Py_ssize_t n,
                       double* lo) noexcept nogil:
    """The sum of g (times q when q is not NULL) over n <= SUPER elements: blocks of BLOCK
    summed in lanes, the blocks added with TwoSum.  For double data and q, the sum in twice
    the precision (block_dot2): its high part, the low part in lo; else the sum, lo 0."""
    cdef Py_ssize_t b = 0, bn
    cdef double t = 0.0, c = 0.0
    cdef bint dot2 = floating is double and q != NULL
    while b < n:
        bn = BLOCK if n - b > BLOCK else n - b
        if dot2:
            two_sum_add(&t, &c, block_dot2(g + b, q + b, bn, &c))
        else:
            two_sum_add(&t, &c, block_sum(g + b, <const floating*>NULL if q == NULL else
                                          q + b, bn))
        b += BLOCK
    lo[0] = c if dot2 else 0.0
    return t if dot2 else t + c


cdef double row_sum(const floating* g, const floating* q, Py_ssize_t n, int nt,
                    double* lo) noexcept nogil:
    """The sum of g (times q when q is not NULL) over a row: superblocks of SUPER summed by
    super_rsum (by nt threads), their sums added in order with TwoSum, so that the result
    does not depend on nt.  OUT lo: what the rounded sum leaves out (see super_rsum: 0 but
    for double data and q)."""
    cdef Py_ssize_t ns = (n + SUPER - 1) // SUPER, k
    cdef double t = 0.0, c = 0.0, h, l = 0.0
    cdef double* part = NULL
    if nt > 1 and ns > 1:
        part = <double*>malloc(2 * ns * sizeof(double))     # NULL: serial, the same result
    if part != NULL:
        for k in prange(ns, nogil=True, num_threads=nt, schedule="static"):
            part[k] = super_rsum(g + k * SUPER, <const floating*>NULL if q == NULL else
                                 q + k * SUPER, super_len(n, k), &part[ns + k])
    for k in range(ns):
        if part != NULL:
            h = part[k]
            l = part[ns + k]
        else:
            h = super_rsum(g + k * SUPER, <const floating*>NULL if q == NULL else q + k * SUPER,
                           super_len(n, k), &l)
        two_sum_add(&t, &c, h)
        if floating is double and q != NULL:
            c += l
    free(part)
    if floating is double and q != NULL:
        return split_sum(t, c, lo)
    lo[0] = 0.0
    return t + c


cdef void backward_row(int op, const floating* g, const floating* q, floating* out,
                       Py_ssize_t n, int nt) noexcept nogil:
    """One row of a log_softmax/softmax backward op, by nt threads (superblock by superblock)."""
    cdef double Gl
    cdef double G = row_sum(g, <const floating*>NULL if op == OP_LOG_SOFTMAX_BACKWARD else q,
                            n, nt, &Gl)
    row_outputs(op, q, g, out, n, G, Gl, 1.0, nt)


cdef void backward_short_rows(int op, const floating* g, const floating* q, floating* out,
                              Py_ssize_t R, Py_ssize_t n) noexcept nogil:
    """backward_row for R rows of n < SHORT elements, without its superblocks and threads (a
    row this short is part of one block)."""
    cdef Py_ssize_t r
    cdef double G, Gl
    if floating is float and op == OP_SOFTMAX_BACKWARD and CYLSM_VECTORS:
        cylsm_softmax_bwd_rows_f32(g, q, out, R, n)     # the same, in intrinsics
        return
    for r in range(R):
        if floating is double and op == OP_SOFTMAX_BACKWARD:
            Gl = 0.0
            G = block_dot2(g + r * n, q + r * n, n, &Gl)
            G = split_sum(G, Gl, &Gl)
        else:
            G = block_sum(g + r * n, <const floating*>NULL if op == OP_LOG_SOFTMAX_BACKWARD else
                          q + r * n, n)
            Gl = 0.0
        row_output(op, q + r * n, g + r * n, out + r * n, n, G, Gl, 1.0)


cdef void backward_cols(int op, const floating* g, const floating* q, floating* out,
                        Py_ssize_t n, Py_ssize_t w, Py_ssize_t s) noexcept nogil:
    """The backward ops over w neighbouring columns (s apart), in one panel: a pass of the
    sums, then the output pass, each walking the rows' contiguous runs of w.  Scratch: 3
    doubles, 2 floats and a flag per column, up to JB columns on the stack, else from malloc
    (each array 64-byte aligned); where malloc fails, panels of JB columns (the same result:
    a column's result depends on it alone)."""
    cdef double tot_s[JB]
    cdef double part_s[JB]
    cdef double comp_s[JB]
    cdef float f1_s[JB]
    cdef float f2_s[JB]
    cdef int32_t flags_s[JB]
    cdef double* tot = tot_s
    cdef double* part = part_s
    cdef double* comp = comp_s
    cdef float* f1 = f1_s
    cdef float* f2 = f2_s
    cdef int32_t* flags = flags_s
    cdef void* heap = NULL
    cdef Py_ssize_t j0, ps = (w + 15) // 16 * 16      # the stride of the arrays in heap
    cdef const floating* q_sum = q         # what the sums multiply g by (NULL: nothing)
    if op == OP_LOG_SOFTMAX_BACKWARD:
        q_sum = NULL
    if w > JB:
        heap = malloc(ps * (3 * sizeof(double) + 2 * sizeof(float) + sizeof(int32_t)) + 64)
        if heap == NULL:
            j0 = 0
            while j0 < w:
                backward_cols(op, g + j0, q + j0, out + j0, n, JB if w - j0 > JB else w - j0, s)
                j0 += JB
            return
        tot = align64(<double*>heap)
        part = tot + ps
        comp = part + ps
        f1 = <float*>(comp + ps)
        f2 = f1 + ps
        flags = <int32_t*>(f2 + ps)
    if w == JB:     # a constant width, as in col_stats
        panel_sum(g, q_sum, n, JB, s, tot_s, part_s, comp_s)
        panel_grad_output(op, g, q, out, n, JB, s, tot_s, comp_s, f1_s, f2_s, flags_s)
    else:
        panel_sum(g, q_sum, n, w, s, tot, part, comp)
        panel_grad_output(op, g, q, out, n, w, s, tot, comp, f1, f2, flags)
    free(heap)


cdef inline bint log_softmax_grad_float_cols(const float* g, const float* y, float* out,
                                             Py_ssize_t n, Py_ssize_t w, Py_ssize_t s,
                                             const double* tot, float* Ms,
                                             int32_t* bad) noexcept nogil:
    """log_softmax_grad_float for the w columns of a panel (s apart; tot their gradients'
    sums), decided column by column, so that a column's result depends on it alone: the
    columns that may be formed in float are, and if any may not (its sum out of range, or a
    y > 0), those are done in double, one by one.  Whether all were done (False: nothing was,
    the caller does the panel in double).  In place (out is y or g) the y are checked first
    and the columns done in double are not written in the float pass.  Ms and bad: scratch
    of w."""
    cdef Py_ssize_t i, j
    cdef int32_t nbad = 0
    cdef float v, e
    cdef bint in_place = out == y or out == g
    for j in range(w):
        Ms[j] = <float>(tot[j] * CYLSM_UNSCALE)     # the exps are scaled by 2^64
        bad[j] = not grad_float_ok(tot[j])
        nbad += bad[j]
    if nbad == w:
        return False
    if in_place:
        for i in range(n):
            for j in range(w):
                bad[j] += y[i * s + j] > 0
        for i in range(n):
            for j in range(w):
                e = fmaf(-cylsm_expf_nonpos_scaled(y[i * s + j], 0.0), Ms[j], g[i * s + j])
                out[i * s + j] = e if bad[j] == 0 else out[i * s + j]
    else:
        for i in range(n):
            for j in range(w):
                v = y[i * s + j]
                out[i * s + j] = fmaf(-cylsm_expf_nonpos_scaled(v, 0.0), Ms[j], g[i * s + j])
                bad[j] += v > 0
    for j in range(w):      # rare: one column at a time, as row_output's double formula
        if bad[j]:
            for i in range(n):
                out[i * s + j] = <float>log_softmax_grad(g[i * s + j], y[i * s + j], tot[j])
    return True


cdef inline bint softmax_grad_float_cols(const float* g, const float* p, float* out,
                                         Py_ssize_t n, Py_ssize_t w, Py_ssize_t s,
                                         const double* tot, float* Mh, float* Ml,
                                         int32_t* ok) noexcept nogil:
    """softmax_grad_float for the w columns of a panel (s apart; tot their sums of
    g * p), decided column by column, so that a column's result depends on it alone: the
    columns that may be formed in float are, and the others (rare: a sum that is not finite or
    beyond 2^100) in double, element by element as read (out may be g or p).  Whether all were
    done (False: none was, the caller does the panel in double).  Mh, Ml and ok: scratch of
    w."""
    cdef Py_ssize_t i, j
    cdef int32_t nbad = 0
    cdef float v, pv, gv
    for j in range(w):
        ok[j] = softmax_grad_float_ok(tot[j])
        Mh[j] = <float>tot[j] if ok[j] else 0.0
        Ml[j] = <float>(tot[j] - Mh[j]) if ok[j] else 0.0
        nbad += not ok[j]
    if nbad == w:
        return False
    if nbad == 0:
        for i in range(n):
            for j in range(w):
                out[i * s + j] = softmax_grad_float(p[i * s + j], g[i * s + j], Mh[j], Ml[j])
        return True
    for i in range(n):
        for j in range(w):
            pv = p[i * s + j]
            gv = g[i * s + j]
            v = softmax_grad_float(pv, gv, Mh[j], Ml[j])
            out[i * s + j] = v if ok[j] else <float>(pv * (gv - tot[j]))
    return True


cdef inline void panel_grad_output(int op, const floating* g, const floating* q, floating* out,
                                   Py_ssize_t n, Py_ssize_t w, Py_ssize_t s,
                                   const double* tot, const double* lo, float* f1,
                                   float* f2, int32_t* flags) noexcept nogil:
    """The output pass of backward_cols, tot holding the column sums (lo: what they leave
    out, see panel_sum); f1, f2 and flags: scratch of w for the float formulas."""
    cdef Py_ssize_t i, j
    cdef const floating* gr
    cdef const floating* qr
    cdef floating* orow
    if floating is float and op == OP_LOG_SOFTMAX_BACKWARD and CYLSM_FMA:
        if log_softmax_grad_float_cols(g, q, out, n, w, s, tot, f1, flags):
            return
    if floating is float and op == OP_SOFTMAX_BACKWARD:
        if softmax_grad_float_cols(g, q, out, n, w, s, tot, f1, f2, flags):
            return
    for i in range(n):
        gr = g + i * s
        qr = q + i * s
        orow = out + i * s
        if op == OP_LOG_SOFTMAX_BACKWARD:
            for j in range(w):
                orow[j] = <floating>log_softmax_grad(gr[j], qr[j], tot[j])
        else:
            for j in range(w):
                orow[j] = <floating>(qr[j] * ((gr[j] - tot[j]) - lo[j]))


cdef inline Py_ssize_t back_width(Py_ssize_t outer, Py_ssize_t inner, int nt,
                                  Py_ssize_t size) noexcept nogil:
    """The columns of a backward column task (see backward_cols), for data of size bytes: all
    of them up to BACK_COLS, else as many as they cut evenly into pieces of at most that; cut
    into more pieces (of BACK_RUN bytes or more) where nt threads would otherwise get unequal
    shares of a few tasks; a multiple of 16.  Where that leaves a thread without a task, JB:
    panels of JB columns for the threads to share.
    The backward passes are memory-bound, and a row's run of JB columns (256 bytes, its
    neighbours 16 KiB away in a 1024x4096 float32 array) kept them waiting on memory: 1.2-1.4
    ns an element, against 0.3 for rows; runs of 4096 columns took 0.8-1.0 (float64 log_softmax
    backward 2.4 -> 1.3), whole rows of 256 or 1024 columns in 4096-16384 rows 2x faster.  Two
    threads on the two halves of 4 KiB rows took longer than one thread on all of them (each
    core's prefetcher runs on into the other's half)."""
    cdef Py_ssize_t c = (inner + BACK_COLS - 1) // BACK_COLS, w
    while (outer * c) % nt != 0 and outer * c < 8 * nt and inner // (c + 1) * size >= BACK_RUN:
        c += 1
    if outer * c < nt:
        return JB
    w = (inner + c - 1) // c
    return (w + 15) // 16 * 16


cdef inline Py_ssize_t n_tasks(Py_ssize_t outer, Py_ssize_t inner, bint short_rows,
                               Py_ssize_t cw) noexcept nogil:
    """Tasks of run(): rows, tiles of TILE short rows, or blocks of cw columns."""
    if inner > 1:
        return outer * ((inner + cw - 1) // cw)
    return (outer + TILE - 1) // TILE if short_rows else outer


cdef void run_task(int op, const floating* x, const floating* g, floating* out,
                   Py_ssize_t outer, Py_ssize_t n, Py_ssize_t inner, bint short_rows,
                   Py_ssize_t cw, bint stream, Py_ssize_t t) noexcept nogil:
    """Task t of run(): one row, one tile of short rows, or one block of cw columns (stream:
    see streamed_output)."""
    cdef Py_ssize_t o, j0, r, w, nb
    cdef bint reduced = op == OP_LOGSUMEXP                  # out is (outer, inner)
    cdef bint per_row_g = op == OP_LOGSUMEXP_BACKWARD       # g is (outer, inner)
    cdef bint backward = op == OP_LOG_SOFTMAX_BACKWARD or op == OP_SOFTMAX_BACKWARD
    if inner > 1:
        nb = (inner + cw - 1) // cw
        o = t // nb
        j0 = (t % nb) * cw
        w = cw if j0 + cw <= inner else inner - j0
        if backward:
            backward_cols(op, g + o * n * inner + j0, x + o * n * inner + j0,
                          out + o * n * inner + j0, n, w, inner)
        else:
            stats_cols(op, x + o * n * inner + j0, g + o * inner + j0 if per_row_g else g,
                       out + o * inner + j0 if reduced else out + o * n * inner + j0,
                       n, w, inner)
    elif short_rows and backward:
        r = t * TILE
        backward_short_rows(op, g + r * n, x + r * n, out + r * n,
                            TILE if r + TILE <= outer else outer - r, n)
    elif short_rows:
        r = t * TILE
        stats_short_rows(op, x + r * n, g + r if per_row_g else g,
                         out + r if reduced else out + r * n,
                         TILE if r + TILE <= outer else outer - r, n)
    elif stream:
        streamed_row(g + t * n, x + t * n, out + t * n, n, 1)
    elif backward:
        backward_row(op, g + t * n, x + t * n, out + t * n, n, 1)
    else:
        stats_row(op, x + t * n, g + t if per_row_g else g, out + t if reduced else out + t * n,
                  n, 1)


cdef void run(int op, const floating* x, const floating* g, floating* out,
              Py_ssize_t outer, Py_ssize_t n, Py_ssize_t inner) noexcept nogil:
    """Spread the rows (or tiles, or column blocks) of an (outer, n, inner) problem over the
    threads; no parallel region at all for small problems.  For the backward ops x is the
    forward output (y or p) and g the upstream gradient."""
    cdef bint backward = op == OP_LOG_SOFTMAX_BACKWARD or op == OP_SOFTMAX_BACKWARD
    cdef bint short_rows = inner == 1 and n < SHORT
    cdef int nt = n_threads(outer * n * inner)
    cdef Py_ssize_t cw = JB                 # the columns of a column task
    if backward and inner > 1:
        cw = back_width(outer, inner, nt, sizeof(floating))
    cdef Py_ssize_t t, tasks = n_tasks(outer, inner, short_rows, cw)
    cdef bint stream = (op == OP_SOFTMAX_BACKWARD and inner == 1 and not short_rows
                        and CYLSM_STREAMING and outer * n * sizeof(floating) >= STREAM_BYTES
                        and out != x and out != g)
    if nt > 1 and inner == 1 and outer < nt and n >= 2 * SUPER:
        for t in range(outer):      # few long rows: the threads share each row
            if stream:
                streamed_row(g + t * n, x + t * n, out + t * n, n, nt)
            elif backward:
                backward_row(op, g + t * n, x + t * n, out + t * n, n, nt)
            else:
                stats_row(op, x + t * n, g + t if op == OP_LOGSUMEXP_BACKWARD else g,
                          out + t if op == OP_LOGSUMEXP else out + t * n, n, nt)
    elif nt == 1 or tasks == 1:
        for t in range(tasks):
            run_task(op, x, g, out, outer, n, inner, short_rows, cw, stream, t)
    else:
        with nogil, parallel(num_threads=nt):
            for t in prange(tasks, schedule="static"):
                run_task(op, x, g, out, outer, n, inner, short_rows, cw, stream, t)
            if stream:
                cylsm_stream_fence()    # before the caller reads what this thread streamed
    if stream:
        cylsm_stream_fence()            # the calling thread's, for any thread it hands out to


# ---------------------------------------------------------------------------------------------
# New outputs of CYLSM_BUFFER_MIN bytes or more: memory kept from freed ones (cylsm_buffers.h).

cdef extern from "cylsm_buffers.h":
    const size_t CYLSM_BUFFER_MIN
    cnp.PyDataMem_Handler cylsm_handler
    int cylsm_buffers_init(size_t limit, int hugepages) noexcept
    int cylsm_buffers_after_fork() noexcept
    void cylsm_buffers_stats(size_t* numbers) noexcept

from cpython.pycapsule cimport PyCapsule_New

_BUFFER_CACHE_MB = 256   # default of CYLSM_BUFFER_CACHE_MB


def _buffer_limit():
    """Bytes of freed output buffers to keep: CYLSM_BUFFER_CACHE_MB (MiB), else the default."""
    text = _os.environ.get("CYLSM_BUFFER_CACHE_MB", "").strip()
    if not text:
        return _BUFFER_CACHE_MB << 20
    try:
        mb = float(text)
    except ValueError:
        mb = -1.0
    if not 0 <= mb <= 1 << 30:
        raise ValueError(
            f"CYLSM_BUFFER_CACHE_MB={text!r} is not a size in MiB; expected a number from 0 "
            f"(keep no freed outputs) to {1 << 30} (the default is {_BUFFER_CACHE_MB})")
    return int(mb * (1 << 20))


def _numpy_hugepages():
    """Does NumPy advise its large arrays as transparent huge pages (its default on Linux)?"""
    for name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return bool(__import__(name, fromlist=["_"])._get_madvise_hugepage())
        except (ImportError, AttributeError):
            pass
    return False


cdef size_t _buffer_cache_limit = _buffer_limit()
if cylsm_buffers_init(_buffer_cache_limit, _numpy_hugepages()) != 0:
    raise MemoryError("cylsm: could not allocate the lock of its buffer cache")


def _buffer_cache_after_fork():
    if cylsm_buffers_after_fork() != 0:
        raise MemoryError("cylsm: could not allocate the lock of its buffer cache")


if hasattr(_os, "register_at_fork"):
    _os.register_at_fork(after_in_child=_buffer_cache_after_fork)
cdef object _handler = PyCapsule_New(<void*>&cylsm_handler, "mem_handler", NULL)


def buffer_cache():
    """The buffer cache's figures: limit and held (bytes), count (buffers held), reused and
    fresh (outputs of at least min bytes given a kept buffer or new memory) and min."""
    cdef size_t v[5]
    cylsm_buffers_stats(v)
    return {"limit": v[0], "held": v[1], "count": v[2], "reused": v[3], "fresh": v[4],
            "min": CYLSM_BUFFER_MIN}


cdef cnp.ndarray new_array(int nd, cnp.npy_intp* shape, int t):
    """PyArray_EMPTY(nd, shape, t), from the buffer cache when it is that large."""
    cdef cnp.ndarray a
    cdef size_t nbytes = 4 if t == cnp.NPY_FLOAT else 8
    cdef int i
    for i in range(nd):
        nbytes *= <size_t>shape[i]
    if nbytes < CYLSM_BUFFER_MIN or _buffer_cache_limit == 0:
        return <cnp.ndarray>cnp.PyArray_EMPTY(nd, shape, t, 0)
    previous = cnp.PyDataMem_SetHandler(_handler)
    try:
        a = <cnp.ndarray>cnp.PyArray_EMPTY(nd, shape, t, 0)
    finally:
        cnp.PyDataMem_SetHandler(previous)
    return a


def empty(shape, dtype):
    """numpy.empty(shape, dtype) of float32/float64, from the buffer cache when that large."""
    cdef cnp.npy_intp dims[cnp.NPY_MAXDIMS]
    cdef int i, nd = len(shape)
    cdef int t = numpy.dtype(dtype).num
    if nd > cnp.NPY_MAXDIMS or (t != cnp.NPY_FLOAT and t != cnp.NPY_DOUBLE):
        return numpy.empty(shape, dtype)
    for i in range(nd):
        dims[i] = shape[i]
    return new_array(nd, dims, t)


# ---------------------------------------------------------------------------------------------
# The common call, with as little as possible between Python and the loops (no fused-function
# dispatch, no memoryviews): one C-contiguous native float32/float64 array, reduced over its
# last axis (log_softmax, softmax, logsumexp) or over all of it (logsumexp).

OPS = {"log_softmax": OP_LOG_SOFTMAX, "softmax": OP_SOFTMAX, "logsumexp": OP_LOGSUMEXP,
       "log_softmax_backward": OP_LOG_SOFTMAX_BACKWARD, "softmax_backward": OP_SOFTMAX_BACKWARD,
       "logsumexp_backward": OP_LOGSUMEXP_BACKWARD}
_ndarray = numpy.ndarray


cdef inline int data_type(cnp.ndarray a) noexcept:
    """a's type number (NPY_FLOAT, NPY_DOUBLE) if a is C-contiguous, aligned and of native
    float32/float64 data, else -1 (the general path casts or copies such arrays)."""
    cdef int t = cnp.PyArray_TYPE(a)
    if ((t == cnp.NPY_FLOAT or t == cnp.NPY_DOUBLE) and cnp.PyArray_IS_C_CONTIGUOUS(a)
            and cnp.PyArray_ISBEHAVED_RO(a)):
        return t
    return -1


cdef bint same_shape(cnp.ndarray a, cnp.ndarray b) noexcept:
    """Do a and b have the same shape?"""
    cdef int i
    if cnp.PyArray_NDIM(a) != cnp.PyArray_NDIM(b):
        return False
    for i in range(cnp.PyArray_NDIM(a)):
        if cnp.PyArray_DIMS(a)[i] != cnp.PyArray_DIMS(b)[i]:
            return False
    return True


cdef bint overlap(cnp.ndarray a, cnp.ndarray b) noexcept:
    """Do the two arrays overlap without starting at the same address?"""
    return cnp.PyArray_DATA(a) != cnp.PyArray_DATA(b) and touch(a, b)


cdef bint touch(cnp.ndarray a, cnp.ndarray b) noexcept:
    """Do the data of the two (contiguous) arrays share any byte?"""
    cdef char* pa = <char*>cnp.PyArray_DATA(a)
    cdef char* pb = <char*>cnp.PyArray_DATA(b)
    return pa < pb + cnp.PyArray_NBYTES(b) and pb < pa + cnp.PyArray_NBYTES(a)


cdef bint reduces(cnp.ndarray r, cnp.ndarray x, int k) noexcept:
    """Is r shaped as x reduced over its axis k (k < 0: over all of it)?"""
    cdef int i
    if cnp.PyArray_NDIM(r) != (0 if k < 0 else cnp.PyArray_NDIM(x) - 1):
        return False
    for i in range(cnp.PyArray_NDIM(r)):
        if cnp.PyArray_DIMS(r)[i] != cnp.PyArray_DIMS(x)[i + (i >= k)]:
            return False
    return True


cdef void run_op(int op, const floating* x, const floating* g, floating* out,
                 Py_ssize_t outer, Py_ssize_t n, Py_ssize_t inner) noexcept nogil:
    """run() with op as a constant in each call: each reaches GCC's copy of run for its op
    (made for the calls of the functions below), rather than the generic one, which measured
    10-15% slower for float64 short rows (forward ops and logsumexp_backward).  Which copies
    GCC makes and inlines moves with every change here: measure (both thread counts, every
    op, rows, short rows and axis 0) after each."""
    if op == OP_LOG_SOFTMAX:
        run(OP_LOG_SOFTMAX, x, g, out, outer, n, inner)
    elif op == OP_SOFTMAX:
        run(OP_SOFTMAX, x, g, out, outer, n, inner)
    elif op == OP_LOGSUMEXP:
        run(OP_LOGSUMEXP, x, g, out, outer, n, inner)
    elif op == OP_LOGSUMEXP_BACKWARD:
        run(OP_LOGSUMEXP_BACKWARD, x, g, out, outer, n, inner)
    elif op == OP_LOG_SOFTMAX_BACKWARD:
        run(OP_LOG_SOFTMAX_BACKWARD, x, g, out, outer, n, inner)
    else:
        run(OP_SOFTMAX_BACKWARD, x, g, out, outer, n, inner)


def fast(int op, x, bint all_axes=False, out=None, g=None, axis=-1):
    """op (a value of OPS) of the ndarray ``x`` into the ndarray ``out`` (None: a new array),
    over all axes (all_axes) or over one (``axis``, an int, negative counting from the end).
    For the log_softmax/softmax backward ops x is the forward output (y or p) and g the
    upstream gradient, of x's shape; for logsumexp_backward x is the forward input and g has
    the shape of the logsumexp (all_axes: of x reduced over all of it).  Returns None when the
    shortcut does not apply: an axis out of range, x, g or out not an ndarray or not
    C-contiguous, aligned and of native float32/float64 data (all of one dtype), x empty or
    0-d, g or out not of the expected shape, out read-only, or out overlapping an input
    without being it (the caller then takes the general path, which handles all of these).
    x is then (outer, n, inner) with n the reduced axis, as the kernels take it.  The arrays
    are read through NumPy's C API: the buffer protocol cost a (1, 10) call 60-80 ns per
    array, and numpy.empty 150 ns more than PyArray_EMPTY.  Tiny arrays over rows keep the
    GIL: releasing it costs more than their work."""
    cdef cnp.ndarray ax, ag, ao
    cdef Py_ssize_t n, size, outer = 1, inner = 1
    cdef int t, nd, i, k = -1        # k: the reduced axis (-1: all of them)
    cdef bint ok
    cdef bint backward = op == OP_LOG_SOFTMAX_BACKWARD or op == OP_SOFTMAX_BACKWARD
    cdef bint lse_backward = op == OP_LOGSUMEXP_BACKWARD
    cdef const void* gp = NULL
    cdef const void* xp
    cdef void* o
    cdef cnp.npy_intp* shape
    cdef cnp.npy_intp dims[cnp.NPY_MAXDIMS]
    if (type(x) is not _ndarray or (out is not None and type(out) is not _ndarray)
            or ((backward or lse_backward) and type(g) is not _ndarray)):
        return None
    ax = <cnp.ndarray>x
    t = data_type(ax)
    nd = cnp.PyArray_NDIM(ax)
    size = cnp.PyArray_SIZE(ax)
    if t < 0 or nd == 0 or size == 0:
        return None
    shape = cnp.PyArray_DIMS(ax)
    if not all_axes:
        if not -nd <= axis < nd:    # (compared as Python ints: any int is safe here)
            return None
        k = axis + nd if axis < 0 else axis
    if backward or lse_backward:
        ag = <cnp.ndarray>g
        if data_type(ag) != t or not (same_shape(ag, ax) if backward else reduces(ag, ax, k)):
            return None
        gp = cnp.PyArray_DATA(ag)
    if out is not None:
        ao = <cnp.ndarray>out
        if data_type(ao) != t or not cnp.PyArray_ISWRITEABLE(ao):
            return None
        if op == OP_LOGSUMEXP:
            ok = reduces(ao, ax, k) and not touch(ao, ax)
        else:
            ok = same_shape(ax, ao) and not overlap(ao, ax)
            ok = ok and not (backward and overlap(ao, ag))
            ok = ok and not (lse_backward and touch(ao, ag))
        if not ok:          # the general path validates, and copies on overlap
            return None
    elif op == OP_LOGSUMEXP:        # x's shape without the reduced axes
        for i in range(nd - 1 if k >= 0 else 0):
            dims[i] = shape[i + (i >= k)]
        ao = <cnp.ndarray>cnp.PyArray_EMPTY(nd - 1 if k >= 0 else 0, dims, t, 0)
    else:
        ao = new_array(nd, shape, t)
    if k < 0:
        n = size
    else:
        n = shape[k]
        for i in range(k):
            outer *= shape[i]
        inner = size // (outer * n)
    xp = cnp.PyArray_DATA(ax)
    o = cnp.PyArray_DATA(ao)
    if inner > 1:   # columns: blocks of n rows x inner (calls apart: a variable inner in
        with nogil: # the others cost float64 logsumexp_backward over rows 3%)
            if t == cnp.NPY_FLOAT:
                run_op(op, <const float*>xp, <const float*>gp, <float*>o, outer, n, inner)
            else:
                run_op(op, <const double*>xp, <const double*>gp, <double*>o, outer, n, inner)
    elif cnp.PyArray_NBYTES(ax) <= GIL_BYTES:
        if t == cnp.NPY_FLOAT:
            run_op(op, <const float*>xp, <const float*>gp, <float*>o, outer, n, 1)
        else:
            run_op(op, <const double*>xp, <const double*>gp, <double*>o, outer, n, 1)
    else:
        with nogil:
            if t == cnp.NPY_FLOAT:
                run_op(op, <const float*>xp, <const float*>gp, <float*>o, outer, n, 1)
            else:
                run_op(op, <const double*>xp, <const double*>gp, <double*>o, outer, n, 1)
    if out is None and op == OP_LOGSUMEXP and (k < 0 or nd == 1):
        Py_INCREF(ao)                   # (PyArray_Return steals a reference)
        return cnp.PyArray_Return(ao)   # a 0-d result is a NumPy scalar, as NumPy and scipy
    return ao                           # return


# ---------------------------------------------------------------------------------------------
# The kernels.  Arrays are (outer, n, inner), C-contiguous, of one dtype; reductions over axis 1.


def log_softmax(const floating[:, :, ::1] x, floating[:, :, ::1] out,
                const unsigned char[:, :, :] where=None):
    """OUT out = x - logsumexp(x) (out may be x).  where (None: no mask; any strides, 0 masks
    out): the logsumexp over the entries it keeps, and -inf at the others."""
    if where is not None:
        masked_forward(OP_LOG_SOFTMAX, x, out, where, -INFINITY, <const floating*>NULL)
        return
    with nogil:     # also when run() takes no parallel region (one thread, one task)
        run(OP_LOG_SOFTMAX, &x[0, 0, 0], <const floating*>NULL, &out[0, 0, 0],
            x.shape[0], x.shape[1], x.shape[2])


def softmax(const floating[:, :, ::1] x, floating[:, :, ::1] out,
            const unsigned char[:, :, :] where=None):
    """OUT out = exp(x) / sum(exp(x)) (out may be x).  where: as in log_softmax, with 0 at the
    masked entries."""
    if where is not None:
        masked_forward(OP_SOFTMAX, x, out, where, 0.0, <const floating*>NULL)
        return
    with nogil:     # also when run() takes no parallel region (one thread, one task)
        run(OP_SOFTMAX, &x[0, 0, 0], <const floating*>NULL, &out[0, 0, 0],
            x.shape[0], x.shape[1], x.shape[2])


def logsumexp(const floating[:, :, ::1] x, floating[:, ::1] out,
              const unsigned char[:, :, :] where=None):
    """OUT out[o, j] = log(sum over i of exp(x[o, i, j])).  where (None: no mask; any strides,
    0 masks out): the sum over the entries it keeps (-inf where it keeps none)."""
    if where is not None and x.shape[2] == 1 and 0 < x.shape[1] < SUPER:
        masked_short_rows(&x[0, 0, 0], &out[0, 0], &where[0, 0, 0], where.strides[0],
                          where.strides[1], x.shape[0], x.shape[1])
        return
    if where is not None:       # long rows and columns: the weighted kernel, as for b
        logsumexp_weighted(x, None, out, None, where)
        return
    with nogil:     # also when run() takes no parallel region (one thread, one task)
        run(OP_LOGSUMEXP, &x[0, 0, 0], <const floating*>NULL, &out[0, 0],
            x.shape[0], x.shape[1], x.shape[2])


def log_softmax_backward(const floating[:, :, ::1] g, const floating[:, :, ::1] y,
                         floating[:, :, ::1] out, const unsigned char[:, :, :] where=None):
    """OUT out = g - exp(y) * sum(g) (out may be g or y).  where (None: no mask; any strides,
    0 masks out): the sum over the entries it keeps, and 0 at the others."""
    if where is not None:
        masked_backward(OP_LOG_SOFTMAX_BACKWARD, g, y, out, where)
        return
    with nogil:     # also when run() takes no parallel region (one thread, one task)
        run(OP_LOG_SOFTMAX_BACKWARD, &y[0, 0, 0], &g[0, 0, 0], &out[0, 0, 0],
            y.shape[0], y.shape[1], y.shape[2])


def softmax_backward(const floating[:, :, ::1] g, const floating[:, :, ::1] p,
                     floating[:, :, ::1] out, const unsigned char[:, :, :] where=None):
    """OUT out = p * (g - sum(g * p)) (out may be g or p).  where: as in log_softmax_backward."""
    if where is not None:
        masked_backward(OP_SOFTMAX_BACKWARD, g, p, out, where)
        return
    with nogil:     # also when run() takes no parallel region (one thread, one task)
        run(OP_SOFTMAX_BACKWARD, &p[0, 0, 0], &g[0, 0, 0], &out[0, 0, 0],
            p.shape[0], p.shape[1], p.shape[2])


def logsumexp_backward(const floating[:, ::1] g, const floating[:, :, ::1] x,
                       floating[:, :, ::1] out, const unsigned char[:, :, :] where=None):
    """OUT out = g * exp(x - logsumexp(x)), and 0 where logsumexp(x) is -inf (out may be x).
    g is (outer, inner).  where (None: no mask; any strides, 0 masks out): logsumexp over the
    entries it keeps, and 0 at the others."""
    cdef Py_ssize_t m = g.shape[0] * g.shape[1]
    cdef const floating* gp = &g[0, 0]
    cdef floating* o = &out[0, 0, 0]
    cdef floating* gc = NULL
    if where is not None:
        if o < gp + m and gp < o + out.shape[0] * out.shape[1] * out.shape[2]:
            gc = <floating*>malloc(m * sizeof(floating))    # out is g (n is 1): the pass
            if gc == NULL:                                  # in would overwrite it
                raise MemoryError(f"cylsm: could not allocate {m} values for a copy of grad")
            memcpy(gc, gp, m * sizeof(floating))
            gp = gc
        try:
            masked_forward(OP_LOGSUMEXP_BACKWARD, x, out, where, 0.0, gp)
        finally:
            free(gc)
        return
    with nogil:     # also when run() takes no parallel region (one thread, one task)
        run(OP_LOGSUMEXP_BACKWARD, &x[0, 0, 0], gp, o, x.shape[0], x.shape[1], x.shape[2])


# ---------------------------------------------------------------------------------------------
# Weighted logsumexp (b=, where=), one line of n elements at a time.  As scipy does, the maximal
# elements are taken out of the sum: log(sum b e^x) = M + log|mw| + log1p(rest / mw).  The
# weights b (1 when not given) and the mask w (all when not given) are read through their own
# strides, so a broadcast b or mask is never made into an array of x's size; an entry of weight
# 0 or masked out takes no part, even where x is inf or NaN.  Rows and panels of columns take
# vector loops; only a row whose max is infinite, or whose sum is 0, has scalar loops.


cdef double sign_of(double v) noexcept nogil:
    if v > 0:
        return 1.0
    if v < 0:
        return -1.0
    return v   # 0 or NaN


cdef inline floating weight_at(const floating* b, Py_ssize_t sb, const unsigned char* w,
                               Py_ssize_t sw, Py_ssize_t k) noexcept nogil:
    """The weight of element k: b[k * sb] (1 when b is NULL), 0 where the mask is 0."""
    cdef floating bk = 1 if b == NULL else b[k * sb]
    return bk if w == NULL or w[k * sw] != 0 else 0


cdef inline const floating* shifted(const floating* b, Py_ssize_t k) noexcept nogil:
    """b + k, or NULL for a NULL b (no arithmetic on a null pointer)."""
    if b == NULL:
        return NULL
    return b + k


cdef inline const unsigned char* shifted_mask(const unsigned char* w,
                                             Py_ssize_t k) noexcept nogil:
    """w + k, or NULL for a NULL w."""
    if w == NULL:
        return NULL
    return w + k


cdef inline const floating* gather_weights(const floating* b, Py_ssize_t sb,
                                           const unsigned char* w, Py_ssize_t sw, Py_ssize_t m,
                                           floating* buf) noexcept nogil:
    """The weights of m elements (see weight_at; m <= CHUNK): b itself where it is contiguous
    and there is no mask, else written to buf.  The vector loops then read the weights without
    a condition (a load under one would keep the compiler from vectorizing them)."""
    cdef Py_ssize_t i
    if w == NULL and b != NULL and sb == 1:
        return b
    if w == NULL and b == NULL:
        for i in range(m):
            buf[i] = 1
    elif w == NULL:
        for i in range(m):
            buf[i] = b[i * sb]
    elif b == NULL and sw == 1:     # (unit strides apart: loops the compiler vectorizes)
        for i in range(m):
            buf[i] = 1 if w[i] != 0 else 0
    elif b == NULL:
        for i in range(m):
            buf[i] = 1 if w[i * sw] != 0 else 0
    elif sb == 1 and sw == 1:
        for i in range(m):
            buf[i] = b[i] if w[i] != 0 else 0
    else:
        for i in range(m):
            buf[i] = b[i * sb] if w[i * sw] != 0 else 0
    return buf


cdef bint weighted_max_row(const floating* x, const floating* b, Py_ssize_t sb,
                           const unsigned char* w, Py_ssize_t sw, Py_ssize_t n,
                           floating* M) noexcept nogil:
    """OUT M: the max of the contiguous x[0:n] over the entries of nonzero weight (-inf if
    none; b and the mask sb, sw apart), in W lanes.  Whether one of those entries is NaN."""
    cdef floating m[W]
    cdef int nan[W]
    cdef floating buf[CHUNK]
    cdef const floating* wt
    cdef const floating* xc
    cdef Py_ssize_t c, cm, g, j, i
    cdef floating v, mx = -INFINITY
    cdef int nans = 0
    for j in range(W):
        m[j] = -INFINITY
        nan[j] = 0
    c = 0
    while c < n:
        cm = CHUNK if n - c > CHUNK else n - c
        wt = gather_weights(shifted(b, c * sb), sb, shifted_mask(w, c * sw), sw, cm, buf)
        xc = x + c
        for g in range(cm // W):
            for j in range(W):
                v = xc[g * W + j]
                nan[j] += (wt[g * W + j] != 0) & (v != v)
                v = v if wt[g * W + j] != 0 else -INFINITY
                m[j] = v if v > m[j] else m[j]
        for i in range(cm - cm % W, cm):
            if wt[i] != 0:
                nans += xc[i] != xc[i]
                mx = xc[i] if xc[i] > mx else mx
        c += CHUNK
    for j in range(W):
        nans += nan[j]
        mx = m[j] if m[j] > mx else mx
    M[0] = mx
    return nans != 0


cdef void weighted_sum_row(const floating* x, const floating* b, Py_ssize_t sb,
                           const unsigned char* w, Py_ssize_t sw, Py_ssize_t n, floating mx,
                           double* mw, double* rest) noexcept nogil:
    """OUT mw, rest of weighted_parts for the contiguous x[0:n] whose (finite) max is mx: the
    exps times the weights, added in W double lanes, which are added to compensated lane
    totals after each chunk (float64: each run of RUN64 groups), as in block_sumexp.  With b,
    the exps are taken in double for float data too (weights of both signs can cancel, and a
    float exp's rounding would grow by the same factor); with a mask alone (weights 0 and 1),
    in float and scaled, as block_sumexp takes them (twice the lanes)."""
    cdef double acc[W]
    cdef double tot[W]
    cdef double comp[W]
    cdef double wacc[W]
    cdef floating buf[CHUNK]
    cdef const floating* wt
    cdef const floating* xc
    cdef Py_ssize_t c, cm, g, g0, g1, j, i
    cdef Py_ssize_t run = RUN64 if floating is double else CHUNK // W
    cdef floating v, bk
    cdef double t = 0.0, cc = 0.0, ws = 0.0
    cdef bint wide = b != NULL
    for j in range(W):
        tot[j] = 0.0
        comp[j] = 0.0
        wacc[j] = 0.0
    c = 0
    while c < n:
        cm = CHUNK if n - c > CHUNK else n - c
        wt = gather_weights(shifted(b, c * sb), sb, shifted_mask(w, c * sw), sw, cm, buf)
        xc = x + c
        g0 = 0
        while g0 < cm // W:
            g1 = g0 + run if g0 + run < cm // W else cm // W
            for j in range(W):
                acc[j] = 0.0
            if wide:    # (weight 0: v may be > mx, inf, NaN, and is taken as mx)
                for g in range(g0, g1):
                    for j in range(W):
                        v = xc[g * W + j]
                        bk = wt[g * W + j]
                        acc[j] = (acc[j] if v == mx else
                                  acc[j] + bk * exp_diff_s[double](v if bk != 0 else mx, mx))
                        wacc[j] = wacc[j] + bk if v == mx else wacc[j]
            else:
                for g in range(g0, g1):
                    for j in range(W):
                        v = xc[g * W + j]
                        bk = wt[g * W + j]
                        acc[j] = (acc[j] if v == mx else
                                  acc[j] + bk * exp_diff_s(v if bk != 0 else mx, mx))
                        wacc[j] = wacc[j] + bk if v == mx else wacc[j]
            for j in range(W):
                two_sum_add(&tot[j], &comp[j], acc[j])
            g0 = g1
        for i in range(cm - cm % W, cm):
            bk = wt[i]
            if bk != 0 and xc[i] == mx:
                ws += bk
            elif bk != 0:
                two_sum_add(&t, &cc, bk * (exp_diff_s[double](xc[i], mx) if wide else
                                           exp_diff_s(xc[i], mx)))
        c += CHUNK
    for j in range(W):
        two_sum_add(&t, &cc, tot[j])
        cc += comp[j]
        ws += wacc[j]
    mw[0] = ws
    rest[0] = (t + cc) * (1.0 if wide else unscale(mx))


cdef void weighted_grad_row(const floating* x, const floating* b, Py_ssize_t sb,
                            const unsigned char* w, Py_ssize_t sw, floating* out, Py_ssize_t n,
                            floating mx, double scale) noexcept nogil:
    """out = scale * weight * exp(x - mx) for the contiguous x[0:n] (scale: for the scaled
    exps), 0 where the weight is 0.  out may be x or b."""
    cdef floating buf[CHUNK]
    cdef const floating* wt
    cdef Py_ssize_t c, cm, i
    cdef floating v, bk
    c = 0
    while c < n:
        cm = CHUNK if n - c > CHUNK else n - c
        wt = gather_weights(shifted(b, c * sb), sb, shifted_mask(w, c * sw), sw, cm, buf)
        for i in range(cm):
            v = x[c + i]
            bk = wt[i]
            out[c + i] = 0 if bk == 0 else <floating>(scale * bk * exp_diff_s(v if bk != 0 else mx,
                                                                             mx))
        c += CHUNK


cdef void weighted_parts(const floating* x, const floating* b, Py_ssize_t sb,
                         const unsigned char* w, Py_ssize_t sw, Py_ssize_t n,
                         double* M, double* mw, double* rest) noexcept nogil:
    """OUT M: max of x over the entries of nonzero weight (-inf if none; NaN if one of them is
    NaN); OUT mw: sum of the weights of the maximal entries (of the +inf entries when M is
    +inf); OUT rest: sum of b * exp(x - M) over the others (0 when M is not finite).  x, b and
    w are read k, k * sb and k * sw apart: a row (weighted_panel does columns), in the vector
    loops of weighted_max_row and weighted_sum_row."""
    cdef Py_ssize_t k
    cdef double bk, wsum = 0.0
    cdef floating mx
    if weighted_max_row(x, b, sb, w, sw, n, &mx):
        M[0] = NAN
        mw[0] = NAN
        rest[0] = NAN
        return
    M[0] = mx
    if -INFINITY < mx < INFINITY:
        weighted_sum_row(x, b, sb, w, sw, n, mx, mw, rest)
        return
    for k in range(n):          # a max of +-inf: the weights of the entries equal to it
        bk = weight_at(b, sb, w, sw, k)
        if bk != 0 and x[k] == mx:
            wsum += bk
    mw[0] = wsum
    rest[0] = 0.0


cdef void weighted_finish(double M, double mw, double rest, floating* out,
                          floating* sign) noexcept nogil:
    """OUT out[0] = log|sum b exp(x)| from the weighted_parts of a line; OUT sign[0] its sign,
    or when sign is NULL: NaN in out for a negative sum."""
    cdef double r, res, sg
    if M != M:
        res = NAN
        sg = NAN
    elif M == -INFINITY:
        res = -INFINITY
        sg = 0.0
    elif M == INFINITY:
        if mw != 0 and mw == mw:
            res = INFINITY
            sg = sign_of(mw)
        else:
            res = NAN
            sg = NAN
    elif mw != 0:
        r = rest / mw
        sg = sign_of(1.0 + r) * sign_of(mw)
        if r < -1.0:
            r = -r - 2.0
        res = (log1p(r) + log(fabs(mw))) + M
    else:
        sg = sign_of(rest)
        res = log(fabs(rest)) + M
    if sign != NULL:
        sign[0] = <floating>sg
    elif sg < 0:
        res = NAN
    out[0] = <floating>res


cdef void weighted_panel(const floating* x, Py_ssize_t s, const floating* b, Py_ssize_t bs1,
                         Py_ssize_t bs2, const unsigned char* w, Py_ssize_t ws1, Py_ssize_t ws2,
                         Py_ssize_t n, Py_ssize_t cw, double* M, double* mw,
                         double* rest) noexcept nogil:
    """weighted_parts for cw <= JB neighbouring columns (x's rows s apart; b and the mask
    step bs1, ws1 along a column and bs2, ws2 across), vectorized across the columns: the
    max pass, then the terms (exps in double, as in weighted_sum_row) summed in runs of rows
    added with TwoSum, as in panel_sumexp."""
    cdef floating m[JB]
    cdef floating ms[JB]
    cdef int nan[JB]
    cdef double tot[JB]
    cdef double comp[JB]
    cdef double ws[JB]
    cdef double part[JB]
    cdef floating buf[JB]
    cdef const floating* wt
    cdef const floating* xr
    cdef Py_ssize_t i, j, k0, k1
    cdef Py_ssize_t run = RUN64 if floating is double else KC
    cdef floating v, bk
    cdef double e
    cdef bint take
    for j in range(cw):
        m[j] = -INFINITY
        nan[j] = 0
        tot[j] = 0.0
        comp[j] = 0.0
        ws[j] = 0.0
    for i in range(n):
        wt = gather_weights(shifted(b, i * bs1), bs2,
                            shifted_mask(w, i * ws1), ws2, cw, buf)
        xr = x + i * s
        for j in range(cw):
            v = xr[j]
            nan[j] += (wt[j] != 0) & (v != v)
            v = v if wt[j] != 0 else -INFINITY
            m[j] = v if v > m[j] else m[j]
    for j in range(cw):
        ms[j] = m[j] if -INFINITY < m[j] < INFINITY else 0      # what the exps subtract
    k0 = 0
    while k0 < n:               # runs of rows summed in part, then added with TwoSum
        k1 = k0 + run if k0 + run < n else n
        for j in range(cw):
            part[j] = 0.0
        for i in range(k0, k1):
            wt = gather_weights(shifted(b, i * bs1), bs2,
                                shifted_mask(w, i * ws1), ws2, cw, buf)
            xr = x + i * s
            for j in range(cw):
                v = xr[j]
                bk = wt[j]
                take = (bk != 0) & (v != m[j]) & (ms[j] == m[j])   # (M finite)
                e = exp_diff_s[double](v if take else ms[j], ms[j])
                part[j] = part[j] + bk * e if take else part[j]
                ws[j] = ws[j] + bk if v == m[j] else ws[j]
        for j in range(cw):
            two_sum_add(&tot[j], &comp[j], part[j])
        k0 = k1
    for j in range(cw):
        M[j] = NAN if nan[j] else m[j]
        mw[j] = NAN if nan[j] else ws[j]
        rest[j] = NAN if nan[j] else tot[j] + comp[j]


cdef inline double grad_scale(double g, double* M, double mw, double rest) noexcept nogil:
    """g / sum(b exp(x - M)): the factor of a weighted line's gradient, whose weighted_parts
    are M, mw, rest; and M as its exps subtract it: NaN for a +inf max, 0 (and a factor of 0)
    where the sum is 0 (logsumexp -inf)."""
    if M[0] == INFINITY:
        M[0] = NAN
    if M[0] == -INFINITY or mw + rest == 0:
        M[0] = 0.0
        return 0.0
    return g / (mw + rest)


cdef inline double grad_exp(double v, double M) noexcept nogil:
    """exp(v - M) of a weighted gradient.  v > M only where the factor is 0 (a sum of 0) or
    for v = +inf (NaN, as the sum is): a finite such v is taken as M, so that the gradient
    is an exact 0 there."""
    return exp_diff_s[double](v if (v <= M) | (v == INFINITY) else M, M)


cdef void weighted_grad_line(const floating* g, const floating* x,
                             const floating* b, Py_ssize_t sb, const unsigned char* w,
                             Py_ssize_t sw, floating* out, Py_ssize_t n, double M, double mw,
                             double rest) noexcept nogil:
    """OUT out = g * b * exp(x - M) / sum(b * exp(x - M)) (out is laid out as x), M, mw and
    rest being the line's weighted_parts: the gradient of log|sum b exp(x)|; 0 where that sum
    is 0 (logsumexp -inf) and wherever the weight is 0.  out may be x or b."""
    cdef double scale = grad_scale(g[0], &M, mw, rest), bk
    cdef Py_ssize_t k
    cdef floating mf
    if -INFINITY < M < INFINITY and scale != 0:
        mf = <floating>M                    # the max of the x: exact
        weighted_grad_row(x, b, sb, w, sw, out, n, mf, scale * unscale(mf))
        return
    for k in range(n):
        bk = weight_at(b, sb, w, sw, k)
        out[k] = <floating>(0.0 if bk == 0 else scale * bk * grad_exp(x[k], M))


cdef void weighted_grad_panel(const floating* g, const floating* x, Py_ssize_t s,
                              const floating* b, Py_ssize_t bs1, Py_ssize_t bs2,
                              const unsigned char* w, Py_ssize_t ws1, Py_ssize_t ws2,
                              floating* out, Py_ssize_t n, Py_ssize_t cw, const double* M,
                              const double* mw, const double* rest) noexcept nogil:
    """weighted_grad_line for cw <= JB neighbouring columns (strides as in weighted_panel),
    vectorized across the columns."""
    cdef double sc[JB]
    cdef double Mx[JB]
    cdef floating buf[JB]
    cdef const floating* wt
    cdef Py_ssize_t i, j
    cdef double e
    for j in range(cw):
        Mx[j] = M[j]
        sc[j] = grad_scale(g[j], &Mx[j], mw[j], rest[j])
    for i in range(n):
        wt = gather_weights(shifted(b, i * bs1), bs2,
                            shifted_mask(w, i * ws1), ws2, cw, buf)
        for j in range(cw):
            e = grad_exp(x[i * s + j], Mx[j])
            out[i * s + j] = 0 if wt[j] == 0 else <floating>(sc[j] * wt[j] * e)


cdef void weighted_row(const floating* x, const floating* b, Py_ssize_t bs0, Py_ssize_t bs1,
                       const unsigned char* w, Py_ssize_t ws0, Py_ssize_t ws1, Py_ssize_t n,
                       Py_ssize_t o, floating* out, floating* sign, const floating* g,
                       floating* grad) noexcept nogil:
    """Row o of a weighted kernel on (outer, n) x.  g NULL: out[o] (and sign[o], when sign is
    not NULL) get its logsumexp; else grad's row o gets its gradient for g[o]."""
    cdef double M, mw, rest
    cdef const floating* bl = shifted(b, o * bs0)
    cdef const unsigned char* wl = shifted_mask(w, o * ws0)
    weighted_parts(x + o * n, bl, bs1, wl, ws1, n, &M, &mw, &rest)
    if g == NULL:
        weighted_finish(M, mw, rest, out + o, NULL if sign == NULL else sign + o)
    else:
        weighted_grad_line(g + o, x + o * n, bl, bs1, wl, ws1, grad + o * n, n, M, mw, rest)


cdef void weighted_cols(const floating* x, const floating* b, Py_ssize_t bs0, Py_ssize_t bs1,
                        Py_ssize_t bs2, const unsigned char* w, Py_ssize_t ws0, Py_ssize_t ws1,
                        Py_ssize_t ws2, Py_ssize_t n, Py_ssize_t inner, Py_ssize_t t,
                        floating* out, floating* sign, const floating* g,
                        floating* grad) noexcept nogil:
    """Panel t (JB columns) of a weighted kernel on (outer, n, inner) x, as weighted_row."""
    cdef double M[JB]
    cdef double mw[JB]
    cdef double rest[JB]
    cdef Py_ssize_t nb = (inner + JB - 1) // JB, o = t // nb, j0 = (t % nb) * JB, j
    cdef Py_ssize_t cw = JB if j0 + JB <= inner else inner - j0
    cdef Py_ssize_t r = o * inner + j0          # the first column's index in out and g
    cdef const floating* xl = x + o * n * inner + j0
    cdef const floating* bl = shifted(b, o * bs0 + j0 * bs2)
    cdef const unsigned char* wl = shifted_mask(w, o * ws0 + j0 * ws2)
    weighted_panel(xl, inner, bl, bs1, bs2, wl, ws1, ws2, n, cw, M, mw, rest)
    if g == NULL:
        for j in range(cw):
            weighted_finish(M[j], mw[j], rest[j], out + r + j, NULL if sign == NULL else
                            sign + r + j)
    else:
        weighted_grad_panel(g + r, xl, inner, bl, bs1, bs2, wl, ws1, ws2,
                            grad + o * n * inner + j0, n, cw, M, mw, rest)


cdef inline Py_ssize_t weighted_tasks(Py_ssize_t outer, Py_ssize_t inner) noexcept nogil:
    return outer if inner == 1 else outer * ((inner + JB - 1) // JB)


def logsumexp_weighted(const floating[:, :, ::1] x, const floating[:, :, :] b,
                       floating[:, ::1] out, floating[:, ::1] sign=None,
                       const unsigned char[:, :, :] where=None):
    """OUT out = log|sum b exp(x)| over axis 1; OUT sign its sign in {-1, 0, +1} (when sign is
    None, a negative sum gives NaN).  b (None: weights of 1) and where (None: no mask; 0
    masks out) have x's shape and any strides (0 for a broadcast axis)."""
    cdef Py_ssize_t outer = x.shape[0], n = x.shape[1], inner = x.shape[2], t
    cdef const floating* bp = NULL
    cdef const unsigned char* wp = NULL
    cdef floating* sp = NULL if sign is None else &sign[0, 0]
    cdef Py_ssize_t bs[3]
    cdef Py_ssize_t ws[3]
    cdef int nt = n_threads(outer * n * inner)
    if b is not None:
        bp = &b[0, 0, 0]
    if where is not None:
        wp = &where[0, 0, 0]
    strides_of(b, where, bs, ws)
    if inner == 1:
        for t in prange(outer, nogil=True, num_threads=nt, schedule="static"):
            weighted_row(&x[0, 0, 0], bp, bs[0], bs[1], wp, ws[0], ws[1], n, t, &out[0, 0], sp,
                         <const floating*>NULL, <floating*>NULL)
    else:
        for t in prange(weighted_tasks(outer, inner), nogil=True, num_threads=nt,
                        schedule="static"):
            weighted_cols(&x[0, 0, 0], bp, bs[0], bs[1], bs[2], wp, ws[0], ws[1], ws[2], n,
                          inner, t, &out[0, 0], sp, <const floating*>NULL, <floating*>NULL)


def logsumexp_backward_weighted(const floating[:, ::1] g, const floating[:, :, ::1] x,
                                const floating[:, :, :] b, floating[:, :, ::1] out,
                                const unsigned char[:, :, :] where=None):
    """OUT out = g * b * exp(x - logsumexp(x, b)), 0 where the weight is 0 (or masked out by
    where) or the sum is 0.  b and where as in logsumexp_weighted."""
    cdef Py_ssize_t outer = x.shape[0], n = x.shape[1], inner = x.shape[2], t
    cdef const floating* bp = NULL
    cdef const unsigned char* wp = NULL
    cdef Py_ssize_t bs[3]
    cdef Py_ssize_t ws[3]
    cdef int nt = n_threads(outer * n * inner)
    if b is not None:
        bp = &b[0, 0, 0]
    if where is not None:
        wp = &where[0, 0, 0]
    strides_of(b, where, bs, ws)
    if inner == 1:
        for t in prange(outer, nogil=True, num_threads=nt, schedule="static"):
            weighted_row(&x[0, 0, 0], bp, bs[0], bs[1], wp, ws[0], ws[1], n, t, <floating*>NULL,
                         <floating*>NULL, &g[0, 0], &out[0, 0, 0])
    else:
        for t in prange(weighted_tasks(outer, inner), nogil=True, num_threads=nt,
                        schedule="static"):
            weighted_cols(&x[0, 0, 0], bp, bs[0], bs[1], bs[2], wp, ws[0], ws[1], ws[2], n,
                          inner, t, <floating*>NULL, <floating*>NULL, &g[0, 0], &out[0, 0, 0])


cdef void strides_of(const floating[:, :, :] b, const unsigned char[:, :, :] where,
                     Py_ssize_t* bs, Py_ssize_t* ws):
    """OUT bs, ws: the strides of b (in elements) and of the mask (0 for None)."""
    cdef int k
    for k in range(3):
        bs[k] = 0 if b is None else b.strides[k] // <Py_ssize_t>sizeof(floating)
        ws[k] = 0 if where is None else where.strides[k]


# ---------------------------------------------------------------------------------------------
# log_softmax and softmax backward with where=: the masked entries take no part in the sum and
# get 0.  One line at a time, as the weighted kernels.


cdef void masked_backward_row(int op, const floating* g, const floating* q, floating* out,
                              const unsigned char* w, Py_ssize_t sw, Py_ssize_t n) noexcept nogil:
    """One row of log_softmax_backward (q: y) or softmax_backward (q: p) under a mask (its
    entries sw apart); out may be g or q.  A contiguous mask: the kept entries gathered CHUNK
    at a time and summed by block_sum, the chunks added with TwoSum, then the output in double
    and the masked entries set to 0.  Other strides (a broadcast mask: sw == 0): a scalar
    loop."""
    cdef floating gb[CHUNK]
    cdef floating qb[CHUNK]
    cdef Py_ssize_t c, cm, i
    cdef double t = 0.0, cc = 0.0, G, Gl = 0.0, v
    cdef bint lsm = op == OP_LOG_SOFTMAX_BACKWARD
    cdef bint dot2 = floating is double and not lsm     # see dot2_add
    if sw == 1:
        c = 0
        while c < n:
            cm = CHUNK if n - c > CHUNK else n - c
            for i in range(cm):
                gb[i] = g[c + i] if w[c + i] != 0 else 0
                qb[i] = q[c + i] if w[c + i] != 0 else 0
            if dot2:
                two_sum_add(&t, &cc, block_dot2(gb, qb, cm, &cc))
            else:
                two_sum_add(&t, &cc, block_sum(gb, <const floating*>NULL if lsm else qb, cm))
            c += CHUNK
        G = split_sum(t, cc, &Gl) if dot2 else t + cc
        for i in range(n):      # as row_output's double loops (not a call of it: its inlining
            v = (log_softmax_grad(g[i], q[i], G) if lsm else    # into the unmasked kernels
                 q[i] * ((g[i] - G) - Gl))                  # would change)
            out[i] = <floating>v if w[i] != 0 else 0
        return
    for i in range(n):
        if w[i * sw] != 0:
            if dot2:
                dot2_add(&t, &cc, g[i], q[i])
            else:
                two_sum_add(&t, &cc, g[i] if lsm else <double>g[i] * <double>q[i])
    G = split_sum(t, cc, &Gl) if dot2 else t + cc
    for i in range(n):
        if w[i * sw] == 0:
            out[i] = 0
        elif lsm:
            out[i] = <floating>log_softmax_grad(g[i], q[i], G)
        else:
            out[i] = <floating>(q[i] * ((g[i] - G) - Gl))


cdef void masked_backward_panel(int op, const floating* g, const floating* q, floating* out,
                                Py_ssize_t s, const unsigned char* w, Py_ssize_t ws1,
                                Py_ssize_t ws2, Py_ssize_t n, Py_ssize_t cw) noexcept nogil:
    """masked_backward_row for cw <= JB neighbouring columns (rows s apart; the mask steps
    ws1 along a column, ws2 across), vectorized across the columns: each kept term added to
    its column's compensated sum (TwoSum)."""
    cdef double tot[JB]
    cdef double comp[JB]
    cdef unsigned char keep[JB]
    cdef Py_ssize_t i, j
    cdef double t, qv
    cdef bint lsm = op == OP_LOG_SOFTMAX_BACKWARD
    cdef bint dot2 = floating is double and not lsm     # see dot2_add
    for j in range(cw):
        tot[j] = 0.0
        comp[j] = 0.0
    for i in range(n):          # (the loads are unconditional, for the vectorizer)
        for j in range(cw):
            keep[j] = w[i * ws1 + j * ws2]
        if dot2:
            for j in range(cw):
                dot2_add(&tot[j], &comp[j], g[i * s + j] if keep[j] != 0 else 0.0,
                         q[i * s + j] if keep[j] != 0 else 0.0)
        else:
            for j in range(cw):
                qv = q[i * s + j]
                t = g[i * s + j] * (1.0 if lsm else qv)
                two_sum_add(&tot[j], &comp[j], t if keep[j] != 0 else 0.0)
    for j in range(cw):
        if dot2:
            tot[j] = split_sum(tot[j], comp[j], &comp[j])
        else:
            tot[j] += comp[j]
            comp[j] = 0.0
    for i in range(n):
        for j in range(cw):
            keep[j] = w[i * ws1 + j * ws2]
        for j in range(cw):
            qv = q[i * s + j]
            t = (log_softmax_grad(g[i * s + j], qv, tot[j]) if lsm else
                 qv * ((g[i * s + j] - tot[j]) - comp[j]))
            out[i * s + j] = <floating>t if keep[j] != 0 else 0


cdef void masked_backward(int op, const floating[:, :, ::1] g, const floating[:, :, ::1] q,
                          floating[:, :, ::1] out, const unsigned char[:, :, :] where):
    """log_softmax_backward (op; q: y) or softmax_backward (q: p) under the mask where (any
    strides): rows one at a time, columns JB at a time."""
    cdef Py_ssize_t outer = q.shape[0], n = q.shape[1], inner = q.shape[2]
    cdef Py_ssize_t nb = (inner + JB - 1) // JB
    cdef Py_ssize_t ws0 = where.strides[0], ws1 = where.strides[1], ws2 = where.strides[2]
    cdef Py_ssize_t t, o, j0, line
    for t in prange(weighted_tasks(outer, inner), nogil=True,
                    num_threads=n_threads(outer * n * inner), schedule="static"):
        if inner == 1:
            masked_backward_row(op, &g[t, 0, 0], &q[t, 0, 0], &out[t, 0, 0], &where[t, 0, 0],
                                ws1, n)
        else:
            o = t // nb
            j0 = (t % nb) * JB
            line = o * n * inner + j0
            masked_backward_panel(op, &g[0, 0, 0] + line, &q[0, 0, 0] + line,
                                  &out[0, 0, 0] + line, inner,
                                  &where[0, 0, 0] + o * ws0 + j0 * ws2, ws1, ws2, n,
                                  JB if j0 + JB <= inner else inner - j0)


# ---------------------------------------------------------------------------------------------
# log_softmax, softmax and logsumexp_backward with where=: the masked entries are set to -inf
# on the way into the result (mask_begin), the unmasked kernel runs on the result in place
# (exp(-inf) takes no part in a sum), and only the lines that need it get their masked entries
# set to the fill value afterwards (mask_end): those whose max is not finite, where the kernel
# gives SPEC's special values (NaN at -inf entries among them), and for logsumexp_backward
# those whose gradient g is not finite or has its sign bit set (g * 0 is not +0).  Every other
# line already has -inf (log_softmax) or 0 (softmax, logsumexp_backward) there.  A line whose
# max is not finite keeps a NaN or +inf (the pass in finds those), or keeps nothing above
# -inf; then every output of the line is NaN (logsumexp_backward: 0), its first one too, which
# the pass out looks at.  Tasks: rows cut into parts of SUPER elements (one long row is shared
# by the threads), short rows grouped SUPER elements at a time, columns in blocks of JB.
# logsumexp itself has no result of x's size to mask into: short rows are masked into a
# buffer per thread (masked_short_rows), longer ones and columns go to the weighted kernel.


cdef inline const unsigned char* gather_mask(const unsigned char* w, Py_ssize_t sw,
                                             Py_ssize_t m, unsigned char* buf) noexcept nogil:
    """The m mask entries sw apart at w, contiguous: w itself (sw == 1), else copied to buf, so
    that the loops that use them read them without a stride and vectorize."""
    cdef Py_ssize_t i
    if sw == 1:
        return w
    for i in range(m):
        buf[i] = w[i * sw]
    return buf


cdef inline bint mask_in(const floating* x, const unsigned char* w, floating* out,
                         Py_ssize_t m) noexcept nogil:
    """OUT out[i] = x[i] where w[i] != 0, else -inf (i < m; out may be x).  Whether a kept
    entry is NaN or +inf."""
    cdef Py_ssize_t i
    cdef int bad = 0
    cdef floating v
    for i in range(m):
        v = x[i]            # (loaded unconditionally: a masked load made this pass 1.6x slower)
        v = v if w[i] != 0 else -INFINITY
        out[i] = v
        bad |= not (v < INFINITY)
    return bad != 0


cdef inline void mask_out(floating* out, const unsigned char* w, Py_ssize_t m,
                          floating fill) noexcept nogil:
    """OUT out[i] = fill where w[i] == 0 (i < m)."""
    cdef Py_ssize_t i
    for i in range(m):
        out[i] = out[i] if w[i] != 0 else fill


cdef bint mask_line(const floating* x, floating* out, const unsigned char* w, Py_ssize_t sw,
                    Py_ssize_t m, bint fill_in, floating fill) noexcept nogil:
    """mask_in (fill_in; returns its result) or mask_out for m entries of a row, the mask's sw
    apart, CHUNK at a time."""
    cdef unsigned char buf[CHUNK]
    cdef Py_ssize_t c = 0, k
    cdef bint bad = False
    while c < m:
        k = CHUNK if m - c > CHUNK else m - c
        if fill_in:
            bad |= mask_in(x + c, gather_mask(w + c * sw, sw, k, buf), out + c, k)
        else:
            mask_out(out + c, gather_mask(w + c * sw, sw, k, buf), k, fill)
        c += CHUNK
    return bad


cdef bint masked_rows(const floating* x, floating* out, const unsigned char* w, Py_ssize_t ws0,
                      Py_ssize_t ws1, Py_ssize_t n, Py_ssize_t r0, Py_ssize_t r1,
                      Py_ssize_t i0, Py_ssize_t i1, bint fill_in, bint fix,
                      floating fill) noexcept nogil:
    """Entries i0 <= i < i1 of rows r0 <= r < r1 (the mask's rows ws0 apart, entries ws1).
    fill_in: mask_in, returning whether a kept entry is NaN or +inf.  Else mask_out, on every
    row when fix, otherwise on the rows whose first output is NaN."""
    cdef Py_ssize_t r
    cdef bint bad = False
    if fill_in and ws1 == 1 and ws0 == n and i0 == 0 and i1 == n:   # one run: short rows
        return mask_in(x + r0 * n, w + r0 * n, out + r0 * n, (r1 - r0) * n)
    for r in range(r0, r1):
        if fill_in:
            bad |= mask_line(x + r * n + i0, out + r * n + i0, w + r * ws0 + i0 * ws1, ws1,
                             i1 - i0, True, fill)
        elif fix or out[r * n] != out[r * n]:
            mask_line(x, out + r * n + i0, w + r * ws0 + i0 * ws1, ws1, i1 - i0, False, fill)
    return bad


cdef bint masked_cols(const floating* x, floating* out, const unsigned char* w, Py_ssize_t ws1,
                      Py_ssize_t ws2, Py_ssize_t n, Py_ssize_t s, Py_ssize_t cw, bint fill_in,
                      bint fix, floating fill) noexcept nogil:
    """cw <= JB neighbouring columns of n rows s apart (the mask steps ws1 down, ws2 across):
    mask_in (fill_in; returns whether a kept entry is NaN or +inf), or mask_out when fix or
    one of the first outputs is NaN."""
    cdef unsigned char buf[JB]
    cdef Py_ssize_t i, j
    cdef bint bad = False
    if not fill_in:
        for j in range(cw):
            fix |= out[j] != out[j]
        if not fix:
            return False
    for i in range(n):
        if fill_in:
            bad |= mask_in(x + i * s, gather_mask(w + i * ws1, ws2, cw, buf), out + i * s, cw)
        else:
            mask_out(out + i * s, gather_mask(w + i * ws1, ws2, cw, buf), cw, fill)
    return bad


cdef inline Py_ssize_t masked_parts(Py_ssize_t n, Py_ssize_t inner) noexcept nogil:
    """Tasks per row (parts of SUPER elements) or per outer index (column blocks of JB)."""
    return (n + SUPER - 1) // SUPER if inner == 1 else (inner + JB - 1) // JB


cdef inline Py_ssize_t masked_group(Py_ssize_t n, Py_ssize_t inner) noexcept nogil:
    """Rows per task: short rows are grouped SUPER elements at a time."""
    return SUPER // n if inner == 1 and n < SUPER else 1


cdef inline Py_ssize_t masked_tasks(Py_ssize_t outer, Py_ssize_t n,
                                    Py_ssize_t inner) noexcept nogil:
    cdef Py_ssize_t group = masked_group(n, inner)
    return (outer + group - 1) // group * masked_parts(n, inner)


cdef bint masked_task(const floating* x, floating* out, const unsigned char* w, Py_ssize_t ws0,
                      Py_ssize_t ws1, Py_ssize_t ws2, Py_ssize_t outer, Py_ssize_t n,
                      Py_ssize_t inner, Py_ssize_t t, bint fill_in, bint fix,
                      floating fill) noexcept nogil:
    """Task t: part t % parts of row t // parts (parts > 1), rows [t * group, (t + 1) * group)
    (parts == 1), or column block t % parts of outer index t // parts (inner > 1)."""
    cdef Py_ssize_t parts = masked_parts(n, inner), group = masked_group(n, inner)
    cdef Py_ssize_t o = t // parts, off
    if inner == 1 and parts > 1:
        off = (t % parts) * SUPER
        return masked_rows(x, out, w, ws0, ws1, n, o, o + 1, off,
                           off + SUPER if off + SUPER <= n else n, fill_in, fix, fill)
    if inner == 1:
        return masked_rows(x, out, w, ws0, ws1, n, t * group,
                           (t + 1) * group if (t + 1) * group <= outer else outer, 0, n,
                           fill_in, fix, fill)
    off = (t % parts) * JB
    return masked_cols(x + o * n * inner + off, out + o * n * inner + off,
                       w + o * ws0 + off * ws2, ws1, ws2, n, inner,
                       JB if off + JB <= inner else inner - off, fill_in, fix, fill)


cdef void masked_pass(const floating* x, floating* out, const unsigned char* w, Py_ssize_t ws0,
                      Py_ssize_t ws1, Py_ssize_t ws2, Py_ssize_t outer, Py_ssize_t n,
                      Py_ssize_t inner, Py_ssize_t tasks, int nt, unsigned char* bad,
                      bint fill_in, floating fill) noexcept nogil:
    """Every task, over the threads: the pass in (fill_in: bad[t] set to its result), or the
    pass out (bad[t]: fix every line of task t)."""
    cdef Py_ssize_t t
    if nt == 1 or tasks == 1:
        for t in range(tasks):
            if fill_in:
                bad[t] = masked_task(x, out, w, ws0, ws1, ws2, outer, n, inner, t, True, False,
                                     fill)
            else:
                masked_task(x, out, w, ws0, ws1, ws2, outer, n, inner, t, False, bad[t], fill)
    else:
        for t in prange(tasks, num_threads=nt, schedule="static"):
            if fill_in:
                bad[t] = masked_task(x, out, w, ws0, ws1, ws2, outer, n, inner, t, True, False,
                                     fill)
            else:
                masked_task(x, out, w, ws0, ws1, ws2, outer, n, inner, t, False, bad[t], fill)


cdef bint grad_fills(const floating* g, Py_ssize_t outer, Py_ssize_t n, Py_ssize_t inner,
                     Py_ssize_t t) noexcept nogil:
    """Whether a line of masked_task t has a gradient g that does not give +0 at the masked
    entries (g times exp(-inf)): one with its sign bit set (-0 included), +inf or NaN."""
    cdef Py_ssize_t parts = masked_parts(n, inner), group = masked_group(n, inner), i, i0, i1
    cdef bint neg = False
    if inner == 1 and parts > 1:
        i0 = t // parts
        i1 = i0 + 1
    elif inner == 1:
        i0 = t * group
        i1 = i0 + group if i0 + group <= outer else outer
    else:
        i0 = (t // parts) * inner + (t % parts) * JB
        i1 = i0 + JB if (t % parts) * JB + JB <= inner else (t // parts + 1) * inner
    for i in range(i0, i1):
        neg |= (copysign(1.0, g[i]) < 0) | (not (g[i] < INFINITY))
    return neg


ctypedef void (*run_float)(int, const float*, const float*, float*, Py_ssize_t, Py_ssize_t,
                           Py_ssize_t) noexcept nogil
ctypedef void (*run_double)(int, const double*, const double*, double*, Py_ssize_t, Py_ssize_t,
                            Py_ssize_t) noexcept nogil

cdef extern from *:
    """
    /* p, which the compiler can no longer see through: a call through it stays a call. */
    static void *cylsm_opaque(void *p) { __asm__("" : "+r"(p)); return p; }
    """
    void* cylsm_opaque(void* p) noexcept nogil


cdef void masked_short_rows(const floating* x, floating* out, const unsigned char* w,
                            Py_ssize_t ws0, Py_ssize_t ws1, Py_ssize_t outer,
                            Py_ssize_t n) except *:
    """logsumexp under the mask w of rows of n < SUPER: GROUP elements of rows at a time (or
    one row, if longer) are copied to a buffer of each thread, with -inf at the masked entries
    (exp(-inf) takes no part in a sum, and a line that keeps nothing gives -inf), and the
    unmasked kernel runs on the buffer.  (It calls run() through a pointer that the compiler
    cannot see through: a direct call made GCC inline differently elsewhere, and some unmasked
    kernels 10-15% slower.)"""
    cdef Py_ssize_t group = GROUP // n if n < GROUP else 1
    cdef Py_ssize_t tasks = (outer + group - 1) // group, t, r0, rows, u
    cdef Py_ssize_t size = (group if group < outer else outer) * n
    # each thread's part of buf: its rows, and as much again and BLOCK more, which stats_row
    # prefetches past a row (some of it for writing) and must not find another thread's rows
    # there (at 2 threads, 4096x1024 float32 took 1.9 ms with the parts adjacent, 1 thread 2.1)
    cdef Py_ssize_t stride = 2 * size + BLOCK
    cdef Py_ssize_t step = 64 // sizeof(floating)
    cdef int nt = n_threads(outer * n)
    cdef floating* buf = <floating*>malloc(nt * stride * sizeof(floating))
    if buf == NULL:
        raise MemoryError(
            f"cylsm: could not allocate {nt * stride} values for a masked logsumexp")
    for t in prange(tasks, nogil=True, num_threads=nt, schedule="static"):
        r0 = t * group
        rows = group if r0 + group <= outer else outer - r0
        masked_rows(x + r0 * n, buf + threadid() * stride, w + r0 * ws0, ws0, ws1, n, 0, rows,
                    0, n, True, False, 0)
        if rows * n <= GROUP:   # the next task's rows, while this one works in the cache
            for u in range(rows * n // step):
                cylsm_prefetch(x + (r0 + rows) * n + u * step)
        if floating is float:
            (<run_float>cylsm_opaque(<void*>run[float]))(
                OP_LOGSUMEXP, buf + threadid() * stride, NULL, out + r0, rows, n, 1)
        else:
            (<run_double>cylsm_opaque(<void*>run[double]))(
                OP_LOGSUMEXP, buf + threadid() * stride, NULL, out + r0, rows, n, 1)
    free(buf)


cdef void masked_forward(int op, const floating[:, :, ::1] x, floating[:, :, ::1] out,
                         const unsigned char[:, :, :] where, floating fill, const floating* g):
    """log_softmax, softmax or logsumexp_backward (op; g its gradient, which out does not
    overlap, else NULL) under the mask where (any strides; see above)."""
    cdef unsigned char* bad = mask_begin(x, out, where)
    cdef floating* o = &out[0, 0, 0]
    with nogil:         # (constant ops: GCC then keeps its per-op copies of run)
        if op == OP_LOG_SOFTMAX:
            run(OP_LOG_SOFTMAX, o, <const floating*>NULL, o, x.shape[0], x.shape[1], x.shape[2])
        elif op == OP_SOFTMAX:
            run(OP_SOFTMAX, o, <const floating*>NULL, o, x.shape[0], x.shape[1], x.shape[2])
        else:
            run(OP_LOGSUMEXP_BACKWARD, o, g, o, x.shape[0], x.shape[1], x.shape[2])
    mask_end(out, where, bad, fill, g)


cdef unsigned char* mask_begin(const floating[:, :, ::1] x, floating[:, :, ::1] out,
                               const unsigned char[:, :, :] where) except NULL:
    """The pass in, x into out: returns the flags of its tasks, for mask_end."""
    cdef Py_ssize_t outer = x.shape[0], n = x.shape[1], inner = x.shape[2]
    cdef Py_ssize_t tasks = masked_tasks(outer, n, inner)
    cdef unsigned char* bad = <unsigned char*>malloc(tasks + 1)
    if bad == NULL:
        raise MemoryError(f"cylsm: could not allocate {tasks} bytes for a mask's flags")
    with nogil:
        masked_pass(&x[0, 0, 0], &out[0, 0, 0], &where[0, 0, 0], where.strides[0],
                    where.strides[1], where.strides[2], outer, n, inner, tasks,
                    n_threads(outer * n * inner), bad, True, 0)
    return bad


cdef void mask_end(floating[:, :, ::1] out, const unsigned char[:, :, :] where,
                   unsigned char* bad, floating fill, const floating* g) noexcept:
    """The pass out, after the unmasked kernel ran on out (g: logsumexp_backward's gradient,
    else NULL), for the flags bad of mask_begin, which it frees."""
    cdef Py_ssize_t outer = out.shape[0], n = out.shape[1], inner = out.shape[2]
    cdef Py_ssize_t tasks = masked_tasks(outer, n, inner)
    cdef Py_ssize_t line = masked_parts(n, inner) if inner == 1 else 1  # a row's tasks share
    cdef Py_ssize_t t, u                                                # its flag
    cdef floating* op_ = &out[0, 0, 0]
    cdef int f
    with nogil:
        if g != NULL:
            for t in range(tasks):
                bad[t] |= grad_fills(g, outer, n, inner, t)
        u = 0
        while u < tasks:        # a NaN or +inf in one part of a row: the whole row; and a
            f = 0               # long row's first output is looked at before a part fixes it
            for t in range(u, u + line):
                f = f | bad[t]
            if line > 1 and op_[u // line * n] != op_[u // line * n]:
                f = 1
            for t in range(u, u + line):
                bad[t] = f
            u += line
        masked_pass(op_, op_, &where[0, 0, 0], where.strides[0], where.strides[1],
                    where.strides[2], outer, n, inner, tasks, n_threads(outer * n * inner), bad,
                    False, fill)
    free(bad)
