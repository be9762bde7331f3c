/* A race in CPython alone (no interheap code): PyGILState_Ensure and
   PyGILState_Release on a thread with no thread state allocate and free
   that thread state with PyMem_RawCalloc / PyMem_RawFree without holding
   the GIL, while the GIL holder replaces the raw allocator with
   PyMem_SetAllocator, as tracemalloc.start() and stop() do. PyMem_Raw*
   read the allocator table (ctx and function pointers) with no
   synchronisation, so a reader can combine the new ctx with the old
   function. This program installs a hook whose ctx it knows and swaps it
   in and out; the hook aborts when it is called with another ctx.
   tracemalloc's own free hook dereferences its ctx: that is the SIGSEGV
   interheap-pyalloc's stress test hit about once in 30 runs.

   Build and run: repro/run.sh [PYTHON ...]   (see the crate README)
   Exit 0: no torn read within the time given (argv[1] seconds, default 10);
   abort with "torn read: ..." when the race is seen. */
#include <Python.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static PyMemAllocatorEx orig;
static int magic;
static atomic_int stop, torn;

static void check(void *ctx, const char *what) {
    if (ctx != &magic) {
        atomic_fetch_add(&torn, 1);
        fprintf(stderr, "torn read: hook %s called with ctx=%p (expected %p)\n", what, ctx, (void *)&magic);
        abort();
    }
}
static void *h_malloc(void *ctx, size_t n) { check(ctx, "malloc"); return orig.malloc(orig.ctx, n); }
static void *h_calloc(void *ctx, size_t a, size_t b) { check(ctx, "calloc"); return orig.calloc(orig.ctx, a, b); }
static void *h_realloc(void *ctx, void *p, size_t n) { check(ctx, "realloc"); return orig.realloc(orig.ctx, p, n); }
static void h_free(void *ctx, void *p) { check(ctx, "free"); orig.free(orig.ctx, p); }

static void *worker(void *arg) {
    (void)arg;
    while (!atomic_load(&stop)) {
        PyGILState_STATE s = PyGILState_Ensure();   /* PyMem_RawCalloc, GIL not held */
        PyGILState_Release(s);                      /* PyMem_RawFree, GIL released */
    }
    return NULL;
}

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 10;
    Py_InitializeEx(0);
    PyMem_GetAllocator(PYMEM_DOMAIN_RAW, &orig);
    PyMemAllocatorEx hook = {&magic, h_malloc, h_calloc, h_realloc, h_free};
    PyThreadState *main_ts = PyEval_SaveThread();
    pthread_t t[3];
    for (int i = 0; i < 3; i++) pthread_create(&t[i], NULL, worker, NULL);
    PyEval_RestoreThread(main_ts);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    long swaps = 0;
    for (;;) {
        for (int i = 0; i < 100; i++) {    /* with the GIL held, as tracemalloc does */
            PyMem_SetAllocator(PYMEM_DOMAIN_RAW, &hook);
            PyMem_SetAllocator(PYMEM_DOMAIN_RAW, &orig);
            swaps += 2;
        }
        Py_BEGIN_ALLOW_THREADS               /* let the workers take the GIL */
        Py_END_ALLOW_THREADS
        clock_gettime(CLOCK_MONOTONIC, &b);
        if (b.tv_sec - a.tv_sec + (b.tv_nsec - a.tv_nsec) / 1e9 > seconds) break;
    }
    atomic_store(&stop, 1);
    Py_BEGIN_ALLOW_THREADS
    for (int i = 0; i < 3; i++) pthread_join(t[i], NULL);
    Py_END_ALLOW_THREADS
    printf("no torn read in %ld allocator swaps\n", swaps);
    return Py_FinalizeEx();
}
