//! interheap's figures read from the interheap allocator's heaps, with no hook.
//!
//! When the interheap allocator serves every domain and its heaps keep the
//! size each block was asked for (`allocator::InstallOptions::requested_sizes`,
//! on by default under `interheap-python -m interheap`), each interpreter's
//! mem, object and raw heaps already count what the hooks would: bytes asked
//! for, allocations, reallocations, frees, failures and exact peaks, per
//! interpreter and domain, with a block freed by another thread or
//! interpreter charged to the heap that owns it. Installing PEP 445 hooks on
//! top would count it all a second time at about 115 instructions per
//! allocation and free; reading the heaps costs nothing per call.
//!
//! What differs from the hooks' figures:
//! * They cover the process from its start, not from an install.
//! * Calls made without a thread state come from per-thread heaps, which
//!   know no domain: they are listed as raw calls of the "no interpreter"
//!   entry, and its peak is the sum of those heaps' peaks (an upper bound).
//!
//! The allocator lives in the launcher's (or the embedding library's) copy
//! of this crate; the Python module has its own copy. So the figures cross
//! between them as an array of [`FiguresRecord`] (`#[repr(C)]`, the same
//! definition on both sides) through the C API's
//! `interheap_allocator_figures`.

use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};

use interheap_engine::heap::HeapSnapshot;
use interheap_engine::ledger::{BucketSnapshot, DomainSnapshot, LedgerSnapshot};
use interheap_engine::{BucketId, BudgetSnapshot, Domain, TableStats};

use crate::hooks::TRACKER;

/// Reads the allocator's records (in the Python module, through the C API);
/// `None` when the allocator cannot give them.
pub type RecordsSource = fn() -> Option<Vec<FiguresRecord>>;

/// The source the figures are read from (a `RecordsSource` as a pointer,
/// which keeps its provenance: calling a function pointer made from an
/// integer is undefined behaviour; null: the hooks' tracker).
static SOURCE: AtomicPtr<()> = AtomicPtr::new(ptr::null_mut());

/// Reads the figures from `source` from now on, instead of the hooks'
/// tracker: false, changing nothing, if it has none to give.
pub fn read_from_heaps(source: RecordsSource) -> bool {
    if source().is_none() {
        return false;
    }
    SOURCE.store(source as *mut (), Ordering::Release);
    true
}

/// Reads the figures from the hooks' tracker again.
pub fn stop_reading_from_heaps() {
    SOURCE.store(ptr::null_mut(), Ordering::Release);
}

/// Whether the figures come from the allocator's heaps.
pub fn reading_from_heaps() -> bool {
    !SOURCE.load(Ordering::Acquire).is_null()
}

fn heap_snapshot() -> Option<LedgerSnapshot> {
    let pointer = SOURCE.load(Ordering::Acquire);
    if pointer.is_null() {
        return None;
    }
    // SAFETY: only `read_from_heaps` stores a non-null value: a RecordsSource.
    let source = unsafe { std::mem::transmute::<*mut (), RecordsSource>(pointer) };
    source().map(|records| ledger_snapshot(&records))
}

/// Every interpreter's figures now, from wherever they are read.
pub fn snapshot() -> LedgerSnapshot {
    heap_snapshot().unwrap_or_else(|| TRACKER.snapshot())
}

/// [`snapshot`], with the hooks' block table's figures (empty when read from the heaps).
pub fn census() -> (LedgerSnapshot, TableStats) {
    match heap_snapshot() {
        Some(snap) => (snap, TableStats::default()),
        None => TRACKER.census(),
    }
}

/// One domain's figures in a [`FiguresRecord`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DomainRecord {
    pub live_bytes: i64,
    pub peak_bytes: u64,
    pub allocations: u64,
    pub reallocations: u64,
    /// Owner and remote frees together.
    pub frees: u64,
    pub failures: u64,
}

impl DomainRecord {
    /// A heap's figures as one domain's.
    pub fn from_heap(s: &HeapSnapshot) -> DomainRecord {
        DomainRecord {
            live_bytes: s.live_bytes,
            peak_bytes: s.peak_bytes,
            allocations: s.allocations_by_callers(),
            reallocations: s.reallocations,
            frees: s.frees_by_callers(),
            failures: s.failures,
        }
    }

    /// Adds another heap's figures (peaks add up: an upper bound of the sum's peak).
    pub fn add(&mut self, other: &DomainRecord) {
        self.live_bytes = self.live_bytes.wrapping_add(other.live_bytes);
        self.peak_bytes = self.peak_bytes.wrapping_add(other.peak_bytes);
        self.allocations = self.allocations.wrapping_add(other.allocations);
        self.reallocations = self.reallocations.wrapping_add(other.reallocations);
        self.frees = self.frees.wrapping_add(other.frees);
        self.failures = self.failures.wrapping_add(other.failures);
    }

    fn snapshot(&self) -> DomainSnapshot {
        DomainSnapshot {
            live_bytes: self.live_bytes,
            peak_bytes: self.peak_bytes,
            live_blocks: self.allocations.wrapping_sub(self.frees) as i64,
            allocations: self.allocations,
            reallocations: self.reallocations,
            frees: self.frees,
            failures: self.failures,
        }
    }
}

/// One interpreter's figures (or, with `id < 0`, those of calls made
/// without a thread state), as the allocator's heaps hold them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FiguresRecord {
    /// The interpreter ID, or -1 for calls without a thread state.
    pub id: i64,
    /// What is known of the interpreter (`interp::Origin::pack`; 0: nothing).
    pub info: u32,
    /// Whether `info` is final.
    pub settled: u32,
    /// When the interpreter ended (`interp_end::monotonic_ns`; 0: it has not).
    pub ended_at: u64,
    /// The interpreter's limit (-1: none), requests refused, the largest of them.
    pub limit: i64,
    pub refused: u64,
    pub largest_refused: u64,
    /// By [`Domain::index`].
    pub domains: [DomainRecord; Domain::COUNT],
}

/// The figures as the hooks' ledger presents them, so that every report,
/// the timeline and the Python API read them the same way.
pub fn ledger_snapshot(records: &[FiguresRecord]) -> LedgerSnapshot {
    let bucket_of = |r: &FiguresRecord| BucketId::for_interpreter((r.id >= 0).then_some(r.id));
    let mut records = records.to_vec();
    records.sort_by_key(bucket_of);
    // Interpreters whose IDs share the overflow bucket are listed once, added up.
    records.dedup_by(|later, kept| {
        if bucket_of(later) != bucket_of(kept) {
            return false;
        }
        for (k, l) in kept.domains.iter_mut().zip(later.domains.iter()) {
            k.add(l);
        }
        true
    });
    let buckets = records
        .iter()
        .map(|r| {
            let bucket = bucket_of(r);
            BucketSnapshot {
                bucket,
                kind: bucket.kind(),
                domains: r.domains.map(|d| d.snapshot()),
                info: r.info as interheap_engine::InterpreterInfo,
                settled: r.settled != 0,
                budget: BudgetSnapshot {
                    limit: u64::try_from(r.limit).ok(),
                    refused: r.refused,
                    largest_refused: r.largest_refused,
                    peak: 0,
                },
                ended_at: r.ended_at,
            }
        })
        .collect();
    LedgerSnapshot { buckets, ..LedgerSnapshot::default() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use interheap_engine::ledger::BucketKind;

    fn record(id: i64, live: i64) -> FiguresRecord {
        let mut r = FiguresRecord { id, limit: -1, ..FiguresRecord::default() };
        r.domains[Domain::Mem.index()] = DomainRecord {
            live_bytes: live,
            peak_bytes: live as u64 * 2,
            allocations: 5,
            frees: 3,
            ..Default::default()
        };
        r
    }

    #[test]
    fn records_become_buckets_in_ledger_order() {
        let snap = ledger_snapshot(&[record(3, 10), record(-1, 7), record(0, 20)]);
        let kinds: Vec<BucketKind> = snap.buckets.iter().map(|b| b.kind).collect();
        assert_eq!(
            kinds,
            [BucketKind::NoInterpreter, BucketKind::Interpreter(0), BucketKind::Interpreter(3)]
        );
        let main = &snap.buckets[1].domains[Domain::Mem.index()];
        assert_eq!((main.live_bytes, main.peak_bytes, main.live_blocks), (20, 40, 2));
        assert_eq!(snap.buckets[1].budget.limit, None);
    }

    #[test]
    fn interpreters_beyond_the_buckets_add_up_in_the_overflow_entry() {
        let big = interheap_engine::ledger::MAX_BUCKETS as i64 + 5;
        let snap = ledger_snapshot(&[record(big, 10), record(big + 1, 5), record(1, 1)]);
        assert_eq!(snap.buckets.len(), 2);
        let overflow = snap.buckets.last().unwrap();
        assert_eq!(overflow.kind, BucketKind::OverflowInterpreters);
        assert_eq!(overflow.domains[Domain::Mem.index()].live_bytes, 15);
    }
}
