//! The allocator's own counters: what each route holds, and what waits on
//! the deferred list. They exist because the fallback route is invisible to
//! Python's tools, so users need some other way to see it.
//!
//! # Concurrency invariants
//!
//! * Counters are sharded ([`SHARDS`] cache-line-sized shards, chosen by the
//!   address of a thread-local, so a thread usually keeps to one shard and
//!   threads rarely share one). Every update is a single `fetch_add`; no lock.
//! * A block may be counted in on one shard and out on another, so one
//!   shard's figures mean nothing alone; only sums over all shards do.
//! * Outgoing counters are bumped with `Release` and read first, with
//!   `Acquire`; incoming ones are read after. Anything counted out was
//!   counted in before (program order or the synchronisation that handed
//!   the block to the freeing thread), so a snapshot never shows more going
//!   out than came in.
//! * Counting never allocates: the shards are a static array, and the
//!   thread-local is a const-initialised byte with no destructor.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

use crate::layout::Route;

const SHARDS: usize = 32;

/// Figures of one route, summed over every thread of the process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteStats {
    /// Blocks allocated (`alloc`, `alloc_zeroed`, and moves into this route).
    pub allocations: u64,
    /// Blocks resized in place by this route's `realloc`.
    pub reallocations: u64,
    /// Blocks given back to this route's allocator.
    pub frees: u64,
    /// `allocations - frees`.
    pub live_blocks: u64,
    /// Bytes callers asked for in the live blocks (no headers or padding).
    pub live_bytes: u64,
}

/// Blocks of the Python route freed on a thread with no attached thread
/// state, waiting for an attached call to hand them to `PyMem_RawFree`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeferredStats {
    /// Blocks waiting now. They are still counted live in [`Stats::python`]
    /// (Python's tools still see them), until they are really freed.
    pub pending_blocks: u64,
    /// Bytes callers asked for in the waiting blocks.
    pub pending_bytes: u64,
    /// Blocks ever deferred.
    pub deferred_frees: u64,
}

/// A snapshot of the allocator's counters (see [`crate::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Blocks from `PyMem_Raw*`: visible to tracemalloc, interheap, memray.
    pub python: RouteStats,
    /// Blocks from libc, made where Python's raw allocator could block or
    /// crash: invisible to Python's tools.
    pub fallback: RouteStats,
    /// Python blocks freed without a thread state, in waiting or done.
    pub deferred: DeferredStats,
    /// Python blocks resized on a thread with no attached thread state, and
    /// so moved to a new fallback block (the old block's free is deferred).
    pub moved_to_fallback: u64,
}

struct Counters {
    allocations: AtomicU64,
    reallocations: AtomicU64,
    frees: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

impl Counters {
    const fn new() -> Self {
        Counters {
            allocations: AtomicU64::new(0),
            reallocations: AtomicU64::new(0),
            frees: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
        }
    }
}

#[repr(align(128))]
struct Shard {
    python: Counters,
    fallback: Counters,
    deferred_in: AtomicU64,
    deferred_bytes_in: AtomicU64,
    deferred_out: AtomicU64,
    deferred_bytes_out: AtomicU64,
    moved: AtomicU64,
}

impl Shard {
    const fn new() -> Self {
        Shard {
            python: Counters::new(),
            fallback: Counters::new(),
            deferred_in: AtomicU64::new(0),
            deferred_bytes_in: AtomicU64::new(0),
            deferred_out: AtomicU64::new(0),
            deferred_bytes_out: AtomicU64::new(0),
            moved: AtomicU64::new(0),
        }
    }
}

static SHARD: [Shard; SHARDS] = [const { Shard::new() }; SHARDS];

thread_local! {
    // Only its address matters: it differs per thread.
    static ANCHOR: u8 = const { 0 };
}

#[inline]
fn shard() -> &'static Shard {
    let addr = ANCHOR.with(|a| a as *const u8 as u64);
    // Thread-locals of different threads share their low address bits, so
    // mix them all in (Fibonacci hashing) and keep the top bits.
    let index = (addr.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 59) as usize;
    &SHARD[index % SHARDS]
}

#[inline]
fn counters(shard: &Shard, route: Route) -> &Counters {
    match route {
        Route::Python => &shard.python,
        Route::Fallback => &shard.fallback,
    }
}

#[inline]
pub(crate) fn allocated(route: Route, size: usize) {
    let c = counters(shard(), route);
    c.allocations.fetch_add(1, Relaxed);
    c.bytes_in.fetch_add(size as u64, Relaxed);
}

#[inline]
pub(crate) fn freed(route: Route, size: usize) {
    let c = counters(shard(), route);
    c.frees.fetch_add(1, Release);
    c.bytes_out.fetch_add(size as u64, Release);
}

#[inline]
pub(crate) fn resized(route: Route, old_size: usize, new_size: usize) {
    let c = counters(shard(), route);
    c.reallocations.fetch_add(1, Relaxed);
    c.bytes_in.fetch_add(new_size as u64, Relaxed);
    c.bytes_out.fetch_add(old_size as u64, Release);
}

#[inline]
pub(crate) fn deferred(size: usize) {
    let s = shard();
    s.deferred_in.fetch_add(1, Relaxed);
    s.deferred_bytes_in.fetch_add(size as u64, Relaxed);
}

/// A deferred block was really freed: it leaves the list and the Python route.
#[inline]
pub(crate) fn deferred_done(size: usize) {
    let s = shard();
    s.deferred_out.fetch_add(1, Release);
    s.deferred_bytes_out.fetch_add(size as u64, Release);
    freed(Route::Python, size);
}

#[inline]
pub(crate) fn moved_to_fallback() {
    shard().moved.fetch_add(1, Relaxed);
}

fn sum(f: impl Fn(&Shard) -> &AtomicU64, order: std::sync::atomic::Ordering) -> u64 {
    SHARD.iter().fold(0u64, |acc, s| acc.wrapping_add(f(s).load(order)))
}

fn route_stats(pick: fn(&Shard) -> &Counters) -> RouteStats {
    // Outgoing first (see the module's invariants).
    let frees = sum(|s| &pick(s).frees, Acquire);
    let bytes_out = sum(|s| &pick(s).bytes_out, Acquire);
    let allocations = sum(|s| &pick(s).allocations, Relaxed);
    let reallocations = sum(|s| &pick(s).reallocations, Relaxed);
    let bytes_in = sum(|s| &pick(s).bytes_in, Relaxed);
    RouteStats {
        allocations,
        reallocations,
        frees,
        live_blocks: allocations.saturating_sub(frees),
        live_bytes: bytes_in.saturating_sub(bytes_out),
    }
}

/// Sums the counters of every shard.
pub(crate) fn snapshot() -> Stats {
    let out = sum(|s| &s.deferred_out, Acquire);
    let bytes_out = sum(|s| &s.deferred_bytes_out, Acquire);
    let python = route_stats(|s| &s.python);
    let fallback = route_stats(|s| &s.fallback);
    let deferred_in = sum(|s| &s.deferred_in, Relaxed);
    let bytes_in = sum(|s| &s.deferred_bytes_in, Relaxed);
    Stats {
        python,
        fallback,
        deferred: DeferredStats {
            pending_blocks: deferred_in.saturating_sub(out),
            pending_bytes: bytes_in.saturating_sub(bytes_out),
            deferred_frees: deferred_in,
        },
        moved_to_fallback: sum(|s| &s.moved, Relaxed),
    }
}
