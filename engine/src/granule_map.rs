//! The block table's store for small blocks: two bytes per 16-byte granule
//! of address space, found from the address alone.
//!
//! Most live blocks are small (pymalloc serves up to 512 bytes; a float is
//! 24). A hash table keyed by address spends 16 bytes a slot, about 32 per
//! block at its load factor: more than the block itself. Here a block whose
//! address is 16-byte aligned, whose size is below 512 and whose owner's
//! bucket index is below 32 is one `u16` at a place computed from its
//! address, with no key stored: [`code`] packs the record, [`decode`] reads
//! it back. Anything else stays in the hash table (`block_table`).
//!
//! The checker also leaves a *tombstone* at a freed block's address (an
//! entry whose top bits are 0: [`tombstone`]), so that a second free of it
//! is told from the free of a block allocated before the hooks. A tombstone
//! is not a record: a block recorded there later simply replaces it, and
//! lookups of live records pass over it.
//!
//! # Layout
//!
//! A radix tree over the low [`ADDRESS_BITS`] bits of the address: the root
//! (one pointer per 4 GiB), then a node (one pointer per 1 MiB), then a leaf
//! (one `u16` per 16-byte granule of that MiB: 128 KiB). Each level is an
//! anonymous zeroed mapping made on the first insert that needs it, so the
//! OS backs a leaf's pages only where blocks were recorded: at most 1/8 of
//! the memory that holds small blocks, and no more than the pages touched.
//!
//! # Concurrency
//!
//! * The tree only grows while the map lives: a missing level is mapped and
//!   published with a compare-and-swap (the loser unmaps its own), and read
//!   with Acquire, so a reader that sees a pointer sees the zeroed level.
//! * A granule's entry is read and written only under the block table's
//!   shard lock for that address (every address maps to one shard), so the
//!   entries need no ordering of their own: they are atomics only because
//!   neighbouring entries of other shards share their leaf.
//! * [`GranuleMap::unmap_all`] unmaps the tree; the caller holds every shard
//!   lock, so nobody is inside it. Dropping the map unmaps it too.

use std::sync::atomic::{AtomicPtr, AtomicU16, Ordering::Acquire, Ordering::Relaxed, Ordering::Release};

use crate::block_table::BlockRecord;
use crate::domain::Domain;
use crate::heap::os;
use crate::ledger::BucketId;

/// Address bits the tree covers (x86-64 and AArch64 Linux user space). Higher
/// addresses go to the hash table.
#[cfg(not(miri))]
const ADDRESS_BITS: u32 = 47;
/// Under Miri, 64 GiB (its addresses stay far below; see `heap::os`).
#[cfg(miri)]
const ADDRESS_BITS: u32 = 36;
const GRANULE_SHIFT: u32 = 4;
/// A leaf covers 1 MiB (128 KiB of entries), a node 4 GiB.
#[cfg(not(miri))]
const LEAF_SHIFT: u32 = 20;
#[cfg(not(miri))]
const NODE_SHIFT: u32 = 32;
/// Under Miri, smaller levels (a 64 KiB leaf, 1,024 slots a node and a root):
/// the same code, but a sweep or a census reads every slot of a level, each
/// one an atomic access Miri checks.
#[cfg(miri)]
const LEAF_SHIFT: u32 = 16;
#[cfg(miri)]
const NODE_SHIFT: u32 = 26;
const LEAF_ENTRIES: usize = 1 << (LEAF_SHIFT - GRANULE_SHIFT);
const NODE_ENTRIES: usize = 1 << (NODE_SHIFT - LEAF_SHIFT);
const ROOT_ENTRIES: usize = 1 << (ADDRESS_BITS - NODE_SHIFT);

/// Sizes below this are kept here (9 bits).
pub const SMALL_SIZE_LIMIT: usize = 512;
const SIZE_BITS: u32 = 9;
/// Owners whose bucket index is below this are kept here (5 bits).
const OWNER_LIMIT: u32 = 32;
const OWNER_SHIFT: u32 = SIZE_BITS;
/// The domain is stored as its index plus one, so an entry is never 0.
const DOMAIN_SHIFT: u32 = SIZE_BITS + 5;

type Leaf = [AtomicU16; LEAF_ENTRIES];
type Node = [AtomicPtr<Leaf>; NODE_ENTRIES];
type Root = [AtomicPtr<Node>; ROOT_ENTRIES];

/// Whether `addr` has a granule here (the hash table holds the others).
#[inline(always)]
pub fn covers(addr: usize) -> bool {
    addr & ((1 << GRANULE_SHIFT) - 1) == 0 && (addr >> ADDRESS_BITS) == 0
}

/// `rec` packed into a granule entry, if the block at `addr` can live here.
#[inline(always)]
pub fn code(addr: usize, rec: BlockRecord) -> Option<u16> {
    let owner = rec.owner.index();
    (covers(addr) && rec.size < SMALL_SIZE_LIMIT && owner < OWNER_LIMIT).then(|| {
        (rec.size as u16)
            | ((owner as u16) << OWNER_SHIFT)
            | ((rec.domain.index() as u16 + 1) << DOMAIN_SHIFT)
    })
}

/// The checker's mark for a block freed in `domain` whose address the
/// allocator has not handed out since: an entry with no live record (its
/// top bits are 0) and the domain in its low bits. A live entry always has
/// its top bits set ([`is_live`]).
#[inline(always)]
pub fn tombstone(domain: Domain) -> u16 {
    domain.index() as u16 + 1
}

/// Whether an entry holds a live block's record (not empty, not a tombstone).
#[inline(always)]
pub fn is_live(entry: u16) -> bool {
    entry >> DOMAIN_SHIFT != 0
}

/// The domain a tombstone says its block was freed in (`None`: not a tombstone).
#[inline]
pub fn freed_domain(entry: u16) -> Option<Domain> {
    if entry == 0 || is_live(entry) {
        return None;
    }
    Domain::from_index(usize::from(entry) - 1)
}

/// The record a live entry holds.
#[inline(always)]
pub fn decode(entry: u16) -> BlockRecord {
    BlockRecord {
        size: usize::from(entry & ((1 << SIZE_BITS) - 1)),
        owner: BucketId::from_index(u32::from((entry >> OWNER_SHIFT) & (OWNER_LIMIT as u16 - 1))),
        domain: Domain::from_index(usize::from(entry >> DOMAIN_SHIFT) - 1).unwrap_or(Domain::Raw),
    }
}

/// The radix tree of granule entries. See the module docs.
pub struct GranuleMap {
    root: AtomicPtr<Root>,
}

impl Default for GranuleMap {
    fn default() -> Self {
        Self::new()
    }
}

/// A zeroed level of the tree, or null if the OS refused.
fn map_level<T>() -> *mut T {
    let bytes = std::mem::size_of::<T>().next_multiple_of(os::OS_PAGE);
    os::map_aligned(bytes).map_or(std::ptr::null_mut(), |p| p.cast())
}

/// Returns a level from [`map_level`] to the OS.
///
/// # Safety
///
/// `level` came from `map_level::<T>()` and nothing refers to it any more.
unsafe fn unmap_level<T>(level: *mut T) {
    let bytes = std::mem::size_of::<T>().next_multiple_of(os::OS_PAGE);
    // SAFETY: per the contract, a whole mapping of ours that is unused.
    unsafe { os::unmap(level.cast(), bytes) };
}

/// The level at `slot`, if published, as a reference to the whole level:
/// for the rare walks over the tree (lookups use [`level_ptr`]).
fn level<T>(slot: &AtomicPtr<T>) -> Option<&T> {
    // SAFETY: a published level is a zeroed mapping of size_of::<T>() bytes
    // (all-zero is a valid T: atomics and null pointers), unmapped only when
    // the map drops, which no `&self` outlives, or by `unmap_all`, whose
    // caller holds every shard lock (so no walk is running).
    level_ptr(slot, false).map(|p| unsafe { &*p })
}

/// The level at `slot` as a raw pointer (see [`GranuleMap::entry`]),
/// mapping and publishing it first if `create`.
#[inline(always)]
fn level_ptr<T>(slot: &AtomicPtr<T>, create: bool) -> Option<*mut T> {
    let p = slot.load(Acquire);
    if !p.is_null() {
        return Some(p);
    }
    if create {
        publish(slot)
    } else {
        None
    }
}

#[cold]
fn publish<T>(slot: &AtomicPtr<T>) -> Option<*mut T> {
    let fresh = map_level::<T>();
    if fresh.is_null() {
        return None;
    }
    match slot.compare_exchange(std::ptr::null_mut(), fresh, Release, Acquire) {
        Ok(_) => Some(fresh),
        Err(theirs) => {
            // SAFETY: `fresh` lost the race and was never published.
            unsafe { unmap_level(fresh) };
            Some(theirs)
        }
    }
}

impl GranuleMap {
    /// An empty map; it maps nothing until the first insert.
    pub const fn new() -> GranuleMap {
        GranuleMap { root: AtomicPtr::new(std::ptr::null_mut()) }
    }

    /// The entry of `addr` (which [`covers`]), mapping the levels on the
    /// way if `create`; `None` if a level is missing (or the OS refused it).
    #[inline(always)]
    fn entry(&self, addr: usize, create: bool) -> Option<&AtomicU16> {
        // Each step takes a reference to one element, never to a whole level:
        // the same code, but Miri would retag a whole 128 KiB leaf on every lookup.
        let root = level_ptr(&self.root, create)?;
        // SAFETY: `root` is a published root (ROOT_ENTRIES slots, zeroed or
        // published since), and the index is below ROOT_ENTRIES for an
        // address the tree covers (the callers check `covers`).
        let node_slot = unsafe { &*root.cast::<AtomicPtr<Node>>().add(addr >> NODE_SHIFT) };
        let node = level_ptr(node_slot, create)?;
        // SAFETY: as above, a published node; the index is masked.
        let leaf_slot =
            unsafe { &*node.cast::<AtomicPtr<Leaf>>().add((addr >> LEAF_SHIFT) & (NODE_ENTRIES - 1)) };
        let leaf = level_ptr(leaf_slot, create)?;
        // SAFETY: as above, a published leaf; the index is masked.
        Some(unsafe { &*leaf.cast::<AtomicU16>().add((addr >> GRANULE_SHIFT) & (LEAF_ENTRIES - 1)) })
    }

    /// Stores `code` (from [`code`]) for `addr` and returns the entry it
    /// replaced (0: none), or `None` if the OS refused the memory (the caller
    /// keeps the record elsewhere). Caller holds `addr`'s shard lock.
    #[inline(always)]
    pub fn store(&self, addr: usize, code: u16) -> Option<u16> {
        let entry = self.entry(addr, true)?;
        let old = entry.load(Relaxed);
        entry.store(code, Relaxed);
        Some(old)
    }

    /// Clears `addr`'s entry (which [`covers`] it) if `clears` says so of
    /// it, and returns it (0: nothing cleared). Caller holds `addr`'s shard lock.
    #[inline(always)]
    fn clear_if(&self, addr: usize, clears: impl Fn(u16) -> bool) -> u16 {
        let Some(entry) = self.entry(addr, false) else { return 0 };
        let old = entry.load(Relaxed);
        if old == 0 || !clears(old) {
            return 0;
        }
        entry.store(0, Relaxed);
        old
    }

    /// Clears `addr`'s entry (which [`covers`] it) if it is a live record,
    /// and returns that record's entry (0: none; a tombstone stays).
    /// Caller holds `addr`'s shard lock.
    #[inline(always)]
    pub fn take(&self, addr: usize) -> u16 {
        self.clear_if(addr, is_live)
    }

    /// Clears `addr`'s entry (which [`covers`] it), live or a tombstone, and
    /// returns it (0: none). Caller holds `addr`'s shard lock.
    #[inline]
    pub fn clear(&self, addr: usize) -> u16 {
        self.clear_if(addr, |_| true)
    }

    /// Puts a tombstone for `domain` at `addr` (which [`covers`] it) unless
    /// a live record is there; false if the OS refused the memory. Caller
    /// holds `addr`'s shard lock.
    pub fn bury(&self, addr: usize, domain: Domain) -> bool {
        let Some(entry) = self.entry(addr, true) else { return false };
        if !is_live(entry.load(Relaxed)) {
            entry.store(tombstone(domain), Relaxed);
        }
        true
    }

    /// Removes a tombstone at `addr` (which [`covers`] it); a live record
    /// stays. Caller holds `addr`'s shard lock.
    pub fn unbury(&self, addr: usize) {
        self.clear_if(addr, |entry| freed_domain(entry).is_some());
    }

    /// `addr`'s entry (0: none; live or a tombstone). Caller holds `addr`'s shard lock.
    #[inline]
    pub fn get(&self, addr: usize) -> u16 {
        self.entry(addr, false).map_or(0, |entry| entry.load(Relaxed))
    }

    /// The tree's published nodes (for the rare walks: stats and sweeps).
    fn nodes(&self) -> impl Iterator<Item = &Node> {
        level(&self.root).into_iter().flat_map(|root| root.iter().filter_map(level))
    }

    /// Bytes of the tree the OS backs now: the root's and nodes' pages that
    /// hold a pointer, and the leaves' resident pages.
    pub fn resident_bytes(&self) -> usize {
        let Some(root) = level(&self.root) else { return 0 };
        let mut bytes = written_pages(root) * os::OS_PAGE;
        for node in self.nodes() {
            bytes += written_pages(node) * os::OS_PAGE;
            for leaf in node.iter().filter_map(level) {
                bytes += resident(std::ptr::from_ref(leaf).cast_mut().cast(), std::mem::size_of::<Leaf>());
            }
        }
        bytes
    }

    /// Gives every leaf page whose entries are all 0 back to the OS (it reads
    /// as zeros again; pages with a tombstone stay). The caller holds every
    /// shard lock of the block table.
    pub fn discard_empty_pages(&self) {
        for leaf in self.nodes().flat_map(|node| node.iter().filter_map(level)) {
            let base = std::ptr::from_ref(leaf).cast_mut().cast::<u8>();
            // Runs of empty pages, each discarded with one call.
            let mut run_start = None;
            for (i, page) in leaf.chunks(PAGE_ENTRIES).chain([&[][..]]).enumerate() {
                let empty = !page.is_empty() && page.iter().all(|entry| entry.load(Relaxed) == 0);
                match (empty, run_start) {
                    (true, None) => run_start = Some(i),
                    (false, Some(start)) => {
                        // SAFETY: whole pages of a leaf mapping of ours;
                        // with every shard lock held nobody reads or
                        // writes them, and they hold no entry.
                        unsafe { os::discard(base.add(start * os::OS_PAGE), (i - start) * os::OS_PAGE) };
                        run_start = None;
                    }
                    _ => {}
                }
            }
        }
    }

    /// Unmaps the whole tree, so every entry reads 0 again and the memory
    /// goes back to the OS. The caller holds every shard lock of the block
    /// table (so nobody is inside [`GranuleMap::entry`]).
    pub fn unmap_all(&self) {
        let root = self.root.swap(std::ptr::null_mut(), Acquire);
        // SAFETY: unpublished just now, and with every shard lock held nobody
        // holds a reference into the tree.
        unsafe { free_tree(root) };
    }
}

/// Unmaps a tree (null: nothing).
///
/// # Safety
///
/// `root` is null or a root from `map_level` that nobody refers to any more.
unsafe fn free_tree(root: *mut Root) {
    if root.is_null() {
        return;
    }
    // SAFETY: per the contract, a live root mapping that is ours alone.
    let root_ref = unsafe { &*root };
    for node_slot in root_ref.iter() {
        let node = node_slot.load(Acquire);
        if node.is_null() {
            continue;
        }
        // SAFETY: a published node, ours alone with its root.
        for leaf_slot in unsafe { &*node }.iter() {
            let leaf = leaf_slot.load(Acquire);
            if !leaf.is_null() {
                // SAFETY: a published leaf, ours alone, unmapped once.
                unsafe { unmap_level(leaf) };
            }
        }
        // SAFETY: its leaves are gone; nothing refers to it.
        unsafe { unmap_level(node) };
    }
    // SAFETY: its nodes are gone; nothing refers to it.
    unsafe { unmap_level(root) };
}

/// Entries per OS page of a leaf.
const PAGE_ENTRIES: usize = os::OS_PAGE / std::mem::size_of::<AtomicU16>();

/// Pages of an inner level that hold at least one pointer (the ones written).
fn written_pages<T>(level: &[AtomicPtr<T>]) -> usize {
    let per_page = os::OS_PAGE / std::mem::size_of::<AtomicPtr<T>>();
    level.chunks(per_page).filter(|page| page.iter().any(|p| !p.load(Relaxed).is_null())).count()
}

/// Resident bytes of the mapping `[base, base + len)`.
#[cfg(not(miri))]
fn resident(base: *mut u8, len: usize) -> usize {
    const MAX_PAGES: usize = (1 << 18) / os::OS_PAGE;
    let pages = len.div_ceil(os::OS_PAGE);
    let mut vec = [0u8; MAX_PAGES];
    if pages > MAX_PAGES {
        return len;
    }
    // SAFETY: `base..base+len` is one of our mappings, and `vec` has a byte
    // for each of its pages.
    let rc = unsafe { libc::mincore(base.cast(), len, vec.as_mut_ptr()) };
    if rc != 0 {
        return len;
    }
    vec[..pages].iter().filter(|&&b| b & 1 != 0).count() * os::OS_PAGE
}

/// Under Miri (no `mincore`): the whole level.
#[cfg(miri)]
fn resident(_base: *mut u8, len: usize) -> usize {
    len
}

impl Drop for GranuleMap {
    fn drop(&mut self) {
        // SAFETY: `&mut self`: nobody else refers to the tree.
        unsafe { free_tree(*self.root.get_mut()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(size: usize, owner: u32, domain: Domain) -> BlockRecord {
        BlockRecord { size, owner: BucketId::from_index(owner), domain }
    }

    #[test]
    fn codes_round_trip_and_refuse_what_does_not_fit() {
        for domain in Domain::ALL {
            for (size, owner) in [(0, 0), (1, 1), (24, 2), (511, 31)] {
                let r = rec(size, owner, domain);
                let c = code(0x1000, r).expect("fits");
                assert_ne!(c, 0, "an entry is never empty");
                assert_eq!(decode(c), r);
            }
        }
        assert_eq!(code(0x1000, rec(512, 0, Domain::Mem)), None, "too large");
        assert_eq!(code(0x1000, rec(8, 32, Domain::Mem)), None, "owner index too high");
        assert_eq!(code(0x1008, rec(8, 0, Domain::Mem)), None, "not 16-byte aligned");
        assert_eq!(code(1 << ADDRESS_BITS, rec(8, 0, Domain::Mem)), None, "above the tree");
        for domain in Domain::ALL {
            let t = tombstone(domain);
            assert!(t != 0 && !is_live(t));
            assert_eq!(freed_domain(t), Some(domain));
            assert_eq!(freed_domain(code(0x1000, rec(0, 0, domain)).unwrap()), None, "a live record");
        }
        assert_eq!(freed_domain(0), None);
    }

    #[test]
    fn discarding_empty_pages_keeps_every_entry() {
        let map = GranuleMap::new();
        // Three leaf pages' worth of granules: an entry on the first and the
        // third, a tombstone on the second, then the first emptied.
        let page_span = PAGE_ENTRIES << GRANULE_SHIFT;
        let (a, b, c) = (0x40_0000, 0x40_0000 + page_span, 0x40_0000 + 2 * page_span);
        let live = code(a, rec(24, 1, Domain::Object)).unwrap();
        map.store(a, live);
        map.bury(b, Domain::Mem);
        map.store(c, live);
        map.take(a);
        map.discard_empty_pages();
        assert_eq!(map.get(a), 0);
        assert_eq!(freed_domain(map.get(b)), Some(Domain::Mem), "tombstones stay");
        assert_eq!(map.get(c), live, "live entries stay");
        assert_eq!(map.store(a, live), Some(0), "a discarded page is usable again");
    }

    #[test]
    fn tombstones_yield_to_live_records() {
        let map = GranuleMap::new();
        let a = 0x20_0000;
        assert!(map.bury(a, Domain::Mem));
        assert_eq!(freed_domain(map.get(a)), Some(Domain::Mem));
        assert_eq!(map.take(a), 0, "a tombstone is no record");
        assert_eq!(freed_domain(map.get(a)), Some(Domain::Mem), "and stays");
        let live = code(a, rec(40, 1, Domain::Object)).unwrap();
        assert_eq!(map.store(a, live), Some(tombstone(Domain::Mem)));
        assert!(map.bury(a, Domain::Raw));
        assert_eq!(map.get(a), live, "no tombstone over a live record");
        map.unbury(a);
        assert_eq!(map.get(a), live, "unbury leaves a live record");
        assert_eq!(map.take(a), live);
        assert!(map.bury(a, Domain::Raw));
        map.unbury(a);
        assert_eq!(map.get(a), 0);
    }

    #[test]
    fn store_take_get_and_discard() {
        let map = GranuleMap::new();
        let (a, b) = (0x10_0000, 0x10_0010);
        assert_eq!((map.get(a), map.take(a)), (0, 0), "nothing mapped yet");
        let ca = code(a, rec(24, 1, Domain::Object)).unwrap();
        let cb = code(b, rec(100, 2, Domain::Mem)).unwrap();
        assert_eq!(map.store(a, ca), Some(0));
        assert_eq!(map.store(b, cb), Some(0));
        assert_eq!(map.store(a, ca), Some(ca), "the entry it replaces");
        assert_eq!((map.get(a), map.get(b)), (ca, cb));
        assert!(map.resident_bytes() >= 3 * os::OS_PAGE, "root, node and a leaf page");
        assert_eq!(map.take(a), ca);
        assert_eq!(map.take(a), 0);
        map.unmap_all();
        assert_eq!((map.get(b), map.resident_bytes()), (0, 0), "all gone");
        assert_eq!(map.store(b, cb), Some(0), "mapped again on demand");
    }
}
