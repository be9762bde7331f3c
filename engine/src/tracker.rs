//! The accounting rules a PEP 445 hook applies around each forwarded call.
//!
//! A [`Tracker`] combines the [`BlockTable`] (what each live block is) and the
//! [`Ledger`] (what each bucket holds). It knows nothing of CPython: the glue
//! forwards the real call and reports what happened.
//!
//! Rules (each keeps `allocations - frees == live blocks` true per bucket):
//!
//! * A successful allocation records the block in the caller's bucket.
//! * A free of a recorded block is charged to the bucket that allocated it,
//!   even from another thread or interpreter, even after that interpreter
//!   ended. A free of an unknown block (allocated before tracking began) is
//!   counted apart, as an untracked free, and changes no bucket.
//! * A reallocation of a recorded block keeps its owner and domain and moves
//!   the record if the address changed. A reallocation of an unknown block is
//!   an untracked free plus a fresh allocation by the caller.
//! * If an address comes back from the allocator while a record for it still
//!   exists, its free was missed (for example it was freed while another
//!   allocator was briefly installed): it is counted as a missed free.
//!
//! Ordering matters for correctness under concurrency, and the glue follows
//! it: forget a block *before* forwarding its free (after the free, another
//! thread may be handed the same address and record it), and record a block
//! *after* the forwarded allocation returns it.

use interheap_sync::Std;

use crate::block_table::{BlockRecord, BlockTable, TableStats};
use crate::domain::Domain;
use crate::grants;
use crate::ledger::{Bucket, BucketId, Count, Ledger, LedgerSnapshot};
use crate::limits::{Admission, DefaultLimit};
use crate::nursery::{cacheable, Nurseries, Nursery};
use interheap_sync::SpinLock;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering::Relaxed};

/// `Tracker::checks`: a limit was set.
const LIMITS_SET: u8 = 1;
/// `Tracker::checks`: peaks are watched.
const WATCHING: u8 = 2;
/// `Tracker::checks`: the glue does more per allocation (it samples sites).
const GLUE_WORK: u8 = 4;

/// Which path an allocation may take, from [`Tracker::fast_path`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FastPath {
    /// No limit was ever set, no peak is watched, the glue has no other
    /// work: [`Tracker::allocated_fast`] without [`Tracker::admit`].
    Plain,
    /// As `Plain`, and the glue samples allocation sites
    /// ([`Tracker::set_glue_work`]).
    Sampled,
    /// A limit was set (no peak watched, no sampling): [`Tracker::admit`]
    /// before forwarding, [`Tracker::allocated_fast`], [`Tracker::settle`].
    Limited,
    /// Peaks are watched, or a limit and sampling together: the general path.
    General,
}

/// Block table, nurseries and ledger, with the accounting rules in the module docs.
///
/// Every method that takes `local: Option<&Nursery>` must be given the
/// calling thread's own nursery (from [`Tracker::adopt_nursery`]) or `None`;
/// with `None` the shared table alone is used (slower, always correct).
///
/// # Census lock
///
/// Retiring a nursery moves its blocks to the shared table and its counts to
/// the ledger; a snapshot reads the ledger, the table and the nurseries in
/// turn. Both hold the census lock, so a snapshot never sees a retirement
/// half done. This matters because a thread's nursery is retired by its
/// exit-time destructor, which can still be running after `Thread.join()`
/// returned in Python: without the lock, "join, then snapshot" could miss
/// blocks in flight. The lock is taken only on those rare paths, never per
/// allocation.
pub struct Tracker {
    table: BlockTable,
    ledger: Ledger,
    nurseries: Nurseries,
    census: SpinLock<()>,
    /// Per domain: whether the caller guarantees that live bytes of one
    /// bucket are never updated by two threads at once (see `set_serialized`).
    serialized: [AtomicBool; Domain::COUNT],
    /// [`LIMITS_SET`] once a limit was ever set, | [`WATCHING`] while peaks
    /// are watched: while 0, admission costs one load.
    checks: AtomicU8,
    /// While set, every interpreter's budget is watched from its next admission.
    watch_all: AtomicBool,
    /// The limit of interpreters whose own limit was never set.
    default_limit: DefaultLimit,
    /// Whether a default limit waits until the interpreter's start-up is seen
    /// to end (see [`Tracker::require_start_signal`]).
    start_signal: AtomicBool,
}

thread_local! {
    /// The bucket this thread last asked admission for (only followed while
    /// [`Tracker::require_start_signal`] is on). No destructor: usable to the
    /// thread's very end.
    static LAST_ADMITTED: Cell<BucketId> = const { Cell::new(BucketId::NO_INTERPRETER) };
}

impl Default for Tracker {
    fn default() -> Self {
        Self::new()
    }
}

impl Tracker {
    /// An empty tracker; `const` so that it can be a `static`.
    pub const fn new() -> Tracker {
        Tracker {
            table: BlockTable::new(),
            ledger: Ledger::new(),
            nurseries: Nurseries::new(),
            census: SpinLock::new(()),
            serialized: [const { AtomicBool::new(false) }; Domain::COUNT],
            checks: AtomicU8::new(0),
            watch_all: AtomicBool::new(false),
            default_limit: DefaultLimit::new(),
            start_signal: AtomicBool::new(false),
        }
    }

    /// Makes a default limit wait until an interpreter's start-up is over,
    /// seen as the thread that created it leaving it: this thread's next
    /// admission is for another interpreter. For CPython 3.12, which records
    /// no whence (so a bucket settles during start-up); 3.13+ need not.
    pub fn require_start_signal(&self, on: bool) {
        self.start_signal.store(on, Relaxed);
    }

    /// Sets (or with `None` removes) the limit that every interpreter with
    /// an ID of at least `from_id` gets unless its own was set. It applies
    /// once interheap knows where the interpreter came from (its bucket is
    /// settled: see [`Ledger::set_describer`]), so not during the start-up of
    /// an interpreter made by `_interpreters` (CPython marks it "C API" until
    /// it is created). Interpreters it applied to keep their limit.
    pub fn set_default_limit(&self, limit: Option<u64>, from_id: i64) {
        if limit.is_some() {
            self.checks.fetch_or(LIMITS_SET, Relaxed);
        }
        self.default_limit.set(limit, from_id);
    }

    /// The default limit and the first interpreter ID it applies to.
    pub fn default_limit(&self) -> Option<(u64, i64)> {
        self.default_limit.get()
    }

    /// Sets (or with `None` removes) the memory limit of an interpreter's
    /// bucket: its live bytes over all domains. Raw calls made without a
    /// thread state (the no-interpreter bucket) are never limited, and the
    /// bucket shared by very large interpreter IDs cannot be limited: both
    /// are refused with `false`.
    pub fn set_limit(&self, owner: BucketId, limit: Option<u64>) -> bool {
        if !matches!(owner.kind(), crate::ledger::BucketKind::Interpreter(_)) {
            return false;
        }
        if limit.is_some() {
            self.checks.fetch_or(LIMITS_SET, Relaxed);
        }
        self.ledger.budget(owner).set_limit(limit);
        true
    }

    /// Lowers an interpreter's limit (see [`crate::limits::Budget::lower_limit`]):
    /// false if that would raise it (a default that applies counts), or the
    /// bucket cannot be limited.
    pub fn lower_limit(&self, owner: BucketId, limit: u64) -> bool {
        if !matches!(owner.kind(), crate::ledger::BucketKind::Interpreter(_)) {
            return false;
        }
        self.checks.fetch_or(LIMITS_SET, Relaxed);
        let budget = self.ledger.budget(owner);
        if !budget.configured() {
            self.maybe_apply_default(owner);
        }
        budget.lower_limit(limit)
    }

    /// Starts (or stops) watching the peak of every interpreter's live bytes
    /// over all domains, exactly, with or without a limit: the peak restarts
    /// from the live bytes now, and an interpreter created meanwhile is
    /// watched from its first allocation. Read it in each bucket's
    /// `budget.peak`. Starting also restarts each domain's peak from its live
    /// bytes, so that they say which domain grew. While watching, every interpreter's allocations take
    /// the admission path (a few loads and the live total).
    pub fn watch_peaks(&self, on: bool) {
        if on {
            self.checks.fetch_or(WATCHING, Relaxed);
        }
        self.watch_all.store(on, Relaxed);
        self.ledger.for_each_used(|id| {
            if matches!(id.kind(), crate::ledger::BucketKind::Interpreter(_)) {
                self.ledger.budget(id).watch(on, self.ledger.live_total(id));
                if on {
                    self.ledger.restart_peaks(id);
                }
            }
        });
        if !on {
            self.checks.fetch_and(!WATCHING, Relaxed);
        }
    }

    /// The memory limit of an interpreter's bucket, if one is set, or the
    /// default limit it will get.
    pub fn limit(&self, owner: BucketId) -> Option<u64> {
        if self.checks.load(Relaxed) & LIMITS_SET == 0 {
            return None;
        }
        let budget = self.ledger.budget(owner);
        if budget.configured() {
            return budget.limit();
        }
        match owner.kind() {
            crate::ledger::BucketKind::Interpreter(id) => self.default_limit.for_interpreter(id),
            _ => None,
        }
    }

    /// Asks `owner`'s limit for `size` more bytes, before the request is
    /// forwarded. After an [`Admission::Admitted`], call [`Tracker::settle`]
    /// once the outcome is recorded; an [`Admission::Refused`] request must be
    /// refused (it is counted in the budget; count the failure as usual).
    #[inline(always)]
    pub fn admit(&self, owner: BucketId, size: usize) -> Admission {
        if self.checks.load(Relaxed) & (LIMITS_SET | WATCHING) == 0 || owner == BucketId::NO_INTERPRETER {
            return Admission::Unlimited;
        }
        self.admit_limited(owner, size)
    }

    #[inline(never)]
    fn admit_limited(&self, owner: BucketId, size: usize) -> Admission {
        if self.start_signal.load(Relaxed) {
            self.note_thread_in(owner);
        }
        let budget = self.ledger.budget(owner);
        if !budget.configured() {
            self.maybe_apply_default(owner);
        }
        if self.watch_all.load(Relaxed) && !budget.is_watched() {
            budget.watch(true, self.ledger.live_total(owner));
        }
        budget.admit(size as u64, || self.ledger.live_total(owner))
    }

    /// This thread asks for `owner`: if it last asked for another
    /// interpreter, it left that one, whose start-up (if it was creating it)
    /// is over.
    fn note_thread_in(&self, owner: BucketId) {
        let previous = LAST_ADMITTED.with(|last| last.replace(owner));
        if previous != owner && previous != BucketId::NO_INTERPRETER {
            self.ledger.budget(previous).mark_started();
        }
    }

    #[cold]
    fn maybe_apply_default(&self, owner: BucketId) {
        if let crate::ledger::BucketKind::Interpreter(id) = owner.kind() {
            let started = !self.start_signal.load(Relaxed) || self.ledger.budget(owner).is_started();
            if self.default_limit.for_interpreter(id).is_some() && self.ledger.is_settled(owner) && started {
                self.default_limit.apply(self.ledger.budget(owner), id);
            }
        }
    }

    /// The request `admit` admitted has been recorded (or failed).
    #[inline(always)]
    pub fn settle(&self, owner: BucketId, size: usize, admission: Admission) {
        if admission == Admission::Admitted {
            self.ledger.budget(owner).settle(size as u64);
        }
    }

    /// Declares whether every update of a bucket's `domain` figures comes from
    /// a thread that holds a lock serialising all such updates for that
    /// bucket. Then live and peak bytes are kept with plain loads and stores
    /// instead of locked read-modify-writes (still exact).
    ///
    /// CPython's mem and object domains on a default build qualify: CPython
    /// requires the GIL for those calls, and a block is only ever allocated
    /// or freed under the GIL of the interpreter whose allocator state owns it
    /// (legacy subinterpreters share the main interpreter's GIL and state).
    /// The one exception is a free of one isolated interpreter's block from
    /// another, which already corrupts that allocator's state (DESIGN fact 7)
    /// and may lose one update here. The raw domain (no GIL) and free-threaded
    /// builds (no GIL at all) do not qualify.
    pub fn set_serialized(&self, domain: Domain, serialized: bool) {
        self.serialized[domain.index()].store(serialized, Relaxed);
    }

    #[inline(always)]
    fn add_live(&self, owner: BucketId, domain: Domain, bytes: usize) {
        if self.is_serialized(domain) {
            self.ledger.add_live_serialized(owner, domain, bytes);
        } else {
            self.ledger.add_live(owner, domain, bytes);
        }
    }

    #[inline(always)]
    fn sub_live(&self, owner: BucketId, domain: Domain, bytes: usize) {
        if self.is_serialized(domain) {
            self.ledger.sub_live_serialized(owner, domain, bytes);
        } else {
            self.ledger.sub_live(owner, domain, bytes);
        }
    }

    /// The bucket counters.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The shared block table (blocks not in any nursery).
    pub fn table(&self) -> &BlockTable {
        &self.table
    }

    /// A nursery for the calling thread to pass as `local`. Give it back with
    /// [`Tracker::retire_nursery`] before the thread ends.
    pub fn adopt_nursery(&self) -> &Nursery {
        let nursery = self.nurseries.adopt();
        nursery.claim_grants(&self.ledger);
        nursery
    }

    /// The calling thread is done with its nursery: move its blocks to the
    /// shared table and let another thread adopt it.
    pub fn retire_nursery(&self, nursery: &Nursery) {
        let _census = self.census.lock();
        self.nurseries.retire(&self.table, &self.ledger, nursery, &mut |s| {
            self.ledger.on_missed_free(s.owner, s.domain, s.size)
        });
    }

    /// For a `fork` prepare handler: takes the census lock and every shard
    /// lock, so that the child inherits none of them held by a thread that
    /// does not exist there. Undo with [`Tracker::unlock_after_fork`].
    pub fn lock_for_fork(&self) {
        std::mem::forget(self.census.lock());
        self.table.lock_all();
    }

    /// Releases what [`Tracker::lock_for_fork`] took.
    ///
    /// # Safety
    ///
    /// Must follow [`Tracker::lock_for_fork`] on the same thread, in the
    /// parent or in the child.
    pub unsafe fn unlock_after_fork(&self) {
        // SAFETY: lock_for_fork holds every shard lock and forgot the guards.
        unsafe { self.table.unlock_all() };
        // SAFETY: lock_for_fork holds the census lock and forgot its guard.
        unsafe { self.census.force_unlock() };
    }

    /// In a `fork` child: retire the nurseries of the threads that did not
    /// survive the fork (every one but `keep`). Single-threaded only.
    pub fn after_fork_in_child(&self, keep: Option<&Nursery>) {
        // SAFETY: a fork child is single-threaded until it starts threads,
        // which it cannot have done before this handler.
        unsafe { self.ledger.unlock_after_fork() };
        self.nurseries.adopt_orphans(&self.table, &self.ledger, keep, &mut |s| {
            self.ledger.on_missed_free(s.owner, s.domain, s.size)
        });
    }

    /// Counts an event in the thread's nursery when it has one (no atomic
    /// read-modify-write), else in the ledger.
    #[inline(always)]
    fn count(&self, local: Option<&Nursery>, bucket: BucketId, domain: Domain, count: Count) {
        match local {
            Some(nursery) => nursery.count(&self.ledger, bucket, domain, count),
            None => self.ledger.add_count(bucket, domain, count, 1),
        }
    }

    #[inline(always)]
    fn record(&self, local: Option<&Nursery>, addr: usize, rec: BlockRecord) {
        let stale = match local {
            Some(nursery) if cacheable(addr) && BlockRecord::packable(rec.size) => {
                nursery.record(&self.table, addr, rec)
            }
            _ => self.table.insert(addr, rec),
        };
        if let Some(s) = stale {
            self.ledger.on_missed_free(s.owner, s.domain, s.size);
        }
    }

    /// Finds and forgets the record of `addr`, wherever it is.
    #[inline(always)]
    fn forget(&self, local: Option<&Nursery>, addr: usize) -> Option<BlockRecord> {
        if let Some(rec) = local.and_then(|n| n.take_own(addr)) {
            return Some(rec);
        }
        // The shared table, then (cold) another thread's nursery, or one
        // being evicted right now (see the nursery module's protocol).
        self.nurseries.forget_foreign(&self.table, addr, local)
    }

    /// `owner` allocated `size` bytes at `addr` (non-zero) in `domain`.
    #[inline(always)]
    pub fn allocated(
        &self,
        local: Option<&Nursery>,
        owner: BucketId,
        domain: Domain,
        addr: usize,
        size: usize,
    ) {
        let rec = BlockRecord { size, owner, domain };
        if let Some(nursery) = local {
            if let Some(bucket) = nursery.cached_bucket(owner) {
                self.add_live_to(nursery, bucket, domain, self.is_serialized(domain), size as u64);
                nursery.count_cached(domain, Count::Allocations);
                self.record(local, addr, rec);
                return;
            }
        }
        self.add_live(owner, domain, size);
        self.count(local, owner, domain, Count::Allocations);
        if let Some(nursery) = local {
            nursery.cache_bucket(&self.ledger, owner);
        }
        self.record(local, addr, rec);
    }

    /// Which path an allocation may take (see [`FastPath`]). One load.
    #[inline(always)]
    pub fn fast_path(&self) -> FastPath {
        // Ordered for the common case: 0 (no limit, no sampling) is one test.
        match self.checks.load(Relaxed) {
            0 => FastPath::Plain,
            GLUE_WORK => FastPath::Sampled,
            LIMITS_SET => FastPath::Limited,
            _ => FastPath::General,
        }
    }

    /// The glue says whether it does more per allocation than this tracker's
    /// accounting (sampling allocation sites), so that its fast path learns
    /// it from the same load as [`Tracker::fast_path`].
    pub fn set_glue_work(&self, on: bool) {
        if on {
            self.checks.fetch_or(GLUE_WORK, Relaxed);
        } else {
            self.checks.fetch_and(!GLUE_WORK, Relaxed);
        }
    }

    /// [`Tracker::allocated`] when it takes only the thread's own state:
    /// the block was allocated by interpreter `id` (the caller's, as
    /// `PyInterpreterState_GetID` says: the bucket
    /// `BucketId::for_interpreter(Some(id))`), which `local` counts for and
    /// keeps counters of, and the block's nursery slot is free. False
    /// (nothing changed) sends the caller to [`Tracker::allocated`]. Call
    /// only where [`Tracker::fast_path`] is not `General`, with [`Tracker::admit`]
    /// first where it is `Limited`.
    ///
    /// `serialized` must be what [`Tracker::set_serialized`] said for
    /// `domain` (the glue knows it at compile time, which saves a load).
    #[inline(always)]
    pub fn allocated_fast(
        &self,
        local: &Nursery,
        id: i64,
        domain: Domain,
        serialized: bool,
        addr: usize,
        size: usize,
    ) -> bool {
        debug_assert_eq!(serialized, self.is_serialized(domain));
        let Some(bucket) = local.record_fast(id, domain, addr, size) else { return false };
        self.add_live_to(local, bucket, domain, serialized, size as u64);
        local.count_cached(domain, Count::Allocations);
        true
    }

    /// Adds to counters the nursery keeps, from the thread's grant if it
    /// holds enough (no shared write), else through the shared word, then
    /// asks for a grant if there is room (see [`crate::grants`]). Not while
    /// limits are set or peaks watched: their admissions read live bytes
    /// exactly on every call, which revokes grants.
    #[inline(always)]
    fn add_live_granted(&self, local: &Nursery, bucket: &Bucket, domain: Domain, bytes: u64) {
        let cell = local.grants().cell(domain);
        let key = local.grant_key();
        if !grants::consume::<Std>(cell, key, bytes) {
            let counter = &bucket.domain(domain).bytes;
            let room = counter.add(key, bytes, &self.ledger.grant_cells(domain));
            if self.checks.load(Relaxed) & (LIMITS_SET | WATCHING) == 0 {
                counter.offer_grant(cell, key, room);
            }
        }
    }

    /// Takes from counters the nursery keeps: into the thread's grant (a
    /// new one if its cell is empty), else from the shared word.
    #[inline(always)]
    fn sub_live_granted(&self, local: &Nursery, bucket: &Bucket, domain: Domain, bytes: u64) {
        let (cell, key) = (local.grants().cell(domain), local.grant_key());
        if !grants::replenish::<Std>(cell, key, bytes) {
            let counter = &bucket.domain(domain).bytes;
            if self.checks.load(Relaxed) & (LIMITS_SET | WATCHING) == 0 {
                counter.sub_into_grant(cell, key, bytes);
            } else {
                counter.sub(bytes);
            }
        }
    }

    /// [`Tracker::freeing`] when it takes only the thread's own state: the
    /// block is in `local`, allocated in `domain` by the bucket `local`
    /// counts for. False (nothing changed) sends the caller to
    /// [`Tracker::freeing`]. `serialized` as in [`Tracker::allocated_fast`].
    #[inline(always)]
    pub fn freeing_fast(&self, local: &Nursery, domain: Domain, serialized: bool, addr: usize) -> bool {
        debug_assert_eq!(serialized, self.is_serialized(domain));
        let Some((size, bucket)) = local.take_own_fast(domain, addr) else { return false };
        self.sub_live_from(local, bucket, domain, serialized, size);
        local.count_cached(domain, Count::Frees);
        true
    }

    /// `add_live` on counters `nursery` keeps: a plain update where the
    /// domain is `serialized` (by the GIL), else through the thread's grant.
    /// The fast paths pass a constant, the others [`Tracker::is_serialized`].
    #[inline(always)]
    fn add_live_to(&self, nursery: &Nursery, bucket: &Bucket, domain: Domain, serialized: bool, bytes: u64) {
        if serialized {
            bucket.domain(domain).bytes.add_serialized(bytes);
        } else {
            self.add_live_granted(nursery, bucket, domain, bytes);
        }
    }

    /// `sub_live` on counters `nursery` keeps; `serialized` as in
    /// [`Tracker::add_live_to`].
    #[inline(always)]
    fn sub_live_from(
        &self,
        nursery: &Nursery,
        bucket: &Bucket,
        domain: Domain,
        serialized: bool,
        bytes: u64,
    ) {
        if serialized {
            bucket.domain(domain).bytes.sub_serialized(bytes);
        } else {
            self.sub_live_granted(nursery, bucket, domain, bytes);
        }
    }

    /// What [`Tracker::set_serialized`] last said for `domain`.
    #[inline(always)]
    fn is_serialized(&self, domain: Domain) -> bool {
        self.serialized[domain.index()].load(Relaxed)
    }

    /// An allocation or reallocation request by `owner` failed.
    #[inline]
    pub fn failed(&self, local: Option<&Nursery>, owner: BucketId, domain: Domain) {
        self.count(local, owner, domain, Count::Failures);
    }

    /// The block at `addr` (non-zero) is about to be freed through `domain`.
    /// Call before forwarding the free. Returns its size, if it was tracked.
    #[inline(always)]
    pub fn freeing(&self, local: Option<&Nursery>, domain: Domain, addr: usize) -> Option<usize> {
        match self.forget(local, addr) {
            Some(rec) => {
                self.account_free(local, rec);
                Some(rec.size)
            }
            None => {
                self.ledger.on_untracked_free(domain);
                None
            }
        }
    }

    /// The checker's free, in two steps: takes the record of `addr` (the
    /// block leaves the figures' view only with [`Tracker::account_free`]),
    /// so the checker can look at it before deciding what to forward.
    #[inline]
    pub fn take(&self, local: Option<&Nursery>, addr: usize) -> Option<BlockRecord> {
        self.forget(local, addr)
    }

    /// Counts the free of a block whose record [`Tracker::take`] returned
    /// (whether the allocator got it back or the checker kept it).
    #[inline(always)]
    pub fn account_free(&self, local: Option<&Nursery>, rec: BlockRecord) {
        if let Some(nursery) = local {
            if let Some(bucket) = nursery.cached_bucket(rec.owner) {
                self.sub_live_from(
                    nursery,
                    bucket,
                    rec.domain,
                    self.is_serialized(rec.domain),
                    rec.size as u64,
                );
                nursery.count_cached(rec.domain, Count::Frees);
                return;
            }
        }
        self.sub_live(rec.owner, rec.domain, rec.size);
        self.count(local, rec.owner, rec.domain, Count::Frees);
    }

    /// Counts the free of a block the hooks never saw allocated.
    #[inline]
    pub fn account_untracked_free(&self, domain: Domain) {
        self.ledger.on_untracked_free(domain);
    }

    /// The block at `addr` (non-zero) is about to be reallocated. Call before
    /// forwarding; pass the result to [`Tracker::reallocated`].
    #[inline]
    pub fn reallocating(&self, local: Option<&Nursery>, addr: usize) -> Option<BlockRecord> {
        self.forget(local, addr)
    }

    /// A reallocation of `old_addr` (with record `old` from
    /// [`Tracker::reallocating`]) by `owner` returned `new_addr` (0: it failed
    /// and the old block is untouched) for `new_size` bytes.
    #[allow(clippy::too_many_arguments)]
    pub fn reallocated(
        &self,
        local: Option<&Nursery>,
        owner: BucketId,
        domain: Domain,
        old_addr: usize,
        old: Option<BlockRecord>,
        new_addr: usize,
        new_size: usize,
    ) {
        match (old, new_addr) {
            (old, 0) => {
                if let Some(rec) = old {
                    // The old block is still live; put its record back.
                    self.record(local, old_addr, rec);
                }
                self.count(local, owner, domain, Count::Failures);
            }
            (Some(rec), _) => {
                if new_size >= rec.size {
                    self.add_live(rec.owner, rec.domain, new_size - rec.size);
                } else {
                    self.sub_live(rec.owner, rec.domain, rec.size - new_size);
                }
                self.count(local, rec.owner, rec.domain, Count::Reallocations);
                self.record(local, new_addr, BlockRecord { size: new_size, ..rec });
            }
            (None, _) => {
                self.ledger.on_untracked_free(domain);
                self.allocated(local, owner, domain, new_addr, new_size);
            }
        }
    }

    /// Figures of every used bucket, including counts pending in nurseries.
    pub fn snapshot(&self) -> LedgerSnapshot {
        let _census = self.census.lock();
        self.snapshot_locked()
    }

    fn snapshot_locked(&self) -> LedgerSnapshot {
        let mut snap = self.ledger.snapshot();
        for (bucket, counts) in self.nurseries.pending_counts() {
            snap.merge_counts(bucket, &counts);
        }
        snap
    }

    /// The ledger's figures and the blocks' own count, read together (see
    /// the census lock): in a quiet process, live blocks and bytes in the
    /// first equal entries and live bytes in the second.
    pub fn census(&self) -> (LedgerSnapshot, TableStats) {
        let _census = self.census.lock();
        (self.snapshot_locked(), self.table_stats_locked())
    }

    /// Occupancy of the shared table, plus the blocks resident in nurseries
    /// (`entries` and `live_bytes` count both; `bytes` adds the nurseries' memory).
    pub fn table_stats(&self) -> TableStats {
        let _census = self.census.lock();
        self.table_stats_locked()
    }

    fn table_stats_locked(&self) -> TableStats {
        let mut stats = self.table.stats();
        let (count, bytes) = self.nurseries.residents();
        stats.entries += count;
        stats.live_bytes = stats.live_bytes.wrapping_add(bytes);
        stats.bytes += self.nurseries.count() * std::mem::size_of::<Nursery>();
        stats
    }

    /// Forgets every block and zeroes every counter (a fresh start). Only call
    /// while no other thread allocates. Holds the census lock, so a thread
    /// that is still retiring its nursery at exit (which `Thread.join()` does
    /// not wait for) cannot slip old records into the fresh start.
    pub fn reset(&self) {
        let _census = self.census.lock();
        self.table.clear();
        self.nurseries.clear();
        self.ledger.reset();
    }

    /// Forgets every block but keeps the figures (after the hooks are
    /// removed, when the records can no longer be matched with frees).
    pub fn forget_blocks(&self) {
        let _census = self.census.lock();
        self.table.clear();
        self.nurseries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: BucketId = BucketId::NO_INTERPRETER;
    const NURSERY_SLOTS_FOR_TESTS: usize = crate::nursery::NURSERY_SLOTS;

    fn interp(id: i64) -> BucketId {
        BucketId::for_interpreter(Some(id))
    }

    fn bucket(t: &Tracker, b: BucketId) -> [crate::DomainSnapshot; 3] {
        t.snapshot().buckets.into_iter().find(|x| x.bucket == b).map_or(Default::default(), |x| x.domains)
    }

    fn mem(t: &Tracker, b: BucketId) -> crate::DomainSnapshot {
        bucket(t, b)[Domain::Mem.index()]
    }

    /// What a hook does on its fast path, falling back as the glue does.
    fn fast_alloc(t: &Tracker, n: &Nursery, id: i64, domain: Domain, addr: usize, size: usize) -> bool {
        let fast = t.allocated_fast(n, id, domain, false, addr, size);
        if !fast {
            t.allocated(Some(n), interp(id), domain, addr, size);
        }
        fast
    }

    fn fast_free(t: &Tracker, n: &Nursery, domain: Domain, addr: usize) -> bool {
        let fast = t.freeing_fast(n, domain, false, addr);
        if !fast {
            t.freeing(Some(n), domain, addr);
        }
        fast
    }

    #[test]
    fn the_fast_paths_keep_the_figures_of_the_general_ones() {
        let t = Tracker::new();
        let n = t.adopt_nursery();
        // The first allocation in a bucket takes the general path (it caches
        // the bucket's counters); the next ones are fast.
        assert!(!fast_alloc(&t, n, 3, Domain::Mem, 0x1000, 100));
        assert!(fast_alloc(&t, n, 3, Domain::Mem, 0x2000, 50));
        assert!(fast_alloc(&t, n, 3, Domain::Object, 0x3000, 7));
        // A busy slot (this one evicts 0x2000 to the shared table), a size
        // that may not pack, and no interpreter: general.
        let busy = 0x2000 + 16 * NURSERY_SLOTS_FOR_TESTS;
        assert!(!fast_alloc(&t, n, 3, Domain::Mem, busy, 1));
        assert!(!fast_alloc(&t, n, 3, Domain::Raw, 0x5100, 1 << 43));
        assert!(!t.allocated_fast(n, -1, Domain::Raw, false, 0x6000, 8));
        assert!(!t.allocated_fast(n, i64::MIN, Domain::Raw, false, 0x6000, 8));
        let m = mem(&t, interp(3));
        assert_eq!((m.allocations, m.live_bytes, m.peak_bytes), (3, 151, 151));
        // Frees: fast when the block is in this nursery, of its bucket, and
        // in the domain the call names; a mixed-up domain takes the general
        // path and is still charged to the block's own domain.
        assert!(fast_free(&t, n, Domain::Mem, 0x1000));
        assert!(!fast_free(&t, n, Domain::Mem, 0x2000));
        assert!(!fast_free(&t, n, Domain::Mem, 0x3000));
        assert!(!fast_free(&t, n, Domain::Mem, 0x1234_5670));
        let [_, m, o] = bucket(&t, interp(3));
        assert_eq!((m.frees, m.live_bytes, m.peak_bytes), (2, 1, 151));
        assert_eq!((o.allocations, o.frees, o.live_bytes), (1, 1, 0));
        assert_eq!(t.ledger().snapshot().untracked_frees[Domain::Mem.index()], 1);
        // Another interpreter on this thread: the nursery switches bucket,
        // and a block of the first one is then freed on the general path.
        assert!(!fast_alloc(&t, n, 4, Domain::Mem, 0x7000, 10));
        assert!(fast_alloc(&t, n, 4, Domain::Mem, 0x8000, 10));
        assert!(!fast_free(&t, n, Domain::Mem, busy));
        assert_eq!(mem(&t, interp(3)).live_bytes, 0);
        assert_eq!(mem(&t, interp(4)).live_bytes, 20);
        t.retire_nursery(n);
    }

    /// Below the peak, the fast paths churn in the thread's grant; a
    /// snapshot revokes it and reads exact figures.
    #[test]
    fn fast_churn_below_the_peak_runs_in_a_grant_with_exact_figures() {
        let t = Tracker::new();
        let n = t.adopt_nursery();
        assert!(!std::ptr::eq(n.grants(), &crate::grants::NO_GRANTS), "the nursery has a grant slot");
        // A 1 MiB peak, then nothing live.
        assert!(!fast_alloc(&t, n, 2, Domain::Mem, 0x10_0000, 1 << 20));
        assert!(fast_free(&t, n, Domain::Mem, 0x10_0000));
        let cell = n.grants().cell(Domain::Mem);
        for i in 0..100 {
            assert!(fast_alloc(&t, n, 2, Domain::Mem, 0x1000 + 16 * i, 48));
        }
        assert_ne!(cell.load(Relaxed), 0, "churn below the peak took a grant");
        for i in 0..50 {
            assert!(fast_free(&t, n, Domain::Mem, 0x1000 + 16 * i));
        }
        let m = mem(&t, interp(2));
        assert_eq!((m.live_bytes, m.peak_bytes), (50 * 48, 1 << 20));
        assert_eq!(cell.load(Relaxed), 0, "the snapshot revoked the grant");
        // Moving to another interpreter gives the grant back.
        assert!(fast_alloc(&t, n, 2, Domain::Mem, 0x9000, 48));
        assert_ne!(cell.load(Relaxed), 0);
        assert!(!fast_alloc(&t, n, 5, Domain::Mem, 0xa000, 8));
        assert_eq!(cell.load(Relaxed), 0);
        assert_eq!(mem(&t, interp(2)).live_bytes, 51 * 48);
        t.retire_nursery(n);
    }

    /// Threads that hold blocks at the same moment: the peak is exactly
    /// their sum, though each allocated in its own grant.
    #[test]
    fn blocks_held_at_once_by_threads_in_grants_make_an_exact_peak() {
        const THREADS: usize = crate::iterations(4, 2);
        const BLOCKS: usize = crate::iterations(200, 20);
        let t = Tracker::new();
        let n = t.adopt_nursery();
        // Room below the peak for grants, then nothing live.
        assert!(!fast_alloc(&t, n, 7, Domain::Object, 0x100_0000, 1 << 20));
        assert!(fast_free(&t, n, Domain::Object, 0x100_0000));
        let barrier = std::sync::Barrier::new(THREADS);
        std::thread::scope(|scope| {
            for thread in 0..THREADS {
                let (t, barrier) = (&t, &barrier);
                scope.spawn(move || {
                    let n = t.adopt_nursery();
                    let base = 0x1000_0000 * (thread + 1);
                    for round in 0..2 {
                        // Round 0 churns below the peak; round 1 holds
                        // 4 KiB blocks, which together pass it.
                        let size = if round == 0 { 64 } else { 4096 };
                        for i in 0..BLOCKS {
                            fast_alloc(t, n, 7, Domain::Object, base + 16 * i, size);
                        }
                        barrier.wait();
                        for i in 0..BLOCKS {
                            fast_free(t, n, Domain::Object, base + 16 * i);
                        }
                        barrier.wait();
                    }
                    t.retire_nursery(n);
                });
            }
        });
        let o = bucket(&t, interp(7))[Domain::Object.index()];
        let held = (THREADS * BLOCKS * 4096) as u64;
        assert_eq!((o.live_bytes, o.peak_bytes), (0, held.max(1 << 20)));
        t.retire_nursery(n);
    }

    #[test]
    fn a_fast_block_freed_by_another_thread_is_charged_to_its_owner() {
        let t = Tracker::new();
        let n = t.adopt_nursery();
        assert!(!fast_alloc(&t, n, 1, Domain::Raw, 0x1000, 8));
        assert!(fast_alloc(&t, n, 1, Domain::Raw, 0x2000, 64));
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let other = t.adopt_nursery();
                // Not in this thread's nursery: claimed from the owner's.
                assert!(!fast_free(&t, other, Domain::Raw, 0x2000));
                t.retire_nursery(other);
            });
        });
        let raw = bucket(&t, interp(1))[Domain::Raw.index()];
        assert_eq!((raw.allocations, raw.frees, raw.live_bytes, raw.peak_bytes), (2, 1, 8, 72));
        // The owner's slot is empty again: its next block there is fast.
        assert!(fast_alloc(&t, n, 1, Domain::Raw, 0x2000, 16));
        t.retire_nursery(n);
    }

    #[test]
    fn a_reset_takes_every_nursery_off_the_fast_path() {
        let t = Tracker::new();
        let n = t.adopt_nursery();
        assert!(!fast_alloc(&t, n, 2, Domain::Mem, 0x1000, 8));
        assert!(fast_alloc(&t, n, 2, Domain::Mem, 0x2000, 8));
        t.reset();
        // The bucket is no longer settled (nor listed): the general path must
        // see the next allocation, so that it is listed again.
        assert!(!fast_alloc(&t, n, 2, Domain::Mem, 0x3000, 8));
        assert!(!fast_free(&t, n, Domain::Mem, 0x2000));
        let m = mem(&t, interp(2));
        assert_eq!((m.allocations, m.frees, m.live_bytes), (1, 0, 8));
        assert!(t.snapshot().buckets.iter().any(|b| b.bucket == interp(2)));
        t.retire_nursery(n);
    }

    #[test]
    fn the_empty_nursery_matches_no_fast_path() {
        let t = Tracker::new();
        let real = t.adopt_nursery();
        assert!(!fast_alloc(&t, real, 0, Domain::Mem, 0x1000, 8));
        assert!(fast_alloc(&t, real, 0, Domain::Mem, 0x2000, 8));
        static EMPTY: Nursery = Nursery::empty();
        // Interpreter 0's bucket is settled and cached elsewhere; the empty
        // nursery still refuses both paths and is left untouched.
        assert!(!t.allocated_fast(&EMPTY, 0, Domain::Mem, false, 0x3000, 8));
        assert!(!t.freeing_fast(&EMPTY, Domain::Mem, false, 0x2000));
        assert!(!t.allocated_fast(&EMPTY, i64::MIN, Domain::Mem, false, 0x3000, 8));
        assert_eq!(EMPTY.local_counts(), None);
        t.retire_nursery(real);
    }

    #[test]
    fn with_the_start_signal_a_default_limit_waits_until_the_creator_leaves() {
        let t = Tracker::new();
        t.require_start_signal(true);
        t.set_default_limit(Some(100), 1);
        // Main (0) creates interpreter 1 on this thread: its start-up is not limited.
        t.ledger().touch(interp(1));
        assert_eq!(t.admit(interp(0), 10), Admission::Unlimited);
        assert_eq!(t.admit(interp(1), 1000), Admission::Unlimited);
        assert_eq!(t.admit(interp(1), 1000), Admission::Unlimited);
        // The creator is back in main: interpreter 1 has started, the default applies.
        assert_eq!(t.admit(interp(0), 10), Admission::Unlimited);
        assert_eq!(t.admit(interp(1), 1000), Admission::Refused);
        assert_eq!(t.ledger().budget(interp(1)).snapshot().limit, Some(100));

        // Without the signal (3.13+: whence tells), a settled bucket gets it at once.
        let t = Tracker::new();
        t.set_default_limit(Some(100), 1);
        t.ledger().touch(interp(2));
        assert_eq!(t.admit(interp(2), 1000), Admission::Refused);
    }

    #[test]
    fn cross_interpreter_free_is_charged_to_owner() {
        let t = Tracker::new();
        t.allocated(None, interp(1), Domain::Mem, 0x100, 64);
        t.freeing(None, Domain::Mem, 0x100);
        assert_eq!(mem(&t, interp(1)).live_bytes, 0);
        assert_eq!(mem(&t, interp(1)).frees, 1);
        assert_eq!(mem(&t, interp(2)), crate::DomainSnapshot::default());
    }

    #[test]
    fn untracked_free_changes_no_bucket() {
        let t = Tracker::new();
        t.freeing(None, Domain::Raw, 0x500);
        let snap = t.snapshot();
        assert!(snap.buckets.is_empty());
        assert_eq!(snap.untracked_frees, [1, 0, 0]);
    }

    #[test]
    fn realloc_moves_record_and_keeps_owner() {
        let t = Tracker::new();
        t.allocated(None, interp(3), Domain::Mem, 0x100, 10);
        let old = t.reallocating(None, 0x100);
        t.reallocated(None, interp(0), Domain::Mem, 0x100, old, 0x200, 30);
        assert_eq!(t.table.get(0x100), None);
        assert_eq!(t.table.get(0x200).map(|r| (r.size, r.owner)), Some((30, interp(3))));
        let s = mem(&t, interp(3));
        assert_eq!((s.live_bytes, s.peak_bytes, s.live_blocks, s.reallocations), (30, 30, 1, 1));
    }

    #[test]
    fn failed_realloc_keeps_block() {
        let t = Tracker::new();
        t.allocated(None, interp(1), Domain::Mem, 0x100, 10);
        let old = t.reallocating(None, 0x100);
        t.reallocated(None, interp(1), Domain::Mem, 0x100, old, 0, 1 << 40);
        assert_eq!(t.table.get(0x100).map(|r| r.size), Some(10));
        let s = mem(&t, interp(1));
        assert_eq!((s.live_bytes, s.failures, s.reallocations), (10, 1, 0));
    }

    #[test]
    fn realloc_of_untracked_block_is_a_fresh_allocation() {
        let t = Tracker::new();
        let old = t.reallocating(None, 0x100);
        assert_eq!(old, None);
        t.reallocated(None, A, Domain::Raw, 0x100, old, 0x100, 48);
        let snap = t.snapshot();
        assert_eq!(snap.untracked_frees[0], 1);
        let raw = snap.buckets[0].domains[0];
        assert_eq!((raw.allocations, raw.live_bytes, raw.live_blocks), (1, 48, 1));
    }

    #[test]
    fn reused_address_counts_missed_free() {
        let t = Tracker::new();
        t.allocated(None, interp(1), Domain::Object, 0x100, 10);
        // The free of 0x100 happened while we were not looking.
        t.allocated(None, interp(2), Domain::Object, 0x100, 20);
        let snap = t.snapshot();
        assert_eq!(snap.missed_frees[Domain::Object.index()], 1);
        let one = bucket(&t, interp(1))[2];
        let two = bucket(&t, interp(2))[2];
        assert_eq!((one.live_bytes, one.live_blocks), (0, 0));
        assert_eq!((two.live_bytes, two.live_blocks), (20, 1));
    }

    #[test]
    fn nursery_blocks_freed_locally_never_touch_the_table() {
        let t = Tracker::new();
        let n = t.adopt_nursery();
        t.allocated(Some(n), interp(1), Domain::Object, 0x1000, 32);
        assert_eq!(t.table.stats().entries, 0, "young block stays in the nursery");
        assert_eq!(t.table_stats().entries, 1);
        assert_eq!(t.table_stats().live_bytes, 32);
        t.freeing(Some(n), Domain::Object, 0x1000);
        assert_eq!(t.table_stats().entries, 0);
        let s = bucket(&t, interp(1))[2];
        assert_eq!((s.live_bytes, s.allocations, s.frees), (0, 1, 1));
        t.retire_nursery(n);
    }

    #[test]
    fn nursery_block_freed_by_another_thread_is_claimed() {
        let t = Tracker::new();
        let n = t.adopt_nursery();
        t.allocated(Some(n), interp(1), Domain::Mem, 0x2000, 64);
        std::thread::scope(|s| {
            s.spawn(|| {
                let other = t.adopt_nursery();
                assert!(!std::ptr::eq(other, n));
                t.freeing(Some(other), Domain::Mem, 0x2000);
                t.retire_nursery(other);
            });
        });
        assert_eq!(mem(&t, interp(1)).live_bytes, 0);
        assert_eq!(t.snapshot().untracked_frees, [0; 3]);
        assert_eq!(t.table_stats().entries, 0);
        t.retire_nursery(n);
    }

    #[test]
    fn evicted_and_retired_blocks_move_to_the_table() {
        let t = Tracker::new();
        let n = t.adopt_nursery();
        // More blocks than slots: some must be evicted.
        let count = crate::iterations(crate::nursery::NURSERY_SLOTS * 4, crate::nursery::NURSERY_SLOTS + 64);
        // Blocks of i bytes, 2 KiB apart: small ones never overlap.
        for i in 1..=count {
            t.allocated(Some(n), interp(2), Domain::Object, i * 2048, i);
        }
        let stats = t.table_stats();
        assert_eq!(stats.entries, count);
        assert_eq!(stats.live_bytes, (count * (count + 1) / 2) as u64);
        assert!(t.table.stats().entries >= count - crate::nursery::NURSERY_SLOTS);
        t.retire_nursery(n);
        assert_eq!(t.table.stats().entries, count, "retiring moves every block to the table");
        // A retired nursery is adopted again and is empty.
        let again = t.adopt_nursery();
        assert!(std::ptr::eq(again, n));
        for i in 1..=count {
            t.freeing(Some(again), Domain::Object, i * 2048);
        }
        assert_eq!(t.table_stats().entries, 0);
        assert_eq!(bucket(&t, interp(2))[2].live_bytes, 0);
        t.retire_nursery(again);
    }

    #[test]
    fn same_address_again_in_nursery_is_a_missed_free() {
        let t = Tracker::new();
        let n = t.adopt_nursery();
        t.allocated(Some(n), interp(1), Domain::Object, 0x100, 10);
        t.allocated(Some(n), interp(1), Domain::Object, 0x100, 20);
        assert_eq!(t.snapshot().missed_frees[2], 1);
        assert_eq!(bucket(&t, interp(1))[2].live_bytes, 20);
        t.retire_nursery(n);
    }

    #[test]
    fn threads_passing_blocks_keep_exact_figures() {
        // Each thread allocates blocks in its nursery and hands half of them
        // to the next thread to free; the figures must end at exactly zero.
        let t = Tracker::new();
        const THREADS: usize = crate::iterations(6, 3);
        const PER: usize = crate::iterations(20_000, 150);
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..THREADS).map(|_| std::sync::mpsc::channel::<Vec<usize>>()).unzip();
        std::thread::scope(|s| {
            for (i, rx) in receivers.into_iter().enumerate() {
                let tx = senders[(i + 1) % THREADS].clone();
                let t = &t;
                s.spawn(move || {
                    let n = t.adopt_nursery();
                    let base = (i + 1) << 36;
                    let mut mine = Vec::new();
                    let mut theirs = Vec::new();
                    for k in 0..PER {
                        let addr = base + k * 32;
                        t.allocated(Some(n), interp(i as i64), Domain::Object, addr, 1 + k % 700);
                        if k % 2 == 0 {
                            mine.push(addr)
                        } else {
                            theirs.push(addr)
                        }
                        if mine.len() > 64 {
                            t.freeing(Some(n), Domain::Object, mine.remove(0));
                        }
                    }
                    tx.send(theirs).unwrap();
                    drop(tx);
                    for addr in mine {
                        t.freeing(Some(n), Domain::Object, addr);
                    }
                    for addr in rx.recv().unwrap() {
                        t.freeing(Some(n), Domain::Object, addr);
                    }
                    t.retire_nursery(n);
                });
            }
            drop(senders);
        });
        let snap = t.snapshot();
        assert_eq!(snap.untracked_frees, [0; 3]);
        assert_eq!(snap.missed_frees, [0; 3]);
        for b in &snap.buckets {
            let d = b.domains[Domain::Object.index()];
            assert_eq!((d.live_bytes, d.live_blocks), (0, 0), "{:?}", b.kind);
            assert_eq!(d.allocations, PER as u64);
        }
        assert_eq!(t.table_stats().entries, 0);
    }

    #[test]
    fn census_is_consistent_while_threads_retire() {
        // Threads fill their nurseries, stop allocating, then retire them (as
        // at thread exit) while another thread takes censuses. With nothing
        // allocating, every census must agree with itself: a retirement must
        // never be caught halfway (blocks or counts between two places).
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        const THREADS: usize = crate::iterations(4, 3);
        const BLOCKS: usize = crate::iterations(2_000, 20);
        let t = Tracker::new();
        let filled = std::sync::Barrier::new(THREADS + 1);
        let retired = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for i in 0..THREADS {
                let (t, filled, retired) = (&t, &filled, &retired);
                s.spawn(move || {
                    let n = t.adopt_nursery();
                    for k in 0..BLOCKS {
                        t.allocated(Some(n), interp(i as i64), Domain::Object, ((i + 1) << 40) + k * 16, 8);
                    }
                    filled.wait();
                    t.retire_nursery(n);
                    retired.fetch_add(1, SeqCst);
                });
            }
            filled.wait();
            let mut censuses = 0;
            while retired.load(SeqCst) < THREADS || censuses < 10 {
                let (snap, table) = t.census();
                let blocks: i64 = snap.buckets.iter().map(|b| b.domains[2].live_blocks).sum();
                assert_eq!(blocks as usize, table.entries, "census caught a retirement halfway");
                assert_eq!(table.entries, THREADS * BLOCKS);
                censuses += 1;
            }
        });
        assert_eq!(t.table.stats().entries, THREADS * BLOCKS, "every block ended in the shared table");
    }

    #[test]
    fn reset_is_a_fresh_start_even_if_a_thread_retires_meanwhile() {
        // A thread's exit-time retirement racing with reset() (as install()
        // after a join can see) must not leave old records behind.
        for _ in 0..crate::iterations(200, 4) {
            let t = Tracker::new();
            let go = std::sync::Barrier::new(2);
            std::thread::scope(|s| {
                s.spawn(|| {
                    let n = t.adopt_nursery();
                    for k in 1..=crate::iterations(1024, 64) {
                        t.allocated(Some(n), interp(1), Domain::Object, k * 16, 8);
                    }
                    go.wait();
                    t.retire_nursery(n);
                });
                go.wait();
                t.reset();
            });
            assert_eq!(t.table_stats().entries, 0, "reset() left records from before it");
        }
    }

    #[test]
    fn reset_is_a_fresh_start() {
        let t = Tracker::new();
        t.allocated(None, interp(1), Domain::Object, 0x100, 10);
        let n = t.adopt_nursery();
        t.allocated(Some(n), interp(1), Domain::Object, 0x200, 10);
        t.reset();
        assert_eq!(t.table_stats().entries, 0);
        assert!(t.snapshot().buckets.is_empty());
        t.freeing(None, Domain::Object, 0x100);
        t.retire_nursery(n);
        assert_eq!(t.snapshot().untracked_frees[2], 1);
    }

    /// Admits and records an allocation the way the hooks do.
    fn alloc(t: &Tracker, owner: BucketId, domain: Domain, addr: usize, size: usize) {
        let admission = t.admit(owner, size);
        assert!(admission.allowed());
        t.allocated(None, owner, domain, addr, size);
        t.settle(owner, size, admission);
    }

    #[test]
    fn watched_peaks_are_exact_over_all_domains_and_cover_new_interpreters() {
        let t = Tracker::new();
        let peak = |id| t.ledger().bucket_snapshot(interp(id)).budget.peak;
        alloc(&t, interp(1), Domain::Object, 0x100, 1_000);
        t.watch_peaks(true);
        assert_eq!(peak(1), 1_000, "the peak starts from the live bytes");
        // 1,000 + 300 (mem) + 200 (raw) live at once, then down and up less.
        alloc(&t, interp(1), Domain::Mem, 0x200, 300);
        alloc(&t, interp(1), Domain::Raw, 0x300, 200);
        t.freeing(None, Domain::Object, 0x100);
        alloc(&t, interp(1), Domain::Object, 0x400, 900);
        assert_eq!(peak(1), 1_500);
        // An interpreter that appears while watching is watched from its first allocation.
        alloc(&t, interp(2), Domain::Mem, 0x500, 64);
        alloc(&t, interp(2), Domain::Mem, 0x600, 64);
        assert_eq!(peak(2), 128);
        t.watch_peaks(false);
        alloc(&t, interp(1), Domain::Object, 0x700, 10_000);
        assert_eq!(peak(1), 1_500, "no longer watched");
        assert_eq!(t.limit(interp(1)), None);
    }
}
