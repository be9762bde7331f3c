//! A checked allocation workload, for the tests and the example extension
//! (feature `workload`; not part of the allocator's API).
//!
//! Workers allocate, resize and free blocks of random layouts (sizes up to
//! 64 KiB, alignments 1 to 4096, some zeroed) through the global allocator,
//! pass blocks to each other through a shared pool, and check every block's
//! alignment and every byte of its contents at each step: a block handed to
//! the wrong backend, a misplaced header or a lost byte fails an assertion.
//! It uses only `std`, so test binaries can include this file directly.

use std::alloc::{alloc, alloc_zeroed, dealloc, realloc, Layout};
use std::sync::Mutex;

/// xorshift64*: deterministic per seed, allocation-free.
pub struct Rng(u64);

impl Rng {
    /// A generator; any seed works.
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// The next 64 random bits.
    pub fn bits(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.bits() % n
    }
}

/// A live block of the global allocator and the bytes it must hold.
pub struct Block {
    ptr: *mut u8,
    layout: Layout,
    seed: u8,
}

// SAFETY: a block is owned by whoever holds the `Block`; it changes threads
// only by being moved (through the pool's mutex or a channel).
unsafe impl Send for Block {}

impl Block {
    /// Allocates a block of random layout and fills it.
    pub fn new(rng: &mut Rng) -> Block {
        let align = 1usize << rng.below(13); // 1 ..= 4096
        let size = match rng.below(10) {
            0 => 1 + rng.below(65_536) as usize,
            1..=3 => 1 + rng.below(4096) as usize,
            _ => 1 + rng.below(256) as usize,
        };
        let layout = Layout::from_size_align(size, align).expect("valid layout");
        let zeroed = rng.below(4) == 0;
        // SAFETY: non-zero size.
        let ptr = unsafe {
            if zeroed {
                alloc_zeroed(layout)
            } else {
                alloc(layout)
            }
        };
        assert!(!ptr.is_null(), "allocation of {layout:?} failed");
        assert_eq!(ptr as usize % align, 0, "misaligned block for {layout:?}");
        if zeroed {
            // SAFETY: `size` bytes are ours.
            let bytes = unsafe { std::slice::from_raw_parts(ptr, size) };
            assert!(bytes.iter().all(|&b| b == 0), "alloc_zeroed returned dirty memory");
        }
        let block = Block { ptr, layout, seed: rng.bits() as u8 };
        block.fill(0);
        block
    }

    fn byte(&self, i: usize) -> u8 {
        self.seed.wrapping_add((i as u8).wrapping_mul(31)) ^ (i >> 8) as u8
    }

    fn fill(&self, from: usize) {
        for i in from..self.layout.size() {
            // SAFETY: the block holds `size` bytes.
            unsafe { self.ptr.add(i).write(self.byte(i)) };
        }
    }

    /// Checks the first `upto` bytes.
    fn check(&self, upto: usize) {
        for i in 0..upto {
            // SAFETY: the block holds at least `upto` bytes.
            let got = unsafe { self.ptr.add(i).read() };
            assert_eq!(got, self.byte(i), "byte {i} of a {:?} block changed", self.layout);
        }
    }

    /// Checks the block, resizes it to a random size and refills the new tail.
    pub fn resize(&mut self, rng: &mut Rng) {
        self.check(self.layout.size());
        let limit = if rng.below(8) == 0 { 65_536 } else { 1024 };
        let new_size = 1 + rng.below(limit) as usize;
        // SAFETY: live block of this layout; non-zero new size.
        let ptr = unsafe { realloc(self.ptr, self.layout, new_size) };
        assert!(!ptr.is_null(), "realloc to {new_size} failed");
        assert_eq!(ptr as usize % self.layout.align(), 0, "realloc lost the alignment");
        let kept = self.layout.size().min(new_size);
        self.ptr = ptr;
        self.layout = Layout::from_size_align(new_size, self.layout.align()).expect("valid layout");
        self.check(kept);
        self.fill(kept);
    }

    /// Checks the block and frees it.
    pub fn free(self) {
        self.check(self.layout.size());
        // SAFETY: live block of this layout, given up.
        unsafe { dealloc(self.ptr, self.layout) };
    }
}

const POOL_SHARDS: usize = 8;

/// Blocks any worker can take: how blocks change threads, and so routes.
static POOL: [Mutex<Vec<Block>>; POOL_SHARDS] = [const { Mutex::new(Vec::new()) }; POOL_SHARDS];

fn pool(rng: &mut Rng) -> std::sync::MutexGuard<'static, Vec<Block>> {
    POOL[rng.below(POOL_SHARDS as u64) as usize].lock().unwrap_or_else(|e| e.into_inner())
}

/// Checks and frees every block left in the shared pool; returns how many.
pub fn drain_pool() -> usize {
    let mut n = 0;
    for shard in &POOL {
        let blocks = std::mem::take(&mut *shard.lock().unwrap_or_else(|e| e.into_inner()));
        n += blocks.len();
        blocks.into_iter().for_each(Block::free);
    }
    n
}

/// One thread's share of the workload. Run it in slices, switching the
/// thread between attached and detached in between, then [`Worker::finish`].
pub struct Worker {
    rng: Rng,
    mine: Vec<Block>,
    /// Operations done so far.
    pub ops: u64,
}

impl Worker {
    /// A worker with its own random sequence.
    pub fn new(seed: u64) -> Self {
        Worker { rng: Rng::new(seed), mine: Vec::new(), ops: 0 }
    }

    /// Whether to switch attachment before the next slice (a coin flip).
    pub fn coin(&mut self) -> bool {
        self.rng.below(2) == 0
    }

    /// Does `ops` random operations: allocate, resize, free, give a block to
    /// the pool, take one from it.
    pub fn run(&mut self, ops: usize) {
        let rng = &mut self.rng;
        for _ in 0..ops {
            match rng.below(10) {
                0..=3 => self.mine.push(Block::new(rng)),
                4 | 5 if !self.mine.is_empty() => {
                    let i = rng.below(self.mine.len() as u64) as usize;
                    self.mine[i].resize(rng);
                }
                6 if !self.mine.is_empty() => {
                    let block = self.mine.swap_remove(rng.below(self.mine.len() as u64) as usize);
                    pool(rng).push(block);
                }
                7 => {
                    let taken = pool(rng).pop();
                    self.mine.extend(taken);
                }
                _ if !self.mine.is_empty() => {
                    self.mine.swap_remove(rng.below(self.mine.len() as u64) as usize).free()
                }
                _ => {}
            }
            if self.mine.len() > 200 {
                self.mine.swap_remove(0).free();
            }
        }
        self.ops += ops as u64;
    }

    /// Checks and frees the blocks this worker still holds.
    pub fn finish(self) -> u64 {
        self.mine.into_iter().for_each(Block::free);
        self.ops
    }
}
