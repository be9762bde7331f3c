//! [`HeapPool`]: heaps for owners that come and go, such as threads.
//!
//! When a thread exits, its heap ends (blocks other threads still use stay
//! valid); the next thread that needs a heap adopts an ended one instead of
//! creating another, so the number of heaps stays bounded by the number of
//! threads alive at once, and a heap's figures keep adding up across owners.

use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};

use super::heap::{Heap, HeapLabel};
use interheap_sync::SpinLock;

/// Ended heaps waiting for an owner, linked through `Heap::pool_next`.
struct Waiting(*const Heap);
// SAFETY: the pointers are to leaked heaps, valid on every thread.
unsafe impl Send for Waiting {}

/// A pool of heaps for short-lived owners. See the module docs.
pub struct HeapPool {
    waiting: SpinLock<Waiting>,
    /// Whether the pool's heaps keep requested sizes (set before the first acquire).
    requested: AtomicBool,
}

impl Default for HeapPool {
    fn default() -> Self {
        Self::new()
    }
}

impl HeapPool {
    pub const fn new() -> Self {
        HeapPool { waiting: SpinLock::new(Waiting(ptr::null())), requested: AtomicBool::new(false) }
    }

    /// Makes the heaps this pool creates keep requested sizes (see
    /// [`Heap::new_keeping_requested_sizes`]). Call it before the first
    /// [`acquire`](Self::acquire): a pool's heaps all have one mode.
    pub fn keep_requested_sizes(&self, on: bool) {
        self.requested.store(on, Ordering::Relaxed);
    }

    /// Whether the pool's heaps keep requested sizes.
    pub fn keeps_requested_sizes(&self) -> bool {
        self.requested.load(Ordering::Relaxed)
    }

    /// An active heap owned by `owner`: an ended heap of this pool adopted, or a new one.
    pub fn acquire(&self, label: HeapLabel, owner: usize) -> &'static Heap {
        loop {
            let mut waiting = self.waiting.lock();
            // SAFETY: waiting heaps are leaked heaps.
            let Some(heap) = (unsafe { waiting.0.as_ref() }) else {
                // Created under the pool's lock, so that `fork` handlers
                // holding it see a stable set of heaps.
                return if self.keeps_requested_sizes() {
                    Heap::new_keeping_requested_sizes(label, owner, None)
                } else {
                    Heap::new(label, owner)
                };
            };
            waiting.0 = heap.pool_next();
            drop(waiting);
            if heap.adopt(owner) {
                return heap;
            }
        }
    }

    /// Takes the pool's lock and keeps it (for `fork`).
    pub fn lock_for_fork(&self) {
        std::mem::forget(self.waiting.lock());
    }

    /// Releases the lock taken by [`lock_for_fork`](Self::lock_for_fork).
    ///
    /// # Safety
    ///
    /// `lock_for_fork` was called and its lock is not released yet.
    pub unsafe fn unlock_after_fork(&self) {
        // SAFETY: per the contract.
        unsafe { self.waiting.force_unlock() };
    }

    /// Ends `heap` and keeps it for the next [`acquire`](Self::acquire).
    ///
    /// # Safety
    ///
    /// As for [`Heap::end`]: the owner no longer runs on it. The heap must
    /// have come from this pool and must not be waiting in it already.
    pub unsafe fn release(&self, heap: &'static Heap) {
        // SAFETY: per the contract.
        unsafe { heap.end() };
        let mut waiting = self.waiting.lock();
        heap.set_pool_next(waiting.0);
        waiting.0 = heap;
    }
}
