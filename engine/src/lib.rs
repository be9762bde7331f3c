//! interheap's engine: the parts of interheap that know nothing about Python.
//!
//! This crate owns the concurrent data structures that the CPython glue
//! (`interheap-cpython`) drives from inside allocator hooks:
//!
//! * [`BlockTable`]: an out-of-band, sharded map from a block's address to what
//!   we know about it (exact size, owning bucket, domain). Hooks installed after
//!   CPython starts cannot add headers to blocks (they must forward pointers
//!   unchanged), so this table is where exact sizes live.
//!   Small blocks' records live in its [`granule_map`]: one byte per 16-byte
//!   granule of address space, found from the address alone.
//! * [`Ledger`]: per-bucket (per interpreter, plus a "no interpreter" bucket),
//!   per-[`Domain`] counters: live and peak bytes, allocation, reallocation and
//!   free counts. Lock-free; buckets are created on first use and never freed, so
//!   an interpreter's figures outlive it.
//! * [`Nursery`]: a per-thread cache of young blocks, so that blocks that
//!   die young on the thread that made them never touch the shared table.
//! * [`Tracker`]: all of these together, with the accounting rules a hook applies
//!   around each forwarded malloc, calloc, realloc and free.
//! * [`limits`]: per-interpreter memory limits: the [`Budget`] rule that
//!   refuses a request which would take an interpreter over its limit, shared
//!   by the hooks (over the ledger's live bytes) and the allocator.
//! * [`sites`]: sampled allocation sites: byte sampling, the stacks of the
//!   sampled blocks while they live, and unbiased estimates per interpreter,
//!   domain and stack.
//! * [`checker`]: the checker's findings (cross-interpreter frees, domain
//!   mismatches, calls without a thread state, double frees, foreign
//!   pointers), grouped by call site and rate-limited, its quarantine, and
//!   the freed addresses that tell a double free from an old block's free.
//! * [`heap`]: interheap's own allocator: thread-safe heaps with one owner each
//!   (a thread, or one interpreter's GIL), remote-free lists, exact figures
//!   per heap and size class, and heaps that can end while their blocks live on.
//!
//! Everything here is callable from any thread at any time, including from
//! inside a `malloc` hook: nothing allocates through Python, nothing unwinds
//! (arithmetic is wrapping, no `unwrap` on hot paths), and locks are sharded.

pub mod block_table;
pub mod checker;
pub mod domain;
pub mod grants;
pub mod granule_map;
pub mod heap;
pub mod ledger;
pub mod limits;
pub mod nursery;
pub mod sites;
pub mod tracker;

pub use block_table::{BlockRecord, BlockTable, TableStats};
pub use domain::Domain;
pub use ledger::{
    BucketId, BucketKind, BucketSnapshot, Describer, Description, DomainSnapshot, InterpreterInfo, Ledger,
    LedgerSnapshot,
};
pub use limits::{parse_size, Admission, Budget, BudgetSnapshot};
pub use nursery::{Nurseries, Nursery};
pub use tracker::{FastPath, Tracker};

#[cfg(test)]
pub(crate) use interheap_sync::iterations;

/// The chunk published in `slot`, publishing an all-zero one first if there
/// is none: lazily allocated storage that is never moved or freed while its
/// owner lives (the ledger's buckets, the grant registry's slots). Of two
/// threads publishing at once, the loser frees its chunk and returns the
/// winner's.
///
/// # Safety
///
/// All-zero bytes must be a valid `T`, and a chunk published in `slot` must
/// stay allocated, unmoved, for as long as the returned pointer is used.
#[inline]
pub(crate) unsafe fn published_or_zeroed<T>(slot: &std::sync::atomic::AtomicPtr<T>) -> *mut T {
    use std::sync::atomic::Ordering::{AcqRel, Acquire};
    let existing = slot.load(Acquire);
    if !existing.is_null() {
        return existing;
    }
    // SAFETY: the caller promises all-zero bytes are a valid T.
    let fresh = Box::into_raw(unsafe { Box::<T>::new_zeroed().assume_init() });
    match slot.compare_exchange(std::ptr::null_mut(), fresh, AcqRel, Acquire) {
        Ok(_) => fresh,
        Err(winner) => {
            // SAFETY: `fresh` came from Box::into_raw above and was never shared.
            drop(unsafe { Box::from_raw(fresh) });
            winner
        }
    }
}
