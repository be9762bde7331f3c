//! Everything the allocator keeps per thread, in one thread-local, so a call
//! looks it up once (in an extension module each thread-local lookup is a
//! call to `__tls_get_addr`).
//!
//! The thread-local is const-initialised and has no destructor: touching it
//! never allocates and still works while the thread is being torn down.

use std::cell::Cell;

use crate::stats::Counters;

pub(crate) struct ThreadState {
    /// Set while a call of ours on this thread holds `route::Attached`.
    pub(crate) in_python_route: Cell<bool>,
    /// This thread's counters (see `stats.rs`).
    pub(crate) counters: Counters,
}

thread_local! {
    static STATE: ThreadState = const {
        ThreadState { in_python_route: Cell::new(false), counters: Counters::new() }
    };
}

/// The calling thread's state. `ThreadState` is not `Sync`, so the reference
/// cannot leave this thread, and the thread-local lives as long as the thread.
#[inline(always)]
pub(crate) fn current() -> &'static ThreadState {
    // SAFETY: the thread-local outlives every use on its own thread, and the
    // reference cannot be sent to another thread (`ThreadState: !Sync`).
    STATE.with(|s| unsafe { &*(s as *const ThreadState) })
}
