//! Python-route blocks freed where `PyMem_RawFree` may not be called.
//!
//! A thread with no attached thread state must not call `PyMem_RawFree`
//! (see the crate docs: it can crash while tracemalloc starts or stops), so
//! it parks the block here, and the next call of ours that holds
//! [`Attached`], on any thread, frees everything parked.
//!
//! # Concurrency invariants
//!
//! * The list is an intrusive Treiber stack threaded through the dead blocks
//!   themselves: a parked block's first word is the next block, its second
//!   word the size its caller asked for (every block is at least
//!   [`MIN_BLOCK`](crate::layout::MIN_BLOCK) bytes). Nothing is allocated.
//! * Pushing is a CAS loop on [`HEAD`] (lock-free). Draining takes the whole
//!   list with one `swap`, so two draining threads never see the same block
//!   and no pop can suffer ABA.
//! * A pusher publishes the block's two words with `Release`; the drainer's
//!   `Acquire` swap makes them visible before it reads them.

use std::ptr::null_mut;
use std::sync::atomic::AtomicPtr;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

use crate::layout::{Backend, WORD};
use crate::route::{Attached, Python};
use crate::stats::{self, Counters};

static HEAD: AtomicPtr<u8> = AtomicPtr::new(null_mut());

/// Parks a dead Python-route block whose caller asked for `size` bytes.
///
/// # Safety
/// `base` is the start of a live Python-route block, which the caller gives
/// up: nobody touches it again except the drain.
#[inline]
pub(crate) unsafe fn park(mine: &Counters, base: *mut u8, size: usize) {
    stats::deferred(mine, size);
    // SAFETY: the block is ours now and at least two words long; the words
    // may be unaligned only with a backend that breaks C's alignment rules.
    unsafe { base.add(WORD).cast::<usize>().write_unaligned(size) };
    let mut head = HEAD.load(Relaxed);
    loop {
        // SAFETY: as above.
        unsafe { base.cast::<*mut u8>().write_unaligned(head) };
        match HEAD.compare_exchange_weak(head, base, Release, Relaxed) {
            Ok(_) => return,
            Err(now) => head = now,
        }
    }
}

/// Frees every parked block, if any, with `PyMem_RawFree`. Returns how many.
#[inline]
pub(crate) fn drain(attached: &Attached) -> usize {
    if HEAD.load(Relaxed).is_null() {
        return 0;
    }
    drain_slow(attached)
}

#[cold]
fn drain_slow(attached: &Attached) -> usize {
    let python = Python::new(attached);
    let mine = &attached.thread().counters;
    let mut node = HEAD.swap(null_mut(), Acquire);
    let mut count = 0;
    while !node.is_null() {
        // SAFETY: parked blocks hold their next pointer and size (see `park`),
        // and this thread took them off the list alone.
        let (next, size) = unsafe {
            (node.cast::<*mut u8>().read_unaligned(), node.add(WORD).cast::<usize>().read_unaligned())
        };
        // SAFETY: `node` is a Python-route block nobody else refers to, and
        // `attached` proves this thread may call `PyMem_RawFree`.
        unsafe { python.free(node) };
        stats::deferred_done(mine, size);
        count += 1;
        node = next;
    }
    count
}
