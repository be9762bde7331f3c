//! The calling thread's Python stack, read from inside an allocator call.
//!
//! A hook or the allocator may not run Python code, create objects, take
//! CPython's locks or allocate through CPython: any of those can re-enter
//! the allocator or deadlock. So the stack is read the way CPython's own
//! tracemalloc reads it: from the interpreter's frame structs, with the
//! helpers of CPython's internal headers (`pycore_frame.h`, 3.14's
//! `pycore_interpframe.h`), compiled per interpreter (`src/stack.c`, built
//! by `build.rs` against the target's installed headers). Per version:
//!
//! * the innermost frame: `tstate->cframe->current_frame` (3.12),
//!   `tstate->current_frame` (3.13+);
//! * each frame's code: `frame->f_code` (3.12), `_PyFrame_GetCode` (3.13+,
//!   `f_executable`, a stack reference on 3.14);
//! * its line: `PyUnstable_InterpreterFrame_GetLine` (public unstable API,
//!   3.12+), which reads the code's line table and allocates nothing;
//! * frames owned by the C stack (entry shims) and frames not started yet
//!   are skipped (`_PyFrame_IsIncomplete`), as tracemalloc does.
//!
//! Code objects come back borrowed: they live as long as their frame is on
//! the stack. A caller that keeps one past the call takes a reference
//! (`Py_IncRef`, no allocation) and drops it with its interpreter's GIL held.

use std::ffi::c_int;

use pyo3_ffi as ffi;

extern "C" {
    fn interheap_stack_capture(
        tstate: *mut ffi::PyThreadState,
        codes: *mut *mut ffi::PyObject,
        lines: *mut c_int,
        max: c_int,
    ) -> c_int;
}

/// One frame of a captured stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The frame's code object (borrowed; see the module docs).
    pub code: *mut ffi::PyObject,
    /// The line being run, or -1 if CPython cannot tell.
    pub line: i32,
}

/// The most frames a capture keeps (the innermost ones).
pub const MAX_FRAMES: usize = 64;

/// A captured stack, innermost frame first; no heap allocation.
pub struct Stack {
    codes: [*mut ffi::PyObject; MAX_FRAMES],
    lines: [c_int; MAX_FRAMES],
    len: usize,
}

impl Stack {
    /// The frames, innermost first.
    pub fn frames(&self) -> impl Iterator<Item = Frame> + '_ {
        self.codes[..self.len].iter().zip(&self.lines[..self.len]).map(|(&code, &line)| Frame { code, line })
    }

    /// How many frames were captured.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no frame was captured (no thread state, or no Python frame).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The calling thread's stack, up to [`MAX_FRAMES`] innermost frames; empty
/// without an attached thread state.
///
/// # Safety
///
/// If the calling thread has a current thread state it is attached (the
/// caller is inside a call CPython made with it, or holds the GIL), so its
/// frames cannot change during the call.
pub unsafe fn capture() -> Stack {
    // SAFETY: PyThreadState_GetUnchecked only reads a thread-local.
    let tstate = unsafe { ffi::compat::PyThreadState_GetUnchecked() };
    // SAFETY: the caller's contract is this function's.
    unsafe { capture_from(tstate) }
}

/// The stack of `tstate` (null: empty), up to [`MAX_FRAMES`] innermost frames.
///
/// # Safety
///
/// `tstate` is null or a live thread state whose frames cannot change during
/// the call: the calling thread's own, attached or detached (a thread that
/// released the GIL is running C code, so its Python frames hold still).
pub unsafe fn capture_from(tstate: *mut ffi::PyThreadState) -> Stack {
    let mut stack = Stack { codes: [std::ptr::null_mut(); MAX_FRAMES], lines: [0; MAX_FRAMES], len: 0 };
    if tstate.is_null() {
        return stack;
    }
    // SAFETY: `tstate` is live and its frames hold still (the contract); the
    // arrays hold MAX_FRAMES entries each.
    let n = unsafe {
        interheap_stack_capture(
            tstate,
            stack.codes.as_mut_ptr(),
            stack.lines.as_mut_ptr(),
            MAX_FRAMES as c_int,
        )
    };
    stack.len = n.clamp(0, MAX_FRAMES as c_int) as usize;
    stack
}
