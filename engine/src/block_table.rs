//! An out-of-band table of live blocks: address -> (exact size, owner, domain).
//!
//! Hooks installed after CPython has started may not add headers to blocks or
//! change pointers (they forward to the allocator underneath), so the only way
//! to know a block's size at `free` time is to remember it here.
//!
//! # Layout
//!
//! Two stores, and every address has its record in at most one:
//!
//! * the [`granule_map`](crate::granule_map): small blocks (16-byte aligned,
//!   below 512 bytes, owner bucket below 32: nearly every block pymalloc
//!   serves) as one byte per 16-byte granule, found from the address alone.
//!   It costs a sixteenth of the memory those blocks span, where a hash slot
//!   costs more than a small block itself;
//! * [`SHARDS`] open-addressing hash tables for the rest. A block's chunk
//!   (address / 256) picks its shard and the start of a run of slots (a
//!   Fibonacci hash); its offset within the chunk picks the slot in that
//!   run, so blocks that are neighbours in memory are neighbours in the
//!   table (cache locality). Collisions use linear probing; removal uses
//!   backward-shift deletion, so there are no tombstones and lookups never
//!   degrade. Each slot is 16 bytes: the address and a packed record (44-bit
//!   size, 18-bit bucket, 2-bit domain). Sizes of 16 TiB or more do not fit
//!   and are kept in a side list.
//!
//! An address that comes back from the allocator with a record in the other
//! store (its free was missed) has that record returned, as with one store.
//!
//! The table relies on what every allocator guarantees: live blocks never
//! overlap (a small block's record takes the map's bytes of up to three of
//! its granules). A block whose free was missed is found when its address
//! comes back; if instead a new block is recorded over part of it, its
//! record is lost and its bytes stay counted (as when its address never
//! comes back at all).
//!
//! # Concurrency
//!
//! * A shard's slots, and the granule entries of the addresses that map to
//!   the shard, are only read or written with that shard's lock held.
//!   Locks are held for a bounded probe sequence, plus, rarely, a rehash (which
//!   allocates through the C library's `malloc`, never through Python) or a
//!   `stats` scan of the shard; never across a call into the Python allocator
//!   underneath the hooks.
//! * Two threads never contend on one *block*: a block's address is owned by
//!   whoever allocated it until it is freed, so insert/remove of one address are
//!   ordered by the allocator's own happens-before (free -> reuse).
//! * The table's own memory comes from Rust's global allocator (the C
//!   library's `malloc` in interheap's extension) and, for the granule map,
//!   anonymous mappings; never from Python's domains, so a hook never
//!   re-enters itself through the table.
//! * `fork()`: [`BlockTable::lock_all`] / [`BlockTable::unlock_all`] let an
//!   `atfork` handler hold every shard across the fork so the child never
//!   inherits a lock held by a thread that does not exist there.

use interheap_sync::SpinLock;

use crate::domain::Domain;
use crate::granule_map::{self, GranuleMap};
use crate::ledger::BucketId;

/// Number of shards (a power of two).
pub const SHARDS: usize = 128;
const SHARD_BITS: u32 = SHARDS.trailing_zeros();
/// Small blocks a shard removes between two sweeps of the granule map, at
/// least (128 shards: about a million frees of blocks that reached the
/// table, which pays for scanning the map's leaves; the hash table's own
/// shrinking waits in the same way).
const SWEEP_PERIOD: usize = 8192;
/// Slots a shard starts with: the hash table holds only what the granule map
/// cannot (large, unaligned or far-owner blocks), so it starts small.
const INITIAL_SLOTS: usize = 32;

const SIZE_BITS: u32 = 44;
const OWNER_BITS: u32 = 18;
const SIZE_MASK: u64 = (1 << SIZE_BITS) - 1;
/// Marks a record whose size lives in the side list of huge blocks.
const SIZE_HUGE: u64 = SIZE_MASK;
const OWNER_MASK: u64 = (1 << OWNER_BITS) - 1;

/// What the table remembers about a live block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRecord {
    /// The size the caller asked for, in bytes.
    pub size: usize,
    /// The bucket (interpreter) that allocated it.
    pub owner: BucketId,
    /// The domain it was allocated in.
    pub domain: Domain,
}

impl BlockRecord {
    /// Whether `size` fits the packed form exactly (below 16 TiB).
    #[inline(always)]
    pub fn packable(size: usize) -> bool {
        (size as u64) < SIZE_HUGE
    }

    pub(crate) fn pack(self) -> u64 {
        let size = if (self.size as u64) < SIZE_HUGE { self.size as u64 } else { SIZE_HUGE };
        size | ((u64::from(self.owner.index()) & OWNER_MASK) << SIZE_BITS)
            | ((self.domain as u64) << (SIZE_BITS + OWNER_BITS))
    }

    /// The packed record's top bits (owner and domain, above the size): a
    /// fast path compares them with one instruction.
    #[inline(always)]
    pub(crate) const fn packed_tag(owner: BucketId, domain: Domain) -> u64 {
        (owner.index() as u64 & OWNER_MASK) | ((domain as u64) << OWNER_BITS)
    }

    /// The tag of a packed record (see [`BlockRecord::packed_tag`]).
    #[inline(always)]
    pub(crate) const fn tag_of(packed: u64) -> u64 {
        packed >> SIZE_BITS
    }

    /// The size field of a packed record (exact below [`BlockRecord::packable`]'s bound).
    #[inline(always)]
    pub(crate) const fn size_of(packed: u64) -> u64 {
        packed & SIZE_MASK
    }

    /// Packs a record from its tag and a packable size.
    #[inline(always)]
    pub(crate) const fn pack_tagged(tag: u64, size: u64) -> u64 {
        size | (tag << SIZE_BITS)
    }

    /// Unpacks a record; `size` is the packed size field, which the caller
    /// replaces for huge blocks.
    pub(crate) fn unpack(packed: u64) -> BlockRecord {
        BlockRecord {
            size: (packed & SIZE_MASK) as usize,
            owner: BucketId::from_index(((packed >> SIZE_BITS) & OWNER_MASK) as u32),
            domain: Domain::from_index((packed >> (SIZE_BITS + OWNER_BITS)) as usize).unwrap_or(Domain::Raw),
        }
    }
}

#[derive(Clone, Copy, Default)]
struct Slot {
    /// Block address; 0 marks an empty slot (NULL is never stored).
    key: usize,
    packed: u64,
}

struct ShardMap {
    slots: Vec<Slot>,
    len: usize,
    /// Sizes of blocks too large for the packed field, by address.
    huge: Vec<(usize, usize)>,
    /// Operations in a row that left the table below 1/16 full (see `maybe_shrink`).
    quiet_ops: usize,
    /// Blocks of this shard's addresses in the granule map, and their bytes.
    small_len: usize,
    small_bytes: u64,
    /// Since the last sweep (see [`BlockTable::sweep`]): the most
    /// `small_len` has been, the small blocks removed, and whether a sweep
    /// is due (many removed, and at most half of a peak of 16 or more left:
    /// a table that stays nearly empty is not swept over and over).
    small_peak: usize,
    small_removals: usize,
    sweep_due: bool,
}

#[repr(align(128))]
struct Shard {
    map: SpinLock<ShardMap>,
}

/// Occupancy figures, for reporting the table's own overhead.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    /// Live blocks recorded.
    pub entries: usize,
    /// Slots allocated across all shards.
    pub slots: usize,
    /// Bytes of memory the table holds (slots plus side lists).
    pub bytes: usize,
    /// Sum of the recorded sizes of all live blocks. Maintained independently
    /// of the ledger, so comparing the two checks the accounting.
    pub live_bytes: u64,
}

/// The sharded block table. See the module docs.
pub struct BlockTable {
    shards: [Shard; SHARDS],
    /// Small blocks' records (see the granule_map module); an address's
    /// entry is only touched under that address's shard lock.
    granules: GranuleMap,
}

impl Default for BlockTable {
    fn default() -> Self {
        Self::new()
    }
}

/// Blocks in the same 256-byte chunk share a shard and a run of at most 16
/// slots (4 cache lines). Larger chunks give more locality but longer probe
/// clusters (a dense run that another run lands in must be probed through).
const PAGE_SHIFT: u32 = 8;
/// Allocators align blocks to at least 16 bytes, so the low 4 bits carry nothing.
const GRANULE_SHIFT: u32 = 4;

/// Hash of a block's page: spreads pages over shards and over slot runs.
#[inline]
fn page_hash(key: usize) -> u64 {
    ((key >> PAGE_SHIFT) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

#[inline]
fn shard_index(key: usize) -> usize {
    (page_hash(key) >> (64 - SHARD_BITS)) as usize
}

impl ShardMap {
    const fn new() -> ShardMap {
        ShardMap {
            slots: Vec::new(),
            len: 0,
            huge: Vec::new(),
            quiet_ops: 0,
            small_len: 0,
            small_bytes: 0,
            small_peak: 0,
            small_removals: 0,
            sweep_due: false,
        }
    }

    /// The slot where `key`'s probe sequence starts: its page's hashed run,
    /// plus its offset in the page. Blocks allocated one after another in a
    /// page (the common case for pymalloc and mimalloc) land in neighbouring
    /// slots and share cache lines, instead of scattering over the table.
    #[inline]
    fn home(&self, key: usize) -> usize {
        let mask = self.slots.len() - 1;
        // The hash's best bits are its high ones: take those just below the
        // shard-selecting top bits.
        let bits = self.slots.len().trailing_zeros();
        let run = ((page_hash(key) << SHARD_BITS) >> (64 - bits)) as usize;
        let offset = (key >> GRANULE_SHIFT) & ((1 << (PAGE_SHIFT - GRANULE_SHIFT)) - 1);
        run.wrapping_add(offset) & mask
    }

    /// The slot at `i`, which callers always reduce modulo the table size.
    #[inline(always)]
    fn slot(&self, i: usize) -> Slot {
        debug_assert!(i < self.slots.len());
        // SAFETY: every index passed here is masked with `len - 1`, and the
        // length is a non-zero power of two whenever `probe` can be reached.
        unsafe { *self.slots.get_unchecked(i) }
    }

    /// Index of `key`'s slot, or of the empty slot where it would go.
    #[inline]
    fn probe(&self, key: usize) -> usize {
        let mask = self.slots.len() - 1;
        let mut i = self.home(key);
        loop {
            let k = self.slot(i).key;
            if k == key || k == 0 {
                return i;
            }
            i = (i + 1) & mask;
        }
    }

    fn grow(&mut self) {
        self.rehash((self.slots.len() * 2).max(INITIAL_SLOTS));
    }

    /// Gives memory back after a peak, once the table has stayed below 1/16
    /// full for as many operations as it has slots: then it shrinks to a
    /// quarter full (growth happens above 5/8). Waiting matters: a program
    /// that fills and empties the table in cycles (pyperformance's `float`
    /// keeps 100,000 points, drops them and starts again) would otherwise pay
    /// a chain of rehashes down and up every cycle, and the rehashes cost more
    /// than the hooks' other work there. The wait is paid for by the
    /// operations it counts, so a rehash stays O(1) per operation.
    #[inline]
    fn maybe_shrink(&mut self) {
        if self.len * 16 >= self.slots.len() {
            self.quiet_ops = 0;
            return;
        }
        self.quiet_ops += 1;
        if self.quiet_ops >= self.slots.len() && self.slots.len() > INITIAL_SLOTS {
            self.rehash((self.len * 4).next_power_of_two().max(INITIAL_SLOTS));
        }
    }

    fn rehash(&mut self, new_len: usize) {
        self.quiet_ops = 0;
        let old = std::mem::replace(&mut self.slots, vec![Slot::default(); new_len]);
        for slot in old.into_iter().filter(|s| s.key != 0) {
            let i = self.probe(slot.key);
            self.slots[i] = slot;
        }
    }

    fn take_huge(&mut self, key: usize) -> usize {
        match self.huge.iter().position(|&(k, _)| k == key) {
            Some(i) => self.huge.swap_remove(i).1,
            None => SIZE_HUGE as usize,
        }
    }

    /// The real size of a record whose packed size field is `packed_size`.
    fn full_size(&self, key: usize, packed_size: usize) -> usize {
        if packed_size as u64 != SIZE_HUGE {
            return packed_size;
        }
        self.huge.iter().find(|&&(k, _)| k == key).map_or(packed_size, |h| h.1)
    }

    /// The record in slot `i`; `take` also drops its side-list entry.
    fn record_at(&mut self, i: usize, take: bool) -> BlockRecord {
        let slot = self.slots[i];
        let mut rec = BlockRecord::unpack(slot.packed);
        if rec.size as u64 == SIZE_HUGE {
            rec.size = if take { self.take_huge(slot.key) } else { self.full_size(slot.key, rec.size) };
        }
        rec
    }

    /// Records `rec` at `key`, in the granule map if it fits there, and
    /// returns the record the address had in either store (a missed free).
    #[inline]
    fn insert(&mut self, granules: &GranuleMap, key: usize, rec: BlockRecord) -> Option<BlockRecord> {
        if let Some(code) = granule_map::code(key, rec) {
            if let Some(old) = granules.store(key, code) {
                self.small_len += 1;
                self.small_peak = self.small_peak.max(self.small_len);
                self.small_bytes = self.small_bytes.wrapping_add(rec.size as u64);
                if granule_map::is_live(old) {
                    return Some(self.forget_small(old));
                }
                return self.remove_hashed(key);
            }
        }
        // (A tombstone there goes too: the address is live again.)
        let stale = if granule_map::covers(key) { granules.clear(key) } else { 0 };
        let displaced = self.insert_hashed(key, rec);
        if granule_map::is_live(stale) {
            return Some(self.forget_small(stale));
        }
        displaced
    }

    /// Takes a granule entry's block off this shard's small figures.
    #[inline(always)]
    fn forget_small(&mut self, entry: u16) -> BlockRecord {
        let rec = granule_map::decode(entry);
        self.small_len -= 1;
        self.small_bytes = self.small_bytes.wrapping_sub(rec.size as u64);
        self.small_removals += 1;
        if self.small_removals >= SWEEP_PERIOD
            && self.small_len * 2 <= self.small_peak
            && self.small_peak >= 16
        {
            self.sweep_due = true;
        }
        rec
    }

    #[inline(always)]
    fn remove(&mut self, granules: &GranuleMap, key: usize) -> Option<BlockRecord> {
        if granule_map::covers(key) {
            let entry = granules.take(key);
            if entry != 0 {
                return Some(self.forget_small(entry));
            }
        }
        self.remove_hashed(key)
    }

    fn get(&self, granules: &GranuleMap, key: usize) -> Option<BlockRecord> {
        if granule_map::covers(key) {
            let entry = granules.get(key);
            if granule_map::is_live(entry) {
                return Some(granule_map::decode(entry));
            }
        }
        self.get_hashed(key)
    }

    #[inline]
    fn insert_hashed(&mut self, key: usize, rec: BlockRecord) -> Option<BlockRecord> {
        // Keep the load factor at or below 5/8 so probe sequences stay short.
        if (self.len + 1) * 8 > self.slots.len() * 5 {
            self.grow();
        }
        let i = self.probe(key);
        let displaced = if self.slots[i].key == key {
            Some(self.record_at(i, true))
        } else {
            self.len += 1;
            None
        };
        self.slots[i] = Slot { key, packed: rec.pack() };
        if rec.size as u64 >= SIZE_HUGE {
            self.huge.push((key, rec.size));
        }
        self.maybe_shrink();
        displaced
    }

    #[inline]
    fn remove_hashed(&mut self, key: usize) -> Option<BlockRecord> {
        if self.len == 0 {
            return None;
        }
        let mut hole = self.probe(key);
        if self.slots[hole].key != key {
            return None;
        }
        let rec = self.record_at(hole, true);
        // Backward-shift deletion: pull later members of the probe run into
        // the hole when the hole lies between their home slot and them.
        let mask = self.slots.len() - 1;
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let k = self.slot(j).key;
            if k == 0 {
                break;
            }
            let home = self.home(k);
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(hole) & mask) {
                self.slots[hole] = self.slots[j];
                hole = j;
            }
        }
        self.slots[hole] = Slot::default();
        self.len -= 1;
        self.maybe_shrink();
        Some(rec)
    }

    fn get_hashed(&self, key: usize) -> Option<BlockRecord> {
        if self.len == 0 {
            return None;
        }
        let i = self.probe(key);
        if self.slots[i].key != key {
            return None;
        }
        let rec = BlockRecord::unpack(self.slots[i].packed);
        Some(BlockRecord { size: self.full_size(key, rec.size), ..rec })
    }
}

impl BlockTable {
    /// An empty table; `const` so that it can be a `static`. It allocates
    /// nothing until the first insert.
    pub const fn new() -> BlockTable {
        BlockTable {
            shards: [const { Shard { map: SpinLock::new(ShardMap::new()) } }; SHARDS],
            granules: GranuleMap::new(),
        }
    }

    #[inline]
    fn shard(&self, key: usize) -> &SpinLock<ShardMap> {
        &self.shards[shard_index(key)].map
    }

    /// Records a live block at `addr` (non-zero). If the table already held a
    /// record for that address, the block it described was freed without the
    /// table seeing it; that stale record is returned so the caller can
    /// account for the missed free.
    #[inline(always)]
    pub fn insert(&self, addr: usize, rec: BlockRecord) -> Option<BlockRecord> {
        debug_assert!(addr != 0, "NULL is never a block");
        self.shard(addr).lock().insert(&self.granules, addr, rec)
    }

    /// Like [`BlockTable::insert`], and runs `then` before the shard lock is
    /// released (a nursery eviction clears its slot there; see the nursery
    /// module).
    #[inline]
    pub fn insert_then(&self, addr: usize, rec: BlockRecord, then: impl FnOnce()) -> Option<BlockRecord> {
        debug_assert!(addr != 0, "NULL is never a block");
        let mut shard = self.shard(addr).lock();
        let displaced = shard.insert(&self.granules, addr, rec);
        then();
        drop(shard);
        displaced
    }

    /// Forgets the block at `addr` and returns what was recorded, or `None`
    /// if the table never saw it allocated.
    #[inline(always)]
    pub fn remove(&self, addr: usize) -> Option<BlockRecord> {
        let mut shard = self.shard(addr).lock();
        let rec = shard.remove(&self.granules, addr);
        let sweep = shard.sweep_due;
        drop(shard);
        if sweep {
            self.sweep();
        }
        rec
    }

    /// Gives the granule map's pages that hold no entry back to the OS, once
    /// a shard has removed [`SWEEP_PERIOD`] small blocks since the last
    /// sweep and holds at most half of its peak since, if that peak was 16
    /// or more (the hash table
    /// shrinks by itself; see `maybe_shrink`). Takes every shard lock, in
    /// order, with none held (a leaf's entries belong to many shards), so it
    /// must stay rare: every shard's count and peak restart.
    #[cold]
    #[inline(never)]
    fn sweep(&self) {
        let mut maps: Vec<_> = self.shards.iter().map(|shard| shard.map.lock()).collect();
        if !maps.iter().any(|map| map.sweep_due) {
            return; // another thread swept first
        }
        self.granules.discard_empty_pages();
        for map in &mut maps {
            map.sweep_due = false;
            map.small_peak = map.small_len;
            map.small_removals = 0;
        }
    }

    /// What is recorded for `addr`, if anything.
    pub fn get(&self, addr: usize) -> Option<BlockRecord> {
        self.shard(addr).lock().get(&self.granules, addr)
    }

    /// The checker's mark that the block at `addr` was freed in `domain`
    /// and its address not handed out since (a tombstone in the granule
    /// map; see [`BlockTable::freed_domain`]). False, and nothing kept, if
    /// the address has no granule (unaligned or out of range) or the OS
    /// refused the memory: the caller then remembers it elsewhere.
    pub fn bury(&self, addr: usize, domain: Domain) -> bool {
        if !granule_map::covers(addr) {
            return false;
        }
        let _shard = self.shard(addr).lock();
        self.granules.bury(addr, domain)
    }

    /// Removes [`BlockTable::bury`]'s mark at `addr` (a block made there
    /// without a record: its address is live again).
    pub fn unbury(&self, addr: usize) {
        if granule_map::covers(addr) {
            let _shard = self.shard(addr).lock();
            self.granules.unbury(addr);
        }
    }

    /// The domain [`BlockTable::bury`] marked `addr` freed in, if it did
    /// and no block was recorded there since. Only meaningful once no live
    /// record of `addr` was found (a block recorded elsewhere, in a
    /// nursery, does not clear the mark).
    pub fn freed_domain(&self, addr: usize) -> Option<Domain> {
        if !granule_map::covers(addr) {
            return None;
        }
        let _shard = self.shard(addr).lock();
        granule_map::freed_domain(self.granules.get(addr))
    }

    /// Forgets every block and returns the memory the table held.
    pub fn clear(&self) {
        // Every shard at once: the granule map's leaves hold all shards' entries.
        let mut maps: Vec<_> = self.shards.iter().map(|shard| shard.map.lock()).collect();
        self.granules.unmap_all();
        for map in &mut maps {
            **map = ShardMap::new();
        }
    }

    /// Occupancy and memory figures. Locks each shard in turn, so the total is
    /// not an atomic cut while other threads insert.
    pub fn stats(&self) -> TableStats {
        let mut stats = TableStats::default();
        for shard in &self.shards {
            let map = shard.map.lock();
            stats.entries += map.len + map.small_len;
            stats.live_bytes = stats.live_bytes.wrapping_add(map.small_bytes);
            for slot in map.slots.iter().filter(|s| s.key != 0) {
                let size = map.full_size(slot.key, BlockRecord::unpack(slot.packed).size);
                stats.live_bytes = stats.live_bytes.wrapping_add(size as u64);
            }
            stats.slots += map.slots.len();
            stats.bytes += map.slots.capacity() * std::mem::size_of::<Slot>()
                + map.huge.capacity() * std::mem::size_of::<(usize, usize)>();
        }
        // Under a shard lock: `clear` (which takes them all) may unmap the tree.
        let _shard = self.shards[0].map.lock();
        stats.bytes += self.granules.resident_bytes();
        stats
    }

    /// Acquires every shard lock and keeps it (for a `fork` prepare handler).
    pub fn lock_all(&self) {
        for shard in &self.shards {
            std::mem::forget(shard.map.lock());
        }
    }

    /// Releases every shard lock taken by [`BlockTable::lock_all`].
    ///
    /// # Safety
    ///
    /// Must only follow a [`BlockTable::lock_all`] on this table, in the same
    /// process image (in a fork child, the locks were taken by the parent's
    /// forking thread, which is the child's only thread).
    pub unsafe fn unlock_all(&self) {
        for shard in &self.shards {
            // SAFETY: the caller guarantees lock_all holds this lock and that
            // no guard for it exists anywhere.
            unsafe { shard.map.force_unlock() };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The smallest size the granule map leaves to the hash table.
    const BIG: usize = granule_map::SMALL_SIZE_LIMIT;

    fn rec(size: usize, owner: i64, domain: Domain) -> BlockRecord {
        BlockRecord { size, owner: BucketId::for_interpreter(Some(owner)), domain }
    }

    #[test]
    fn insert_get_remove() {
        let t = BlockTable::new();
        assert_eq!(t.remove(0x1000), None);
        assert_eq!(t.insert(0x1000, rec(32, 0, Domain::Object)), None);
        assert_eq!(t.get(0x1000), Some(rec(32, 0, Domain::Object)));
        assert_eq!(t.remove(0x1000), Some(rec(32, 0, Domain::Object)));
        assert_eq!(t.remove(0x1000), None);
        assert_eq!(t.stats().entries, 0);
    }

    #[test]
    fn reinsert_returns_stale_record() {
        let t = BlockTable::new();
        t.insert(0x2000, rec(10, 1, Domain::Mem));
        assert_eq!(t.insert(0x2000, rec(20, 2, Domain::Raw)), Some(rec(10, 1, Domain::Mem)));
        assert_eq!(t.stats().entries, 1);
        assert_eq!(t.get(0x2000), Some(rec(20, 2, Domain::Raw)));
    }

    #[test]
    fn packs_extremes() {
        let t = BlockTable::new();
        let owner = BlockRecord { size: 0, owner: BucketId::OVERFLOW, domain: Domain::Object };
        t.insert(0x10, owner);
        assert_eq!(t.get(0x10), Some(owner));
        let no_interp = BlockRecord { size: 1, owner: BucketId::NO_INTERPRETER, domain: Domain::Raw };
        t.insert(0x20, no_interp);
        assert_eq!(t.remove(0x20), Some(no_interp));
    }

    #[test]
    fn huge_sizes_are_exact() {
        let t = BlockTable::new();
        let big = rec(1 << 50, 4, Domain::Raw);
        let edge = rec(SIZE_HUGE as usize, 4, Domain::Raw);
        let below = rec(SIZE_HUGE as usize - 1, 4, Domain::Raw);
        t.insert(0x100, big);
        t.insert(0x200, edge);
        t.insert(0x300, below);
        assert_eq!(t.get(0x100), Some(big));
        assert_eq!(t.insert(0x100, rec(5, 4, Domain::Raw)), Some(big));
        assert_eq!(t.remove(0x200), Some(edge));
        assert_eq!(t.remove(0x300), Some(below));
        assert_eq!(t.remove(0x100), Some(rec(5, 4, Domain::Raw)));
        assert_eq!(t.stats().bytes % 16, 0);
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "about 300,000 table operations, hours under Miri; one_shard_grows_rehashes_and_shrinks \
                  runs the same growth, rehash and shrink code at a size Miri runs"
    )]
    fn many_keys_survive_growth_and_deletion() {
        // Sizes of BIG and up: records the hash table keeps.
        let t = BlockTable::new();
        let n = 50_000usize;
        for i in 1..=n {
            t.insert(i * 16, rec(BIG + i, (i % 7) as i64, Domain::Object));
        }
        assert_eq!(t.stats().entries, n);
        assert_eq!(t.stats().live_bytes, (n * BIG + n * (n + 1) / 2) as u64);
        for i in (1..=n).step_by(2) {
            assert_eq!(t.remove(i * 16).map(|r| r.size), Some(BIG + i));
        }
        for i in 1..=n {
            let expect = (i % 2 == 0).then(|| rec(BIG + i, (i % 7) as i64, Domain::Object));
            assert_eq!(t.get(i * 16), expect, "key {i}");
        }
        let before = t.stats().slots;
        for i in (2..=n).step_by(2) {
            assert!(t.remove(i * 16).is_some());
        }
        // Emptied, the table keeps its size until it has stayed nearly empty
        // for as many operations as it has slots (no rehash chains in programs
        // that fill and empty it in cycles)...
        assert_eq!(t.stats().slots, before, "no shrinking right after the peak");
        // ...and then gives the memory back.
        for i in 1..=4 * before {
            t.insert(i * 16, rec(BIG, 0, Domain::Raw));
            t.remove(i * 16);
        }
        assert!(t.stats().slots < before, "the table gives memory back after a peak");
        assert_eq!(t.stats().slots, SHARDS * INITIAL_SLOTS);
        for i in 1..=100 {
            t.insert(i * 16, rec(i, 0, Domain::Raw));
            t.insert(i * 16 + 8, rec(BIG + i, 0, Domain::Raw));
        }
        assert_eq!(t.stats().entries, 200);
        t.clear();
        assert_eq!(t.stats(), TableStats::default());
    }

    /// One shard grows twice (rehashing its records), keeps every record
    /// through backward-shift deletions, and shrinks back after a quiet
    /// spell: what `many_keys_survive_growth_and_deletion` checks over the
    /// whole table, with a few hundred keys (all in one shard), so that Miri
    /// checks the growth, rehash and shrink code too.
    #[test]
    fn one_shard_grows_rehashes_and_shrinks() {
        let t = BlockTable::new();
        let shard = shard_index(1 << PAGE_SHIFT);
        let keys: Vec<usize> = (1usize..)
            .map(|page| page << PAGE_SHIFT)
            .filter(|&page| shard_index(page) == shard)
            .flat_map(|page| (0..16).map(move |k| page + k * 16))
            .take(400)
            .collect();
        for (i, &key) in keys.iter().enumerate() {
            assert_eq!(t.insert(key, rec(BIG + i, 1, Domain::Mem)), None);
        }
        // 400 records over 5/8 of a 512-slot table: grown from 32 slots to 1024.
        assert_eq!(t.stats().slots, 1024, "only this shard has slots");
        for (i, &key) in keys.iter().enumerate().step_by(2) {
            assert_eq!(t.remove(key).map(|r| r.size), Some(BIG + i));
        }
        for (i, &key) in keys.iter().enumerate() {
            assert_eq!(t.get(key), (i % 2 == 1).then(|| rec(BIG + i, 1, Domain::Mem)), "key {i}");
        }
        for &key in keys.iter().skip(1).step_by(2) {
            assert!(t.remove(key).is_some());
        }
        assert_eq!(t.stats().slots, 1024, "no shrinking right after the peak");
        for &key in keys.iter().cycle().take(1024) {
            t.insert(key, rec(BIG, 0, Domain::Raw));
            t.remove(key);
        }
        assert_eq!((t.stats().slots, t.stats().entries), (INITIAL_SLOTS, 0), "shrunk after a quiet spell");
    }

    #[test]
    fn concurrent_threads_keep_their_own_blocks() {
        let t = BlockTable::new();
        std::thread::scope(|s| {
            for thread in 0..crate::iterations(8, 3) {
                let t = &t;
                s.spawn(move || {
                    for round in 0..crate::iterations(20, 2) {
                        let base = (thread + 1) << 32;
                        // Blocks of up to 2 KiB, 512 bytes apart: small ones never overlap.
                        for i in 0..crate::iterations(2_000, 40) {
                            assert_eq!(
                                t.insert(base + i * 512, rec(i + round, thread as i64, Domain::Mem)),
                                None
                            );
                        }
                        for i in 0..crate::iterations(2_000, 40) {
                            assert_eq!(t.remove(base + i * 512).map(|r| r.size), Some(i + round));
                        }
                    }
                });
            }
        });
        assert_eq!(t.stats().entries, 0);
    }

    /// A small block's record lives in the granule map, a large or unaligned
    /// one's in the hash table, and an address that comes back with a
    /// record in the other store still returns it as a missed free.
    #[test]
    fn records_move_between_the_granule_map_and_the_hash_table() {
        let t = BlockTable::new();
        let small = rec(24, 1, Domain::Object);
        let large = rec(BIG + 100, 1, Domain::Mem);
        let odd = rec(8, 1, Domain::Raw);
        assert_eq!(t.insert(0x10_0000, small), None);
        assert_eq!(t.insert(0x10_0008, odd), None, "8-byte aligned: hashed");
        let hashed_only = |t: &BlockTable| t.shards.iter().map(|s| s.map.lock().len).sum::<usize>();
        assert_eq!(hashed_only(&t), 1, "only the unaligned block is hashed");
        // The small block was freed unseen; a large one comes back there.
        assert_eq!(t.insert(0x10_0000, large), Some(small));
        assert_eq!(hashed_only(&t), 2);
        // And the other way round.
        assert_eq!(t.insert(0x10_0000, small), Some(large));
        assert_eq!(hashed_only(&t), 1);
        let stats = t.stats();
        assert_eq!((stats.entries, stats.live_bytes), (2, 24 + 8));
        assert_eq!(t.get(0x10_0000), Some(small));
        assert_eq!(t.remove(0x10_0000), Some(small));
        assert_eq!(t.remove(0x10_0008), Some(odd));
        assert_eq!(t.remove(0x10_0000), None);
        // Owners whose bucket index does not fit are hashed, and exact.
        let far = BlockRecord { size: 16, owner: BucketId::OVERFLOW, domain: Domain::Mem };
        assert_eq!(t.insert(0x20_0000, far), None);
        assert_eq!(t.get(0x20_0000), Some(far));
        assert_eq!(t.stats().entries, 1);
        t.clear();
        assert_eq!(t.stats(), TableStats::default(), "clear unmaps the granule map too");
    }

    /// 100,000 small blocks of 32 bytes cost 2 bytes each in the granule map
    /// (1 per 16-byte granule they span: a sixteenth of their memory), not the
    /// 32 a hash table spends at its load factor.
    #[test]
    #[cfg_attr(
        miri,
        ignore = "100,000 inserts and mincore; records_move_between... covers the code under Miri"
    )]
    fn small_blocks_cost_a_byte_a_granule() {
        let t = BlockTable::new();
        let n = 100_000;
        let base = 0x7000_0000;
        for i in 0..n {
            t.insert(base + i * 32, rec(24, 1, Domain::Object));
        }
        let stats = t.stats();
        assert_eq!((stats.entries, stats.live_bytes), (n, 24 * n as u64));
        // 2 bytes of entries per 32-byte block, plus the tree's inner pages.
        assert!(stats.bytes <= n * 2 + 16 * 1024, "{} bytes for {n} blocks", stats.bytes);
    }

    /// The checker's tombstones: a freed small block's address remembers the
    /// domain until a block is recorded there; they are not records.
    #[test]
    fn tombstones_mark_freed_addresses_until_a_block_is_recorded() {
        let t = BlockTable::new();
        let a = 0x30_0000;
        assert!(t.bury(a, Domain::Object));
        assert_eq!(t.freed_domain(a), Some(Domain::Object));
        assert_eq!((t.get(a), t.remove(a)), (None, None), "not a record");
        assert_eq!(t.stats().entries, 0);
        assert_eq!(t.insert(a, rec(24, 1, Domain::Object)), None, "no missed free over a tombstone");
        assert_eq!(t.freed_domain(a), None, "a small record replaces it");
        assert!(t.bury(a, Domain::Mem), "no tombstone over a live record...");
        assert_eq!(t.remove(a), Some(rec(24, 1, Domain::Object)), "...which stays");
        assert!(t.bury(a, Domain::Mem));
        assert_eq!(t.insert(a, rec(BIG, 1, Domain::Mem)), None);
        assert_eq!(t.freed_domain(a), None, "a hashed record clears it too");
        assert_eq!(t.remove(a), Some(rec(BIG, 1, Domain::Mem)));
        assert!(t.bury(a, Domain::Raw));
        t.unbury(a);
        assert_eq!(t.freed_domain(a), None);
        assert!(!t.bury(a + 8, Domain::Raw), "no granule: the caller keeps it elsewhere");
        assert!(t.bury(a, Domain::Raw));
        t.clear();
        assert_eq!(t.freed_domain(a), None, "clear forgets tombstones");
    }

    /// After a peak of small blocks, the granule map's emptied pages go
    /// back to the OS as frees go on.
    #[test]
    #[cfg_attr(
        miri,
        ignore = "millions of table operations; the sweep's discard is the allocator's, which Miri runs"
    )]
    fn the_granule_maps_pages_go_back_after_a_peak() {
        let t = BlockTable::new();
        let n = 2 * SHARDS * SWEEP_PERIOD;
        let base = 0x6000_0000;
        for i in 0..n {
            t.insert(base + i * 32, rec(24, 1, Domain::Object));
        }
        let at_peak = t.stats().bytes;
        assert!(at_peak >= n * 2, "{at_peak} bytes at the peak");
        // Keep every 64th block: one per 2 KiB, so every page of entries
        // keeps some and none can go.
        for i in (0..n).filter(|i| i % 64 != 0) {
            assert!(t.remove(base + i * 32).is_some());
        }
        assert_eq!(t.stats().entries, n.div_ceil(64));
        assert!(t.stats().bytes >= at_peak / 2, "pages with a live entry stay");
        for i in (0..n).step_by(64) {
            assert_eq!(t.remove(base + i * 32), Some(rec(24, 1, Domain::Object)), "survivors are intact");
        }
        // Emptied, the pages go back once enough frees have followed (here a
        // block made and freed over and over in the first 32 KiB).
        for i in 0..2 * SHARDS * SWEEP_PERIOD {
            let addr = base + (i % 1024) * 32;
            t.insert(addr, rec(24, 1, Domain::Object));
            t.remove(addr);
        }
        assert!(t.stats().bytes < at_peak / 8, "{} of {at_peak} bytes kept when empty", t.stats().bytes);
        assert_eq!(t.stats().entries, 0);
        for i in 0..1000 {
            assert_eq!(
                t.insert(base + i * 32, rec(24, 1, Domain::Object)),
                None,
                "discarded pages read empty"
            );
        }
    }

    #[test]
    fn lock_all_then_unlock_all() {
        let t = BlockTable::new();
        t.insert(0x40, rec(1, 0, Domain::Raw));
        t.lock_all();
        // SAFETY: lock_all was just called on this table in this thread.
        unsafe { t.unlock_all() };
        assert_eq!(t.remove(0x40).map(|r| r.size), Some(1));
    }
}
