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
 * - exp(r) = 1 + (r + r^2 q(r)) with q the Taylor series to degree 13 (truncation < 2^-57
 *   relative), added to 1 last so that the result is rounded once: about 0.6 ulp.
 * - 2^k is applied as two normal powers of two (k = k1 + k2), so results in the subnormal range
 *   are rounded once, correctly, instead of being flushed; x > 709.78 gives +inf, x < -745.14
 *   gives +0, -inf gives +0, +inf gives +inf, NaN gives NaN.
 * - The clamp is written as comparisons that are false for NaN, so NaN is kept.
 */
#ifndef CYLSM_EXP_H
#define CYLSM_EXP_H

#include <stdint.h>

/* Type punning through a union (GCC/Clang/MSVC define it); memcpy would keep the vectorizer off. */
typedef union { double d; uint64_t u; } cylsm_bits;

/* exp(x + lo) where lo is a correction far below ulp(x), typically the rounding error of the
 * difference that produced x (see cylsm_two_diff): lo joins the reduced argument r, so
 * exp(a - b) comes out as accurate as if a - b had been exact.  lo is ignored when x is not a
 * finite number in the clamp range. */
static inline double cylsm_exp_lo(double x, double lo)
{
    const double shifter = 0x1.8p52;                 /* 1.5 * 2^52 */
    const uint64_t shifter_bits = 0x4338000000000000ULL;
    const double log2e = 0x1.71547652b82fep0;
    const double ln2_hi = 0x1.62e42feep-1;           /* 32 significant bits */
    const double ln2_lo = 0x1.a39ef35793c76p-33;

    double xc = x < -1100.0 ? -1100.0 : x;           /* NaN compares false: kept */
    xc = xc > 1100.0 ? 1100.0 : xc;
    lo = xc == x ? lo : 0.0;                         /* clamped, inf or NaN: no correction */

    cylsm_bits kb, hb, s1, s2;
    double kd = xc * log2e + shifter;
    kb.d = kd;
    kd -= shifter;                                   /* k as an exact double */
    double r = ((xc - kd * ln2_hi) + lo) - kd * ln2_lo;

    /* Split k = k1 + k2 with both halves giving normal powers of two. */
    hb.d = kd * 0.5 + shifter;
    uint64_t k = kb.u - shifter_bits;                /* two's complement k */
    uint64_t k1 = hb.u - shifter_bits;
    uint64_t k2 = k - k1;
    s1.u = (k1 + 1023u) << 52;
    s2.u = (k2 + 1023u) << 52;

    /* q(r) = sum_{j=2}^{13} r^(j-2) / j!, evaluated by Estrin's scheme for throughput. */
    double r2 = r * r;
    double r4 = r2 * r2;
    double r8 = r4 * r4;
    double a0 = 0x1.0p-1 + r * 0x1.5555555555555p-3;             /* 1/2!, 1/3! */
    double a1 = 0x1.5555555555555p-5 + r * 0x1.1111111111111p-7; /* 1/4!, 1/5! */
    double a2 = 0x1.6c16c16c16c17p-10 + r * 0x1.a01a01a01a01ap-13; /* 1/6!, 1/7! */
    double a3 = 0x1.a01a01a01a01ap-16 + r * 0x1.71de3a556c734p-19; /* 1/8!, 1/9! */
    double a4 = 0x1.27e4fb7789f5cp-22 + r * 0x1.ae64567f544e4p-26; /* 1/10!, 1/11! */
    double a5 = 0x1.1eed8eff8d898p-29 + r * 0x1.6124613a86d09p-33; /* 1/12!, 1/13! */
    double b0 = a0 + r2 * a1;
    double b1 = a2 + r2 * a3;
    double b2 = a4 + r2 * a5;
    double q = (b0 + r4 * b1) + r8 * b2;
    double y = 1.0 + (r + r2 * q);
    return (y * s1.d) * s2.d;
}

static inline double cylsm_exp(double x)
{
    return cylsm_exp_lo(x, 0.0);
}

/* a - b, and in *lo its rounding error: a - b == result + *lo exactly (Knuth's TwoSum). */
static inline double cylsm_two_diff(double a, double b, double *lo)
{
    double s = a - b;
    double bb = s - a;
    *lo = (a - (s - bb)) - (b + bb);
    return s;
}

#endif
