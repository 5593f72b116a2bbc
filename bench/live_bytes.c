/* The bytes malloc has handed out and not yet taken back, and their peak: the CPU counterpart of CUDA's
 * torch.cuda.max_memory_allocated() for bench/throughput.py. Loaded into a worker with LD_PRELOAD; every
 * malloc-family call goes to glibc's own (__libc_*) and is counted with malloc_usable_size.
 *
 * Why not the peak RSS: glibc keeps freed memory in its arenas (one per thread that allocated) and returns
 * it to the kernel only from an arena's top, so a process's RSS records how its frees fragmented those
 * arenas as much as what it held. Measured on the benchmark's default (GPT-2 6x512, 2 CPU threads):
 * between training steps 410-418 MB in use against 450-970 MB free but kept, and a step's RSS rose
 * by 1052 MB over a malloc_trim'd start while what it held rose by 424 MB.
 *
 * Not counted: memory mapped without malloc (files, Python's small-object arenas, thread stacks). */
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <stdatomic.h>
#include <stddef.h>

extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);
extern void *__libc_valloc(size_t);
extern void *__libc_pvalloc(size_t);
extern void __libc_free(void *);

static _Atomic long long live, peak;

static void *counted(void *p) {
    if (p) {
        long long size = (long long)malloc_usable_size(p);
        long long now = atomic_fetch_add_explicit(&live, size, memory_order_relaxed) + size;
        long long seen = atomic_load_explicit(&peak, memory_order_relaxed);
        while (now > seen && !atomic_compare_exchange_weak_explicit(&peak, &seen, now, memory_order_relaxed,
                                                                    memory_order_relaxed)) {
        }
    }
    return p;
}

void *malloc(size_t n) { return counted(__libc_malloc(n)); }
void *calloc(size_t k, size_t n) { return counted(__libc_calloc(k, n)); }
void *memalign(size_t a, size_t n) { return counted(__libc_memalign(a, n)); }
void *aligned_alloc(size_t a, size_t n) { return counted(__libc_memalign(a, n)); }
void *valloc(size_t n) { return counted(__libc_valloc(n)); }
void *pvalloc(size_t n) { return counted(__libc_pvalloc(n)); }

void free(void *p) {
    if (p) atomic_fetch_sub_explicit(&live, (long long)malloc_usable_size(p), memory_order_relaxed);
    __libc_free(p);
}

void *realloc(void *p, size_t n) {
    if (!p) return malloc(n);
    if (!n) {
        free(p);
        return NULL;
    }
    long long old = (long long)malloc_usable_size(p);
    void *q = __libc_realloc(p, n);
    if (q) {  /* on failure p is untouched and still counted */
        atomic_fetch_sub_explicit(&live, old, memory_order_relaxed);
        counted(q);
    }
    return q;
}

int posix_memalign(void **out, size_t a, size_t n) {
    if (a < sizeof(void *) || (a & (a - 1))) return EINVAL;
    void *p = __libc_memalign(a, n);
    if (!p) return ENOMEM;
    *out = counted(p);
    return 0;
}

long long live_bytes_now(void) { return atomic_load(&live); }
long long live_bytes_peak(void) { return atomic_load(&peak); }
void live_bytes_reset_peak(void) { atomic_store(&peak, atomic_load(&live)); }  /* a new peak from now on */
