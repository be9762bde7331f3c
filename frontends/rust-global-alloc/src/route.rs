//! When a call may go to Python's raw allocator, and the two backends.
//!
//! [`Attached::enter`] is the only way to obtain the right to call
//! `PyMem_Raw*`; the crate docs give the argument for its conditions. It
//! never blocks and never allocates: it reads the thread-state
//! thread-locals through `PyThreadState_GetUnchecked` and
//! `PyGILState_GetThisThreadState`, and a thread-local flag of ours.

use pyo3_ffi as ffi;

use crate::layout::{Backend, Route};
use crate::thread::ThreadState;

/// Proof that this thread may call `PyMem_Raw*` now without any chance of
/// blocking, and that no other call of ours on this thread is doing so.
/// While it lives, the thread's `in_python_route` flag is set, so a nested
/// call (a raw-domain hook running Rust code that uses this allocator) takes
/// the fallback instead of recursing into Python. Not `Send`: it describes
/// the thread that made it.
pub(crate) struct Attached<'t> {
    thread: &'t ThreadState,
}

impl<'t> Attached<'t> {
    /// `Some` when all of these hold for the calling thread:
    ///
    /// 1. it has an attached thread state (`PyThreadState_GetUnchecked()` is
    ///    non-NULL: since 3.12 the current-thread-state thread-local is NULL
    ///    whenever the thread state is detached, before `Py_Initialize`,
    ///    after the thread state is deleted and on threads Python never saw);
    /// 2. that thread state is the one `PyGILState_Ensure` would use on this
    ///    thread (`PyGILState_GetThisThreadState()`), so tracemalloc's
    ///    `PyGILState_Ensure` only bumps a counter. They differ on a thread
    ///    that switched into another interpreter's thread state; there
    ///    `PyGILState_Ensure` would try to take the other interpreter's GIL;
    /// 3. no call of ours on this thread is already inside the Python route.
    #[inline]
    pub(crate) fn enter(thread: &'t ThreadState) -> Option<Attached<'t>> {
        // SAFETY: reads the current-thread-state thread-local; documented to
        // be callable with no thread state, and it neither blocks nor allocates.
        let tstate = unsafe { ffi::compat::PyThreadState_GetUnchecked() };
        if tstate.is_null() {
            return None;
        }
        if thread.in_python_route.replace(true) {
            return None; // nested: the outer call keeps the flag and clears it
        }
        let guard = Attached { thread };
        // SAFETY: the thread has an attached thread state, so the runtime and
        // its gilstate thread-local key exist; the call reads that key only.
        if unsafe { ffi::PyGILState_GetThisThreadState() } != tstate {
            return None; // `guard` drops here and clears the flag
        }
        Some(guard)
    }
}

impl<'t> Attached<'t> {
    /// The state of the thread this token belongs to.
    #[inline]
    pub(crate) fn thread(&self) -> &'t ThreadState {
        self.thread
    }
}

impl Drop for Attached<'_> {
    #[inline]
    fn drop(&mut self) {
        self.thread.in_python_route.set(false);
    }
}

/// `PyMem_Raw*`. Every method requires an [`Attached`] token, which is how
/// the type system keeps the rule "Python's allocator only when attached".
pub(crate) struct Python<'a> {
    _attached: &'a Attached<'a>,
}

impl<'a> Python<'a> {
    #[inline]
    pub(crate) fn new(attached: &'a Attached<'a>) -> Self {
        Python { _attached: attached }
    }
}

impl Backend for Python<'_> {
    const ROUTE: Route = Route::Python;
    #[inline]
    unsafe fn malloc(&self, n: usize) -> *mut u8 {
        // SAFETY: the thread is attached (we hold `Attached`); the raw domain
        // is thread-safe and `n` is any size.
        unsafe { ffi::PyMem_RawMalloc(n).cast() }
    }
    #[inline]
    unsafe fn calloc(&self, n: usize) -> *mut u8 {
        // SAFETY: as `malloc`.
        unsafe { ffi::PyMem_RawCalloc(1, n).cast() }
    }
    #[inline]
    unsafe fn realloc(&self, p: *mut u8, n: usize) -> *mut u8 {
        // SAFETY: as `malloc`; the caller passes a live block of this route.
        unsafe { ffi::PyMem_RawRealloc(p.cast(), n).cast() }
    }
    #[inline]
    unsafe fn free(&self, p: *mut u8) {
        // SAFETY: as `malloc`; the caller passes a live block of this route.
        unsafe { ffi::PyMem_RawFree(p.cast()) }
    }
}

/// The C library's allocator: callable from any thread at any time, never
/// waits for Python.
pub(crate) struct Fallback;

impl Backend for Fallback {
    const ROUTE: Route = Route::Fallback;
    #[inline]
    unsafe fn malloc(&self, n: usize) -> *mut u8 {
        // SAFETY: plain C allocation.
        unsafe { libc::malloc(n).cast() }
    }
    #[inline]
    unsafe fn calloc(&self, n: usize) -> *mut u8 {
        // SAFETY: plain C allocation.
        unsafe { libc::calloc(1, n).cast() }
    }
    #[inline]
    unsafe fn realloc(&self, p: *mut u8, n: usize) -> *mut u8 {
        // SAFETY: `p` came from this backend (the caller read its header).
        unsafe { libc::realloc(p.cast(), n).cast() }
    }
    #[inline]
    unsafe fn free(&self, p: *mut u8) {
        // SAFETY: `p` came from this backend (the caller read its header).
        unsafe { libc::free(p.cast()) }
    }
}
