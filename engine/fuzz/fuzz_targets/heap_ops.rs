//! Random malloc/calloc/realloc/free sequences on interheap's allocator from
//! three threads at once, with blocks handed between threads (remote frees)
//! and one heap ended while others still hold its blocks.
//!
//! Each thread owns a heap and reads its own share of the input as a list of
//! operations. Every block is filled with a pattern and checked before it is
//! reallocated or freed; calloc must return zeroes. At the end every heap's
//! figures must add up: nothing live, allocations = frees + remote frees.
#![no_main]

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Barrier;
use std::thread;

use interheap_engine::heap::{self, Heap, HeapLabel, Realloc};
use libfuzzer_sys::fuzz_target;

const THREADS: usize = 3;

/// A block we allocated: address, length in use, pattern seed.
struct Block(*mut u8, usize, u8);
// SAFETY: a block is plain memory of the allocator, usable from any thread.
unsafe impl Send for Block {}

fn fill(b: &Block) {
    for i in 0..b.1 {
        // SAFETY: the block is live and at least `b.1` bytes long.
        unsafe { *b.0.add(i) = b.2.wrapping_add(i as u8) };
    }
}

fn check(b: &Block, len: usize) {
    for i in 0..len {
        // SAFETY: as in `fill`.
        let byte = unsafe { *b.0.add(i) };
        assert_eq!(byte, b.2.wrapping_add(i as u8), "block {:p} byte {i} was overwritten", b.0);
    }
}

/// A request size from two input bytes: mostly small, sometimes up to a few MiB.
fn size(a: u8, b: u8) -> usize {
    let n = (a as usize) << 8 | b as usize;
    match a >> 6 {
        0 | 1 => n % 600,
        2 => n % 70_000,
        _ => (n * 48) % (3 << 20),
    }
}

fn token(t: usize) -> usize {
    0x100 + 2 * t
}

/// Runs thread `t`'s operations; returns the blocks it received at the end,
/// to be freed after the last thread's heap has ended.
fn worker(
    t: usize,
    ops: &[u8],
    heap: &'static Heap,
    to_next: Sender<Block>,
    from_prev: Receiver<Block>,
) -> Vec<Block> {
    let mut mine: Vec<Block> = Vec::new();
    for op in ops.chunks_exact(4) {
        let (kind, a, b, pick) = (op[0] % 6, op[1], op[2], op[3] as usize);
        match kind {
            0 => {
                let n = size(a, b);
                // SAFETY: this thread owns `heap`.
                let p = unsafe { heap.alloc(n) };
                assert!(!p.is_null() && (p as usize).is_multiple_of(16));
                let block = Block(p, n, pick as u8);
                fill(&block);
                mine.push(block);
            }
            1 => {
                let (count, each) = (1 + a as usize % 16, size(b >> 2, b) / 8);
                // SAFETY: this thread owns `heap`.
                let p = unsafe { heap.alloc_zeroed(count, each) };
                assert!(!p.is_null());
                // SAFETY: the block has `count * each` bytes.
                assert!((0..count * each).all(|i| unsafe { *p.add(i) } == 0), "calloc returned dirty memory");
                let block = Block(p, count * each, pick as u8);
                fill(&block);
                mine.push(block);
            }
            2 if !mine.is_empty() => {
                let i = pick % mine.len();
                let n = size(a, b);
                let old = &mine[i];
                check(old, old.1);
                // SAFETY: the block is live; this thread owns `heap`.
                let Realloc::Done(q) = (unsafe { heap.realloc(old.0, n, |_| token(t)) }) else {
                    panic!("realloc of our own block said it is not ours")
                };
                assert!(!q.is_null());
                let kept = Block(q, old.1.min(n), old.2);
                check(&kept, kept.1);
                mine[i] = Block(q, n, old.2);
                fill(&mine[i]);
            }
            3 if !mine.is_empty() => free_checked(t, mine.swap_remove(pick % mine.len())),
            4 if !mine.is_empty() => {
                // Hand a block to the next thread, which frees it (a remote free).
                let block = mine.swap_remove(pick % mine.len());
                check(&block, block.1);
                let _ = to_next.send(block);
            }
            _ => {
                while let Ok(block) = from_prev.try_recv() {
                    free_checked(t, block);
                }
            }
        }
    }
    // Free half of what is left; hand the rest to the next thread, which
    // frees it after the last thread's heap has ended.
    let handed = mine.split_off(mine.len() / 2);
    for block in mine {
        free_checked(t, block);
    }
    for block in handed {
        let _ = to_next.send(block);
    }
    drop(to_next);
    from_prev.into_iter().collect()
}

/// Checks `block` and frees it as thread `t` (the owner's free, or a remote one).
fn free_checked(t: usize, block: Block) {
    check(&block, block.1);
    // SAFETY: the block is live.
    if unsafe { heap::heap_of(block.0) }.is_some_and(|h| h.keeps_requested_sizes()) {
        // SAFETY: as above.
        assert_eq!(unsafe { heap::requested_size(block.0) }, Some(block.1));
    }
    // SAFETY: the block is live and nobody uses it after this.
    assert!(unsafe { heap::free(block.0, |_| token(t)) });
}

fuzz_target!(|data: &[u8]| {
    // Odd threads' heaps keep requested sizes, so both modes meet in remote frees.
    let heaps: Vec<&'static Heap> = (0..THREADS)
        .map(|t| {
            let label = HeapLabel { kind: 9, id: t as i64, part: 0 };
            if t % 2 == 1 {
                Heap::new_keeping_requested_sizes(label, token(t), None)
            } else {
                Heap::new(label, token(t))
            }
        })
        .collect();
    let share = data.len() / THREADS / 4 * 4;
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..THREADS).map(|_| channel::<Block>()).unzip();
    let barrier = Barrier::new(THREADS);
    thread::scope(|s| {
        let mut receivers = receivers.into_iter().collect::<Vec<_>>();
        receivers.rotate_right(1); // thread t receives from thread t - 1
        for (t, from_prev) in receivers.into_iter().enumerate() {
            let (heap, to_next, ops) =
                (heaps[t], senders[(t + 1) % THREADS].clone(), &data[t * share..(t + 1) * share]);
            let barrier = &barrier;
            s.spawn(move || {
                let held = worker(t, ops, heap, to_next, from_prev);
                barrier.wait();
                if t == THREADS - 1 {
                    // SAFETY: this thread owned the heap and never uses it again.
                    unsafe { heap.end() };
                }
                barrier.wait();
                // Remote frees into finished heaps, and (thread 0) frees into the ended one.
                for block in held {
                    free_checked(t, block);
                }
                barrier.wait();
                // Every heap ends, so a long fuzzing session gives its memory back.
                // SAFETY: this thread owned the heap and never uses it again (ending twice is a no-op).
                unsafe { heap.end() };
            });
        }
        drop(senders);
    });
    for heap in heaps {
        let snap = heap.snapshot();
        assert_eq!(snap.live_bytes, 0, "{snap:?}");
        assert_eq!(snap.live_blocks(), 0, "{snap:?}");
        assert_eq!(snap.allocations(), snap.frees() + snap.remote_frees(), "{snap:?}");
    }
});
