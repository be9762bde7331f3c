//! The allocator's own counters: what each route holds, and what waits on
//! the deferred list. They exist because the fallback route is invisible to
//! Python's tools, so users need some other way to see it.
//!
//! # Concurrency invariants
//!
//! * Each thread counts in its own [`Counters`] (in its `ThreadState`, a
//!   const-initialised thread-local with no destructor, so touching it never
//!   allocates and works during thread teardown). Only the owning thread writes them, with
//!   a plain load and store (no read-modify-write, no lock): a write is a
//!   `mov`. Other threads only read them.
//! * On unix a thread's counters join [`REGISTRY`] (an intrusive list under
//!   a spinlock) the first time it counts, and a pthread key destructor
//!   folds them into [`RETIRED`] and unlinks them when the thread exits,
//!   both under the lock, so a snapshot (also under the lock) counts every
//!   event exactly once. Events of threads not in the registry (on other
//!   platforms, or after a thread's counters were folded) go straight to
//!   [`RETIRED`] with atomic read-modify-writes.
//! * A block may be counted in on one thread and out on another, so one
//!   thread's figures mean nothing alone; only sums do. Writers publish with
//!   `Release`; a snapshot reads every outgoing counter (`Acquire`) before
//!   any incoming one, so anything it sees going out, it sees coming in.
//! * `fork()`: atfork handlers hold the lock across the fork, so the child
//!   never inherits it held. The child keeps the other threads' counters
//!   (their blocks exist in its memory too).

use std::cell::Cell;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

use crate::layout::Route;

/// Figures of one route, summed over every thread of the process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteStats {
    /// Blocks allocated (`alloc`, `alloc_zeroed`, and moves into this route).
    pub allocations: u64,
    /// Blocks resized in place by this route's `realloc`.
    pub reallocations: u64,
    /// Blocks given back to this route's allocator.
    pub frees: u64,
    /// `allocations - frees`.
    pub live_blocks: u64,
    /// Bytes callers asked for in the live blocks (no headers or padding).
    pub live_bytes: u64,
}

/// Blocks of the Python route freed on a thread with no attached thread
/// state, waiting for an attached call to hand them to `PyMem_RawFree`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeferredStats {
    /// Blocks waiting now. They are still counted live in [`Stats::python`]
    /// (Python's tools still see them), until they are really freed.
    pub pending_blocks: u64,
    /// Bytes callers asked for in the waiting blocks.
    pub pending_bytes: u64,
    /// Blocks ever deferred.
    pub deferred_frees: u64,
}

/// A snapshot of the allocator's counters (see [`crate::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Blocks from `PyMem_Raw*`: visible to tracemalloc, interheap, memray.
    pub python: RouteStats,
    /// Blocks from libc, made where Python's raw allocator could block or
    /// crash: invisible to Python's tools.
    pub fallback: RouteStats,
    /// Python blocks freed without a thread state, in waiting or done.
    pub deferred: DeferredStats,
    /// Python blocks resized on a thread with no attached thread state, and
    /// so moved to a new fallback block (the old block's free is deferred).
    pub moved_to_fallback: u64,
}

// Counter indices. "Out" counters come first: a snapshot reads them first.
const PY_FREES: usize = 0;
const PY_BYTES_OUT: usize = 1;
const FB_FREES: usize = 2;
const FB_BYTES_OUT: usize = 3;
const DEFERRED_OUT: usize = 4;
const DEFERRED_BYTES_OUT: usize = 5;
const OUTGOING: usize = 6;
const PY_ALLOCS: usize = 6;
const PY_REALLOCS: usize = 7;
const PY_BYTES_IN: usize = 8;
const FB_ALLOCS: usize = 9;
const FB_REALLOCS: usize = 10;
const FB_BYTES_IN: usize = 11;
const DEFERRED_IN: usize = 12;
const DEFERRED_BYTES_IN: usize = 13;
const MOVED: usize = 14;
const N: usize = 15;

/// One set of counters: a thread's own, or the shared [`RETIRED`] set.
pub(crate) struct Counters {
    c: [AtomicU64; N],
    /// Registry link (guarded by the registry lock).
    #[cfg(unix)]
    next: Cell<*const Counters>,
    #[cfg(unix)]
    prev: Cell<*const Counters>,
    /// 0: not registered yet, 1: registered, 2: folded (the thread is exiting).
    state: Cell<u8>,
}

impl Counters {
    pub(crate) const fn new() -> Self {
        Counters {
            c: [const { AtomicU64::new(0) }; N],
            #[cfg(unix)]
            next: Cell::new(std::ptr::null()),
            #[cfg(unix)]
            prev: Cell::new(std::ptr::null()),
            state: Cell::new(0),
        }
    }
}

// SAFETY: the atomics are shared by design; the `Cell`s of a thread's own
// set are written by that thread only while it registers or by the registry
// code under its lock (links), and the shared set never uses its `Cell`s.
unsafe impl Sync for Counters {}

/// Counts of threads that are gone, and of threads not in the registry.
static RETIRED: Counters = Counters::new();

/// Adds to the calling thread's counters `mine` (or to [`RETIRED`] if they
/// cannot be used).
#[inline(always)]
fn add<const K: usize>(mine: &Counters, pairs: [(usize, u64); K]) {
    if mine.state.get() != 1 && !registry::register(mine) {
        shared_add(&pairs);
        return;
    }
    for (i, n) in pairs {
        // Single writer: a plain load and store, published with Release.
        let cell = &mine.c[i];
        cell.store(cell.load(Relaxed).wrapping_add(n), Release);
    }
}

#[cold]
fn shared_add(pairs: &[(usize, u64)]) {
    for &(i, n) in pairs {
        RETIRED.c[i].fetch_add(n, Release);
    }
}

#[inline]
pub(crate) fn allocated(mine: &Counters, route: Route, size: usize) {
    match route {
        Route::Python => add(mine, [(PY_ALLOCS, 1), (PY_BYTES_IN, size as u64)]),
        Route::Fallback => add(mine, [(FB_ALLOCS, 1), (FB_BYTES_IN, size as u64)]),
    }
}

#[inline]
pub(crate) fn freed(mine: &Counters, route: Route, size: usize) {
    match route {
        Route::Python => add(mine, [(PY_FREES, 1), (PY_BYTES_OUT, size as u64)]),
        Route::Fallback => add(mine, [(FB_FREES, 1), (FB_BYTES_OUT, size as u64)]),
    }
}

#[inline]
pub(crate) fn resized(mine: &Counters, route: Route, old_size: usize, new_size: usize) {
    match route {
        Route::Python => {
            add(mine, [(PY_REALLOCS, 1), (PY_BYTES_IN, new_size as u64), (PY_BYTES_OUT, old_size as u64)])
        }
        Route::Fallback => {
            add(mine, [(FB_REALLOCS, 1), (FB_BYTES_IN, new_size as u64), (FB_BYTES_OUT, old_size as u64)])
        }
    }
}

#[inline]
pub(crate) fn deferred(mine: &Counters, size: usize) {
    add(mine, [(DEFERRED_IN, 1), (DEFERRED_BYTES_IN, size as u64)]);
}

/// A deferred block was really freed: it leaves the list and the Python route.
#[inline]
pub(crate) fn deferred_done(mine: &Counters, size: usize) {
    add(
        mine,
        [(DEFERRED_OUT, 1), (DEFERRED_BYTES_OUT, size as u64), (PY_FREES, 1), (PY_BYTES_OUT, size as u64)],
    );
}

#[inline]
pub(crate) fn moved_to_fallback(mine: &Counters) {
    add(mine, [(MOVED, 1)]);
}

/// Sums every set of counters: outgoing ones first (see the invariants).
fn totals() -> [u64; N] {
    let mut t = [0u64; N];
    registry::with_all(|sets| {
        for range in [0..OUTGOING, OUTGOING..N] {
            for set in sets() {
                for i in range.clone() {
                    t[i] = t[i].wrapping_add(set.c[i].load(Acquire));
                }
            }
        }
    });
    t
}

fn route(
    t: &[u64; N],
    allocs: usize,
    reallocs: usize,
    frees: usize,
    bytes_in: usize,
    bytes_out: usize,
) -> RouteStats {
    RouteStats {
        allocations: t[allocs],
        reallocations: t[reallocs],
        frees: t[frees],
        live_blocks: t[allocs].saturating_sub(t[frees]),
        live_bytes: t[bytes_in].saturating_sub(t[bytes_out]),
    }
}

/// Sums the counters of every thread.
pub(crate) fn snapshot() -> Stats {
    let t = totals();
    Stats {
        python: route(&t, PY_ALLOCS, PY_REALLOCS, PY_FREES, PY_BYTES_IN, PY_BYTES_OUT),
        fallback: route(&t, FB_ALLOCS, FB_REALLOCS, FB_FREES, FB_BYTES_IN, FB_BYTES_OUT),
        deferred: DeferredStats {
            pending_blocks: t[DEFERRED_IN].saturating_sub(t[DEFERRED_OUT]),
            pending_bytes: t[DEFERRED_BYTES_IN].saturating_sub(t[DEFERRED_BYTES_OUT]),
            deferred_frees: t[DEFERRED_IN],
        },
        moved_to_fallback: t[MOVED],
    }
}

#[cfg(unix)]
mod registry {
    //! The list of live threads' counters (see the module's invariants).

    use std::ffi::c_void;
    use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
    use std::sync::atomic::{AtomicBool, AtomicPtr};
    use std::sync::Once;

    use interheap_sync::SpinLock;

    use super::{Counters, N, RETIRED};

    /// Guards the list's links and the folding of counters (never held
    /// across a call that could wait for Python).
    static LOCK: SpinLock<()> = SpinLock::new(());
    /// First registered set (guarded by [`LOCK`]).
    static HEAD: AtomicPtr<Counters> = AtomicPtr::new(std::ptr::null_mut());
    static SETUP: Once = Once::new();
    static mut KEY: libc::pthread_key_t = 0;
    static KEY_OK: AtomicBool = AtomicBool::new(false);

    extern "C" fn before_fork() {
        std::mem::forget(LOCK.lock());
    }

    extern "C" fn after_fork() {
        // SAFETY: `before_fork` took the lock and forgot its guard.
        unsafe { LOCK.force_unlock() };
    }

    /// Runs at thread exit for a registered thread: folds its counts into
    /// [`RETIRED`] and unlinks it. Its later events go to [`RETIRED`] directly.
    extern "C" fn retire(set: *mut c_void) {
        // SAFETY: the value stored under our key is the exiting thread's own
        // counters, still alive: thread-locals outlive key destructors.
        let set = unsafe { &*(set as *const Counters) };
        let guard = LOCK.lock();
        for i in 0..N {
            RETIRED.c[i].fetch_add(set.c[i].load(Relaxed), Release);
            set.c[i].store(0, Relaxed);
        }
        let (prev, next) = (set.prev.get(), set.next.get());
        // SAFETY: linked sets are alive (they unlink before they die), and
        // links change only under the lock, which we hold.
        unsafe {
            if prev.is_null() {
                HEAD.store(next as *mut Counters, Relaxed);
            } else {
                (*prev).next.set(next);
            }
            if !next.is_null() {
                (*next).prev.set(prev);
            }
        }
        set.state.set(2);
        drop(guard);
    }

    /// Links the calling thread's counters; `false` if they cannot be used
    /// (already folded, or no pthread key), in which case the caller counts
    /// in [`RETIRED`].
    #[cold]
    pub(super) fn register(set: &Counters) -> bool {
        if set.state.get() == 2 {
            return false;
        }
        SETUP.call_once(|| {
            // SAFETY: plain pthread calls with valid arguments; KEY is
            // written once, here, before KEY_OK publishes it.
            unsafe {
                if libc::pthread_key_create(&raw mut KEY, Some(retire)) == 0 {
                    libc::pthread_atfork(Some(before_fork), Some(after_fork), Some(after_fork));
                    KEY_OK.store(true, Release);
                }
            }
        });
        if !KEY_OK.load(Acquire) {
            return false;
        }
        // SAFETY: KEY was created (KEY_OK); the value is this thread's own
        // counters, which live until after the key destructor runs.
        if unsafe { libc::pthread_setspecific(KEY, set as *const Counters as *const c_void) } != 0 {
            return false;
        }
        let guard = LOCK.lock();
        let head = HEAD.load(Relaxed);
        set.next.set(head);
        set.prev.set(std::ptr::null());
        if !head.is_null() {
            // SAFETY: linked sets are alive; we hold the lock.
            unsafe { (*head).prev.set(set) };
        }
        HEAD.store(set as *const Counters as *mut Counters, Relaxed);
        set.state.set(1);
        drop(guard);
        true
    }

    /// Calls `f` with an iterator factory over every set of counters
    /// (registered threads, then [`RETIRED`]), under the lock.
    pub(super) fn with_all<R>(f: impl FnOnce(&dyn Fn() -> Walk) -> R) -> R {
        let _guard = LOCK.lock();
        f(&|| Walk { next: HEAD.load(Relaxed), retired: false })
    }

    pub(super) struct Walk {
        next: *const Counters,
        retired: bool,
    }

    impl Iterator for Walk {
        type Item = &'static Counters;
        fn next(&mut self) -> Option<&'static Counters> {
            if !self.next.is_null() {
                // SAFETY: under the lock, linked sets are alive and stay so.
                let set = unsafe { &*self.next };
                self.next = set.next.get();
                return Some(set);
            }
            if !self.retired {
                self.retired = true;
                return Some(&RETIRED);
            }
            None
        }
    }
}

#[cfg(not(unix))]
mod registry {
    //! Without pthread keys there is no way to fold a thread's counters at
    //! exit, so every thread counts in the shared set.

    use super::{Counters, RETIRED};

    pub(super) fn register(_set: &Counters) -> bool {
        false
    }

    pub(super) fn with_all<R>(f: impl FnOnce(&dyn Fn() -> std::iter::Once<&'static Counters>) -> R) -> R {
        f(&|| std::iter::once(&RETIRED))
    }
}
