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
//! * A parked block's size is written before the push that publishes it,
//!   and its route header was written before the block was handed to the
//!   thread that frees it (by whatever synchronisation handed it over).
//!   [`ParkedBlocks`] is that protocol over any [`Memory`]; the loom model
//!   below runs it with the real block layout (`layout.rs`): blocks parked
//!   from two threads while a third drains are each freed once, with the
//!   size their caller asked for.

use interheap_sync::{IntrusiveStack, Links, Memory, Std};

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

/// Where a parked block keeps the size its caller asked for.
pub(crate) trait SizeWord {
    /// Stores `size` in the parked block at `base`.
    ///
    /// # Safety
    /// The caller owns the block, which is at least two words long.
    unsafe fn write(base: *mut u8, size: usize);
    /// Reads what [`write`](Self::write) stored.
    ///
    /// # Safety
    /// As `write`, and the size was written.
    unsafe fn read(base: *mut u8) -> usize;
}

/// Production: the block's second word (the first is the stack's link).
pub(crate) enum SecondWord {}

impl SizeWord for SecondWord {
    #[inline]
    unsafe fn write(base: *mut u8, size: usize) {
        // SAFETY: per the contract.
        unsafe { base.add(WORD).cast::<usize>().write_unaligned(size) }
    }
    #[inline]
    unsafe fn read(base: *mut u8) -> usize {
        // SAFETY: per the contract.
        unsafe { base.add(WORD).cast::<usize>().read_unaligned() }
    }
}

/// Parked blocks: a stack threaded through them, each with its size kept
/// as `S` says (the model keeps it where loom checks every access).
pub(crate) struct ParkedBlocks<M: Memory, S: SizeWord = SecondWord> {
    stack: IntrusiveStack<M, u8, ParkedLinks>,
    _size: std::marker::PhantomData<S>,
}

impl ParkedBlocks<Std> {
    const fn new() -> Self {
        ParkedBlocks { stack: IntrusiveStack::new(), _size: std::marker::PhantomData }
    }
}

impl<M: Memory, S: SizeWord> ParkedBlocks<M, S> {
    /// An empty list over any [`Memory`] (the model's).
    #[cfg(test)]
    pub(crate) fn new_in() -> Self {
        ParkedBlocks { stack: IntrusiveStack::new_in(), _size: std::marker::PhantomData }
    }

    /// Parks the block at `base` whose caller asked for `size` bytes.
    ///
    /// # Safety
    /// The caller gives the block up (nobody but the drain touches it
    /// again); it is at least [`MIN_BLOCK`](crate::layout::MIN_BLOCK) long.
    #[inline]
    pub(crate) unsafe fn park(&self, base: *mut u8, size: usize) {
        // SAFETY: the block is ours now and at least two words long (see
        // `ParkedLinks`); the size is written before the push publishes it.
        unsafe {
            S::write(base, size);
            self.stack.push(base);
        }
    }

    /// Whether nothing is parked (a hint: a block may be parked meanwhile).
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.stack.is_empty()
    }

    /// Takes every parked block and passes each, with its size, to `free`.
    /// Returns how many.
    pub(crate) fn drain(&self, mut free: impl FnMut(*mut u8, usize)) -> usize {
        // SAFETY: parked blocks were pushed by `park` with their size kept
        // by `S`, and the drain made this thread their only owner.
        unsafe {
            self.stack.drain(|node| {
                free(node, S::read(node));
            })
        }
    }
}

static PARKED: ParkedBlocks<Std> = ParkedBlocks::new();

/// Parks a dead Python-route block whose caller asked for `size` bytes.
///
/// # Safety
/// `base` is the start of a live Python-route block, which the caller gives
/// up: nobody touches it again except the drain.
#[inline]
pub(crate) unsafe fn park(mine: &Counters, base: *mut u8, size: usize) {
    stats::deferred(mine, size);
    // SAFETY: forwarded contract.
    unsafe { PARKED.park(base, size) };
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
    PARKED.drain(|base, size| {
        // SAFETY: a parked Python block, now only ours; `attached` proves
        // this thread may call `PyMem_RawFree`.
        unsafe { python.free(base) };
        stats::deferred_done(mine, size);
    })
}

/// The loom model of parking: the real block layout and [`ParkedBlocks`],
/// over loom's atomics, with a Python route backend of boxed blocks.
#[cfg(all(test, not(miri)))]
mod models {
    use std::mem::size_of;

    use interheap_sync::Loom;
    use loom::sync::{Arc, Mutex};
    use loom::thread;

    use super::*;
    use crate::layout::{self, Route};

    /// Python's raw allocator, as the model sees it: boxed blocks, each
    /// with a loom cell for its parked size, so that loom checks that the
    /// drain's read of it happens after `park`'s write.
    struct ModelPython;

    #[repr(C)]
    struct ModelBlock {
        words: [usize; 8],
        parked_size: loom::cell::UnsafeCell<usize>,
    }

    /// The parked size in the model block's loom cell.
    enum TrackedSize {}

    impl SizeWord for TrackedSize {
        unsafe fn write(base: *mut u8, size: usize) {
            // SAFETY: `base` is a live model block, now the parker's.
            unsafe { (*base.cast::<ModelBlock>()).parked_size.with_mut(|p| *p = size) }
        }
        unsafe fn read(base: *mut u8) -> usize {
            // SAFETY: `base` is a live model block, now the drainer's.
            unsafe { (*base.cast::<ModelBlock>()).parked_size.with(|p| *p) }
        }
    }

    type ModelParked = ParkedBlocks<Loom, TrackedSize>;

    impl Backend for ModelPython {
        const ROUTE: Route = Route::Python;
        unsafe fn malloc(&self, n: usize) -> *mut u8 {
            assert!(n <= size_of::<[usize; 8]>());
            let block = ModelBlock { words: [0; 8], parked_size: loom::cell::UnsafeCell::new(0) };
            Box::into_raw(Box::new(block)).cast()
        }
        unsafe fn calloc(&self, n: usize) -> *mut u8 {
            // SAFETY: forwarded.
            unsafe { self.malloc(n) }
        }
        unsafe fn realloc(&self, _: *mut u8, _: usize) -> *mut u8 {
            unreachable!("the model does not resize")
        }
        unsafe fn free(&self, p: *mut u8) {
            // SAFETY: `p` came from `malloc`, once.
            drop(unsafe { Box::from_raw(p.cast::<ModelBlock>()) });
        }
    }

    /// An attached thread's allocation of `size` bytes: the user pointer
    /// and the block's base.
    fn allocate(size: usize) -> (usize, usize) {
        // SAFETY: the model backend may be called anywhere; 8 is a power of two.
        let user = unsafe { layout::allocate(&ModelPython, size, 8, false) };
        assert!(!user.is_null());
        // SAFETY: a live block of ours.
        (user as usize, unsafe { layout::block_of(user) }.base as usize)
    }

    /// A free on a thread with no thread state: read the route, park.
    fn free_detached(parked: &ModelParked, user: usize, size: usize) {
        // SAFETY: the block was handed to this thread (by spawn) and is live.
        let block = unsafe { layout::block_of(user as *mut u8) };
        assert_eq!(block.route, Route::Python, "the header lost the block's route");
        // SAFETY: the block is given up here.
        unsafe { parked.park(block.base, size) };
    }

    /// An attached call's drain: frees each block, recording base and size.
    fn drain_into(parked: &ModelParked, freed: &Mutex<Vec<(usize, usize)>>) {
        parked.drain(|base, size| {
            freed.lock().unwrap().push((base as usize, size));
            // SAFETY: a parked block, now only ours.
            unsafe { ModelPython.free(base) };
        });
    }

    /// Two detached threads free a Python-route block each while an
    /// attached thread drains; the main thread drains what is left. Each
    /// block is freed once, by its base, with the size its caller asked for.
    ///
    /// Mutations caught: `park` pushing before it writes the size (loom:
    /// the drain's read of the size is not ordered after the write); the
    /// header losing its route bit (the freeing thread takes the block for
    /// a libc one).
    #[test]
    fn parked_blocks_are_freed_once_with_their_sizes() {
        interheap_sync::model(|| {
            let parked = Arc::new(ModelParked::new_in());
            let freed = Arc::new(Mutex::new(Vec::new()));
            let blocks = [(allocate(16), 16), (allocate(40), 40)];
            let parkers = blocks.map(|((user, _), size)| {
                let parked = parked.clone();
                thread::spawn(move || free_detached(&parked, user, size))
            });
            let drainer = {
                let (parked, freed) = (parked.clone(), freed.clone());
                thread::spawn(move || drain_into(&parked, &freed))
            };
            for p in parkers {
                p.join().unwrap();
            }
            drainer.join().unwrap();
            drain_into(&parked, &freed);
            let mut got = freed.lock().unwrap().clone();
            got.sort_unstable();
            let mut want = blocks.map(|((_, base), size)| (base, size)).to_vec();
            want.sort_unstable();
            assert_eq!(got, want);
        });
    }
}
