//! `interheap_interp._core`: an interpreter's own memory figures and limit,
//! read and lowered from inside that interpreter, isolated subinterpreters
//! included.
//!
//! PyO3 modules cannot be imported in a subinterpreter (DESIGN.md fact 9),
//! so this module is written against the C API directly (`pyo3::ffi`), with
//! multi-phase init declaring per-interpreter-GIL support (and, on
//! free-threaded builds, that it does not need the GIL). It lives in this
//! same library, `interheap._native`, under a second init function
//! (`PyInit__core`): `interheap_interp/__init__.py` loads this file as
//! `interheap_interp._core`, which never runs PyO3's init. Being the same
//! library, it reads the hooks' tracker directly; the allocator is reached
//! through the process's exported C API (`interheap-python`, libinterheap).
//!
//! Functions (all about the calling thread's interpreter): `interpreter_id()`,
//! `figures()` (per back end: live bytes, limit, refused requests, the
//! largest, the exact peak while limited), `lower_limit(size)`, which
//! tightens the limit in every back end present and refuses to raise it, and
//! `stack()`, the calling thread's stack as an allocator hook reads it.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::ptr;

use interheap_cpython::interp_figures::InterpFigures;
use pyo3::ffi::*;

type FiguresFn = unsafe extern "C" fn(i64, *mut InterpFigures) -> c_int;
type AllocatorLowerFn = unsafe extern "C" fn(i64, u64, *mut c_char, usize) -> c_int;

/// A symbol the process exports (the allocator's C API), if any.
fn allocator_symbol(name: &CStr) -> Option<*mut c_void> {
    // SAFETY: dlsym with RTLD_DEFAULT only searches the global scope.
    let sym = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    (!sym.is_null()).then_some(sym)
}

/// The calling thread's interpreter ID (the caller holds its thread state).
fn current_id() -> i64 {
    // SAFETY: called from a module function, so a thread state is attached.
    unsafe { PyInterpreterState_GetID(PyInterpreterState_Get()) }
}

/// Sets a Python exception and returns NULL.
fn raise(kind: *mut PyObject, message: &str) -> *mut PyObject {
    let text = std::ffi::CString::new(message.replace('\0', " ")).unwrap_or_default();
    // SAFETY: a live exception type and a C string; the GIL (or thread state) is held.
    unsafe { PyErr_SetString(kind, text.as_ptr()) };
    ptr::null_mut()
}

/// `d[key] = value` for an owned `value` (stolen); false if anything failed.
///
/// # Safety
///
/// `d` is a dict; `value` is NULL (an error is set) or an owned reference.
unsafe fn set(d: *mut PyObject, key: &CStr, value: *mut PyObject) -> bool {
    if value.is_null() {
        return false;
    }
    // SAFETY: per the contract.
    let ok = unsafe { PyDict_SetItemString(d, key.as_ptr(), value) } == 0;
    // SAFETY: we own `value`; the dict holds its own reference.
    unsafe { Py_DecRef(value) };
    ok
}

/// A dict of one back end's figures, or None (a new reference) if it is not there.
fn figures_dict(found: Option<InterpFigures>) -> *mut PyObject {
    let Some(f) = found else {
        // SAFETY: Py_None is immortal; the caller owns the reference we return.
        return unsafe { Py_NewRef(Py_None()) };
    };
    // SAFETY: (whole block) plain C API calls with a thread state attached.
    unsafe {
        let d = PyDict_New();
        if d.is_null() {
            return d;
        }
        let limit = if f.limit < 0 { Py_NewRef(Py_None()) } else { PyLong_FromLongLong(f.limit) };
        let ok = set(d, c"live_bytes", PyLong_FromLongLong(f.live_bytes))
            && set(d, c"limit", limit)
            && set(d, c"refused", PyLong_FromUnsignedLongLong(f.refused))
            && set(d, c"largest_refused", PyLong_FromUnsignedLongLong(f.largest_refused))
            && set(d, c"peak", PyLong_FromUnsignedLongLong(f.peak));
        if !ok {
            Py_DecRef(d);
            return ptr::null_mut();
        }
        d
    }
}

fn allocator_figures(id: i64) -> Option<InterpFigures> {
    let f = allocator_symbol(c"interheap_allocator_interp_figures")?;
    // SAFETY: the symbol is `interheap_allocator_interp_figures` (cpython/src/c_api.rs).
    let f = unsafe { std::mem::transmute::<*mut c_void, FiguresFn>(f) };
    let mut out = InterpFigures::default();
    // SAFETY: `out` is writable.
    (unsafe { f(id, &mut out) } == 0).then_some(out)
}

unsafe extern "C" fn interpreter_id(_module: *mut PyObject, _unused: *mut PyObject) -> *mut PyObject {
    // SAFETY: a thread state is attached in a module function.
    unsafe { PyLong_FromLongLong(current_id()) }
}

unsafe extern "C" fn figures(_module: *mut PyObject, _unused: *mut PyObject) -> *mut PyObject {
    let id = current_id();
    // SAFETY: (whole block) plain C API calls with a thread state attached.
    unsafe {
        let d = PyDict_New();
        if d.is_null() {
            return d;
        }
        let ok = set(d, c"id", PyLong_FromLongLong(id))
            && set(d, c"hooks", figures_dict(crate::hooks_interp_figures(id)))
            && set(d, c"allocator", figures_dict(allocator_figures(id)));
        if !ok {
            Py_DecRef(d);
            return ptr::null_mut();
        }
        d
    }
}

/// Bytes from an int (>= 0) or a text such as "64 MB"; `Err` after setting an exception.
///
/// # Safety
///
/// `arg` is a live object; a thread state is attached.
unsafe fn size_of(arg: *mut PyObject) -> Result<u64, ()> {
    // SAFETY: (whole block) per the contract.
    unsafe {
        if PyBool_Check(arg) != 0 {
            raise(PyExc_TypeError, "a size is an int (bytes) or a str such as '64 MB', not bool");
            return Err(());
        }
        if PyLong_Check(arg) != 0 {
            let value = PyLong_AsLongLong(arg);
            if value == -1 && !PyErr_Occurred().is_null() {
                return Err(());
            }
            if value < 0 {
                raise(PyExc_ValueError, &format!("invalid size {value}: a limit cannot be negative"));
                return Err(());
            }
            return Ok(value as u64);
        }
        if PyUnicode_Check(arg) != 0 {
            let text = PyUnicode_AsUTF8AndSize(arg, ptr::null_mut());
            if text.is_null() {
                return Err(());
            }
            return interheap_engine::parse_size(&CStr::from_ptr(text).to_string_lossy()).map_err(|e| {
                raise(PyExc_ValueError, &e);
            });
        }
        raise(PyExc_TypeError, "a size is an int (bytes) or a str such as '64 MB'");
        Err(())
    }
}

unsafe extern "C" fn lower_limit(_module: *mut PyObject, arg: *mut PyObject) -> *mut PyObject {
    // SAFETY: `arg` is the call's one argument; a thread state is attached.
    let Ok(limit) = (unsafe { size_of(arg) }) else { return ptr::null_mut() };
    let id = current_id();
    let hooks = crate::hooks_interp_figures(id).is_some();
    let allocator = allocator_symbol(c"interheap_allocator_lower_limit")
        // SAFETY: the symbol is `interheap_allocator_lower_limit` (cpython/src/c_api.rs).
        .map(|f| unsafe { std::mem::transmute::<*mut c_void, AllocatorLowerFn>(f) })
        .filter(|_| allocator_figures(id).is_some());
    if !hooks && allocator.is_none() {
        return raise(
            // SAFETY: a CPython exception type (static).
            unsafe { PyExc_RuntimeError },
            "neither interheap's hooks nor the interheap allocator count this interpreter: \
             no limit to lower (the main interpreter runs interheap.install(), or the program \
             runs under interheap-python)",
        );
    }
    // Check every back end first, so that a refusal changes nothing anywhere.
    let current: Vec<i64> =
        [crate::hooks_interp_figures(id), allocator_figures(id)].iter().flatten().map(|f| f.limit).collect();
    if let Some(&lowest) = current.iter().filter(|&&l| l >= 0).min() {
        if limit > lowest as u64 {
            return raise(
                // SAFETY: a CPython exception type (static).
                unsafe { PyExc_ValueError },
                &format!(
                    "an interpreter can lower its own limit, never raise it: the limit is {lowest} bytes, \
                     {limit} asked for"
                ),
            );
        }
    }
    if hooks && !crate::hooks_lower_limit(id, limit) {
        // SAFETY: a CPython exception type (static).
        return raise(unsafe { PyExc_RuntimeError }, "the hooks refused to lower the limit");
    }
    if let Some(lower) = allocator {
        let mut err = [0 as c_char; 256];
        // SAFETY: `err` has its length in writable bytes.
        if unsafe { lower(id, limit, err.as_mut_ptr(), err.len()) } < 0 {
            // SAFETY: on failure the API wrote a NUL-terminated message.
            let message = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
            // SAFETY: a CPython exception type (static).
            return raise(unsafe { PyExc_RuntimeError }, &message);
        }
    }
    // SAFETY: Py_None is immortal; the caller owns the reference.
    unsafe { Py_NewRef(Py_None()) }
}

/// The calling thread's Python stack as interheap's hooks read it inside an
/// allocator call (`interheap_cpython::stack`): a list of (filename,
/// qualified name, line), innermost first. It exists to show (and test, in
/// every kind of interpreter) what an allocation site will record.
unsafe extern "C" fn stack(_module: *mut PyObject, _unused: *mut PyObject) -> *mut PyObject {
    // SAFETY: a module function runs with its thread state attached.
    let captured = unsafe { interheap_cpython::stack::capture() };
    // SAFETY: (whole block) C API calls with a thread state attached; each
    // code object is borrowed from a frame that is still on the stack.
    unsafe {
        let list = PyList_New(0);
        if list.is_null() {
            return list;
        }
        for frame in captured.frames() {
            let filename = PyObject_GetAttrString(frame.code, c"co_filename".as_ptr());
            let name = PyObject_GetAttrString(frame.code, c"co_qualname".as_ptr());
            let line = PyLong_FromLong(frame.line().into());
            let item = if filename.is_null() || name.is_null() || line.is_null() {
                ptr::null_mut()
            } else {
                PyTuple_Pack(3, filename, name, line)
            };
            for o in [filename, name, line] {
                if !o.is_null() {
                    Py_DecRef(o);
                }
            }
            if item.is_null() || PyList_Append(list, item) < 0 {
                if !item.is_null() {
                    Py_DecRef(item);
                }
                Py_DecRef(list);
                return ptr::null_mut();
            }
            Py_DecRef(item);
        }
        list
    }
}

static mut METHODS: [PyMethodDef; 5] = [
    PyMethodDef {
        ml_name: c"interpreter_id".as_ptr(),
        ml_meth: PyMethodDefPointer { PyCFunction: interpreter_id },
        ml_flags: METH_NOARGS,
        ml_doc: c"interpreter_id()\n--\n\nThe ID of the interpreter that calls it.".as_ptr(),
    },
    PyMethodDef {
        ml_name: c"figures".as_ptr(),
        ml_meth: PyMethodDefPointer { PyCFunction: figures },
        ml_flags: METH_NOARGS,
        ml_doc:
            c"figures()\n--\n\nThis interpreter's figures per back end ('hooks', 'allocator'; None where \
                  absent): live_bytes, limit, refused, largest_refused, peak."
                .as_ptr(),
    },
    PyMethodDef {
        ml_name: c"lower_limit".as_ptr(),
        ml_meth: PyMethodDefPointer { PyCFunction: lower_limit },
        ml_flags: METH_O,
        ml_doc: c"lower_limit(size)\n--\n\nLowers this interpreter's limit (bytes, or text such as '64 MB') \
                  in every back end; ValueError if that would raise it."
            .as_ptr(),
    },
    PyMethodDef {
        ml_name: c"stack".as_ptr(),
        ml_meth: PyMethodDefPointer { PyCFunction: stack },
        ml_flags: METH_NOARGS,
        ml_doc:
            c"stack()\n--\n\nThe calling thread's Python stack as interheap reads it inside an \
                  allocator call, without running Python code: [(filename, qualname, line)], innermost first."
                .as_ptr(),
    },
    PyMethodDef::zeroed(),
];

const SLOTS_LEN: usize = 2 + cfg!(Py_GIL_DISABLED) as usize;

static mut SLOTS: [PyModuleDef_Slot; SLOTS_LEN] = [
    PyModuleDef_Slot { slot: Py_mod_multiple_interpreters, value: Py_MOD_PER_INTERPRETER_GIL_SUPPORTED },
    #[cfg(Py_GIL_DISABLED)]
    PyModuleDef_Slot { slot: Py_mod_gil, value: Py_MOD_GIL_NOT_USED },
    PyModuleDef_Slot { slot: 0, value: ptr::null_mut() },
];

static mut MODULE_DEF: PyModuleDef = PyModuleDef {
    m_base: PyModuleDef_HEAD_INIT,
    m_name: c"interheap_interp._core".as_ptr(),
    m_doc: c"An interpreter's own memory figures and limit (see interheap_interp).".as_ptr(),
    m_size: 0,
    // SAFETY: (both) addresses of statics that live as long as the module.
    m_methods: ptr::addr_of_mut!(METHODS).cast(),
    m_slots: ptr::addr_of_mut!(SLOTS).cast(),
    m_traverse: None,
    m_clear: None,
    m_free: None,
};

/// The module's init function: multi-phase (the definition, with its slots).
///
/// # Safety
///
/// Called by CPython's import machinery.
#[allow(non_snake_case)]
#[no_mangle]
pub unsafe extern "C" fn PyInit__core() -> *mut PyObject {
    // SAFETY: a static definition, initialised once by CPython.
    unsafe { PyModuleDef_Init(ptr::addr_of_mut!(MODULE_DEF)) }
}
