//! Tests of the allocator (`interheap_engine::heap`): single-owner use,
//! remote frees across threads, ending and adoption, exact figures, and a
//! property test against a model.

use std::collections::HashMap;
use std::sync::mpsc;
use std::thread;

use interheap_engine::heap::os::SEGMENT_SIZE;
use interheap_engine::heap::{self, size_class, Heap, HeapLabel, HeapPool, Realloc, NO_OWNER, SLOT_SIZE};
use proptest::prelude::*;

mod support;
use support::{iterations, proptest_config};

fn label(id: i64) -> HeapLabel {
    HeapLabel { kind: 1, id, part: 0 }
}

/// The bytes of a `len`-byte block that `fill` and `check` touch: all of
/// them, or under Miri (where a byte costs microseconds and blocks go up to
/// 8 MiB) every 509th and the last 64, which still catches a block that
/// overlaps another or lost its contents in a move.
fn touched(len: usize) -> impl Iterator<Item = usize> {
    let (step, tail) = if cfg!(miri) { (509, len.saturating_sub(64)) } else { (1, len) };
    (0..len).step_by(step).chain(tail..len)
}

/// Fills a block with a pattern derived from its address and a seed.
fn fill(p: *mut u8, len: usize, seed: u8) {
    for i in touched(len) {
        // SAFETY: the block is ours and `len` bytes long.
        unsafe { *p.add(i) = seed.wrapping_add(i as u8) };
    }
}

fn check(p: *const u8, len: usize, seed: u8) -> bool {
    check_prefix(p, len, len, seed)
}

/// [`check`] for the first `len` bytes of a block that was filled over
/// `filled` bytes (and shrunk or moved since): the bytes `fill` touched
/// there, which under Miri are not `touched(len)`.
fn check_prefix(p: *const u8, filled: usize, len: usize, seed: u8) -> bool {
    // SAFETY: the block is ours and at least `len` bytes long.
    touched(filled).filter(|&i| i < len).all(|i| unsafe { *p.add(i) } == seed.wrapping_add(i as u8))
}

const SIZES: &[usize] = &[
    0,
    1,
    8,
    16,
    17,
    100,
    128,
    129,
    512,
    513,
    1000,
    4096,
    8192,
    8193,
    30_000,
    65_536,
    65_537,
    200_000,
    2 << 20,
    (2 << 20) + 1,
    5 << 20,
];

#[test]
fn blocks_are_aligned_distinct_usable_and_counted() {
    let h = Heap::new(label(1), 0x10);
    let mut blocks = Vec::new();
    for (i, &size) in SIZES.iter().enumerate() {
        // SAFETY: this thread owns `h`.
        let p = unsafe { h.alloc(size) };
        assert!(!p.is_null(), "size {size}");
        assert_eq!(p as usize % 16, 0, "size {size}");
        assert!(heap::owns(p), "size {size}");
        // SAFETY: `p` is live.
        let usable = unsafe { heap::usable_size(p) }.unwrap();
        assert!(usable >= size.max(1), "size {size} usable {usable}");
        fill(p, size, i as u8);
        blocks.push((p, size, i as u8, usable));
    }
    let snap = h.snapshot();
    let usable_total: usize = blocks.iter().map(|b| b.3).sum();
    assert_eq!(snap.live_bytes, usable_total as i64);
    assert_eq!(snap.peak_bytes, usable_total as u64);
    assert_eq!(snap.allocations(), SIZES.len() as u64);
    assert_eq!(snap.live_blocks(), SIZES.len() as u64);
    let huge = SIZES.iter().filter(|&&n| n > size_class::MAX_LARGE_SIZE).count() as u64;
    assert_eq!(snap.huge().allocations, huge, "blocks above MAX_LARGE_SIZE get segments of their own");
    for &(p, size, seed, _) in &blocks {
        assert!(check(p, size, seed), "size {size} was overwritten");
        // SAFETY: `p` is live and the owner frees it.
        assert!(unsafe { heap::free(p, |_| 0x10) });
    }
    let snap = h.snapshot();
    assert_eq!(snap.live_bytes, 0);
    assert_eq!(snap.live_blocks(), 0);
    assert_eq!(snap.frees(), SIZES.len() as u64);
    assert_eq!(snap.remote_frees(), 0);
    assert_eq!(snap.peak_bytes, usable_total as u64, "peak survives the frees");
}

#[test]
fn pointers_that_are_not_ours_are_refused_untouched() {
    let h = Heap::new(label(2), 0x20);
    let on_stack = [0u8; 64];
    let boxed = Box::new([0u8; 64]);
    for p in [on_stack.as_ptr(), boxed.as_ptr()] {
        assert!(!heap::owns(p));
        // SAFETY: not ours, so free touches nothing and reports false.
        assert!(!unsafe { heap::free(p as *mut u8, |_| 0x20) });
        // SAFETY: as above.
        assert_eq!(unsafe { heap::usable_size(p) }, None);
    }
    // SAFETY: this thread owns `h`.
    let p = unsafe { h.alloc(48) };
    assert!(heap::owns(p));
    // SAFETY: interior pointers are only inspected.
    assert!(!heap::owns(unsafe { p.add(8) }), "interior pointer");
    // SAFETY: the page header is not a block.
    assert!(!heap::owns(p.map_addr(|a| a & !(SEGMENT_SIZE - 1))), "segment header");
    // SAFETY: `p` is live; its owner frees it.
    unsafe { heap::free(p, |_| 0x20) };
}

#[test]
fn calloc_zeroes_recycled_blocks_and_checks_overflow() {
    let h = Heap::new(label(3), 0x30);
    for size in [24usize, 3000, 100_000] {
        // SAFETY: this thread owns `h`.
        let p = unsafe { h.alloc(size) };
        fill(p, size, 0xAB);
        // SAFETY: the owner frees its block.
        unsafe { heap::free(p, |_| 0x30) };
        // SAFETY: this thread owns `h`.
        let q = unsafe { h.alloc_zeroed(1, size) };
        // SAFETY: `q` is `size` bytes.
        assert!(touched(size).all(|i| unsafe { *q.add(i) } == 0), "size {size}");
        // SAFETY: the owner frees its block.
        unsafe { heap::free(q, |_| 0x30) };
    }
    // SAFETY: this thread owns `h`.
    assert!(unsafe { h.alloc_zeroed(usize::MAX / 2, 3) }.is_null());
    assert_eq!(h.snapshot().failures, 1);
}

#[test]
fn realloc_keeps_contents_and_forwards_foreign_pointers() {
    let h = Heap::new(label(4), 0x40);
    // SAFETY: this thread owns `h`.
    let mut p = unsafe { h.alloc(10) };
    fill(p, 10, 7);
    let mut len = 10;
    for new_len in [12, 100, 5000, 70_000, 3 << 20, 40, 8] {
        // SAFETY: `p` is live; the owner reallocates.
        let Realloc::Done(q) = (unsafe { h.realloc(p, new_len, |_| 0x40) }) else { panic!("ours") };
        assert!(!q.is_null());
        assert!(check_prefix(q, len, len.min(new_len), 7), "{len} -> {new_len}");
        fill(q, new_len, 7);
        p = q;
        len = new_len;
    }
    let same = p;
    // SAFETY: shrinking within the class keeps the block.
    assert_eq!(unsafe { h.realloc(p, 16, |_| 0x40) }, Realloc::Done(same));
    let foreign = Box::into_raw(Box::new(5u64)) as *mut u8;
    // SAFETY: a foreign block is only looked up.
    assert_eq!(unsafe { h.realloc(foreign, 64, |_| 0x40) }, Realloc::NotOurs);
    // SAFETY: it was a Box.
    drop(unsafe { Box::from_raw(foreign as *mut u64) });
    // SAFETY: the owner frees its block.
    unsafe { heap::free(p, |_| 0x40) };
    let snap = h.snapshot();
    assert_eq!(snap.live_bytes, 0);
    assert_eq!(snap.live_blocks(), 0);
    assert_eq!(snap.reallocations, 8);
}

#[test]
fn large_and_huge_blocks_grow_in_place_and_stay_exact() {
    let h = Heap::new(label(14), 0x140);
    let realloc = |p: *mut u8, n: usize| -> *mut u8 {
        // SAFETY: `p` is live; the owner reallocates.
        let Realloc::Done(q) = (unsafe { h.realloc(p, n, |_| 0x140) }) else { panic!("ours") };
        assert!(!q.is_null());
        q
    };
    // A large block (a span of slots) with free slots after it grows
    // over them: same address, contents kept, live bytes follow.
    // SAFETY: this thread owns `h`.
    let p = unsafe { h.alloc(100_000) };
    fill(p, 100_000, 3);
    let q = realloc(p, 300_000);
    assert_eq!(q, p, "the following slots were free");
    assert!(check(q, 100_000, 3));
    let span = |n: usize| n.div_ceil(SLOT_SIZE) * SLOT_SIZE;
    assert_eq!(h.snapshot().live_bytes as usize, span(300_000));
    // A neighbour blocks it: the block moves, contents kept.
    // SAFETY: this thread owns `h`.
    let wall = unsafe { h.alloc(70_000) };
    fill(q, 300_000, 4);
    let r = realloc(q, 600_000);
    assert_ne!(r, q, "the next slots are taken");
    assert!(check(r, 300_000, 4));
    // A huge block grows within its mapping's reserve, then moves beyond it.
    let big = realloc(r, 3 << 20);
    fill(big, 3 << 20, 5);
    let same = realloc(big, (3 << 20) + 700_000);
    assert_eq!(same, big, "within the reserve (half the block)");
    assert!(check(same, 3 << 20, 5));
    let snap = h.snapshot();
    assert_eq!(snap.live_bytes as usize, ((3 << 20) + 700_000usize).div_ceil(4096) * 4096 + span(70_000));
    assert!(snap.peak_bytes >= snap.live_bytes as u64);
    let moved = realloc(same, 8 << 20);
    assert_ne!(moved, same, "beyond the reserve");
    assert!(check(moved, 3 << 20, 5));
    // SAFETY: the owner frees its blocks.
    unsafe {
        heap::free(moved, |_| 0x140);
        heap::free(wall, |_| 0x140);
    }
    let snap = h.snapshot();
    assert_eq!((snap.live_bytes, snap.live_blocks()), (0, 0));
    assert_eq!(snap.reallocations, 5);
    assert_eq!(
        snap.mapped_bytes as usize, SEGMENT_SIZE,
        "huge mappings are gone; the empty normal segment is retained for reuse"
    );
}

/// Allocates `segments` segments' worth of 64-byte blocks in `h`.
fn fill_segments(h: &Heap, segments: usize) -> Vec<*mut u8> {
    let per_segment = (SEGMENT_SIZE - SLOT_SIZE) / 64;
    // SAFETY: the calling thread owns `h`.
    (0..segments * per_segment).map(|_| unsafe { h.alloc(64) }).collect()
}

fn free_all(blocks: Vec<*mut u8>, owner: usize) {
    for p in blocks {
        // SAFETY: the owner frees its live blocks.
        unsafe { heap::free(p, |_| owner) };
    }
}

#[test]
#[cfg_attr(
    miri,
    ignore = "fills segments with 64-byte blocks (130,000 allocations and frees): hours under Miri, \
              whose cost per operation grows with the blocks live"
)]
fn free_segments_are_retained_for_reuse_then_given_back_after_a_while() {
    let h = Heap::new(label(61), 0x61);
    // Long enough that no segment expires while the test frees (timing-proof).
    // SAFETY: this thread owns `h`.
    unsafe { h.set_free_segment_retention(std::time::Duration::from_secs(600)) };
    let blocks = fill_segments(h, 8);
    let full = h.snapshot().mapped_bytes;
    assert!(full >= 8 * SEGMENT_SIZE as u64, "{full}");
    free_all(blocks, 0x61);
    assert_eq!(h.snapshot().mapped_bytes, full, "entirely free segments stay mapped for reuse");
    // Building the same structure again maps nothing new.
    let blocks = fill_segments(h, 8);
    assert_eq!(h.snapshot().mapped_bytes, full, "the retained segments were reused");
    free_all(blocks, 0x61);
    // Once they have been free for longer than the retention time, the next
    // allocation slow path (here: the first block of another size class)
    // gives them back. What stays is the segment holding the 64-byte class's
    // current (empty) page and the one the new page went into.
    thread::sleep(std::time::Duration::from_millis(20));
    // SAFETY: this thread owns `h`.
    unsafe { h.set_free_segment_retention(std::time::Duration::from_millis(10)) };
    // SAFETY: this thread owns `h`.
    let one = unsafe { h.alloc(128) };
    let left = h.snapshot().mapped_bytes;
    assert!(left <= 2 * SEGMENT_SIZE as u64, "{left} bytes still mapped");
    free_all(vec![one], 0x61);
    // SAFETY: nobody uses the heap any more.
    unsafe { h.end() };
    assert_eq!(h.snapshot().mapped_bytes, 0, "an ended heap retains nothing");
}

#[test]
#[cfg_attr(miri, ignore = "fills 40 segments with 64-byte blocks (650,000 allocations): hours under Miri")]
fn at_most_32_free_segments_are_retained() {
    let h = Heap::new(label(71), 0x7a);
    // SAFETY: this thread owns `h`.
    unsafe { h.set_free_segment_retention(std::time::Duration::from_secs(600)) };
    let blocks = fill_segments(h, 40);
    assert!(h.snapshot().mapped_bytes >= 40 * SEGMENT_SIZE as u64);
    free_all(blocks, 0x7a);
    // 32 retained, and the one holding the class's current (empty) page.
    assert_eq!(h.snapshot().mapped_bytes, 33 * SEGMENT_SIZE as u64);
    // SAFETY: nobody uses the heap any more.
    unsafe { h.end() };
    assert_eq!(h.snapshot().mapped_bytes, 0);
}

#[test]
fn remote_frees_are_counted_at_once_and_reclaimed_by_the_owner() {
    const N: usize = iterations(1000, 100);
    let h = Heap::new(label(5), 0x50);
    // SAFETY: this thread owns `h`.
    let blocks: Vec<usize> = (0..N).map(|_| unsafe { h.alloc(64) } as usize).collect();
    let before = h.snapshot();
    thread::spawn(move || {
        for p in blocks {
            // SAFETY: each block is live and handed over; this thread is not the owner.
            assert!(unsafe { heap::free(p as *mut u8, |_| NO_OWNER) });
        }
    })
    .join()
    .unwrap();
    let after = h.snapshot();
    assert_eq!(after.remote_frees(), N as u64);
    assert_eq!(after.live_bytes, before.live_bytes - 64 * N as i64);
    assert_eq!(after.live_blocks(), 0);
    // The owner gets the memory back: as many blocks again need no new segment.
    let mapped = after.mapped_bytes;
    // SAFETY: this thread owns `h`.
    let again: Vec<*mut u8> = (0..N).map(|_| unsafe { h.alloc(64) }).collect();
    assert_eq!(h.snapshot().mapped_bytes, mapped);
    for p in again {
        // SAFETY: the owner frees its blocks.
        unsafe { heap::free(p, |_| 0x50) };
    }
}

#[test]
fn an_ended_heap_keeps_live_blocks_valid_and_returns_the_rest() {
    const KEPT: usize = iterations(100, 20);
    let h = Heap::new(label(6), 0x60);
    // SAFETY: this thread owns `h` until it ends it.
    let keep: Vec<*mut u8> = (0..KEPT).map(|i| unsafe { h.alloc(16 + i * 40) }).collect();
    for (i, &p) in keep.iter().enumerate() {
        fill(p, 16 + i * 40, i as u8);
    }
    // SAFETY: as above.
    let drop_now: Vec<*mut u8> = (0..iterations(20_000, 200)).map(|_| unsafe { h.alloc(256) }).collect();
    // SAFETY: as above.
    let big = unsafe { h.alloc(3 << 20) };
    for p in drop_now {
        // SAFETY: the owner frees its blocks.
        unsafe { heap::free(p, |_| 0x60) };
    }
    let mapped_before = h.snapshot().mapped_bytes;
    // SAFETY: the owner ends its own heap and never uses it as owner again.
    unsafe { h.end() };
    let ended = h.snapshot();
    assert!(ended.ended);
    assert_eq!(ended.live_blocks(), KEPT as u64 + 1);
    assert!(ended.mapped_bytes <= mapped_before);
    for (i, &p) in keep.iter().enumerate() {
        assert!(check(p, 16 + i * 40, i as u8), "block {i} changed after end");
    }
    let (tx, rx) = mpsc::channel::<usize>();
    let freer = thread::spawn(move || {
        for p in rx {
            // SAFETY: live blocks handed over; nobody owns an ended heap.
            unsafe { heap::free(p as *mut u8, |_| NO_OWNER) };
        }
    });
    for p in keep {
        tx.send(p as usize).unwrap();
    }
    tx.send(big as usize).unwrap();
    drop(tx);
    freer.join().unwrap();
    let done = h.snapshot();
    assert_eq!(done.live_blocks(), 0);
    assert_eq!(done.live_bytes, 0);
    assert_eq!(done.mapped_bytes, 0, "an ended heap with no live block holds no memory");
}

#[test]
fn a_pool_reuses_ended_heaps_and_keeps_their_figures() {
    static POOL: HeapPool = HeapPool::new();
    let first = POOL.acquire(label(7), 0x70);
    // SAFETY: this thread owns `first`.
    let p = unsafe { first.alloc(100) };
    // SAFETY: the owner is done with it.
    unsafe { POOL.release(first) };
    let second = POOL.acquire(label(7), 0x71);
    assert!(std::ptr::eq(first, second), "the ended heap is adopted");
    assert!(!second.is_ended());
    assert_eq!(second.snapshot().live_blocks(), 1);
    // The new owner frees the old owner's block as its own.
    // SAFETY: `p` is live and `second` is now ours.
    unsafe { heap::free(p, |_| 0x71) };
    let snap = second.snapshot();
    assert_eq!((snap.allocations(), snap.frees(), snap.live_bytes), (1, 1, 0));
}

#[test]
fn threads_passing_blocks_around_keep_contents_and_exact_figures() {
    const THREADS: usize = iterations(4, 3);
    const ROUNDS: usize = iterations(20_000, 100);
    let heaps: Vec<&'static Heap> =
        (0..THREADS).map(|t| Heap::new(label(100 + t as i64), 0x1000 + t * 16)).collect();
    let (senders, receivers): (Vec<_>, Vec<_>) =
        (0..THREADS).map(|_| mpsc::channel::<(usize, usize, u8)>()).unzip();
    let handles: Vec<_> = receivers
        .into_iter()
        .enumerate()
        .map(|(t, rx)| {
            let heap = heaps[t];
            let next = senders[(t + 1) % THREADS].clone();
            thread::spawn(move || {
                let token = 0x1000 + t * 16;
                let mut rng = t as u64 * 7919 + 1;
                let mut mine = Vec::new();
                for round in 0..ROUNDS {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let size = match rng % 100 {
                        0 => 100_000 + (rng as usize >> 8) % 300_000,
                        1..=10 => 600 + (rng as usize >> 8) % 9000,
                        _ => (rng as usize >> 8) % 512,
                    };
                    // SAFETY: this thread owns its heap.
                    let p = unsafe { heap.alloc(size) };
                    fill(p, size, round as u8);
                    if rng.is_multiple_of(3) {
                        next.send((p as usize, size, round as u8)).unwrap();
                    } else {
                        mine.push((p as usize, size, round as u8));
                    }
                    if mine.len() > 64 {
                        let (q, len, seed) = mine.swap_remove((rng as usize >> 3) % mine.len());
                        assert!(check(q as *const u8, len, seed));
                        // SAFETY: live block of ours (or received): free with our token.
                        unsafe { heap::free(q as *mut u8, |_| token) };
                    }
                    while let Ok(received) = rx.try_recv() {
                        mine.push(received);
                    }
                }
                drop(next);
                for (q, len, seed) in mine.drain(..) {
                    assert!(check(q as *const u8, len, seed));
                    // SAFETY: as above.
                    unsafe { heap::free(q as *mut u8, |_| token) };
                }
                (rx, token)
            })
        })
        .collect();
    drop(senders);
    let leftovers: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (rx, token) in leftovers {
        for (q, len, seed) in rx.try_iter() {
            assert!(check(q as *const u8, len, seed));
            // SAFETY: live block; any token frees it correctly.
            unsafe { heap::free(q as *mut u8, |_| token) };
        }
    }
    let mut remote = 0;
    for heap in &heaps {
        let s = heap.snapshot();
        assert_eq!(s.live_blocks(), 0, "{:?}", s.label);
        assert_eq!(s.live_bytes, 0, "{:?}", s.label);
        assert_eq!(s.allocations(), ROUNDS as u64);
        remote += s.remote_frees();
    }
    assert!(remote > (ROUNDS * THREADS / 10) as u64, "blocks crossed threads: {remote}");
}

/// Operations of the model test.
#[derive(Debug, Clone)]
enum Op {
    Alloc {
        heap: usize,
        size: usize,
        zeroed: bool,
    },
    /// Free the n-th live block, as the owner of heap `by` (which may not own it).
    Free {
        nth: usize,
        by: usize,
    },
    Realloc {
        nth: usize,
        heap: usize,
        size: usize,
    },
    End {
        heap: usize,
    },
}

/// Cases of the single-threaded model test: 64, or `PROPTEST_CASES` when
/// set (make test's ThreadSanitizer run sets 8: one thread gives TSan
/// nothing to check there, and instrumented it takes a minute).
fn model_cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
}

fn op() -> impl Strategy<Value = Op> {
    let size = prop_oneof![0usize..600, 600usize..70_000, Just(3 << 20)];
    prop_oneof![
        6 => (0usize..3, size.clone(), any::<bool>()).prop_map(|(heap, size, zeroed)| Op::Alloc { heap, size, zeroed }),
        4 => (any::<usize>(), 0usize..3).prop_map(|(nth, by)| Op::Free { nth, by }),
        2 => (any::<usize>(), 0usize..3, size).prop_map(|(nth, heap, size)| Op::Realloc { nth, heap, size }),
        1 => (0usize..3).prop_map(|heap| Op::End { heap }),
    ]
}

proptest! {
    #![proptest_config(proptest_config(model_cases(), 2))]

    /// Three heaps, owners simulated by tokens on one thread, keeping
    /// requested sizes or not. The model tracks every live block; after
    /// every step each heap's live bytes (block sizes, or the sizes asked
    /// for) and blocks equal the model's, and every block keeps its contents.
    #[test]
    fn heaps_match_a_model(ops in proptest::collection::vec(op(), 1..iterations(300, 25)), requested in any::<bool>()) {
        let heaps: Vec<&'static Heap> = (0..3)
            .map(|i| {
                let (l, token) = (label(1000 + i), 0x9000 + i as usize * 16);
                if requested { Heap::new_keeping_requested_sizes(l, token, None) } else { Heap::new(l, token) }
            })
            .collect();
        let token = |i: usize| 0x9000 + i * 16;
        let mut ended = [false; 3];
        // address -> (owning heap, size, seed)
        let mut live: Vec<(usize, usize, usize, u8)> = Vec::new();
        let mut seed = 0u8;
        for op in ops {
            seed = seed.wrapping_add(1);
            match op {
                Op::Alloc { heap, size, zeroed } => {
                    if ended[heap] { continue; }
                    // SAFETY: we act as the heap's owner (its token), single-threaded.
                    let p = unsafe { if zeroed { heaps[heap].alloc_zeroed(1, size) } else { heaps[heap].alloc(size) } };
                    prop_assert!(!p.is_null());
                    if zeroed {
                        // SAFETY: `p` is `size` bytes.
                        let zero = touched(size).all(|i| unsafe { *p.add(i) } == 0);
                        prop_assert!(zero);
                    }
                    fill(p, size, seed);
                    live.push((p as usize, heap, size, seed));
                }
                Op::Free { nth, by } => {
                    if live.is_empty() { continue; }
                    let (p, _, size, s) = live.swap_remove(nth % live.len());
                    prop_assert!(check(p as *const u8, size, s));
                    let tok = if ended[by] { NO_OWNER } else { token(by) };
                    // SAFETY: a live block, freed once, by a (simulated) owner or not.
                    let freed = unsafe { heap::free(p as *mut u8, |_| tok) };
                    prop_assert!(freed);
                }
                Op::Realloc { nth, heap, size } => {
                    if live.is_empty() || ended[heap] { continue; }
                    let i = nth % live.len();
                    let (p, old_heap, old_size, s) = live[i];
                    let tok = token(heap);
                    // SAFETY: we act as `heap`'s owner; `p` is live.
                    let Realloc::Done(q) = (unsafe { heaps[heap].realloc(p as *mut u8, size, |_| tok) }) else {
                        return Err(TestCaseError::fail("our block"));
                    };
                    prop_assert!(check_prefix(q, old_size, old_size.min(size), s));
                    fill(q, size, s);
                    let owner = if q as usize == p { old_heap } else { heap };
                    live[i] = (q as usize, owner, size, s);
                }
                Op::End { heap } => {
                    // SAFETY: the simulated owner stops using the heap.
                    unsafe { heaps[heap].end() };
                    ended[heap] = true;
                }
            }
            for (h, heap) in heaps.iter().enumerate() {
                let snap = heap.snapshot();
                let mine: Vec<_> = live.iter().filter(|b| b.1 == h).collect();
                // SAFETY: every block in the model is live.
                let usable = |b: &&(usize, usize, usize, u8)| unsafe { heap::usable_size(b.0 as *const u8) }.unwrap();
                let bytes: usize = mine.iter().map(|b| if requested { b.2 } else { usable(b) }).sum();
                for b in &mine {
                    // SAFETY: a live block.
                    let asked = unsafe { heap::requested_size(b.0 as *const u8) };
                    prop_assert_eq!(asked, Some(if requested { b.2 } else { usable(b) }));
                }
                prop_assert_eq!(snap.requested_sizes, requested);
                prop_assert_eq!(snap.live_blocks(), mine.len() as u64);
                prop_assert_eq!(snap.live_bytes, bytes as i64);
                prop_assert!(snap.peak_bytes >= bytes as u64);
                prop_assert_eq!(snap.ended, ended[h]);
            }
        }
        for (p, _, size, s) in live {
            prop_assert!(check(p as *const u8, size, s));
            // SAFETY: live block.
            unsafe { heap::free(p as *mut u8, |_| NO_OWNER) };
        }
        for heap in &heaps {
            // SAFETY: nobody uses them any more.
            unsafe { heap.end() };
            let snap = heap.snapshot();
            prop_assert_eq!(snap.live_blocks(), 0);
            prop_assert_eq!(snap.mapped_bytes, 0);
        }
    }
}

/// A heap that keeps requested sizes counts exactly what callers asked for
/// through every path: small, large and huge blocks, calloc, realloc that
/// keeps, grows in place, shrinks or moves, owner and remote frees, and the
/// peak.
#[test]
fn requested_sizes_are_exact_through_every_path() {
    let owner = 0x4e0;
    let h = Heap::new_keeping_requested_sizes(label(40), owner, None);
    assert!(h.keeps_requested_sizes());
    let live = |h: &Heap| h.snapshot().live_bytes;
    let mut blocks = Vec::new();
    let mut asked = 0usize;
    for &size in SIZES {
        // SAFETY: this thread owns `h`.
        let p = unsafe { h.alloc(size) };
        // SAFETY: a live block.
        assert_eq!(unsafe { heap::requested_size(p) }, Some(size), "size {size}");
        // SAFETY: as above.
        assert!(unsafe { heap::usable_size(p) }.unwrap() >= size);
        fill(p, size, size as u8);
        asked += size;
        blocks.push((p, size));
        assert_eq!(live(h), asked as i64);
    }
    // Every small size, so that every class and both slack widths are written
    // and read back while neighbours are live.
    let mut small = Vec::new();
    // (Every 5th under Miri: still every class and both widths.)
    for size in (0..=4096usize).step_by(iterations(1, 5)) {
        // SAFETY: this thread owns `h`.
        let p = unsafe { h.alloc(size) };
        small.push((p, size));
        asked += size;
    }
    for &(p, size) in &small {
        // SAFETY: a live block.
        assert_eq!(unsafe { heap::requested_size(p) }, Some(size));
    }
    assert_eq!(live(h), asked as i64);
    assert_eq!(h.snapshot().peak_bytes, asked as u64);
    let peak = asked;
    for (p, size) in small {
        // SAFETY: the owner frees a live block.
        assert!(unsafe { heap::free(p, |_| owner) });
        asked -= size;
    }
    assert_eq!(live(h), asked as i64);

    // calloc counts count * size.
    // SAFETY: this thread owns `h`.
    let z = unsafe { h.alloc_zeroed(7, 9) };
    assert_eq!(live(h), (asked + 63) as i64);
    // SAFETY: the owner frees it.
    unsafe { heap::free(z, |_| owner) };

    // Realloc: shrink in place (100 -> 60 keeps the 112-byte block), grow
    // within the block, grow past it (moves), and huge growth in place.
    let realloc = |p: *mut u8, size: usize| {
        // SAFETY: this thread owns `h`; `p` is live.
        match unsafe { h.realloc(p, size, |_| owner) } {
            Realloc::Done(q) => q,
            Realloc::NotOurs => panic!("ours"),
        }
    };
    let (p, size) = blocks[5]; // 100 bytes
    assert_eq!(size, 100);
    let q = realloc(p, 60);
    assert_eq!(q, p, "kept in place");
    assert!(check_prefix(q, 100, 60, 100));
    asked -= 40;
    assert_eq!(live(h), asked as i64);
    let q = realloc(q, 112);
    assert_eq!(q, p, "grown within its block");
    asked += 52;
    assert_eq!(live(h), asked as i64);
    let before = h.snapshot();
    let q = realloc(q, 5000);
    assert_ne!(q, p, "moved");
    let after = h.snapshot();
    assert_eq!(after.moves - before.moves, 1);
    assert_eq!(after.allocations_by_callers(), before.allocations_by_callers(), "a move is no allocation");
    assert_eq!(after.frees_by_callers(), before.frees_by_callers(), "nor a free");
    assert_eq!(after.live_blocks(), before.live_blocks());
    assert!(check_prefix(q, 100, 60, 100));
    asked += 5000 - 112;
    assert_eq!(live(h), asked as i64);
    // SAFETY: a live block.
    assert_eq!(unsafe { heap::requested_size(q) }, Some(5000));
    blocks[5] = (q, 5000);
    let (p, size) = *blocks.last().unwrap(); // 5 MiB: huge, with room to grow
    let q = realloc(p, size + 100_000);
    assert_eq!(q, p, "huge grows in place");
    asked += 100_000;
    assert_eq!(live(h), asked as i64);
    *blocks.last_mut().unwrap() = (q, size + 100_000);
    // A huge block shrunk to more than half: kept, counted smaller.
    let q = realloc(q, size);
    assert_eq!(q, p);
    asked -= 100_000;
    assert_eq!(live(h), asked as i64);
    *blocks.last_mut().unwrap() = (q, size);
    assert_eq!(h.snapshot().peak_bytes, peak as u64, "the first peak was the highest");

    // Remote frees count the requested size at once.
    let (p, size) = blocks.pop().unwrap();
    let addr = p as usize;
    thread::spawn(move || {
        // SAFETY: a live block, freed by a thread that does not own its heap.
        assert!(unsafe { heap::free(addr as *mut u8, |_| NO_OWNER) })
    })
    .join()
    .unwrap();
    asked -= size;
    assert_eq!(live(h), asked as i64);
    for (p, size) in blocks {
        assert!(check_prefix(p, size, size.min(60), size as u8) || size == 5000);
        // SAFETY: the owner frees a live block.
        unsafe { heap::free(p, |_| owner) };
    }
    assert_eq!(live(h), 0);
    assert_eq!(h.snapshot().live_blocks(), 0);
}

/// The slack of a heap that keeps requested sizes lives in its pages: a
/// page of 16-byte blocks holds 6% fewer, one of 128-byte blocks under 1%.
#[test]
fn requested_sizes_cost_a_few_blocks_per_page() {
    let counts = |h: &Heap, size: usize, owner: usize| {
        // SAFETY: this thread owns `h`; the blocks are freed below.
        let first = unsafe { h.alloc(size) };
        let mut blocks = vec![first];
        loop {
            // SAFETY: as above.
            let p = unsafe { h.alloc(size) };
            blocks.push(p);
            if (p as usize).abs_diff(first as usize) >= SLOT_SIZE {
                break;
            }
        }
        let n = blocks.len() - 1;
        for p in blocks {
            // SAFETY: the owner frees a live block.
            unsafe { heap::free(p, |_| owner) };
        }
        n
    };
    let plain = Heap::new(label(41), 0x4f0);
    let keeping = Heap::new_keeping_requested_sizes(label(42), 0x500, None);
    assert_eq!(counts(plain, 16, 0x4f0), 1024);
    assert_eq!(counts(keeping, 16, 0x500), 963);
    assert_eq!(counts(plain, 128, 0x4f0), 128);
    assert_eq!(counts(keeping, 128, 0x500), 127);
}

#[test]
fn size_classes_serve_every_small_size_exactly() {
    let h = Heap::new(label(8), 0x80);
    let mut by_class: HashMap<usize, usize> = HashMap::new();
    for size in 0..=size_class::MAX_PAGED_SIZE {
        // Under Miri every 5th size up to 1100 (each class still served).
        if (!size.is_multiple_of(97) && size > 1100) || (cfg!(miri) && !size.is_multiple_of(5)) {
            continue;
        }
        // SAFETY: this thread owns `h`.
        let p = unsafe { h.alloc(size) };
        // SAFETY: live block.
        let usable = unsafe { heap::usable_size(p) }.unwrap();
        assert_eq!(usable, size_class::class_size(size_class::class_of(size)));
        *by_class.entry(usable).or_default() += 1;
        // SAFETY: the owner frees it.
        unsafe { heap::free(p, |_| 0x80) };
    }
    assert_eq!(h.snapshot().live_blocks(), 0);
    assert!(by_class.len() > 40);
}

/// Bytes of `[addr, addr + len)` that are resident (mincore).
fn resident_bytes(addr: *mut u8, len: usize) -> usize {
    let page = 4096;
    let start = addr as usize & !(page - 1);
    let pages = (addr as usize + len - start).div_ceil(page);
    let mut vec = vec![0u8; pages];
    // SAFETY: the range is mapped (a segment of ours) and `vec` has a byte per page.
    let rc = unsafe { libc::mincore(start as *mut libc::c_void, pages * page, vec.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore");
    vec.iter().filter(|&&b| b & 1 != 0).count() * page
}

#[test]
#[cfg_attr(miri, ignore = "reads residency with mincore(2), which Miri does not implement")]
fn an_empty_big_page_stays_for_reuse_then_goes_back_after_a_while() {
    let h = Heap::new(label(81), 0x81);
    let size = 40_000;
    let touch = |n: usize| -> Vec<*mut u8> {
        (0..n)
            .map(|_| {
                // SAFETY: this thread owns `h`.
                let p = unsafe { h.alloc(size) };
                assert!(!p.is_null());
                // SAFETY: `p` is a fresh block of at least `size` bytes.
                unsafe { std::ptr::write_bytes(p, 0xab, size) };
                p
            })
            .collect()
    };
    // SAFETY: this thread owns `h`.
    unsafe { h.set_free_segment_retention(std::time::Duration::from_secs(600)) };
    let blocks = touch(3);
    let (first, span) = (blocks[0], 3 * size);
    assert!(resident_bytes(first, span) >= 3 * size - 4096);
    free_all(blocks, 0x81);
    // Within the retention time the empty page stays, resident, for reuse:
    // taking the same blocks again faults nothing in.
    // SAFETY: this thread owns `h`.
    let other = unsafe { h.alloc(200_000) };
    assert!(resident_bytes(first, span) >= 3 * size - 4096, "the idle page stays");
    let again = touch(3);
    assert!(again.contains(&first), "the idle page serves the class again");
    free_all(again, 0x81);
    // Once it has been empty for longer than the retention time, the next
    // slow path gives its slots back to the OS.
    // SAFETY: this thread owns `h`.
    unsafe { h.set_free_segment_retention(std::time::Duration::from_millis(10)) };
    thread::sleep(std::time::Duration::from_millis(20));
    // SAFETY: this thread owns `h`.
    let small = unsafe { h.alloc(100) };
    // (The new small page may take the first freed slot: look past it.)
    // SAFETY: in bounds of the segment: the idle page spanned `span` bytes.
    let beyond = unsafe { first.add(SLOT_SIZE) };
    assert_eq!(resident_bytes(beyond, span - SLOT_SIZE), 0, "the idle page went back to the OS");
    let figures = h.snapshot();
    assert_eq!(figures.live_blocks(), 2);
    free_all(vec![other, small], 0x81);
    // SAFETY: nobody uses the heap any more.
    unsafe { h.end() };
}

/// Allocates `size`-byte blocks from `h` until it refuses; returns them.
fn alloc_until_refused(h: &Heap, size: usize, most: usize) -> Vec<*mut u8> {
    let mut blocks = Vec::new();
    for _ in 0..most {
        // SAFETY: this thread owns `h`.
        let p = unsafe { h.alloc(size) };
        if p.is_null() {
            return blocks;
        }
        blocks.push(p);
    }
    panic!("{most} blocks of {size} bytes were never refused");
}

#[test]
#[cfg_attr(
    miri,
    ignore = "allocates about 150,000 blocks of 48 bytes to reach its 4 MiB limit: hours under Miri"
)]
fn an_account_refuses_on_the_slow_path_within_a_page_per_class_then_admits_again() {
    use interheap_engine::heap::Account;
    const LIMIT: u64 = 4 << 20;
    let account: &'static Account = Box::leak(Box::new(Account::new()));
    let owner = 0x50;
    let mem = Heap::new_in_account(label(50), owner, account);
    let object = Heap::new_in_account(HeapLabel { part: 1, ..label(50) }, owner, account);
    let outside = Heap::new(label(51), owner);
    account.budget().set_limit(Some(LIMIT));
    account.budget().set_reserve(0);
    let live = |hs: &[&Heap]| hs.iter().map(|h| h.snapshot().live_bytes).sum::<i64>() as u64;

    // Large blocks in one heap, then small ones in the other: both count.
    // SAFETY: this thread owns `object`.
    let mut large: Vec<*mut u8> = (0..20).map(|_| unsafe { object.alloc(100_000) }).collect();
    assert!(large.iter().all(|p| !p.is_null()));
    let mut small = alloc_until_refused(mem, 48, 1 << 20);
    assert!(small.len() * 48 < (LIMIT - 1_900_000) as usize, "the large blocks did not count");
    large.extend(alloc_until_refused(object, 100_000, 1 << 10));
    let total = live(&[mem, object]);
    assert!(total <= LIMIT + SLOT_SIZE as u64, "live {total} over the limit by more than a page");
    assert!(total >= LIMIT - 100_000, "refused too early: {total}");
    let snap = account.budget().snapshot();
    assert_eq!(snap.refused, 2);
    assert_eq!(snap.largest_refused, 100_000);
    // A heap outside the account is not limited, and a growing realloc of a
    // limited heap is refused with the old block untouched.
    // SAFETY: this thread owns the heaps; the blocks are live.
    unsafe {
        assert!(!outside.alloc(8 << 20).is_null());
        let p = small[0];
        fill(p, 48, 7);
        assert_eq!(mem.realloc(p, 1 << 20, |o| o), Realloc::Done(std::ptr::null_mut()));
        assert!(check(p, 48, 7));
    }
    // Freed, the interpreter gets its room back, for the same sizes and more.
    free_all(large, owner);
    small.truncate(small.len() / 2);
    let again = alloc_until_refused(object, 100_000, 1 << 10);
    assert!(again.len() >= 15, "only {} large blocks after freeing", again.len());
    // Remote frees count as soon as they are pushed.
    let remote: Vec<usize> = small.drain(..).map(|p| p as usize).collect();
    let freed = remote.len() * 48;
    thread::spawn(move || free_all(remote.into_iter().map(|p| p as *mut u8).collect(), NO_OWNER))
        .join()
        .unwrap();
    let more = alloc_until_refused(mem, 48, 1 << 20);
    assert!(more.len() * 48 >= freed * 9 / 10, "remote frees gave back {} of {freed} bytes", more.len() * 48);
    // Without a limit nothing is refused.
    account.budget().set_limit(None);
    // SAFETY: this thread owns `mem`.
    assert!(!unsafe { mem.alloc(1 << 20) }.is_null());
}
