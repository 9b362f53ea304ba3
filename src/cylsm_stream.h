/* Non-temporal ("streaming") copies: a chunk of output computed into a buffer in L1, written
 * to its destination past the caches (see streamed_output in _kernels.pxi).
 *
 * A plain store to memory that is not cached first reads the line it writes into (a read
 * for ownership): softmax_backward over 4096 x 1024 float64 moved four arrays' worth of
 * bytes for its three.  A streaming store writes whole lines without reading them: 0.75-0.95
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

/* d[0:n] = s[0:n]: plain stores up to d's first ALIGN-byte boundary, then streaming stores
 * of W elements, then plain stores for the last few. */
#define CYLSM_STREAM_COPY(name, T, W, ALIGN, STORE, LOAD)                                   \
    static inline void name(T *d, const T *s, ptrdiff_t n)                                  \
    {                                                                                       \
        ptrdiff_t i = 0;                                                                    \
        for (; i < n && ((uintptr_t)(d + i) & (ALIGN - 1)); i++)                            \
            d[i] = s[i];                                                                    \
        for (; i + W <= n; i += W)                                                          \
            STORE(d + i, LOAD(s + i));                                                      \
        for (; i < n; i++)                                                                  \
            d[i] = s[i];                                                                    \
    }

#if defined(__AVX512F__)
CYLSM_STREAM_COPY(cylsm_stream_f32, float, 16, 64, _mm512_stream_ps, _mm512_loadu_ps)
CYLSM_STREAM_COPY(cylsm_stream_f64, double, 8, 64, _mm512_stream_pd, _mm512_loadu_pd)
#elif defined(__AVX__)
CYLSM_STREAM_COPY(cylsm_stream_f32, float, 8, 32, _mm256_stream_ps, _mm256_loadu_ps)
CYLSM_STREAM_COPY(cylsm_stream_f64, double, 4, 32, _mm256_stream_pd, _mm256_loadu_pd)
#elif CYLSM_STREAMING
CYLSM_STREAM_COPY(cylsm_stream_f32, float, 4, 16, _mm_stream_ps, _mm_loadu_ps)
CYLSM_STREAM_COPY(cylsm_stream_f64, double, 2, 16, _mm_stream_pd, _mm_loadu_pd)
#else
#define CYLSM_PLAIN_STORE(d, v) (*(d) = (v))
#define CYLSM_PLAIN_LOAD(s) (*(s))
CYLSM_STREAM_COPY(cylsm_stream_f32, float, 1, 1, CYLSM_PLAIN_STORE, CYLSM_PLAIN_LOAD)
CYLSM_STREAM_COPY(cylsm_stream_f64, double, 1, 1, CYLSM_PLAIN_STORE, CYLSM_PLAIN_LOAD)
#endif

static inline void cylsm_stream_fence(void)
{
#if CYLSM_STREAMING
    _mm_sfence();
#endif
}

#endif
