//! Per-interpreter, per-domain memory counters.
//!
//! A *bucket* holds the figures of one interpreter (keyed by its interpreter ID,
//! never by a `PyInterpreterState*`, which CPython reuses) or of the "no
//! interpreter" case (raw calls made without a thread state). Buckets are
//! created on first use and never freed: an interpreter that has ended keeps
//! its bucket, so its leaks and late frees stay visible.
//!
//! # Concurrency
//!
//! Every counter is an independent atomic updated with `Relaxed` ordering:
//! they are statistics, not synchronisation. A snapshot taken while other
//! threads allocate is therefore not a consistent cut across counters, but
//! each counter is exact, and once the threads are quiescent the whole
//! snapshot is exact.
//!
//! *Peak bytes is exact*, not approximate. Live and peak bytes are a
//! [`GrantedCounter`] per bucket and domain: threads churn in grants of
//! their own below the peak, and a new peak is only recorded when every
//! grant is revoked, so it is always an exact value of live (see
//! [`crate::grants`]). Each thread's grant cells are in the ledger's
//! [`GrantRegistry`]; a nursery holds its thread's slot.
//!
//! Bucket storage is a fixed array of lazily allocated chunks published with
//! a compare-and-swap; a chunk, once published, is never moved and is freed
//! only when the ledger is dropped (never, for the process-wide static), so a
//! `&Bucket` stays valid as long as the ledger.

use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering::Relaxed};

use crate::domain::Domain;
use crate::grants::{key_of, DomainCells, GrantRegistry, GrantSlot, GrantedCounter};
use crate::limits::{Budget, BudgetSnapshot};

/// A dense bucket index: [`BucketId::NO_INTERPRETER`], one per interpreter ID,
/// and [`BucketId::OVERFLOW`] for interpreter IDs beyond what the table tracks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BucketId(u32);

/// Number of buckets. 2^18 fits the 18 bits a [`crate::BlockRecord`] packs.
pub const MAX_BUCKETS: usize = 1 << 18;
const CHUNK_BUCKETS: usize = 64;
const CHUNKS: usize = MAX_BUCKETS / CHUNK_BUCKETS;

impl BucketId {
    /// Calls made with no thread state (raw domain, pre-init, finalization,
    /// foreign threads).
    pub const NO_INTERPRETER: BucketId = BucketId(0);
    /// Interpreters whose ID is too large to have a bucket of their own.
    pub const OVERFLOW: BucketId = BucketId(MAX_BUCKETS as u32 - 1);

    /// The bucket of interpreter `id` (`None`: no interpreter).
    pub fn for_interpreter(id: Option<i64>) -> BucketId {
        match id {
            // One unsigned comparison for the common case (a negative ID is huge).
            Some(id) if (id as u64) < (MAX_BUCKETS as u64 - 2) => BucketId(id as u32 + 1),
            Some(_) => BucketId::OVERFLOW,
            None => BucketId::NO_INTERPRETER,
        }
    }

    /// The raw index, for packing into a block record.
    pub const fn index(self) -> u32 {
        self.0
    }

    /// Rebuilds an id from [`BucketId::index`]. Out-of-range values map to OVERFLOW.
    pub const fn from_index(index: u32) -> BucketId {
        if (index as usize) < MAX_BUCKETS {
            BucketId(index)
        } else {
            BucketId::OVERFLOW
        }
    }

    /// What this bucket stands for.
    pub fn kind(self) -> BucketKind {
        if self == BucketId::NO_INTERPRETER {
            BucketKind::NoInterpreter
        } else if self == BucketId::OVERFLOW {
            BucketKind::OverflowInterpreters
        } else {
            BucketKind::Interpreter(i64::from(self.0) - 1)
        }
    }
}

/// What a bucket stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BucketKind {
    /// Calls made without a thread state.
    NoInterpreter,
    /// The interpreter with this ID.
    Interpreter(i64),
    /// All interpreters whose ID is at least `MAX_BUCKETS - 2`.
    OverflowInterpreters,
}

/// One domain's counters in one bucket. Padded to its own cache lines so
/// that interpreters running in parallel do not share lines.
#[repr(align(128))]
pub(crate) struct DomainCounters {
    /// Live and peak bytes.
    pub(crate) bytes: GrantedCounter,
    counts: [AtomicU64; COUNTS],
}

/// The event counts kept per bucket and domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Count {
    /// Successful allocations.
    Allocations = 0,
    /// Frees of tracked blocks.
    Frees = 1,
    /// Successful reallocations of tracked blocks.
    Reallocations = 2,
    /// Refused requests.
    Failures = 3,
}

/// Number of [`Count`] kinds.
pub const COUNTS: usize = 4;

impl DomainCounters {
    fn snapshot(&self, key: u64, cells: &DomainCells) -> DomainSnapshot {
        let mut snap = DomainSnapshot {
            live_bytes: self.bytes.live(key, cells),
            peak_bytes: self.bytes.peak(),
            ..DomainSnapshot::default()
        };
        snap.add_counts(std::array::from_fn(|k| self.counts[k].load(Relaxed)));
        snap
    }

    fn reset(&self) {
        self.counts.iter().for_each(|c| c.store(0, Relaxed));
        self.bytes.reset();
    }
}

/// What the embedding glue says about an interpreter, packed into 16 bits
/// by the glue (the engine only stores it; `interheap_cpython::interp::Origin`
/// gives the meaning). 0 means "nothing known".
pub type InterpreterInfo = u16;

/// The glue's answer, on a bucket's cold path, about the calling thread's
/// interpreter (see [`Ledger::set_describer`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Description {
    /// The calling thread is not in this bucket's interpreter: nothing to say.
    NotCurrent,
    /// What is known now, which may still change (for example while the
    /// interpreter is being created): ask again on a later use.
    Provisional(InterpreterInfo),
    /// What is known now and will not change while the interpreter lives.
    Final(InterpreterInfo),
}

/// Asked on a bucket's cold path, from inside an allocator hook: describes
/// the calling thread's interpreter if `id` is its bucket. Must not
/// allocate, block or call back into the ledger.
pub type Describer = fn(BucketId) -> Description;

/// A bucket that stays provisional is asked about at most this many times;
/// then its last description is kept as final, so that a bucket whose
/// description never settles costs nothing more on the hot path.
pub const PROVISIONAL_LIMIT: u32 = 1 << 20;

/// `Bucket::state`: used, settled, and the interpreter info in the high half.
const USED: u32 = 1;
const SETTLED: u32 = 2;
const INFO_SHIFT: u32 = 16;

pub(crate) struct Bucket {
    /// [`USED`] | [`SETTLED`] | info << [`INFO_SHIFT`]. The hot path tests
    /// SETTLED with the one load that used to test "used": until a bucket is
    /// settled its uses take the cold path ([`Ledger::unsettled_use`]).
    state: AtomicU32,
    /// Cold-path visits while provisional (capped by [`PROVISIONAL_LIMIT`]).
    provisional_visits: AtomicU32,
    domains: [DomainCounters; Domain::COUNT],
    /// The interpreter's memory limit (all-zero: none), checked against the
    /// sum of `domains`' live bytes.
    budget: Budget,
    /// When the interpreter ended (the glue's monotonic clock, ns; 0: not seen).
    ended_at: AtomicU64,
}

impl Bucket {
    /// One domain's counters.
    #[inline(always)]
    pub(crate) fn domain(&self, domain: Domain) -> &DomainCounters {
        &self.domains[domain.index()]
    }
}

struct Chunk {
    buckets: [Bucket; CHUNK_BUCKETS],
}

/// A domain's figures in one bucket, as read by [`Ledger::snapshot`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DomainSnapshot {
    /// Bytes in blocks allocated and not yet freed.
    pub live_bytes: i64,
    /// The highest `live_bytes` has been since the ledger was last reset.
    pub peak_bytes: u64,
    /// `allocations - frees`: blocks allocated and not yet freed.
    pub live_blocks: i64,
    /// Successful allocations (malloc, calloc, realloc of NULL or of a block
    /// we did not see allocated).
    pub allocations: u64,
    /// Successful reallocations of blocks we track.
    pub reallocations: u64,
    /// Frees of blocks we track.
    pub frees: u64,
    /// Allocation or reallocation requests that the allocator refused.
    pub failures: u64,
}

impl DomainSnapshot {
    /// Adds event counts (indexed by [`Count`]) and updates `live_blocks`.
    pub fn add_counts(&mut self, counts: [u64; COUNTS]) {
        self.allocations = self.allocations.wrapping_add(counts[Count::Allocations as usize]);
        self.frees = self.frees.wrapping_add(counts[Count::Frees as usize]);
        self.reallocations = self.reallocations.wrapping_add(counts[Count::Reallocations as usize]);
        self.failures = self.failures.wrapping_add(counts[Count::Failures as usize]);
        self.live_blocks = self.allocations.wrapping_sub(self.frees) as i64;
    }
}

/// One bucket's figures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketSnapshot {
    /// Which bucket.
    pub bucket: BucketId,
    /// What it stands for.
    pub kind: BucketKind,
    /// Figures per domain, indexed by [`Domain::index`].
    pub domains: [DomainSnapshot; Domain::COUNT],
    /// What the glue said about the interpreter (0: nothing known).
    pub info: InterpreterInfo,
    /// Whether `info` is final (false: the last provisional description).
    pub settled: bool,
    /// The interpreter's memory limit and what it refused.
    pub budget: BudgetSnapshot,
    /// When the glue saw the interpreter end ([`Ledger::mark_ended`]; 0: not seen).
    pub ended_at: u64,
}

/// Figures of every bucket that has been used, plus ledger-wide counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LedgerSnapshot {
    /// Used buckets, in bucket order (no-interpreter first, then by interpreter ID).
    pub buckets: Vec<BucketSnapshot>,
    /// Per domain: frees of blocks that were allocated before tracking began.
    pub untracked_frees: [u64; Domain::COUNT],
    /// Per domain: tracked blocks whose free was never seen (the address was
    /// handed out again), counted as freed when their address came back.
    pub missed_frees: [u64; Domain::COUNT],
}

impl LedgerSnapshot {
    /// Adds event counts kept elsewhere (a thread's nursery) to a bucket,
    /// listing the bucket if it was not listed yet.
    pub fn merge_counts(&mut self, id: BucketId, counts: &[[u64; COUNTS]; Domain::COUNT]) {
        let index = match self.buckets.binary_search_by_key(&id, |b| b.bucket) {
            Ok(i) => i,
            Err(i) => {
                let empty = BucketSnapshot {
                    bucket: id,
                    kind: id.kind(),
                    domains: Default::default(),
                    info: 0,
                    settled: false,
                    budget: BudgetSnapshot::default(),
                    ended_at: 0,
                };
                self.buckets.insert(i, empty);
                i
            }
        };
        for (domain, c) in self.buckets[index].domains.iter_mut().zip(counts) {
            domain.add_counts(*c);
        }
    }
}

/// The counters of every bucket. See the module docs for the concurrency rules.
pub struct Ledger {
    chunks: [AtomicPtr<Chunk>; CHUNKS],
    /// The registered [`Describer`] (null: none). A pointer, not an address
    /// in an integer: a function pointer made from an integer has no
    /// provenance, and calling it is undefined behaviour (Miri reported it in
    /// `buckets_are_described_until_settled`).
    describer: AtomicPtr<()>,
    untracked_frees: [AtomicU64; Domain::COUNT],
    missed_frees: [AtomicU64; Domain::COUNT],
    /// Every thread's grant cells.
    grants: GrantRegistry,
}

impl Drop for Ledger {
    fn drop(&mut self) {
        for slot in &mut self.chunks {
            let chunk = *slot.get_mut();
            if !chunk.is_null() {
                // SAFETY: published chunks come from Box::into_raw in `chunk`
                // and are freed exactly once, here; `&mut self` proves no
                // `&Bucket` borrowed from the ledger is still alive.
                drop(unsafe { Box::from_raw(chunk) });
            }
        }
    }
}

impl Default for Ledger {
    fn default() -> Self {
        Self::new()
    }
}

impl Ledger {
    /// An empty ledger; `const` so that it can be a `static`.
    pub const fn new() -> Ledger {
        Ledger {
            chunks: [const { AtomicPtr::new(std::ptr::null_mut()) }; CHUNKS],
            describer: AtomicPtr::new(std::ptr::null_mut()),
            untracked_frees: [const { AtomicU64::new(0) }; Domain::COUNT],
            missed_frees: [const { AtomicU64::new(0) }; Domain::COUNT],
            grants: GrantRegistry::new(),
        }
    }

    #[inline]
    fn chunk(&self, index: usize) -> &Chunk {
        // SAFETY: every field of a Chunk is an atomic integer or bool, valid
        // as all-zero bytes; a published chunk is not freed or moved while
        // `self` is borrowed (module docs).
        unsafe { &*crate::published_or_zeroed(&self.chunks[index]) }
    }

    /// A bucket, without marking it used.
    #[inline]
    fn unmarked(&self, id: BucketId) -> &Bucket {
        let index = id.0 as usize;
        &self.chunk(index / CHUNK_BUCKETS).buckets[index % CHUNK_BUCKETS]
    }

    #[inline]
    fn bucket(&self, id: BucketId) -> &Bucket {
        let bucket = self.unmarked(id);
        if bucket.state.load(Relaxed) & SETTLED == 0 {
            self.unsettled_use(id, bucket);
        }
        bucket
    }

    /// Registers (or with `None` removes) the function that describes an
    /// interpreter on its bucket's cold path. Without one, a bucket is
    /// settled, with info 0, at its first use.
    pub fn set_describer(&self, describer: Option<Describer>) {
        self.describer.store(describer.map_or(std::ptr::null_mut(), |f| f as *mut ()), Relaxed);
    }

    fn describer(&self) -> Option<Describer> {
        let f = self.describer.load(Relaxed);
        // SAFETY: a non-null value was stored by `set_describer` from a
        // `Describer` (a plain `fn` pointer, pointer-sized like `*mut ()`),
        // with its provenance.
        (!f.is_null()).then(|| unsafe { std::mem::transmute::<*mut (), Describer>(f) })
    }

    /// A use of a bucket that is not settled yet: mark it used and, for an
    /// interpreter's bucket, ask the describer (first use, then every use
    /// while the description is provisional, up to [`PROVISIONAL_LIMIT`]).
    /// Off the hot path: a settled bucket never comes here.
    #[cold]
    #[inline(never)]
    fn unsettled_use(&self, id: BucketId, bucket: &Bucket) {
        let description = match (id.kind(), self.describer()) {
            (BucketKind::Interpreter(_), Some(describe)) => describe(id),
            _ => Description::Final(0),
        };
        match description {
            Description::NotCurrent => {
                bucket.state.fetch_or(USED, Relaxed);
            }
            Description::Provisional(info) => {
                let visits = bucket.provisional_visits.fetch_add(1, Relaxed);
                let settled = if visits >= PROVISIONAL_LIMIT { SETTLED } else { 0 };
                bucket.state.store(USED | settled | (u32::from(info) << INFO_SHIFT), Relaxed);
            }
            Description::Final(info) => {
                bucket.state.store(USED | SETTLED | (u32::from(info) << INFO_SHIFT), Relaxed);
            }
        }
    }

    /// The bucket `id`, counting this as a use (which may settle it), if it
    /// is settled: from then on its uses need not go through the ledger, so a
    /// thread's nursery may keep the reference (see `Nursery::cached_bucket`)
    /// until the ledger is reset.
    pub(crate) fn settled_bucket(&self, id: BucketId) -> Option<&Bucket> {
        let bucket = self.bucket(id);
        (bucket.state.load(Relaxed) & SETTLED != 0).then_some(bucket)
    }

    #[inline]
    fn counters(&self, id: BucketId, domain: Domain) -> &DomainCounters {
        &self.bucket(id).domains[domain.index()]
    }

    /// Marks a bucket as used (and, for the calling thread's interpreter,
    /// described) so that it appears in snapshots even before it
    /// allocates (for example a freshly created interpreter).
    pub fn touch(&self, id: BucketId) {
        self.bucket(id);
    }

    /// Adds `bytes` to a bucket's live bytes (and its peak, exactly).
    #[inline(always)]
    pub fn add_live(&self, id: BucketId, domain: Domain, bytes: usize) {
        self.counters(id, domain).bytes.add(key_of(id.0), bytes as u64, &self.grants.cells(domain));
    }

    /// Takes `bytes` from a bucket's live bytes.
    #[inline(always)]
    pub fn sub_live(&self, id: BucketId, domain: Domain, bytes: usize) {
        self.counters(id, domain).bytes.sub(bytes as u64);
    }

    /// A grant slot for a thread (its nursery keeps it), or `None` if every
    /// slot is taken (the thread then allocates through the shared counters).
    pub fn claim_grant_slot(&self) -> Option<&GrantSlot> {
        self.grants.claim()
    }

    /// The cells of `domain` that a counter of this ledger revokes.
    #[inline(always)]
    pub(crate) fn grant_cells(&self, domain: Domain) -> DomainCells<'_> {
        self.grants.cells(domain)
    }

    /// A thread leaves bucket `id` (or ends): gives back the grants its
    /// `slot` holds of that bucket's counters.
    pub fn give_back_grants(&self, id: BucketId, slot: &GrantSlot) {
        if let Some(bucket) = self.settled_bucket(id) {
            for domain in Domain::ALL {
                bucket.domain(domain).bytes.give_back(slot.cell(domain), key_of(id.0));
            }
        }
    }

    /// [`Ledger::add_live`] for callers that never update this bucket's
    /// counter for `domain` at the same time as another thread: a plain load
    /// and store instead of a locked read-modify-write; live and peak stay
    /// exact. CPython's mem and object domains on a default (GIL) build are
    /// such callers: every call holds the GIL of the interpreter whose
    /// allocator state it uses (see `Tracker::set_serialized`).
    #[inline(always)]
    pub fn add_live_serialized(&self, id: BucketId, domain: Domain, bytes: usize) {
        self.counters(id, domain).bytes.add_serialized(bytes as u64);
    }

    /// [`Ledger::sub_live`] under the same rule as [`Ledger::add_live_serialized`].
    #[inline(always)]
    pub fn sub_live_serialized(&self, id: BucketId, domain: Domain, bytes: usize) {
        self.counters(id, domain).bytes.sub_serialized(bytes as u64);
    }

    /// A bucket's memory limit. Getting it does not mark the bucket used.
    #[inline]
    pub fn budget(&self, id: BucketId) -> &Budget {
        &self.unmarked(id).budget
    }

    /// Whether a bucket is settled: used, and described for good (see
    /// [`Ledger::set_describer`]). Does not mark it used.
    pub fn is_settled(&self, id: BucketId) -> bool {
        let bucket = self.unmarked(id);
        bucket.state.load(Relaxed) & SETTLED != 0
    }

    /// The glue saw the bucket's interpreter end at `at` (its monotonic
    /// clock, ns, non-zero); the first mark stays.
    pub fn mark_ended(&self, id: BucketId, at: u64) {
        let bucket = self.unmarked(id);
        let _ = bucket.ended_at.compare_exchange(0, at.max(1), Relaxed, Relaxed);
    }

    /// What the describer said about a bucket's interpreter (0: nothing
    /// yet). Does not mark it used.
    pub fn info(&self, id: BucketId) -> InterpreterInfo {
        let bucket = self.unmarked(id);
        (bucket.state.load(Relaxed) >> INFO_SHIFT) as InterpreterInfo
    }

    /// A bucket's live bytes over every domain (negative sums, which exact
    /// accounting never produces, read as 0), as admissions read them (see
    /// `GrantedCounter::live_for_admission`).
    #[inline]
    pub fn live_total(&self, id: BucketId) -> u64 {
        let bucket = self.unmarked(id);
        let sum = Domain::ALL.into_iter().fold(0i64, |sum, domain| {
            let live =
                bucket.domain(domain).bytes.live_for_admission(key_of(id.0), &self.grants.cells(domain));
            sum.wrapping_add(live)
        });
        sum.max(0) as u64
    }

    /// Adds `n` to one of a bucket's event counts.
    #[inline(always)]
    pub fn add_count(&self, id: BucketId, domain: Domain, count: Count, n: u64) {
        self.counters(id, domain).counts[count as usize].fetch_add(n, Relaxed);
    }

    /// A block of `size` bytes was allocated.
    #[inline(always)]
    pub fn on_alloc(&self, id: BucketId, domain: Domain, size: usize) {
        self.add_count(id, domain, Count::Allocations, 1);
        self.add_live(id, domain, size);
    }

    /// A tracked block of `size` bytes was freed.
    #[inline(always)]
    pub fn on_free(&self, id: BucketId, domain: Domain, size: usize) {
        self.add_count(id, domain, Count::Frees, 1);
        self.sub_live(id, domain, size);
    }

    /// A tracked block's size changed from `old` to `new` bytes (live bytes only).
    #[inline]
    pub fn resize_live(&self, id: BucketId, domain: Domain, old: usize, new: usize) {
        if new >= old {
            self.add_live(id, domain, new - old);
        } else {
            self.sub_live(id, domain, old - new);
        }
    }

    /// A tracked block changed size from `old` to `new` bytes.
    pub fn on_realloc(&self, id: BucketId, domain: Domain, old: usize, new: usize) {
        self.add_count(id, domain, Count::Reallocations, 1);
        self.resize_live(id, domain, old, new);
    }

    /// The allocator returned NULL for a request.
    pub fn on_failure(&self, id: BucketId, domain: Domain) {
        self.add_count(id, domain, Count::Failures, 1);
    }

    /// A block we never saw allocated was freed (it predates tracking).
    pub fn on_untracked_free(&self, domain: Domain) {
        self.untracked_frees[domain.index()].fetch_add(1, Relaxed);
    }

    /// A tracked block's free was never seen; its address was reused. Counted
    /// as a free so that live figures stay right.
    pub fn on_missed_free(&self, id: BucketId, domain: Domain, size: usize) {
        self.missed_frees[domain.index()].fetch_add(1, Relaxed);
        self.on_free(id, domain, size);
    }

    /// The figures of one bucket (zero if it was never used).
    pub fn bucket_snapshot(&self, id: BucketId) -> BucketSnapshot {
        let index = id.0 as usize;
        let chunk = self.chunks[index / CHUNK_BUCKETS].load(std::sync::atomic::Ordering::Acquire);
        let (domains, state, budget, ended_at) = if chunk.is_null() {
            ([DomainSnapshot::default(); Domain::COUNT], 0, BudgetSnapshot::default(), 0)
        } else {
            // SAFETY: published chunks live as long as the ledger (module docs).
            let bucket = unsafe { &(*chunk).buckets[index % CHUNK_BUCKETS] };
            (
                std::array::from_fn(|d| {
                    let domain = Domain::ALL[d];
                    bucket.domain(domain).snapshot(key_of(id.0), &self.grants.cells(domain))
                }),
                bucket.state.load(Relaxed),
                bucket.budget.snapshot(),
                bucket.ended_at.load(Relaxed),
            )
        };
        BucketSnapshot {
            bucket: id,
            kind: id.kind(),
            domains,
            info: (state >> INFO_SHIFT) as InterpreterInfo,
            settled: state & SETTLED != 0,
            budget,
            ended_at,
        }
    }

    /// Restarts a bucket's per-domain peaks from their live bytes now.
    pub fn restart_peaks(&self, id: BucketId) {
        let bucket = self.bucket(id);
        for domain in Domain::ALL {
            bucket.domain(domain).bytes.restart_peak(key_of(id.0), &self.grants.cells(domain));
        }
    }

    /// Calls `f` with every used bucket. Allocates nothing.
    pub fn for_each_used(&self, mut f: impl FnMut(BucketId)) {
        for (chunk_index, slot) in self.chunks.iter().enumerate() {
            let chunk = slot.load(std::sync::atomic::Ordering::Acquire);
            if chunk.is_null() {
                continue;
            }
            // SAFETY: published chunks live as long as the ledger (module docs).
            let chunk = unsafe { &*chunk };
            for (i, bucket) in chunk.buckets.iter().enumerate() {
                if bucket.state.load(Relaxed) & USED != 0 {
                    f(BucketId((chunk_index * CHUNK_BUCKETS + i) as u32));
                }
            }
        }
    }

    /// Figures of every used bucket. Allocates (a `Vec`), so it must not be
    /// called from inside an allocator hook.
    pub fn snapshot(&self) -> LedgerSnapshot {
        let mut buckets = Vec::new();
        self.for_each_used(|id| buckets.push(self.bucket_snapshot(id)));
        LedgerSnapshot {
            buckets,
            untracked_frees: std::array::from_fn(|d| self.untracked_frees[d].load(Relaxed)),
            missed_frees: std::array::from_fn(|d| self.missed_frees[d].load(Relaxed)),
        }
    }

    /// Zeroes every counter and forgets which buckets were used. Only
    /// meaningful while nothing else updates the ledger (e.g. before hooks are
    /// installed again); concurrent updates are not lost in a harmful way, but
    /// the result is then not a clean start.
    pub fn reset(&self) {
        for slot in &self.chunks {
            let chunk = slot.load(std::sync::atomic::Ordering::Acquire);
            if chunk.is_null() {
                continue;
            }
            // SAFETY: published chunks live as long as the ledger (module docs).
            for bucket in unsafe { &(*chunk).buckets } {
                bucket.state.store(0, Relaxed);
                bucket.provisional_visits.store(0, Relaxed);
                bucket.domains.iter().for_each(DomainCounters::reset);
                // The limit is a setting, not a figure: it stays.
                bucket.budget.reset();
                bucket.ended_at.store(0, Relaxed);
            }
        }
        for c in self.untracked_frees.iter().chain(&self.missed_frees) {
            c.store(0, Relaxed);
        }
        self.grants.reset();
    }

    /// In a `fork` child: releases the counters' locks that threads which
    /// did not survive the fork may hold. A revocation such a thread left
    /// half done may leave a bucket's live bytes off by that grant (one of
    /// the half-done operations a child does not repair; see
    /// `Nurseries::adopt_orphans`).
    ///
    /// # Safety
    ///
    /// Single-threaded (a `fork` child before it starts threads).
    pub unsafe fn unlock_after_fork(&self) {
        self.for_each_used(|id| {
            for d in &self.unmarked(id).domains {
                // SAFETY: single-threaded per the contract, so no guard exists.
                unsafe { d.bytes.unlock_after_fork() };
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_ids_map_interpreters() {
        assert_eq!(BucketId::for_interpreter(None), BucketId::NO_INTERPRETER);
        assert_eq!(BucketId::for_interpreter(Some(0)).kind(), BucketKind::Interpreter(0));
        assert_eq!(BucketId::for_interpreter(Some(41)).kind(), BucketKind::Interpreter(41));
        assert_eq!(BucketId::for_interpreter(Some(-1)), BucketId::OVERFLOW);
        assert_eq!(BucketId::for_interpreter(Some(1 << 40)), BucketId::OVERFLOW);
        assert_eq!(
            BucketId::for_interpreter(Some(MAX_BUCKETS as i64 - 3)).kind(),
            BucketKind::Interpreter(MAX_BUCKETS as i64 - 3)
        );
        assert_eq!(BucketId::for_interpreter(Some(MAX_BUCKETS as i64 - 2)), BucketId::OVERFLOW);
    }

    #[test]
    fn counts_live_peak_and_blocks() {
        let ledger = Ledger::new();
        let b = BucketId::for_interpreter(Some(3));
        ledger.on_alloc(b, Domain::Mem, 100);
        ledger.on_alloc(b, Domain::Mem, 50);
        ledger.on_realloc(b, Domain::Mem, 50, 80);
        ledger.on_free(b, Domain::Mem, 100);
        ledger.on_failure(b, Domain::Mem);
        let snap = ledger.bucket_snapshot(b).domains[Domain::Mem.index()];
        assert_eq!(snap.live_bytes, 80);
        assert_eq!(snap.peak_bytes, 180);
        assert_eq!(snap.live_blocks, 1);
        assert_eq!((snap.allocations, snap.reallocations, snap.frees, snap.failures), (2, 1, 1, 1));
        // Other domains and buckets are untouched.
        assert_eq!(ledger.bucket_snapshot(b).domains[0], DomainSnapshot::default());
        let all = ledger.snapshot();
        assert_eq!(all.buckets.len(), 1);
        assert_eq!(all.buckets[0].kind, BucketKind::Interpreter(3));
    }

    #[test]
    fn buckets_are_described_until_settled() {
        use std::sync::atomic::AtomicU16;
        // The "calling thread's interpreter" and what the describer says about it.
        static CURRENT: AtomicU32 = AtomicU32::new(0);
        static INFO: AtomicU16 = AtomicU16::new(0);
        static FINAL: AtomicU32 = AtomicU32::new(0);
        fn describe(id: BucketId) -> Description {
            if id.index() != CURRENT.load(Relaxed) {
                return Description::NotCurrent;
            }
            let info = INFO.load(Relaxed);
            if FINAL.load(Relaxed) != 0 {
                Description::Final(info)
            } else {
                Description::Provisional(info)
            }
        }
        let ledger = Ledger::new();
        ledger.set_describer(Some(describe));
        let (a, b) = (BucketId::for_interpreter(Some(1)), BucketId::for_interpreter(Some(2)));
        CURRENT.store(a.index(), Relaxed);
        INFO.store(7, Relaxed);
        ledger.on_alloc(a, Domain::Object, 8);
        // Another interpreter's bucket used from here: listed, nothing known.
        ledger.on_alloc(b, Domain::Object, 8);
        let snap = |id| ledger.bucket_snapshot(id);
        assert_eq!((snap(a).info, snap(a).settled), (7, false));
        assert_eq!((snap(b).info, snap(b).settled), (0, false));
        // The provisional description is replaced, then settles for good.
        INFO.store(9, Relaxed);
        ledger.on_alloc(a, Domain::Object, 8);
        assert_eq!((snap(a).info, snap(a).settled), (9, false));
        FINAL.store(1, Relaxed);
        ledger.on_alloc(a, Domain::Object, 8);
        INFO.store(11, Relaxed);
        ledger.on_alloc(a, Domain::Object, 8);
        assert_eq!((snap(a).info, snap(a).settled), (9, true));
        // The no-interpreter bucket is settled at once, never described.
        ledger.on_alloc(BucketId::NO_INTERPRETER, Domain::Raw, 8);
        assert!(snap(BucketId::NO_INTERPRETER).settled);
        let listed: Vec<_> = ledger.snapshot().buckets.iter().map(|x| (x.bucket, x.info)).collect();
        assert_eq!(listed, vec![(BucketId::NO_INTERPRETER, 0), (a, 9), (b, 0)]);
        // A description that never settles stops being asked for: after a
        // million uses, which Miri would take hours over (it runs the rest,
        // the describer's calls included).
        if !cfg!(miri) {
            FINAL.store(0, Relaxed);
            CURRENT.store(b.index(), Relaxed);
            INFO.store(3, Relaxed);
            for _ in 0..=PROVISIONAL_LIMIT {
                ledger.touch(b);
            }
            assert_eq!((snap(b).info, snap(b).settled), (3, true));
        }
        ledger.reset();
        assert_eq!((snap(a).info, snap(a).settled), (0, false));
    }

    #[test]
    fn without_describer_buckets_settle_at_first_use() {
        let ledger = Ledger::new();
        let a = BucketId::for_interpreter(Some(1));
        ledger.touch(a);
        let s = ledger.bucket_snapshot(a);
        assert_eq!((s.info, s.settled), (0, true));
    }

    #[test]
    fn reset_forgets_everything() {
        let ledger = Ledger::new();
        ledger.on_alloc(BucketId::NO_INTERPRETER, Domain::Raw, 7);
        ledger.on_untracked_free(Domain::Raw);
        ledger.reset();
        let snap = ledger.snapshot();
        assert!(snap.buckets.is_empty());
        assert_eq!(snap.untracked_frees, [0; 3]);
    }

    #[test]
    fn peak_is_exact_under_concurrency() {
        // Each thread allocates 1..=K then frees them all; the true peak is
        // unknown in advance, but the final live must be 0, the peak must be
        // at least one thread's high-water mark and at most the sum.
        let ledger = Ledger::new();
        let b = BucketId::for_interpreter(Some(1));
        const K: usize = crate::iterations(2000, 50);
        let per_thread: u64 = (1..=K as u64).sum();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for i in 1..=K {
                        ledger.on_alloc(b, Domain::Object, i);
                    }
                    for i in 1..=K {
                        ledger.on_free(b, Domain::Object, i);
                    }
                });
            }
        });
        let snap = ledger.bucket_snapshot(b).domains[Domain::Object.index()];
        assert_eq!(snap.live_bytes, 0);
        assert_eq!(snap.live_blocks, 0);
        assert_eq!(snap.allocations, 4 * K as u64);
        assert!(snap.peak_bytes >= per_thread && snap.peak_bytes <= 4 * per_thread);
    }
}
