/*
 * The per-interpreter dispatcher under stress: one free-list instance per
 * interpreter (not thread-safe), installed before Py_Initialize for raw
 * (and mem and object on default builds), four isolated interpreters in
 * parallel threads, blocks freed across interpreters in both directions,
 * and instances released after their interpreters end.
 *
 * Usage: dispatcher_stress [all|raw]
 *
 * Checks (exit status 0 when all pass, one line each):
 *   - no two calls ever overlap inside one instance;
 *   - per instance and domain: allocations - frees == live blocks, and the
 *     dispatcher's live blocks equal the instance's own count of blocks out;
 *   - blocks the main interpreter allocated and subinterpreters freed went
 *     back to main's instance (cross frees), and the reverse;
 *   - an ended interpreter's instance is released exactly when it holds no
 *     block, and destroy() ran once per released instance.
 */
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "interheap.h"

#define CLASSES 32
#define CHUNK (128 * 1024)
#define MAX_INSTANCES 64

typedef struct chunk {
    struct chunk *next;
    char pad[8];
} chunk;

typedef struct fblock {
    struct fblock *next;
} fblock;

typedef struct {
    int64_t interp;
    fblock *free_list[CLASSES];
    chunk *chunks;
    char *cur, *end;
    long blocks_out;
    long inside, overlaps; /* instrumentation */
} instance;

static instance *instances[MAX_INSTANCES]; /* by interpreter ID + 1 */
static long created, destroyed;

static void *i_create(void *ctx, const interheap_context *cx) {
    (void)ctx;
    instance *in = calloc(1, sizeof *in);
    if (!in)
        return NULL;
    in->interp = cx->interpreter_id;
    if (cx->interpreter_id + 1 < MAX_INSTANCES)
        instances[cx->interpreter_id + 1] = in;
    __atomic_fetch_add(&created, 1, __ATOMIC_RELAXED);
    return in;
}

static void i_destroy(void *ctx, void *inst) {
    (void)ctx;
    instance *in = inst;
    while (in->chunks) {
        chunk *next = in->chunks->next;
        free(in->chunks);
        in->chunks = next;
    }
    if (in->interp + 1 < MAX_INSTANCES)
        instances[in->interp + 1] = NULL;
    free(in);
    __atomic_fetch_add(&destroyed, 1, __ATOMIC_RELAXED);
}

static void enter(instance *in) {
    if (__atomic_fetch_add(&in->inside, 1, __ATOMIC_SEQ_CST) != 0)
        __atomic_fetch_add(&in->overlaps, 1, __ATOMIC_RELAXED);
}

static void leave(instance *in) { __atomic_fetch_sub(&in->inside, 1, __ATOMIC_SEQ_CST); }

static void *i_malloc(void *ctx, void *inst, size_t size) {
    (void)ctx;
    instance *in = inst;
    void *p = NULL;
    enter(in);
    if (size <= CLASSES * 16) {
        int c = (int)((size + 15) / 16) - 1;
        if (in->free_list[c]) {
            p = in->free_list[c];
            in->free_list[c] = in->free_list[c]->next;
        } else {
            size_t need = (size_t)(c + 1) * 16;
            if (!in->cur || in->cur + need > in->end) {
                chunk *ch = malloc(CHUNK);
                if (ch) {
                    ch->next = in->chunks;
                    in->chunks = ch;
                    in->cur = (char *)(ch + 1);
                    in->end = (char *)ch + CHUNK;
                }
            }
            if (in->cur && in->cur + need <= in->end) {
                p = in->cur;
                in->cur += need;
            }
        }
    } else {
        p = aligned_alloc(16, (size + 15) & ~(size_t)15);
    }
    if (p)
        in->blocks_out++;
    leave(in);
    return p;
}

static void i_free(void *ctx, void *inst, void *ptr, size_t size) {
    (void)ctx;
    instance *in = inst;
    enter(in);
    if (size <= CLASSES * 16) {
        int c = (int)((size + 15) / 16) - 1;
        ((fblock *)ptr)->next = in->free_list[c];
        in->free_list[c] = ptr;
    } else {
        free(ptr);
    }
    in->blocks_out--;
    leave(in);
}

/* ---- the program ---------------------------------------------------------- */

#define WORKERS 4
#define SHARE 500

static interheap_dispatcher *dispatcher;
static void *from_main[WORKERS][SHARE];
static void *from_sub[WORKERS][SHARE];
static int64_t sub_ids[WORKERS];
static int failures;

static const char *WORKLOAD =
    "keep = []\n"
    "for i in range(30000):\n"
    "    keep.append([str(i)] * (i % 5))\n"
    "    keep.append({'k': i, 'v': 'x' * (i % 40)})\n"
    "    if len(keep) > 2000:\n"
    "        del keep[:1000]\n"
    "del keep\n";

static void *worker(void *arg) {
    int w = (int)(intptr_t)arg;
    PyGILState_STATE gil = PyGILState_Ensure();
    PyThreadState *main_tstate = PyThreadState_Get();
    PyInterpreterConfig config = {
        .use_main_obmalloc = 0, .allow_fork = 0, .allow_exec = 0, .allow_threads = 1,
        .allow_daemon_threads = 0, .check_multi_interp_extensions = 1, .gil = PyInterpreterConfig_OWN_GIL,
    };
    PyThreadState *sub = NULL;
    PyStatus status = Py_NewInterpreterFromConfig(&sub, &config);
    if (PyStatus_Exception(status)) {
        __atomic_fetch_add(&failures, 1, __ATOMIC_RELAXED);
        PyThreadState_Swap(main_tstate);
        PyGILState_Release(gil);
        return NULL;
    }
    sub_ids[w] = PyInterpreterState_GetID(PyThreadState_GetInterpreter(sub));
    if (PyRun_SimpleString(WORKLOAD) != 0)
        __atomic_fetch_add(&failures, 1, __ATOMIC_RELAXED);
    for (int i = 0; i < SHARE; i++) {
        PyMem_RawFree(from_main[w][i]);              /* main's blocks, freed here */
        from_sub[w][i] = PyMem_RawMalloc(24 + i % 100); /* ours, freed by main later */
    }
    Py_EndInterpreter(sub);
    PyThreadState_Swap(main_tstate);
    PyGILState_Release(gil);
    return NULL;
}

static int check(const char *what, int ok) {
    printf("%-70s %s\n", what, ok ? "ok" : "FAILED");
    return ok;
}

static interheap_instance_stats all[MAX_INSTANCES];

static int figures_exact(void) {
    size_t n = interheap_dispatcher_instances(dispatcher, all, MAX_INSTANCES);
    int ok = n > 0 && n <= MAX_INSTANCES;
    for (size_t i = 0; ok && i < n; i++) {
        uint64_t live = 0;
        for (int d = 0; d < 3; d++) {
            interheap_domain_figures *f = &all[i].domains[d];
            live += f->live_blocks;
            if (f->allocations - f->frees != f->live_blocks)
                ok = 0;
        }
        instance *in = all[i].interpreter_id + 1 < MAX_INSTANCES ? instances[all[i].interpreter_id + 1] : NULL;
        if (all[i].released) {
            if (in || live != 0)
                ok = 0;
        } else if (in && (long)live != in->blocks_out) {
            printf("  interpreter %lld: dispatcher says %llu live blocks, instance %ld\n",
                   (long long)all[i].interpreter_id, (unsigned long long)live, in->blocks_out);
            ok = 0;
        }
        if (in && in->overlaps)
            ok = 0;
    }
    return ok;
}

static const interheap_domain_figures *fig(int64_t interp, int domain) {
    size_t n = interheap_dispatcher_instances(dispatcher, all, MAX_INSTANCES);
    for (size_t i = 0; i < n; i++)
        if (all[i].interpreter_id == interp)
            return &all[i].domains[domain];
    return NULL;
}

int main(int argc, char **argv) {
    /* "raw": the raw domain only; "all" (default): raw, and mem and object
       where the build allows. With raw only and no pymalloc (free-threaded,
       or PYTHONMALLOC=malloc), an ended interpreter leaves no block behind,
       so its instance is released (pymalloc itself leaks three raw blocks
       per interpreter: its arena vector and radix-tree nodes). */
    int raw_only = argc > 1 && strcmp(argv[1], "raw") == 0;
    int ok = 1;
    PyPreConfig preconfig;
    PyPreConfig_InitPythonConfig(&preconfig);
    PyStatus status = Py_PreInitialize(&preconfig);
    if (PyStatus_Exception(status))
        Py_ExitStatusException(status);

    interheap_instance_allocator ia = {NULL, i_create, i_destroy, i_malloc, NULL, i_free};
    dispatcher = interheap_dispatcher_new(&ia);
    if (!dispatcher) {
        fprintf(stderr, "interheap_dispatcher_new: %s\n", interheap_last_error());
        return 1;
    }
    int domains = 0;
    for (int d = 0; d < (raw_only ? 1 : 3); d++) {
        int rc = interheap_dispatcher_install(dispatcher, (PyMemAllocatorDomain)d, NULL, NULL);
        if (rc == INTERHEAP_OK)
            domains++;
        else if (rc != INTERHEAP_ERR_FREE_THREADED) {
            fprintf(stderr, "install: %s\n", interheap_last_error());
            return 1;
        }
    }
    printf("dispatcher installed for %d domain(s)\n", domains);

    PyConfig config;
    PyConfig_InitPythonConfig(&config);
    config.site_import = 0;
    status = Py_InitializeFromConfig(&config);
    PyConfig_Clear(&config);
    if (PyStatus_Exception(status))
        Py_ExitStatusException(status);
    ok &= check("main interpreter runs", PyRun_SimpleString(WORKLOAD) == 0);

    for (int w = 0; w < WORKERS; w++)
        for (int i = 0; i < SHARE; i++)
            from_main[w][i] = PyMem_RawMalloc(40 + i % 200);
    const interheap_domain_figures *m = fig(0, 0);
    uint64_t main_cross_before = m ? m->cross_frees : 0;

    pthread_t threads[WORKERS];
    Py_BEGIN_ALLOW_THREADS
    for (int w = 0; w < WORKERS; w++)
        pthread_create(&threads[w], NULL, worker, (void *)(intptr_t)w);
    for (int w = 0; w < WORKERS; w++)
        pthread_join(threads[w], NULL);
    Py_END_ALLOW_THREADS
    ok &= check("4 isolated interpreters ran in parallel", failures == 0);
    ok &= check("figures exact per instance after the parallel run", figures_exact());
    m = fig(0, 0);
    ok &= check("main's blocks freed by subinterpreters went back to main's instance",
                m && m->cross_frees - main_cross_before >= WORKERS * SHARE);

    /* The interpreters have ended; each instance still holds the blocks it
       handed to main, so none may be released yet. */
    int held = 1;
    for (int w = 0; w < WORKERS; w++) {
        interheap_instance_stats s;
        if (interheap_dispatcher_end_interpreter(dispatcher, sub_ids[w], &s) != INTERHEAP_OK || s.released ||
            s.domains[0].live_blocks < SHARE)
            held = 0;
        printf("  interpreter %lld ended: holds %llu raw, %llu mem, %llu object blocks\n", (long long)sub_ids[w],
               (unsigned long long)s.domains[0].live_blocks, (unsigned long long)s.domains[1].live_blocks,
               (unsigned long long)s.domains[2].live_blocks);
    }
    ok &= check("ended interpreters' instances kept while they hold blocks", held);

    uint64_t cross_before[WORKERS];
    for (int w = 0; w < WORKERS; w++)
        cross_before[w] = fig(sub_ids[w], 0)->cross_frees;
    for (int w = 0; w < WORKERS; w++)
        for (int i = 0; i < SHARE; i++)
            PyMem_RawFree(from_sub[w][i]); /* main frees the subinterpreters' blocks */
    int back = 1, released_ok = 1, released = 0;
    size_t n = interheap_dispatcher_instances(dispatcher, all, MAX_INSTANCES);
    for (int w = 0; w < WORKERS; w++) {
        const interheap_domain_figures *f = fig(sub_ids[w], 0);
        if (!f || f->cross_frees - cross_before[w] != SHARE)
            back = 0;
    }
    for (size_t i = 0; i < n; i++) {
        uint64_t live = all[i].domains[0].live_blocks + all[i].domains[1].live_blocks + all[i].domains[2].live_blocks;
        if (all[i].ended && all[i].released != (live == 0))
            released_ok = 0;
        released += all[i].released;
    }
    ok &= check("subinterpreters' blocks freed by main went back to their instances", back);
    ok &= check("an ended instance is released exactly when it holds nothing", released_ok);
    ok &= check("destroy() ran once per released instance",
                __atomic_load_n(&destroyed, __ATOMIC_RELAXED) == released);
    ok &= check("figures exact per instance after the cross frees", figures_exact());
    printf("  instances created: %ld, released: %d\n", created, released);

    if (Py_FinalizeEx() < 0)
        ok = 0;
    ok &= check("figures exact per instance after Py_FinalizeEx", figures_exact());
    n = interheap_dispatcher_instances(dispatcher, all, MAX_INSTANCES);
    for (size_t i = 0; i < n; i++)
        printf("  after finalization: interpreter %lld holds %llu raw, %llu mem, %llu object blocks%s\n",
               (long long)all[i].interpreter_id, (unsigned long long)all[i].domains[0].live_blocks,
               (unsigned long long)all[i].domains[1].live_blocks, (unsigned long long)all[i].domains[2].live_blocks,
               all[i].released ? " (released)" : "");
    printf("%s\n", ok ? "RESULT ok" : "RESULT FAILED");
    return ok ? 0 : 1;
}
