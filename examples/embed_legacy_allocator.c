/*
 * Keep a legacy (not thread-safe) CPython allocator and run isolated
 * subinterpreters in parallel, through interheap's lock wrapper.
 *
 * The allocator below is a classic free list: size classes of 16 bytes up
 * to 512, carved from chunks, with plain counters. It has no lock, because
 * until Python 3.11 the GIL serialised every call into the mem and object
 * domains. With an own-GIL subinterpreter (3.12+) or a free-threaded build
 * (3.14t) that is no longer true, and two threads popping the same free
 * list corrupt it. interheap_install() wraps it so that its calls never
 * overlap, taking no lock at all while the process has only the main GIL.
 *
 * Build (see tests/test_c_api.py, which builds and runs it):
 *   cc -O2 -pthread embed_legacy_allocator.c -I<python include> -I../include \
 *      -L<libinterheap dir> -linterheap -L<python libdir> -lpython3.13 -o embed
 *
 * Exit status 0 when every check passed.
 */
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "interheap.h"

/* ---- the legacy allocator (one instance per domain) -------------------- */

#define CLASSES 32              /* 16, 32, ..., 512 bytes */
#define SMALL_MAX (CLASSES * 16)
#define CHUNK (256 * 1024)
#define MAGIC 0x6c65676163794672ull

typedef struct block {
    struct block *next;
} block;

typedef struct { /* 16 bytes before every block, so blocks stay 16-aligned */
    uint64_t size;  /* what the caller asked for */
    uint64_t magic; /* ours, or a block from before we were installed */
} header;

typedef struct {
    const char *name;
    block *free_list[CLASSES];
    char *chunk, *chunk_end;
    uint64_t carved[CLASSES], on_list[CLASSES], large_live;
    uint64_t live_blocks, live_bytes, allocations, frees, foreign;
    long inside, overlaps; /* instrumentation, atomic: calls that overlapped */
} freelist;

static int size_class(size_t n) { return (int)((n + 15) / 16) - 1; }

static void enter(freelist *f) {
    if (__atomic_fetch_add(&f->inside, 1, __ATOMIC_SEQ_CST) != 0)
        __atomic_fetch_add(&f->overlaps, 1, __ATOMIC_RELAXED);
}

static void leave(freelist *f) { __atomic_fetch_sub(&f->inside, 1, __ATOMIC_SEQ_CST); }

static void *fl_alloc(freelist *f, size_t size) {
    size_t n = size ? size : 1; /* malloc(0) returns a unique block */
    header *h;
    if (n <= SMALL_MAX) {
        int c = size_class(n);
        if (f->free_list[c]) {
            h = (header *)f->free_list[c];
            f->free_list[c] = f->free_list[c]->next;
            f->on_list[c]--;
        } else {
            size_t need = sizeof(header) + (size_t)(c + 1) * 16;
            if (!f->chunk || f->chunk + need > f->chunk_end) {
                f->chunk = malloc(CHUNK); /* chunks are never returned */
                if (!f->chunk)
                    return NULL;
                f->chunk_end = f->chunk + CHUNK;
            }
            h = (header *)f->chunk;
            f->chunk += need;
            f->carved[c]++;
        }
    } else {
        if (n > SIZE_MAX - sizeof(header) || !(h = malloc(sizeof(header) + n)))
            return NULL;
        f->large_live++;
    }
    h->size = size;
    h->magic = MAGIC;
    f->live_blocks++;
    f->live_bytes += size;
    f->allocations++;
    return h + 1;
}

static void fl_release(freelist *f, void *ptr) {
    header *h = (header *)ptr - 1;
    uint64_t size = h->size, n = size ? size : 1;
    f->live_blocks--;
    f->live_bytes -= size;
    f->frees++;
    h->magic = 0;
    if (n <= SMALL_MAX) {
        int c = size_class(n);
        ((block *)h)->next = f->free_list[c];
        f->free_list[c] = (block *)h;
        f->on_list[c]++;
    } else {
        f->large_live--;
        free(h);
    }
}

static int ours(void *ptr) { return ((header *)ptr - 1)->magic == MAGIC; }

static void *fl_malloc(void *ctx, size_t size) {
    freelist *f = ctx;
    enter(f);
    void *p = fl_alloc(f, size);
    leave(f);
    return p;
}

static void *fl_calloc(void *ctx, size_t nelem, size_t elsize) {
    freelist *f = ctx;
    if (elsize && nelem > SIZE_MAX / elsize)
        return NULL;
    enter(f);
    void *p = fl_alloc(f, nelem * elsize);
    leave(f);
    if (p)
        memset(p, 0, nelem * elsize);
    return p;
}

static void fl_free(void *ctx, void *ptr) {
    freelist *f = ctx;
    if (!ptr)
        return;
    enter(f);
    if (ours(ptr)) {
        fl_release(f, ptr);
    } else { /* allocated by the C allocator before we were installed */
        f->foreign++;
        free(ptr);
    }
    leave(f);
}

static void *fl_realloc(void *ctx, void *ptr, size_t size) {
    freelist *f = ctx;
    if (!ptr)
        return fl_malloc(ctx, size);
    enter(f);
    void *p;
    if (!ours(ptr)) {
        f->foreign++;
        p = realloc(ptr, size ? size : 1);
    } else {
        header *h = (header *)ptr - 1;
        size_t old = h->size, o = old ? old : 1, n = size ? size : 1;
        if (o <= SMALL_MAX && n <= SMALL_MAX && size_class(o) == size_class(n)) {
            h->size = size; /* fits in place */
            f->live_bytes = f->live_bytes - old + size;
            p = ptr;
        } else if ((p = fl_alloc(f, size)) != NULL) {
            memcpy(p, ptr, old < size ? old : size);
            fl_release(f, ptr);
        }
    }
    leave(f);
    return p;
}

/* The allocator's own consistency: blocks carved and not on a free list,
   plus large blocks, must be exactly the live blocks. */
static int fl_consistent(const freelist *f) {
    uint64_t out = f->large_live;
    for (int c = 0; c < CLASSES; c++)
        out += f->carved[c] - f->on_list[c];
    return out == f->live_blocks && f->allocations - f->frees == f->live_blocks;
}

static freelist lists[3] = {{.name = "raw"}, {.name = "mem"}, {.name = "object"}};

/* ---- interheap ---------------------------------------------------------- */

static const char *DOMAINS[] = {"raw", "mem", "object"};
static const char *MODES[] = {"unlocked", "draining", "locked", "thread-safe"};
static interheap_adapter_id adapters[3];
static int installed[3];

static void show(const char *when) {
    printf("%s\n", when);
    for (int d = 0; d < 3; d++) {
        interheap_adapter_stats s;
        if (!installed[d] || interheap_adapter_stats_get(adapters[d], &s) != INTERHEAP_OK)
            continue;
        printf("  %-6s mode=%-8s calls=%llu lock_acquisitions=%llu contended=%llu", DOMAINS[d], MODES[s.mode],
               (unsigned long long)s.calls, (unsigned long long)s.lock_acquisitions,
               (unsigned long long)s.contended_acquisitions);
        if (s.has_switched)
            printf(" switched_by=%lld", (long long)s.switched_by);
        printf("\n");
    }
}

/* ---- isolated interpreters in parallel threads ---------------------------- */

#define WORKERS 4

static const char *WORKLOAD =
    "import sys\n"
    "words = {}\n"
    "for i in range(40000):\n"
    "    key = 'w%d' % (i % 5000)\n"
    "    words[key] = words.get(key, []) + [i] if i % 3 else [str(i)]\n"
    "data = [bytes(range(i % 256)) for i in range(20000)]\n"
    "assert len(words) == 5000 and len(data) == 20000, (len(words), len(data))\n";

static int failures;

static void *worker(void *arg) {
    (void)arg;
    PyGILState_STATE gil = PyGILState_Ensure(); /* a thread state of the main interpreter */
    PyThreadState *main_tstate = PyThreadState_Get();
    PyInterpreterConfig config = {
        .use_main_obmalloc = 0,
        .allow_fork = 0,
        .allow_exec = 0,
        .allow_threads = 1,
        .allow_daemon_threads = 0,
        .check_multi_interp_extensions = 1,
        .gil = PyInterpreterConfig_OWN_GIL,
    };
    PyThreadState *sub = NULL;
    PyStatus status = Py_NewInterpreterFromConfig(&sub, &config);
    if (PyStatus_Exception(status)) {
        fprintf(stderr, "Py_NewInterpreterFromConfig failed: %s\n", status.err_msg ? status.err_msg : "?");
        __atomic_fetch_add(&failures, 1, __ATOMIC_RELAXED);
        PyThreadState_Swap(main_tstate);
    } else {
        /* This thread now holds the new interpreter's own GIL. */
        if (PyRun_SimpleString(WORKLOAD) != 0)
            __atomic_fetch_add(&failures, 1, __ATOMIC_RELAXED);
        Py_EndInterpreter(sub);
        PyThreadState_Swap(main_tstate);
    }
    PyGILState_Release(gil);
    return NULL;
}

int main(int argc, char **argv) {
    (void)argc;
    (void)argv;
    int ok = 1;

    /* 1. Pre-initialize, then install the legacy allocator (it owns its
          memory, so it must come before Py_InitializeFromConfig). */
    PyPreConfig preconfig;
    PyPreConfig_InitPythonConfig(&preconfig);
    PyStatus status = Py_PreInitialize(&preconfig);
    if (PyStatus_Exception(status))
        Py_ExitStatusException(status);

    for (int d = 0; d < 3; d++) {
        PyMemAllocatorEx legacy = {&lists[d], fl_malloc, fl_calloc, fl_realloc, fl_free};
        int rc = interheap_install((PyMemAllocatorDomain)d, &legacy, INTERHEAP_OWNS_MEMORY, "free list",
                                   &adapters[d]);
        if (rc == INTERHEAP_OK) {
            installed[d] = 1;
        } else if (rc == INTERHEAP_ERR_FREE_THREADED) {
            /* Free-threaded CPython keeps mimalloc for mem and object. */
            printf("%s: not installed (%s): %s\n", DOMAINS[d], interheap_status_name(rc), interheap_last_error());
        } else {
            fprintf(stderr, "%s: %s: %s\n", DOMAINS[d], interheap_status_name(rc), interheap_last_error());
            return 1;
        }
    }

    /* 2. Initialize and run some Python in the main interpreter. */
    PyConfig config;
    PyConfig_InitPythonConfig(&config);
    config.site_import = 0;
    status = Py_InitializeFromConfig(&config);
    PyConfig_Clear(&config);
    if (PyStatus_Exception(status))
        Py_ExitStatusException(status);
    if (PyRun_SimpleString(WORKLOAD) != 0)
        ok = 0;
    show("main interpreter only:");
    for (int d = 1; d < 3; d++) {
        interheap_adapter_stats s;
        if (installed[d] && interheap_adapter_stats_get(adapters[d], &s) == INTERHEAP_OK) {
#ifndef Py_GIL_DISABLED
            /* One GIL: the wrapper took no lock for mem and object. */
            if (s.mode != INTERHEAP_MODE_UNLOCKED || s.lock_acquisitions != 0)
                ok = 0;
#endif
        }
    }

    /* 3. Isolated interpreters, each with its own GIL, in parallel. */
    pthread_t threads[WORKERS];
    Py_BEGIN_ALLOW_THREADS
    for (int i = 0; i < WORKERS; i++)
        pthread_create(&threads[i], NULL, worker, NULL);
    for (int i = 0; i < WORKERS; i++)
        pthread_join(threads[i], NULL);
    Py_END_ALLOW_THREADS
    if (failures)
        ok = 0;
    show("after 4 isolated interpreters in parallel:");
    for (int d = 0; d < 3; d++) {
        interheap_adapter_stats s;
        if (installed[d] && interheap_adapter_stats_get(adapters[d], &s) == INTERHEAP_OK &&
            (s.mode != INTERHEAP_MODE_LOCKED || s.lock_acquisitions == 0))
            ok = 0;
    }

    /* A replacement cannot be installed now that Python runs. */
    PyMemAllocatorEx late = {&lists[2], fl_malloc, fl_calloc, fl_realloc, fl_free};
    int rc = interheap_install(PYMEM_DOMAIN_OBJ, &late, INTERHEAP_OWNS_MEMORY, NULL, NULL);
    printf("installing another replacement after Py_Initialize: %s\n", interheap_status_name(rc));
    if (rc == INTERHEAP_OK)
        ok = 0;

    if (Py_FinalizeEx() < 0)
        ok = 0;

    /* 4. The free lists' own checks. */
    for (int d = 0; d < 3; d++) {
        if (!installed[d])
            continue;
        freelist *f = &lists[d];
        int consistent = fl_consistent(f);
        printf("free list %-6s allocations=%llu frees=%llu live_blocks=%llu overlapping_calls=%ld "
               "foreign_blocks=%llu consistent=%s\n",
               f->name, (unsigned long long)f->allocations, (unsigned long long)f->frees,
               (unsigned long long)f->live_blocks, f->overlaps, (unsigned long long)f->foreign,
               consistent ? "yes" : "NO");
        if (!consistent || f->overlaps != 0 || f->allocations == 0)
            ok = 0;
    }
    printf("%s\n", ok ? "RESULT ok" : "RESULT FAILED");
    return ok ? 0 : 1;
}
