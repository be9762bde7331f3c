//! Property tests: the block table and ledger against a plain `HashMap` model.

use std::collections::HashMap;

use interheap_engine::{BlockRecord, BlockTable, BucketId, Domain, Ledger};
use proptest::prelude::*;

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

/// Mirrors what the CPython hooks do with the table and the ledger.
fn apply(table: &BlockTable, ledger: &Ledger, model: &mut HashMap<usize, BlockRecord>, op: &Op) {
    match *op {
        Op::Alloc { addr, size, owner, domain } => {
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
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn table_and_ledger_match_model(ops in proptest::collection::vec(op(), 1..400)) {
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
