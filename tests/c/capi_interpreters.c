/* Interpreters made through CPython's C API, for tests/test_interpreter_names.py:
 * one with Py_NewInterpreter() (legacy C API: main's GIL and obmalloc state)
 * and one with Py_NewInterpreterFromConfig() (C API, isolated config). Each
 * runs a little Python code and ends. Called through ctypes.PyDLL from the
 * main interpreter (thread state attached); restores it before returning.
 * Writes the two interpreter IDs to ids[0], ids[1]; returns 0, or -1. */
#define PY_SSIZE_T_CLEAN
#include "embed_support.h"

static const char *WORK = "kept = [str(i) * 3 for i in range(2000)]\n";

int make_capi_interpreters(long long *ids)
{
    PyThreadState *main_tstate = PyThreadState_Get();

    PyThreadState *legacy = Py_NewInterpreter();
    if (legacy == NULL) {
        PyThreadState_Swap(main_tstate);
        return -1;
    }
    ids[0] = (long long)PyInterpreterState_GetID(PyThreadState_GetInterpreter(legacy));
    int rc = PyRun_SimpleString(WORK);
    Py_EndInterpreter(legacy);
    PyThreadState_Swap(main_tstate);
    if (rc != 0) {
        return -1;
    }

    PyThreadState *isolated = new_isolated_interpreter();
    if (isolated == NULL) {
        PyThreadState_Swap(main_tstate);
        return -1;
    }
    ids[1] = (long long)PyInterpreterState_GetID(PyThreadState_GetInterpreter(isolated));
    rc = PyRun_SimpleString(WORK);
    Py_EndInterpreter(isolated);
    PyThreadState_Swap(main_tstate);
    return rc == 0 ? 0 : -1;
}
