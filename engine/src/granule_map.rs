//! The block table's store for small blocks: one byte per 16-byte granule
//! of address space, found from the address alone.
//!
//! Most live blocks are small (pymalloc serves up to 512 bytes; a float is
//! 24). A hash table keyed by address spends 16 bytes a slot, about 32 per
//! block at its load factor: more than the block itself. Here a block whose
//! address is 16-byte aligned, whose size is 1 to 511 bytes and whose owner's
//! bucket index is below 32 is a record of one to three bytes at a place
//! computed from its address, with no key stored. Anything else stays in
//! the hash table (`block_table`).
//!
//! # Records
//!
//! A block's record starts at the byte of its first granule and goes on in
//! the bytes of its next granules, which lie inside the block: no other
//! live block starts there, whatever the allocator (live blocks never
//! overlap). So a record needs no more bytes than the granules its block
//! covers:
//!
//! | byte | meaning |
//! |---|---|
//! | `0000_0000` | nothing |
//! | `000t_t000` | a tombstone (below), `tt` = domain + 1 |
//! | `0sss_sodd` | a block of 1-16 bytes (one granule): `ssss` = size - 1, `dd` = domain + 1, `o` = owner bucket (0: no interpreter, 1: the main one) |
//! | `10Lp_pppp` | the start of a block of 17-511 bytes, `L`: 33 or more |
//! | `11pp_pppp` | the rest of that block's record |
//!
//! A 17-32-byte block's record is two bytes holding size - 17 (4 bits), the
//! owner (5) and domain + 1 (2); a larger block's is three, holding its
//! [`code`]'s 16 bits (size 9, owner 5, domain + 1 2). A one-granule block
//! of a subinterpreter goes to the hash table.
//!
//! The continuation tag makes records check themselves: if a record was
//! never cleared because its block's free was missed (the allocator freed
//! it behind the hooks' back) and a new block was recorded over part of it,
//! its start no longer reads as a record, rather than as a wrong one. That
//! missed block's bytes then stay counted, as they would if no block were
//! ever recorded at its address again; and if its start was the part
//! overwritten, its later bytes stay until a block is recorded over them
//! (nothing reads them as a record).
//!
//! The API speaks in *codes*, each record as 16 bits ([`code`],
//! [`decode`], [`tombstone`]); the bytes are this module's business.
//!
//! The checker also leaves a *tombstone* at a freed block's address, so
//! that a second free of it is told from the free of a block allocated
//! before the hooks. A tombstone is not a record: a block recorded there
//! (or over it) later simply replaces it, and lookups of live records pass
//! over it.
//!
//! # Layout
//!
//! A radix tree over the low [`ADDRESS_BITS`] bits of the address: the root
//! (one pointer per 4 GiB), then a node (one pointer per 1 MiB), then a leaf
//! (one byte per 16-byte granule of that MiB: 64 KiB, and two bytes more for
//! the rest of a record that starts in its last granules). Each level is an
//! anonymous zeroed mapping made on the first insert that needs it, so the
//! OS backs a leaf's pages only where blocks were recorded: at most 1/16 of
//! the memory that holds small blocks, and no more than the pages touched.
//!
//! # Concurrency
//!
//! * The tree only grows while the map lives: a missing level is mapped and
//!   published with a compare-and-swap (the loser unmaps its own), and read
//!   with Acquire, so a reader that sees a pointer sees the zeroed level.
//! * A record's bytes are read and written only under the block table's
//!   shard lock for the block's address (every address maps to one shard),
//!   so they need no ordering of their own: they are atomics only because
//!   neighbouring bytes of other shards share their leaf. A record's later
//!   bytes belong to granules inside its block, which nobody else records
//!   while the block lives.
//! * [`GranuleMap::unmap_all`] unmaps the tree; the caller holds every shard
//!   lock, so nobody is inside it. Dropping the map unmaps it too.

use std::sync::atomic::{AtomicPtr, AtomicU8, Ordering::Acquire, Ordering::Relaxed, Ordering::Release};

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
/// A leaf covers 1 MiB (64 KiB of entries), a node 4 GiB.
#[cfg(not(miri))]
const LEAF_SHIFT: u32 = 20;
#[cfg(not(miri))]
const NODE_SHIFT: u32 = 32;
/// Under Miri, smaller levels (a 4 KiB leaf, 1,024 slots a node and a root):
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
/// A code: domain + 1 (2 bits, so a live code is never 0), the owner's
/// bucket index (5 bits), the size (9 bits), from the lowest bit up. A
/// tombstone has domain bits 0 and the freed domain + 1 in the size's.
const OWNER_SHIFT: u32 = 2;
const SIZE_SHIFT: u32 = 7;
/// Owners whose bucket index is below this are kept here; a one-granule
/// block's only if its index is below 2.
const OWNER_LIMIT: u32 = 32;

/// Bytes of a granule and the byte layout of records (see the module docs).
const GRANULE: usize = 1 << GRANULE_SHIFT;
const START: u8 = 0b1000_0000;
const LONG: u8 = 0b0010_0000;
const REST: u8 = 0b1100_0000;

/// Each leaf has two bytes past its last granule's: the rest of a record
/// that starts in one of its last two granules (whose block goes on into
/// the next MiB, where no other block starts), so that every record is
/// three bytes read from one leaf.
const LEAF_BYTES: usize = LEAF_ENTRIES + 2;
/// The bytes a record may take, from its first.
type RecordBytes = [AtomicU8; 3];
type Leaf = [AtomicU8; LEAF_BYTES];
type Node = [AtomicPtr<Leaf>; NODE_ENTRIES];
type Root = [AtomicPtr<Node>; ROOT_ENTRIES];

/// Whether `addr` has a granule here (the hash table holds the others).
#[inline(always)]
pub fn covers(addr: usize) -> bool {
    addr & (GRANULE - 1) == 0 && (addr >> ADDRESS_BITS) == 0
}

/// Bytes of the record of a block of `size` (1 to 511) bytes.
#[cfg(test)]
fn record_len(size: usize) -> usize {
    match size {
        0..=16 => 1,
        17..=32 => 2,
        _ => 3,
    }
}

/// `rec` as a code, if the block at `addr` can live here.
#[inline(always)]
pub fn code(addr: usize, rec: BlockRecord) -> Option<u16> {
    let owner = rec.owner.index();
    let fits = covers(addr)
        && rec.size.wrapping_sub(1) < SMALL_SIZE_LIMIT - 1
        && owner < if rec.size <= GRANULE { 2 } else { OWNER_LIMIT };
    fits.then(|| {
        ((rec.size as u16) << SIZE_SHIFT) | ((owner as u16) << OWNER_SHIFT) | (rec.domain.index() as u16 + 1)
    })
}

/// The checker's mark for a block freed in `domain` whose address the
/// allocator has not handed out since: a code with no live record (its
/// domain bits are 0) and the domain in its size bits. A live code always
/// has its domain bits set ([`is_live`]).
#[inline(always)]
pub fn tombstone(domain: Domain) -> u16 {
    (domain.index() as u16 + 1) << SIZE_SHIFT
}

/// Whether a code holds a live block's record (not empty, not a tombstone).
#[inline(always)]
pub fn is_live(entry: u16) -> bool {
    entry & 3 != 0
}

/// The domain a tombstone says its block was freed in (`None`: not a tombstone).
#[inline]
pub fn freed_domain(entry: u16) -> Option<Domain> {
    if entry == 0 || is_live(entry) {
        return None;
    }
    Domain::from_index(usize::from(entry >> SIZE_SHIFT).wrapping_sub(1))
}

/// The record a live code holds.
#[inline(always)]
pub fn decode(entry: u16) -> BlockRecord {
    BlockRecord {
        size: usize::from(entry >> SIZE_SHIFT),
        owner: BucketId::from_index(u32::from((entry >> OWNER_SHIFT) & (OWNER_LIMIT as u16 - 1))),
        domain: Domain::from_index(usize::from(entry & 3) - 1).unwrap_or(Domain::Raw),
    }
}

/// What a two-byte record holds: its code less this (the size less 17, in 4 bits).
const SHORT_BIAS: u16 = 17 << SIZE_SHIFT;

/// Writes code `c` (a live code from [`code`], or a tombstone) into
/// `bytes` and returns how many it took. The byte layouts:
///
/// * one granule: `0sss_sodd` (`ssss`: size - 1; `o`, `dd`: the code's
///   owner and domain bits); a tombstone: `000s_s000`, the code's size bits;
/// * two: `100p_pppp`, `11pp_pppp`: the 11 bits of the code less [`SHORT_BIAS`];
/// * three: `101p_pppp`, `11pp_pppp`, `11pp_pppp`: the code's 16 bits.
#[inline(always)]
fn write(bytes: &RecordBytes, c: u16) -> usize {
    let size = c >> SIZE_SHIFT;
    if size <= GRANULE as u16 {
        // One granule (or a tombstone: size bits 1 to 3, the rest 0).
        let b0 = if is_live(c) { ((size - 1) << 3) | (c & 7) } else { size << 3 };
        bytes[0].store(b0 as u8, Relaxed);
        return 1;
    }
    if size <= 2 * GRANULE as u16 {
        let v = c - SHORT_BIAS;
        bytes[0].store(START | (v & 31) as u8, Relaxed);
        bytes[1].store(REST | (v >> 5) as u8, Relaxed);
        return 2;
    }
    bytes[0].store(START | LONG | (c & 31) as u8, Relaxed);
    bytes[1].store(REST | ((c >> 5) & 63) as u8, Relaxed);
    bytes[2].store(REST | (c >> 11) as u8, Relaxed);
    3
}

/// What `bytes` hold: the code (0: nothing, or not the start of a whole
/// record) and how many bytes it spans (0: none; a start byte whose record
/// was overwritten spans 1, so that it can be cleared). Only the tags are
/// checked: every overwrite breaks one (see the module docs), and any code
/// decodes to some record.
#[inline(always)]
fn read(bytes: &RecordBytes) -> (u16, usize) {
    let b0 = bytes[0].load(Relaxed);
    if b0 & START == 0 {
        let b0 = u16::from(b0);
        if b0 & 3 != 0 {
            return ((((b0 >> 3) + 1) << SIZE_SHIFT) | (b0 & 7), 1);
        }
        return match b0 {
            0 => (0, 0),
            0x08 | 0x10 | 0x18 => (b0 << (SIZE_SHIFT - 3), 1), // a tombstone
            _ => (0, 1),                                       // never written: clear it
        };
    }
    if b0 & REST == REST {
        return (0, 0); // inside another record
    }
    let b1 = bytes[1].load(Relaxed);
    let v = u16::from(b0 & 31) | (u16::from(b1 & !REST) << 5);
    if b0 & LONG == 0 {
        if b1 & REST != REST {
            return (0, 1); // a record overwritten in part: not a record any more
        }
        return (v + SHORT_BIAS, 2);
    }
    let b2 = bytes[2].load(Relaxed);
    if b1 & b2 & REST != REST {
        return (0, 1);
    }
    (v | (u16::from(b2 & !REST) << 11), 3)
}

/// Writes code `c` (as for [`write`]) over what `bytes` held: a record of
/// `old_len` bytes (from [`read`]), whose bytes past the new one it clears
/// (a longer record replaced here: its block's free was missed).
#[inline(always)]
fn overwrite(bytes: &RecordBytes, old_len: usize, c: u16) {
    let len = write(bytes, c);
    for b in bytes.iter().take(old_len).skip(len) {
        b.store(0, Relaxed);
    }
}

/// Zeroes the first `len` (at most 3) of `bytes`.
#[inline(always)]
fn zero(bytes: &RecordBytes, len: usize) {
    if len > 0 {
        bytes[0].store(0, Relaxed);
        if len > 1 {
            bytes[1].store(0, Relaxed);
            if len > 2 {
                bytes[2].store(0, Relaxed);
            }
        }
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

    /// The bytes a record at `addr` (which [`covers`]) may take, mapping the
    /// levels on the way if `create`; `None` if a level is missing (or the
    /// OS refused it).
    #[inline(always)]
    fn entries(&self, addr: usize, create: bool) -> Option<&RecordBytes> {
        // Each step takes a reference to a few elements, never to a whole level:
        // the same code, but Miri would retag a whole 64 KiB leaf on every lookup.
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
        let index = (addr >> GRANULE_SHIFT) & (LEAF_ENTRIES - 1);
        // SAFETY: as above, a published leaf; the index is masked, and the
        // leaf has two bytes past its last granule's.
        Some(unsafe { &*leaf.cast::<AtomicU8>().add(index).cast::<RecordBytes>() })
    }

    /// Stores `code` (from [`code`], or a tombstone) for `addr` and returns
    /// the code it replaced there (0: none), or `None` if the OS refused the
    /// memory (the caller keeps the record elsewhere). Caller holds `addr`'s shard lock.
    #[inline(always)]
    pub fn store(&self, addr: usize, code: u16) -> Option<u16> {
        let bytes = self.entries(addr, true)?;
        // Nearly always nothing is there.
        let (old, old_len) = if bytes[0].load(Relaxed) == 0 { (0, 0) } else { read(bytes) };
        overwrite(bytes, old_len, code);
        Some(old)
    }

    /// Clears `addr`'s record (which [`covers`] it) if `clears` says so of
    /// its code, and returns the code (0: nothing cleared). Caller holds `addr`'s shard lock.
    #[inline(always)]
    fn clear_if(&self, addr: usize, clears: impl Fn(u16) -> bool) -> u16 {
        let Some(bytes) = self.entries(addr, false) else { return 0 };
        let (old, len) = read(bytes);
        if old == 0 {
            zero(bytes, len); // the start of a record overwritten in part, if anything
            return 0;
        }
        if !clears(old) {
            return 0;
        }
        zero(bytes, len);
        old
    }

    /// Clears `addr`'s record (which [`covers`] it) if it is a live one,
    /// and returns its code (0: none; a tombstone stays).
    /// Caller holds `addr`'s shard lock.
    #[inline(always)]
    pub fn take(&self, addr: usize) -> u16 {
        self.clear_if(addr, is_live)
    }

    /// Clears `addr`'s record (which [`covers`] it), live or a tombstone, and
    /// returns its code (0: none). Caller holds `addr`'s shard lock.
    #[inline]
    pub fn clear(&self, addr: usize) -> u16 {
        self.clear_if(addr, |_| true)
    }

    /// Puts a tombstone for `domain` at `addr` (which [`covers`] it) unless
    /// a live record starts or lies there; false if it did not (a record
    /// lies there, or the OS refused the memory): the caller then remembers
    /// it elsewhere. Caller holds `addr`'s shard lock.
    pub fn bury(&self, addr: usize, domain: Domain) -> bool {
        let Some(bytes) = self.entries(addr, true) else { return false };
        let first = bytes[0].load(Relaxed);
        if first & REST == REST {
            return false; // inside a live block's record
        }
        let (old, old_len) = read(bytes);
        if !is_live(old) {
            overwrite(bytes, old_len, tombstone(domain));
        }
        true
    }

    /// Removes a tombstone at `addr` (which [`covers`] it); a live record
    /// stays. Caller holds `addr`'s shard lock.
    pub fn unbury(&self, addr: usize) {
        self.clear_if(addr, |entry| freed_domain(entry).is_some());
    }

    /// `addr`'s code (0: none; live or a tombstone). Caller holds `addr`'s shard lock.
    #[inline]
    pub fn get(&self, addr: usize) -> u16 {
        self.entries(addr, false).map_or(0, |bytes| read(bytes).0)
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
        for leaf_ptr in self.nodes().flat_map(|node| node.iter().filter_map(|slot| level_ptr(slot, false))) {
            // The mapping's own pointer: its last page goes past the leaf's bytes.
            let base = leaf_ptr.cast::<u8>();
            // SAFETY: a published leaf (see `level`).
            let leaf = unsafe { &*leaf_ptr };
            // Runs of empty pages, each discarded with one call.
            let mut run_start = None;
            for (i, page) in leaf.chunks(PAGE_ENTRIES).chain([&[][..]]).enumerate() {
                let empty = !page.is_empty() && page.iter().all(|entry| entry.load(Relaxed) == 0);
                match (empty, run_start) {
                    (true, None) => run_start = Some(i),
                    (false, Some(start)) => {
                        // SAFETY: whole pages of a leaf mapping of ours
                        // (the size of a leaf, rounded up to pages); with
                        // every shard lock held nobody reads or writes
                        // them, and they hold no entry.
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
const PAGE_ENTRIES: usize = os::OS_PAGE / std::mem::size_of::<AtomicU8>();

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

    impl GranuleMap {
        /// The bytes of every leaf.
        fn leaf_bytes(&self) -> impl Iterator<Item = u8> + '_ {
            let leaves = self.nodes().flat_map(|node| node.iter().filter_map(level));
            leaves.flat_map(|leaf| leaf.iter().map(|b| b.load(Relaxed)))
        }

        /// Bytes of the leaves that are not 0.
        fn written_bytes(&self) -> usize {
            self.leaf_bytes().filter(|&b| b != 0).count()
        }
    }

    fn rec(size: usize, owner: u32, domain: Domain) -> BlockRecord {
        BlockRecord { size, owner: BucketId::from_index(owner), domain }
    }

    #[test]
    fn codes_round_trip_and_refuse_what_does_not_fit() {
        for domain in Domain::ALL {
            for (size, owner) in [(1, 0), (16, 1), (17, 2), (24, 2), (32, 31), (33, 0), (511, 31)] {
                let r = rec(size, owner, domain);
                let c = code(0x1000, r).expect("fits");
                assert_ne!(c, 0, "an entry is never empty");
                assert_eq!(decode(c), r);
            }
        }
        assert_eq!(code(0x1000, rec(512, 0, Domain::Mem)), None, "too large");
        assert_eq!(code(0x1000, rec(0, 0, Domain::Mem)), None, "empty");
        assert_eq!(code(0x1000, rec(40, 32, Domain::Mem)), None, "owner index too high");
        assert_eq!(code(0x1000, rec(16, 2, Domain::Mem)), None, "one granule: owner 0 or 1 only");
        assert_eq!(code(0x1008, rec(8, 0, Domain::Mem)), None, "not 16-byte aligned");
        assert_eq!(code(1 << ADDRESS_BITS, rec(8, 0, Domain::Mem)), None, "above the tree");
        for domain in Domain::ALL {
            let t = tombstone(domain);
            assert!(t != 0 && !is_live(t));
            assert_eq!(freed_domain(t), Some(domain));
            assert_eq!(freed_domain(code(0x1000, rec(1, 0, domain)).unwrap()), None, "a live record");
        }
        assert_eq!(freed_domain(0), None);
    }

    /// Every record that fits goes through its bytes and back unchanged,
    /// spanning no more granules than its block.
    #[test]
    #[cfg_attr(miri, ignore = "1,500 records; codes_round_trip... covers the code under Miri")]
    fn every_record_reads_back_from_its_bytes() {
        for domain in Domain::ALL {
            for size in 1..SMALL_SIZE_LIMIT {
                for owner in [0, 1, 2, 17, 31] {
                    let Some(c) = code(0x1000, rec(size, owner, domain)) else {
                        assert!(size <= 16 && owner >= 2, "{size} {owner}");
                        continue;
                    };
                    let cells: RecordBytes = Default::default();
                    let len = write(&cells, c);
                    assert_eq!(len, record_len(size));
                    assert!((len - 1) * 16 < size, "inside the block");
                    assert!(cells[len..].iter().all(|b| b.load(Relaxed) == 0), "no more than it says");
                    assert_eq!(read(&cells), (c, len), "{size} {owner} {domain:?}");
                    assert_eq!(decode(c), rec(size, owner, domain));
                }
            }
        }
    }

    /// A block that starts in a leaf's last granule and goes on into the
    /// next MiB keeps its whole record in its own leaf.
    #[test]
    fn records_at_a_leafs_end_stay_in_their_leaf() {
        let map = GranuleMap::new();
        let next_leaf = 0x50_0000;
        let last = next_leaf - 16;
        let long = code(last, rec(300, 3, Domain::Object)).unwrap();
        assert_eq!(map.store(last, long), Some(0));
        assert_eq!(map.get(last), long);
        assert_eq!(map.get(next_leaf), 0, "the next MiB's first granule (inside the block) holds nothing");
        let short = code(last - 16, rec(14, 1, Domain::Mem)).unwrap();
        assert_eq!(map.store(last - 16, short), Some(0), "a neighbour");
        assert_eq!((map.take(last), map.take(last - 16)), (long, short));
        assert_eq!(map.written_bytes(), 0, "every byte was cleared, the two past the leaf's too");
        map.discard_empty_pages();
        if !cfg!(miri) {
            assert_eq!(map.resident_bytes(), 2 * os::OS_PAGE, "root and node only: the leaf went back");
        }
    }

    /// Blocks side by side keep their own records; a record overwritten in
    /// part by a block recorded inside it (its free missed) reads as none,
    /// never as a wrong one, and clearing it leaves the page empty.
    #[test]
    fn neighbours_and_overwritten_records() {
        let map = GranuleMap::new();
        let base = 0x30_0000;
        let tiny = code(base, rec(16, 1, Domain::Object)).unwrap();
        let short = code(base + 16, rec(24, 1, Domain::Mem)).unwrap();
        let long = code(base + 48, rec(100, 7, Domain::Raw)).unwrap();
        let next = code(base + 160, rec(5, 0, Domain::Mem)).unwrap();
        for (addr, c) in [(base, tiny), (base + 16, short), (base + 48, long), (base + 160, next)] {
            assert_eq!(map.store(addr, c), Some(0));
        }
        for (addr, c) in [(base, tiny), (base + 16, short), (base + 48, long), (base + 160, next)] {
            assert_eq!(map.get(addr), c);
        }
        assert_eq!(map.get(base + 32), 0, "inside a record is no record");
        assert_eq!(map.take(base + 64), 0);
        assert_eq!(map.get(base + 48), long, "taking inside it leaves it");
        // The allocator reused the middle of `long` without its free: the
        // new block's record replaces part of it.
        let inner = code(base + 64, rec(40, 1, Domain::Object)).unwrap();
        assert_eq!(map.store(base + 64, inner), Some(0), "nothing started there");
        assert_eq!(map.get(base + 48), 0, "the old record is gone, not wrong");
        assert_eq!(map.get(base + 64), inner);
        assert_eq!(map.take(base + 48), 0);
        // A shorter record replacing a longer one at its address clears the rest.
        let shorter = code(base + 16, rec(10, 0, Domain::Raw)).unwrap();
        assert_eq!(map.store(base + 16, shorter), Some(short));
        for addr in [base, base + 16, base + 64, base + 160] {
            assert!(is_live(map.take(addr)));
        }
        assert_eq!(map.written_bytes(), 0, "every byte was cleared");
        map.discard_empty_pages();
        if !cfg!(miri) {
            assert_eq!(map.resident_bytes(), 2 * os::OS_PAGE, "root and node only: the leaf went back");
        }
        // No tombstone inside a live record.
        assert_eq!(map.store(base + 48, long), Some(0));
        assert!(!map.bury(base + 64, Domain::Raw), "inside a live block");
        assert_eq!(map.get(base + 48), long);
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
        let (a, b) = (0x10_0000, 0x10_0020);
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

    /// Records stored over each other in any order (blocks whose frees were
    /// missed), across a leaf's end: a lookup gives the code last stored at
    /// that address or nothing, never another; a record that no later one
    /// overlapped reads back exactly; what taking every record leaves is
    /// only the rest of records whose start was overwritten.
    mod overwrites {
        use super::*;
        use proptest::prelude::*;
        use std::collections::HashMap;

        /// Granules from `BASE` a record may start at (across a leaf's end).
        const SPAN: usize = 48;
        const BASE: usize = 0x60_0000 - 24 * GRANULE;

        proptest! {
            #![proptest_config(ProptestConfig {
                cases: if cfg!(miri) { 4 } else { 512 },
                failure_persistence: None,
                ..ProptestConfig::default()
            })]

            #[test]
            fn a_record_reads_back_exactly_or_not_at_all(
                ops in proptest::collection::vec((0..SPAN, 1..SMALL_SIZE_LIMIT, 0u32..32, any::<bool>()), 1..80),
            ) {
                let map = GranuleMap::new();
                // Address -> (code last stored there, whether no later record overlapped it).
                let mut model: HashMap<usize, (u16, bool)> = HashMap::new();
                for &(granule, size, owner, take) in &ops {
                    let addr = BASE + granule * GRANULE;
                    if take {
                        let got = map.take(addr);
                        match model.remove(&addr) {
                            Some((c, true)) => prop_assert_eq!(got, c),
                            Some((c, false)) => prop_assert!(got == 0 || got == c, "{got:#x} for {c:#x}"),
                            None => prop_assert_eq!(got, 0),
                        }
                        continue;
                    }
                    let r = rec(size, owner, Domain::ALL[owner as usize % Domain::COUNT]);
                    let Some(c) = code(addr, r) else { continue };
                    for (&a, entry) in model.iter_mut() {
                        if a != addr && a < addr + size && addr < a + decode(entry.0).size {
                            entry.1 = false;
                        }
                    }
                    let old = map.store(addr, c).expect("mapped");
                    match model.insert(addr, (c, true)) {
                        Some((o, true)) => prop_assert_eq!(old, o),
                        Some((o, false)) => prop_assert!(old == 0 || old == o, "{old:#x} for {o:#x}"),
                        None => prop_assert_eq!(old, 0),
                    }
                }
                for granule in 0..SPAN + 2 {
                    let addr = BASE + granule * GRANULE;
                    let got = map.get(addr);
                    match model.get(&addr) {
                        Some(&(c, true)) => prop_assert_eq!(got, c),
                        Some(&(c, false)) => prop_assert!(got == 0 || got == c),
                        None => prop_assert_eq!(got, 0, "nothing at {:#x}", addr),
                    }
                }
                for &addr in model.keys() {
                    map.take(addr);
                }
                let only_rests = map.leaf_bytes().all(|b| b == 0 || b & REST == REST);
                prop_assert!(only_rests);
            }
        }
    }
}
