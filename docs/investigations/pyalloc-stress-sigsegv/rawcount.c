/* LD_PRELOAD shim: counts PyMem_Raw* calls made by threads with no attached
 * thread state (the calls that can read a half-written raw allocator while
 * tracemalloc.start()/stop() runs), grouped by caller. libpython calls
 * PyMem_RawFree/RawCalloc through its PLT, so they are interposed too. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stddef.h>

typedef void *(*tstate_fn)(void);
static tstate_fn get_tstate;
static void *(*r_malloc)(size_t), *(*r_calloc)(size_t, size_t), *(*r_realloc)(void *, size_t);
static void (*r_free)(void *);

#define NSLOT 256
static struct { void *_Atomic caller; atomic_long n; const char *what; } slots[NSLOT];
static atomic_long total, during;
/* PyMem_SetAllocator(RAW) calls so far; the first and the last one seen. */
static atomic_long sets;
typedef struct { void *ctx; void *m, *c, *r, *f; } alloc_t;
static void (*r_set)(int, alloc_t *);
void PyMem_SetAllocator(int domain, alloc_t *a)
{
    if (!r_set) r_set = dlsym(RTLD_NEXT, "PyMem_SetAllocator");
    if (domain == 0) atomic_fetch_add(&sets, 1);
    r_set(domain, a);
}
#define MAXCALLS 100000
static long call_seq[MAXCALLS];

static void record(void *caller, const char *what)
{
    if (!get_tstate) get_tstate = (tstate_fn)dlsym(RTLD_DEFAULT, "PyThreadState_GetUnchecked");
    static int (*is_init)(void);
    if (!is_init) is_init = (int (*)(void))dlsym(RTLD_DEFAULT, "Py_IsInitialized");
    if (!get_tstate || !is_init || !is_init() || get_tstate() != NULL) return;
    long k = atomic_fetch_add(&total, 1);
    if (k < MAXCALLS) call_seq[k] = atomic_load(&sets);
    for (int i = 0; i < NSLOT; i++) {
        void *c = atomic_load(&slots[i].caller);
        if (c == NULL) {
            void *expected = NULL;
            if (atomic_compare_exchange_strong(&slots[i].caller, &expected, caller)) { slots[i].what = what; c = caller; }
            else c = expected;
        }
        if (c == caller) { atomic_fetch_add(&slots[i].n, 1); return; }
    }
}

void *PyMem_RawMalloc(size_t n)
{ if (!r_malloc) r_malloc = dlsym(RTLD_NEXT, "PyMem_RawMalloc"); record(__builtin_return_address(0), "RawMalloc"); return r_malloc(n); }
void *PyMem_RawCalloc(size_t a, size_t b)
{ if (!r_calloc) r_calloc = dlsym(RTLD_NEXT, "PyMem_RawCalloc"); record(__builtin_return_address(0), "RawCalloc"); return r_calloc(a, b); }
void *PyMem_RawRealloc(void *p, size_t n)
{ if (!r_realloc) r_realloc = dlsym(RTLD_NEXT, "PyMem_RawRealloc"); record(__builtin_return_address(0), "RawRealloc"); return r_realloc(p, n); }
void PyMem_RawFree(void *p)
{ if (!r_free) r_free = dlsym(RTLD_NEXT, "PyMem_RawFree"); record(__builtin_return_address(0), "RawFree"); r_free(p); }

__attribute__((destructor)) static void report(void)
{
    long n = atomic_load(&total), last = atomic_load(&sets), inside = 0;
    /* A call between the first and the last PyMem_SetAllocator(RAW) (tracemalloc toggling). */
    for (long k = 0; k < n && k < MAXCALLS; k++) inside += call_seq[k] > 0 && call_seq[k] < last;
    fprintf(stderr, "rawcount: %ld PyMem_Raw* calls without an attached thread state, %ld of them while "
            "tracemalloc was being toggled (%ld PyMem_SetAllocator(RAW) calls)\n", n, inside, last);
    for (int i = 0; i < NSLOT; i++) {
        void *c = atomic_load(&slots[i].caller);
        if (!c) break;
        Dl_info info = {0};
        dladdr(c, &info);
        fprintf(stderr, "rawcount:   %6ld %-10s from %s+%#lx (%s+%#lx)\n", atomic_load(&slots[i].n), slots[i].what,
                info.dli_sname ? info.dli_sname : "?", (unsigned long)((char *)c - (char *)info.dli_saddr),
                info.dli_fname ? info.dli_fname : "?", (unsigned long)((char *)c - (char *)info.dli_fbase));
    }
}
