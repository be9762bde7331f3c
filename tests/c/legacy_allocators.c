/*
 * Allocators for the adapter tests, loaded with ctypes. They are
 * deliberately NOT thread-safe, like allocators written before
 * per-interpreter GILs:
 *
 *   - bookkeeper: forwards to the allocator installed before it and keeps
 *     an unsynchronised hash table of live blocks (address -> size) plus
 *     plain counters, like the hash map PyOxidizer's Rust allocator kept to
 *     find each block's layout. Its own figures must agree with each other
 *     (table entries == live blocks, table bytes == live bytes,
 *     allocations - frees - stale == live blocks); concurrent calls break
 *     that. An atomic "inside" counter (instrumentation, not part of the
 *     allocator) counts calls that overlapped another one.
 *   - aware: an interpreter-aware allocator (interheap_aware_allocator)
 *     that forwards too and records, per interpreter, its calls and the
 *     context it was given.
 *
 * Only run-time-installable allocators live here: they wrap, so they are
 * legal after Py_Initialize (DESIGN.md fact 2).
 */
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "interheap.h"

#define TABLE_BITS 21
#define TABLE_SIZE ((size_t)1 << TABLE_BITS)
#define TABLE_MASK (TABLE_SIZE - 1)

typedef struct {
    uintptr_t key;
    size_t size;
} entry;

typedef struct {
    PyMemAllocatorEx under; /* what it forwards to */
    PyMemAllocatorEx self;  /* this allocator (ctx = the bookkeeper) */
    entry *table;
    /* the allocator's own bookkeeping: plain, unsynchronised */
    long live_blocks, allocs, frees, unknown_frees, stale, full;
    long long live_bytes;
    /* instrumentation: atomic */
    long inside, overlaps, calls;
} bookkeeper;

static bookkeeper keepers[3];

static size_t home(uintptr_t p) {
    return (size_t)(((uint64_t)(p >> 4) * 0x9E3779B97F4A7C15ull) >> (64 - TABLE_BITS));
}

/* Test knob: every `pause_every`-th insertion sleeps for a moment in the
 * middle of updating the live-block count, which widens the allocator's race
 * window (and, when wrapped, holds the lock wrapper's lock), so that other
 * threads arrive mid-call even when a busy machine runs the test threads one
 * at a time. 0 = never. */
static long pause_every, pause_tick;

void bk_set_pause_every(long n) { pause_every = n; }

static void maybe_pause(void) {
    if (pause_every > 0 && __atomic_fetch_add(&pause_tick, 1, __ATOMIC_RELAXED) % pause_every == 0) {
        struct timespec pause = {0, 200 * 1000};
        nanosleep(&pause, NULL);
    }
}

static void record(bookkeeper *bk, void *ptr, size_t size) {
    uintptr_t p = (uintptr_t)ptr;
    size_t i = home(p);
    for (size_t n = 0; n < TABLE_SIZE; n++, i = (i + 1) & TABLE_MASK) {
        entry *e = &bk->table[i];
        if (e->key == p) {
            /* A block we never saw freed (its interpreter's memory was
               released wholesale): forget it. */
            bk->stale++;
            bk->live_blocks--;
            bk->live_bytes -= (long long)e->size;
            e->size = size;
            goto counted;
        }
        if (e->key == 0) {
            e->key = p;
            e->size = size;
            goto counted;
        }
    }
    bk->full++;
    return;
counted:
    bk->allocs++;
    {
        /* An unsynchronised read-modify-write, as the allocator always had;
           the knob can stretch it. */
        long blocks = bk->live_blocks;
        maybe_pause();
        bk->live_blocks = blocks + 1;
    }
    bk->live_bytes += (long long)size;
}

/* Removes ptr (backward-shift deletion); returns 1 and its size if found. */
static int forget(bookkeeper *bk, void *ptr, size_t *size) {
    uintptr_t p = (uintptr_t)ptr;
    size_t i = home(p), n;
    for (n = 0; n < TABLE_SIZE; n++, i = (i + 1) & TABLE_MASK) {
        if (bk->table[i].key == p)
            break;
        if (bk->table[i].key == 0)
            return 0;
    }
    if (n == TABLE_SIZE)
        return 0;
    *size = bk->table[i].size;
    size_t j = i;
    for (n = 0; n < TABLE_SIZE; n++) {
        j = (j + 1) & TABLE_MASK;
        if (bk->table[j].key == 0)
            break;
        size_t k = home(bk->table[j].key);
        /* Entry j may move to the hole at i if its home is not in (i, j]. */
        if ((j > i && (k <= i || k > j)) || (j < i && (k <= i && k > j))) {
            bk->table[i] = bk->table[j];
            i = j;
        }
    }
    bk->table[i].key = 0;
    bk->table[i].size = 0;
    bk->frees++;
    bk->live_blocks--;
    bk->live_bytes -= (long long)*size;
    return 1;
}

static void enter(bookkeeper *bk) {
    __atomic_fetch_add(&bk->calls, 1, __ATOMIC_RELAXED);
    if (__atomic_fetch_add(&bk->inside, 1, __ATOMIC_SEQ_CST) != 0)
        __atomic_fetch_add(&bk->overlaps, 1, __ATOMIC_RELAXED);
}

static void leave(bookkeeper *bk) { __atomic_fetch_sub(&bk->inside, 1, __ATOMIC_SEQ_CST); }

static void *bk_malloc(void *ctx, size_t size) {
    bookkeeper *bk = ctx;
    enter(bk);
    void *p = bk->under.malloc(bk->under.ctx, size);
    if (p)
        record(bk, p, size);
    leave(bk);
    return p;
}

static void *bk_calloc(void *ctx, size_t nelem, size_t elsize) {
    bookkeeper *bk = ctx;
    if (elsize && nelem > SIZE_MAX / elsize)
        return NULL;
    enter(bk);
    void *p = bk->under.calloc(bk->under.ctx, nelem, elsize);
    if (p)
        record(bk, p, nelem * elsize);
    leave(bk);
    return p;
}

static void *bk_realloc(void *ctx, void *ptr, size_t size) {
    bookkeeper *bk = ctx;
    enter(bk);
    size_t old = 0;
    int known = 0;
    if (ptr) {
        known = forget(bk, ptr, &old);
        if (!known)
            bk->unknown_frees++;
    }
    void *p = bk->under.realloc(bk->under.ctx, ptr, size);
    if (p)
        record(bk, p, size);
    else if (known)
        record(bk, ptr, old); /* failed: the old block stays */
    leave(bk);
    return p;
}

static void bk_free(void *ctx, void *ptr) {
    bookkeeper *bk = ctx;
    enter(bk);
    if (ptr) {
        size_t size;
        if (!forget(bk, ptr, &size))
            bk->unknown_frees++;
    }
    bk->under.free(bk->under.ctx, ptr);
    leave(bk);
}

/* Prepares the bookkeeper of a domain (capturing the current allocator) and
   returns the PyMemAllocatorEx to install. NULL if out of memory. */
PyMemAllocatorEx *bk_setup(int domain) {
    bookkeeper *bk = &keepers[domain];
    if (!bk->table) {
        bk->table = calloc(TABLE_SIZE, sizeof(entry));
        if (!bk->table)
            return NULL;
    }
    PyMem_GetAllocator((PyMemAllocatorDomain)domain, &bk->under);
    bk->self.ctx = bk;
    bk->self.malloc = bk_malloc;
    bk->self.calloc = bk_calloc;
    bk->self.realloc = bk_realloc;
    bk->self.free = bk_free;
    return &bk->self;
}

/* Installs it bare, with PyMem_SetAllocator: no adapter. */
void bk_install_bare(int domain) { PyMem_SetAllocator((PyMemAllocatorDomain)domain, &keepers[domain].self); }

/* Puts back the allocator it wraps. */
void bk_restore(int domain) { PyMem_SetAllocator((PyMemAllocatorDomain)domain, &keepers[domain].under); }

/* Its figures: table entries, table bytes, live blocks, live bytes,
   allocations, frees, stale, unknown frees, table full, overlaps, calls. */
void bk_report(int domain, long long out[11]) {
    bookkeeper *bk = &keepers[domain];
    long long entries = 0, bytes = 0;
    for (size_t i = 0; i < TABLE_SIZE; i++) {
        if (bk->table[i].key) {
            entries++;
            bytes += (long long)bk->table[i].size;
        }
    }
    out[0] = entries;
    out[1] = bytes;
    out[2] = bk->live_blocks;
    out[3] = bk->live_bytes;
    out[4] = bk->allocs;
    out[5] = bk->frees;
    out[6] = bk->stale;
    out[7] = bk->unknown_frees;
    out[8] = bk->full;
    out[9] = __atomic_load_n(&bk->overlaps, __ATOMIC_RELAXED);
    out[10] = __atomic_load_n(&bk->calls, __ATOMIC_RELAXED);
}

/* Raw allocations in a loop; called through ctypes.CDLL, so without the GIL. */
long bk_hammer_raw(long rounds) {
    void *slots[64] = {0};
    unsigned x = 12345;
    for (long r = 0; r < rounds; r++) {
        x = x * 1103515245u + 12345u;
        unsigned k = (x >> 8) & 63;
        size_t size = 16 + ((x >> 16) & 511);
        if (slots[k]) {
            if (x & 1) {
                PyMem_RawFree(slots[k]);
                slots[k] = NULL;
            } else {
                void *p = PyMem_RawRealloc(slots[k], size);
                if (p)
                    slots[k] = p;
            }
        } else {
            slots[k] = PyMem_RawMalloc(size);
        }
    }
    for (int k = 0; k < 64; k++)
        PyMem_RawFree(slots[k]);
    return rounds;
}

/* ---- an allocator that calls back into its own domain --------------------
   Each malloc makes a note of its own through the raw domain's current
   allocator (PyMem_RawMalloc, PyMem_RawFree): installed on the raw domain,
   that call comes back into this allocator, nested in the outer one, which a
   guard of its own then forwards straight on. Installed behind the lock
   wrapper, the nested call must pass the lock its own thread holds. */

typedef struct {
    PyMemAllocatorEx under, self;
    long nested;
} reentrant;

static reentrant reentrants[3];
static __thread int re_inside;

static void *re_malloc(void *ctx, size_t size) {
    reentrant *re = ctx;
    if (re_inside) {
        __atomic_fetch_add(&re->nested, 1, __ATOMIC_RELAXED);
    } else {
        re_inside = 1;
        PyMem_RawFree(PyMem_RawMalloc(16));
        re_inside = 0;
    }
    return re->under.malloc(re->under.ctx, size);
}

static void *re_calloc(void *ctx, size_t nelem, size_t elsize) {
    reentrant *re = ctx;
    return re->under.calloc(re->under.ctx, nelem, elsize);
}

static void *re_realloc(void *ctx, void *ptr, size_t size) {
    reentrant *re = ctx;
    return re->under.realloc(re->under.ctx, ptr, size);
}

static void re_free(void *ctx, void *ptr) {
    reentrant *re = ctx;
    re->under.free(re->under.ctx, ptr);
}

PyMemAllocatorEx *re_setup(int domain) {
    reentrant *re = &reentrants[domain];
    PyMem_GetAllocator((PyMemAllocatorDomain)domain, &re->under);
    re->self = (PyMemAllocatorEx){re, re_malloc, re_calloc, re_realloc, re_free};
    return &re->self;
}

/* Calls that arrived nested in one of this allocator's own. */
long re_nested(int domain) { return __atomic_load_n(&reentrants[domain].nested, __ATOMIC_RELAXED); }

/* ---- the interpreter-aware allocator ---------------------------------- */

#define MAX_INTERP 64

typedef struct {
    long calls;
    int own_gil, own_obmalloc, seen;
} interp_seen;

static struct {
    PyMemAllocatorEx under;
    interheap_aware_allocator self;
    int domain;
    long calls_none, wrong_domain, inconsistent;
    interp_seen interp[MAX_INTERP];
} aware;

static void aw_record(const interheap_context *cx) {
    if (cx->domain != aware.domain)
        aware.wrong_domain++;
    if (cx->interpreter_id < 0) {
        aware.calls_none++;
        return;
    }
    if (cx->interpreter_id >= MAX_INTERP)
        return;
    interp_seen *s = &aware.interp[cx->interpreter_id];
    if (s->seen && (s->own_gil != cx->own_gil || s->own_obmalloc != cx->own_obmalloc))
        aware.inconsistent++;
    s->seen = 1;
    s->own_gil = cx->own_gil;
    s->own_obmalloc = cx->own_obmalloc;
    s->calls++;
}

static void *aw_malloc(void *ctx, const interheap_context *cx, size_t size) {
    (void)ctx;
    aw_record(cx);
    return aware.under.malloc(aware.under.ctx, size);
}

static void *aw_calloc(void *ctx, const interheap_context *cx, size_t nelem, size_t elsize) {
    (void)ctx;
    aw_record(cx);
    return aware.under.calloc(aware.under.ctx, nelem, elsize);
}

static void *aw_realloc(void *ctx, const interheap_context *cx, void *ptr, size_t size) {
    (void)ctx;
    aw_record(cx);
    return aware.under.realloc(aware.under.ctx, ptr, size);
}

static void aw_free(void *ctx, const interheap_context *cx, void *ptr) {
    (void)ctx;
    aw_record(cx);
    aware.under.free(aware.under.ctx, ptr);
}

interheap_aware_allocator *aw_setup(int domain) {
    memset(&aware, 0, sizeof aware);
    aware.domain = domain;
    PyMem_GetAllocator((PyMemAllocatorDomain)domain, &aware.under);
    aware.self.ctx = NULL;
    aware.self.malloc = aw_malloc;
    aware.self.calloc = aw_calloc;
    aware.self.realloc = aw_realloc;
    aware.self.free = aw_free;
    return &aware.self;
}

/* calls without interpreter, wrong domain, inconsistent contexts, then per
   interpreter ID < 64: calls, own_gil, own_obmalloc, seen. */
void aw_report(long long out[3 + 4 * MAX_INTERP]) {
    out[0] = aware.calls_none;
    out[1] = aware.wrong_domain;
    out[2] = aware.inconsistent;
    for (int i = 0; i < MAX_INTERP; i++) {
        out[3 + 4 * i] = aware.interp[i].calls;
        out[4 + 4 * i] = aware.interp[i].own_gil;
        out[5 + 4 * i] = aware.interp[i].own_obmalloc;
        out[6 + 4 * i] = aware.interp[i].seen;
    }
}

/* ---- for the benchmark: a plain forwarding allocator and a C loop ------- */

typedef struct {
    PyMemAllocatorEx under, self;
    long calls; /* plain: not thread-safe */
} forwarder;

static forwarder forwarders[3];

static void *fw_malloc(void *ctx, size_t n) {
    forwarder *f = ctx;
    f->calls++;
    return f->under.malloc(f->under.ctx, n);
}
static void *fw_calloc(void *ctx, size_t n, size_t e) {
    forwarder *f = ctx;
    f->calls++;
    return f->under.calloc(f->under.ctx, n, e);
}
static void *fw_realloc(void *ctx, void *p, size_t n) {
    forwarder *f = ctx;
    f->calls++;
    return f->under.realloc(f->under.ctx, p, n);
}
static void fw_free(void *ctx, void *p) {
    forwarder *f = ctx;
    f->calls++;
    f->under.free(f->under.ctx, p);
}

PyMemAllocatorEx *fw_setup(int domain) {
    forwarder *f = &forwarders[domain];
    PyMem_GetAllocator((PyMemAllocatorDomain)domain, &f->under);
    f->self.ctx = f;
    f->self.malloc = fw_malloc;
    f->self.calloc = fw_calloc;
    f->self.realloc = fw_realloc;
    f->self.free = fw_free;
    return &f->self;
}

void fw_install_bare(int domain) { PyMem_SetAllocator((PyMemAllocatorDomain)domain, &forwarders[domain].self); }

long fw_calls(int domain) { return forwarders[domain].calls; }

/* n PyObject_Malloc(32) + PyObject_Free pairs (call with the GIL held). */
__attribute__((noinline)) long bench_object_pairs(long n) {
    for (long i = 0; i < n; i++) {
        void *p = PyObject_Malloc(32);
        PyObject_Free(p);
    }
    return n;
}
