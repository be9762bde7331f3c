/* One thread ends an isolated interpreter and creates the next one straight
 * away, without allocating in main in between, so the next interpreter often
 * reuses the address of the one just freed. The interheap allocator caches
 * the last interpreter per thread by address; it must notice that the
 * address now belongs to another interpreter (DESIGN.md fact 6).
 *
 * Prints, per round, the allocator's report before the interpreter is created
 * ("BEFORE k json") and after it ran its code ("AFTER k id address json");
 * tests/test_c_api.py checks that no ended interpreter's heap moved and that
 * each interpreter's blocks are in its own heaps. Usage: reborn_interpreters */
#include <Python.h>
#include <stdio.h>

#include "interheap_allocator.h"

#define ROUNDS 12

static void print_report(const char *tag) {
    char *report = interheap_allocator_report_json();
    printf("%s %s\n", tag, report ? report : "null");
    interheap_allocator_free_string(report);
}

int main(void) {
    char err[512];
    PyPreConfig pre;
    PyPreConfig_InitPythonConfig(&pre);
    PyStatus status = Py_PreInitialize(&pre);
    if (PyStatus_Exception(status)) Py_ExitStatusException(status);
    if (interheap_allocator_install(INTERHEAP_DOMAIN_ALL, err, sizeof err) != 0) {
        printf("install refused: %s\n", err);
        return 3;
    }
    Py_Initialize();
    PyThreadState *main_tstate = PyThreadState_Get();
    for (int k = 0; k < ROUNDS; k++) {
        char tag[64];
        snprintf(tag, sizeof tag, "BEFORE %d", k);
        print_report(tag);
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
        status = Py_NewInterpreterFromConfig(&sub, &config);
        if (PyStatus_Exception(status)) {
            printf("Py_NewInterpreterFromConfig failed: %s\n", status.err_msg ? status.err_msg : "?");
            return 1;
        }
        PyInterpreterState *interp = PyThreadState_GetInterpreter(sub);
        char code[128];
        snprintf(code, sizeof code, "keep = [bytes(%d) for _ in range(3000)]\n", 3000 + 200 * k);
        if (PyRun_SimpleString(code) != 0) return 1;
        snprintf(tag, sizeof tag, "AFTER %d %lld %p", k, (long long)PyInterpreterState_GetID(interp), (void *)interp);
        print_report(tag);
        /* Leaves this thread with no thread state; the next round's
         * interpreter is created from main's, without running Python in main. */
        Py_EndInterpreter(sub);
        PyThreadState_Swap(main_tstate);
    }
    if (Py_FinalizeEx() < 0) return 120;
    printf("RESULT ok\n");
    return 0;
}
