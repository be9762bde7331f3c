//! interheap's allocator: thread-safe heaps, one per owner, with exact figures.
//!
//! This module owns memory, where the rest of the engine only accounts for
//! it. Its shape follows mimalloc's ideas (segments, pages, per-page free
//! lists, remote-free lists), specialised for CPython:
//!
//! * **Segments** ([`os`]): memory comes from the OS in 1 MiB-aligned
//!   segments, recorded in a static segment map, so that any pointer maps in
//!   O(1) to its segment header, page, block size and owning heap, and so that
//!   a pointer that is not ours is recognised without touching it.
//! * **Size classes** ([`size_class`]): 60 classes from 16 bytes to 64 KiB
//!   (16-byte steps to 512, then four steps per power of two), served from
//!   pages of 16 KiB slots (one slot, or as many as hold eight blocks);
//!   larger blocks get a span of slots (up to 512 KiB) or a segment of their
//!   own, with room to grow in place. Freed spans of 32 KiB or more go back
//!   to the OS at once. Every block is 16-byte aligned.
//! * **Heaps** ([`Heap`]): a heap has exactly one *owner* at a time, and the
//!   owner's fast path uses no atomic read-modify-write and no lock: pop a
//!   block from the current page's free list (or bump into a fresh page).
//!   The owner is a thread, or any thread holding an exclusion the caller
//!   names, such as one interpreter's GIL: the CPython glue gives each
//!   interpreter its own heaps, owned by whoever holds that interpreter's
//!   GIL. Frees by anyone else go onto the heap's lock-free remote-free list,
//!   which the owner reclaims in bulk.
//! * **Ending**: a heap whose owner is gone for good is *ended*: its free
//!   memory goes back to the OS, its live blocks stay valid and are reported,
//!   and later frees of them are served under the heap's lock. A
//!   [`HeapPool`] lets short-lived owners (threads) adopt ended heaps.
//! * **Figures** ([`HeapSnapshot`]): exact live and peak bytes and, per size
//!   class, allocations, owner frees and remote frees, readable from any
//!   thread at any time, with no pointer table.
//!
//! Nothing here allocates through Python or unwinds. Metadata (heap
//! structures) comes from Rust's global allocator; block memory only from
//! the OS.

mod account;
mod alloc;
mod free;
#[allow(clippy::module_inception)]
mod heap;
pub mod os;
mod page;
mod pool;
mod remote;
mod segment;
pub mod size_class;
mod stats;

/// Before `fork()`: takes every heap's lock, so that the child inherits none
/// held by a thread that does not exist there. Callers take their own locks
/// that may be held around heap locks (pools, registries) first.
pub fn fork_prepare() {
    for heap in heaps() {
        heap.lock_for_fork();
    }
}

/// After `fork()`, in the parent and in the child: releases what
/// [`fork_prepare`] took. In the child, the heaps of threads that did not
/// survive stay as they were; their blocks remain valid, and frees of them
/// are counted as remote frees (nobody reclaims that memory in the child).
///
/// # Safety
///
/// [`fork_prepare`] was called on this thread just before the fork, and no
/// heap was created in between.
pub unsafe fn fork_finish() {
    for heap in heaps() {
        // SAFETY: fork_prepare took this lock.
        unsafe { heap.unlock_after_fork() };
    }
}

pub use account::{Account, OnUnconfigured};
pub use free::{free, free_fast, free_with};
pub use heap::{
    heap_of, heaps, owns, requested_size, usable_size, Heap, HeapLabel, Realloc, ENDED_OWNER, NO_OWNER,
};
pub use pool::HeapPool;
pub use segment::{HUGE_BLOCK_OFFSET, SLOT_SIZE};
pub use stats::{ClassSnapshot, HeapSnapshot};
