/* Interpreters made through CPython's C API, for tests/test_interpreter_names.py:
 * one with Py_NewInterpreter() (legacy C API: main's GIL and obmalloc state)
 * and one with Py_NewInterpreterFromConfig() (C API, isolated config). Each
 * runs a little Python code and ends. Called through ctypes.PyDLL from the
 * main interpreter (thread state attached); restores it before returning.
 * Writes the two interpreter IDs to ids[0], ids[1]; returns 0, or -1. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

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

    PyInterpreterConfig config = {
        .use_main_obmalloc = 0,
        .allow_fork = 0,
        .allow_exec = 0,
        .allow_threads = 1,
        .allow_daemon_threads = 0,
        .check_multi_interp_extensions = 1,
        .gil = PyInterpreterConfig_OWN_GIL,
    };
    PyThreadState *isolated = NULL;
    PyStatus status = Py_NewInterpreterFromConfig(&isolated, &config);
    if (PyStatus_Exception(status) || isolated == NULL) {
        PyThreadState_Swap(main_tstate);
        return -1;
    }
    ids[1] = (long long)PyInterpreterState_GetID(PyThreadState_GetInterpreter(isolated));
    rc = PyRun_SimpleString(WORK);
    Py_EndInterpreter(isolated);
    PyThreadState_Swap(main_tstate);
    return rc == 0 ? 0 : -1;
}
