//! Python-route blocks freed where `PyMem_RawFree` may not be called.
//!
//! A thread with no attached thread state must not call `PyMem_RawFree`
//! (see the crate docs: it can crash while tracemalloc starts or stops), so
//! it parks the block here, and the next call of ours that holds
//! [`Attached`], on any thread, frees everything parked.
//!
//! # Concurrency invariants
//!
//! * The list is `interheap_sync`'s intrusive stack, threaded through the
//!   dead blocks themselves: a parked block's first word is the next block,
//!   its second word the size its caller asked for (every block is at least
//!   [`MIN_BLOCK`](crate::layout::MIN_BLOCK) bytes). Nothing is allocated.
//! * Pushing is lock-free; draining takes the whole list with one `swap`, so
//!   two draining threads never see the same block and there is no ABA. The
//!   push publishes both words (`Release`), the drain's swap (`Acquire`) sees
//!   them: the loom model of the stack checks exactly this code.

use interheap_sync::{IntrusiveStack, Links};

use crate::layout::{Backend, WORD};
use crate::route::{Attached, Python};
use crate::stats::{self, Counters};

/// A parked block links through its first word, which may be unaligned
/// only with a backend that breaks C's alignment rules.
struct ParkedLinks;

// SAFETY: both touch only the block's first word.
unsafe impl Links<u8> for ParkedLinks {
    #[inline]
    unsafe fn set_next(node: *mut u8, next: *mut u8) {
        // SAFETY: the caller owns the block, which is at least two words long.
        unsafe { node.cast::<*mut u8>().write_unaligned(next) }
    }
    #[inline]
    unsafe fn next(node: *mut u8) -> *mut u8 {
        // SAFETY: as above.
        unsafe { node.cast::<*mut u8>().read_unaligned() }
    }
}

static PARKED: IntrusiveStack<interheap_sync::Std, u8, ParkedLinks> = IntrusiveStack::new();

/// Parks a dead Python-route block whose caller asked for `size` bytes.
///
/// # Safety
/// `base` is the start of a live Python-route block, which the caller gives
/// up: nobody touches it again except the drain.
#[inline]
pub(crate) unsafe fn park(mine: &Counters, base: *mut u8, size: usize) {
    stats::deferred(mine, size);
    // SAFETY: the block is ours now and at least two words long (see `ParkedLinks`).
    unsafe {
        base.add(WORD).cast::<usize>().write_unaligned(size);
        PARKED.push(base);
    }
}

/// Frees every parked block, if any, with `PyMem_RawFree`. Returns how many.
#[inline]
pub(crate) fn drain(attached: &Attached) -> usize {
    if PARKED.is_empty() {
        return 0;
    }
    drain_slow(attached)
}

#[cold]
fn drain_slow(attached: &Attached) -> usize {
    let python = Python::new(attached);
    let mine = &attached.thread().counters;
    // SAFETY: parked blocks were pushed by `park` with their size in the
    // second word; the drain made this thread their only owner, and
    // `attached` proves it may call `PyMem_RawFree`.
    unsafe {
        PARKED.drain(|node| {
            let size = node.add(WORD).cast::<usize>().read_unaligned();
            python.free(node);
            stats::deferred_done(mine, size);
        })
    }
}
