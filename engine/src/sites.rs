//! Sampled allocation sites: which code put an interpreter's bytes where they are.
//!
//! Allocations are sampled by bytes, as tcmalloc, Go's heap profiler and
//! memray do: each thread counts the bytes it allocates down from a gap drawn
//! from an exponential distribution with mean [`Sites::rate`] bytes, and the
//! allocation that crosses zero is sampled. So every byte has the same chance
//! of being sampled whatever the block sizes, the gaps carry no pattern a
//! program could line up with, and a block of `size` bytes is sampled with
//! probability `p = 1 - exp(-size / rate)`. Each sample stands for
//! `size / p` bytes (its *weight*), which makes the sums unbiased estimates
//! of the bytes allocated, and of the bytes still live, per site.
//!
//! A sample is kept, with the stack that allocated it, until its block is
//! freed. The stacks come from the caller (the CPython glue reads them from
//! the interpreter's frames, `interheap_cpython::stack`) as plain text, so
//! nothing here refers to a Python object. A site is (interpreter bucket,
//! domain, stack).
//!
//! # Cost
//!
//! Off (rate 0, nothing sampled), one load per allocation and per free. On,
//! the glue's allocation path subtracts the size from a thread-local
//! countdown; a free loads one byte of a filter (a count of live samples per
//! address hash) and takes the lock only when that byte is nonzero. Sampling
//! itself (one per `rate` bytes) takes the lock.
//!
//! # Concurrency
//!
//! Everything but the rate and the filter is behind one lock, taken on the
//! rare paths only (a sample, the free of a block whose filter byte is set, a
//! snapshot). A filter byte is only changed under the lock; a free reads it
//! without: a block is sampled (its byte set) before the allocation returns
//! it, so any later free of it sees the byte.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;

use crate::domain::Domain;
use crate::ledger::BucketId;
use crate::shard_lock::ShardLock;

/// The default mean gap between samples, in bytes.
pub const DEFAULT_RATE: u64 = 512 * 1024;

const FILTER_BITS: u32 = 16;
const FILTER_SLOTS: usize = 1 << FILTER_BITS;

/// One frame of a sampled stack, as text.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FrameText {
    /// The code's file name.
    pub file: Box<str>,
    /// The code's qualified name.
    pub name: Box<str>,
    /// The line being run (-1: unknown).
    pub line: i32,
}

/// A sampled stack, innermost frame first (empty: no Python frame).
pub type StackText = Arc<[FrameText]>;

/// What one site's samples add up to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SiteTotals {
    /// Samples taken here.
    pub samples: u64,
    /// Of those, the ones whose block is still live.
    pub live_samples: u64,
    /// Estimated bytes allocated here (the samples' weights).
    pub allocated_bytes: u64,
    /// Estimated bytes allocated here and still live.
    pub live_bytes: u64,
}

/// One site and its totals, as [`Sites::snapshot`] gives them.
#[derive(Clone, Debug)]
pub struct SiteSnapshot {
    /// The interpreter's bucket ([`BucketId::NO_INTERPRETER`]: no thread state).
    pub bucket: BucketId,
    /// The domain of the sampled blocks.
    pub domain: Domain,
    /// The stack that allocated them.
    pub stack: StackText,
    /// What its samples add up to.
    pub totals: SiteTotals,
}

type SiteKey = (BucketId, Domain, u32);

struct LiveSample {
    site: SiteKey,
    weight: u64,
}

#[derive(Default)]
struct Inner {
    stacks: Vec<StackText>,
    stack_ids: HashMap<StackText, u32>,
    live: HashMap<usize, LiveSample>,
    totals: HashMap<SiteKey, SiteTotals>,
}

/// The sampled sites of a process. See the module docs.
pub struct Sites {
    rate: AtomicU64,
    /// Whether anything was ever sampled since the last reset: while not, a
    /// free reads this one flag, not the filter (64 KiB, mostly cold).
    active: AtomicBool,
    filter: [AtomicU8; FILTER_SLOTS],
    inner: ShardLock<Option<Inner>>,
}

impl Default for Sites {
    fn default() -> Self {
        Self::new()
    }
}

fn filter_slot(address: usize) -> usize {
    ((address as u64 >> 4).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - FILTER_BITS)) as usize
}

impl Sites {
    /// Sampling off, nothing recorded; `const` so that it can be a `static`.
    pub const fn new() -> Sites {
        Sites {
            rate: AtomicU64::new(0),
            active: AtomicBool::new(false),
            filter: [const { AtomicU8::new(0) }; FILTER_SLOTS],
            inner: ShardLock::new(None),
        }
    }

    /// The mean gap between samples in bytes (0: sampling is off).
    #[inline(always)]
    pub fn rate(&self) -> u64 {
        self.rate.load(Relaxed)
    }

    /// Starts sampling with a mean gap of `rate` bytes (`rate` > 0), or
    /// stops it (0). What was sampled stays until [`reset`](Self::reset).
    pub fn set_rate(&self, rate: u64) {
        self.rate.store(rate, Relaxed);
    }

    /// Forgets every sample and site (sampling stays as it is).
    pub fn reset(&self) {
        let mut inner = self.inner.lock();
        *inner = None;
        self.active.store(false, Relaxed);
        for slot in &self.filter {
            slot.store(0, Relaxed);
        }
    }

    /// The next gap in bytes, drawn from `rng` (a thread's xorshift state,
    /// never 0): exponential with mean [`rate`](Self::rate), at least 1.
    pub fn next_gap(&self, rng: &mut u64) -> i64 {
        let mut x = *rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *rng = x;
        // A uniform in (0, 1]: 53 random bits, never 0.
        let u = ((x >> 11) + 1) as f64 / (1u64 << 53) as f64;
        let gap = -u.ln() * self.rate() as f64;
        gap.clamp(1.0, i64::MAX as f64 / 2.0) as i64
    }

    /// The weight of a sampled block of `size` bytes: `size / p`, where `p`
    /// is the chance that byte sampling picks a block that large.
    fn weight(&self, size: usize) -> u64 {
        let rate = self.rate().max(1) as f64;
        let size = size.max(1) as f64;
        let p = -(-size / rate).exp_m1();
        (size / p).round() as u64
    }

    /// Records the sampled block at `address` (`size` bytes, allocated in
    /// `bucket`'s `domain` by `stack`).
    #[cold]
    #[inline(never)]
    pub fn record(
        &self,
        address: usize,
        bucket: BucketId,
        domain: Domain,
        size: usize,
        stack: Vec<FrameText>,
    ) {
        let weight = self.weight(size);
        let mut guard = self.inner.lock();
        if !self.active.load(Relaxed) {
            self.active.store(true, Relaxed);
        }
        let inner = guard.get_or_insert_with(Inner::default);
        let stack: StackText = stack.into();
        let id = match inner.stack_ids.get(&stack) {
            Some(&id) => id,
            None => {
                let id = inner.stacks.len() as u32;
                inner.stacks.push(stack.clone());
                inner.stack_ids.insert(stack, id);
                id
            }
        };
        let site = (bucket, domain, id);
        let totals = inner.totals.entry(site).or_default();
        totals.samples += 1;
        totals.live_samples += 1;
        totals.allocated_bytes += weight;
        totals.live_bytes += weight;
        if let Some(old) = inner.live.insert(address, LiveSample { site, weight }) {
            // A block we never saw freed (freed behind our back): it is gone.
            Self::forget(inner, old);
        } else {
            let slot = &self.filter[filter_slot(address)];
            slot.store(slot.load(Relaxed).saturating_add(1), Relaxed);
        }
    }

    fn forget(inner: &mut Inner, sample: LiveSample) {
        if let Some(totals) = inner.totals.get_mut(&sample.site) {
            totals.live_samples -= 1;
            totals.live_bytes -= sample.weight;
        }
    }

    /// Whether the block at `address` may be a live sample (false: surely not).
    #[inline(always)]
    pub fn may_hold(&self, address: usize) -> bool {
        self.active.load(Relaxed) && self.filter[filter_slot(address)].load(Relaxed) != 0
    }

    /// The block at `address` is freed: if it was sampled, it is live no more.
    #[cold]
    #[inline(never)]
    pub fn freed(&self, address: usize) {
        let mut guard = self.inner.lock();
        let Some(inner) = guard.as_mut() else { return };
        if let Some(sample) = inner.live.remove(&address) {
            Self::forget(inner, sample);
            let slot = &self.filter[filter_slot(address)];
            // Saturated slots (255 samples sharing one byte) stay set: only
            // a lock is wasted on frees there.
            let count = slot.load(Relaxed);
            if count != u8::MAX {
                slot.store(count - 1, Relaxed);
            }
        }
    }

    /// For a `fork` prepare handler: takes the lock, so that the child does
    /// not inherit it held by a thread that does not exist there. Undo with
    /// [`Sites::unlock_after_fork`].
    pub fn lock_for_fork(&self) {
        std::mem::forget(self.inner.lock());
    }

    /// Releases what [`Sites::lock_for_fork`] took.
    ///
    /// # Safety
    ///
    /// Must follow [`Sites::lock_for_fork`] on the same thread, in the parent
    /// or in the child.
    pub unsafe fn unlock_after_fork(&self) {
        // SAFETY: lock_for_fork holds the lock and forgot its guard.
        unsafe { self.inner.force_unlock() };
    }

    /// Every site, with its totals.
    pub fn snapshot(&self) -> Vec<SiteSnapshot> {
        let guard = self.inner.lock();
        let Some(inner) = guard.as_ref() else { return Vec::new() };
        inner
            .totals
            .iter()
            .map(|(&(bucket, domain, id), &totals)| SiteSnapshot {
                bucket,
                domain,
                stack: inner.stacks[id as usize].clone(),
                totals,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(name: &str, line: i32) -> FrameText {
        FrameText { file: "f.py".into(), name: name.into(), line }
    }

    #[test]
    fn samples_add_up_per_site_and_leave_when_freed() {
        let sites = Sites::new();
        sites.set_rate(1000);
        let b = BucketId::for_interpreter(Some(1));
        sites.record(0x1000, b, Domain::Mem, 100, vec![frame("f", 3)]);
        sites.record(0x2000, b, Domain::Mem, 100, vec![frame("f", 3)]);
        sites.record(0x3000, b, Domain::Object, 5000, vec![frame("g", 9)]);
        assert!(sites.may_hold(0x1000) && sites.may_hold(0x3000));
        sites.freed(0x1000);
        sites.freed(0x9000); // never sampled: nothing changes
        let snap = sites.snapshot();
        assert_eq!(snap.len(), 2);
        let f = snap.iter().find(|s| s.stack[0].name.as_ref() == "f").unwrap();
        // 100 B at a 1000 B rate: p = 1 - e^-0.1, weight = 100 / p = 1051.
        assert_eq!(
            f.totals,
            SiteTotals { samples: 2, live_samples: 1, allocated_bytes: 2102, live_bytes: 1051 }
        );
        let g = snap.iter().find(|s| s.stack[0].name.as_ref() == "g").unwrap();
        // A block far larger than the rate is sampled surely: its weight is its size.
        assert_eq!((g.domain, g.totals.live_bytes), (Domain::Object, 5034));
        sites.reset();
        assert!(sites.snapshot().is_empty() && !sites.may_hold(0x3000));
    }

    #[test]
    fn gaps_average_the_rate() {
        let sites = Sites::new();
        sites.set_rate(512 * 1024);
        let mut rng = 0x1234_5678_9abc_def1;
        let n = 20_000;
        let mean = (0..n).map(|_| sites.next_gap(&mut rng) as f64).sum::<f64>() / n as f64;
        assert!((mean / (512.0 * 1024.0) - 1.0).abs() < 0.03, "mean gap {mean}");
    }

    #[test]
    fn byte_sampling_estimates_the_bytes_allocated() {
        // 64 MB in 100-byte blocks, counted down as the glue does: the
        // estimate is within a few percent of the truth.
        let sites = Sites::new();
        sites.set_rate(64 * 1024);
        let b = BucketId::for_interpreter(Some(0));
        let mut rng = 0x9e37_79b9_7f4a_7c15;
        let mut until = sites.next_gap(&mut rng);
        let total = 64 * 1000 * 1000;
        for i in 0..total / 100 {
            until -= 100;
            if until <= 0 {
                until = sites.next_gap(&mut rng);
                sites.record(i * 16, b, Domain::Mem, 100, vec![frame("f", 1)]);
            }
        }
        let estimate = sites.snapshot()[0].totals.allocated_bytes as f64;
        assert!((estimate / total as f64 - 1.0).abs() < 0.05, "estimate {estimate} of {total}");
    }
}
