/*
 * Minimal reproducer, no interheap involved: CPython's own thread-state
 * allocation races with tracemalloc.start()/stop().
 *
 * - N "churn" threads loop: PyGILState_Ensure(); PyGILState_Release();
 *   On a thread without a thread state, PyGILState_Ensure() allocates one
 *   (pystate.c alloc_threadstate -> PyMem_RawCalloc) BEFORE it takes the
 *   GIL, and PyGILState_Release() frees it (_PyThreadState_DeleteCurrent ->
 *   free_threadstate -> PyMem_RawFree) AFTER it released the GIL.
 * - One toggler thread holds the GIL and calls tracemalloc.start() and
 *   tracemalloc.stop() in a loop; both call PyMem_SetAllocator(RAW), which
 *   copies the 5-word PyMemAllocatorEx {ctx, malloc, calloc, realloc, free}
 *   with plain stores while the churn threads read it without any lock.
 *
 * A reader that sees the default allocator's ctx (NULL) together with one of
 * tracemalloc's hooks calls tracemalloc_free(NULL, p) / tracemalloc_alloc(...,
 * ctx=NULL, ...), which dereferences NULL: SIGSEGV.
 *
 * Usage: repro [seconds=20] [threads=3] [toggler_sleep_us=0] [gilstate|raw]
 *   gilstate (default): threads loop PyGILState_Ensure/Release (CPython's own
 *                       GIL-less PyMem_RawCalloc/PyMem_RawFree of the tstate)
 *   raw:                threads with no thread state loop malloc + PyMem_RawFree
 * A 5th argument "hook" replaces tracemalloc.start()/stop() with a tight loop
 * of PyMem_SetAllocator(RAW, tracemalloc-like hook) / PyMem_SetAllocator(RAW,
 * original) under the GIL (same race, ~1000x more allocator writes).
 * Exit 0 if no crash within the time limit.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <string.h>

static atomic_int done;
static atomic_long churns, toggles;
static int toggler_sleep_us;

static void *churn(void *arg)
{
    (void)arg;
    while (!atomic_load(&done)) {
        PyGILState_STATE s = PyGILState_Ensure(); /* PyMem_RawCalloc without the GIL */
        PyGILState_Release(s);                    /* PyMem_RawFree without the GIL */
        atomic_fetch_add(&churns, 1);
    }
    return NULL;
}

/* Mode "raw": PyMem_RawFree on a thread with no thread state, which the C API
 * documents as allowed ("the GIL does not need to be held"). */
static atomic_long rawfrees;
static void *rawfree_loop(void *arg)
{
    (void)arg;
    long n = 0;
    while (!atomic_load(&done)) {
        void *p = malloc(16);
        PyMem_RawFree(p);
        if (++n % 4096 == 0) atomic_fetch_add(&rawfrees, 4096);
    }
    return NULL;
}

/* Toggler mode "hook": instead of tracemalloc, install and remove a PEP 445
 * raw hook shaped like tracemalloc's (ctx points at the wrapped allocator and
 * is dereferenced) with PyMem_SetAllocator, while holding the GIL, as fast as
 * possible. Same race, far more writes per second. */
static PyMemAllocatorEx orig_raw;
static void *hook_malloc(void *ctx, size_t n)
{ PyMemAllocatorEx *a = ctx; return a->malloc(a->ctx, n); }
static void *hook_calloc(void *ctx, size_t n, size_t e)
{ PyMemAllocatorEx *a = ctx; return a->calloc(a->ctx, n, e); }
static void *hook_realloc(void *ctx, void *p, size_t n)
{ PyMemAllocatorEx *a = ctx; return a->realloc(a->ctx, p, n); }
static void hook_free(void *ctx, void *p)
{ PyMemAllocatorEx *a = ctx; a->free(a->ctx, p); }

static void *hook_toggler(void *arg)
{
    (void)arg;
    PyGILState_STATE s = PyGILState_Ensure();
    PyMem_GetAllocator(PYMEM_DOMAIN_RAW, &orig_raw);
    PyMemAllocatorEx hook = {&orig_raw, hook_malloc, hook_calloc, hook_realloc, hook_free};
    while (!atomic_load(&done)) {
        for (int i = 0; i < 1000; i++) {
            PyMem_SetAllocator(PYMEM_DOMAIN_RAW, &hook);
            PyMem_SetAllocator(PYMEM_DOMAIN_RAW, &orig_raw);
        }
        atomic_fetch_add(&toggles, 1000);
        Py_BEGIN_ALLOW_THREADS
        Py_END_ALLOW_THREADS
    }
    PyGILState_Release(s);
    return NULL;
}

static void *toggler(void *arg)
{
    (void)arg;
    PyGILState_STATE s = PyGILState_Ensure();
    while (!atomic_load(&done)) {
        if (PyRun_SimpleString("tracemalloc.start()") != 0) abort();
        Py_BEGIN_ALLOW_THREADS
        Py_END_ALLOW_THREADS
        if (PyRun_SimpleString("tracemalloc.stop()") != 0) abort();
        atomic_fetch_add(&toggles, 1);
        Py_BEGIN_ALLOW_THREADS
        if (toggler_sleep_us) usleep(toggler_sleep_us);
        Py_END_ALLOW_THREADS
    }
    PyGILState_Release(s);
    return NULL;
}

int main(int argc, char **argv)
{
    int seconds = argc > 1 ? atoi(argv[1]) : 20;
    int nchurn = argc > 2 ? atoi(argv[2]) : 3;
    toggler_sleep_us = argc > 3 ? atoi(argv[3]) : 0;
    int raw_mode = argc > 4 && strcmp(argv[4], "raw") == 0;
    int hook_mode = argc > 5 && strcmp(argv[5], "hook") == 0;

    Py_InitializeEx(0);
    if (PyRun_SimpleString("import tracemalloc") != 0) return 2;
    PyThreadState *main_ts = PyEval_SaveThread();

    pthread_t th[64], tog;
    if (nchurn > 64) nchurn = 64;
    for (int i = 0; i < nchurn; i++) pthread_create(&th[i], NULL, raw_mode ? rawfree_loop : churn, NULL);
    pthread_create(&tog, NULL, hook_mode ? hook_toggler : toggler, NULL);
    sleep(seconds);
    atomic_store(&done, 1);
    for (int i = 0; i < nchurn; i++) pthread_join(th[i], NULL);
    pthread_join(tog, NULL);

    PyEval_RestoreThread(main_ts);
    printf("no crash: %ld thread states created and freed, %ld raw frees without a thread state, "
           "%ld tracemalloc start/stop cycles\n",
           atomic_load(&churns), atomic_load(&rawfrees), atomic_load(&toggles));
    fflush(stdout);
    return Py_FinalizeEx() < 0 ? 1 : 0;
}
