//! The checker's findings: misuses of the allocator API that one GIL used to
//! hide and that isolated interpreters and free-threading turn into memory
//! corruption (see `interheap check`).
//!
//! The CPython glue decides what is a finding (it sees the call, the block's
//! record and the calling interpreter) and hands it here with the calling
//! thread's Python stack as text. This module owns what happens next, the
//! same whichever back end found it:
//!
//! * **Grouping.** Findings are de-duplicated by kind, domains and call site
//!   (the innermost frame's file and line): a group keeps its first
//!   finding's details in full and counts the rest, with the interpreters
//!   seen (up to [`MAX_PAIRS`] pairs) and the bytes involved.
//! * **Rate limit.** A finding costs a stack capture; a bug in a hot loop
//!   would make that the program's main work. At most [`BURST`] findings get
//!   their details taken per second; past that, [`Findings::admit_details`]
//!   says no and the glue only counts the kind ([`Findings::count_only`]).
//! * **Quarantine.** A block the glue did not free (a cross-interpreter free
//!   on a default build: freeing it would corrupt the other interpreter's
//!   obmalloc state) is counted here, with its bytes.
//! * **Freed addresses.** To tell a double free from the free of a block
//!   allocated before the hooks were installed, the glue remembers every
//!   address it let through to the allocator until the allocator hands it
//!   out again (an [`AddressMap`]).
//!
//! # Concurrency
//!
//! Findings are rare by nature (a correct program has none), so the groups
//! sit behind one lock. Counters are atomics. [`AddressMap`] is sharded
//! ([`SHARDS`] locks), because every free and every allocation of a checked
//! program touches it. Its `used` flag is set before the first insert's
//! lock: a lookup that reads it unset may skip the lock, because an address
//! it looks up was inserted before the block was handed to the program, and
//! so before any lookup the program's own synchronisation orders after it.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Instant;

use crate::domain::Domain;
use crate::ledger::BucketId;
use crate::sites::FrameText;
use interheap_sync::SpinLock;

/// Findings that get their details (a stack) per second; more only count.
pub const BURST: u64 = 2_000;
/// Interpreter pairs a group lists (more are counted, not listed).
pub const MAX_PAIRS: usize = 8;
/// Groups kept; findings at new call sites past this only count.
pub const MAX_GROUPS: usize = 10_000;
/// Addresses remembered as freed, at most (then the oldest half is dropped,
/// so a double free of a block freed long before may go unseen).
pub const MAX_FREED: usize = 1 << 20;
const SHARDS: usize = 64;

/// What went wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FindingKind {
    /// A mem or object block allocated under one obmalloc state was freed
    /// under another (DESIGN.md fact 7).
    CrossInterpreterFree,
    /// The same, by a realloc.
    CrossInterpreterRealloc,
    /// A block was freed or reallocated through another domain than the one
    /// that allocated it.
    DomainMismatch,
    /// A mem or object call was made with no attached thread state.
    NoThreadState,
    /// A block was freed (or reallocated) again after its free.
    DoubleFree,
    /// A pointer that no allocator handed out was freed (or reallocated):
    /// it points into a loaded program or library, or into a thread's stack.
    ForeignPointer,
    /// An interpreter ended still holding blocks it allocated.
    LeakAtInterpreterEnd,
    /// A block was written after its free (`interheap-python`'s checking layer).
    UseAfterFree,
    /// A block was written past its end (`interheap-python`'s checking layer).
    BufferOverrun,
}

impl FindingKind {
    /// Every kind, in report order.
    pub const ALL: [FindingKind; 9] = [
        FindingKind::CrossInterpreterFree,
        FindingKind::CrossInterpreterRealloc,
        FindingKind::DomainMismatch,
        FindingKind::NoThreadState,
        FindingKind::DoubleFree,
        FindingKind::ForeignPointer,
        FindingKind::LeakAtInterpreterEnd,
        FindingKind::UseAfterFree,
        FindingKind::BufferOverrun,
    ];

    /// The name reports use.
    pub fn name(self) -> &'static str {
        match self {
            FindingKind::CrossInterpreterFree => "cross-interpreter free",
            FindingKind::CrossInterpreterRealloc => "cross-interpreter realloc",
            FindingKind::DomainMismatch => "domain mismatch",
            FindingKind::NoThreadState => "no thread state",
            FindingKind::DoubleFree => "double free",
            FindingKind::ForeignPointer => "foreign pointer",
            FindingKind::LeakAtInterpreterEnd => "leak at interpreter end",
            FindingKind::UseAfterFree => "use after free",
            FindingKind::BufferOverrun => "buffer overrun",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One finding, as the glue reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub kind: FindingKind,
    /// The domain of the bad call.
    pub domain: Domain,
    /// The domain the block was allocated in, if known.
    pub allocated_in: Option<Domain>,
    /// The interpreter that allocated the block, if known.
    pub owner: Option<BucketId>,
    /// The interpreter of the bad call ([`BucketId::NO_INTERPRETER`]: none).
    pub caller: BucketId,
    /// The block's size (the size asked for, when the call was an allocation).
    pub size: usize,
    /// The bad call's Python stack, innermost frame first.
    pub stack: Vec<FrameText>,
    /// What the glue did about it, or more about the pointer.
    pub note: Box<str>,
    /// Where the block was allocated, innermost frame first, when it is a
    /// sampled block (empty: not sampled, or not a block's finding).
    pub allocated_at: Vec<FrameText>,
}

/// A group of findings at one call site, as [`Findings::snapshot`] gives it.
#[derive(Clone, Debug)]
pub struct FindingGroup {
    /// The first finding of the group, in full.
    pub first: Finding,
    /// Findings in the group.
    pub count: u64,
    /// Bytes involved, summed.
    pub bytes: u64,
    /// (owner, caller) pairs seen, up to [`MAX_PAIRS`].
    pub pairs: Vec<(Option<BucketId>, BucketId)>,
}

type GroupKey = (FindingKind, Domain, Option<Domain>, std::sync::Arc<str>, i32);

struct Window {
    start: Instant,
    taken: u64,
}

/// Every finding of a process. See the module docs.
pub struct Findings {
    groups: Mutex<Option<HashMap<GroupKey, FindingGroup>>>,
    window: Mutex<Option<Window>>,
    per_kind: [AtomicU64; FindingKind::ALL.len()],
    /// Findings counted without details (rate limit, or too many groups).
    undetailed: AtomicU64,
    quarantined_blocks: AtomicU64,
    quarantined_bytes: AtomicU64,
}

impl Default for Findings {
    fn default() -> Self {
        Self::new()
    }
}

/// Totals over every finding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FindingTotals {
    /// Findings per kind, in [`FindingKind::ALL`] order.
    pub per_kind: [u64; FindingKind::ALL.len()],
    /// Findings counted without details (see [`BURST`]).
    pub undetailed: u64,
    /// Blocks kept out of the allocator, and their bytes.
    pub quarantined_blocks: u64,
    pub quarantined_bytes: u64,
}

impl Findings {
    /// No findings; `const` so that it can be a `static`.
    pub const fn new() -> Findings {
        Findings {
            groups: Mutex::new(None),
            window: Mutex::new(None),
            per_kind: [const { AtomicU64::new(0) }; FindingKind::ALL.len()],
            undetailed: AtomicU64::new(0),
            quarantined_blocks: AtomicU64::new(0),
            quarantined_bytes: AtomicU64::new(0),
        }
    }

    /// Whether the next finding may take its details (a stack): false past
    /// [`BURST`] findings in the current second.
    pub fn admit_details(&self) -> bool {
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match window.as_mut() {
            Some(w) if now.duration_since(w.start).as_secs() < 1 => {
                w.taken += 1;
                w.taken <= BURST
            }
            _ => {
                *window = Some(Window { start: now, taken: 1 });
                true
            }
        }
    }

    /// Counts a finding of `kind` whose details were not taken.
    pub fn count_only(&self, kind: FindingKind) {
        self.per_kind[kind.index()].fetch_add(1, Relaxed);
        self.undetailed.fetch_add(1, Relaxed);
    }

    /// Records a finding with its details.
    pub fn report(&self, finding: Finding) {
        self.per_kind[finding.kind.index()].fetch_add(1, Relaxed);
        let (file, line) = finding.stack.first().map_or(("".into(), 0), |f| (f.file.clone(), f.line));
        let key = (finding.kind, finding.domain, finding.allocated_in, file, line);
        let mut guard = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        let groups = guard.get_or_insert_with(HashMap::new);
        let full = groups.len() >= MAX_GROUPS;
        match groups.get_mut(&key) {
            Some(group) => {
                group.count += 1;
                group.bytes += finding.size as u64;
                let pair = (finding.owner, finding.caller);
                if group.pairs.len() < MAX_PAIRS && !group.pairs.contains(&pair) {
                    group.pairs.push(pair);
                }
            }
            None if full => {
                self.undetailed.fetch_add(1, Relaxed);
            }
            None => {
                let group = FindingGroup {
                    count: 1,
                    bytes: finding.size as u64,
                    pairs: vec![(finding.owner, finding.caller)],
                    first: finding,
                };
                groups.insert(key, group);
            }
        }
    }

    /// A block of `size` bytes was kept out of the allocator.
    pub fn quarantine(&self, size: usize) {
        self.quarantined_blocks.fetch_add(1, Relaxed);
        self.quarantined_bytes.fetch_add(size as u64, Relaxed);
    }

    /// The groups, most frequent first.
    pub fn snapshot(&self) -> Vec<FindingGroup> {
        let groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<FindingGroup> = groups.iter().flat_map(|g| g.values().cloned()).collect();
        out.sort_by(|a, b| b.count.cmp(&a.count).then(a.first.kind.cmp(&b.first.kind)));
        out
    }

    /// Totals over every finding.
    pub fn totals(&self) -> FindingTotals {
        FindingTotals {
            per_kind: std::array::from_fn(|i| self.per_kind[i].load(Relaxed)),
            undetailed: self.undetailed.load(Relaxed),
            quarantined_blocks: self.quarantined_blocks.load(Relaxed),
            quarantined_bytes: self.quarantined_bytes.load(Relaxed),
        }
    }

    /// Forgets every finding (a fresh start).
    pub fn reset(&self) {
        *self.groups.lock().unwrap_or_else(|e| e.into_inner()) = None;
        *self.window.lock().unwrap_or_else(|e| e.into_inner()) = None;
        for c in &self.per_kind {
            c.store(0, Relaxed);
        }
        for c in [&self.undetailed, &self.quarantined_blocks, &self.quarantined_bytes] {
            c.store(0, Relaxed);
        }
    }
}

/// A hasher for block addresses: one multiply (SipHash, the default, costs
/// more than the rest of a checked free). The shard is picked with another
/// multiplier, so a shard's keys still differ in every bit of their hash.
#[derive(Default)]
pub struct AddressHasher(u64);

impl Hasher for AddressHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_usize(&mut self, n: usize) {
        let x = (n as u64 >> 4).wrapping_mul(0xD6E8_FEB8_6659_FD93);
        self.0 = x ^ (x >> 32);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type AddressHashMap<V> = HashMap<usize, V, BuildHasherDefault<AddressHasher>>;

/// A sharded map from addresses to domains, bounded: the checker's freed
/// addresses (let through to a free and not handed out since, with the
/// domain they were freed in) and its blocks served by the raw allocator.
pub struct AddressMap {
    shards: [SpinLock<Option<AddressHashMap<Domain>>>; SHARDS],
    /// Whether anything was ever inserted since the last clear: while not,
    /// lookups take no lock (the raw-served map is empty in a sound program).
    used: AtomicBool,
}

impl Default for AddressMap {
    fn default() -> Self {
        Self::new()
    }
}

fn shard_of(address: usize) -> usize {
    ((address as u64 >> 4).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58) as usize % SHARDS
}

impl AddressMap {
    /// Empty; `const` so that it can be a `static`.
    pub const fn new() -> AddressMap {
        AddressMap { shards: [const { SpinLock::new(None) }; SHARDS], used: AtomicBool::new(false) }
    }

    /// Remembers `address` with `domain`. Past [`MAX_FREED`] addresses,
    /// about half of a shard's are forgotten to make room.
    pub fn insert(&self, address: usize, domain: Domain) {
        if !self.used.load(Relaxed) {
            self.used.store(true, Relaxed);
        }
        let mut shard = self.shards[shard_of(address)].lock();
        let map = shard.get_or_insert_with(AddressHashMap::default);
        if map.len() >= MAX_FREED / SHARDS {
            // Bounded memory: forget about half (HashMap order is arbitrary).
            let drop: HashSet<usize> = map.keys().copied().step_by(2).collect();
            map.retain(|a, _| !drop.contains(a));
        }
        map.insert(address, domain);
    }

    /// Forgets `address`; returns its domain if it was there.
    pub fn remove(&self, address: usize) -> Option<Domain> {
        if !self.used.load(Relaxed) {
            return None;
        }
        self.shards[shard_of(address)].lock().as_mut().and_then(|m| m.remove(&address))
    }

    /// The domain remembered with `address`, if any.
    pub fn get(&self, address: usize) -> Option<Domain> {
        if !self.used.load(Relaxed) {
            return None;
        }
        self.shards[shard_of(address)].lock().as_ref().and_then(|m| m.get(&address).copied())
    }

    /// Forgets every address.
    pub fn clear(&self) {
        for shard in &self.shards {
            *shard.lock() = None;
        }
        self.used.store(false, Relaxed);
    }

    /// For a `fork` prepare handler: takes every shard lock. Undo with
    /// [`AddressMap::unlock_after_fork`].
    pub fn lock_for_fork(&self) {
        for shard in &self.shards {
            std::mem::forget(shard.lock());
        }
    }

    /// Releases what [`AddressMap::lock_for_fork`] took.
    ///
    /// # Safety
    ///
    /// Only right after `lock_for_fork` on this thread (in the parent or the child).
    pub unsafe fn unlock_after_fork(&self) {
        for shard in &self.shards {
            // SAFETY: the caller took this lock in lock_for_fork and forgot the guard.
            unsafe { shard.force_unlock() };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(file: &str, line: i32) -> FrameText {
        FrameText { file: file.into(), name: "f".into(), line }
    }

    fn finding(kind: FindingKind, line: i32, owner: i64, caller: i64, size: usize) -> Finding {
        Finding {
            kind,
            domain: Domain::Mem,
            allocated_in: Some(Domain::Mem),
            owner: Some(BucketId::for_interpreter(Some(owner))),
            caller: BucketId::for_interpreter(Some(caller)),
            size,
            stack: vec![frame("app.py", line), frame("main.py", 1)],
            note: "".into(),
            allocated_at: Vec::new(),
        }
    }

    #[test]
    fn findings_group_by_kind_and_call_site() {
        let f = Findings::new();
        for caller in [2, 3, 2] {
            f.report(finding(FindingKind::CrossInterpreterFree, 10, 1, caller, 100));
        }
        f.report(finding(FindingKind::CrossInterpreterFree, 11, 1, 2, 50));
        f.report(finding(FindingKind::DoubleFree, 10, 1, 1, 8));
        let groups = f.snapshot();
        assert_eq!(groups.len(), 3);
        let top = &groups[0];
        assert_eq!((top.first.kind, top.count, top.bytes), (FindingKind::CrossInterpreterFree, 3, 300));
        assert_eq!(top.pairs.len(), 2, "interp 1 -> 2 and 1 -> 3, each once");
        let totals = f.totals();
        assert_eq!(totals.per_kind[FindingKind::CrossInterpreterFree.index()], 4);
        assert_eq!(totals.per_kind[FindingKind::DoubleFree.index()], 1);
        f.reset();
        assert!(f.snapshot().is_empty() && f.totals() == FindingTotals::default());
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "timing: its 2,500 admissions must fit in one second of the clock, and Miri's clock \
                  advances with every step it interprets (so they take several)"
    )]
    fn the_burst_limit_stops_details_within_a_second() {
        let f = Findings::new();
        let admitted = (0..BURST + 500).filter(|_| f.admit_details()).count() as u64;
        // The loop takes far less than a second on any machine that runs tests.
        assert_eq!(admitted, BURST);
        f.count_only(FindingKind::NoThreadState);
        assert_eq!(f.totals().undetailed, 1);
        assert_eq!(f.totals().per_kind[FindingKind::NoThreadState.index()], 1);
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "10,010 findings to pass the MAX_GROUPS cap: minutes under Miri (grouping itself runs \
                  under Miri in findings_group_by_kind_and_call_site)"
    )]
    fn groups_past_the_cap_only_count() {
        let f = Findings::new();
        for line in 0..(MAX_GROUPS as i32 + 10) {
            f.report(finding(FindingKind::DomainMismatch, line, 0, 0, 1));
        }
        assert_eq!(f.snapshot().len(), MAX_GROUPS);
        assert_eq!(f.totals().undetailed, 10);
        assert_eq!(f.totals().per_kind[FindingKind::DomainMismatch.index()], MAX_GROUPS as u64 + 10);
    }

    #[test]
    fn addresses_are_remembered_until_removed() {
        let freed = AddressMap::new();
        freed.insert(0x1000, Domain::Object);
        assert_eq!(freed.get(0x1000), Some(Domain::Object));
        assert_eq!(freed.get(0x2000), None);
        assert_eq!(freed.remove(0x1000), Some(Domain::Object));
        assert_eq!(freed.get(0x1000), None);
        assert_eq!(freed.remove(0x1000), None);
    }

    #[test]
    #[cfg_attr(miri, ignore = "1.5 million inserts to pass the MAX_FREED cap: hours under Miri")]
    fn address_maps_stay_bounded() {
        let freed = AddressMap::new();
        for i in 0..(MAX_FREED + MAX_FREED / 2) {
            freed.insert(i * 16, Domain::Mem);
        }
        let kept: usize = freed.shards.iter().map(|s| s.lock().as_ref().map_or(0, |m| m.len())).sum();
        assert!(kept <= MAX_FREED, "{kept}");
        assert!(freed.get((MAX_FREED + MAX_FREED / 2 - 1) * 16).is_some(), "the newest is kept");
    }
}
