//! A Rust `#[global_allocator]` that puts a Python extension's (or an
//! embedding program's) Rust allocations in CPython's raw allocator domain,
//! so that `tracemalloc`, memray and interheap see them, without ever
//! deadlocking or crashing the way a plain `PyMem_RawMalloc` allocator does.
//!
//! ```no_run
//! #[global_allocator]
//! static ALLOC: interheap_pyalloc::PyRawAlloc = interheap_pyalloc::PyRawAlloc::new();
//! # fn main() {}
//! ```
//!
//! It works before `Py_Initialize`, after `Py_Finalize`, on threads Python
//! never saw, on default and free-threaded builds (3.12 and later), and for
//! every [`Layout`], including alignments far above what `malloc` gives.
//!
//! # Routes
//!
//! Each call picks a route without blocking:
//!
//! * **Python** (`PyMem_RawMalloc`, `PyMem_RawCalloc`, `PyMem_RawRealloc`,
//!   `PyMem_RawFree`) when the calling thread has an *attached* thread state
//!   that is also its `PyGILState` thread state, and no call of ours on this
//!   thread is already inside the Python route.
//! * **Fallback** (libc `malloc`, `calloc`, `realloc`, `free`) otherwise: a
//!   detached thread (inside `Python::detach` / `Py_BEGIN_ALLOW_THREADS`), a
//!   thread Python never saw, before `Py_Initialize`, during and after
//!   finalisation once the thread state is gone. These blocks are invisible
//!   to Python's tools; [`stats`] counts them.
//!
//! Every block carries a one-word header with its route (see `layout.rs`),
//! and is freed and resized by that route whatever happened since:
//!
//! | block    | thread attached                     | thread not attached                                   |
//! |----------|-------------------------------------|-------------------------------------------------------|
//! | Python   | `PyMem_RawFree` / `PyMem_RawRealloc` | free: parked, then `PyMem_RawFree` by the next attached call; realloc: new fallback block, copy, old one parked |
//! | Fallback | `free` / `realloc`                  | `free` / `realloc`                                    |
//!
//! Alignments above two words are moved on `realloc` (allocate, copy, free).
//!
//! # Why this never deadlocks, and why Python is never called detached
//!
//! Facts about CPython 3.12 to 3.14, checked in `Python/tracemalloc.c` and
//! `Objects/obmalloc.c` and in the machine code of 3.12.1, 3.13.0 and
//! 3.13.15t (free-threaded):
//!
//! 1. tracemalloc's raw `malloc`, `calloc` and `realloc` hooks call
//!    `PyGILState_Ensure` before recording a trace (gh-155725, fixed in
//!    3.15). On a thread whose thread state is attached and is its gilstate
//!    thread state, that call only increments a counter. On any other thread
//!    it waits for the GIL: if the GIL's holder waits for this thread, the
//!    process hangs (PyO3 #6268). Free-threaded builds hang too: on a thread
//!    with no thread state it creates one, and on 3.13t creating the first
//!    extra thread state stops the world, which waits for every attached
//!    thread to pause (seen in `_PyGC_ImmortalizeDeferredObjects`).
//! 2. tracemalloc's `free` hook takes only tracemalloc's table lock, never
//!    the GIL. Holders of that lock do brief work and wait for nothing, with
//!    one exception: in 3.13.15 (not 3.13.0) `tracemalloc.stop()` holds it
//!    across `PyMem_SetAllocator`, whose mutex, if another thread is inside
//!    `PyMem_GetAllocator`/`PyMem_SetAllocator` at that moment, releases and
//!    retakes the GIL. That stalls every traced allocation, CPython's own
//!    included; this crate never calls either function, so it never causes it.
//! 3. `PyMem_Raw*` read the installed allocator (`ctx` and function
//!    pointers) without synchronisation, while `PyMem_SetAllocator`, which
//!    `tracemalloc.start()` and `stop()` call, rewrites it field by field. A
//!    thread that reads it mid-write calls tracemalloc's hook with the
//!    default allocator's NULL `ctx` and crashes. Three threads calling
//!    `PyMem_RawFree` without a thread state while a fourth toggles
//!    tracemalloc crash 3.12.1 in `tracemalloc_free(ctx=NULL)` within 2,000
//!    toggles. On a default build the writer holds the main interpreter's
//!    GIL, so no thread attached to the main interpreter runs meanwhile.
//! 4. There is no try-lock for the GIL, and tracemalloc can start between
//!    any check and the call that follows it; so whether a detached thread's
//!    raw call would block or crash cannot be decided without blocking.
//!
//! Hence the rule: **a thread calls `PyMem_Raw*` (all four) only while it
//! holds the Python route's conditions above.** Then:
//!
//! * *No new wait.* On the Python route, tracemalloc's `PyGILState_Ensure`
//!   does not wait (fact 1) and its table lock is held only briefly by
//!   threads that wait for nothing (fact 2). Our call waits for exactly what
//!   a `PyMem_RawMalloc` made by CPython itself on this thread at this
//!   moment would wait for. Every other path calls only libc and atomics
//!   (the deferred list is a lock-free stack; a thread's first call and its
//!   exit take the counters' spinlock, whose holders never call Python), so
//!   it waits for nothing Python holds. The deadlock of #6268 needs a detached or foreign thread
//!   to wait for the GIL; none of ours ever does.
//! * *No torn read of our making.* Detached threads never read the raw
//!   allocator (fact 3); they park Python blocks instead of freeing them.
//! * *Right route.* The header names the route, so a block goes back to the
//!   allocator that made it. Changes in between are harmless: PEP 445
//!   requires an allocator installed after `Py_Initialize` to wrap the one
//!   before, so `PyMem_RawFree` now frees what `PyMem_RawMalloc` returned
//!   then (tracemalloc forwards frees of blocks it never traced; interheap
//!   counts them as untracked frees).
//! * *Nested calls.* If a raw-domain hook itself runs Rust code that uses
//!   this allocator, its calls take the fallback instead of recursing.
//!
//! # Attribution
//!
//! Python-route blocks go through the raw domain on a thread attached to an
//! interpreter, so interheap's hooks charge them to that interpreter's raw
//! figures and tracemalloc traces them with the Python stack that made
//! them. Fallback blocks never reach Python: they are in [`stats`], and
//! nowhere in Python's tools.
//!
//! # Limits
//!
//! * A parked free waits for the next attached call of this allocator on any
//!   thread (or [`flush_deferred`]); until then tracemalloc still counts the
//!   block. Blocks parked when Python is finalized wait for a new
//!   `Py_Initialize` or the end of the process.
//! * Free-threaded builds: `tracemalloc.start()` and `stop()` race with every
//!   thread's allocations, CPython's own included (fact 3 without a GIL);
//!   CPython itself crashes if other threads allocate while tracemalloc is
//!   toggled. Isolated subinterpreters (own GIL) race with the main
//!   interpreter's tracemalloc toggles in the same way on default builds.
//! * 3.15 fixes fact 1 (gh-155725); this crate still sends detached calls to
//!   the fallback there, because fact 3 still holds.
//! * The stable ABI (`abi3`) is not supported: the thread-state functions
//!   the route needs are not in the limited API.

#![warn(missing_docs)]

#[cfg(Py_LIMITED_API)]
compile_error!(
    "interheap-pyalloc does not support the stable ABI (abi3): it needs \
     PyThreadState_GetUnchecked and PyMem_Raw*, which are not in the limited API. \
     Build the extension for a specific CPython version."
);
#[cfg(any(PyPy, GraalPy))]
compile_error!("interheap-pyalloc supports CPython only (it routes through CPython's PyMem_Raw* domain).");

// Everything that calls CPython is left out of refused builds, so the
// refusal above is the only error they see.
#[cfg(not(any(Py_LIMITED_API, PyPy, GraalPy)))]
mod deferred;
mod layout;
#[cfg(not(any(Py_LIMITED_API, PyPy, GraalPy)))]
mod route;
mod stats;
mod thread;
#[cfg(feature = "workload")]
#[doc(hidden)]
pub mod workload;

#[cfg(not(any(Py_LIMITED_API, PyPy, GraalPy)))]
use {
    layout::{Backend, Resized, Route},
    route::{Attached, Fallback, Python},
    stats::Counters,
    std::alloc::{GlobalAlloc, Layout},
    std::ptr,
    thread::ThreadState,
};

pub use stats::{DeferredStats, RouteStats, Stats};

/// The global allocator. Declare it once in the final artifact (the
/// extension module's or the embedding program's crate):
///
/// ```no_run
/// #[global_allocator]
/// static ALLOC: interheap_pyalloc::PyRawAlloc = interheap_pyalloc::PyRawAlloc::new();
/// # fn main() {}
/// ```
///
/// It can also be called directly through [`GlobalAlloc`]; its blocks carry
/// a header, so they must be freed by this allocator, never by another.
#[derive(Clone, Copy, Debug, Default)]
pub struct PyRawAlloc {
    _private: (),
}

impl PyRawAlloc {
    /// The allocator. It has no state of its own: all instances are the same.
    pub const fn new() -> Self {
        PyRawAlloc { _private: () }
    }
}

#[cfg(not(any(Py_LIMITED_API, PyPy, GraalPy)))]
/// The right to use the Python route on this thread, after freeing whatever
/// detached threads parked.
#[inline]
fn attach(thread: &ThreadState) -> Option<Attached<'_>> {
    let attached = Attached::enter(thread)?;
    deferred::drain(&attached);
    Some(attached)
}

#[cfg(not(any(Py_LIMITED_API, PyPy, GraalPy)))]
#[inline]
unsafe fn allocate(
    mine: &Counters,
    attached: Option<&Attached<'_>>,
    size: usize,
    align: usize,
    zeroed: bool,
) -> *mut u8 {
    match attached {
        Some(attached) => {
            // SAFETY: `attached` allows the Python route; `align` comes from a Layout.
            let p = unsafe { layout::allocate(&Python::new(attached), size, align, zeroed) };
            if !p.is_null() {
                stats::allocated(mine, Route::Python, size);
            }
            p
        }
        None => {
            // SAFETY: the fallback may be called anywhere; `align` comes from a Layout.
            let p = unsafe { layout::allocate(&Fallback, size, align, zeroed) };
            if !p.is_null() {
                stats::allocated(mine, Route::Fallback, size);
            }
            p
        }
    }
}

#[cfg(not(any(Py_LIMITED_API, PyPy, GraalPy)))]
/// Gives the live block at `user` (asked with `size` bytes) back to its route.
#[inline]
unsafe fn release(mine: &Counters, attached: Option<&Attached<'_>>, user: *mut u8, size: usize) {
    // SAFETY: the caller passes a live block of this allocator.
    let block = unsafe { layout::block_of(user) };
    match (block.route, attached) {
        (Route::Fallback, _) => {
            // SAFETY: a fallback block, given up by its owner.
            unsafe { Fallback.free(block.base) };
            stats::freed(mine, Route::Fallback, size);
        }
        (Route::Python, Some(attached)) => {
            // SAFETY: a Python block; `attached` allows `PyMem_RawFree`.
            unsafe { Python::new(attached).free(block.base) };
            stats::freed(mine, Route::Python, size);
        }
        (Route::Python, None) => {
            // SAFETY: a Python block, given up by its owner.
            unsafe { deferred::park(mine, block.base, size) };
        }
    }
}

#[cfg(not(any(Py_LIMITED_API, PyPy, GraalPy)))]
// SAFETY: every block is placed inside memory its backend returned, aligned
// to its layout (layout.rs), returned to that backend exactly once (by
// `release`, `resize_in_place` or the deferred drain), and the Python backend
// is only called under `Attached`. Nothing here unwinds.
unsafe impl GlobalAlloc for PyRawAlloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let t = thread::current();
        // SAFETY: forwarded from a Layout.
        unsafe { allocate(&t.counters, attach(t).as_ref(), layout.size(), layout.align(), false) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let t = thread::current();
        // SAFETY: forwarded from a Layout.
        unsafe { allocate(&t.counters, attach(t).as_ref(), layout.size(), layout.align(), true) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let t = thread::current();
        // SAFETY: GlobalAlloc's contract: `ptr` is a live block of ours.
        unsafe { release(&t.counters, attach(t).as_ref(), ptr, layout.size()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let t = thread::current();
        let mine = &t.counters;
        let attached = attach(t);
        let (old_size, align) = (layout.size(), layout.align());
        // SAFETY: GlobalAlloc's contract: `ptr` is a live block of ours.
        let block = unsafe { layout::block_of(ptr) };
        let resized = match (block.route, attached.as_ref()) {
            // SAFETY: a fallback block, resized by the fallback.
            (Route::Fallback, _) => unsafe {
                layout::resize_in_place(&Fallback, block, old_size, align, new_size)
            },
            // SAFETY: a Python block, resized by Python under `attached`.
            (Route::Python, Some(a)) => unsafe {
                layout::resize_in_place(&Python::new(a), block, old_size, align, new_size)
            },
            (Route::Python, None) => Resized::MustMove,
        };
        match resized {
            Resized::Done(p) => {
                stats::resized(mine, block.route, old_size, new_size);
                p
            }
            Resized::Failed => ptr::null_mut(),
            Resized::MustMove => {
                // SAFETY: `align` comes from a Layout.
                let new = unsafe { allocate(mine, attached.as_ref(), new_size, align, false) };
                if new.is_null() {
                    return new;
                }
                // SAFETY: both blocks are live, distinct, and hold at least
                // `min(old, new)` bytes.
                unsafe { ptr::copy_nonoverlapping(ptr, new, old_size.min(new_size)) };
                if block.route == Route::Python && attached.is_none() {
                    stats::moved_to_fallback(mine);
                }
                // SAFETY: the old block is live and given up.
                unsafe { release(mine, attached.as_ref(), ptr, old_size) };
                new
            }
        }
    }
}

/// The allocator's counters, summed over all threads: what each route holds
/// and what waits on the deferred list. It takes a short lock (the one
/// threads take when they first allocate and when they exit) and walks the
/// live threads' counters; while other threads allocate, it is a recent
/// picture, not an instant one.
pub fn stats() -> Stats {
    stats::snapshot()
}

#[cfg(not(any(Py_LIMITED_API, PyPy, GraalPy)))]
/// Frees the Python-route blocks that threads without an attached thread
/// state have parked, if the calling thread may use the Python route now.
/// Returns how many were freed, or `None` if this thread may not (they stay
/// parked; any attached call of this allocator frees them too).
pub fn flush_deferred() -> Option<usize> {
    let attached = Attached::enter(thread::current())?;
    Some(deferred::drain(&attached))
}

#[cfg(not(any(Py_LIMITED_API, PyPy, GraalPy)))]
/// Whether an allocation made now, on this thread, would take the Python route.
pub fn routes_to_python() -> bool {
    Attached::enter(thread::current()).is_some()
}
