//! The hand-off of a heap's blocks freed by anyone but its owner: the
//! remote-free stack, the active/ended state, and the lock that transitions
//! and frees of an ended heap take.
//!
//! Written over [`Memory`] so that the loom model below runs this code
//! itself; the heap uses it with [`Std`].
//!
//! # Concurrency invariants
//!
//! * While the heap is *active*, a foreign free pushes the block onto the
//!   stack and the owner takes the whole stack when it needs memory.
//! * While it is *ended*, blocks are given back under `lock`, at once.
//! * The state changes only under `lock` ([`RemoteFrees::end`],
//!   [`RemoteFrees::adopt`]).
//! * A free that races with `end` must not strand its block on the stack of
//!   a heap that nobody drains any more. The pusher pushes, then a `SeqCst`
//!   fence, then reads the state; `end` writes the state, then a `SeqCst`
//!   fence, then takes the stack. Of two `SeqCst` fences one comes first, so
//!   either the pusher sees `ENDED` (and drains under the lock itself) or
//!   `end`'s drain sees the push. The fences are what loom can check (it
//!   models `SeqCst` loads and stores as acquire/release only); on x86-64 the
//!   pusher's fence follows a locked CAS, and foreign frees are the slow path.
//! * `adopt` drains under the lock before it makes the heap active again, so
//!   the new owner starts with no block of the ended period on the stack;
//!   pushes after it are the new owner's to drain.

use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};

use interheap_sync::{Atomic, IntrusiveStack, Links, Memory, SpinGuard, SpinLock, Std};

use super::segment::Block;

const ACTIVE: u8 = 0;
const ENDED: u8 = 1;

/// Blocks link through their first word.
pub(super) struct BlockLinks;

// SAFETY: both touch only the node's first word.
unsafe impl Links<Block> for BlockLinks {
    #[inline(always)]
    unsafe fn set_next(node: *mut Block, next: *mut Block) {
        // SAFETY: the caller owns the block, which is at least one word long.
        unsafe { (*node).next = next }
    }
    #[inline(always)]
    unsafe fn next(node: *mut Block) -> *mut Block {
        // SAFETY: as above.
        unsafe { (*node).next }
    }
}

/// See the module docs.
pub(super) struct RemoteFrees<M: Memory = Std> {
    state: M::U8,
    stack: IntrusiveStack<M, Block, BlockLinks>,
    /// Taken by transitions and by every free of an ended heap.
    pub(super) lock: SpinLock<(), M>,
}

impl<M: Memory> RemoteFrees<M> {
    /// An active heap's hand-off, with nothing pending.
    pub(super) fn new() -> Self {
        RemoteFrees {
            state: Atomic::new(ACTIVE),
            stack: IntrusiveStack::new_in(),
            lock: SpinLock::new_in(()),
        }
    }

    /// Whether the heap is ended (`Acquire`: what `end` did before is visible).
    #[inline]
    pub(super) fn is_ended(&self) -> bool {
        self.state.load(Acquire) == ENDED
    }

    /// A free of `block` by someone other than the owner: pushed while the
    /// heap is active, given back with `give_back` under the lock while it is
    /// ended.
    ///
    /// # Safety
    ///
    /// `block` is a live block of this heap that the caller gives up;
    /// `give_back` returns a block of this heap to its page (it is called
    /// only under the lock of an ended heap).
    pub(super) unsafe fn free_foreign(&self, block: *mut Block, mut give_back: impl FnMut(*mut Block)) {
        loop {
            if self.state.load(Relaxed) == ACTIVE {
                // SAFETY: the caller gives the block up.
                unsafe { self.stack.push(block) };
                // The store-buffering hand-off with `end` (module docs).
                M::fence(SeqCst);
                if self.state.load(Relaxed) == ENDED {
                    let _guard = self.lock.lock();
                    if self.state.load(Relaxed) == ENDED {
                        // SAFETY: we hold the lock of an ended heap.
                        unsafe { self.drain(&mut give_back) };
                    }
                }
                return;
            }
            let guard = self.lock.lock();
            if self.state.load(Relaxed) == ENDED {
                // SAFETY: we hold the lock of an ended heap, and the block is live.
                unsafe { self.drain(&mut give_back) };
                give_back(block);
                return;
            }
            // Adopted meanwhile: push it to the new owner instead.
            drop(guard);
        }
    }

    /// Gives every pushed block back with `give_back`; returns how many.
    ///
    /// # Safety
    ///
    /// The caller is the owner, or holds the lock of an ended heap;
    /// `give_back` is as for [`free_foreign`](Self::free_foreign).
    #[inline]
    pub(super) unsafe fn drain(&self, give_back: impl FnMut(*mut Block)) -> usize {
        if self.stack.is_empty() {
            return 0;
        }
        // SAFETY: blocks were pushed whole by `free_foreign`.
        unsafe { self.stack.drain(give_back) }
    }

    /// Ends the heap and gives back what was pushed; false if it was
    /// already ended. `_held` proves the caller holds [`lock`](Self::lock).
    ///
    /// # Safety
    ///
    /// The owner does not run on the heap during or after the call;
    /// `give_back` is as for [`free_foreign`](Self::free_foreign).
    pub(super) unsafe fn end(&self, _held: &SpinGuard<'_, (), M>, give_back: impl FnMut(*mut Block)) -> bool {
        if self.state.load(Relaxed) == ENDED {
            return false;
        }
        self.state.store(ENDED, Release);
        // The store-buffering hand-off with `free_foreign` (module docs).
        M::fence(SeqCst);
        // SAFETY: we hold the lock of a heap that is now ended.
        unsafe { self.drain(give_back) };
        true
    }

    /// Makes an ended heap active again, after giving back what was pushed
    /// while it was ended; false if it was not ended. `_held` proves the
    /// caller holds [`lock`](Self::lock).
    ///
    /// # Safety
    ///
    /// `give_back` is as for [`free_foreign`](Self::free_foreign).
    pub(super) unsafe fn adopt(
        &self,
        _held: &SpinGuard<'_, (), M>,
        give_back: impl FnMut(*mut Block),
    ) -> bool {
        if self.state.load(Relaxed) != ENDED {
            return false;
        }
        // SAFETY: we hold the lock of an ended heap.
        unsafe { self.drain(give_back) };
        self.state.store(ACTIVE, Release);
        true
    }
}

// Loom explores the interleavings itself; its thread stacks need system
// calls Miri does not run, so the models are not built under Miri.
#[cfg(all(test, not(miri)))]
mod models {
    //! Loom models of the hand-off. Each names the mutations it catches;
    //! `scripts/mutants.py` applies them and checks that the model fails.

    use loom::cell::UnsafeCell;
    use loom::sync::Arc;
    use loom::thread;

    use interheap_sync::Loom;

    use super::*;

    /// The model's page: how many times each of two blocks came back. Not
    /// atomic: loom flags any two give-backs not ordered by the protocol.
    struct Pages {
        blocks: [Block; 2],
        returned: UnsafeCell<[u32; 2]>,
    }

    // SAFETY: the blocks are only touched by whoever owns them under the protocol.
    unsafe impl Sync for Pages {}
    // SAFETY: as above.
    unsafe impl Send for Pages {}

    impl Pages {
        fn new() -> Arc<Pages> {
            Arc::new(Pages {
                blocks: [Block { next: std::ptr::null_mut() }, Block { next: std::ptr::null_mut() }],
                returned: UnsafeCell::new([0; 2]),
            })
        }
        fn block(&self, i: usize) -> *mut Block {
            &self.blocks[i] as *const Block as *mut Block
        }
        fn give_back(&self) -> impl FnMut(*mut Block) + '_ {
            move |b| {
                let i = if b == self.block(0) { 0 } else { 1 };
                // SAFETY: loom checks that give-backs are ordered.
                self.returned.with_mut(|r| unsafe { (*r)[i] += 1 });
            }
        }
        fn returned(&self) -> [u32; 2] {
            // SAFETY: read after every thread was joined.
            self.returned.with(|r| unsafe { *r })
        }
    }

    /// The owner ends the heap while another thread frees a block. The
    /// block comes back exactly once, and nothing is left pushed. (One
    /// freer: see `interheap_sync::model` on two threads waiting for a lock.)
    ///
    /// Mutations caught: dropping the fence in `free_foreign`, dropping the
    /// fence in `end` (a block stays on the stack of the ended heap);
    /// dropping the re-check after the push (same); giving back without the
    /// lock when the re-check sees `ENDED` (loom: concurrent give-backs).
    #[test]
    fn frees_racing_end_are_never_stranded() {
        interheap_sync::model(|| {
            let remote = Arc::new(RemoteFrees::<Loom>::new());
            let pages = Pages::new();
            let freer = {
                let (remote, pages) = (remote.clone(), pages.clone());
                // SAFETY: the thread gives up its block.
                thread::spawn(move || unsafe { remote.free_foreign(pages.block(0), pages.give_back()) })
            };
            {
                let guard = remote.lock.lock();
                // SAFETY: the owner (this thread) stops running on the heap.
                assert!(unsafe { remote.end(&guard, pages.give_back()) });
            }
            freer.join().unwrap();
            assert_eq!(pages.returned(), [1, 0]);
            assert!(remote.stack.is_empty());
        });
    }

    /// An ended heap is adopted while another thread frees one of its
    /// blocks; the new owner then drains. The block comes back exactly once.
    ///
    /// Mutations caught: `adopt` making the heap active before it drains
    /// (loom: the owner's drain races a give-back under the lock); the
    /// freer's locked path not re-reading the state after taking the lock.
    #[test]
    fn frees_racing_adoption_reach_the_new_owner() {
        interheap_sync::model(|| {
            let remote = Arc::new(RemoteFrees::<Loom>::new());
            let pages = Pages::new();
            {
                let guard = remote.lock.lock();
                // SAFETY: nothing runs on the heap yet.
                assert!(unsafe { remote.end(&guard, pages.give_back()) });
            }
            let freer = {
                let (remote, pages) = (remote.clone(), pages.clone());
                // SAFETY: the thread gives up its block.
                thread::spawn(move || unsafe { remote.free_foreign(pages.block(0), pages.give_back()) })
            };
            {
                let guard = remote.lock.lock();
                // SAFETY: give-backs under the lock.
                assert!(unsafe { remote.adopt(&guard, pages.give_back()) });
            }
            // SAFETY: this thread is the new owner.
            unsafe { remote.drain(pages.give_back()) };
            freer.join().unwrap();
            // SAFETY: as above; the freer may have pushed after the first drain.
            unsafe { remote.drain(pages.give_back()) };
            assert_eq!(pages.returned(), [1, 0]);
        });
    }
}
