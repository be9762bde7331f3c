/* Counts the times CPython swaps the process-wide raw allocator back to
 * malloc (_PyMem_SetDefaultAllocator) while isolated subinterpreters start,
 * with the interheap allocator serving the raw domain.
 *
 * CPython 3.12 does it in every interpreter's start-up
 * (_Py_ClearStandardStreamEncoding, gh-111924): with other interpreters
 * running, their raw frees can land in that window and hand interheap's
 * blocks to glibc's free. interheap's raw_swap_guard must keep the count at 0
 * in subinterpreters. The count during Python's own start-up, where the swaps
 * are harmless and kept, shows that the counting works.
 *
 * This program defines _PyMem_SetDefaultAllocator, which libpython calls
 * through its PLT, counts, and forwards to libpython's (RTLD_NEXT).
 * Prints "SWAPS start-up N subinterpreters M". Usage: raw_allocator_swaps */
#define _GNU_SOURCE
#include <dlfcn.h>

#include "embed_support.h"

#define SUBINTERPRETERS 3

static int phase; /* 0: Python's start-up, 1: subinterpreters */
static long swaps[2];

int _PyMem_SetDefaultAllocator(PyMemAllocatorDomain domain, PyMemAllocatorEx *old) {
    static int (*real)(PyMemAllocatorDomain, PyMemAllocatorEx *);
    if (!real) real = (int (*)(PyMemAllocatorDomain, PyMemAllocatorEx *))dlsym(RTLD_NEXT, "_PyMem_SetDefaultAllocator");
    if (!real) {
        fprintf(stderr, "no _PyMem_SetDefaultAllocator after this program\n");
        abort();
    }
    if (domain == PYMEM_DOMAIN_RAW) __atomic_fetch_add(&swaps[phase], 1, __ATOMIC_RELAXED);
    return real(domain, old);
}

int main(void) {
    start_with_interheap_for(INTERHEAP_DOMAIN_RAW);
    PyThreadState *main_tstate = PyThreadState_Get();
    phase = 1;
    for (int k = 0; k < SUBINTERPRETERS; k++) {
        PyThreadState *sub = new_isolated_interpreter();
        if (!sub) return 1;
        if (PyRun_SimpleString("import sys\nassert sys.stdout is not None and sys.stderr is not None\n") != 0)
            return 1;
        Py_EndInterpreter(sub);
        PyThreadState_Swap(main_tstate);
    }
    phase = 0;
    printf("SWAPS start-up %ld subinterpreters %ld\n", swaps[0], swaps[1]);
    if (Py_FinalizeEx() < 0) return 120;
    printf("RESULT ok\n");
    return 0;
}
