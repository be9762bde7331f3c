//! When an interpreter ends, seen from the hooks.
//!
//! CPython has no callback for it, but its last act in `Py_EndInterpreter`
//! (and `_PyXI_EndInterpreter`, behind `concurrent.interpreters`) is to free
//! the interpreter's state with `PyMem_RawFree`: the block *is* the state
//! on 3.12, and holds it (aligned, at most 63 bytes in) on 3.13+
//! (`alloc_interpreter` in `Python/pystate.c`). The hooks learn each
//! interpreter's state address when its bucket is first described
//! (`interp::describe_current`), so a raw free whose block holds a known
//! state address marks that interpreter ended, with the time, in the ledger
//! (`Ledger::mark_ended`). The timeline shows it; the snapshot carries it.
//!
//! Only a block the hooks saw allocated counts, with its exact size: a state
//! inside it is the freed interpreter's, never a neighbour's (an untracked
//! block's size is unknown, so a state allocated before the hooks were
//! installed is not seen freed). Cost on the hooks: a tracked raw free
//! compares its span with the lowest and highest known state address (two
//! loads); only a free that overlaps takes the lock. The main interpreter's
//! state is static and never listed.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use interheap_engine::BucketId;
use interheap_sync::{SpinGuard, SpinLock};

use crate::hooks::TRACKER;

/// Known interpreter states: (address, interpreter ID), while they live.
/// (A `SpinLock`, so that the fork handlers can hold it across a fork.)
static STATES: SpinLock<Vec<(usize, i64)>> = SpinLock::new(Vec::new());
static LOW: AtomicUsize = AtomicUsize::new(usize::MAX);
static HIGH: AtomicUsize = AtomicUsize::new(0);

fn lock() -> SpinGuard<'static, Vec<(usize, i64)>> {
    STATES.lock()
}

/// For the `fork` prepare handler; undo with [`unlock_after_fork`].
pub fn lock_for_fork() {
    std::mem::forget(STATES.lock());
}

/// Releases what [`lock_for_fork`] took.
///
/// # Safety
///
/// Only right after `lock_for_fork` on this thread (parent or child).
pub unsafe fn unlock_after_fork() {
    // SAFETY: the caller took the lock in lock_for_fork and forgot the guard.
    unsafe { STATES.force_unlock() };
}

fn bounds(states: &[(usize, i64)]) {
    LOW.store(states.iter().map(|s| s.0).min().unwrap_or(usize::MAX), Relaxed);
    HIGH.store(states.iter().map(|s| s.0).max().unwrap_or(0), Relaxed);
}

/// Monotonic clock in nanoseconds (`CLOCK_MONOTONIC`, as Python's
/// `time.monotonic()`), the timeline's and the end marks' time base.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid out-parameter; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).wrapping_mul(1_000_000_000).wrapping_add(ts.tv_nsec as u64)
}

/// Interpreter `id` (not main) has its state at `state`. From a bucket's
/// cold path only.
pub fn register(id: i64, state: usize) {
    if id == 0 || state == 0 {
        return;
    }
    let mut states = lock();
    if !states.contains(&(state, id)) {
        // A state address reused by a new interpreter replaces the old one.
        states.retain(|&(s, _)| s != state);
        states.push((state, id));
        bounds(&states);
    }
}

/// The raw block of `size` bytes at `addr`, allocated under the hooks, is
/// about to be freed.
#[inline(always)]
pub fn raw_freeing(addr: usize, size: usize) {
    let end = addr.saturating_add(size);
    if HIGH.load(Relaxed) < addr || LOW.load(Relaxed) >= end {
        return;
    }
    ended_within(addr, end);
}

#[cold]
#[inline(never)]
fn ended_within(addr: usize, end: usize) {
    let mut states = lock();
    let mut ended = Vec::new();
    states.retain(|&(state, id)| {
        let inside = (addr..end).contains(&state);
        if inside {
            ended.push(id);
        }
        !inside
    });
    if ended.is_empty() {
        return;
    }
    bounds(&states);
    drop(states);
    let now = monotonic_ns();
    for id in ended {
        let bucket = BucketId::for_interpreter(Some(id));
        TRACKER.ledger().mark_ended(bucket, now);
        crate::checker::interpreter_ended(bucket);
    }
    // Its arenas may have gone without a free of each code object in them.
    crate::sites::forget_code();
}

/// Forgets every known state (a fresh install).
pub fn reset() {
    let mut states = lock();
    states.clear();
    bounds(&states);
}
