//! An intrusive lock-free stack that is emptied whole: many threads push,
//! and whoever drains takes every node at once.
//!
//! Used for the engine's remote-free lists (blocks freed by a thread that
//! does not own their heap) and for `interheap-pyalloc`'s deferred frees
//! (blocks freed where Python's allocator may not be called). The nodes are
//! the dead blocks themselves: nothing is allocated.
//!
//! # Concurrency invariants
//!
//! * A pusher owns its node until its compare-and-swap publishes it; it
//!   writes the node's link before, and the CAS is `Release`, so a drainer
//!   whose `swap` is `Acquire` and reads that push (or a later one in the
//!   head's modification order: a release sequence of RMWs) sees every
//!   pushed node's link.
//! * Draining is one `swap` of the head with null: two drainers never see
//!   the same node, and since nothing is ever popped singly there is no ABA.
//! * [`IntrusiveStack::is_empty`] is a hint (`Relaxed`): a caller that needs
//!   to see a concurrent push orders it with its own fence (see the engine's
//!   remote frees).

use std::marker::PhantomData;
use std::ptr;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

use crate::memory::{Atomic, Memory};

/// How a node's link to the next node is written and read.
///
/// # Safety
///
/// `set_next` then `next` on the same node (with no other `set_next` in
/// between) returns what was set; both touch only the node's own memory.
pub unsafe trait Links<N> {
    /// Writes `node`'s link.
    ///
    /// # Safety
    ///
    /// The caller owns `node` (no other thread reads or writes it).
    unsafe fn set_next(node: *mut N, next: *mut N);
    /// Reads `node`'s link.
    ///
    /// # Safety
    ///
    /// The caller owns `node`, and its link was set.
    unsafe fn next(node: *mut N) -> *mut N;
}

/// A stack of `N` nodes linked through `L`, over the atomics of `M`.
pub struct IntrusiveStack<M: Memory, N, L: Links<N>> {
    head: M::Ptr<N>,
    _links: PhantomData<L>,
}

// SAFETY: the stack holds raw pointers to nodes that move between threads by
// design (a pusher gives its node up); the head is atomic.
unsafe impl<M: Memory, N, L: Links<N>> Sync for IntrusiveStack<M, N, L> where M::Ptr<N>: Sync {}
// SAFETY: as above.
unsafe impl<M: Memory, N, L: Links<N>> Send for IntrusiveStack<M, N, L> where M::Ptr<N>: Send {}

impl<N, L: Links<N>> IntrusiveStack<crate::Std, N, L> {
    /// An empty stack (const: it can be a `static`).
    pub const fn new() -> Self {
        IntrusiveStack { head: std::sync::atomic::AtomicPtr::new(ptr::null_mut()), _links: PhantomData }
    }
}

impl<N, L: Links<N>> Default for IntrusiveStack<crate::Std, N, L> {
    fn default() -> Self {
        Self::new()
    }
}

impl<M: Memory, N, L: Links<N>> IntrusiveStack<M, N, L> {
    /// An empty stack over any [`Memory`] (a model's, for example).
    pub fn new_in() -> Self {
        IntrusiveStack { head: Atomic::new(ptr::null_mut()), _links: PhantomData }
    }

    /// Pushes `node`.
    ///
    /// # Safety
    ///
    /// The caller owns `node` and gives it up: nobody touches it again
    /// until a [`take_all`](Self::take_all) returns it.
    #[inline]
    pub unsafe fn push(&self, node: *mut N) {
        let mut head = self.head.load(Relaxed);
        loop {
            // SAFETY: we still own the node (it is published by the CAS below).
            unsafe { L::set_next(node, head) };
            match self.head.compare_exchange_weak(head, node, Release, Relaxed) {
                Ok(_) => return,
                Err(now) => head = now,
            }
        }
    }

    /// Whether the stack looked empty (`Relaxed`: a hint, see the module docs).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.head.load(Relaxed).is_null()
    }

    /// Takes every node: the first, linked to the others through `L` (null
    /// when empty). The caller owns them all from now on.
    #[inline]
    pub fn take_all(&self) -> *mut N {
        self.head.swap(ptr::null_mut(), Acquire)
    }

    /// Takes every node and calls `f` on each, in pop order; returns how many.
    ///
    /// # Safety
    ///
    /// Nodes were pushed with [`push`](Self::push); `f` may reuse or free
    /// each node (its link is read before `f` runs).
    #[inline]
    pub unsafe fn drain(&self, mut f: impl FnMut(*mut N)) -> usize {
        let mut node = self.take_all();
        let mut count = 0;
        while !node.is_null() {
            // SAFETY: the swap made us the nodes' only owner, and every
            // pushed node's link was set before it was published.
            let next = unsafe { L::next(node) };
            f(node);
            count += 1;
            node = next;
        }
        count
    }
}
