/* cylsm_buffers.h: the memory of the large arrays cylsm returns, kept for reuse once freed.
 *
 * A new array of tens of megabytes costs its page faults: the kernel maps and zeroes every page
 * the first time it is written, which took a float64 softmax of 4096 x 1024 (32 MiB out) 9.5 ms
 * instead of 6.1 ms into an existing array.  glibc hands such sizes back to the kernel on free
 * (at 32 MiB and over always), so every call pays again.  This NumPy memory handler (NEP 49),
 * installed only while the kernels allocate an output of at least CYLSM_BUFFER_MIN bytes, keeps
 * the most recently freed of those buffers, up to a limit of bytes and of buffers, and gives one
 * back to the next output it fits.  NumPy records the handler in each array, so the buffer
 * comes back here wherever and whenever the array is freed.
 *
 * A buffer starts with a header of CYLSM_BUFFER_HEAD bytes (its capacity and the size of its
 * mapping), so the data is 64-byte aligned and realloc knows what it holds.  On Linux buffers
 * are mapped by themselves, 2 MiB aligned and advised as transparent huge pages when NumPy's
 * own large arrays are (numpy._core.multiarray._get_madvise_hugepage()); elsewhere they come
 * from malloc.  One lock guards the list: arrays may be freed on any thread, and the
 * free-threaded build has no GIL to serialise them.
 */
#ifndef CYLSM_BUFFERS_H
#define CYLSM_BUFFERS_H

#include <Python.h>
#include <pythread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "numpy/ndarraytypes.h"
#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#define CYLSM_BUFFER_MIN ((size_t)4 << 20)      /* outputs this large use the handler */
#define CYLSM_BUFFER_HEAD ((size_t)64)
#define CYLSM_BUFFER_SLOTS 8                    /* at most this many freed buffers kept */
#define CYLSM_HUGE ((size_t)2 << 20)

typedef struct {
    size_t capacity;    /* bytes of data the buffer holds */
    size_t mapped;      /* bytes mapped (Linux) or allocated, header included */
} cylsm_buffer_head;

static struct {
    PyThread_type_lock lock;
    size_t limit;                       /* bytes of freed buffers kept at most */
    size_t held;                        /* bytes of freed buffers kept now */
    int count;
    char* slot[CYLSM_BUFFER_SLOTS];     /* headers of the kept buffers, last freed first */
    int hugepages;
    size_t reused, fresh;               /* buffers handed out: from the list, newly mapped */
} cylsm_pool;

static size_t cylsm_round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

/* A new buffer of at least n data bytes: its header, or NULL. */
static char* cylsm_buffer_new(size_t n) {
    size_t need = n + CYLSM_BUFFER_HEAD;
    char* block;
    if (need < n)
        return NULL;
#if defined(__linux__)
    {
        size_t page = (size_t)sysconf(_SC_PAGESIZE);
        size_t align = cylsm_pool.hugepages && need >= CYLSM_HUGE ? CYLSM_HUGE : page;
        size_t len = cylsm_round_up(need, align), extra = align - page;
        char* map = (char*)mmap(NULL, len + extra, PROT_READ | PROT_WRITE,
                                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (map == (char*)MAP_FAILED)
            return NULL;
        block = (char*)cylsm_round_up((size_t)(uintptr_t)map, align);
        if (block > map)
            munmap(map, (size_t)(block - map));
        if (map + len + extra > block + len)
            munmap(block + len, (size_t)(map + len + extra - (block + len)));
        if (align == CYLSM_HUGE)
            madvise(block, len, MADV_HUGEPAGE);
        need = len;
    }
#else
    block = (char*)malloc(need);
    if (block == NULL)
        return NULL;
#endif
    ((cylsm_buffer_head*)block)->capacity = need - CYLSM_BUFFER_HEAD;
    ((cylsm_buffer_head*)block)->mapped = need;
    return block;
}

static void cylsm_buffer_release(char* block) {
#if defined(__linux__)
    munmap(block, ((cylsm_buffer_head*)block)->mapped);
#else
    free(block);
#endif
}

static size_t cylsm_capacity(const char* block) {
    return ((const cylsm_buffer_head*)block)->capacity;
}

/* The kept buffer that best fits n bytes (the smallest that holds them and is at most twice
 * as large: a small array does not pin a large buffer), taken off the list; or NULL. */
static char* cylsm_buffer_take(size_t n) {
    char* found = NULL;
    int i, best = -1;
    PyThread_acquire_lock(cylsm_pool.lock, WAIT_LOCK);
    for (i = 0; i < cylsm_pool.count; i++) {
        size_t c = cylsm_capacity(cylsm_pool.slot[i]);
        if (c >= n && c / 2 <= n && (best < 0 || c < cylsm_capacity(cylsm_pool.slot[best])))
            best = i;
    }
    if (best >= 0) {
        found = cylsm_pool.slot[best];
        cylsm_pool.held -= cylsm_capacity(found);
        cylsm_pool.count--;
        memmove(&cylsm_pool.slot[best], &cylsm_pool.slot[best + 1],
                (size_t)(cylsm_pool.count - best) * sizeof(char*));
        cylsm_pool.reused++;
    } else {
        cylsm_pool.fresh++;
    }
    PyThread_release_lock(cylsm_pool.lock);
    return found;
}

/* Keep a freed buffer first in the list; release those that no longer fit the limits. */
static void cylsm_buffer_keep(char* block) {
    char* drop[CYLSM_BUFFER_SLOTS + 1];
    int ndrop = 0, i;
    PyThread_acquire_lock(cylsm_pool.lock, WAIT_LOCK);
    if (cylsm_capacity(block) > cylsm_pool.limit) {
        drop[ndrop++] = block;
    } else {
        if (cylsm_pool.count == CYLSM_BUFFER_SLOTS)
            drop[ndrop++] = cylsm_pool.slot[--cylsm_pool.count];
        memmove(&cylsm_pool.slot[1], &cylsm_pool.slot[0],
                (size_t)cylsm_pool.count * sizeof(char*));
        cylsm_pool.slot[0] = block;
        cylsm_pool.count++;
        cylsm_pool.held += cylsm_capacity(block);
        for (i = 0; i < ndrop; i++)
            cylsm_pool.held -= cylsm_capacity(drop[i]);
        while (cylsm_pool.held > cylsm_pool.limit) {   /* stops at block: it fits alone */
            drop[ndrop] = cylsm_pool.slot[--cylsm_pool.count];
            cylsm_pool.held -= cylsm_capacity(drop[ndrop++]);
        }
    }
    PyThread_release_lock(cylsm_pool.lock);
    for (i = 0; i < ndrop; i++)
        cylsm_buffer_release(drop[i]);
}

/* The handler's functions: data pointers are CYLSM_BUFFER_HEAD bytes past their header. */
static void* cylsm_handler_malloc(void* ctx, size_t n) {
    char* block = cylsm_buffer_take(n);
    (void)ctx;
    if (block == NULL)
        block = cylsm_buffer_new(n);
    return block == NULL ? NULL : block + CYLSM_BUFFER_HEAD;
}

static void* cylsm_handler_calloc(void* ctx, size_t nelem, size_t elsize) {
    char* data;
    size_t n = nelem * elsize;
    if (elsize != 0 && n / elsize != nelem)
        return NULL;
    data = (char*)cylsm_handler_malloc(ctx, n);
    if (data != NULL)
        memset(data, 0, n);
    return data;
}

static void* cylsm_handler_realloc(void* ctx, void* data, size_t n) {
    char* block;
    void* moved;
    if (data == NULL)
        return cylsm_handler_malloc(ctx, n);
    block = (char*)data - CYLSM_BUFFER_HEAD;
    if (n <= cylsm_capacity(block))
        return data;
    moved = cylsm_handler_malloc(ctx, n);
    if (moved != NULL) {
        memcpy(moved, data, cylsm_capacity(block));
        cylsm_buffer_keep(block);
    }
    return moved;
}

static void cylsm_handler_free(void* ctx, void* data, size_t size) {
    (void)ctx;
    (void)size;
    if (data != NULL)
        cylsm_buffer_keep((char*)data - CYLSM_BUFFER_HEAD);
}

static PyDataMem_Handler cylsm_handler = {
    "cylsm_buffers", 1,
    {NULL, cylsm_handler_malloc, cylsm_handler_calloc, cylsm_handler_realloc,
     cylsm_handler_free}};

/* limit, held, count, reused, fresh (see cylsm_pool) into numbers[0..4]. */
static void cylsm_buffers_stats(size_t* numbers) {
    PyThread_acquire_lock(cylsm_pool.lock, WAIT_LOCK);
    numbers[0] = cylsm_pool.limit;
    numbers[1] = cylsm_pool.held;
    numbers[2] = (size_t)cylsm_pool.count;
    numbers[3] = cylsm_pool.reused;
    numbers[4] = cylsm_pool.fresh;
    PyThread_release_lock(cylsm_pool.lock);
}

/* Set up the list (once per module): 0, or -1 when no lock could be made. */
static int cylsm_buffers_init(size_t limit, int hugepages) {
    cylsm_pool.lock = PyThread_allocate_lock();
    cylsm_pool.limit = limit;
    cylsm_pool.hugepages = hugepages;
    return cylsm_pool.lock == NULL ? -1 : 0;
}

/* In a child process after fork: another thread of the parent may have held the lock, or been
 * changing the list, at the fork.  The child starts with a new lock and an empty list; the
 * buffers of the parent's list stay mapped, unused (their pages are shared with the parent
 * until written, so they cost the child no memory). */
static int cylsm_buffers_after_fork(void) {
    cylsm_pool.count = 0;
    cylsm_pool.held = 0;
    cylsm_pool.lock = PyThread_allocate_lock();
    return cylsm_pool.lock == NULL ? -1 : 0;
}

#endif
