/* An exp(x) that GCC/Clang can vectorize, with full IEEE semantics.
 *
 * Why not libm's exp: a scalar call per element runs at ~0.2 G elements/s/core; this one is
 * branch-free straight-line arithmetic, so the loops that call it vectorize (SSE2/AVX2/AVX-512).
 * It is compiled without -ffast-math: every rounding below is meant.
 *
 *   exp(x) = 2^k * exp(r),   k = round(x / ln 2),   r = x - k ln 2   (|r| <= ln2/2)
 *
 * - k is rounded by the "shifter" trick (adding 1.5*2^52 leaves k in the low mantissa bits), so
 *   no float->int conversion happens and NaN simply flows through as NaN.
 * - r is formed by Cody-Waite reduction: LN2_HI has 32 significant bits, so k*LN2_HI is exact for
 *   |k| < 2^21 and x - k*LN2_HI is exact.
 * - exp(r) = 1 + (r + r^2 q(r)) with q a minimax polynomial (relative error of the whole below
 *   2^-57.5), added to 1 last so that the result is rounded once: about 0.6 ulp.
 * - 2^k is applied as a product of two powers of two that are always normal, the second a
 *   constant, so results in the subnormal range are rounded once, correctly, instead of being
 *   flushed.
 * - No clamp of x: out of range (and -inf, +inf, huge x), the arithmetic makes garbage that one
 *   or two final selects replace with 0 or +inf.  Every select compares false for NaN, so NaN
 *   is kept.  (A clamp made GCC evaluate the polynomial twice, once for the clamped value.)
 */
#ifndef CYLSM_EXP_H
#define CYLSM_EXP_H

#include <math.h>
#include <stdint.h>

/* Type punning through a union (GCC/Clang/MSVC define it); memcpy would keep the vectorizer off. */
typedef union { double d; uint64_t u; } cylsm_bits;

/* exp(r) - 1 for |r| <= ln2/2 (plus a correction far below ulp(r)): r + r^2 q(r) with q of
 * degree 9; exp(r) = 1 + that, the 1 added last (by cylsm_scale_exp, or by the caller) so that
 * the result is rounded once: about 0.6 ulp.  q is the
 * minimax approximation (Remez, on |r| <= 0.347, for the relative error of the whole, its
 * first coefficient fixed at a double and the others rounded; tools/exp_minimax.py derives
 * the coefficients of both polynomials): relative error below 4.6e-18 (2^-57.6), as the
 * Taylor series to degree 13 had, with 2 fewer operations (the loops are bound by their
 * count; 4-9% faster).  Estrin's scheme: Horner's has fewer operations still, but its
 * dependency chain made the double loops no faster.  Shared by every double exp below. */
static inline double cylsm_expm1_poly(double r)
{
    double r2 = r * r;
    double r4 = r2 * r2;
    double r8 = r4 * r4;
    double a0 = 0x1.000000000000ap-1 + r * 0x1.5555555555500p-3;
    double a1 = 0x1.55555555505f1p-5 + r * 0x1.1111111125cb5p-7;
    double a2 = 0x1.6c16c184bcae2p-10 + r * 0x1.a01a01379aa0fp-13;
    double a3 = 0x1.a01998735cf1fp-16 + r * 0x1.71df01c3ff589p-19;
    double a4 = 0x1.28aef6da12663p-22 + r * 0x1.adc0f20817c3bp-26;
    double q = ((a0 + r2 * a1) + r4 * (a2 + r2 * a3)) + r8 * a4;
    return r + r2 * q;
}

/* 2^k exp(r) for s = 2^k normal: s + s p, one fused multiply-add where the target has it.
 * The same bits as (1 + p) s, rounded once either way (s scales exactly), for one operation
 * fewer: the 1 is not added apart. */
static inline double cylsm_scale_exp(double p, double s)
{
    return p * s + s;
}

/* The same in single precision: q of degree 4, minimax on |r| <= 0.3476 (the float reduction
 * overshoots ln2/2 a little), relative error of the whole below 4e-9 (2^-27.9), by Horner's
 * scheme, which measured faster than Estrin's here (one operation fewer). */
static inline float cylsm_expm1f_poly(float r)
{
    float q = 0x1.6da296p-10f;
    q = q * r + 0x1.124f32p-7f;
    q = q * r + 0x1.555580p-5f;
    q = q * r + 0x1.555474p-3f;
    q = q * r + 0x1.fffffep-2f;
    return r + (r * r) * q;
}

static inline float cylsm_scale_expf(float p, float s)    /* as cylsm_scale_exp */
{
    return p * s + s;
}

/* exp(x) for any x.  As cylsm_exp_nonpos below (read that first), with 2^k applied as
 * 2^(k - B) * 2^B, B = 600 for k > 0 and -600 otherwise (both factors normal for
 * |k| <= 1622), and one more select: x > 709.8 gives +inf (and covers the garbage that huge
 * x leave in the other lanes' arithmetic). */
static inline double cylsm_exp(double x)
{
    const double shifter = 0x1.8p52;
    const double log2e = 0x1.71547652b82fep0;
    const double ln2_hi = 0x1.62e42feep-1;
    const double ln2_lo = 0x1.a39ef35793c76p-33;

    cylsm_bits kb, s1, s2;
    double kd = x * log2e + shifter;
    kb.d = kd;
    kd -= shifter;
    double r = (x - kd * ln2_hi) - kd * ln2_lo;
    uint64_t bias = kd > 0.0 ? (uint64_t)(1023 - 600) : (uint64_t)(1023 + 600);
    s1.u = (kb.u << 52) + (bias << 52);              /* 2^(k - B) */
    s2.u = (2046 - bias) << 52;                      /* 2^B */

    double e = cylsm_scale_exp(cylsm_expm1_poly(r), s1.d) * s2.d;
    e = x > 709.8 ? (double)INFINITY : e;
    return kd < -1600.0 ? 0.0 : e;                   /* NaN compares false throughout: kept */
}

typedef union { float f; uint32_t u; } cylsm_bits32;

/* exp(x) of a float x as a double, for float32 data whose exps are factors of a product
 * formed in double: the design of cylsm_exp in single precision (twice the lanes; about 0.6
 * float ulp, see cylsm_expm1f_poly), with 2^k applied in double,
 * where it is exact.  So the result is that accurate all the way down, where a float result
 * below 2^-126 would be rounded to the float subnormal grid (and a product formed from it
 * many of its spacings off), and above float's range it stays finite.  Below 2^-1022
 * (x < -708) it is 0: such a factor times any float-sized number is below float's smallest
 * subnormal.  (LN2_HI's 15 bits keep k*LN2_HI exact for |k| < 512, |x| < 354; beyond, where
 * it may not be, every product with a float-sized factor leaves float's range anyway.) */
static inline double cylsm_expf_wide(float x)
{
    const float shifter = 0x1.8p23f;
    const float log2e = 0x1.715476p0f;
    const float ln2_hi = 0x1.62e4p-1f;
    const float ln2_lo = 0x1.7f7d1cp-20f;

    float kd = x * log2e + shifter;
    kd -= shifter;
    float r = (x - kd * ln2_hi) - kd * ln2_lo;
    float y = 1.0f + cylsm_expm1f_poly(r);

    cylsm_bits kb, s;
    kb.d = (double)kd + 0x1.8p52;                    /* k in the low bits, as in cylsm_exp */
    s.u = (kb.u << 52) + ((uint64_t)1023 << 52);     /* 2^k, normal for -1022 <= k <= 1023 */
    double e = (double)y * s.d;
    e = x > 709.0f ? (double)INFINITY : e;
    return kd < -1022.0f ? 0.0 : e;                  /* NaN compares false throughout: kept */
}

/* exp(x + lo) for x <= 0 (or NaN), cheaper than cylsm_exp / cylsm_expf_wide: every exp of a
 * shifted row, exp(x - max), has such an argument; lo is a correction far below ulp(x),
 * typically the rounding error of the difference that produced x (see cylsm_two_diff): it
 * joins the reduced argument r, so exp(a - b) comes out as accurate as if a - b were exact.
 * - No clamp: k is computed from x as it is, and where k is so low that the result is 0 anyway
 *   (x below about -1100, float: -130, and -inf) a final select gives 0.  That one select also
 *   covers every garbage value those lanes carry (a NaN lo for x = -inf, an unrepresentable
 *   2^k); a NaN x compares false and stays NaN.
 * - 2^k is applied as one power of two that is always normal, 2^(k + BIAS), followed by the
 *   constant 2^-BIAS: the first product is exact and the second rounds once, so subnormal
 *   results are rounded correctly instead of being flushed.
 * - In two halves: _arg forms the reduced argument r and, in *s, 2^(k + BIAS) (both 0 where
 *   the result is 0), _value the exp from them.  A loop that forms a run of arguments into a
 *   buffer and then their exps (see block_sumexp) has two short dependency chains instead of
 *   one long one, which kept the processor from overlapping enough elements (a row's sum
 *   in a C loop: 0.83 of the time, float32 and float64 alike), with the same bits. */
static inline double cylsm_exp_nonpos_arg(double x, double lo, double *s)
{
    const double shifter = 0x1.8p52;
    const double log2e = 0x1.71547652b82fep0;
    const double ln2_hi = 0x1.62e42feep-1;
    const double ln2_lo = 0x1.a39ef35793c76p-33;

    cylsm_bits kb, s1;
    double kd = x * log2e + shifter;
    kb.d = kd;
    kd -= shifter;
    double r = ((x - kd * ln2_hi) + lo) - kd * ln2_lo;
    /* kb.u = 0x4338000000000000 + k (two's complement), so (kb.u << 52) + ((1023 + 600) << 52)
     * is the bit pattern of 2^(k + 600), normal for -1622 <= k <= 0. */
    s1.u = (kb.u << 52) + ((uint64_t)(1023 + 600) << 52);
    cylsm_bits rb;                                   /* both 0 by a mask where kd < -1600 */
    uint64_t keep = kd < -1600.0 ? 0u : ~(uint64_t)0;  /* (NaN compares false: kept) */
    rb.d = r;
    rb.u &= keep;
    s1.u &= keep;
    *s = s1.d;
    return rb.d;
}

/* exp(x + lo) * 2^600 from _arg's r and s: never subnormal (as cylsm_expf_nonpos_scaled), for
 * sums of many terms that are unscaled once, by CYLSM_UNSCALE64, instead of each term. */
static inline double cylsm_exp_nonpos_scaled_value(double r, double s)
{
    return cylsm_scale_exp(cylsm_expm1_poly(r), s);                 /* 0 where r = s = 0 */
}
#define CYLSM_UNSCALE64 0x1p-600

static inline double cylsm_exp_nonpos_value(double r, double s)
{
    return cylsm_exp_nonpos_scaled_value(r, s) * CYLSM_UNSCALE64;
}

static inline double cylsm_exp_nonpos(double x, double lo)
{
    double s;
    double r = cylsm_exp_nonpos_arg(x, lo, &s);
    return cylsm_exp_nonpos_value(r, s);
}

/* exp(x + lo) * 2^64 for a float x <= 0: cylsm_exp_nonpos in single precision, without the
 * final scaling by 2^-64.  2^(k + 64) is normal for k >= -190, so the scaled result is never
 * subnormal: the caller unscales it in double (exactly: float32 rows sum their terms in
 * double, and no term is rounded to float's subnormal grid, which would put the log1p of a
 * sum of many terms below 2^-126 many spacings off) or in float (rounded once, a float
 * exp).  0 where kd < -188 (x below about -130), terms that are nothing next to the 1 of the
 * maximum. */
#define CYLSM_UNSCALE 0x1p-64

/* e, or +0 where v == m, made by masking e's bits.  As a select (v == m ? 0 : e), a float term
 * that is then added to a double sum is selected by GCC after the widening, with the mask
 * widened too: two more operations per vector than masking the float. */
static inline float cylsm_zero_if_equalf(float e, float v, float m)
{
    cylsm_bits32 b;
    b.f = e;
    b.u &= v == m ? 0u : ~0u;
    return b.f;
}

/* Whether the target has a fused multiply-add instruction (fmaf is then one instruction that
 * vectorizes; without it, a libm call per element). */
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
#define CYLSM_FMA 1
#else
#define CYLSM_FMA 0
#endif

static inline float cylsm_expf_nonpos_scaled_arg(float x, float lo, float *s)
{
    const float shifter = 0x1.8p23f;
    const float log2e = 0x1.715476p0f;
    const float ln2_hi = 0x1.62e4p-1f;
    const float ln2_lo = 0x1.7f7d1cp-20f;

    cylsm_bits32 kb, s1;
    float kd = x * log2e + shifter;
    kb.f = kd;
    kd -= shifter;
    float r = ((x - kd * ln2_hi) + lo) - kd * ln2_lo;
    s1.u = (kb.u << 23) + ((uint32_t)(127 + 64) << 23);   /* 2^(k + 64), normal for k >= -190 */
    cylsm_bits32 rb;                                  /* both 0 by a mask where kd < -188 */
    uint32_t keep = kd < -188.0f ? 0u : ~0u;          /* (NaN compares false: kept; selects */
    rb.f = r;                                         /* made GCC leave the short rows' loop */
    rb.u &= keep;                                     /* scalar) */
    s1.u &= keep;
    *s = s1.f;
    return rb.f;
}

static inline float cylsm_expf_nonpos_scaled_value(float r, float s)
{
    return cylsm_scale_expf(cylsm_expm1f_poly(r), s);
}

static inline float cylsm_expf_nonpos_scaled(float x, float lo)
{
    float s;
    float r = cylsm_expf_nonpos_scaled_arg(x, lo, &s);
    return cylsm_expf_nonpos_scaled_value(r, s);
}

/* log1p(t) for t >= 0 (or NaN, +inf), branch-free so that a loop over many rows' sums
 * vectorizes (libm's log1p is a call per row, which dominated rows of 32 elements).  The
 * classic method (as in fdlibm): u = 1 + t rounded, c = the rounding error of that sum over u;
 * u = 2^k m with m in [sqrt(2)/2, sqrt(2)), f = m - 1, s = f / (2 + f), and
 * log(m) = f - f^2/2 + s (f^2/2 + R(s^2)) with fdlibm's minimax R (error below 2^-58);
 * log1p(t) = k ln2 + log(m) + c.  Here for finite t, and t + tlo (tlo a correction of t, at
 * most an ulp of it, whose share is tlo / u), in three parts: returns big = k ln2_hi (exact:
 * ln2_hi has 32 bits), *f = f (exact: m - 1), and *small the rest, rounded. */
static inline double cylsm_log1p_parts(double t, double tlo, double *f, double *small)
{
    const double ln2_hi = 0x1.62e42feep-1;           /* 6.93147180369123816490e-01 */
    const double ln2_lo = 0x1.a39ef35793c76p-33;     /* 1.90821492927058770002e-10 */
    const double Lg1 = 6.666666666666735130e-01, Lg2 = 3.999999999940941908e-01;
    const double Lg3 = 2.857142874366239149e-01, Lg4 = 2.222219843214978396e-01;
    const double Lg5 = 1.818357216161805012e-01, Lg6 = 1.531383769920937332e-01;
    const double Lg7 = 1.479819860511658591e-01;

    double u = 1.0 + t;
    cylsm_bits ub, mb;
    ub.d = u;
    /* Shift the bits so that the exponent field counts from sqrt(2)/2, not from 1. */
    uint64_t hx = ub.u + (0x3ff0000000000000ULL - 0x3fe6a09e667f3bcdULL);
    mb.u = (hx & 0x000fffffffffffffULL) + 0x3fe6a09e667f3bcdULL;
    /* k = (hx >> 52) - 1023 as a double, exactly, by the bits of 2^52 + (hx >> 52): a loop of
     * these vectorizes with AVX2, which has no int64-to-double conversion (with one, GCC left
     * the loop over a tile's 16 sums scalar: 8% of float32 log_softmax over rows of 32). */
    cylsm_bits kb;
    kb.u = 0x4330000000000000ULL | (hx >> 52);
    double dk = kb.d - (0x1p52 + 1023.0);
    /* The rounding error of 1 + t, exact: for u >= 4, 1 - (u - t); below, t - (u - 1). */
    double c = ((dk >= 2.0 ? 1.0 - (u - t) : t - (u - 1.0)) + tlo) / u;
    c = dk < 54.0 ? c : 0.0;

    double fm = mb.d - 1.0;
    double hfsq = 0.5 * fm * fm;
    double s = fm / (2.0 + fm);
    double z = s * s;
    double w = z * z;
    double t1 = w * (Lg2 + w * (Lg4 + w * Lg6));
    double t2 = z * (Lg1 + w * (Lg3 + w * (Lg5 + w * Lg7)));
    double r = t2 + t1;
    *f = fm;
    *small = s * (hfsq + r) + (dk * ln2_lo + c) - hfsq;
    return dk * ln2_hi;
}

/* log1p(t), rounded (under 1 ulp). */
static inline double cylsm_log1p(double t)
{
    double f, small;
    double big = cylsm_log1p_parts(t, 0.0, &f, &small);
    double y = small + f + big;
    return t <= 0x1.fffffffffffffp1023 ? y : t;      /* +inf and NaN as they are */
}

/* log1p(t + tlo) as hi + *lo (|tlo| <= ulp(t)): the parts summed with one rounding error
 * kept (big + f is exact), so that hi + *lo is within about 2^-58 |hi| of the true value,
 * against half an ulp for a rounded result. */
static inline double cylsm_log1p_dd(double t, double tlo, double *lo)
{
    double f, small;
    double big = cylsm_log1p_parts(t, tlo, &f, &small);
    double hi = big + f;                             /* TwoSum of big and f */
    double bb = hi - big;
    double e = (big - (hi - bb)) + (f - bb);
    double h2 = hi + small;                          /* Fast2Sum: |small| < |hi| or hi = 0 */
    int finite = t <= 0x1.fffffffffffffp1023;
    *lo = finite ? (small - (h2 - hi)) + e : 0.0;
    return finite ? h2 : t;                          /* +inf and NaN as they are */
}

static inline float cylsm_two_difff(float a, float b, float *lo)
{
    float s = a - b;
    float bb = s - a;
    *lo = (a - (s - bb)) - (b + bb);
    return s;
}

/* Order-preserving integer keys of floats: key(a) < key(b) when a < b (for non-NaN a, b; +0.0
 * ranks above -0.0).  GCC vectorizes integer max reductions but not IEEE ones without
 * -ffast-math, so the maximum of a row is taken over keys.  Positive NaNs rank above +inf and
 * negative ones below -inf.  The map is its own inverse. */
static inline int32_t cylsm_key32(float x)
{
    cylsm_bits32 b;
    b.f = x;
    int32_t i = (int32_t)b.u;
    return i ^ ((i >> 31) & 0x7fffffff);
}

static inline float cylsm_unkey32(int32_t k)
{
    cylsm_bits32 b;
    b.u = (uint32_t)(k ^ ((k >> 31) & 0x7fffffff));
    return b.f;
}

static inline int64_t cylsm_key64(double x)
{
    cylsm_bits b;
    b.d = x;
    int64_t i = (int64_t)b.u;
    return i ^ ((i >> 63) & 0x7fffffffffffffffLL);
}

static inline double cylsm_unkey64(int64_t k)
{
    cylsm_bits b;
    b.u = (uint64_t)(k ^ ((k >> 63) & 0x7fffffffffffffffLL));
    return b.d;
}

/* a - b, and in *lo its rounding error: a - b == result + *lo exactly (Knuth's TwoSum). */
static inline double cylsm_two_diff(double a, double b, double *lo)
{
    double s = a - b;
    double bb = s - a;
    *lo = (a - (s - bb)) - (b + bb);
    return s;
}

/* a * b, and in *lo its rounding error: a * b == result + *lo exactly, unless the product
 * overflows or its error underflows (TwoProduct).  With a fused multiply-add, the error is one
 * fma.  The product must stay a rounded product where the caller adds it (TwoSum): GCC fuses a
 * product into an addition only when every use of it is an addition or subtraction, and its
 * use in the fma is not (the v3 loop of block_dot2 has vmulpd, then vfmsub for the error, and
 * adds h as it is; test_softmax_backward_float64_in_ulps would catch a fused one).  Without
 * an fma: Dekker's splitting of a and b in halves of 26 bits, whose products are exact (not
 * for |a|, |b| >= 2^996: *lo is then NaN, which the caller checks). */
static inline double cylsm_two_prod(double a, double b, double *lo)
{
    double h = a * b;
#if CYLSM_FMA
    *lo = fma(a, b, -h);
#else
    const double split = 134217729.0;                 /* 2^27 + 1 */
    double ca = split * a, cb = split * b;
    double ah = ca - (ca - a), bh = cb - (cb - b);
    double al = a - ah, bl = b - bh;
    *lo = ((ah * bh - h) + ah * bl + al * bh) + al * bl;
#endif
    return h;
}

#endif
