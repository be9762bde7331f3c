//! The hooks' bookkeeping under real concurrency: three threads, each with
//! its own nursery, record allocations, frees and reallocations of blocks in
//! the shared [`Tracker`] (nurseries, the sharded block table, the ledger),
//! through the fast paths when they take the call and the general paths
//! otherwise, as `cpython/src/hooks.rs` does. Blocks are handed to the next
//! thread, which frees them (frees of another nursery's blocks); a thread
//! may retire its nursery and adopt another mid-run.
//!
//! The tracker never touches the memory, but its table relies on live blocks
//! not overlapping, as with any allocator: fresh addresses are 528 bytes
//! apart (33 granules, so they spread over every nursery slot), which no
//! block small enough for the granule map reaches past. An address is
//! unique among live blocks by construction: a thread allocates from its own
//! pool of addresses, and an address joins the pool of whoever frees it. Pools
//! are small, so blocks of all threads collide in nursery slots and evict
//! each other into the table. At the end, every interpreter's and domain's
//! live bytes and blocks must equal what the threads still hold; once those
//! are freed, nothing may be left, in the figures or in the table.
#![no_main]

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Barrier;
use std::thread;

use interheap_engine::{BlockRecord, BucketId, Domain, Tracker};
use libfuzzer_sys::fuzz_target;

const THREADS: usize = 3;
/// Interpreter IDs the blocks are charged to.
const INTERPRETERS: i64 = 3;

static TRACKER: Tracker = Tracker::new();

/// A live block: address and what the tracker should hold for it.
type Live = (usize, BlockRecord);

struct Worker<'a> {
    t: usize,
    pool: Vec<usize>,
    next_fresh: usize,
    live: Vec<Live>,
    nursery: &'a interheap_engine::Nursery,
}

impl Worker<'_> {
    fn address(&mut self, pick: u8) -> usize {
        // Reuse a freed address most of the time (slot collisions), else a fresh one.
        if !self.pool.is_empty() && !pick.is_multiple_of(4) {
            return self.pool.swap_remove(pick as usize % self.pool.len());
        }
        self.next_fresh += 528;
        ((self.t + 1) << 32) + self.next_fresh
    }

    fn alloc(&mut self, a: u8, b: u8, c: u8) {
        let addr = self.address(c);
        let id = (a as i64) % INTERPRETERS;
        let domain = Domain::ALL[(a as usize >> 2) % Domain::COUNT];
        let size = ((b as usize) << 4 | c as usize & 15) * if a & 0x80 != 0 { 97 } else { 1 };
        let rec = BlockRecord { size, owner: BucketId::for_interpreter(Some(id)), domain };
        if !TRACKER.allocated_fast(self.nursery, id, domain, false, addr, size) {
            TRACKER.allocated(Some(self.nursery), rec.owner, domain, addr, size);
        }
        self.live.push((addr, rec));
    }

    fn free(&mut self, (addr, rec): Live) {
        if !TRACKER.freeing_fast(self.nursery, rec.domain, false, addr) {
            let freed = TRACKER.freeing(Some(self.nursery), rec.domain, addr);
            assert_eq!(freed, Some(rec.size), "the free of {addr:#x} found another record");
        }
        self.pool.push(addr);
    }

    fn realloc(&mut self, nth: u8, size: u8, pick: u8) {
        if self.live.is_empty() {
            return;
        }
        let i = nth as usize % self.live.len();
        let (from, old) = self.live[i];
        let to = if pick & 1 == 0 { from } else { self.address(pick) };
        let got = TRACKER.reallocating(Some(self.nursery), from);
        assert_eq!(got, Some(old), "the realloc of {from:#x} found another record");
        let new_size = size as usize * 24;
        TRACKER.reallocated(Some(self.nursery), old.owner, old.domain, from, got, to, new_size);
        if to != from {
            self.pool.push(from);
        }
        // A reallocated block stays with the bucket and domain it was allocated in.
        self.live[i] = (to, BlockRecord { size: new_size, ..old });
    }
}

fn run(t: usize, ops: &[u8], to_next: Sender<Live>, from_prev: Receiver<Live>) -> Worker<'static> {
    let mut w =
        Worker { t, pool: Vec::new(), next_fresh: 0, live: Vec::new(), nursery: TRACKER.adopt_nursery() };
    for op in ops.chunks_exact(4) {
        let (kind, a, b, c) = (op[0] % 8, op[1], op[2], op[3]);
        match kind {
            0..=2 => w.alloc(a, b, c),
            3 | 4 if !w.live.is_empty() => {
                let block = w.live.swap_remove(a as usize % w.live.len());
                w.free(block);
            }
            5 if !w.live.is_empty() => {
                let block = w.live.swap_remove(a as usize % w.live.len());
                let _ = to_next.send(block);
            }
            6 => w.realloc(a, b, c),
            7 if a % 8 == 0 => {
                TRACKER.retire_nursery(w.nursery);
                w.nursery = TRACKER.adopt_nursery();
            }
            _ => {
                // Frees of blocks another thread allocated (in its nursery, or evicted to the table).
                while let Ok(block) = from_prev.try_recv() {
                    w.free(block);
                }
            }
        }
    }
    // What is still in flight is kept: the check below counts it as live.
    drop(to_next);
    w.live.extend(from_prev);
    w
}

/// Per (bucket, domain index): live blocks and bytes.
fn totals<'a>(blocks: impl Iterator<Item = &'a Live>) -> HashMap<(BucketId, usize), (i64, i64)> {
    let mut out = HashMap::new();
    for (_, rec) in blocks {
        let entry = out.entry((rec.owner, rec.domain.index())).or_insert((0, 0));
        entry.0 += 1;
        entry.1 += rec.size as i64;
    }
    out
}

fn check_figures(expected: &HashMap<(BucketId, usize), (i64, i64)>) {
    let (snap, _) = TRACKER.census();
    for bucket in &snap.buckets {
        for domain in Domain::ALL {
            let d = bucket.domains[domain.index()];
            let want = expected.get(&(bucket.bucket, domain.index())).copied().unwrap_or((0, 0));
            assert_eq!((d.live_blocks, d.live_bytes), want, "{:?} {}", bucket.kind, domain.name());
        }
    }
    assert_eq!(snap.missed_frees, [0; Domain::COUNT]);
    assert_eq!(snap.untracked_frees, [0; Domain::COUNT]);
}

fuzz_target!(|data: &[u8]| {
    TRACKER.reset();
    let share = data.len() / THREADS / 4 * 4;
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..THREADS).map(|_| channel::<Live>()).unzip();
    let mut receivers: Vec<_> = receivers.into_iter().collect();
    receivers.rotate_right(1); // thread t receives from thread t - 1
    let barrier = Barrier::new(THREADS);
    let workers: Vec<Worker<'static>> = thread::scope(|s| {
        let handles: Vec<_> = receivers
            .into_iter()
            .enumerate()
            .map(|(t, from_prev)| {
                let (to_next, ops) = (senders[(t + 1) % THREADS].clone(), &data[t * share..(t + 1) * share]);
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    run(t, ops, to_next, from_prev)
                })
            })
            .collect();
        drop(senders);
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    check_figures(&totals(workers.iter().flat_map(|w| w.live.iter())));
    // Everything freed now, each block by a thread other than its allocator
    // where there are two, then every nursery retired into the table.
    let mut workers = workers;
    let mut held: Vec<Live> = workers.iter_mut().flat_map(|w| std::mem::take(&mut w.live)).collect();
    held.reverse();
    for (i, block) in held.into_iter().enumerate() {
        workers[i % THREADS].free(block);
    }
    for w in &workers {
        TRACKER.retire_nursery(w.nursery);
    }
    check_figures(&HashMap::new());
    assert_eq!(TRACKER.table().stats().entries, 0, "records left in the table");
});
