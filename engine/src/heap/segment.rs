//! The layout of a segment: a header, then pages of blocks.
//!
//! A normal segment is [`SEGMENT_SIZE`] bytes cut into [`SLOTS`] slots of
//! [`SLOT_SIZE`] (16 KiB, so that a page with a few live blocks keeps little
//! memory resident). Slot 0 holds the [`Segment`] header; a page spans
//! one or more of the other slots. Every slot has a [`Page`] descriptor in the
//! header; all slots of a page name the page's first slot, so a pointer anywhere
//! in a page finds the page's descriptor in O(1): mask to the segment, shift to
//! the slot, read its `first`.
//!
//! A huge segment holds one block, at [`HUGE_BLOCK_OFFSET`], described by
//! `pages[0]`; it is as long as the block needs (a multiple of the OS page).
//!
//! Every field is plain (not atomic) and belongs to the heap that owns the
//! segment, under the rules written on `Heap`: the owner changes them; other
//! threads read only `Segment::heap`, `Segment::kind` and a page's
//! `block_size` and `class`, which do not change while a block of the page is
//! live.

use std::cell::Cell;
use std::ptr;

use super::os::{SEGMENT_MASK, SEGMENT_SIZE};
use super::Heap;

/// log2 of the slot size.
pub const SLOT_SHIFT: usize = 14;
/// Slot size: 16 KiB.
pub const SLOT_SIZE: usize = 1 << SLOT_SHIFT;
/// Slots per normal segment (slot 0 is the header).
pub const SLOTS: usize = SEGMENT_SIZE / SLOT_SIZE;
/// `free_slots` of a segment with every page slot free.
pub const ALL_SLOTS_FREE: u64 = !1;

/// A free block: its first word links the free list.
#[repr(C)]
pub struct Block {
    pub next: *mut Block,
}

/// Kind of segment.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum SegmentKind {
    /// Slots holding pages.
    Normal,
    /// One huge block.
    Huge,
}

/// Descriptor of a page (or of a slot inside a page: see `first`).
///
/// 64 bytes (one cache line), so that finding a slot's descriptor is a shift.
#[repr(C, align(64))]
pub struct Page {
    /// Free blocks of this page (owner only).
    pub free: Cell<*mut Block>,
    /// Next never-handed-out block (bump allocation of fresh pages).
    pub bump: Cell<*mut u8>,
    /// Where the slack entries' index counts from (see [`Page::slack`]):
    /// in a paged page of a heap that keeps requested sizes, the end of its
    /// blocks less the first block's index times the entries' width (an
    /// address outside the page, used only with an index added); in any
    /// other page, the end of its blocks ([`Page::end_addr`]).
    pub slack_base: Cell<*mut u8>,
    /// Block size; for large and huge blocks the usable size. 0 while the page is unused.
    pub block_size: Cell<usize>,
    /// Blocks handed out and not yet given back to this page.
    pub used: Cell<u32>,
    /// Size class, or `LARGE_CLASS` / `HUGE_CLASS`.
    pub class: Cell<u8>,
    /// Slots the page spans.
    pub span: Cell<u8>,
    /// The page's first slot (every slot of a page names it).
    pub first: Cell<u8>,
    /// Whether the page is in its heap's queue of pages with free blocks.
    pub queued: Cell<bool>,
    /// Neighbours in the heap's queue for this class.
    pub next: Cell<*mut Page>,
    pub prev: Cell<*mut Page>,
    /// Byte offset from the segment's base to the descriptor of the page's
    /// first slot: `first` premultiplied, so that [`page_of`] is one load and
    /// one add (the free fast path).
    head: Cell<u16>,
    /// Whether a free of one of its blocks may take the free fast path
    /// ([`free_fast`](super::free::free_fast)): the page is queued and, in
    /// a heap that keeps requested sizes, its slack entries are bytes (so
    /// that path reads one with no test of the width). Set with `queued`,
    /// by [`Page::set_queued`].
    pub fast_free: Cell<bool>,
    /// In a heap that keeps requested sizes (0 in any other heap): for a
    /// paged page, the reciprocal that turns a block's distance from `end`
    /// into its index in the slack array (see [`Page::slack`]); for a large
    /// or huge block, its slack itself.
    pub slack_key: Cell<u32>,
}

/// Block sizes up to this keep their slack in one byte, larger ones in two.
/// Classes up to 2 KiB are at most 256 bytes apart, so a block handed out
/// for a request has a slack below 256; realloc keeps a block for a smaller
/// size only if the new slack fits ([`Page::slack_fits`]). Every direct size
/// (the allocation fast path) is below it, so that path writes a byte with
/// no test of the width.
pub const SLACK_BYTE_MAX: usize = 2048;

// Requested sizes: a paged page of a heap that keeps them has, right after
// its last block, one slack entry (block size minus requested size) per
// block: a `u8` for blocks up to [`SLACK_BYTE_MAX`], else a `u16`. A block's
// entry is found from its address alone, with one multiply: its index is
// `h(block) = (block * slack_key mod 2^64) >> 32`, at `slack_base + width *
// h(block)`. With `slack_key` at least `2^32 / block_size + 1` (and less
// than 4,096 above it), `h` of the page's `k`-th block is `h(first) + k`
// or one more, one step up at most once in the page (a page is below 1
// MiB, so the multiply's error stays below one part in 4,096 of a step):
// the `capacity + 1` entries after the last block hold every block's, and
// no two share one. `slack_key` is the smallest such key for which no
// index of the page passes 2^32 (`Page::slack_layout`), and `slack_base`
// is the end of the blocks less `width * h(first)`. Entries are written by
// the owner when it hands a block out and read when the block is freed:
// whoever frees a block received it after its allocation, so the entry is
// as ordered as the block's contents are.

/// `u16` slack entry `m` of the array at `base` (blocks above
/// [`SLACK_BYTE_MAX`]), out of line so that the small blocks' path has no
/// jump around it.
///
/// # Safety
///
/// As for [`Page::set_slack`].
#[cold]
unsafe fn set_wide_slack(base: *mut u8, m: usize, slack: usize) {
    // SAFETY: per the contract, an entry of the page's array: `base` is
    // 16-aligned, less an even number of bytes.
    unsafe { *(base.wrapping_add(2 * m) as *mut u16) = slack as u16 };
}

/// Reads what [`set_wide_slack`] wrote.
///
/// # Safety
///
/// As for [`Page::slack`].
#[cold]
unsafe fn wide_slack(base: *mut u8, m: usize) -> usize {
    // SAFETY: as for set_wide_slack.
    unsafe { *(base.wrapping_add(2 * m) as *const u16) as usize }
}

impl Page {
    /// Bytes per slack entry for blocks of `block_size`.
    #[inline(always)]
    pub const fn slack_width(block_size: usize) -> usize {
        if block_size <= SLACK_BYTE_MAX {
            1
        } else {
            2
        }
    }

    /// Blocks of `block_size` that fit in `bytes` with their slack entries
    /// (`capacity + 1` entries: see `slack_index`).
    pub const fn capacity_with_slack(bytes: usize, block_size: usize) -> usize {
        let width = Self::slack_width(block_size);
        (bytes - width) / (block_size + width)
    }

    /// The `slack_key` of a paged page of `block_size` (at least 16).
    pub const fn slack_reciprocal(block_size: usize) -> u32 {
        ((1u64 << 32) / block_size as u64 + 1) as u32
    }

    /// `h` of the block at `addr` under `key` (see the notes above `set_wide_slack`).
    #[inline(always)]
    const fn slack_hash(addr: usize, key: u32) -> usize {
        ((addr as u64).wrapping_mul(key as u64) >> 32) as usize
    }

    /// The `slack_key` and `slack_base` of a paged page of `block_size`
    /// whose `capacity` blocks start at `first` and end at `end`.
    pub fn slack_layout(first: *mut u8, end: *mut u8, capacity: usize, block_size: usize) -> (u32, *mut u8) {
        let reciprocal = Self::slack_reciprocal(block_size);
        let (mut key, mut first_index) = (reciprocal, Self::slack_hash(first.addr(), reciprocal));
        // Nearly always the first key: an index passes 2^32 in about one
        // page in 2^32 / capacity.
        while first_index + capacity >= u32::MAX as usize {
            key += 1;
            first_index = Self::slack_hash(first.addr(), key);
        }
        debug_assert!(key - reciprocal < 4096, "the index stays exact");
        (key, end.wrapping_sub(Self::slack_width(block_size) * first_index))
    }

    /// Index of `block`'s slack entry, from `slack_base`, in entries.
    ///
    /// # Safety
    ///
    /// The page is a paged page of a heap that keeps requested sizes, and
    /// `block` one of its blocks.
    #[inline(always)]
    fn slack_index(&self, block: *const u8) -> usize {
        Self::slack_hash(block.addr(), self.slack_key.get())
    }

    /// The end of the page's blocks (where the slack entries of a heap that
    /// keeps requested sizes start), from its first slot, span and block
    /// size: for the slow paths (the descriptor keeps `slack_base`).
    /// `self` is the descriptor of a paged page's first slot.
    pub fn end_addr(&self) -> usize {
        let seg = ptr::from_ref(self).addr() & !(SEGMENT_SIZE - 1);
        let start = seg + ((self.first.get() as usize) << SLOT_SHIFT);
        let (bytes, size) = (self.span.get() as usize * SLOT_SIZE, self.block_size.get());
        let capacity =
            if self.slack_key.get() == 0 { bytes / size } else { Self::capacity_with_slack(bytes, size) };
        start + capacity * size
    }

    /// Records `block`'s slack.
    ///
    /// # Safety
    ///
    /// The page is a paged page of a heap that keeps requested sizes, and
    /// `block` one of its blocks; the caller may write the entry (it owns
    /// the heap, or holds the block), and `slack` fits its width.
    #[inline(always)]
    pub unsafe fn set_slack(&self, block: *const u8, slack: usize) {
        // SAFETY: per the contract.
        unsafe { self.set_slack_as::<false>(block, slack) }
    }

    /// [`set_slack`](Self::set_slack) for a caller that knows (`NARROW`)
    /// that the page's block size is at most [`SLACK_BYTE_MAX`].
    ///
    /// # Safety
    ///
    /// As for `set_slack`; if `NARROW`, the block size is at most `SLACK_BYTE_MAX`.
    #[inline(always)]
    pub unsafe fn set_slack_as<const NARROW: bool>(&self, block: *const u8, slack: usize) {
        debug_assert!(!NARROW || self.block_size.get() <= SLACK_BYTE_MAX);
        let (base, m) = (self.slack_base.get(), self.slack_index(block));
        // SAFETY: per the contract, the entry lies in the page's slack
        // array; u16 entries are 2-aligned (`end` is 16-aligned).
        unsafe {
            if NARROW || self.block_size.get() <= SLACK_BYTE_MAX {
                *base.wrapping_add(m) = slack as u8;
            } else {
                set_wide_slack(base, m, slack);
            }
        }
    }

    /// `block`'s slack, as recorded at its allocation (`NARROW`: as for
    /// [`set_slack_as`](Self::set_slack_as)).
    ///
    /// # Safety
    ///
    /// As for `set_slack_as`; the block is live.
    #[inline(always)]
    pub unsafe fn slack<const NARROW: bool>(&self, block: *const u8) -> usize {
        debug_assert!(!NARROW || self.block_size.get() <= SLACK_BYTE_MAX);
        let (base, m) = (self.slack_base.get(), self.slack_index(block));
        // SAFETY: as for set_slack.
        unsafe {
            if NARROW || self.block_size.get() <= SLACK_BYTE_MAX {
                *base.wrapping_add(m) as usize
            } else {
                wide_slack(base, m)
            }
        }
    }

    /// The size `block` was asked for: its block size minus its slack, in a
    /// heap that keeps requested sizes (`requested`), else its block size.
    ///
    /// # Safety
    ///
    /// `block` is a live block of this page; `requested` says whether its heap keeps requested sizes.
    #[inline(always)]
    pub unsafe fn requested_size(&self, block: *const u8, requested: bool) -> usize {
        // SAFETY: per the contract.
        unsafe { self.requested_size_as::<false>(block, requested) }
    }

    /// [`requested_size`](Self::requested_size) for a caller that knows
    /// (`NARROW`) that the page's block size is at most [`SLACK_BYTE_MAX`].
    ///
    /// # Safety
    ///
    /// As for `requested_size`; if `NARROW`, the block size is at most `SLACK_BYTE_MAX`.
    #[inline(always)]
    pub unsafe fn requested_size_as<const NARROW: bool>(&self, block: *const u8, requested: bool) -> usize {
        let size = self.block_size.get();
        if !requested {
            return size;
        }
        let slack = if self.class.get() as usize >= super::size_class::PAGED_CLASSES {
            self.slack_key.get() as usize
        } else {
            // SAFETY: per the contract, a paged block of a heap that keeps requested sizes.
            unsafe { self.slack::<NARROW>(block) }
        };
        size - slack
    }

    /// Whether `slack` can be recorded for a block of this page.
    pub fn slack_fits(&self, slack: usize) -> bool {
        if self.class.get() as usize >= super::size_class::PAGED_CLASSES {
            slack <= u32::MAX as usize
        } else {
            slack < 1 << (8 * Self::slack_width(self.block_size.get()))
        }
    }
}

impl Page {
    /// Puts the page in its heap's queue or takes it out (the flag only;
    /// the caller links it), and says whether its frees may take the fast
    /// path (see [`Page::fast_free`]).
    #[inline]
    pub fn set_queued(&self, queued: bool) {
        self.queued.set(queued);
        // slack_key is 0 in a heap that does not keep requested sizes.
        let narrow = self.slack_key.get() == 0 || self.block_size.get() <= SLACK_BYTE_MAX;
        self.fast_free.set(queued && narrow);
    }

    /// A page with no blocks (not in any segment).
    pub const fn empty() -> Page {
        Page {
            free: Cell::new(ptr::null_mut()),
            bump: Cell::new(ptr::null_mut()),
            slack_base: Cell::new(ptr::null_mut()),
            block_size: Cell::new(0),
            used: Cell::new(0),
            class: Cell::new(0),
            span: Cell::new(0),
            first: Cell::new(0),
            queued: Cell::new(false),
            fast_free: Cell::new(false),
            next: Cell::new(ptr::null_mut()),
            prev: Cell::new(ptr::null_mut()),
            head: Cell::new(0),
            slack_key: Cell::new(0),
        }
    }

    /// Records that this slot belongs to the page starting at slot `first`.
    #[inline]
    pub fn set_first(&self, first: usize) {
        self.first.set(first as u8);
        self.head.set((std::mem::offset_of!(Segment, pages) + first * std::mem::size_of::<Page>()) as u16);
    }
}

/// Header at the start of every segment.
#[repr(C)]
pub struct Segment {
    /// The heap that owns every block of this segment (fixed for the segment's life).
    pub heap: *const Heap,
    pub kind: SegmentKind,
    /// Bytes mapped at the segment's base.
    pub map_size: usize,
    /// Bit i set when slot i is free (normal segments; bit 0 is the header, never free).
    pub free_slots: Cell<u64>,
    /// Neighbours in the owning heap's list of normal segments (or, while
    /// entirely free and retained, its list of those: `next` only).
    pub next: Cell<*mut Segment>,
    pub prev: Cell<*mut Segment>,
    /// When the segment became entirely free (`os::now_nanos`), while retained.
    pub freed_at: Cell<u64>,
    pub pages: [Page; SLOTS],
}

/// Offset of a huge segment's block: the header, rounded up to a 4 KiB page.
pub const HUGE_BLOCK_OFFSET: usize = (std::mem::size_of::<Segment>() + 4095) & !4095;

const _: () = assert!(std::mem::size_of::<Segment>() <= SLOT_SIZE, "the header must fit slot 0");
const _: () = assert!(std::mem::size_of::<Page>() == 64, "a page descriptor is one cache line");
const _: () = assert!(std::mem::size_of::<Segment>() <= u16::MAX as usize, "page heads fit a u16");

/// The segment containing `p` (with `p`'s provenance: a pointer into a
/// segment reaches its header).
#[inline(always)]
pub fn segment_of(p: *const u8) -> *mut Segment {
    p.map_addr(|a| a & !SEGMENT_MASK).cast_mut().cast::<Segment>()
}

/// The descriptor of the page containing `p`.
///
/// # Safety
///
/// `p` must lie in a live segment of ours whose slot holding `p` belongs to a page.
#[inline(always)]
pub unsafe fn page_of(seg: *mut Segment, p: *const u8) -> *mut Page {
    let slot = (p.addr() - seg.addr()) >> SLOT_SHIFT;
    // SAFETY: `slot < SLOTS` because `p` lies in the segment's first SEGMENT_SIZE bytes
    // (huge blocks are looked up by their first byte, in slot 0), and the
    // header is live while the segment is.
    unsafe {
        let pages = ptr::addr_of_mut!((*seg).pages) as *mut Page;
        let head = (*pages.add(slot)).head.get() as usize;
        (seg as *mut u8).add(head) as *mut Page
    }
}

/// Address of slot `slot` of `seg`.
#[inline(always)]
pub fn slot_address(seg: *mut Segment, slot: usize) -> *mut u8 {
    seg.cast::<u8>().wrapping_add(slot << SLOT_SHIFT)
}

/// Index of the first run of `span` free slots in `free`, if any.
#[inline]
pub fn find_free_run(free: u64, span: usize) -> Option<usize> {
    let mut run = free;
    for shift in 1..span {
        run &= free >> shift;
        if run == 0 {
            return None;
        }
    }
    (run != 0).then(|| run.trailing_zeros() as usize)
}

/// Bit mask of `span` slots starting at `first`.
#[inline]
pub fn slot_mask(first: usize, span: usize) -> u64 {
    let ones = if span >= 64 { u64::MAX } else { (1u64 << span) - 1 };
    ones << first
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_runs() {
        assert_eq!(find_free_run(ALL_SLOTS_FREE, 1), Some(1));
        assert_eq!(find_free_run(ALL_SLOTS_FREE, 63), Some(1));
        assert_eq!(find_free_run(ALL_SLOTS_FREE, 64), None);
        assert_eq!(find_free_run(0b1011_0110, 2), Some(1));
        assert_eq!(find_free_run(0b1011_0110, 3), None);
        assert_eq!(find_free_run(0, 1), None);
        assert_eq!(slot_mask(3, 2), 0b11000);
        assert_eq!(slot_mask(0, 64), u64::MAX);
    }

    /// Every block of a page of every class has its own slack entry among
    /// the `capacity + 1` after the last block, wherever the page starts,
    /// including where an index of the page would pass 2^32 under the
    /// first key (the layout then takes the next).
    #[test]
    #[cfg_attr(miri, ignore = "arithmetic only, over every block of 60 classes' pages")]
    fn every_block_has_its_own_slack_entry() {
        use super::super::size_class::{class_size, page_slots, PAGED_CLASSES};
        let mut bumped = 0;
        for class in 0..PAGED_CLASSES {
            let size = class_size(class);
            let capacity = Page::capacity_with_slack(page_slots(class) * SLOT_SIZE, size);
            let reciprocal = Page::slack_reciprocal(size);
            // A page whose last index passes 2^32 under the reciprocal.
            let wrapping = ((((1u128 << 32) - 1 - capacity as u128 / 2) << 32) / reciprocal as u128) as usize;
            // Pages where the index takes its extra step (or would lose one)
            // between two blocks: the product's low half is near 2^32 or 0.
            let steps = (0..1usize << 20).map(|j| 0x7f00_0000_0000 + j * 16).filter(|&start| {
                let low = (start as u64).wrapping_mul(reciprocal as u64) as u32 as u64;
                let reach = (capacity * size) as u64;
                low < reach || low > (1 << 32) - reach
            });
            let starts =
                [0x10_0000 + SLOT_SIZE, 0x7f12_3456_c000, 0x5555_0000_4000, wrapping, wrapping & !15];
            for start in starts.into_iter().chain(steps.take(8)) {
                let first = start as *mut u8;
                let end = first.wrapping_add(capacity * size);
                let (key, base) = Page::slack_layout(first, end, capacity, size);
                bumped += usize::from(key != reciprocal);
                let width = Page::slack_width(size);
                let mut taken = vec![false; capacity + 1];
                for k in 0..capacity {
                    let entry = base.wrapping_add(width * Page::slack_hash(start + k * size, key));
                    let offset = entry.addr().wrapping_sub(end.addr()) / width;
                    assert!(offset <= capacity, "class {class} start {start:#x} block {k}: entry {offset}");
                    assert!(
                        !taken[offset],
                        "class {class} start {start:#x} block {k}: entry {offset} shared"
                    );
                    taken[offset] = true;
                }
            }
        }
        assert!(bumped >= PAGED_CLASSES, "the wrapping starts took another key ({bumped})");
    }

    #[test]
    fn huge_offset_is_page_aligned_and_leaves_room() {
        assert_eq!(HUGE_BLOCK_OFFSET % 4096, 0);
        assert!(HUGE_BLOCK_OFFSET >= std::mem::size_of::<Segment>());
    }
}
