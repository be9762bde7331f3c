//! The accounting rules a PEP 445 hook applies around each forwarded call.
//!
//! A [`Tracker`] combines the [`BlockTable`] (what each live block is) and the
//! [`Ledger`] (what each bucket holds). It knows nothing of CPython: the glue
//! forwards the real call and reports what happened.
//!
//! Rules (each keeps `allocations - frees == live blocks` true per bucket):
//!
//! * A successful allocation records the block in the caller's bucket.
//! * A free of a recorded block is charged to the bucket that allocated it,
//!   even from another thread or interpreter, even after that interpreter
//!   ended. A free of an unknown block (allocated before tracking began) is
//!   counted apart, as an untracked free, and changes no bucket.
//! * A reallocation of a recorded block keeps its owner and domain and moves
//!   the record if the address changed. A reallocation of an unknown block is
//!   an untracked free plus a fresh allocation by the caller.
//! * If an address comes back from the allocator while a record for it still
//!   exists, its free was missed (for example it was freed while another
//!   allocator was briefly installed): it is counted as a missed free.
//!
//! Ordering matters for correctness under concurrency, and the glue follows
//! it: forget a block *before* forwarding its free (after the free, another
//! thread may be handed the same address and record it), and record a block
//! *after* the forwarded allocation returns it.

use crate::block_table::{BlockRecord, BlockTable, TableStats};
use crate::domain::Domain;
use crate::ledger::{BucketId, Ledger, LedgerSnapshot};

/// Block table plus ledger, with the accounting rules in the module docs.
pub struct Tracker {
    table: BlockTable,
    ledger: Ledger,
}

impl Default for Tracker {
    fn default() -> Self {
        Self::new()
    }
}

impl Tracker {
    /// An empty tracker; `const` so that it can be a `static`.
    pub const fn new() -> Tracker {
        Tracker { table: BlockTable::new(), ledger: Ledger::new() }
    }

    /// The bucket counters.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The block table.
    pub fn table(&self) -> &BlockTable {
        &self.table
    }

    /// `owner` allocated `size` bytes at `addr` (non-zero) in `domain`.
    pub fn allocated(&self, owner: BucketId, domain: Domain, addr: usize, size: usize) {
        self.ledger.on_alloc(owner, domain, size);
        let stale = self.table.insert(addr, BlockRecord { size, owner, domain });
        if let Some(s) = stale {
            self.ledger.on_missed_free(s.owner, s.domain, s.size);
        }
    }

    /// An allocation or reallocation request by `owner` failed.
    pub fn failed(&self, owner: BucketId, domain: Domain) {
        self.ledger.on_failure(owner, domain);
    }

    /// The block at `addr` (non-zero) is about to be freed through `domain`.
    /// Call before forwarding the free.
    pub fn freeing(&self, domain: Domain, addr: usize) {
        match self.table.remove(addr) {
            Some(rec) => self.ledger.on_free(rec.owner, rec.domain, rec.size),
            None => self.ledger.on_untracked_free(domain),
        }
    }

    /// The block at `addr` (non-zero) is about to be reallocated. Call before
    /// forwarding; pass the result to [`Tracker::reallocated`].
    pub fn reallocating(&self, addr: usize) -> Option<BlockRecord> {
        self.table.remove(addr)
    }

    /// A reallocation of `old_addr` (with record `old` from
    /// [`Tracker::reallocating`]) by `owner` returned `new_addr` (0: it failed
    /// and the old block is untouched) for `new_size` bytes.
    pub fn reallocated(
        &self,
        owner: BucketId,
        domain: Domain,
        old_addr: usize,
        old: Option<BlockRecord>,
        new_addr: usize,
        new_size: usize,
    ) {
        match (old, new_addr) {
            (old, 0) => {
                if let Some(rec) = old {
                    // The old block is still live; put its record back.
                    self.table.insert(old_addr, rec);
                }
                self.ledger.on_failure(owner, domain);
            }
            (Some(rec), _) => {
                self.ledger.on_realloc(rec.owner, rec.domain, rec.size, new_size);
                let stale = self.table.insert(new_addr, BlockRecord { size: new_size, ..rec });
                if let Some(s) = stale {
                    self.ledger.on_missed_free(s.owner, s.domain, s.size);
                }
            }
            (None, _) => {
                self.ledger.on_untracked_free(domain);
                self.allocated(owner, domain, new_addr, new_size);
            }
        }
    }

    /// Figures of every used bucket.
    pub fn snapshot(&self) -> LedgerSnapshot {
        self.ledger.snapshot()
    }

    /// The block table's occupancy and memory.
    pub fn table_stats(&self) -> TableStats {
        self.table.stats()
    }

    /// Forgets every block and zeroes every counter (a fresh start).
    pub fn reset(&self) {
        self.table.clear();
        self.ledger.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: BucketId = BucketId::NO_INTERPRETER;

    fn interp(id: i64) -> BucketId {
        BucketId::for_interpreter(Some(id))
    }

    fn mem(t: &Tracker, b: BucketId) -> crate::DomainSnapshot {
        t.ledger.bucket_snapshot(b).domains[Domain::Mem.index()]
    }

    #[test]
    fn cross_interpreter_free_is_charged_to_owner() {
        let t = Tracker::new();
        t.allocated(interp(1), Domain::Mem, 0x100, 64);
        t.freeing(Domain::Mem, 0x100);
        assert_eq!(mem(&t, interp(1)).live_bytes, 0);
        assert_eq!(mem(&t, interp(1)).frees, 1);
        assert_eq!(mem(&t, interp(2)), crate::DomainSnapshot::default());
    }

    #[test]
    fn untracked_free_changes_no_bucket() {
        let t = Tracker::new();
        t.freeing(Domain::Raw, 0x500);
        let snap = t.snapshot();
        assert!(snap.buckets.is_empty());
        assert_eq!(snap.untracked_frees, [1, 0, 0]);
    }

    #[test]
    fn realloc_moves_record_and_keeps_owner() {
        let t = Tracker::new();
        t.allocated(interp(3), Domain::Mem, 0x100, 10);
        let old = t.reallocating(0x100);
        t.reallocated(interp(0), Domain::Mem, 0x100, old, 0x200, 30);
        assert_eq!(t.table.get(0x100), None);
        assert_eq!(t.table.get(0x200).map(|r| (r.size, r.owner)), Some((30, interp(3))));
        let s = mem(&t, interp(3));
        assert_eq!((s.live_bytes, s.peak_bytes, s.live_blocks, s.reallocations), (30, 30, 1, 1));
    }

    #[test]
    fn failed_realloc_keeps_block() {
        let t = Tracker::new();
        t.allocated(interp(1), Domain::Mem, 0x100, 10);
        let old = t.reallocating(0x100);
        t.reallocated(interp(1), Domain::Mem, 0x100, old, 0, 1 << 40);
        assert_eq!(t.table.get(0x100).map(|r| r.size), Some(10));
        let s = mem(&t, interp(1));
        assert_eq!((s.live_bytes, s.failures, s.reallocations), (10, 1, 0));
    }

    #[test]
    fn realloc_of_untracked_block_is_a_fresh_allocation() {
        let t = Tracker::new();
        let old = t.reallocating(0x100);
        assert_eq!(old, None);
        t.reallocated(A, Domain::Raw, 0x100, old, 0x100, 48);
        let snap = t.snapshot();
        assert_eq!(snap.untracked_frees[0], 1);
        let raw = snap.buckets[0].domains[0];
        assert_eq!((raw.allocations, raw.live_bytes, raw.live_blocks), (1, 48, 1));
    }

    #[test]
    fn reused_address_counts_missed_free() {
        let t = Tracker::new();
        t.allocated(interp(1), Domain::Object, 0x100, 10);
        // The free of 0x100 happened while we were not looking.
        t.allocated(interp(2), Domain::Object, 0x100, 20);
        let snap = t.snapshot();
        assert_eq!(snap.missed_frees[Domain::Object.index()], 1);
        let one = t.ledger.bucket_snapshot(interp(1)).domains[2];
        let two = t.ledger.bucket_snapshot(interp(2)).domains[2];
        assert_eq!((one.live_bytes, one.live_blocks), (0, 0));
        assert_eq!((two.live_bytes, two.live_blocks), (20, 1));
    }

    #[test]
    fn reset_is_a_fresh_start() {
        let t = Tracker::new();
        t.allocated(interp(1), Domain::Object, 0x100, 10);
        t.reset();
        assert_eq!(t.table_stats().entries, 0);
        assert!(t.snapshot().buckets.is_empty());
        t.freeing(Domain::Object, 0x100);
        assert_eq!(t.snapshot().untracked_frees[2], 1);
    }
}
