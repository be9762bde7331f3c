//! interheap's lock-free protocols, each written once over an atomics
//! facade ([`Memory`]) so that the code production runs is the code the
//! model checker (loom) explores.
//!
//! * [`memory`]: the facade; [`Std`] in production, `Loom` in model tests
//!   (feature `loom`).
//! * [`stack`]: the intrusive stack that is emptied whole (the engine's
//!   remote frees, `interheap-pyalloc`'s deferred frees).
//! * [`spin_lock`]: the spin lock of short critical sections.
//! * [`keys`]: per-thread keys cleared before the memory they name is
//!   freed (the glue's allocator's per-thread interpreter cache).
//! * [`gate`]: the glue's allocator adapters' switch from unlocked calls
//!   (serialised by the main GIL) to locked ones, with an asymmetric
//!   barrier ([`membarrier`]).
//!
//! The model tests are `#[cfg(test)]` modules beside the protocols they
//! check (`models` here and in [`gate`]; in the engine, the heap's remote
//! frees and the nursery's slots); each names the mutations (a weakened
//! ordering, a dropped step) that it catches, and `scripts/mutants.py`
//! applies those mutations and checks that the models fail.

pub mod gate;
pub mod keys;
pub mod membarrier;
pub mod memory;
pub mod spin_lock;
pub mod stack;

pub use keys::{KeyRegistry, KeySlot, NO_KEY};
#[cfg(any(test, feature = "loom"))]
pub use memory::Loom;
pub use memory::{Atomic, AtomicInt, Memory, Std};
pub use spin_lock::{SpinGuard, SpinLock};
pub use stack::{IntrusiveStack, Links};

// Loom explores the interleavings itself; its thread stacks need system
// calls Miri does not run, so the models are not built under Miri.
#[cfg(all(test, not(miri)))]
mod models;

/// For tests: how many rounds, threads or blocks a test uses: `n`, or
/// `under_miri` when it runs under Miri, which interprets every step (a few
/// thousand times slower) and checks each for undefined behaviour. Small
/// counts still cover every path, contention included: Miri's scheduler
/// preempts threads at random points, and each seed interleaves them
/// differently. (Here so that every crate's tests, unit and integration,
/// share it.)
#[doc(hidden)]
pub const fn iterations(n: usize, under_miri: usize) -> usize {
    if cfg!(miri) {
        under_miri
    } else {
        n
    }
}

/// Runs a loom model with the settings every interheap model uses: at most
/// three preemptions per execution (every bug the models catch needs at most
/// two; `LOOM_MAX_PREEMPTIONS` overrides it).
///
/// A model must not have two threads waiting for the same [`SpinLock`] at
/// once: loom's depth-first search then schedules the two waiters against
/// each other first (each yield lets the other run) and never reaches the
/// holder, so the execution exceeds loom's branch limit. One waiter and the
/// holder are explored completely.
#[cfg(any(test, feature = "loom"))]
pub fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(3);
    }
    builder.check(f);
}
