//! Sampled allocation sites, from the allocator hooks: the glue half of
//! `interheap_engine::sites` (which owns the sampling rule and the figures).
//!
//! A hook that allocated a block counts its size down from this thread's gap
//! ([`crate::hook_thread::HookEntry::sample_due`]); when the gap runs out it
//! reads the calling thread's Python stack ([`crate::stack`]: from the
//! frames, without running Python code or allocating through CPython) as
//! code locations, and records the block; the engine's code cache asks
//! [`CodeNames`] for the text of locations it has not seen. A free first
//! asks the engine's filter whether the block may be a sample or a cached
//! code object. Sampling is off until [`start`]; the hooks then pay one load
//! per allocation and per free.
//!
//! The code cache is told of every free the hooks see (`hooks::forget_sample`),
//! and emptied ([`forget_code`]) when the hooks are removed or installed
//! again, and when an interpreter ends: see the engine's module docs.

use interheap_engine::ledger::BucketId;
use std::sync::Arc;

use interheap_engine::sites::{CodeLocation, CodeReader, FrameText, Sites};
use interheap_engine::Domain;

use crate::stack;

/// The process's sampled sites (the hooks' back end).
pub static SITES: Sites = Sites::new();

/// Longest file or function name kept per frame, in bytes (longer ones are cut).
const NAME_CAP: usize = 512;

extern "C" {
    fn interheap_code_names(
        code: *mut pyo3_ffi::PyObject,
        file: *mut u8,
        file_len: *mut std::ffi::c_int,
        name: *mut u8,
        name_len: *mut std::ffi::c_int,
        cap: std::ffi::c_int,
    );
}

/// Starts sampling one allocation per `rate` bytes on average (0 stops it);
/// `seed`, if given, makes every thread's gaps repeatable (for tests).
pub fn start(rate: u64, seed: Option<u64>) {
    crate::hook_thread::set_sample_seed(seed);
    SITES.set_rate(rate);
    // Sampling takes the hooks off their fast path (one flag tells them).
    crate::hooks::TRACKER.set_glue_work(rate != 0);
}

/// Empties the sites' code cache: frees may go unseen (hooks removed or
/// replaced), or an interpreter's memory went away without them.
pub fn forget_code() {
    SITES.forget_code();
}

/// Where the live block at `address` was allocated, if it was sampled
/// (empty otherwise): for the checker's findings.
pub fn allocation_stack(address: usize) -> Vec<FrameText> {
    SITES.live_stack(address).map(|stack| stack.to_vec()).unwrap_or_default()
}

/// Records the block a hook just allocated as a sample: `size` bytes at
/// `address`, in `owner`'s `domain`, with the calling thread's stack.
#[cold]
#[inline(never)]
pub fn sample(address: usize, owner: BucketId, domain: Domain, size: usize) {
    // SAFETY: called from a hook, where a current thread state is attached
    // (CPython calls the allocator with it), so its frames hold still.
    let captured = unsafe { stack::capture() };
    let mut locations = [CodeLocation { code: 0, stamp: 0, offset: 0 }; stack::MAX_FRAMES];
    let mut n = 0;
    for frame in captured.frames() {
        locations[n] = CodeLocation { code: frame.code as usize, stamp: frame.stamp, offset: frame.offset };
        n += 1;
    }
    SITES.record_located(address, owner, domain, size, &locations[..n], &mut CodeNames);
}

/// Reads a code object's names and lines for the engine's code cache. The
/// engine calls it, under its lock, only with the locations [`sample`] just
/// captured, whose code objects are live (their frames are on the stack).
struct CodeNames;

impl CodeReader for CodeNames {
    fn names(&mut self, code: usize) -> (Arc<str>, Arc<str>) {
        // SAFETY: a live code object (see the type's docs).
        unsafe { code_names(code as *mut pyo3_ffi::PyObject) }
    }

    fn line(&mut self, code: usize, offset: i32) -> i32 {
        // SAFETY: a live code object (see the type's docs).
        unsafe { stack::code_line(code as *mut pyo3_ffi::PyObject, offset) }
    }
}

/// A code object's file name and qualified name, as text (UTF-8, cut at
/// 512 bytes each).
///
/// # Safety
///
/// `code` is a live code object.
unsafe fn code_names(code: *mut pyo3_ffi::PyObject) -> (Arc<str>, Arc<str>) {
    let mut file = [0u8; NAME_CAP];
    let mut name = [0u8; NAME_CAP];
    let (mut file_len, mut name_len) = (0, 0);
    // SAFETY: `code` is live (the contract); the buffers hold NAME_CAP bytes each.
    unsafe {
        interheap_code_names(
            code,
            file.as_mut_ptr(),
            &mut file_len,
            name.as_mut_ptr(),
            &mut name_len,
            NAME_CAP as std::ffi::c_int,
        )
    };
    let text = |buf: &[u8], len: std::ffi::c_int| -> Arc<str> {
        String::from_utf8_lossy(&buf[..(len.max(0) as usize).min(NAME_CAP)]).into()
    };
    (text(&file, file_len), text(&name, name_len))
}

/// The calling thread's innermost Python frame as text (None: no attached
/// thread state, or no frame). Reads the code object each time (about a
/// thousand instructions): for the checker, which keeps where a block was
/// freed.
pub fn innermost_frame_text() -> Option<FrameText> {
    // SAFETY: called inside an allocator call: a current thread state, if
    // any, is attached, so its frames hold still during the call.
    let frame = unsafe { stack::innermost() }?;
    // SAFETY: the frame is on the stack, so its code object is live.
    let ((file, name), line) = unsafe { (code_names(frame.code), frame.line()) };
    Some(FrameText { file, name, line })
}

/// A captured stack as text: each frame's file, function and line, copied
/// out of its code object (for callers that keep the text, such as the
/// checker's findings; sampling goes through the code cache instead).
pub(crate) fn frames_text(captured: &stack::Stack) -> Vec<FrameText> {
    captured
        .frames()
        .map(|frame| {
            // SAFETY: the code object is borrowed from a frame that holds
            // still while the stack is read (capture's contract).
            let ((file, name), line) = unsafe { (code_names(frame.code), frame.line()) };
            FrameText { file, name, line }
        })
        .collect()
}
