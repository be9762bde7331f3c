//! Exact live and peak bytes that many threads update at once, without a
//! shared write per allocation: revocable per-thread *grants*.
//!
//! A bucket's live bytes in a domain are one counter that every thread of
//! the interpreter updates. Where calls are not serialized by a GIL (the raw
//! domain; every domain on a free-threaded build), one shared `fetch_add` per
//! allocation makes threads that allocate at once queue on one cache line.
//! Per-thread counters folded lazily would scale, but a peak read from them
//! is only an upper bound. A [`GrantedCounter`] keeps the peak exact and lets
//! a thread's churn below the peak touch only its own cache line.
//!
//! # The rule
//!
//! The shared word `charged` is the live bytes plus the bytes of every
//! outstanding grant. A grant is bytes a thread may allocate, and gets back
//! when it frees, without touching `charged`. It sits in a *cell* of the
//! thread's own ([`GrantSlot`], one cell per domain), tagged with the
//! counter's key. So:
//!
//! * live ≤ `charged`, always;
//! * a grant is issued only while `charged` plus the grant stays at or below
//!   the peak, and `charged` rises without the lock only while it stays at or
//!   below the peak: while grants are outstanding, nothing, in a grant or
//!   not, can take live above the peak;
//! * the one way above the peak is the locked path ([`GrantedCounter::add`]'s
//!   slow half), which revokes every grant first: `charged` is then the live
//!   bytes exactly, and the new peak is an exact value of live.
//!
//! A thread gets a grant two ways: bytes from the room below the peak, when
//! there is room, or the bytes of a block it frees, which `charged` already
//! counts (so a thread near the peak still churns in its own freed bytes).
//!
//! Steady churn below the peak then costs each thread an uncontended CAS on
//! its own cell. Growth that sets a new peak with every allocation takes the
//! lock each time, as an exact peak of a shared sum must serialize its new
//! maxima; for one thread that lock is uncontended.
//!
//! # Concurrency invariants
//!
//! * Issuing, giving back and revoking a grant happen under the counter's
//!   lock, and each changes `charged` by what it adds to or takes from the
//!   cell: for every lock holder, `charged` = live + Σ grants.
//! * A cell holds `key << AMOUNT_BITS | amount` for the counter `key`, or 0.
//!   Only its owner thread consumes from it or adds to it, each with a CAS
//!   that moves bytes between live and the grant (`charged` stays); a revoker
//!   may swap the cell to 0 at any moment, which makes that CAS fail and
//!   sends the owner to the shared word.
//! * `outstanding` counts grants issued and not yet given back or revoked;
//!   it changes only under the lock, so a lock holder that reads 0 knows that
//!   no cell holds this counter's key.
//! * Lock-free changes of `charged`: a CAS that keeps it at or below the peak
//!   (an allocation), and a `fetch_sub` (a free).
//! * The peak rises only under the lock. It is lowered only by a restart,
//!   also under the lock; allocations racing with a restart may be counted as
//!   made before it (as with any restart of a running counter).
//!
//! The protocol is this module's code, written over [`Memory`]: the ledger
//! runs it with [`Std`], and the loom models at the end run it with loom's
//! atomics.

use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed};
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64};

use interheap_sync::{Atomic, AtomicInt, Memory, SpinLock, Std};

use crate::domain::Domain;

/// Low bits of a cell: the grant's bytes. The key is in the bits above.
const AMOUNT_BITS: u32 = 44;
const AMOUNT_MASK: u64 = (1 << AMOUNT_BITS) - 1;
/// A cell no grant is ever issued to (the cells of a thread without a slot
/// of its own): its key bits are all ones, which no counter's key is.
pub const NEVER: u64 = u64::MAX;
/// The largest grant issued at once.
pub const GRANT_MAX: u64 = 16 * 1024;
/// The smallest grant worth its lock.
pub const GRANT_MIN: u64 = 64;
/// A grant is at most this fraction of the room left below the peak, so
/// that several threads can hold one.
pub const ROOM_SHARE: u64 = 8;
/// Frees fill a grant up to this; beyond it they go to the shared word.
pub const HOLD_MAX: u64 = 2 * GRANT_MAX;

/// The key of the counter of bucket `index` (below 2^18): never 0, which
/// an empty cell holds, and it fits above [`AMOUNT_BITS`].
#[inline(always)]
pub const fn key_of(index: u32) -> u64 {
    index as u64 + 1
}

/// The bytes a cell holds for `key`, or `None` if it holds none of its grant.
#[inline(always)]
fn amount_for(word: u64, key: u64) -> Option<u64> {
    let amount = word.wrapping_sub(key << AMOUNT_BITS);
    (amount <= AMOUNT_MASK).then_some(amount)
}

/// Owner of `cell`: allocates `bytes` from its grant of counter `key`.
/// False (nothing changed) if it holds too little or none.
#[inline(always)]
pub fn consume<M: Memory>(cell: &M::U64, key: u64, bytes: u64) -> bool {
    let word = cell.load(Relaxed);
    match amount_for(word, key) {
        Some(amount) if amount >= bytes => {
            cell.compare_exchange(word, word - bytes, Relaxed, Relaxed).is_ok()
        }
        _ => false,
    }
}

/// Owner of `cell`: frees `bytes` into its grant of counter `key`. False
/// (nothing changed) if it holds none, or if the grant would pass [`HOLD_MAX`].
#[inline(always)]
pub fn replenish<M: Memory>(cell: &M::U64, key: u64, bytes: u64) -> bool {
    let word = cell.load(Relaxed);
    match amount_for(word, key) {
        Some(amount) if amount <= HOLD_MAX && bytes <= HOLD_MAX - amount => {
            cell.compare_exchange(word, word + bytes, Relaxed, Relaxed).is_ok()
        }
        _ => false,
    }
}

/// Every cell that may hold a grant of a counter (one domain's cell of every
/// registered thread).
pub(crate) trait GrantCells<M: Memory> {
    /// Calls `f` with each cell.
    fn for_each(&self, f: &mut dyn FnMut(&M::U64));
}

/// One interpreter's live and peak bytes in one domain, with grants. See the
/// module docs. All-zero bytes are a valid, empty counter (the ledger
/// zero-fills its buckets).
pub(crate) struct GrantedCounter<M: Memory = Std> {
    /// Live bytes plus every outstanding grant.
    charged: M::U64,
    peak: M::U64,
    /// Grants outstanding: changed only under `lock`; read without it as a
    /// hint that there are none (see [`GrantedCounter::live`]).
    outstanding: M::U32,
    lock: SpinLock<(), M>,
}

impl<M: Memory> GrantedCounter<M> {
    /// An empty counter, over any [`Memory`] (a model's, for example).
    #[cfg(test)]
    pub(crate) fn new_in() -> Self {
        GrantedCounter {
            charged: Atomic::new(0),
            peak: Atomic::new(0),
            outstanding: Atomic::new(0),
            lock: SpinLock::new_in(()),
        }
    }

    /// Adds `bytes` to live (and to the peak, exactly). Returns the room
    /// left below the peak, or 0 if this set a new peak.
    #[inline(always)]
    pub(crate) fn add(&self, key: u64, bytes: u64, cells: &impl GrantCells<M>) -> u64 {
        match self.add_below_peak(bytes) {
            Some(room) => room,
            None => {
                self.add_past_peak(key, bytes, cells);
                0
            }
        }
    }

    /// Adds `bytes` if `charged` stays at or below the peak; returns the
    /// room left, or `None` (nothing changed) if it would not.
    #[inline(always)]
    fn add_below_peak(&self, bytes: u64) -> Option<u64> {
        let mut charged = self.charged.load(Relaxed);
        loop {
            let now = charged.wrapping_add(bytes);
            let peak = self.peak.load(Relaxed);
            // Negative sums (never produced by exact accounting) go the
            // locked way too, which never makes them a peak.
            if now > peak || (now as i64) < 0 {
                return None;
            }
            match self.charged.compare_exchange_weak(charged, now, Relaxed, Relaxed) {
                Ok(_) => return Some(peak - now),
                Err(seen) => charged = seen,
            }
        }
    }

    /// The locked half of [`GrantedCounter::add`]. Grants are revoked one at
    /// a time until the addition fits below the peak; only once none is
    /// left is `charged` exactly live, and the addition may set a new peak.
    /// (Revoking them all at once would send every thread back to the
    /// shared word whenever one thread's grant ran short near the peak.)
    #[cold]
    #[inline(never)]
    fn add_past_peak(&self, key: u64, bytes: u64, cells: &impl GrantCells<M>) {
        let _locked = self.lock.lock();
        let mut added = false;
        if self.outstanding.load(Relaxed) != 0 {
            cells.for_each(&mut |cell| {
                if !added && self.outstanding.load(Relaxed) != 0 {
                    self.revoke(cell, key);
                    added = self.add_below_peak(bytes).is_some();
                }
            });
        }
        if added {
            return;
        }
        debug_assert_eq!(self.outstanding.load(Relaxed), 0, "a grant outside the cells revoked");
        let now = self.charged.fetch_add(bytes, Relaxed).wrapping_add(bytes);
        if (now as i64) >= 0 && now > self.peak.load(Relaxed) {
            self.peak.store(now, Relaxed);
        }
    }

    /// Takes `bytes` from live.
    #[inline(always)]
    pub(crate) fn sub(&self, bytes: u64) {
        self.charged.fetch_sub(bytes, Relaxed);
    }

    /// [`GrantedCounter::add`] for a caller that is the only writer of this
    /// counter at this moment (`Ledger::add_live_serialized`): a plain load
    /// and store. Such counters never have grants.
    #[inline(always)]
    pub(crate) fn add_serialized(&self, bytes: u64) {
        let now = self.charged.load(Relaxed).wrapping_add(bytes);
        self.charged.store(now, Relaxed);
        if (now as i64) >= 0 && now > self.peak.load(Relaxed) {
            self.peak.store(now, Relaxed);
        }
    }

    /// [`GrantedCounter::sub`] under the rule of [`GrantedCounter::add_serialized`].
    #[inline(always)]
    pub(crate) fn sub_serialized(&self, bytes: u64) {
        self.charged.store(self.charged.load(Relaxed).wrapping_sub(bytes), Relaxed);
    }

    /// Owner of `cell`, after an allocation that left `room` below the peak:
    /// tops its grant up if the room allows. Never waits: if the lock is
    /// busy, there is no grant this time.
    #[inline]
    pub(crate) fn offer_grant(&self, cell: &M::U64, key: u64, room: u64) {
        if room >= GRANT_MIN * ROOM_SHARE {
            self.grant(cell, key);
        }
    }

    #[cold]
    #[inline(never)]
    fn grant(&self, cell: &M::U64, key: u64) {
        let Some(_locked) = self.lock.try_lock() else { return };
        // Only this thread and this counter's lock holders (which we are)
        // change the cell while it holds this key or nothing.
        let word = cell.load(Relaxed);
        let held = match amount_for(word, key) {
            Some(amount) => amount,
            None if word == 0 => 0,
            None => return, // another counter's grant, or a cell of NEVER
        };
        let mut charged = self.charged.load(Relaxed);
        let peak = self.peak.load(Relaxed);
        loop {
            if (charged as i64) < 0 || charged > peak {
                return;
            }
            let want = ((peak - charged) / ROOM_SHARE).min(GRANT_MAX.saturating_sub(held)) & !63;
            if want < GRANT_MIN {
                return;
            }
            match self.charged.compare_exchange_weak(charged, charged + want, Relaxed, Relaxed) {
                Ok(_) => {
                    cell.store(key << AMOUNT_BITS | (held + want), Relaxed);
                    if word == 0 {
                        self.count_grants(1);
                    }
                    return;
                }
                Err(seen) => charged = seen,
            }
        }
    }

    /// Owner of `cell`, for a free that [`replenish`] could not take: if the
    /// cell is empty, the freed bytes become the owner's new grant (this
    /// needs no room below the peak: they are counted in `charged` already),
    /// so that its next allocations take them back without a shared write.
    /// Otherwise, or if the lock is busy, they leave `charged`.
    #[inline]
    pub(crate) fn sub_into_grant(&self, cell: &M::U64, key: u64, bytes: u64) {
        if cell.load(Relaxed) == 0 && bytes <= HOLD_MAX && self.grant_freed(cell, key, bytes) {
            return;
        }
        self.sub(bytes);
    }

    #[cold]
    #[inline(never)]
    fn grant_freed(&self, cell: &M::U64, key: u64, bytes: u64) -> bool {
        let Some(_locked) = self.lock.try_lock() else { return false };
        // Only this thread makes an empty cell non-empty.
        cell.store(key << AMOUNT_BITS | bytes, Relaxed);
        self.count_grants(1);
        true
    }

    /// Under the lock: `outstanding += change`.
    fn count_grants(&self, change: i32) {
        let now = self.outstanding.load(Relaxed).checked_add_signed(change);
        self.outstanding.store(now.expect("the count of outstanding grants stays within u32"), Relaxed);
    }

    /// Owner of `cell`: gives back its grant of this counter, if any (the
    /// thread moves to another interpreter, or ends).
    pub(crate) fn give_back(&self, cell: &M::U64, key: u64) {
        if amount_for(cell.load(Relaxed), key).is_some() {
            let _locked = self.lock.lock();
            self.revoke(cell, key);
        }
    }

    /// Under the lock: takes `cell`'s grant of this counter back into `charged`.
    fn revoke(&self, cell: &M::U64, key: u64) {
        let mut word = cell.load(Relaxed);
        while let Some(amount) = amount_for(word, key) {
            match cell.compare_exchange(word, 0, AcqRel, Acquire) {
                Ok(_) => {
                    self.charged.fetch_sub(amount, Relaxed);
                    self.count_grants(-1);
                    return;
                }
                Err(seen) => word = seen,
            }
        }
    }

    /// Under the lock: revokes every grant of this counter.
    fn revoke_all(&self, key: u64, cells: &impl GrantCells<M>) {
        if self.outstanding.load(Relaxed) != 0 {
            cells.for_each(&mut |cell| self.revoke(cell, key));
        }
    }

    /// Live bytes now, exactly: revokes the grants (the owners get new ones
    /// on their next allocations).
    pub(crate) fn live(&self, key: u64, cells: &impl GrantCells<M>) -> i64 {
        let _locked = self.lock.lock();
        self.revoke_all(key, cells);
        self.charged.load(Relaxed) as i64
    }

    /// [`GrantedCounter::live`] for a path that reads it on every call
    /// (limits' and watched peaks' admissions, on which the tracker issues
    /// no grant): with no grant outstanding, `charged` is live, read without
    /// the lock. A grant that a thread issues just as a limit is set, before
    /// it sees the limit, can make such a read high by that grant, never low.
    #[inline]
    pub(crate) fn live_for_admission(&self, key: u64, cells: &impl GrantCells<M>) -> i64 {
        if self.outstanding.load(Relaxed) != 0 {
            return self.live(key, cells);
        }
        self.charged.load(Relaxed) as i64
    }

    /// The peak of live bytes.
    pub(crate) fn peak(&self) -> u64 {
        self.peak.load(Relaxed)
    }

    /// Restarts the peak from the live bytes now.
    pub(crate) fn restart_peak(&self, key: u64, cells: &impl GrantCells<M>) {
        let _locked = self.lock.lock();
        self.revoke_all(key, cells);
        self.peak.store((self.charged.load(Relaxed) as i64).max(0) as u64, Relaxed);
    }

    /// Zeroes the counter. Only while nothing else updates it; the cells
    /// are cleared by their registry ([`GrantRegistry::reset`]).
    pub(crate) fn reset(&self) {
        let _locked = self.lock.lock();
        self.outstanding.store(0, Relaxed);
        self.charged.store(0, Relaxed);
        self.peak.store(0, Relaxed);
    }

    /// In a `fork` child: releases the lock a vanished thread may hold.
    ///
    /// # Safety
    ///
    /// Single-threaded: no guard of this lock exists in this process.
    pub(crate) unsafe fn unlock_after_fork(&self) {
        // SAFETY: per the contract, no guard exists; the lock is either free
        // or was held by a thread that did not survive the fork.
        unsafe { self.lock.force_unlock() }
    }
}

/// One thread's grant cells, one per domain, on cache lines of their own.
#[repr(align(128))]
pub struct GrantSlot {
    cells: [AtomicU64; Domain::COUNT],
}

/// The cells of a thread that has no slot of its own: no grant is ever
/// issued to them, so a fast path that reads them needs no null test.
pub static NO_GRANTS: GrantSlot = GrantSlot { cells: [const { AtomicU64::new(NEVER) }; Domain::COUNT] };

impl GrantSlot {
    /// The cell of `domain`.
    #[inline(always)]
    pub(crate) fn cell(&self, domain: Domain) -> &AtomicU64 {
        &self.cells[domain.index()]
    }
}

const SLOTS_PER_CHUNK: usize = 64;
const CHUNKS: usize = 64;
/// Threads with a grant slot at once (their nurseries keep it; a thread
/// beyond this allocates through the shared word only).
pub const MAX_SLOTS: usize = SLOTS_PER_CHUNK * CHUNKS;

struct SlotChunk {
    slots: [GrantSlot; SLOTS_PER_CHUNK],
}

/// Every thread's [`GrantSlot`]: an append-only array of lazily allocated
/// chunks, freed only when the registry is dropped. A slot, once handed
/// out, is never moved or handed out again.
pub struct GrantRegistry {
    chunks: [AtomicPtr<SlotChunk>; CHUNKS],
    handed_out: AtomicU32,
}

impl Drop for GrantRegistry {
    fn drop(&mut self) {
        for chunk in &mut self.chunks {
            let chunk = *chunk.get_mut();
            if !chunk.is_null() {
                // SAFETY: published chunks come from Box::into_raw in `claim`
                // and are freed once, here; `&mut self` proves no slot
                // borrowed from the registry is still in use.
                drop(unsafe { Box::from_raw(chunk) });
            }
        }
    }
}

impl GrantRegistry {
    /// An empty registry; `const` so that it can be a `static`.
    pub const fn new() -> GrantRegistry {
        GrantRegistry {
            chunks: [const { AtomicPtr::new(std::ptr::null_mut()) }; CHUNKS],
            handed_out: AtomicU32::new(0),
        }
    }

    /// A new slot for a thread (empty cells), or `None` if all are taken.
    pub fn claim(&self) -> Option<&GrantSlot> {
        let index = self.handed_out.fetch_add(1, Relaxed) as usize;
        if index >= MAX_SLOTS {
            self.handed_out.fetch_sub(1, Relaxed);
            return None;
        }
        // SAFETY: a SlotChunk is atomics only, and all-zero atomics are empty
        // cells; published chunks are freed only when the registry is dropped.
        let chunk = unsafe { &*crate::published_or_zeroed(&self.chunks[index / SLOTS_PER_CHUNK]) };
        Some(&chunk.slots[index % SLOTS_PER_CHUNK])
    }

    /// Every handed-out slot (a slot whose chunk is still being published
    /// is not yet any thread's, so it holds no grant).
    fn for_each_slot(&self, mut f: impl FnMut(&GrantSlot)) {
        let handed_out = (self.handed_out.load(Acquire) as usize).min(MAX_SLOTS);
        for (c, chunk) in self.chunks.iter().enumerate().take(handed_out.div_ceil(SLOTS_PER_CHUNK)) {
            let chunk = chunk.load(Acquire);
            if chunk.is_null() {
                continue;
            }
            let in_chunk = (handed_out - c * SLOTS_PER_CHUNK).min(SLOTS_PER_CHUNK);
            // SAFETY: published chunks live as long as the registry.
            let chunk = unsafe { &*chunk };
            chunk.slots[..in_chunk].iter().for_each(&mut f);
        }
    }

    /// The cells of `domain`, as a counter's revocations walk them.
    pub(crate) fn cells(&self, domain: Domain) -> DomainCells<'_> {
        DomainCells { registry: self, domain }
    }

    /// Empties every cell. Only while no thread allocates.
    pub fn reset(&self) {
        self.for_each_slot(|slot| slot.cells.iter().for_each(|c| c.store(0, Relaxed)));
    }
}

impl Default for GrantRegistry {
    fn default() -> Self {
        Self::new()
    }
}

/// One domain's cell of every slot of a [`GrantRegistry`].
pub(crate) struct DomainCells<'a> {
    registry: &'a GrantRegistry,
    domain: Domain,
}

impl GrantCells<Std> for DomainCells<'_> {
    fn for_each(&self, f: &mut dyn FnMut(&AtomicU64)) {
        self.registry.for_each_slot(|slot| f(slot.cell(self.domain)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry_with(n: usize) -> (GrantRegistry, Vec<*const GrantSlot>) {
        let registry = GrantRegistry::new();
        let slots = (0..n).map(|_| registry.claim().unwrap() as *const GrantSlot).collect();
        (registry, slots)
    }

    fn slot<'a>(p: *const GrantSlot) -> &'a GrantSlot {
        // SAFETY: the registry outlives every use in these tests.
        unsafe { &*p }
    }

    const KEY: u64 = key_of(3);

    /// Raises the peak to `peak` and comes back to 0 live.
    fn with_room(counter: &GrantedCounter, cells: &DomainCells, peak: u64) {
        counter.add(KEY, peak, cells);
        counter.sub(peak);
    }

    #[test]
    fn grants_move_churn_off_the_shared_word_and_keep_figures_exact() {
        let (registry, slots) = registry_with(2);
        let cells = registry.cells(Domain::Mem);
        let counter = GrantedCounter::<Std>::new_in();
        with_room(&counter, &cells, 1 << 20);
        let cell = slot(slots[0]).cell(Domain::Mem);
        let room = counter.add(KEY, 100, &cells);
        counter.offer_grant(cell, KEY, room);
        let granted = amount_for(cell.load(Relaxed), KEY).expect("a grant");
        assert!((GRANT_MIN..=GRANT_MAX).contains(&granted), "{granted}");
        assert_eq!(counter.charged.load(Relaxed), 100 + granted);
        // Churn inside the grant leaves the shared word alone.
        for _ in 0..1000 {
            assert!(consume::<Std>(cell, KEY, 64));
            assert!(replenish::<Std>(cell, KEY, 64));
        }
        assert!(consume::<Std>(cell, KEY, 64));
        assert_eq!(counter.charged.load(Relaxed), 100 + granted);
        // Reading the live bytes revokes the grant: exact.
        assert_eq!(counter.live(KEY, &cells), 164);
        assert_eq!(cell.load(Relaxed), 0);
        assert!(!consume::<Std>(cell, KEY, 1), "a revoked grant is spent");
        assert!(!replenish::<Std>(cell, KEY, 1), "a revoked grant takes no frees");
        assert_eq!(counter.peak(), 1 << 20);
    }

    #[test]
    fn a_new_peak_revokes_every_grant_and_is_exact() {
        let (registry, slots) = registry_with(3);
        let cells = registry.cells(Domain::Object);
        let counter = GrantedCounter::<Std>::new_in();
        with_room(&counter, &cells, 1 << 20);
        for &s in &slots[..2] {
            counter.offer_grant(slot(s).cell(Domain::Object), KEY, 1 << 20);
        }
        assert_eq!(counter.outstanding.load(Relaxed), 2);
        // Live is 0; the grants fill `charged` up. Growing past the peak by
        // 1 byte makes live (1 MiB + 1) the new peak, not the grants' sum.
        assert_eq!(counter.add(KEY, (1 << 20) + 1, &cells), 0);
        assert_eq!(counter.peak(), (1 << 20) + 1);
        assert_eq!(counter.outstanding.load(Relaxed), 0);
        assert!(slots.iter().all(|&s| slot(s).cell(Domain::Object).load(Relaxed) == 0));
    }

    #[test]
    fn an_addition_near_the_peak_revokes_only_the_grants_it_needs() {
        let (registry, slots) = registry_with(2);
        let cells = registry.cells(Domain::Object);
        let counter = GrantedCounter::<Std>::new_in();
        with_room(&counter, &cells, 1 << 20);
        for &s in &slots {
            counter.offer_grant(slot(s).cell(Domain::Object), KEY, 1 << 20);
        }
        let second = amount_for(slot(slots[1]).cell(Domain::Object).load(Relaxed), KEY).unwrap();
        let room = (1 << 20) - counter.charged.load(Relaxed);
        // One byte more than the room: the first grant is enough to give back.
        counter.add(KEY, room + 1, &cells);
        assert_eq!(slot(slots[0]).cell(Domain::Object).load(Relaxed), 0);
        assert_eq!(amount_for(slot(slots[1]).cell(Domain::Object).load(Relaxed), KEY), Some(second));
        assert_eq!(counter.peak(), 1 << 20, "no new peak: live is below it");
        assert_eq!(counter.live(KEY, &cells), (room + 1) as i64);
    }

    #[test]
    fn grants_leave_room_for_others_and_never_pass_the_peak() {
        let (registry, slots) = registry_with(64);
        let cells = registry.cells(Domain::Raw);
        let counter = GrantedCounter::<Std>::new_in();
        with_room(&counter, &cells, 64 * 1024);
        for &s in &slots {
            counter.offer_grant(slot(s).cell(Domain::Raw), KEY, 64 * 1024);
        }
        let charged = counter.charged.load(Relaxed);
        assert!(charged <= 64 * 1024, "grants took {charged} bytes above a 64 KiB peak");
        // Each grant is a share of the room, so the first takes 4 KiB, not all.
        let first = amount_for(slot(slots[0]).cell(Domain::Raw).load(Relaxed), KEY).unwrap();
        assert_eq!(first, 64 * 1024 / ROOM_SHARE);
    }

    #[test]
    fn a_cell_of_never_and_another_counters_cell_get_no_grant() {
        let (registry, slots) = registry_with(1);
        let cells = registry.cells(Domain::Mem);
        let counter = GrantedCounter::<Std>::new_in();
        with_room(&counter, &cells, 1 << 20);
        counter.offer_grant(NO_GRANTS.cell(Domain::Mem), KEY, 1 << 20);
        assert_eq!(NO_GRANTS.cell(Domain::Mem).load(Relaxed), NEVER);
        let other = key_of(4);
        let cell = slot(slots[0]).cell(Domain::Mem);
        cell.store(other << AMOUNT_BITS | 1000, Relaxed);
        counter.offer_grant(cell, KEY, 1 << 20);
        assert_eq!(cell.load(Relaxed), other << AMOUNT_BITS | 1000);
        assert!(!consume::<Std>(cell, KEY, 1) && !replenish::<Std>(cell, KEY, 1));
        assert_eq!(counter.charged.load(Relaxed), 0);
    }

    #[test]
    fn giving_back_returns_the_bytes() {
        let (registry, slots) = registry_with(1);
        let cells = registry.cells(Domain::Mem);
        let counter = GrantedCounter::<Std>::new_in();
        with_room(&counter, &cells, 1 << 20);
        let cell = slot(slots[0]).cell(Domain::Mem);
        counter.offer_grant(cell, KEY, 1 << 20);
        assert!(consume::<Std>(cell, KEY, 10));
        counter.give_back(cell, KEY);
        assert_eq!(cell.load(Relaxed), 0);
        assert_eq!(counter.charged.load(Relaxed), 10);
        assert_eq!(counter.outstanding.load(Relaxed), 0);
    }

    #[test]
    fn frees_fill_a_grant_only_up_to_its_bound() {
        let (registry, slots) = registry_with(1);
        let cells = registry.cells(Domain::Mem);
        let counter = GrantedCounter::<Std>::new_in();
        with_room(&counter, &cells, 1 << 30);
        let cell = slot(slots[0]).cell(Domain::Mem);
        counter.offer_grant(cell, KEY, 1 << 30);
        assert_eq!(amount_for(cell.load(Relaxed), KEY), Some(GRANT_MAX));
        assert!(replenish::<Std>(cell, KEY, HOLD_MAX - GRANT_MAX));
        assert!(!replenish::<Std>(cell, KEY, 1));
        assert!(!replenish::<Std>(cell, KEY, u64::MAX));
    }

    /// Threads churn in their grants while one grows past the peak again and
    /// again: at the end live is what they hold, and the peak is reached.
    #[test]
    fn concurrent_churn_and_growth_stay_exact() {
        let threads = interheap_sync::iterations(4, 2);
        let rounds = interheap_sync::iterations(20_000, 200) as u64;
        let registry = GrantRegistry::new();
        let counter = GrantedCounter::<Std>::new_in();
        with_room(&counter, &registry.cells(Domain::Mem), 1 << 20);
        std::thread::scope(|scope| {
            for t in 0..threads {
                let (registry, counter) = (&registry, &counter);
                scope.spawn(move || {
                    let cells = registry.cells(Domain::Mem);
                    let cell = registry.claim().unwrap().cell(Domain::Mem);
                    for i in 0..rounds {
                        let size = 16 + (i % 7) * 16;
                        if !consume::<Std>(cell, KEY, size) {
                            let room = counter.add(KEY, size, &cells);
                            counter.offer_grant(cell, KEY, room);
                        }
                        if t == 0 && i % 64 == 0 {
                            // Thread 0 keeps one block in 64: growth.
                            continue;
                        }
                        if !replenish::<Std>(cell, KEY, size) {
                            counter.sub(size);
                        }
                    }
                    counter.give_back(cell, KEY);
                });
            }
        });
        let kept: u64 = (0..rounds).step_by(64).map(|i| 16 + (i % 7) * 16).sum();
        assert_eq!(counter.live(KEY, &registry.cells(Domain::Mem)), kept as i64);
        assert!(counter.peak() >= (1 << 20).max(kept));
        assert_eq!(counter.outstanding.load(Relaxed), 0);
    }
}

// Loom explores the interleavings itself; its thread stacks need system
// calls Miri does not run, so the models are not built under Miri.
#[cfg(all(test, not(miri)))]
mod models {
    //! Loom models of the grant protocol: [`GrantedCounter`]'s own code and
    //! the owner's [`consume`]/[`replenish`], with a few loom atomics as the
    //! cells. Each names the mutations it catches; `scripts/mutants.py`
    //! applies them and checks that the model fails.

    use loom::sync::Arc;
    use loom::thread;

    use interheap_sync::Loom;

    use super::*;

    const KEY: u64 = key_of(1);
    const PEAK: u64 = 4 * GRANT_MIN * ROOM_SHARE;

    struct Cells(Vec<<Loom as Memory>::U64>);

    impl GrantCells<Loom> for Cells {
        fn for_each(&self, f: &mut dyn FnMut(&<Loom as Memory>::U64)) {
            self.0.iter().for_each(f);
        }
    }

    struct Shared {
        counter: GrantedCounter<Loom>,
        cells: Cells,
    }

    /// A counter whose peak is [`PEAK`] with nothing live, and `threads` empty cells.
    fn shared(threads: usize) -> Arc<Shared> {
        let shared = Arc::new(Shared {
            counter: GrantedCounter::new_in(),
            cells: Cells((0..threads).map(|_| Atomic::new(0)).collect()),
        });
        shared.counter.add(KEY, PEAK, &shared.cells);
        shared.counter.sub(PEAK);
        shared
    }

    fn allocate(s: &Shared, cell: usize, bytes: u64) {
        let cell = &s.cells.0[cell];
        if !consume::<Loom>(cell, KEY, bytes) {
            let room = s.counter.add(KEY, bytes, &s.cells);
            s.counter.offer_grant(cell, KEY, room);
        }
    }

    /// A thread holding an unused grant, while another grows past the peak:
    /// the new peak is live's, not live plus the grant.
    ///
    /// Mutations caught: the locked path not revoking the grants first
    /// (the peak counts the unused grant), and the lock-free path adding
    /// without its peak check (a `fetch_add` that crosses the peak with the
    /// grant inside `charged`, then records it).
    #[test]
    fn an_unused_grant_never_inflates_a_new_peak() {
        interheap_sync::model(|| {
            let s = shared(2);
            let holder = {
                let s = s.clone();
                thread::spawn(move || {
                    s.counter.offer_grant(&s.cells.0[0], KEY, PEAK);
                })
            };
            allocate(&s, 1, PEAK - 1);
            allocate(&s, 1, 2);
            holder.join().unwrap();
            assert_eq!(s.counter.peak(), PEAK + 1, "the peak counts bytes nobody allocated");
            assert_eq!(s.counter.live(KEY, &s.cells), (PEAK + 1) as i64);
        });
    }

    /// Two threads each allocate and hold, one in its grant: both are live
    /// at once, so the peak is at least their sum, and never more.
    ///
    /// Mutations caught: issuing a grant without the room check (live
    /// passes the peak inside a grant, unseen); `consume` with a store
    /// instead of a CAS (a revoked grant is spent again: live runs past
    /// `charged`).
    #[test]
    fn blocks_live_at_once_make_an_exact_peak() {
        interheap_sync::model(|| {
            let s = shared(2);
            // Thread 0 holds a grant of a quarter of the room.
            s.counter.offer_grant(&s.cells.0[0], KEY, PEAK);
            let grant = amount_for(s.cells.0[0].load(Relaxed), KEY).unwrap();
            let user = {
                let s = s.clone();
                thread::spawn(move || allocate(&s, 0, grant))
            };
            allocate(&s, 1, PEAK - grant + 1);
            user.join().unwrap();
            assert_eq!(s.counter.live(KEY, &s.cells), (PEAK + 1) as i64);
            assert_eq!(s.counter.peak(), PEAK + 1);
        });
    }

    /// An owner frees into its grant while another thread revokes it: the
    /// bytes are counted once.
    ///
    /// Mutations caught: `replenish` with a store instead of a CAS (the free
    /// lands in a revoked cell: the bytes leave live twice, or not at all);
    /// `revoke` taking any cell whatever its key (another counter's grant
    /// moves into this one, and the count of outstanding grants underflows).
    #[test]
    fn a_free_racing_a_revocation_counts_once() {
        interheap_sync::model(|| {
            let s = shared(2);
            s.counter.offer_grant(&s.cells.0[0], KEY, PEAK);
            allocate(&s, 0, 100);
            s.cells.0[1].store(key_of(2) << AMOUNT_BITS | 7, Relaxed);
            let owner = {
                let s = s.clone();
                thread::spawn(move || {
                    if !replenish::<Loom>(&s.cells.0[0], KEY, 100) {
                        s.counter.sub_into_grant(&s.cells.0[0], KEY, 100);
                    }
                })
            };
            let live = s.counter.live(KEY, &s.cells);
            owner.join().unwrap();
            assert!(live == 0 || live == 100, "live read {live}");
            assert_eq!(s.counter.live(KEY, &s.cells), 0);
            assert_eq!(
                s.cells.0[1].load(Relaxed),
                key_of(2) << AMOUNT_BITS | 7,
                "another counter's grant moved"
            );
        });
    }
}
