/* Which kernel level can this CPU run?  Compiled without -march flags (it is part of every
 * kernel module, the baseline one included) and asked once, at import.
 *   0: baseline (any CPU of the architecture)
 *   3: x86-64-v3 (AVX2, FMA, BMI1/2, F16C, LZCNT, MOVBE, with OS support for AVX state)
 *   4: x86-64-v4 (v3 + AVX-512 F/BW/CD/DQ/VL, with OS support for AVX-512 state)
 */
#ifndef CYLSM_CPU_H
#define CYLSM_CPU_H

#ifndef CYLSM_BUILD_FLAGS
#define CYLSM_BUILD_FLAGS ""
#endif

/* Prefetch hints (no effect on results; never fault, even past the end of an array):
 * cylsm_prefetch brings the line at p into the cache for reading, cylsm_prefetchw for
 * writing.  Compilers without them get no-ops. */
#if defined(__GNUC__) || defined(__clang__)
#define cylsm_prefetch(p) __builtin_prefetch((const void *)(p), 0, 3)
#define cylsm_prefetchw(p) __builtin_prefetch((const void *)(p), 1, 3)
#elif defined(_MSC_VER) && (defined(_M_X64) || defined(_M_AMD64))
#include <xmmintrin.h>
#define cylsm_prefetch(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
#define cylsm_prefetchw(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
#else
#define cylsm_prefetch(p) ((void)(p))
#define cylsm_prefetchw(p) ((void)(p))
#endif

#if defined(_MSC_VER) && (defined(_M_X64) || defined(_M_AMD64))
#include <intrin.h>
#include <immintrin.h>
static int cylsm_cpu_level(void)
{
    int r1[4], r7[4], rx[4];
    __cpuid(r1, 1);
    __cpuidex(r7, 7, 0);
    __cpuid(rx, (int)0x80000001);
    int osxsave = (r1[2] >> 27) & 1;
    if (!osxsave) return 0;
    unsigned long long xcr0 = _xgetbv(0);
    int avx_os = (xcr0 & 0x6) == 0x6;
    int avx512_os = (xcr0 & 0xE6) == 0xE6;
    int v3 = avx_os && ((r1[2] >> 28) & 1) /* AVX */ && ((r1[2] >> 12) & 1) /* FMA */
             && ((r1[2] >> 29) & 1) /* F16C */ && ((r1[2] >> 22) & 1) /* MOVBE */
             && ((r7[1] >> 5) & 1) /* AVX2 */ && ((r7[1] >> 3) & 1) /* BMI1 */
             && ((r7[1] >> 8) & 1) /* BMI2 */ && ((rx[2] >> 5) & 1) /* LZCNT */;
    int v4 = v3 && avx512_os && ((r7[1] >> 16) & 1) /* F */ && ((r7[1] >> 17) & 1) /* DQ */
             && ((r7[1] >> 28) & 1) /* CD */ && ((r7[1] >> 30) & 1) /* BW */
             && ((r7[1] >> 31) & 1) /* VL */;
    return v4 ? 4 : v3 ? 3 : 0;
}
#elif (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
static int cylsm_cpu_level(void)
{
    __builtin_cpu_init();
    /* __builtin_cpu_supports checks that the OS saves the AVX / AVX-512 state as well. */
    int v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
             && __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2")
             && __builtin_cpu_supports("avx");
    int v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
             && __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq")
             && __builtin_cpu_supports("avx512vl");
    return v4 ? 4 : v3 ? 3 : 0;
}
#else
static int cylsm_cpu_level(void) { return 0; }
#endif

#endif
