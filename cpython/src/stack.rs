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
//! * its instruction's byte offset: `_PyInterpreterFrame_LASTI` (what
//!   `PyUnstable_InterpreterFrame_GetLine` reads), and the line, when asked
//!   for, from `PyCode_Addr2Line` (public API), which reads the code's line
//!   table and allocates nothing ([`Frame::line`]);
//! * a stamp of the code object (its file name, qualified name and line
//!   table objects' addresses and its first line), which the sites' code
//!   cache compares to tell a code object from a later one at its address;
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
        offsets: *mut c_int,
        stamps: *mut u64,
        max: c_int,
    ) -> c_int;
    fn interheap_code_line(code: *mut ffi::PyObject, offset: c_int) -> c_int;
}

/// One frame of a captured stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The frame's code object (borrowed; see the module docs).
    pub code: *mut ffi::PyObject,
    /// The byte offset of the instruction being run.
    pub offset: i32,
    /// A stamp of the code object (nonzero; see the module docs).
    pub stamp: u64,
}

impl Frame {
    /// The line being run, or -1 if CPython cannot tell.
    ///
    /// # Safety
    ///
    /// The frame's code object is still live: its frame is still on the
    /// stack (the capture's contract), or the caller holds a reference.
    pub unsafe fn line(&self) -> i32 {
        // SAFETY: the code object is live (the contract); the call reads its
        // line table and allocates nothing.
        unsafe { code_line(self.code, self.offset) }
    }
}

/// The line of the instruction at byte `offset` in `code`, or -1.
///
/// # Safety
///
/// `code` is a live code object.
pub unsafe fn code_line(code: *mut ffi::PyObject, offset: i32) -> i32 {
    // SAFETY: the caller's contract.
    unsafe { interheap_code_line(code, offset) }
}

/// The most frames a capture keeps (the innermost ones).
pub const MAX_FRAMES: usize = 64;

/// A captured stack, innermost frame first; no heap allocation.
pub struct Stack {
    codes: [*mut ffi::PyObject; MAX_FRAMES],
    offsets: [c_int; MAX_FRAMES],
    stamps: [u64; MAX_FRAMES],
    len: usize,
}

impl Stack {
    /// The frames, innermost first.
    pub fn frames(&self) -> impl Iterator<Item = Frame> + '_ {
        let n = self.len;
        (0..n).map(|i| Frame { code: self.codes[i], offset: self.offsets[i], stamp: self.stamps[i] })
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
    let mut stack = Stack {
        codes: [std::ptr::null_mut(); MAX_FRAMES],
        offsets: [0; MAX_FRAMES],
        stamps: [0; MAX_FRAMES],
        len: 0,
    };
    if tstate.is_null() {
        return stack;
    }
    // SAFETY: `tstate` is live and its frames hold still (the contract); the
    // arrays hold MAX_FRAMES entries each.
    let n = unsafe {
        interheap_stack_capture(
            tstate,
            stack.codes.as_mut_ptr(),
            stack.offsets.as_mut_ptr(),
            stack.stamps.as_mut_ptr(),
            MAX_FRAMES as c_int,
        )
    };
    stack.len = n.clamp(0, MAX_FRAMES as c_int) as usize;
    stack
}

/// The calling thread's innermost Python frame, if it has an attached
/// thread state and a frame.
///
/// # Safety
///
/// As for [`capture`].
pub unsafe fn innermost() -> Option<Frame> {
    // SAFETY: PyThreadState_GetUnchecked only reads a thread-local.
    let tstate = unsafe { ffi::compat::PyThreadState_GetUnchecked() };
    if tstate.is_null() {
        return None;
    }
    let (mut code, mut offset, mut stamp) = (std::ptr::null_mut(), 0, 0);
    // SAFETY: `tstate` is the calling thread's attached state (the contract);
    // one slot each is room for the one frame asked for.
    let n = unsafe { interheap_stack_capture(tstate, &mut code, &mut offset, &mut stamp, 1) };
    (n == 1).then_some(Frame { code, offset, stamp })
}
