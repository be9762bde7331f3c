//! Sampled allocation sites, from the allocator hooks: the glue half of
//! `interheap_engine::sites` (which owns the sampling rule and the figures).
//!
//! A hook that allocated a block counts its size down from this thread's gap
//! ([`crate::hook_thread::HookEntry::sample_due`]); when the gap runs out it
//! reads the calling thread's Python stack ([`crate::stack`]: from the
//! frames, without running Python code or allocating through CPython),
//! turns it into text and records the block. A free first asks the engine's
//! filter whether the block may be a sample. Sampling is off until
//! [`start`]; the hooks then pay one load per allocation and per free.

use interheap_engine::ledger::BucketId;
use interheap_engine::sites::{FrameText, Sites};
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
}

/// Records the block a hook just allocated as a sample: `size` bytes at
/// `address`, in `owner`'s `domain`, with the calling thread's stack.
#[cold]
#[inline(never)]
pub fn sample(address: usize, owner: BucketId, domain: Domain, size: usize) {
    // SAFETY: called from a hook, where a current thread state is attached
    // (CPython calls the allocator with it), so its frames hold still.
    let frames = frames_text(&unsafe { stack::capture() });
    SITES.record(address, owner, domain, size, frames);
}

/// A captured stack as text: each frame's file, function and line, copied
/// out of its code object (UTF-8, cut at 512 bytes per name).
pub(crate) fn frames_text(captured: &stack::Stack) -> Vec<FrameText> {
    let mut frames = Vec::with_capacity(captured.len());
    let mut file = [0u8; NAME_CAP];
    let mut name = [0u8; NAME_CAP];
    for frame in captured.frames() {
        let (mut file_len, mut name_len) = (0, 0);
        // SAFETY: the code object is borrowed from a frame that holds still
        // while the stack is read (capture's contract); the buffers hold
        // NAME_CAP bytes each.
        unsafe {
            interheap_code_names(
                frame.code,
                file.as_mut_ptr(),
                &mut file_len,
                name.as_mut_ptr(),
                &mut name_len,
                NAME_CAP as std::ffi::c_int,
            )
        };
        let text = |buf: &[u8], len: std::ffi::c_int| -> Box<str> {
            String::from_utf8_lossy(&buf[..(len.max(0) as usize).min(NAME_CAP)]).into()
        };
        frames.push(FrameText { file: text(&file, file_len), name: text(&name, name_len), line: frame.line });
    }
    frames
}
