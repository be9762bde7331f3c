//! Helpers for the embedding tests and the benchmark: run Python code, read
//! tracemalloc's figures, detach from Python for a scope, and a watchdog
//! that turns a deadlock into a failure instead of a hang.
#![allow(dead_code)] // each binary uses a different subset

use std::ffi::CStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pyo3_ffi as ffi;

/// Runs `code` in `__main__`; the thread must be attached.
pub fn run(code: &CStr) {
    // SAFETY: the caller is attached; `code` is NUL-terminated.
    let rc = unsafe { ffi::PyRun_SimpleString(code.as_ptr()) };
    assert_eq!(rc, 0, "Python code failed: {code:?}");
}

/// `tracemalloc.get_traced_memory()[0]`; the thread must be attached.
pub fn traced_memory() -> usize {
    // SAFETY: the caller is attached; every object is checked and released.
    unsafe {
        let module = ffi::PyImport_ImportModule(c"tracemalloc".as_ptr());
        assert!(!module.is_null(), "import tracemalloc failed");
        let func = ffi::PyObject_GetAttrString(module, c"get_traced_memory".as_ptr());
        assert!(!func.is_null());
        let pair = ffi::PyObject_CallNoArgs(func);
        assert!(!pair.is_null());
        let current = ffi::PyLong_AsSize_t(ffi::PyTuple_GetItem(pair, 0));
        ffi::Py_DecRef(pair);
        ffi::Py_DecRef(func);
        ffi::Py_DecRef(module);
        current
    }
}

/// Detaches the calling thread from Python until dropped.
pub struct Detached(*mut ffi::PyThreadState);

impl Detached {
    pub fn new() -> Self {
        // SAFETY: the caller is attached; the state is restored on drop.
        Detached(unsafe { ffi::PyEval_SaveThread() })
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        // SAFETY: `self.0` is this thread's state, saved by `new`.
        unsafe { ffi::PyEval_RestoreThread(self.0) }
    }
}

/// Attaches the calling thread (creating a thread state if needed) until dropped.
pub struct Attached(ffi::PyGILState_STATE);

impl Attached {
    pub fn new() -> Self {
        // SAFETY: Python is initialised; released on drop.
        Attached(unsafe { ffi::PyGILState_Ensure() })
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        // SAFETY: pairs with `new` on the same thread.
        unsafe { ffi::PyGILState_Release(self.0) }
    }
}

/// Aborts the process if not dropped within `limit`: a deadlock fails the
/// test with a message instead of hanging the run.
pub struct Watchdog {
    done: std::sync::Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    pub fn new(what: &'static str, limit: Duration) -> Self {
        // Shared, not leaked, and joined on drop: LeakSanitizer sees every byte freed.
        let done = std::sync::Arc::new(AtomicBool::new(false));
        let started = std::sync::Arc::new(AtomicBool::new(false));
        let (flag, up) = (done.clone(), started.clone());
        let thread = std::thread::spawn(move || {
            // The thread's start-up (std's own allocations and frees, and
            // freeing the boxed closure) is over once this body runs.
            up.store(true, Ordering::Release);
            let start = Instant::now();
            while !flag.load(Ordering::Acquire) {
                if start.elapsed() > limit {
                    eprintln!("DEADLOCK: {what} did not finish within {limit:?}");
                    std::process::abort();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        // Callers measure allocations right after this returns: wait until
        // the thread no longer allocates or frees concurrently (without it,
        // embedded.rs's "before init" delta once saw the thread's 24-byte free).
        while !started.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(1));
        }
        Watchdog { done, thread: Some(thread) }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
