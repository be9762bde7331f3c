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
#include "embed_support.h"

#define ROUNDS 12

int main(void) {
    start_with_interheap();
    PyThreadState *main_tstate = PyThreadState_Get();
    for (int k = 0; k < ROUNDS; k++) {
        char tag[64];
        snprintf(tag, sizeof tag, "BEFORE %d", k);
        print_report(tag);
        PyThreadState *sub = new_isolated_interpreter();
        if (!sub) return 1;
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
