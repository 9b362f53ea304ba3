/* Non-temporal ("streaming") copies: a chunk of output computed into a buffer in L1, written
 * to its destination past the caches (see streamed_output in _kernels.pxi).
 *
 * A plain store to memory that is not cached first reads the line it writes into (a read
 * for ownership): softmax_backward over 4096 x 1024 float64 moved four arrays' worth of
 * bytes for its three.  A streaming store writes whole lines without reading them: 0.75-0.9
 * of the time for outputs too big to stay in cache.  The destination need not be aligned:
 * the elements up to its first vector-aligned one, and the last few, are plain stores.
 * Streaming stores are weakly ordered: a thread that streamed calls cylsm_stream_fence before
 * another thread may read what it wrote.  Without SSE2 (aarch64, or no x86 vector
 * extension) the copy is plain. */
#ifndef CYLSM_STREAM_H
#define CYLSM_STREAM_H

#include <stddef.h>
#include <stdint.h>
#if defined(__SSE2__) || defined(_M_X64) || defined(_M_AMD64)
#include <immintrin.h>
#define CYLSM_STREAMING 1
#else
#define CYLSM_STREAMING 0
#endif

static inline void cylsm_stream_f32(float *d, const float *s, ptrdiff_t n)
{
    ptrdiff_t i = 0;
#if defined(__AVX512F__)
    for (; i < n && ((uintptr_t)(d + i) & 63); i++)
        d[i] = s[i];
    for (; i + 16 <= n; i += 16)
        _mm512_stream_ps(d + i, _mm512_loadu_ps(s + i));
#elif defined(__AVX__)
    for (; i < n && ((uintptr_t)(d + i) & 31); i++)
        d[i] = s[i];
    for (; i + 8 <= n; i += 8)
        _mm256_stream_ps(d + i, _mm256_loadu_ps(s + i));
#elif CYLSM_STREAMING
    for (; i < n && ((uintptr_t)(d + i) & 15); i++)
        d[i] = s[i];
    for (; i + 4 <= n; i += 4)
        _mm_stream_ps(d + i, _mm_loadu_ps(s + i));
#endif
    for (; i < n; i++)
        d[i] = s[i];
}

static inline void cylsm_stream_f64(double *d, const double *s, ptrdiff_t n)
{
    ptrdiff_t i = 0;
#if defined(__AVX512F__)
    for (; i < n && ((uintptr_t)(d + i) & 63); i++)
        d[i] = s[i];
    for (; i + 8 <= n; i += 8)
        _mm512_stream_pd(d + i, _mm512_loadu_pd(s + i));
#elif defined(__AVX__)
    for (; i < n && ((uintptr_t)(d + i) & 31); i++)
        d[i] = s[i];
    for (; i + 4 <= n; i += 4)
        _mm256_stream_pd(d + i, _mm256_loadu_pd(s + i));
#elif CYLSM_STREAMING
    for (; i < n && ((uintptr_t)(d + i) & 15); i++)
        d[i] = s[i];
    for (; i + 2 <= n; i += 2)
        _mm_stream_pd(d + i, _mm_loadu_pd(s + i));
#endif
    for (; i < n; i++)
        d[i] = s[i];
}

static inline void cylsm_stream_fence(void)
{
#if CYLSM_STREAMING
    _mm_sfence();
#endif
}

#endif
