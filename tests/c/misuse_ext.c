/*
 * interheap_misuse: an extension module that misuses CPython's allocator API
 * ON PURPOSE, for the tests of a memory checker.
 *
 *   !!! Most functions below are bugs on purpose: double frees, frees of
 *   !!! memory that was never allocated, frees in the wrong domain, buffer
 *   !!! overruns, writes after free, allocations without a thread state, and
 *   !!! a static shared by every interpreter. Call them only under a checker
 *   !!! (interheap) or PYTHONMALLOC=debug, and only in a child process that
 *   !!! is allowed to crash. Never in the test runner's own process.
 *
 * The safe ones (no bug committed) are the plain alloc/realloc/free wrappers
 * and keep_static + free_static in one interpreter. mem_alloc_without_gil is
 * harmless only with PYTHONMALLOC=malloc on a default build (PyMem_Malloc is
 * then plain malloc): pymalloc (3.12+) and mimalloc (free-threaded) find
 * their per-interpreter/per-thread state through the thread state, NULL
 * inside Py_BEGIN_ALLOW_THREADS, and crash.
 *
 * Addresses travel as Python ints (PyLong_FromVoidPtr / PyLong_AsVoidPtr),
 * sizes as Py_ssize_t. The module keeps no state of its own except `kept`, a
 * file-level static shared by all interpreters: the classic porting bug.
 * It declares per-interpreter-GIL support (3.12+) and, where the slot exists
 * (3.13+), that it does not need the GIL, so it imports in isolated
 * subinterpreters and on free-threaded builds without re-enabling the GIL.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <string.h>

/* Deliberately shared by every interpreter that imports the module. */
static void *kept = NULL;

/* Never allocated by any allocator: freeing it is a bug. */
static char foreign_block[64];

/* ---- argument helpers ---------------------------------------------------- */

static int
size_arg(PyObject *arg, Py_ssize_t *n)
{
    Py_ssize_t v = PyLong_AsSsize_t(arg);
    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (v < 0) {
        PyErr_SetString(PyExc_ValueError, "size must be >= 0");
        return -1;
    }
    *n = v;
    return 0;
}

static int
addr_arg(PyObject *arg, void **p)
{
    void *v = PyLong_AsVoidPtr(arg);
    if (v == NULL && PyErr_Occurred()) {
        return -1;
    }
    *p = v;
    return 0;
}

static PyObject *
address_or_memory_error(void *p)
{
    if (p == NULL) {
        return PyErr_NoMemory();
    }
    return PyLong_FromVoidPtr(p);
}

/* ---- plain wrappers (safe when used correctly) --------------------------- */

#define ALLOC_FN(name, alloc)                                                 \
    static PyObject *name(PyObject *module, PyObject *arg)                    \
    {                                                                         \
        (void)module;                                                         \
        Py_ssize_t n;                                                         \
        if (size_arg(arg, &n) < 0) {                                          \
            return NULL;                                                      \
        }                                                                     \
        return address_or_memory_error(alloc((size_t)n));                     \
    }

#define FREE_FN(name, dealloc)                                                \
    static PyObject *name(PyObject *module, PyObject *arg)                    \
    {                                                                         \
        (void)module;                                                         \
        void *p;                                                              \
        if (addr_arg(arg, &p) < 0) {                                          \
            return NULL;                                                      \
        }                                                                     \
        dealloc(p);                                                           \
        Py_RETURN_NONE;                                                       \
    }

#define REALLOC_FN(name, realloc_)                                            \
    static PyObject *name(PyObject *module, PyObject *const *args,            \
                          Py_ssize_t nargs)                                   \
    {                                                                         \
        (void)module;                                                         \
        void *p;                                                              \
        Py_ssize_t n;                                                         \
        if (nargs != 2) {                                                     \
            PyErr_SetString(PyExc_TypeError,                                  \
                            #name "() takes exactly 2 arguments");            \
            return NULL;                                                      \
        }                                                                     \
        if (addr_arg(args[0], &p) < 0 || size_arg(args[1], &n) < 0) {         \
            return NULL;                                                      \
        }                                                                     \
        return address_or_memory_error(realloc_(p, (size_t)n));               \
    }

ALLOC_FN(mem_alloc, PyMem_Malloc)
ALLOC_FN(obj_alloc, PyObject_Malloc)
ALLOC_FN(raw_alloc, PyMem_RawMalloc)
FREE_FN(mem_free, PyMem_Free)
FREE_FN(obj_free, PyObject_Free)
FREE_FN(raw_free, PyMem_RawFree)
REALLOC_FN(mem_realloc, PyMem_Realloc)
REALLOC_FN(obj_realloc, PyObject_Realloc)
REALLOC_FN(raw_realloc, PyMem_RawRealloc)

/* ---- the static shared by all interpreters ------------------------------- */

static PyObject *
keep_static(PyObject *module, PyObject *arg)
{
    (void)module;
    Py_ssize_t n;
    if (size_arg(arg, &n) < 0) {
        return NULL;
    }
    /* BUG (porting): a previous interpreter's block is simply overwritten
       (leaked), and the new one belongs to the calling interpreter only. */
    kept = PyMem_Malloc((size_t)n);
    if (kept == NULL) {
        return PyErr_NoMemory();
    }
    memset(kept, 0x5a, (size_t)n);
    return PyLong_FromVoidPtr(kept);
}

static PyObject *
free_static(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    /* BUG when the calling interpreter is not the one that allocated it. */
    PyMem_Free(kept);
    kept = NULL;
    Py_RETURN_NONE;
}

/* ---- allocator calls without a thread state ------------------------------ */

static PyObject *
mem_alloc_without_gil(PyObject *module, PyObject *arg)
{
    (void)module;
    Py_ssize_t n;
    void *p;
    if (size_arg(arg, &n) < 0) {
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    p = PyMem_Malloc((size_t)n); /* BUG: PyMem_* needs an attached thread state */
    Py_END_ALLOW_THREADS
    return address_or_memory_error(p);
}

static PyObject *
mem_free_without_gil(PyObject *module, PyObject *arg)
{
    (void)module;
    void *p;
    if (addr_arg(arg, &p) < 0) {
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    PyMem_Free(p); /* BUG: PyMem_* needs an attached thread state */
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---- double frees -------------------------------------------------------- */

static PyObject *
double_free_mem(PyObject *module, PyObject *arg)
{
    (void)module;
    Py_ssize_t n;
    if (size_arg(arg, &n) < 0) {
        return NULL;
    }
    void *p = PyMem_Malloc((size_t)n);
    if (p == NULL) {
        return PyErr_NoMemory();
    }
    PyMem_Free(p);
    PyMem_Free(p); /* BUG: double free */
    Py_RETURN_NONE;
}

static PyObject *
double_free_obj(PyObject *module, PyObject *arg)
{
    (void)module;
    Py_ssize_t n;
    if (size_arg(arg, &n) < 0) {
        return NULL;
    }
    void *p = PyObject_Malloc((size_t)n);
    if (p == NULL) {
        return PyErr_NoMemory();
    }
    PyObject_Free(p);
    PyObject_Free(p); /* BUG: double free */
    Py_RETURN_NONE;
}

/* ---- frees of memory no allocator handed out ----------------------------- */

static PyObject *
free_foreign_static(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    PyMem_Free(foreign_block); /* BUG: never allocated */
    Py_RETURN_NONE;
}

static PyObject *
free_foreign_stack(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    char buf[64];
    memset(buf, 0, sizeof buf);
    PyMem_Free(buf); /* BUG: a stack address */
    Py_RETURN_NONE;
}

/* ---- frees in the wrong domain ------------------------------------------- */

#define MISMATCH_FN(name, alloc, dealloc)                                     \
    static PyObject *name(PyObject *module, PyObject *arg)                    \
    {                                                                         \
        (void)module;                                                         \
        Py_ssize_t n;                                                         \
        if (size_arg(arg, &n) < 0) {                                          \
            return NULL;                                                      \
        }                                                                     \
        void *p = alloc((size_t)n);                                           \
        if (p == NULL) {                                                      \
            return PyErr_NoMemory();                                          \
        }                                                                     \
        dealloc(p); /* BUG: freed by another domain's function */             \
        Py_RETURN_NONE;                                                       \
    }

MISMATCH_FN(mismatch_mem_obj, PyMem_Malloc, PyObject_Free)
MISMATCH_FN(mismatch_raw_mem, PyMem_RawMalloc, PyMem_Free)
MISMATCH_FN(mismatch_obj_raw, PyObject_Malloc, PyMem_RawFree)

/* ---- writes outside the block -------------------------------------------- */

static PyObject *
overrun_mem(PyObject *module, PyObject *arg)
{
    (void)module;
    Py_ssize_t n;
    if (size_arg(arg, &n) < 0) {
        return NULL;
    }
    unsigned char *p = PyMem_Malloc((size_t)n);
    if (p == NULL) {
        return PyErr_NoMemory();
    }
    /* BUG: 8 bytes past the end. Through a volatile pointer so that the
       compiler neither drops nor warns about the stores. */
    volatile unsigned char *v = p;
    for (Py_ssize_t i = n; i < n + 8; i++) {
        v[i] = 0xee;
    }
    PyMem_Free(p);
    Py_RETURN_NONE;
}

static PyObject *
use_after_free_mem(PyObject *module, PyObject *arg)
{
    (void)module;
    Py_ssize_t n;
    if (size_arg(arg, &n) < 0) {
        return NULL;
    }
    unsigned char *p = PyMem_Malloc((size_t)n);
    if (p == NULL) {
        return PyErr_NoMemory();
    }
    PyMem_Free(p);
    volatile unsigned char *v = p; /* volatile: the stores are not dropped */
    Py_ssize_t m = n < 8 ? n : 8;
    for (Py_ssize_t i = 0; i < m; i++) {
        v[i] = 0xdd; /* BUG: write after free */
    }
    Py_RETURN_NONE;
}

/* ---- module -------------------------------------------------------------- */

static PyMethodDef misuse_methods[] = {
    {"mem_alloc", mem_alloc, METH_O, "PyMem_Malloc(n) -> address"},
    {"obj_alloc", obj_alloc, METH_O, "PyObject_Malloc(n) -> address"},
    {"raw_alloc", raw_alloc, METH_O, "PyMem_RawMalloc(n) -> address"},
    {"mem_free", mem_free, METH_O, "PyMem_Free(addr)"},
    {"obj_free", obj_free, METH_O, "PyObject_Free(addr)"},
    {"raw_free", raw_free, METH_O, "PyMem_RawFree(addr)"},
    {"mem_realloc", (PyCFunction)(void (*)(void))mem_realloc, METH_FASTCALL,
     "PyMem_Realloc(addr, n) -> address"},
    {"obj_realloc", (PyCFunction)(void (*)(void))obj_realloc, METH_FASTCALL,
     "PyObject_Realloc(addr, n) -> address"},
    {"raw_realloc", (PyCFunction)(void (*)(void))raw_realloc, METH_FASTCALL,
     "PyMem_RawRealloc(addr, n) -> address"},
    {"keep_static", keep_static, METH_O,
     "PyMem_Malloc(n) into a static shared by all interpreters -> address"},
    {"free_static", free_static, METH_NOARGS,
     "PyMem_Free the shared static in the calling interpreter"},
    {"mem_alloc_without_gil", mem_alloc_without_gil, METH_O,
     "BUG: PyMem_Malloc(n) between Py_BEGIN/END_ALLOW_THREADS -> address"},
    {"mem_free_without_gil", mem_free_without_gil, METH_O,
     "BUG: PyMem_Free(addr) between Py_BEGIN/END_ALLOW_THREADS"},
    {"double_free_mem", double_free_mem, METH_O, "BUG: PyMem_Free twice"},
    {"double_free_obj", double_free_obj, METH_O, "BUG: PyObject_Free twice"},
    {"free_foreign_static", free_foreign_static, METH_NOARGS,
     "BUG: PyMem_Free on a static array"},
    {"free_foreign_stack", free_foreign_stack, METH_NOARGS,
     "BUG: PyMem_Free on a stack array"},
    {"mismatch_mem_obj", mismatch_mem_obj, METH_O,
     "BUG: PyMem_Malloc then PyObject_Free"},
    {"mismatch_raw_mem", mismatch_raw_mem, METH_O,
     "BUG: PyMem_RawMalloc then PyMem_Free"},
    {"mismatch_obj_raw", mismatch_obj_raw, METH_O,
     "BUG: PyObject_Malloc then PyMem_RawFree"},
    {"overrun_mem", overrun_mem, METH_O,
     "BUG: writes 8 bytes past a PyMem_Malloc(n) block"},
    {"use_after_free_mem", use_after_free_mem, METH_O,
     "BUG: writes to a PyMem block after freeing it"},
    {NULL, NULL, 0, NULL},
};

static int
misuse_exec(PyObject *module)
{
    (void)module;
    return 0;
}

static PyModuleDef_Slot misuse_slots[] = {
    {Py_mod_exec, (void *)misuse_exec},
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#ifdef Py_mod_gil
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef misuse_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "interheap_misuse",
    .m_doc = "Allocator-API misuse on purpose, for memory-checker tests.",
    .m_size = 0,
    .m_methods = misuse_methods,
    .m_slots = misuse_slots,
};

PyMODINIT_FUNC
PyInit_interheap_misuse(void)
{
    return PyModuleDef_Init(&misuse_module);
}
