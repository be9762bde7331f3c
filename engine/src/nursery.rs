//! Per-thread caches of recently allocated blocks ("nurseries").
//!
//! Most blocks die young and on the thread that made them. Recording every
//! block in the shared [`BlockTable`] costs a lock and a probe twice per block;
//! a nursery lets a thread record its new blocks in a small direct-mapped array
//! of its own and forget them there when it frees them, with no lock and no
//! read-modify-write. A block that survives until its slot is needed again is
//! *evicted* into the shared table.
//!
//! # Protocol
//!
//! A slot holds `key` (a block address; 0 when empty) and `packed` (its
//! record). A block is in exactly one place: one nursery slot or the shared
//! table. The owner thread is the only writer of `packed` and the only one that
//! stores a non-zero `key`; other threads may only claim a slot's block with a
//! compare-and-swap of `key` from the block's address to 0.
//!
//! * **Owner records a block**: if the slot holds an older block `k`, the owner
//!   claims it by CAS `k -> k | EVICTING`, inserts `k` into the shared table,
//!   then writes the new `packed` and publishes the new key (Release). If the
//!   CAS fails, another thread claimed `k` (it was freed): the slot is empty.
//! * **Owner frees a block in its own slot**: stores 0. No other thread can be
//!   freeing the same block at the same time (that would be a double free in
//!   the program), so no CAS is needed.
//! * **Any other free** (block `k`): (1) remove `k` from the shared table; if
//!   found, done. (2) Otherwise scan `k`'s slot in every nursery: on seeing
//!   `k`, read `packed`, then CAS `k -> 0`; success means this thread owns the
//!   record. On seeing `k | EVICTING`, wait until the owner finishes moving it.
//!   (3) Remove `k` from the shared table again: an eviction may have moved it
//!   there between (1) and (2). Not found anywhere means the block was
//!   allocated before tracking began.
//!
//! Why no ABA: while a thread frees `k`, the address `k` is still allocated, so
//! no slot can come to hold `k` again for another block before that free is
//! forwarded to the allocator, which happens after the bookkeeping.
//!
//! Addresses with bit 0 set (never produced by CPython's allocators, which
//! align to 8 or 16 bytes) bypass nurseries, since bit 0 marks eviction.
//!
//! The protocol is `Slot`'s code (and `forget_foreign` for the order of
//! a foreign free's steps), written over [`Memory`]: nurseries run it with
//! [`Std`], and the loom models at the end of this module run it with loom's
//! atomics against a small locked map standing in for the shared table.
//!
//! # Event counts
//!
//! A nursery also keeps the owner thread's event counts (allocations, frees,
//! reallocations, failures) for one bucket, the interpreter the thread last
//! allocated in, with plain loads and stores instead of read-modify-writes:
//! the owner is their only writer. Counts for other buckets go to the ledger's
//! atomics. The owner flushes them into the ledger when it allocates in
//! another bucket and when it retires. Snapshots add them in; a snapshot taken
//! while a thread flushes may count that thread's pending counts twice or not
//! at all, and is exact once threads are quiet. Live and peak bytes never live
//! here; the nursery only holds the owner's grant slot (see [`crate::grants`]),
//! through which the ledger's exact counters let its churn skip the shared word.
//!
//! Nurseries live in an append-only list and are freed only when the list
//! itself is dropped (never, for the process-wide static): a thread that ends
//! *retires* its nursery (evicting every block) and a new thread adopts a
//! retired one. Scans therefore cost one load per nursery ever
//! created, which stays small (threads reuse retired nurseries).

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use interheap_sync::{Atomic, Memory, Std};

use crate::block_table::{BlockRecord, BlockTable};
use crate::domain::Domain;
use crate::grants::{key_of, GrantSlot, NO_GRANTS};
use crate::ledger::{Bucket, BucketId, Count, Ledger, COUNTS};

/// Slots per nursery (a power of two): 16 bytes each, 16 KiB per thread.
pub const NURSERY_SLOTS: usize = 1024;
const EVICTING: usize = 1;

/// One nursery slot: the unit of the claim/evict protocol (module docs).
///
/// Written over [`Memory`] so that the loom models at the end of this
/// module run this code itself; nurseries use it with [`Std`], where every
/// method below is the plain atomic code (the fast paths' methods are
/// `#[inline(always)]`).
///
/// # Concurrency invariants
///
/// * Only the owner thread writes `packed` and stores a non-zero `key`.
/// * Any thread may take the slot's block away from the owner with a CAS of
///   `key` from the block's address to 0 ([`Slot::claim`]); the owner takes
///   it for eviction with a CAS to `address | EVICTING` ([`Slot::evict`]).
///   Exactly one of the two CASes succeeds, so the block is moved once.
/// * A slot marked `EVICTING` is cleared only under the shard lock of the
///   shared table, after the block is inserted there: a claimer that waited
///   for the mark to go away finds the block in the table.
/// * `packed` is read before the CAS that takes the block, and written only
///   after the owner's own CAS (or after it saw the slot empty): whoever
///   wins the CAS holds the record of the block it took.
struct Slot<M: Memory = Std> {
    key: M::Usize,
    packed: M::U64,
}

/// Where evicted blocks go: the shared [`BlockTable`] (a small locked map
/// in the loom models, which cannot run the table's `Std` spin locks).
pub(crate) trait EvictionTable {
    /// Inserts `rec` at `addr` and runs `then` before the insertion's lock
    /// is released; returns a stale record it displaced.
    fn insert_then(&self, addr: usize, rec: BlockRecord, then: impl FnOnce()) -> Option<BlockRecord>;
    /// Removes and returns the record at `addr`.
    fn remove(&self, addr: usize) -> Option<BlockRecord>;
}

impl EvictionTable for BlockTable {
    #[inline(always)]
    fn insert_then(&self, addr: usize, rec: BlockRecord, then: impl FnOnce()) -> Option<BlockRecord> {
        BlockTable::insert_then(self, addr, rec, then)
    }
    #[inline(always)]
    fn remove(&self, addr: usize) -> Option<BlockRecord> {
        BlockTable::remove(self, addr)
    }
}

impl<M: Memory> Slot<M> {
    /// Owner only: records a new block, evicting an older one into `table`
    /// if need be. Returns a stale record this displaced (see
    /// [`Nursery::record`]).
    #[inline(always)]
    fn record(&self, table: &impl EvictionTable, addr: usize, rec: BlockRecord) -> Option<BlockRecord> {
        let old = self.key.load(Ordering::Acquire);
        let mut displaced = None;
        if old == addr {
            // The same address is live again: its free was never seen.
            displaced = Some(BlockRecord::unpack(self.packed.load(Ordering::Relaxed)));
        } else if old != 0 {
            displaced = self.evict(table, old);
        }
        self.packed.store(rec.pack(), Ordering::Relaxed);
        self.key.store(addr, Ordering::Release);
        displaced
    }

    /// Owner only: records the block `addr` with the record `packed()` if
    /// the slot is empty; false (nothing changed) if it is not.
    #[inline(always)]
    fn record_if_empty(&self, addr: usize, packed: impl FnOnce() -> u64) -> bool {
        if self.key.load(Ordering::Relaxed) != 0 {
            return false;
        }
        self.packed.store(packed(), Ordering::Relaxed);
        self.key.store(addr, Ordering::Release);
        true
    }

    /// Owner only: forgets `addr` if the slot holds it and `accept` takes
    /// its packed record; returns that record. No CAS: no other thread can
    /// be freeing the same block (module docs).
    #[inline(always)]
    fn take_own_if(&self, addr: usize, accept: impl FnOnce(u64) -> bool) -> Option<u64> {
        if self.key.load(Ordering::Relaxed) != addr {
            return None;
        }
        let packed = self.packed.load(Ordering::Relaxed);
        if !accept(packed) {
            return None;
        }
        self.key.store(0, Ordering::Release);
        Some(packed)
    }

    /// Owner only: moves the block `old` out of the slot into the shared table.
    #[cold]
    #[inline(never)]
    fn evict(&self, table: &impl EvictionTable, old: usize) -> Option<BlockRecord> {
        let packed = self.packed.load(Ordering::Relaxed);
        if self.key.compare_exchange(old, old | EVICTING, Ordering::AcqRel, Ordering::Acquire).is_err() {
            // Another thread freed `old` and claimed it; the slot is empty.
            return None;
        }
        // Clear the slot while the shard lock is still held: a `fork` prepare
        // handler takes every shard lock, so in a child a slot marked
        // EVICTING always means "not inserted yet" (see `adopt_orphans`).
        // Freeing threads that see 0 then take that shard lock after us and
        // find the record.
        table.insert_then(old, BlockRecord::unpack(packed), || self.key.store(0, Ordering::Release))
    }

    /// In a `fork` child, whose other threads are gone: the block that the
    /// child must record for this slot, if any: a resident one, or one that
    /// a vanished owner had marked for eviction but not inserted yet (it
    /// clears the mark under the shard lock, which the `fork` prepare
    /// handler held, so a marked block is not in the table). Reads only.
    fn orphan(&self) -> Option<(usize, BlockRecord)> {
        let key = self.key.load(Ordering::Acquire);
        (key != 0).then(|| (key & !EVICTING, BlockRecord::unpack(self.packed.load(Ordering::Relaxed))))
    }

    /// Any thread: claims `addr` from the slot if it is resident. Waits
    /// out an eviction in progress and then reports `None` (the block is in
    /// the shared table by the time this returns).
    fn claim(&self, addr: usize) -> Option<BlockRecord> {
        loop {
            let key = self.key.load(Ordering::Acquire);
            if key == addr {
                let packed = self.packed.load(Ordering::Relaxed);
                if self.key.compare_exchange(addr, 0, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                    return Some(BlockRecord::unpack(packed));
                }
                continue; // the owner started evicting it; look again
            }
            if key == addr | EVICTING {
                M::spin_hint();
                M::yield_now();
                continue;
            }
            return None;
        }
    }
}

/// Steps (1) to (3) of a free by a thread whose own nursery does not hold
/// `addr` (module docs, "Any other free"): the shared table, then the slots
/// `slots()` gives (every other nursery's slot for `addr`), then the table
/// again.
#[inline(always)]
fn forget_foreign<'a, M: Memory, I: Iterator<Item = &'a Slot<M>>>(
    table: &impl EvictionTable,
    addr: usize,
    slots: impl FnOnce() -> I,
) -> Option<BlockRecord> {
    if let Some(rec) = table.remove(addr) {
        return Some(rec);
    }
    claim_elsewhere(table, slots(), addr)
}

/// Steps (2) and (3) of [`forget_foreign`].
#[cold]
#[inline(never)]
fn claim_elsewhere<'a, M: Memory>(
    table: &impl EvictionTable,
    mut slots: impl Iterator<Item = &'a Slot<M>>,
    addr: usize,
) -> Option<BlockRecord> {
    slots.find_map(|s| s.claim(addr)).or_else(|| table.remove(addr))
}

const NO_BUCKET: u32 = u32::MAX;

/// Event counts for one bucket, written only by the owner thread.
struct LocalCounts {
    /// The bucket counted here; `NO_BUCKET` when none. Zeroed memory means
    /// bucket 0 with zero counts, which is harmless.
    bucket: AtomicU32,
    counts: [[AtomicU64; COUNTS]; Domain::COUNT],
    /// `bucket`'s counters in the ledger once that bucket is settled (null
    /// before), so that the owner's updates of them skip the ledger's lookup.
    /// Cleared with `bucket`; valid until the ledger is reset, which clears
    /// every nursery first ([`Nurseries::clear`]).
    counters: AtomicPtr<Bucket>,
    /// While `counters` is set: the interpreter ID whose bucket it is
    /// ([`NO_FAST_ID`] if the bucket is not one interpreter's) and, per
    /// domain, the high bits of the bucket's packed records (a record is its
    /// size ORed with them). Else values no call matches, so that one
    /// comparison both finds the bucket and proves `counters` set.
    fast_id: AtomicI64,
    fast_tags: [AtomicU64; Domain::COUNT],
}

/// `LocalCounts::fast_id` when no interpreter ID may take the fast path.
const NO_FAST_ID: i64 = i64::MIN;
/// `LocalCounts::fast_tags` when no record may take the fast path: its
/// domain bits are 3, which no record has.
const NO_FAST_TAG: u64 = u64::MAX;

/// One thread's cache of young blocks. See the module docs.
pub struct Nursery {
    slots: [Slot; NURSERY_SLOTS],
    local: LocalCounts,
    /// Whether a thread currently owns this nursery.
    active: AtomicBool,
    /// The owner's grant cells (see [`crate::grants`]): a slot of the
    /// ledger's, kept for good once claimed, or [`NO_GRANTS`]. Never null.
    grants: AtomicPtr<GrantSlot>,
    /// Next nursery in the global list (set once, before publication).
    next: *const Nursery,
}

impl Nursery {
    /// A nursery that no fast path matches: no slot holds a block, and it
    /// keeps no bucket's counters (see `LocalCounts::fast_id`), so
    /// [`Tracker::allocated_fast`](crate::Tracker::allocated_fast) and
    /// [`Tracker::freeing_fast`](crate::Tracker::freeing_fast) return false
    /// without writing to it. A thread without a nursery of its own passes
    /// this one to the fast path, which then needs no null test.
    pub const fn empty() -> Nursery {
        Nursery {
            slots: [const { Slot { key: AtomicUsize::new(0), packed: AtomicU64::new(0) } }; NURSERY_SLOTS],
            local: LocalCounts {
                bucket: AtomicU32::new(NO_BUCKET),
                counts: [const { [const { AtomicU64::new(0) }; COUNTS] }; Domain::COUNT],
                counters: AtomicPtr::new(std::ptr::null_mut()),
                fast_id: AtomicI64::new(NO_FAST_ID),
                fast_tags: [const { AtomicU64::new(NO_FAST_TAG) }; Domain::COUNT],
            },
            active: AtomicBool::new(false),
            grants: AtomicPtr::new(&NO_GRANTS as *const GrantSlot as *mut GrantSlot),
            next: std::ptr::null(),
        }
    }

    /// The owner's grant cells.
    #[inline(always)]
    pub(crate) fn grants(&self) -> &GrantSlot {
        // SAFETY: `grants` is never null: NO_GRANTS (a static) or a slot of
        // the ledger, which outlives its tracker's nurseries.
        unsafe { &*self.grants.load(Ordering::Relaxed) }
    }

    /// The grant key of the bucket whose counters this nursery keeps (only
    /// meaningful while [`Nursery::cached_bucket`] or a fast path matched).
    #[inline(always)]
    pub(crate) fn grant_key(&self) -> u64 {
        key_of(self.local.bucket.load(Ordering::Relaxed))
    }

    /// Gives this nursery a grant slot of `ledger`'s if it has none yet.
    pub(crate) fn claim_grants(&self, ledger: &Ledger) {
        if std::ptr::eq(self.grants(), &NO_GRANTS) {
            if let Some(slot) = ledger.claim_grant_slot() {
                self.grants.store(slot as *const GrantSlot as *mut GrantSlot, Ordering::Relaxed);
            }
        }
    }
}

// SAFETY: all shared fields are atomics; `next` is written once before the
// nursery is published (Release) and never changed, so it may be read from
// any thread that observed the publication (Acquire).
unsafe impl Sync for Nursery {}
// SAFETY: see above; a nursery has no thread-bound state.
unsafe impl Send for Nursery {}

/// Direct-mapped by address: allocators carve blocks in address order, so
/// the nursery acts as a sliding window over recently carved memory, and
/// evictions reach the shared table in address order too, which keeps that
/// table's accesses local (see `block_table`'s layout).
const COUNT_KINDS: [Count; COUNTS] =
    [Count::Allocations, Count::Frees, Count::Reallocations, Count::Failures];

#[inline(always)]
fn slot_index(addr: usize) -> usize {
    (addr >> 4) & (NURSERY_SLOTS - 1)
}

/// Whether `addr` may live in a nursery (bit 0 is the eviction mark).
#[inline(always)]
pub fn cacheable(addr: usize) -> bool {
    addr & EVICTING == 0
}

impl Nursery {
    #[inline(always)]
    fn slot(&self, addr: usize) -> &Slot {
        const { assert!(std::mem::size_of::<Slot>() == 1 << 4) };
        // The slot's byte offset is the address bits that `slot_index` uses,
        // in place: one AND.
        let offset = addr & ((NURSERY_SLOTS - 1) << 4);
        debug_assert_eq!(offset / std::mem::size_of::<Slot>(), slot_index(addr));
        // SAFETY: `offset` is `slot_index(addr)` (below NURSERY_SLOTS) times
        // the size of a slot, so it addresses one slot of the array.
        unsafe { &*self.slots.as_ptr().byte_add(offset) }
    }

    /// Owner only: counts an event for `bucket`. Allocations move the local
    /// counts to `bucket` (the thread's current interpreter); other events for
    /// another bucket go straight to the ledger.
    #[inline(always)]
    pub fn count(&self, ledger: &Ledger, bucket: BucketId, domain: Domain, count: Count) {
        if self.local.bucket.load(Ordering::Relaxed) != bucket.index() {
            if count != Count::Allocations {
                ledger.add_count(bucket, domain, count, 1);
                return;
            }
            self.switch_bucket(ledger, bucket);
        }
        let c = &self.local.counts[domain.index()][count as usize];
        c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
    }

    #[cold]
    #[inline(never)]
    fn switch_bucket(&self, ledger: &Ledger, bucket: BucketId) {
        self.flush_counts(ledger);
        self.local.bucket.store(bucket.index(), Ordering::Relaxed);
    }

    /// Owner only: `bucket`'s ledger counters, if this nursery keeps them (it
    /// counts for `bucket`, which was settled when last asked): the fast path.
    #[inline(always)]
    pub(crate) fn cached_bucket(&self, bucket: BucketId) -> Option<&Bucket> {
        if self.local.bucket.load(Ordering::Relaxed) != bucket.index() {
            return None;
        }
        // SAFETY: a non-null pointer came from `ledger.settled_bucket` in
        // `cache_bucket`; buckets are never freed while the ledger lives,
        // and the ledger outlives its tracker's nurseries.
        unsafe { self.local.counters.load(Ordering::Relaxed).as_ref() }
    }

    /// Owner only: keep `bucket`'s counters if this nursery counts for it and
    /// the bucket is settled now (the slow path calls this after counting).
    #[cold]
    #[inline(never)]
    pub(crate) fn cache_bucket(&self, ledger: &Ledger, bucket: BucketId) {
        if self.local.bucket.load(Ordering::Relaxed) != bucket.index() {
            return;
        }
        if let Some(counters) = ledger.settled_bucket(bucket) {
            self.local.counters.store(counters as *const Bucket as *mut Bucket, Ordering::Relaxed);
            let id = match bucket.kind() {
                crate::ledger::BucketKind::Interpreter(id) => id,
                _ => NO_FAST_ID,
            };
            self.local.fast_id.store(id, Ordering::Relaxed);
            for (domain, tags) in Domain::ALL.into_iter().zip(&self.local.fast_tags) {
                tags.store(
                    BlockRecord::pack_tagged(BlockRecord::packed_tag(bucket, domain), 0),
                    Ordering::Relaxed,
                );
            }
        }
    }

    /// Owner only: forgets the counters kept for the fast path.
    fn uncache_bucket(&self) {
        self.local.fast_id.store(NO_FAST_ID, Ordering::Relaxed);
        self.local.fast_tags.iter().for_each(|t| t.store(NO_FAST_TAG, Ordering::Relaxed));
        self.local.counters.store(std::ptr::null_mut(), Ordering::Relaxed);
    }

    /// Owner only: counts an event for the bucket whose counters
    /// [`Nursery::cached_bucket`] returned.
    #[inline(always)]
    pub(crate) fn count_cached(&self, domain: Domain, count: Count) {
        let c = &self.local.counts[domain.index()][count as usize];
        c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
    }

    /// Owner (or single-threaded caller): moves the local counts to the
    /// ledger, and gives back the grants held of the bucket's counters.
    fn flush_counts(&self, ledger: &Ledger) {
        let bucket = self.local.bucket.load(Ordering::Relaxed);
        if bucket != NO_BUCKET {
            ledger.give_back_grants(BucketId::from_index(bucket), self.grants());
        }
        for (domain, counts) in Domain::ALL.into_iter().zip(&self.local.counts) {
            for (kind, c) in counts.iter().enumerate() {
                let n = c.load(Ordering::Relaxed);
                if n != 0 && bucket != NO_BUCKET {
                    ledger.add_count(BucketId::from_index(bucket), domain, COUNT_KINDS[kind], n);
                }
                c.store(0, Ordering::Relaxed);
            }
        }
        self.local.bucket.store(NO_BUCKET, Ordering::Relaxed);
        self.uncache_bucket();
    }

    /// The bucket and counts kept here (racy while the owner runs).
    pub(crate) fn local_counts(&self) -> Option<(BucketId, [[u64; COUNTS]; Domain::COUNT])> {
        let bucket = self.local.bucket.load(Ordering::Relaxed);
        (bucket != NO_BUCKET).then(|| {
            let counts = std::array::from_fn(|d| {
                std::array::from_fn(|k| self.local.counts[d][k].load(Ordering::Relaxed))
            });
            (BucketId::from_index(bucket), counts)
        })
    }

    /// Owner only: records a new block, evicting an older one from its slot
    /// into `table` if need be. Returns a stale record this displaced (a missed
    /// free: the slot, or the shared table, already held this address).
    ///
    /// The caller checks [`cacheable`] and [`BlockRecord::packable`] first.
    #[inline(always)]
    pub fn record(&self, table: &BlockTable, addr: usize, rec: BlockRecord) -> Option<BlockRecord> {
        debug_assert!(addr != 0 && cacheable(addr) && BlockRecord::packable(rec.size));
        self.slot(addr).record(table, addr, rec)
    }

    /// Owner only: records a new block allocated in `domain` by interpreter
    /// `id` if this nursery keeps that interpreter's counters and the block's
    /// slot is empty (the common case: the slot's last block was freed), and
    /// returns the counters. `None` changes nothing.
    #[inline(always)]
    pub(crate) fn record_fast(&self, id: i64, domain: Domain, addr: usize, size: usize) -> Option<&Bucket> {
        // A negative ID (none, or the NO_FAST_ID sentinel) never takes it.
        if id < 0 || self.local.fast_id.load(Ordering::Relaxed) != id {
            return None;
        }
        // One test for both: an odd address (the eviction mark) and a size
        // of 8 TiB or more (these may not pack; the general path decides).
        if (addr & EVICTING) | (size >> 43) != 0 {
            return None;
        }
        let packed = || self.local.fast_tags[domain.index()].load(Ordering::Relaxed) | size as u64;
        if !self.slot(addr).record_if_empty(addr, packed) {
            return None;
        }
        let counters = self.local.counters.load(Ordering::Relaxed);
        // SAFETY: `fast_id` matched, so `counters` is set (`cache_bucket`
        // stores it first, `uncache_bucket` clears it last): it came from
        // `ledger.settled_bucket`, and buckets live as long as the ledger,
        // which outlives its tracker's nurseries.
        Some(unsafe {
            std::hint::assert_unchecked(!counters.is_null());
            &*counters
        })
    }

    /// Owner only: forgets `addr` if it is in this nursery as a block
    /// allocated in `domain` by the bucket whose counters this nursery
    /// keeps; returns its size and those counters. `None` changes nothing
    /// (the general path follows). `addr` is not 0 (an empty slot's key).
    #[inline(always)]
    pub(crate) fn take_own_fast(&self, domain: Domain, addr: usize) -> Option<(u64, &Bucket)> {
        debug_assert_ne!(addr, 0);
        let tags_match = |packed| {
            let tags = self.local.fast_tags[domain.index()].load(Ordering::Relaxed);
            BlockRecord::tag_of(packed ^ tags) == 0
        };
        let packed = self.slot(addr).take_own_if(addr, tags_match)?;
        let counters = self.local.counters.load(Ordering::Relaxed);
        // SAFETY: as in `record_fast`: the tag matched, so `counters` is set.
        Some((BlockRecord::size_of(packed), unsafe {
            std::hint::assert_unchecked(!counters.is_null());
            &*counters
        }))
    }

    /// Owner only: if `addr` is in this nursery, forgets it and returns its record.
    #[inline(always)]
    pub fn take_own(&self, addr: usize) -> Option<BlockRecord> {
        self.slot(addr).take_own_if(addr, |_| true).map(BlockRecord::unpack)
    }

    /// Owner (or a single-threaded caller): evicts every resident block.
    fn evict_all(&self, table: &BlockTable, displaced: &mut dyn FnMut(BlockRecord)) {
        for slot in &self.slots {
            let key = slot.key.load(Ordering::Acquire);
            if key != 0 && cacheable(key) {
                if let Some(d) = slot.evict(table, key) {
                    displaced(d);
                }
            }
        }
    }

    /// Live blocks and their bytes resident here (racy while the owner runs).
    fn residents(&self) -> (usize, u64) {
        let mut count = 0;
        let mut bytes = 0u64;
        for slot in &self.slots {
            let key = slot.key.load(Ordering::Acquire);
            if key != 0 && cacheable(key) {
                count += 1;
                let rec = BlockRecord::unpack(slot.packed.load(Ordering::Relaxed));
                bytes = bytes.wrapping_add(rec.size as u64);
            }
        }
        (count, bytes)
    }
}

/// The global list of nurseries. See the module docs.
pub struct Nurseries {
    head: AtomicPtr<Nursery>,
}

impl Drop for Nurseries {
    fn drop(&mut self) {
        let mut next = *self.head.get_mut();
        while !next.is_null() {
            // SAFETY: every nursery in the list came from Box::leak in `adopt`
            // and is freed exactly once, here; `&mut self` proves no borrow of
            // any nursery outlives the list.
            let nursery = unsafe { Box::from_raw(next) };
            next = nursery.next as *mut Nursery;
        }
    }
}

impl Default for Nurseries {
    fn default() -> Self {
        Self::new()
    }
}

impl Nurseries {
    /// An empty list; `const` so that it can be a `static`.
    pub const fn new() -> Nurseries {
        Nurseries { head: AtomicPtr::new(std::ptr::null_mut()) }
    }

    fn iter(&self) -> impl Iterator<Item = &Nursery> + '_ {
        self.iter_from(self.head.load(Ordering::Acquire))
    }

    /// The list from `first` (the head, or null for nothing) on.
    fn iter_from(&self, first: *const Nursery) -> impl Iterator<Item = &Nursery> + '_ {
        let mut next = first;
        std::iter::from_fn(move || {
            if next.is_null() {
                return None;
            }
            // SAFETY: nurseries are freed only when the list itself is dropped
            // (which needs `&mut self`, so not while this borrow lives); `next`
            // links were written before publication (see `Nursery`).
            let current: &Nursery = unsafe { &*next };
            next = current.next;
            Some(current)
        })
    }

    /// A nursery for the calling thread: a retired one if any, else a new one.
    /// It lives as long as the list (for a `static` list: forever).
    pub fn adopt(&self) -> &Nursery {
        for nursery in self.iter() {
            if nursery.active.compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                return nursery;
            }
        }
        // SAFETY: a Nursery is atomics plus a raw pointer, all valid when zeroed
        // (empty slots, inactive, no next). The list owns it from here on and
        // frees it in `Drop`.
        let fresh: &mut Nursery = Box::leak(unsafe { Box::<Nursery>::new_zeroed().assume_init() });
        fresh.active.store(true, Ordering::Relaxed);
        fresh.local.bucket.store(NO_BUCKET, Ordering::Relaxed);
        // Zeroed, fast_id would match interpreter 0 with no counters kept.
        fresh.uncache_bucket();
        fresh.grants.store(&NO_GRANTS as *const GrantSlot as *mut GrantSlot, Ordering::Relaxed);
        let mut head = self.head.load(Ordering::Acquire);
        loop {
            fresh.next = head;
            match self.head.compare_exchange_weak(head, fresh, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return fresh,
                Err(now) => head = now,
            }
        }
    }

    /// Owner only: evicts every block of `nursery` into `table` and makes it
    /// available to another thread. `displaced` receives stale records that
    /// evictions pushed out of the shared table (missed frees).
    pub fn retire(
        &self,
        table: &BlockTable,
        ledger: &Ledger,
        nursery: &Nursery,
        displaced: &mut dyn FnMut(BlockRecord),
    ) {
        nursery.evict_all(table, displaced);
        nursery.flush_counts(ledger);
        nursery.active.store(false, Ordering::Release);
    }

    /// Any thread whose nursery (`skip`, if any) does not hold `addr`:
    /// finds and forgets its record in `table` or in another nursery
    /// (module docs, "Any other free"). `None`: never tracked.
    #[inline(always)]
    pub fn forget_foreign(
        &self,
        table: &BlockTable,
        addr: usize,
        skip: Option<&Nursery>,
    ) -> Option<BlockRecord> {
        forget_foreign(table, addr, || {
            // An odd address is never in a nursery (its slot scan is skipped).
            let first =
                if cacheable(addr) { self.head.load(Ordering::Acquire) } else { std::ptr::null_mut() };
            self.iter_from(first)
                .filter(move |n| !skip.is_some_and(|s| std::ptr::eq(*n, s)))
                .map(move |n| n.slot(addr))
        })
    }

    /// Live blocks and bytes resident in all nurseries.
    pub fn residents(&self) -> (usize, u64) {
        self.iter().fold((0, 0), |(c, b), n| {
            let (nc, nb) = n.residents();
            (c + nc, b.wrapping_add(nb))
        })
    }

    /// Empties every nursery without recording anything (a reset). Only call
    /// while no other thread records or frees blocks.
    pub fn clear(&self) {
        for nursery in self.iter() {
            for slot in &nursery.slots {
                slot.key.store(0, Ordering::Relaxed);
            }
            nursery.local.counts.iter().flatten().for_each(|c| c.store(0, Ordering::Relaxed));
            nursery.local.bucket.store(NO_BUCKET, Ordering::Relaxed);
            nursery.uncache_bucket();
        }
    }

    /// Every nursery's pending event counts, by bucket (racy while owners run).
    pub fn pending_counts(&self) -> impl Iterator<Item = (BucketId, [[u64; COUNTS]; Domain::COUNT])> + '_ {
        self.iter().filter_map(|n| n.local_counts())
    }

    /// In a `fork` child (single-threaded; the other threads are gone): moves
    /// every other nursery's blocks into `table` and retires those nurseries.
    ///
    /// A thread that did not survive the fork may have claimed a slot for
    /// eviction (`key | EVICTING`) without inserting it yet (eviction clears
    /// the slot under the shard lock, and the fork held every shard lock), so
    /// its block is moved here like any resident one.
    ///
    /// Other operations that a vanished thread left half done (an allocation
    /// counted but not yet recorded, a free recorded but not yet counted) are
    /// not repaired: in a child forked while other threads were allocating,
    /// figures can be off by those few blocks.
    pub fn adopt_orphans(
        &self,
        table: &BlockTable,
        ledger: &Ledger,
        keep: Option<&Nursery>,
        displaced: &mut dyn FnMut(BlockRecord),
    ) {
        for nursery in self.iter() {
            if keep.is_some_and(|k| std::ptr::eq(nursery, k)) {
                continue;
            }
            for slot in &nursery.slots {
                let Some((addr, rec)) = slot.orphan() else { continue };
                if let Some(d) = table.insert(addr, rec) {
                    displaced(d);
                }
                slot.key.store(0, Ordering::Release);
            }
            nursery.flush_counts(ledger);
            nursery.active.store(false, Ordering::Release);
        }
    }

    /// How many nurseries exist.
    pub fn count(&self) -> usize {
        self.iter().count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::BucketId;
    use std::sync::atomic::Ordering::{AcqRel, Acquire};

    #[test]
    fn fork_child_does_not_resurrect_a_block_freed_during_eviction() {
        // Owner O evicts X and is preempted; R frees X through the table; a
        // fork follows. The child must not record X again.
        let (table, ledger, nurseries) = (BlockTable::new(), Ledger::new(), Nurseries::new());
        let owner = BucketId::for_interpreter(Some(1));
        let x = 0x1000usize;
        let rec = BlockRecord { size: 64, owner, domain: Domain::Object };
        let o = nurseries.adopt();
        ledger.add_live(owner, Domain::Object, 64);
        assert!(o.record(&table, x, rec).is_none());
        let slot = o.slot(x);
        let old = slot.key.load(Acquire);
        // What evict() does, all of it, as one step under the shard lock.
        assert!(slot.evict(&table, old).is_none());
        let r = table.remove(x).unwrap(); // R frees X via the table
        ledger.sub_live(r.owner, r.domain, r.size);
        nurseries
            .adopt_orphans(&table, &ledger, None, &mut |s| ledger.on_missed_free(s.owner, s.domain, s.size));
        assert_eq!(table.get(x), None, "the fork child re-recorded a block that was already freed");
        // And a slot caught mid-claim (EVICTING, not inserted) is adopted.
        let y = 0x2000usize;
        let n = nurseries.adopt();
        assert!(n.record(&table, y, rec).is_none());
        n.slot(y).key.compare_exchange(y, y | EVICTING, AcqRel, Acquire).unwrap();
        nurseries.adopt_orphans(&table, &ledger, None, &mut |_| panic!("no missed free here"));
        assert_eq!(table.get(y), Some(rec));
    }
}

// Loom explores the interleavings itself; its thread stacks need system
// calls Miri does not run, so the models are not built under Miri.
#[cfg(all(test, not(miri)))]
mod models {
    //! Loom models of the slot protocol: [`Slot`]'s own code, with a small
    //! locked map standing in for the shared table. Each names the
    //! mutations it catches; `scripts/mutants.py` applies them and checks
    //! that the model fails.
    //!
    //! Every model hands the block's address to the freeing thread with a
    //! happens-before edge (a spawn), as a race-free program does: without
    //! one the free may not see the slot's key at all (nor, for a block in
    //! the table, the insertion), so no ordering in the slot could help.
    //!
    //! Not checkable here (weakening them passes every model):
    //! * the orderings that keep a claimer's read of `packed` from seeing the
    //!   owner's *later* write (the `Acquire` of the owner's loads and failed
    //!   CAS of `key`, the `Release` of the claimer's CAS): that is load
    //!   buffering, which loom does not model;
    //! * the `Release`/`Acquire` on `key` of `record`, `claim` and the clear in
    //!   `evict`: the hand-off above, and the shard lock (a claimer that saw
    //!   the clear takes the lock after the evicting owner), already order
    //!   what they would;
    //! * the first table lookup of a foreign free: a shortcut (a block that
    //!   left its nursery is usually in the table), not a step the protocol
    //!   needs.

    use loom::sync::{Arc, Mutex};
    use loom::thread;

    use interheap_sync::Loom;

    use super::*;
    use crate::ledger::BucketId;

    /// The shared table: blocks by address, under a (loom) mutex.
    #[derive(Default)]
    struct Table(Mutex<Vec<(usize, BlockRecord)>>);

    impl EvictionTable for Table {
        fn insert_then(&self, addr: usize, rec: BlockRecord, then: impl FnOnce()) -> Option<BlockRecord> {
            let mut map = self.0.lock().unwrap();
            let displaced = map.iter().position(|&(a, _)| a == addr).map(|i| map.swap_remove(i).1);
            map.push((addr, rec));
            then();
            displaced
        }
        fn remove(&self, addr: usize) -> Option<BlockRecord> {
            let mut map = self.0.lock().unwrap();
            map.iter().position(|&(a, _)| a == addr).map(|i| map.swap_remove(i).1)
        }
    }

    /// Two blocks that share a slot (the model has one slot).
    const A: usize = 0x1000;
    const B: usize = 0x2000;

    fn rec(size: usize) -> BlockRecord {
        BlockRecord { size, owner: BucketId::for_interpreter(Some(1)), domain: Domain::Object }
    }

    struct Shared {
        slot: Slot<Loom>,
        table: Table,
    }

    /// The slot holds `A`, recorded by the owner (this thread) before the
    /// freeing thread learns of `A` (its spawn orders that); the freeing
    /// thread frees `A` as every thread but the owner does.
    fn recorded_a_and_freed_elsewhere() -> (Arc<Shared>, thread::JoinHandle<Option<BlockRecord>>) {
        let shared = Arc::new(Shared {
            slot: Slot { key: Atomic::new(0), packed: Atomic::new(0) },
            table: Table::default(),
        });
        assert!(shared.slot.record(&shared.table, A, rec(16)).is_none());
        let freer = {
            let s = shared.clone();
            thread::spawn(move || forget_foreign(&s.table, A, || std::iter::once(&s.slot)))
        };
        (shared, freer)
    }

    /// After the race: `A` was freed with its own record, exactly once (the
    /// table holds nothing), and the slot holds `B` with `B`'s record.
    fn check(shared: &Shared, freed: Option<BlockRecord>) {
        assert_eq!(freed, Some(rec(16)), "A's free found no record, or another block's");
        assert!(shared.table.0.lock().unwrap().is_empty(), "A was left in the table after its free");
        assert_eq!(shared.slot.key.load(Ordering::Relaxed), B);
        assert_eq!(BlockRecord::unpack(shared.slot.packed.load(Ordering::Relaxed)), rec(32));
    }

    /// The owner records `B` in `A`'s slot, so evicts `A` into the table,
    /// while another thread frees `A`.
    ///
    /// Mutations caught: `evict` taking the block with a store instead of a
    /// CAS, `claim` taking it with a store instead of a CAS (both: `A` is
    /// claimed and inserted, so left in the table); `claim` not waiting out
    /// an eviction in progress, `evict` clearing the slot before it inserts
    /// the block, the foreign free dropping its second table lookup (all:
    /// the freeing thread misses `A`, which the eviction then inserts);
    /// `record` writing the new record before it evicts the old block (`A`
    /// is evicted or claimed with `B`'s record).
    #[test]
    fn eviction_racing_a_foreign_free_moves_the_block_once() {
        interheap_sync::model(|| {
            let (shared, freer) = recorded_a_and_freed_elsewhere();
            assert!(shared.slot.record(&shared.table, B, rec(32)).is_none());
            let freed = freer.join().unwrap();
            check(&shared, freed);
        });
    }

    /// A `fork` while the owner evicts `A` and another thread frees it: the
    /// forking thread holds the table's lock (as the prepare handler holds
    /// every shard lock) and works out what the child records, with the
    /// child's own code (`Slot::orphan`, then the table). A block whose free
    /// had completed before the fork must not come back in the child, and no
    /// block is recorded twice there. (A free still in progress at the fork
    /// is one of the half-done operations the child does not repair.)
    ///
    /// Mutations caught: `evict` clearing the slot after it released the
    /// shard lock (the child sees the eviction mark of a block that was
    /// inserted and freed since, and records it again).
    #[test]
    fn a_fork_child_does_not_resurrect_a_block_freed_during_its_eviction() {
        interheap_sync::model(|| {
            let shared = Arc::new(Shared {
                slot: Slot { key: Atomic::new(0), packed: Atomic::new(0) },
                table: Table::default(),
            });
            let freed = Arc::new(<Loom as Memory>::Bool::new(false));
            assert!(shared.slot.record(&shared.table, A, rec(16)).is_none());
            let freer = {
                let (s, freed) = (shared.clone(), freed.clone());
                thread::spawn(move || {
                    let found = forget_foreign(&s.table, A, || std::iter::once(&s.slot));
                    freed.store(true, Ordering::Release);
                    found
                })
            };
            let fork = {
                let (s, freed) = (shared.clone(), freed.clone());
                thread::spawn(move || {
                    let map = s.table.0.lock().unwrap();
                    let freed = freed.load(Ordering::Acquire);
                    let mut child: Vec<usize> = map.iter().map(|&(addr, _)| addr).collect();
                    child.extend(s.slot.orphan().map(|(addr, _)| addr));
                    drop(map);
                    assert!(!(freed && child.contains(&A)), "the fork child resurrected a freed block");
                    child.sort_unstable();
                    assert!(child.windows(2).all(|w| w[0] != w[1]), "the fork child records a block twice");
                })
            };
            assert!(shared.slot.record(&shared.table, B, rec(32)).is_none());
            fork.join().unwrap();
            assert_eq!(freer.join().unwrap(), Some(rec(16)));
        });
    }

    /// As `eviction_racing_a_foreign_free_moves_the_block_once`, but the owner tries the allocation fast path first (record
    /// only into an empty slot, as `Nursery::record_fast` does) and falls
    /// back to `record` when the slot is taken.
    ///
    /// Mutations caught: `record_if_empty` not checking that the slot is
    /// empty (`B` overwrites `A`, whose free then finds nothing).
    #[test]
    fn fast_recording_racing_a_foreign_free_loses_no_block() {
        interheap_sync::model(|| {
            let (shared, freer) = recorded_a_and_freed_elsewhere();
            if !shared.slot.record_if_empty(B, || rec(32).pack()) {
                assert!(shared.slot.record(&shared.table, B, rec(32)).is_none());
            }
            let freed = freer.join().unwrap();
            check(&shared, freed);
        });
    }
}
