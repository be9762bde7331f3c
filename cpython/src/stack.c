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
 * frame's code object (borrowed), the byte offset of its instruction and a
 * stamp of its code object (see interheap_code_stamp). `tstate` must be the
 * calling thread's attached thread state (its frames cannot change
 * meanwhile). Returns the number written. No line is computed here: reading
 * a line table costs about a thousand instructions a frame, and the sites'
 * code cache reads each (code, offset) once (interheap_code_line). */
int interheap_stack_capture(PyThreadState *tstate, PyObject **codes, int *offsets, unsigned long long *stamps, int max)
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
        PyCodeObject *co = _PyFrame_GetCode(frame);
#else
        PyCodeObject *co = frame->f_code;
#endif
        codes[n] = (PyObject *)co;
        /* What PyUnstable_InterpreterFrame_GetLine passes to PyCode_Addr2Line. */
        offsets[n] = _PyInterpreterFrame_LASTI(frame) * (int)sizeof(_Py_CODEUNIT);
        /* The stamp: what tells this code object from a later one at its address. */
        unsigned long long stamp = (unsigned long long)(uintptr_t)co->co_filename;
        stamp = stamp * 0x9E3779B97F4A7C15ull ^ (unsigned long long)(uintptr_t)co->co_qualname;
        stamp = stamp * 0x9E3779B97F4A7C15ull ^ (unsigned long long)(uintptr_t)co->co_linetable;
        stamp = stamp * 0x9E3779B97F4A7C15ull ^ (unsigned long long)(unsigned int)co->co_firstlineno;
        stamps[n] = stamp | 1;
        n++;
    }
    return n;
}

/* The line of the instruction at byte `offset` in `code` (a live code
 * object), -1 if unknown. Reads the line table; allocates nothing. */
int interheap_code_line(PyObject *code, int offset)
{
    return PyCode_Addr2Line((PyCodeObject *)code, offset);
}

/* Copies `s` (a str) into `out` as UTF-8, at most `cap` bytes (whole code
 * points only), without allocating. Returns the bytes written. */
static int copy_utf8(PyObject *s, char *out, int cap)
{
    if (s == NULL || !PyUnicode_Check(s)) {
        return 0;
    }
    int kind = PyUnicode_KIND(s);
    const void *data = PyUnicode_DATA(s);
    Py_ssize_t len = PyUnicode_GET_LENGTH(s);
    int n = 0;
    for (Py_ssize_t i = 0; i < len; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        char buf[4];
        int w;
        if (c < 0x80) {
            buf[0] = (char)c;
            w = 1;
        }
        else if (c < 0x800) {
            buf[0] = (char)(0xC0 | (c >> 6));
            buf[1] = (char)(0x80 | (c & 0x3F));
            w = 2;
        }
        else if (c < 0x10000) {
            if (c >= 0xD800 && c <= 0xDFFF) {
                c = 0xFFFD; /* a lone surrogate: U+FFFD */
            }
            buf[0] = (char)(0xE0 | (c >> 12));
            buf[1] = (char)(0x80 | ((c >> 6) & 0x3F));
            buf[2] = (char)(0x80 | (c & 0x3F));
            w = 3;
        }
        else {
            buf[0] = (char)(0xF0 | (c >> 18));
            buf[1] = (char)(0x80 | ((c >> 12) & 0x3F));
            buf[2] = (char)(0x80 | ((c >> 6) & 0x3F));
            buf[3] = (char)(0x80 | (c & 0x3F));
            w = 4;
        }
        if (n + w > cap) {
            break;
        }
        for (int k = 0; k < w; k++) {
            out[n++] = buf[k];
        }
    }
    return n;
}

/* A code object's file name and qualified name, as UTF-8 into `file` and
 * `name` (at most `cap` bytes each), without allocating; the lengths go to
 * `file_len` and `name_len`. `code` is a live code object. */
void interheap_code_names(PyObject *code, char *file, int *file_len, char *name, int *name_len, int cap)
{
    PyCodeObject *co = (PyCodeObject *)code;
    *file_len = copy_utf8(co->co_filename, file, cap);
    *name_len = copy_utf8(co->co_qualname, name, cap);
}
