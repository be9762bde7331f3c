/* The calling thread's Python stack, read without running Python code,
 * creating objects, taking a lock or allocating: from the interpreter's own
 * frame structs, as CPython's tracemalloc does (its internal headers, which
 * CPython installs; compiled per interpreter by cpython/build.rs). See
 * cpython/src/stack.rs for the contract. */
#ifndef Py_BUILD_CORE
#  define Py_BUILD_CORE 1
#endif
#include <Python.h>
#if PY_VERSION_HEX >= 0x030E0000
#  include "internal/pycore_interpframe.h"
#else
#  include "internal/pycore_frame.h"
#endif

/* Writes up to `max` frames of `tstate`'s stack, innermost first: each
 * frame's code object (borrowed) and line (-1 if unknown). `tstate` must be
 * the calling thread's attached thread state (its frames cannot change
 * meanwhile). Returns the number written. */
int interheap_stack_capture(PyThreadState *tstate, PyObject **codes, int *lines, int max)
{
    if (tstate == NULL) {
        return 0;
    }
#if PY_VERSION_HEX >= 0x030D0000
    _PyInterpreterFrame *frame = tstate->current_frame;
#else
    _PyInterpreterFrame *frame = tstate->cframe ? tstate->cframe->current_frame : NULL;
#endif
    int n = 0;
    for (; frame != NULL && n < max; frame = frame->previous) {
        /* Frames owned by the C stack (entry shims) or not started yet. */
        if (_PyFrame_IsIncomplete(frame)) {
            continue;
        }
#if PY_VERSION_HEX >= 0x030D0000
        codes[n] = (PyObject *)_PyFrame_GetCode(frame);
#else
        codes[n] = (PyObject *)frame->f_code;
#endif
        lines[n] = PyUnstable_InterpreterFrame_GetLine(frame);
        n++;
    }
    return n;
}
