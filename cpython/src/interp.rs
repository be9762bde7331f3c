//! Finding the calling thread's interpreter from inside an allocator hook.
//!
//! Only calls that never block and never allocate are used:
//! `PyThreadState_GetUnchecked` (`_PyThreadState_UncheckedGet` on 3.12, via
//! pyo3-ffi's compat shim), `PyThreadState_GetInterpreter` and
//! `PyInterpreterState_GetID`. A NULL thread state is normal (raw calls
//! without a thread state, pre-init, finalization, released-GIL regions,
//! threads Python never saw) and yields `None`.

use pyo3_ffi as ffi;

/// The ID of the interpreter whose thread state is current on this thread,
/// or `None` if the thread has no current thread state.
#[inline]
pub fn current_interpreter_id() -> Option<i64> {
    current_interpreter().map(|(id, _)| id)
}

/// The current thread state's interpreter, as its ID and its address (the
/// address only identifies it while it is alive: key by the ID, fact 6).
#[inline(always)]
pub fn current_interpreter() -> Option<(i64, *mut ffi::PyInterpreterState)> {
    // SAFETY: PyThreadState_GetUnchecked only reads a thread-local; it is
    // documented to be callable without an attached thread state.
    let tstate = unsafe { ffi::compat::PyThreadState_GetUnchecked() };
    if tstate.is_null() {
        return None;
    }
    // SAFETY: `tstate` is the current thread's own thread state, which cannot
    // be freed while this thread is using it; the call only reads a field.
    let interp = unsafe { ffi::PyThreadState_GetInterpreter(tstate) };
    if interp.is_null() {
        return None;
    }
    // SAFETY: `interp` is non-NULL and outlives the thread states bound to it;
    // for a non-NULL argument the call only reads the ID (no error, no allocation).
    let id = unsafe { ffi::PyInterpreterState_GetID(interp) };
    (id >= 0).then_some((id, interp))
}
