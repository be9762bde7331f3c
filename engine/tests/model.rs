//! Property tests: the block table and ledger against a plain `HashMap` model.

use std::collections::HashMap;

use interheap_engine::{BlockRecord, BlockTable, BucketId, Domain, Ledger};
use proptest::prelude::*;

mod support;
use support::{iterations, proptest_config};

#[derive(Clone, Debug)]
enum Op {
    Alloc { addr: usize, size: usize, owner: i64, domain: usize },
    Free { addr: usize },
    Realloc { from: usize, to: usize, size: usize },
}

fn op() -> impl Strategy<Value = Op> {
    // A small address space forces collisions, reuse and long probe runs.
    let addr = (1usize..512).prop_map(|a| a * 16);
    let size = prop_oneof![0usize..1024, Just(usize::MAX / 2), Just((1usize << 44) - 1)];
    prop_oneof![
        (addr.clone(), size.clone(), -1i64..6, 0usize..3).prop_map(|(addr, size, owner, domain)| Op::Alloc {
            addr,
            size,
            owner,
            domain
        }),
        addr.clone().prop_map(|addr| Op::Free { addr }),
        (addr.clone(), addr, size).prop_map(|(from, to, size)| Op::Realloc { from, to, size }),
    ]
}

/// Bytes a block of `size` is taken to span here: sizes reach 2^63 in an
/// address space of 8 KiB, so at most its first 512 (all that decides where a
/// record lives: a small block's record takes bytes of its first granules).
fn extent(size: usize) -> usize {
    size.clamp(1, 512)
}

/// Whether a block of `size` at `addr` would overlap a live one at another
/// address (other than `moving`, a block being reallocated): no allocator
/// hands out memory inside a live block. The same address again is a
/// missed free, which the table must see.
fn clashes(model: &HashMap<usize, BlockRecord>, addr: usize, size: usize, moving: Option<usize>) -> bool {
    let end = addr + extent(size);
    model.iter().any(|(&a, r)| a != addr && Some(a) != moving && a < end && addr < a + extent(r.size))
}

/// Mirrors what the CPython hooks do with the table and the ledger.
fn apply(table: &BlockTable, ledger: &Ledger, model: &mut HashMap<usize, BlockRecord>, op: &Op) {
    match *op {
        Op::Alloc { addr, size, owner, domain } => {
            if clashes(model, addr, size, None) {
                return;
            }
            let owner = BucketId::for_interpreter((owner >= 0).then_some(owner));
            let rec = BlockRecord { size, owner, domain: Domain::from_index(domain).unwrap() };
            ledger.on_alloc(owner, rec.domain, size);
            let stale = table.insert(addr, rec);
            assert_eq!(stale, model.insert(addr, rec));
            if let Some(s) = stale {
                ledger.on_missed_free(s.owner, s.domain, s.size);
            }
        }
        Op::Free { addr } => {
            let got = table.remove(addr);
            assert_eq!(got, model.remove(&addr));
            match got {
                Some(r) => ledger.on_free(r.owner, r.domain, r.size),
                None => ledger.on_untracked_free(Domain::Raw),
            }
        }
        Op::Realloc { from, to, size } => {
            if model.contains_key(&from) && clashes(model, to, size, Some(from)) {
                return;
            }
            let Some(old) = table.remove(from) else { return };
            assert_eq!(Some(old), model.remove(&from));
            let rec = BlockRecord { size, ..old };
            ledger.on_realloc(old.owner, old.domain, old.size, size);
            let stale = table.insert(to, rec);
            assert_eq!(stale, model.insert(to, rec));
            if let Some(s) = stale {
                ledger.on_missed_free(s.owner, s.domain, s.size);
            }
        }
    }
}

proptest! {
    #![proptest_config(proptest_config(256, 2))]

    #[test]
    fn table_and_ledger_match_model(ops in proptest::collection::vec(op(), 1..iterations(400, 50))) {
        let table = BlockTable::new();
        let ledger = Ledger::new();
        let mut model = HashMap::new();
        for op in &ops {
            apply(&table, &ledger, &mut model, op);
        }
        // Every address the model holds is in the table with the same record.
        for (&addr, rec) in &model {
            prop_assert_eq!(table.get(addr), Some(*rec));
        }
        prop_assert_eq!(table.stats().entries, model.len());
        // The ledger's live figures equal what the model says is live.
        let snap = ledger.snapshot();
        for bucket in &snap.buckets {
            for domain in Domain::ALL {
                let expect_bytes: usize = model.values()
                    .filter(|r| r.owner == bucket.bucket && r.domain == domain)
                    .fold(0usize, |acc, r| acc.wrapping_add(r.size));
                let expect_blocks = model.values()
                    .filter(|r| r.owner == bucket.bucket && r.domain == domain).count();
                let d = bucket.domains[domain.index()];
                prop_assert_eq!(d.live_bytes as u64, expect_bytes as u64);
                prop_assert_eq!(d.live_blocks, expect_blocks as i64);
            }
        }
    }
}

/// Operations of several "threads" (each with its own nursery) on one tracker.
#[derive(Clone, Debug)]
enum ThreadOp {
    Alloc {
        thread: usize,
        addr: usize,
        size: usize,
        owner: i64,
    },
    Free {
        thread: usize,
        addr: usize,
    },
    Realloc {
        thread: usize,
        from: usize,
        to: usize,
        size: usize,
    },
    /// The thread ends (its nursery is retired) and a new one takes its place.
    Restart {
        thread: usize,
    },
}

const THREADS: usize = 3;

fn thread_op() -> impl Strategy<Value = ThreadOp> {
    // Addresses collide in nursery slots (1024 slots, 16-byte granules) so
    // that evictions happen, and are shared between threads.
    let addr = prop_oneof![(1usize..64).prop_map(|a| a * 16), (1usize..64).prop_map(|a| a * 16 + 16 * 1024)];
    let thread = 0..THREADS;
    prop_oneof![
        4 => (thread.clone(), addr.clone(), 0usize..5000, 0i64..3)
            .prop_map(|(thread, addr, size, owner)| ThreadOp::Alloc { thread, addr, size, owner }),
        4 => (thread.clone(), addr.clone()).prop_map(|(thread, addr)| ThreadOp::Free { thread, addr }),
        2 => (thread.clone(), addr.clone(), addr, 0usize..5000)
            .prop_map(|(thread, from, to, size)| ThreadOp::Realloc { thread, from, to, size }),
        1 => thread.prop_map(|thread| ThreadOp::Restart { thread }),
    ]
}

proptest! {
    #![proptest_config(proptest_config(256, 2))]

    /// With nurseries in play (own frees, other threads' frees, evictions,
    /// retirements), every figure still matches a plain model.
    #[test]
    fn tracker_with_nurseries_matches_model(
        ops in proptest::collection::vec(thread_op(), 1..iterations(300, 50)),
        serialized in any::<bool>(),
    ) {
        use interheap_engine::Tracker;
        let tracker = Tracker::new();
        // Both ways of keeping live bytes (plain stores when the caller
        // serialises updates, read-modify-writes otherwise) give the same figures.
        tracker.set_serialized(Domain::Object, serialized);
        let mut nurseries: Vec<_> = (0..THREADS).map(|_| tracker.adopt_nursery()).collect();
        let mut model: HashMap<usize, BlockRecord> = HashMap::new();
        let mut untracked = 0u64;
        for op in &ops {
            match *op {
                ThreadOp::Alloc { thread, addr, size, owner } => {
                    if model.contains_key(&addr) || clashes(&model, addr, size, None) {
                        continue; // an allocator never hands out live memory
                    }
                    let owner = BucketId::for_interpreter(Some(owner));
                    tracker.allocated(Some(nurseries[thread]), owner, Domain::Object, addr, size);
                    model.insert(addr, BlockRecord { size, owner, domain: Domain::Object });
                }
                ThreadOp::Free { thread, addr } => {
                    tracker.freeing(Some(nurseries[thread]), Domain::Object, addr);
                    if model.remove(&addr).is_none() {
                        untracked += 1;
                    }
                }
                ThreadOp::Realloc { thread, from, to, size } => {
                    let Some(old) = model.get(&from).copied() else { continue };
                    if to != from && model.contains_key(&to) || clashes(&model, to, size, Some(from)) {
                        continue;
                    }
                    let local = Some(nurseries[thread]);
                    let rec = tracker.reallocating(local, from);
                    prop_assert_eq!(rec, Some(old));
                    tracker.reallocated(local, old.owner, Domain::Object, from, rec, to, size);
                    model.remove(&from);
                    model.insert(to, BlockRecord { size, ..old });
                }
                ThreadOp::Restart { thread } => {
                    tracker.retire_nursery(nurseries[thread]);
                    nurseries[thread] = tracker.adopt_nursery();
                }
            }
        }
        let (snap, table) = tracker.census();
        prop_assert_eq!(table.entries, model.len());
        prop_assert_eq!(table.live_bytes, model.values().map(|r| r.size as u64).sum::<u64>());
        prop_assert_eq!(snap.untracked_frees[Domain::Object.index()], untracked);
        prop_assert_eq!(snap.missed_frees, [0; 3]);
        for bucket in &snap.buckets {
            let d = bucket.domains[Domain::Object.index()];
            let mine: Vec<_> = model.values().filter(|r| r.owner == bucket.bucket).collect();
            prop_assert_eq!(d.live_blocks, mine.len() as i64);
            prop_assert_eq!(d.live_bytes, mine.iter().map(|r| r.size as i64).sum::<i64>());
        }
        for nursery in nurseries {
            tracker.retire_nursery(nursery);
        }
        prop_assert_eq!(tracker.table().stats().entries, model.len());
    }
}
