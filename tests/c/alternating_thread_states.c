/* One thread runs two isolated interpreters in turns, each turn on a fresh
 * thread state that it deletes at the end, with no Python in between: the
 * next turn's thread state usually takes the freed one's address. The
 * interheap allocator caches the current interpreter per thread, keyed by
 * the thread state's address; freeing that thread state must clear the key,
 * or the other interpreter's objects land in the wrong heap.
 *
 * Prints "STATES a1 a2 ..." (each turn's thread state address), "IDS a b"
 * and "REPORT json"; tests/test_c_api.py checks that each interpreter's
 * objects are in its own heaps. Usage: alternating_thread_states */
#include "embed_support.h"

#define TURNS 16

int main(void) {
    start_with_interheap();
    PyThreadState *main_tstate = PyThreadState_Get();
    PyThreadState *firsts[2];
    PyInterpreterState *interps[2];
    for (int i = 0; i < 2; i++) {
        /* Its first thread state stays for Py_EndInterpreter; turns use new ones. */
        firsts[i] = new_isolated_interpreter();
        if (!firsts[i]) return 1;
        interps[i] = PyThreadState_GetInterpreter(firsts[i]);
        PyThreadState_Swap(main_tstate);
    }
    PyThreadState_Swap(NULL);
    printf("STATES");
    for (int k = 0; k < TURNS; k++) {
        int which = k % 2;
        PyThreadState *turn = PyThreadState_New(interps[which]);
        printf(" %p", (void *)turn);
        PyThreadState_Swap(turn);
        char code[96];
        /* Interpreter 0 keeps blocks of ~3000 bytes, interpreter 1 of ~5000. */
        snprintf(code, sizeof code, "keep_%d = [bytes(%d) for _ in range(500)]\n", k, which ? 5000 : 3000);
        if (PyRun_SimpleString(code) != 0) return 1;
        PyThreadState_Clear(turn);
        PyThreadState_DeleteCurrent();
    }
    printf("\n");
    PyThreadState_Swap(main_tstate);
    printf("IDS %lld %lld\n", (long long)PyInterpreterState_GetID(interps[0]),
           (long long)PyInterpreterState_GetID(interps[1]));
    print_report("REPORT");
    for (int i = 0; i < 2; i++) {
        PyThreadState_Swap(firsts[i]);
        Py_EndInterpreter(firsts[i]);
        PyThreadState_Swap(main_tstate);
    }
    if (Py_FinalizeEx() < 0) return 120;
    printf("RESULT ok\n");
    return 0;
}
