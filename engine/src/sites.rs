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
//! freed. The caller (the CPython glue, `interheap_cpython::sites`) gives a
//! stack as [`CodeLocation`]s: a code object's address, a stamp of what it
//! is, and an instruction offset. What a location means (file, function,
//! line) is read once, through a [`CodeReader`], and kept in a code cache,
//! so a sample of a known stack costs hash lookups, not text. Nothing here
//! refers to a Python object. A site is (interpreter bucket, domain, stack).
//!
//! # The code cache, and why it never answers for a dead code object
//!
//! A code object's address is only its own while it is live. The cache is
//! keyed by address and checked three ways: (1) the glue reports every free
//! it sees ([`Sites::freed`]): a cached code address is in the free filter
//! like a live sample, so its free drops its entry before the address can
//! be handed out again; (2) each entry keeps the stamp it was read with
//! (the code's file, name and line-table object addresses and first line),
//! and an entry whose stamp differs is read again, which covers memory that
//! goes away without a free (an isolated interpreter's arenas, dropped
//! whole when it ends); (3) [`Sites::forget_code`] drops every entry, for
//! the glue to call when it stops seeing frees (hooks removed) or an
//! interpreter ends.
//!
//! # Cost
//!
//! Off (rate 0, nothing sampled), one load per allocation and per free. On,
//! the glue's allocation path subtracts the size from a thread-local
//! countdown; a free loads one byte of a filter (a count of live samples and
//! cached code objects per address hash) and takes the lock only when that
//! byte is nonzero. Sampling itself (one per `rate` bytes) takes the lock.
//!
//! # Concurrency
//!
//! Everything but the rate and the filter is behind one lock, taken on the
//! rare paths only (a sample, the free of a block whose filter byte is set, a
//! snapshot). A filter byte is only changed under the lock; a free reads it
//! without: a block is sampled (its byte set) before the allocation returns
//! it, and a code object is cached while a frame of the sampling thread
//! holds it, so any later free of either sees the byte.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;

use rustc_hash::FxHashMap;

use crate::domain::Domain;
use crate::ledger::BucketId;
use interheap_sync::SpinLock;

/// The default mean gap between samples, in bytes.
pub const DEFAULT_RATE: u64 = 512 * 1024;

const FILTER_BITS: u32 = 16;
const FILTER_SLOTS: usize = 1 << FILTER_BITS;

/// One frame of a sampled stack, as text.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FrameText {
    /// The code's file name.
    pub file: Arc<str>,
    /// The code's qualified name.
    pub name: Arc<str>,
    /// The line being run (-1: unknown).
    pub line: i32,
}

/// A sampled stack, innermost frame first (empty: no Python frame).
pub type StackText = Arc<[FrameText]>;

/// Where a frame of a stack is, as the glue reads it without looking at text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeLocation {
    /// The code object's address: the code cache's key.
    pub code: usize,
    /// A stamp of what the code object is (nonzero), compared on each use of
    /// a cached entry: see the module docs.
    pub stamp: u64,
    /// The instruction's byte offset in the code.
    pub offset: i32,
}

/// Reads what the code cache does not know yet. Called with the sites' lock
/// held, so it must not allocate through an allocator that samples.
pub trait CodeReader {
    /// The code object's file name and qualified name.
    fn names(&mut self, code: usize) -> (Arc<str>, Arc<str>);
    /// The line of the instruction at `offset` in the code object (-1: unknown).
    fn line(&mut self, code: usize, offset: i32) -> i32;
}

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

/// What the code cache knows of one live code object.
struct CodeEntry {
    stamp: u64,
    file: Arc<str>,
    name: Arc<str>,
    /// (instruction offset, frame id): the offsets sampled so far (a few per
    /// code object: a linear scan beats a map).
    frames: Vec<(i32, u32)>,
}

#[derive(Default)]
struct Inner {
    /// Distinct frames, by id, and their ids.
    frames: Vec<FrameText>,
    frame_ids: FxHashMap<FrameText, u32>,
    /// Distinct stacks (as text, and as frame ids), by id.
    stacks: Vec<StackText>,
    stack_ids: FxHashMap<Box<[u32]>, u32>,
    /// The code cache: live code objects by address.
    codes: FxHashMap<usize, CodeEntry>,
    /// Scratch for the stack being recorded (its frame ids).
    scratch: Vec<u32>,
    live: FxHashMap<usize, LiveSample>,
    totals: FxHashMap<SiteKey, SiteTotals>,
}

impl Inner {
    fn frame_id(&mut self, frame: FrameText) -> u32 {
        if let Some(&id) = self.frame_ids.get(&frame) {
            return id;
        }
        let id = self.frames.len() as u32;
        self.frames.push(frame.clone());
        self.frame_ids.insert(frame, id);
        id
    }

    /// The id of the stack in `scratch`, interned.
    fn scratch_stack_id(&mut self) -> u32 {
        if let Some(&id) = self.stack_ids.get(self.scratch.as_slice()) {
            return id;
        }
        let id = self.stacks.len() as u32;
        let text: StackText = self.scratch.iter().map(|&f| self.frames[f as usize].clone()).collect();
        self.stacks.push(text);
        self.stack_ids.insert(self.scratch.as_slice().into(), id);
        id
    }
}

/// The sampled sites of a process. See the module docs.
pub struct Sites {
    rate: AtomicU64,
    /// Whether anything was ever sampled since the last reset: while not, a
    /// free reads this one flag, not the filter (64 KiB, mostly cold).
    active: AtomicBool,
    filter: [AtomicU8; FILTER_SLOTS],
    inner: SpinLock<Option<Inner>>,
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
            inner: SpinLock::new(None),
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

    /// Empties the code cache (samples and sites stay): for when frees may
    /// go unseen from now on, or memory went away without them.
    pub fn forget_code(&self) {
        let mut guard = self.inner.lock();
        let Some(inner) = guard.as_mut() else { return };
        for (code, _) in inner.codes.drain() {
            self.unmark(code);
        }
    }

    /// How many code objects the code cache holds (for tests and figures).
    pub fn cached_code_objects(&self) -> usize {
        self.inner.lock().as_ref().map_or(0, |inner| inner.codes.len())
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

    /// One more live sample or cached code object hashes to `address`'s slot.
    fn mark(&self, address: usize) {
        let slot = &self.filter[filter_slot(address)];
        slot.store(slot.load(Relaxed).saturating_add(1), Relaxed);
    }

    /// One fewer. Saturated slots (255 sharing one byte) stay set: only a
    /// lock is wasted on frees there.
    fn unmark(&self, address: usize) {
        let slot = &self.filter[filter_slot(address)];
        let count = slot.load(Relaxed);
        if count != u8::MAX && count != 0 {
            slot.store(count - 1, Relaxed);
        }
    }

    /// Records the sampled block at `address` (`size` bytes, allocated in
    /// `bucket`'s `domain` by the stack at `locations`, innermost first),
    /// reading through `reader` what the code cache does not know.
    #[cold]
    #[inline(never)]
    pub fn record_located(
        &self,
        address: usize,
        bucket: BucketId,
        domain: Domain,
        size: usize,
        locations: &[CodeLocation],
        reader: &mut impl CodeReader,
    ) {
        let mut guard = self.inner.lock();
        let inner = guard.get_or_insert_with(Inner::default);
        let mut scratch = std::mem::take(&mut inner.scratch);
        scratch.clear();
        for location in locations {
            scratch.push(self.located_frame_id(inner, location, reader));
        }
        inner.scratch = scratch;
        let stack = inner.scratch_stack_id();
        self.add_sample(inner, address, (bucket, domain, stack), size);
    }

    /// Records the sampled block at `address` with its stack as text
    /// (`record_located` is the cheap way, for callers that can).
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
        let mut guard = self.inner.lock();
        let inner = guard.get_or_insert_with(Inner::default);
        let ids: Vec<u32> = stack.into_iter().map(|frame| inner.frame_id(frame)).collect();
        inner.scratch = ids;
        let stack = inner.scratch_stack_id();
        self.add_sample(inner, address, (bucket, domain, stack), size);
    }

    /// The frame id of `location`, from the code cache, or read and cached.
    fn located_frame_id(
        &self,
        inner: &mut Inner,
        location: &CodeLocation,
        reader: &mut impl CodeReader,
    ) -> u32 {
        if let Some(entry) = inner.codes.get(&location.code) {
            if entry.stamp == location.stamp {
                if let Some(&(_, id)) = entry.frames.iter().find(|(offset, _)| *offset == location.offset) {
                    return id;
                }
            }
        }
        let (file, name) = match inner.codes.get(&location.code) {
            Some(entry) if entry.stamp == location.stamp => (entry.file.clone(), entry.name.clone()),
            _ => {
                let (file, name) = reader.names(location.code);
                let entry = CodeEntry {
                    stamp: location.stamp,
                    file: file.clone(),
                    name: name.clone(),
                    frames: Vec::new(),
                };
                // A stale entry (another code object, same address) is replaced.
                if inner.codes.insert(location.code, entry).is_none() {
                    self.mark(location.code);
                }
                (file, name)
            }
        };
        let line = reader.line(location.code, location.offset);
        let id = inner.frame_id(FrameText { file, name, line });
        if let Some(entry) = inner.codes.get_mut(&location.code) {
            entry.frames.push((location.offset, id));
        }
        id
    }

    fn add_sample(&self, inner: &mut Inner, address: usize, site: SiteKey, size: usize) {
        let weight = self.weight(size);
        if !self.active.load(Relaxed) {
            self.active.store(true, Relaxed);
        }
        let totals = inner.totals.entry(site).or_default();
        totals.samples += 1;
        totals.live_samples += 1;
        totals.allocated_bytes += weight;
        totals.live_bytes += weight;
        if let Some(old) = inner.live.insert(address, LiveSample { site, weight }) {
            // A block we never saw freed (freed behind our back): it is gone.
            Self::forget(inner, old);
        } else {
            self.mark(address);
        }
    }

    fn forget(inner: &mut Inner, sample: LiveSample) {
        if let Some(totals) = inner.totals.get_mut(&sample.site) {
            totals.live_samples -= 1;
            totals.live_bytes -= sample.weight;
        }
    }

    /// Whether the block at `address` may be a live sample or a cached code
    /// object (false: surely neither).
    #[inline(always)]
    pub fn may_hold(&self, address: usize) -> bool {
        self.active.load(Relaxed) && self.filter[filter_slot(address)].load(Relaxed) != 0
    }

    /// The stack that allocated the block at `address`, if it is a live
    /// sample (with a rate of 1 byte, every block is).
    #[cold]
    pub fn live_stack(&self, address: usize) -> Option<StackText> {
        if !self.may_hold(address) {
            return None;
        }
        let guard = self.inner.lock();
        let inner = guard.as_ref()?;
        let sample = inner.live.get(&address)?;
        Some(inner.stacks[sample.site.2 as usize].clone())
    }

    /// The block at `address` is freed: if it was sampled, it is live no
    /// more; if it was a cached code object, its entry goes.
    #[cold]
    #[inline(never)]
    pub fn freed(&self, address: usize) {
        let mut guard = self.inner.lock();
        let Some(inner) = guard.as_mut() else { return };
        if let Some(sample) = inner.live.remove(&address) {
            Self::forget(inner, sample);
            self.unmark(address);
        }
        if inner.codes.remove(&address).is_some() {
            self.unmark(address);
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

    /// A reader over made-up code objects: code `c` is in file `c.py`, named
    /// `f<c>`, its line is its offset / 2, and every read is counted.
    #[derive(Default)]
    struct CountingReader {
        names_read: usize,
        lines_read: usize,
    }

    impl CodeReader for CountingReader {
        fn names(&mut self, code: usize) -> (Arc<str>, Arc<str>) {
            self.names_read += 1;
            (format!("{code:x}.py").into(), format!("f{code:x}").into())
        }
        fn line(&mut self, _code: usize, offset: i32) -> i32 {
            self.lines_read += 1;
            offset / 2
        }
    }

    fn at(code: usize, offset: i32) -> CodeLocation {
        CodeLocation { code, stamp: 7, offset }
    }

    #[test]
    fn the_code_cache_reads_each_location_once_and_forgets_a_freed_code_object() {
        let sites = Sites::new();
        sites.set_rate(1000);
        let b = BucketId::for_interpreter(Some(2));
        let mut reader = CountingReader::default();
        let stack = [at(0xa0, 10), at(0xb0, 4)];
        sites.record_located(0x1000, b, Domain::Object, 10_000, &stack, &mut reader);
        sites.record_located(0x2000, b, Domain::Object, 10_000, &stack, &mut reader);
        assert_eq!((reader.names_read, reader.lines_read), (2, 2), "the second sample reads nothing");
        // Another line of a known code object: its line only.
        sites.record_located(0x3000, b, Domain::Object, 10_000, &[at(0xa0, 12), at(0xb0, 4)], &mut reader);
        assert_eq!((reader.names_read, reader.lines_read), (2, 3));
        let snap = sites.snapshot();
        assert_eq!(snap.len(), 2, "two distinct stacks");
        let first = snap.iter().find(|s| s.stack[0].line == 5).unwrap();
        assert_eq!(first.totals.samples, 2);
        assert_eq!((&*first.stack[0].file, &*first.stack[0].name), ("a0.py", "fa0"));
        assert_eq!(first.stack[1].line, 2);
        assert_eq!(sites.cached_code_objects(), 2);

        // The code object at 0xa0 is freed: its entry goes (the filter knew it),
        // and a new code object at that address is read afresh.
        assert!(sites.may_hold(0xa0));
        sites.freed(0xa0);
        assert_eq!(sites.cached_code_objects(), 1);
        sites.record_located(0x4000, b, Domain::Object, 10_000, &stack, &mut reader);
        assert_eq!((reader.names_read, reader.lines_read), (3, 4));
        // The samples' stacks stay as they were read.
        assert_eq!(sites.snapshot().iter().map(|s| s.totals.samples).sum::<u64>(), 4);
    }

    #[test]
    fn a_stale_stamp_or_forget_code_makes_the_cache_read_again() {
        let sites = Sites::new();
        sites.set_rate(1000);
        let b = BucketId::for_interpreter(Some(0));
        let mut reader = CountingReader::default();
        sites.record_located(0x1000, b, Domain::Mem, 100, &[at(0xa0, 2)], &mut reader);
        // Same address, another code object (memory that went away unseen).
        let other = CodeLocation { code: 0xa0, stamp: 8, offset: 2 };
        sites.record_located(0x2000, b, Domain::Mem, 100, &[other], &mut reader);
        assert_eq!((reader.names_read, reader.lines_read), (2, 2));
        sites.record_located(0x3000, b, Domain::Mem, 100, &[other], &mut reader);
        assert_eq!((reader.names_read, reader.lines_read), (2, 2));
        sites.forget_code();
        assert_eq!(sites.cached_code_objects(), 0);
        assert!(!sites.may_hold(0xa0), "its filter count went with it");
        sites.record_located(0x4000, b, Domain::Mem, 100, &[other], &mut reader);
        assert_eq!((reader.names_read, reader.lines_read), (3, 3));
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "statistical: its 3% bound needs 20,000 gaps, minutes under Miri (next_gap is \
                  arithmetic, with no unsafe code or memory for Miri to check)"
    )]
    fn gaps_average_the_rate() {
        let sites = Sites::new();
        sites.set_rate(512 * 1024);
        let mut rng = 0x1234_5678_9abc_def1;
        let n = 20_000;
        let mean = (0..n).map(|_| sites.next_gap(&mut rng) as f64).sum::<f64>() / n as f64;
        assert!((mean / (512.0 * 1024.0) - 1.0).abs() < 0.03, "mean gap {mean}");
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "statistical: its 5% bound needs 640,000 allocations counted down, hours under Miri \
                  (which runs the recording in samples_add_up_per_site_and_leave_when_freed)"
    )]
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
