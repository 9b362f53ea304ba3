/* Transposes of the tiles of short rows (see short_tile in _kernels.pxi), and the scaling of
 * a float tile's exps (cylsm_tile_times_factor, at the end):
 *
 *   dst[c * ds + r] = src[r * ss + c]   for r < rows, c < cols
 *
 * in square blocks of one vector register's worth (8 x 8 floats or 4 x 4 doubles with AVX,
 * half that with SSE) by the usual unpack-and-permute shuffles, the edges element by element.
 * A plain loop over a tile compiled to one scalar load and store per element (its 16
 * destination rows are 16 pointers that may overlap as far as the compiler knows, so it does
 * not vectorize them); it was a sixth of the time of softmax over rows of 32.  A
 * transpose only moves bits: results are the same either way.  Compilers without GNU vector
 * shuffles (MSVC) take the element loop. */
#ifndef CYLSM_TILE_H
#define CYLSM_TILE_H

#include <stddef.h>
#include <math.h>
#include "cylsm_exp.h"      /* cylsm_bits */

#ifndef CYLSM_SHUFFLES                /* (-DCYLSM_SHUFFLES=0 tries the element loop) */
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define CYLSM_SHUFFLES 1
#endif
#endif
#endif
#ifndef CYLSM_SHUFFLES
#define CYLSM_SHUFFLES 0
#endif

#if CYLSM_SHUFFLES && defined(__AVX__)

typedef float cylsm_f8 __attribute__((vector_size(32), aligned(4), may_alias));
typedef double cylsm_d4 __attribute__((vector_size(32), aligned(8), may_alias));
#define CYLSM_FB 8
#define CYLSM_DB 4

static inline void cylsm_block_f32(const float *s, ptrdiff_t ss, float *d, ptrdiff_t ds)
{
    cylsm_f8 a0 = *(const cylsm_f8 *)(s), a1 = *(const cylsm_f8 *)(s + ss);
    cylsm_f8 a2 = *(const cylsm_f8 *)(s + 2 * ss), a3 = *(const cylsm_f8 *)(s + 3 * ss);
    cylsm_f8 a4 = *(const cylsm_f8 *)(s + 4 * ss), a5 = *(const cylsm_f8 *)(s + 5 * ss);
    cylsm_f8 a6 = *(const cylsm_f8 *)(s + 6 * ss), a7 = *(const cylsm_f8 *)(s + 7 * ss);
    /* pairs of rows interleaved (within each 128-bit half) */
    cylsm_f8 t0 = __builtin_shufflevector(a0, a1, 0, 8, 1, 9, 4, 12, 5, 13);
    cylsm_f8 t1 = __builtin_shufflevector(a0, a1, 2, 10, 3, 11, 6, 14, 7, 15);
    cylsm_f8 t2 = __builtin_shufflevector(a2, a3, 0, 8, 1, 9, 4, 12, 5, 13);
    cylsm_f8 t3 = __builtin_shufflevector(a2, a3, 2, 10, 3, 11, 6, 14, 7, 15);
    cylsm_f8 t4 = __builtin_shufflevector(a4, a5, 0, 8, 1, 9, 4, 12, 5, 13);
    cylsm_f8 t5 = __builtin_shufflevector(a4, a5, 2, 10, 3, 11, 6, 14, 7, 15);
    cylsm_f8 t6 = __builtin_shufflevector(a6, a7, 0, 8, 1, 9, 4, 12, 5, 13);
    cylsm_f8 t7 = __builtin_shufflevector(a6, a7, 2, 10, 3, 11, 6, 14, 7, 15);
    /* quadruples: columns j and j + 4 of four rows */
    cylsm_f8 u0 = __builtin_shufflevector(t0, t2, 0, 1, 8, 9, 4, 5, 12, 13);
    cylsm_f8 u1 = __builtin_shufflevector(t0, t2, 2, 3, 10, 11, 6, 7, 14, 15);
    cylsm_f8 u2 = __builtin_shufflevector(t1, t3, 0, 1, 8, 9, 4, 5, 12, 13);
    cylsm_f8 u3 = __builtin_shufflevector(t1, t3, 2, 3, 10, 11, 6, 7, 14, 15);
    cylsm_f8 u4 = __builtin_shufflevector(t4, t6, 0, 1, 8, 9, 4, 5, 12, 13);
    cylsm_f8 u5 = __builtin_shufflevector(t4, t6, 2, 3, 10, 11, 6, 7, 14, 15);
    cylsm_f8 u6 = __builtin_shufflevector(t5, t7, 0, 1, 8, 9, 4, 5, 12, 13);
    cylsm_f8 u7 = __builtin_shufflevector(t5, t7, 2, 3, 10, 11, 6, 7, 14, 15);
    /* the halves of rows 0-3 and 4-7 joined: the columns */
    *(cylsm_f8 *)(d) = __builtin_shufflevector(u0, u4, 0, 1, 2, 3, 8, 9, 10, 11);
    *(cylsm_f8 *)(d + ds) = __builtin_shufflevector(u1, u5, 0, 1, 2, 3, 8, 9, 10, 11);
    *(cylsm_f8 *)(d + 2 * ds) = __builtin_shufflevector(u2, u6, 0, 1, 2, 3, 8, 9, 10, 11);
    *(cylsm_f8 *)(d + 3 * ds) = __builtin_shufflevector(u3, u7, 0, 1, 2, 3, 8, 9, 10, 11);
    *(cylsm_f8 *)(d + 4 * ds) = __builtin_shufflevector(u0, u4, 4, 5, 6, 7, 12, 13, 14, 15);
    *(cylsm_f8 *)(d + 5 * ds) = __builtin_shufflevector(u1, u5, 4, 5, 6, 7, 12, 13, 14, 15);
    *(cylsm_f8 *)(d + 6 * ds) = __builtin_shufflevector(u2, u6, 4, 5, 6, 7, 12, 13, 14, 15);
    *(cylsm_f8 *)(d + 7 * ds) = __builtin_shufflevector(u3, u7, 4, 5, 6, 7, 12, 13, 14, 15);
}

static inline void cylsm_block_f64(const double *s, ptrdiff_t ss, double *d, ptrdiff_t ds)
{
    cylsm_d4 a0 = *(const cylsm_d4 *)(s), a1 = *(const cylsm_d4 *)(s + ss);
    cylsm_d4 a2 = *(const cylsm_d4 *)(s + 2 * ss), a3 = *(const cylsm_d4 *)(s + 3 * ss);
    cylsm_d4 t0 = __builtin_shufflevector(a0, a1, 0, 4, 2, 6);
    cylsm_d4 t1 = __builtin_shufflevector(a0, a1, 1, 5, 3, 7);
    cylsm_d4 t2 = __builtin_shufflevector(a2, a3, 0, 4, 2, 6);
    cylsm_d4 t3 = __builtin_shufflevector(a2, a3, 1, 5, 3, 7);
    *(cylsm_d4 *)(d) = __builtin_shufflevector(t0, t2, 0, 1, 4, 5);
    *(cylsm_d4 *)(d + ds) = __builtin_shufflevector(t1, t3, 0, 1, 4, 5);
    *(cylsm_d4 *)(d + 2 * ds) = __builtin_shufflevector(t0, t2, 2, 3, 6, 7);
    *(cylsm_d4 *)(d + 3 * ds) = __builtin_shufflevector(t1, t3, 2, 3, 6, 7);
}

#elif CYLSM_SHUFFLES

typedef float cylsm_f4 __attribute__((vector_size(16), aligned(4), may_alias));
typedef double cylsm_d2 __attribute__((vector_size(16), aligned(8), may_alias));
#define CYLSM_FB 4
#define CYLSM_DB 2

static inline void cylsm_block_f32(const float *s, ptrdiff_t ss, float *d, ptrdiff_t ds)
{
    cylsm_f4 a0 = *(const cylsm_f4 *)(s), a1 = *(const cylsm_f4 *)(s + ss);
    cylsm_f4 a2 = *(const cylsm_f4 *)(s + 2 * ss), a3 = *(const cylsm_f4 *)(s + 3 * ss);
    cylsm_f4 t0 = __builtin_shufflevector(a0, a1, 0, 4, 1, 5);
    cylsm_f4 t1 = __builtin_shufflevector(a0, a1, 2, 6, 3, 7);
    cylsm_f4 t2 = __builtin_shufflevector(a2, a3, 0, 4, 1, 5);
    cylsm_f4 t3 = __builtin_shufflevector(a2, a3, 2, 6, 3, 7);
    *(cylsm_f4 *)(d) = __builtin_shufflevector(t0, t2, 0, 1, 4, 5);
    *(cylsm_f4 *)(d + ds) = __builtin_shufflevector(t0, t2, 2, 3, 6, 7);
    *(cylsm_f4 *)(d + 2 * ds) = __builtin_shufflevector(t1, t3, 0, 1, 4, 5);
    *(cylsm_f4 *)(d + 3 * ds) = __builtin_shufflevector(t1, t3, 2, 3, 6, 7);
}

static inline void cylsm_block_f64(const double *s, ptrdiff_t ss, double *d, ptrdiff_t ds)
{
    cylsm_d2 a0 = *(const cylsm_d2 *)(s), a1 = *(const cylsm_d2 *)(s + ss);
    *(cylsm_d2 *)(d) = __builtin_shufflevector(a0, a1, 0, 2);
    *(cylsm_d2 *)(d + ds) = __builtin_shufflevector(a0, a1, 1, 3);
}

#else

#define CYLSM_FB 1      /* no blocks: the edge loop does it all */
#define CYLSM_DB 1
#define cylsm_block_f32(s, ss, d, ds) (*(d) = *(s))
#define cylsm_block_f64(s, ss, d, ds) (*(d) = *(s))

#endif

/* cylsm_transpose_f32/f64 (a tile's outputs) and cylsm_transpose_in_f32/f64 (its input):
 * the blocks, then the edges.  Whether GCC inlined each copy into the short-row tiles moved
 * with unrelated changes elsewhere in the module (the tiles of float64 softmax over rows of 32
 * 1.08-1.18x slower in such builds), so it is fixed here: the input transpose inlined, the
 * output one called, as in the fastest builds measured. */
#if defined(__GNUC__)
#define CYLSM_OUT_OF_LINE static __attribute__((noinline))
#define CYLSM_INLINE static inline __attribute__((always_inline))
#else
#define CYLSM_OUT_OF_LINE static
#define CYLSM_INLINE static inline
#endif
#define CYLSM_TRANSPOSE(NAME, T, B, BLOCK, KIND)                                           \
    KIND void NAME(const T *src, ptrdiff_t ss, T *dst, ptrdiff_t ds,                      \
                   ptrdiff_t rows, ptrdiff_t cols)                                        \
    {                                                                                     \
        ptrdiff_t r, c, rb = rows - rows % (B), cb = cols - cols % (B);                   \
        for (r = 0; r < rb; r += (B))                                                     \
            for (c = 0; c < cb; c += (B))                                                 \
                BLOCK(src + r * ss + c, ss, dst + c * ds + r, ds);                        \
        for (r = 0; r < rows; r++)                                                        \
            for (c = r < rb ? cb : 0; c < cols; c++)                                      \
                dst[c * ds + r] = src[r * ss + c];                                        \
    }
CYLSM_TRANSPOSE(cylsm_transpose_f32, float, CYLSM_FB, cylsm_block_f32, CYLSM_OUT_OF_LINE)
CYLSM_TRANSPOSE(cylsm_transpose_f64, double, CYLSM_DB, cylsm_block_f64, CYLSM_OUT_OF_LINE)
CYLSM_TRANSPOSE(cylsm_transpose_in_f32, float, CYLSM_FB, cylsm_block_f32, CYLSM_INLINE)
CYLSM_TRANSPOSE(cylsm_transpose_in_f64, double, CYLSM_DB, cylsm_block_f64, CYLSM_INLINE)

/* fs (float_factor_ok in _kernels.pxi: 0 or 2^-100 <= |fs| <= 2^62) as *fh + *fl for
 * cylsm_times_factor: *fh is fs cut to float's 24 bits (toward zero, exactly a float), *fl the
 * rest rounded, a zero of fh's sign where the rest is 0.  A zero exp (an underflow) then gives a
 * zero of fs's sign, as the product e * fs does (fs rounded to nearest left a rest of the other
 * sign half the time, and the fused sum of two zero products of opposite signs is +0: where
 * logsumexp_backward's gradient was negative).  (nextafterf, a libm call per row of a tile,
 * made float32 softmax over rows of 32 1.3x slower.) */
static inline void cylsm_split_factor(double fs, float *fh, float *fl)
{
    cylsm_bits b;
    b.d = fs;
    b.u &= ~(uint64_t)0x1fffffff;           /* the 29 bits a double has beyond a float */
    *fh = (float)b.d;
    *fl = copysignf((float)(fs - b.d), *fh);
}

/* e * fs * 2^-64 rounded to float, for a scaled exp e (see unscale in _kernels.pxi) and fs =
 * fh + fl a double split into two floats (cylsm_split_factor): e * fh + e * fl in one fused
 * multiply-add, then the exact unscaling.  About 2^-46 of the product from the exact one before
 * its one rounding (a double product rounded to float is about 2^-53 from it), in float lanes:
 * twice as many as in double, and without the conversions.  The unscaling comes last so that
 * e * fl stays a normal float for every normal result (unscaled first, it fell to float's
 * subnormal grid below 2^-100 and cost such results up to 0.3 ulp); a subnormal result is
 * rounded twice (at most 3/4 of its spacing off).  Used only where CYLSM_FMA (float_factor_ok). */
static inline float cylsm_times_factor(float e, float fh, float fl)
{
    return fmaf(e, fh, e * fl) * (float)0x1p-64;
}

/* t[k * v + j] = cylsm_times_factor(e[k * v + j], fh[j], fl[j]) for k < n, j < v: a tile's
 * outputs (kept_tile).  The loop over j is kept as it is: unrolled (v is a constant where this
 * is inlined), GCC vectorized the loop over k instead, through 16-way interleaving permutes
 * that took a quarter of float32 softmax's time on rows of 32. */
static inline void cylsm_tile_times_factor(const float *e, float *t, ptrdiff_t n, ptrdiff_t v,
                                           const float *fh, const float *fl)
{
    ptrdiff_t k, j;
    for (k = 0; k < n; k++) {
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 1
#endif
        for (j = 0; j < v; j++)
            t[k * v + j] = cylsm_times_factor(e[k * v + j], fh[j], fl[j]);
    }
}

/* The sum of a row kernel's 16 lanes in block_sum's fixed order: acc[j] + acc[j + 8], then
 * those j < 4 plus j + 4, then the four added in order.  In vector adds it is one add per
 * halving; GCC compiled the same loops in Cython to some 30 scalar adds and shuffles, on the
 * path of every short row of the backward ops. */
static inline double cylsm_sum_lanes16(const double *acc)
{
#if CYLSM_SHUFFLES
    typedef double d8 __attribute__((vector_size(64), aligned(8), may_alias));
    typedef double d4 __attribute__((vector_size(32), aligned(8), may_alias));
    d8 s = *(const d8 *)acc + *(const d8 *)(acc + 8);
    d4 h = __builtin_shufflevector(s, s, 0, 1, 2, 3) + __builtin_shufflevector(s, s, 4, 5, 6, 7);
    return ((h[0] + h[1]) + h[2]) + h[3];
#else
    double h[4];
    int j;
    for (j = 0; j < 4; j++)
        h[j] = (acc[j] + acc[j + 8]) + (acc[j + 4] + acc[j + 12]);
    return ((h[0] + h[1]) + h[2]) + h[3];
#endif
}

/* softmax_backward over R short rows of float data (cylsm_softmax_bwd_rows_f32), with AVX2 or
 * AVX-512 intrinsics: GCC compiled the same loops in Cython to about twice the instructions
 * per row (each 16 floats loaded twice and their upper halves extracted, the output loop
 * versioned for overlap), which bounds rows of 32.  The same bits as backward_short_rows:
 *
 * cylsm_dot_f32: block_sum of g * p (of g when p is NULL) in double: the 16 lanes in its order
 *   (lanes 0-7 and 8-15, or four AVX2 vectors of 4), the products fused with the sum as GCC
 *   contracts block_sum's (both targets have FMA), then the n % 16 last ones added in order
 *   (block_sum calls it for all float data: GCC's code for its loops took 1.1-1.7x the time);
 * cylsm_softmax_grad_f32: softmax_grad_float's out = p * ((g - Mh) - Ml), each vector read
 *   before it is written (out may be g or p);
 * rows whose sum is too large for that (softmax_grad_float_ok) take row_output's double
 * formula.  Out of line: the Cython loop that calls it kept its size, since any growth of the
 * kernel functions moves GCC's inlining elsewhere (a version inline in backward_short_rows
 * made float64 softmax over rows of 32 1.16x slower). */

/* softmax_grad_float_ok's bound: sums of g * p below it in magnitude may take the float formula */
#define CYLSM_SOFTMAX_GRAD_FLOAT_MAX 0x1p100

#if defined(__AVX512F__) || defined(__AVX2__)
#define CYLSM_VECTORS 1
#include <immintrin.h>
static inline double cylsm_dot_f32(const float *g, const float *p, ptrdiff_t n)
{
    ptrdiff_t i;
    __m128d x, y;
#if defined(__AVX512F__)
#define CYLSM_CVT16(a) _mm512_cvtps_pd(_mm256_loadu_ps(a))
    __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
    __m256d h;
    if (p == NULL) {
        for (i = 0; i + 16 <= n; i += 16) {
            lo = _mm512_add_pd(CYLSM_CVT16(g + i), lo);
            hi = _mm512_add_pd(CYLSM_CVT16(g + i + 8), hi);
        }
    } else {
        for (i = 0; i + 16 <= n; i += 16) {
            lo = _mm512_fmadd_pd(CYLSM_CVT16(g + i), CYLSM_CVT16(p + i), lo);
            hi = _mm512_fmadd_pd(CYLSM_CVT16(g + i + 8), CYLSM_CVT16(p + i + 8), hi);
        }
    }
#undef CYLSM_CVT16
    lo = _mm512_add_pd(lo, hi);                                  /* lanes j + (j + 8) */
    h = _mm256_add_pd(_mm512_castpd512_pd256(lo), _mm512_extractf64x4_pd(lo, 1));
#else                                   /* AVX2: lanes 0-3, 4-7, 8-11, 12-15 */
#define CYLSM_CVT8(a) _mm256_cvtps_pd(_mm_loadu_ps(a))
    __m256d a0 = _mm256_setzero_pd(), a1 = a0, a2 = a0, a3 = a0, h;
    if (p == NULL) {
        for (i = 0; i + 16 <= n; i += 16) {
            a0 = _mm256_add_pd(CYLSM_CVT8(g + i), a0);
            a1 = _mm256_add_pd(CYLSM_CVT8(g + i + 4), a1);
            a2 = _mm256_add_pd(CYLSM_CVT8(g + i + 8), a2);
            a3 = _mm256_add_pd(CYLSM_CVT8(g + i + 12), a3);
        }
    } else {
        for (i = 0; i + 16 <= n; i += 16) {
            a0 = _mm256_fmadd_pd(CYLSM_CVT8(g + i), CYLSM_CVT8(p + i), a0);
            a1 = _mm256_fmadd_pd(CYLSM_CVT8(g + i + 4), CYLSM_CVT8(p + i + 4), a1);
            a2 = _mm256_fmadd_pd(CYLSM_CVT8(g + i + 8), CYLSM_CVT8(p + i + 8), a2);
            a3 = _mm256_fmadd_pd(CYLSM_CVT8(g + i + 12), CYLSM_CVT8(p + i + 12), a3);
        }
    }
#undef CYLSM_CVT8
    h = _mm256_add_pd(_mm256_add_pd(a0, a2), _mm256_add_pd(a1, a3));
#endif
    x = _mm256_castpd256_pd128(h);                               /* h0 h1 */
    y = _mm256_extractf128_pd(h, 1);                             /* h2 h3 */
    x = _mm_add_sd(x, _mm_unpackhi_pd(x, x));
    x = _mm_add_sd(x, y);
    x = _mm_add_sd(x, _mm_unpackhi_pd(y, y));
    {
        double t = _mm_cvtsd_f64(x);
        for (; i < n; i++)
            t += p == NULL ? (double)g[i] : (double)g[i] * (double)p[i];
        return t;
    }
}

static inline void cylsm_softmax_grad_f32(const float *p, const float *g, float *out,
                                          ptrdiff_t n, float Mh, float Ml)
{
    ptrdiff_t i = 0;
    __m256 h8 = _mm256_set1_ps(Mh), l8 = _mm256_set1_ps(Ml);
#if defined(__AVX512F__)
    __m512 h16 = _mm512_set1_ps(Mh), l16 = _mm512_set1_ps(Ml);
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_loadu_ps(p + i), _mm512_sub_ps(
            _mm512_sub_ps(_mm512_loadu_ps(g + i), h16), l16)));
#endif
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(p + i), _mm256_sub_ps(
            _mm256_sub_ps(_mm256_loadu_ps(g + i), h8), l8)));
    for (; i < n; i++)
        out[i] = p[i] * ((g[i] - Mh) - Ml);
}

CYLSM_OUT_OF_LINE void cylsm_softmax_bwd_rows_f32(const float *g, const float *p, float *out,
                                               ptrdiff_t R, ptrdiff_t n)
{
    ptrdiff_t r, i;
    for (r = 0; r < R; r++, g += n, p += n, out += n) {
        double M = cylsm_dot_f32(g, p, n);
        if (fabs(M) < CYLSM_SOFTMAX_GRAD_FLOAT_MAX) {   /* softmax_grad_float_ok */
            float Mh = (float)M;
            cylsm_softmax_grad_f32(p, g, out, n, Mh, (float)(M - Mh));
        } else {
            for (i = 0; i < n; i++)
                out[i] = (float)((double)p[i] * ((double)g[i] - M));
        }
    }
}
/* log_softmax's output for a row (or superblock) of float data: out = ((x - M) - L) in double,
 * rounded once to float, as row_output's loop, with the same bits. GCC widened and narrowed
 * each 16 floats through a 512-bit vector that it split and joined again (vextractf32x8,
 * vinsertf64x4), and versioned the loop for the overlap of out and x; here each half is loaded
 * widened and stored narrowed, and each vector is read before it is written (out may be x). */
CYLSM_INLINE void cylsm_log_softmax_row_f32(const float *x, float *out, ptrdiff_t n,
                                             double M, double L)
{
    ptrdiff_t i = 0;
#if defined(__AVX512F__)
    __m512d m8 = _mm512_set1_pd(M), l8 = _mm512_set1_pd(L), a, b;
    for (; i + 16 <= n; i += 16) {
        a = _mm512_cvtps_pd(_mm256_loadu_ps(x + i));
        b = _mm512_cvtps_pd(_mm256_loadu_ps(x + i + 8));
        _mm256_storeu_ps(out + i, _mm512_cvtpd_ps(_mm512_sub_pd(_mm512_sub_pd(a, m8), l8)));
        _mm256_storeu_ps(out + i + 8, _mm512_cvtpd_ps(_mm512_sub_pd(_mm512_sub_pd(b, m8), l8)));
    }
    if (i < n) {                        /* the last n % 16 under masks (no lane past n faults) */
        __mmask16 k = (__mmask16)((1u << (n - i)) - 1);
        __mmask8 k0 = (__mmask8)k, k1 = (__mmask8)(k >> 8);
        a = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(k0, x + i));
        b = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(k1, x + i + 8));
        _mm256_mask_storeu_ps(out + i, k0,
                              _mm512_cvtpd_ps(_mm512_sub_pd(_mm512_sub_pd(a, m8), l8)));
        _mm256_mask_storeu_ps(out + i + 8, k1,
                              _mm512_cvtpd_ps(_mm512_sub_pd(_mm512_sub_pd(b, m8), l8)));
        return;
    }
#endif
    {
        __m256d m4 = _mm256_set1_pd(M), l4 = _mm256_set1_pd(L), c;
        for (; i + 4 <= n; i += 4) {
            c = _mm256_cvtps_pd(_mm_loadu_ps(x + i));
            _mm_storeu_ps(out + i, _mm256_cvtpd_ps(_mm256_sub_pd(_mm256_sub_pd(c, m4), l4)));
        }
    }
    for (; i < n; i++)
        out[i] = (float)(((double)x[i] - M) - L);
}

/* That for R rows of n (a row, or a tile of short rows), with their M[r] and L[r]: one call. */
CYLSM_OUT_OF_LINE void cylsm_log_softmax_rows_f32(const float *x, float *out, ptrdiff_t R,
                                               ptrdiff_t n, const double *M, const double *L)
{
    ptrdiff_t r;
    for (r = 0; r < R; r++)
        cylsm_log_softmax_row_f32(x + r * n, out + r * n, n, M[r], L[r]);
}
#else                                   /* (never called: the callers test CYLSM_VECTORS) */
#define CYLSM_VECTORS 0
static double cylsm_dot_f32(const float *g, const float *p, ptrdiff_t n)
{
    (void)g, (void)p, (void)n;
    return 0.0;
}
static void cylsm_softmax_bwd_rows_f32(const float *g, const float *p, float *out,
                                       ptrdiff_t R, ptrdiff_t n)
{
    (void)g, (void)p, (void)out, (void)R, (void)n;
}
static void cylsm_log_softmax_rows_f32(const float *x, float *out, ptrdiff_t R, ptrdiff_t n,
                                       const double *M, const double *L)
{
    (void)x, (void)out, (void)R, (void)n, (void)M, (void)L;
}
#endif

#endif
