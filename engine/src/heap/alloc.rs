//! Allocation, by the heap's owner: the fast paths (a block from the current
//! page of the size's class), the slow paths that move to the next page with
//! free blocks or start one, large and huge blocks, `calloc` and `realloc`.

use std::ptr;

use super::free::free;
use super::heap::{add_serial, heap_of, usable_size, Heap, Realloc};
use super::os::{self, OS_PAGE};
use super::segment::{
    page_of, segment_of, slot_address, slot_mask, Block, Page, Segment, SegmentKind, HUGE_BLOCK_OFFSET,
    SLOTS, SLOT_SIZE,
};
use super::size_class::{
    class_of, class_size, direct_index, HUGE_CLASS, LARGE_CLASS, MAX_DIRECT_SIZE, MAX_LARGE_SIZE,
    MAX_PAGED_SIZE,
};

// The direct path writes a block's slack as a byte with no test of the width.
const _: () = assert!(MAX_DIRECT_SIZE <= super::segment::SLACK_BYTE_MAX);

/// Most address space a huge block's mapping reserves beyond the block for
/// growing in place (half the block, up to this).
const HUGE_GROWTH_RESERVE: usize = 64 << 20;

impl Heap {
    /// Allocates `size` bytes, 16-byte aligned; null if the OS refuses memory.
    ///
    /// # Safety
    ///
    /// The caller is the heap's owner (see the type docs).
    #[inline(always)]
    pub unsafe fn alloc(&self, size: usize) -> *mut u8 {
        // SAFETY: the caller is the owner; the mode is the heap's.
        unsafe {
            if self.requested {
                self.alloc_as::<true>(size)
            } else {
                self.alloc_as::<false>(size)
            }
        }
    }

    /// [`alloc`](Self::alloc) for a caller that knows whether the heap keeps
    /// requested sizes (`REQUESTED`): the fast path then tests nothing for it.
    ///
    /// # Safety
    ///
    /// The caller is the heap's owner, and `REQUESTED` is
    /// [`keeps_requested_sizes`](Self::keeps_requested_sizes).
    #[inline(always)]
    pub unsafe fn alloc_as<const REQUESTED: bool>(&self, size: usize) -> *mut u8 {
        debug_assert_eq!(REQUESTED, self.requested);
        if size <= MAX_DIRECT_SIZE {
            // SAFETY: the caller is the owner; the index is < DIRECT_SLOTS,
            // and an entry is a live page of ours or EMPTY_PAGE.
            let page = unsafe { &**self.local().direct.get_unchecked(direct_index(size)) };
            // SAFETY: as above; a page with a free block is a live paged page
            // of ours, for a direct size: its blocks are at most SLACK_BYTE_MAX.
            let block =
                unsafe { self.take_free_block::<REQUESTED, true>(page, page.class.get() as usize, size) };
            if !block.is_null() {
                return block;
            }
            // SAFETY: the caller is the owner.
            unsafe { self.alloc_paged_slow(class_of(size), size) }
        } else {
            // SAFETY: the caller is the owner.
            unsafe { self.alloc_beyond_direct(size) }
        }
    }

    /// [`alloc`](Self::alloc) above `MAX_DIRECT_SIZE`: kept out of line so
    /// that the direct path has its own (shortest) code; C ABI (cannot
    /// unwind), so that the call to it is a tail call.
    ///
    /// # Safety
    ///
    /// The caller is the owner.
    #[inline(never)]
    unsafe extern "C" fn alloc_beyond_direct(&self, size: usize) -> *mut u8 {
        if size <= MAX_PAGED_SIZE {
            let class = class_of(size);
            // SAFETY: the caller is the owner, and `class < PAGED_CLASSES` for sizes up to MAX_PAGED_SIZE.
            let page = unsafe { *self.local().bins.get_unchecked(class) };
            if !page.is_null() {
                // SAFETY: a queued page is live and belongs to this heap, which we own.
                let block = unsafe { self.take_free_block_here(&*page, class, size) };
                if !block.is_null() {
                    return block;
                }
            }
            // SAFETY: the caller is the owner.
            unsafe { self.alloc_paged_slow(class, size) }
        } else {
            // SAFETY: the caller is the owner.
            unsafe { self.alloc_large(size) }
        }
    }

    /// `take_free_block` in this heap's mode, for paths that are not the fastest.
    ///
    /// # Safety
    ///
    /// As for `take_free_block`.
    #[inline]
    unsafe fn take_free_block_here(&self, page: &Page, class: usize, size: usize) -> *mut u8 {
        // SAFETY: per the contract; the mode is the heap's.
        unsafe {
            if self.requested {
                self.take_free_block::<true, false>(page, class, size)
            } else {
                self.take_free_block::<false, false>(page, class, size)
            }
        }
    }

    /// A block for `size` bytes from `page`'s free list (of paged class
    /// `class`), counted; null if the list is empty (the slow path then
    /// extends it from the page's never-used blocks, or moves on).
    ///
    /// # Safety
    ///
    /// The caller is the owner, `page` is `EMPTY_PAGE` or a live page of
    /// this heap for `class`, `size` fits the class, and `REQUESTED` is the
    /// heap's mode; if `NARROW`, the page's blocks are at most `SLACK_BYTE_MAX`.
    #[inline(always)]
    unsafe fn take_free_block<const REQUESTED: bool, const NARROW: bool>(
        &self,
        page: &Page,
        class: usize,
        size: usize,
    ) -> *mut u8 {
        let block = page.free.get();
        if block.is_null() {
            return ptr::null_mut();
        }
        // SAFETY: free blocks of a live page are ours to read; the first word links the list.
        page.free.set(unsafe { (*block).next });
        page.used.set(page.used.get() + 1);
        // SAFETY: `class` is a paged class, < STAT_CLASSES.
        add_serial(unsafe { self.counters.allocations.get_unchecked(class) }, 1);
        let bytes = if REQUESTED {
            let block_size = page.block_size.get();
            // SAFETY: a paged page of a heap that keeps requested sizes; we
            // own it; a size of the class leaves less slack than the width holds.
            unsafe { page.set_slack_as::<NARROW>(block as *const u8, block_size - size) };
            size
        } else {
            page.block_size.get()
        };
        // SAFETY: the caller is the owner.
        if unsafe { self.take_room(bytes) } {
            return block as *mut u8;
        }
        self.check_peak_then(block as *mut u8)
    }

    /// Links the never-used blocks of `page` that start in the same OS page
    /// as the next one into its (empty) free list; false if it has none
    /// left. Linking writes only to the blocks' first words, so it touches
    /// no memory that handing the blocks out one by one would not: resident
    /// memory grows as it would without the list.
    ///
    /// # Safety
    ///
    /// The caller is the owner; `page` is a live paged page of ours whose free list is empty.
    unsafe fn extend_free_list(&self, page: &Page) -> bool {
        // Blocks are derived from `bump` (not made from integers), so that
        // they keep the segment's provenance (which Miri checks).
        let (bump, end, size) = (page.bump.get(), page.end_addr(), page.block_size.get());
        let start = bump.addr();
        if start >= end {
            return false;
        }
        let os_page_end = (start & !(OS_PAGE - 1)) + OS_PAGE;
        let count = (os_page_end - start).div_ceil(size).min((end - start) / size);
        for i in 0..count {
            let block = bump.wrapping_add(i * size).cast::<Block>();
            let next = if i + 1 < count {
                bump.wrapping_add((i + 1) * size).cast::<Block>()
            } else {
                ptr::null_mut()
            };
            // SAFETY: the block lies in the page's never-used range, which is ours.
            unsafe { (*block).next = next };
        }
        page.free.set(bump.cast::<Block>());
        page.bump.set(bump.wrapping_add(count * size));
        true
    }

    /// Allocates `count * size` zeroed bytes; null on overflow or if the OS refuses memory.
    ///
    /// # Safety
    ///
    /// The caller is the heap's owner.
    pub unsafe fn alloc_zeroed(&self, count: usize, size: usize) -> *mut u8 {
        let Some(total) = count.checked_mul(size) else {
            self.count_failure();
            return ptr::null_mut();
        };
        // SAFETY: the caller is the owner.
        let p = unsafe { self.alloc(total) };
        if !p.is_null() && !self.is_fresh_huge(p) {
            // SAFETY: `p` is a fresh block of at least `total` bytes.
            unsafe { ptr::write_bytes(p, 0, total) };
        }
        p
    }

    /// Whether `p` (just allocated by this heap) is a huge block straight from
    /// the OS, hence already zero.
    fn is_fresh_huge(&self, p: *mut u8) -> bool {
        p as usize & os::SEGMENT_MASK == HUGE_BLOCK_OFFSET && {
            let seg = segment_of(p);
            // SAFETY: `p` is our block, so its segment header is live.
            unsafe { (*seg).kind == SegmentKind::Huge }
        }
    }

    /// Resizes `ptr` (ours or not, or null) to `new_size` bytes, allocating
    /// any new block from this heap. `token_for` gives the caller's owner token
    /// for a heap, as for [`free`].
    ///
    /// # Safety
    ///
    /// The caller is this heap's owner; `ptr` is null or a live block (of any allocator).
    pub unsafe fn realloc(
        &self,
        ptr: *mut u8,
        new_size: usize,
        token_for: impl FnOnce(usize) -> usize,
    ) -> Realloc {
        if ptr.is_null() {
            // SAFETY: the caller is the owner.
            return Realloc::Done(unsafe { self.alloc(new_size) });
        }
        // SAFETY: `ptr` is a live block, per the contract.
        let Some(old_size) = (unsafe { usable_size(ptr) }) else { return Realloc::NotOurs };
        // SAFETY: `ptr` is ours (usable_size said so); heaps are never freed.
        let block_heap = unsafe { heap_of(ptr) };
        let within = block_heap.is_some_and(|h| ptr::eq(h, self));
        // A block of another heap with the same owner (an interpreter's mem
        // block resized through the object domain) stays in its own heap,
        // as its figures would have it.
        if let Some(heap) = block_heap.filter(|h| !within && h.owner() == self.owner()) {
            // SAFETY: we own `self`, and `heap` has the same owner token: we own it too.
            return unsafe { heap.realloc(ptr, new_size, token_for) };
        }
        add_serial(&self.counters.reallocations, 1);
        let keeps = new_size <= old_size
            && (new_size > old_size / 2
                || (old_size <= MAX_PAGED_SIZE && class_of(new_size) == class_of(old_size)));
        if keeps {
            // In a heap that keeps requested sizes, the block's requested size
            // changes: counted only by its own heap's owner; for a block of
            // another heap, moving it counts right.
            if !block_heap.is_some_and(|h| h.requested) {
                return Realloc::Done(ptr);
            }
            // SAFETY: we own this heap, which holds the block, and new_size <= old_size.
            if within && unsafe { self.resize_requested(ptr, new_size) } {
                return Realloc::Done(ptr);
            }
        }
        // SAFETY: the caller is the owner. (A growth that fits the budget may
        // still be refused below if the block must move: both copies are live then.)
        if new_size > old_size && !unsafe { self.admits(new_size - old_size) } {
            return Realloc::Done(ptr::null_mut());
        }
        if new_size > old_size && within {
            // SAFETY: the caller owns this heap, which owns the block.
            if unsafe { self.grow_in_place(ptr, new_size) } {
                return Realloc::Done(ptr);
            }
        }
        // A move within the heap counts as a profiler counts a reallocation:
        // one reallocation, from the old size straight to the new, never both
        // blocks at once (so the peak is what the caller's sizes reach).
        let old_bytes = if within {
            // SAFETY: a live block of this heap, whose owner we are.
            let bytes = unsafe { (*page_of(segment_of(ptr), ptr)).requested_size(ptr, self.requested) };
            // SAFETY: the caller is the owner.
            unsafe { self.give_room(bytes) };
            bytes
        } else {
            0
        };
        // SAFETY: the caller is the owner.
        let new = unsafe { self.alloc(new_size) };
        if new.is_null() {
            // Nothing moved: the old block counts again.
            self.add_owner_bytes(old_bytes);
            return Realloc::Done(new);
        }
        // SAFETY: both blocks are live and distinct; we copy what both hold.
        unsafe {
            ptr::copy_nonoverlapping(ptr, new, old_size.min(new_size));
            free(ptr, token_for);
        }
        if within {
            // The free gave the old block's bytes back a second time; the
            // move's allocation and free are taken back out of the counts.
            self.add_owner_bytes(old_bytes);
            add_serial(&self.counters.moves, 1);
        }
        Realloc::Done(new)
    }

    /// Grows a large or huge block of ours to `new_size` bytes where it
    /// stands: a large block over free slots that follow it in its segment, a
    /// huge block within its mapping's reserve. False (nothing changed) if
    /// it cannot.
    ///
    /// # Safety
    ///
    /// The caller is the owner; `ptr` is a live block of this heap, and
    /// `new_size` is more than its usable size.
    unsafe fn grow_in_place(&self, ptr: *mut u8, new_size: usize) -> bool {
        let seg = segment_of(ptr);
        // SAFETY: (whole body) the block is ours and live, so its segment and
        // page are live, and as the owner we may change them.
        unsafe {
            let page = &*page_of(seg, ptr);
            let new_usable = match page.class.get() as usize {
                LARGE_CLASS if new_size <= MAX_LARGE_SIZE => {
                    let (first, span) = (page.first.get() as usize, page.span.get() as usize);
                    let new_span = new_size.div_ceil(SLOT_SIZE);
                    if first + new_span > SLOTS {
                        return false;
                    }
                    let more = slot_mask(first + span, new_span - span);
                    let s = &*seg;
                    if s.free_slots.get() & more != more {
                        return false;
                    }
                    s.free_slots.set(s.free_slots.get() & !more);
                    for slot in first + span..first + new_span {
                        s.pages[slot].set_first(first);
                    }
                    page.span.set(new_span as u8);
                    new_span * SLOT_SIZE
                }
                HUGE_CLASS => {
                    let capacity = (*seg).map_size - HUGE_BLOCK_OFFSET;
                    match new_size.checked_add(OS_PAGE - 1).map(|n| n & !(OS_PAGE - 1)) {
                        Some(usable) if usable <= capacity => usable,
                        _ => return false,
                    }
                }
                _ => return false,
            };
            let old_bytes = page.requested_size(ptr, self.requested);
            page.block_size.set(new_usable);
            // Counted as a reallocation (by the caller), not as an allocation.
            let new_bytes = self.record_big_size(page, new_size);
            self.add_owner_bytes(new_bytes - old_bytes);
        }
        true
    }

    /// Records that the large or huge block of `page` (its block size set)
    /// was asked for as `size` bytes, and returns the bytes it counts for in
    /// this heap's unit.
    fn record_big_size(&self, page: &Page, size: usize) -> usize {
        let usable = page.block_size.get();
        if self.requested {
            // Below u32::MAX: at most a slot or an OS page of rounding, or
            // what resize_requested checked.
            page.slack_key.set((usable - size) as u32);
            size
        } else {
            page.slack_key.set(0);
            usable
        }
    }

    /// Realloc keeps `ptr`, a live block of this heap (which keeps requested
    /// sizes), for `new_size` bytes: records its new slack and counts the
    /// difference. False (nothing changed) if the slack does not fit its entry.
    ///
    /// # Safety
    ///
    /// The caller is the owner; `ptr` is a live block of this heap, and
    /// `new_size` is at most its block size.
    unsafe fn resize_requested(&self, ptr: *mut u8, new_size: usize) -> bool {
        // SAFETY: (whole body) the block is ours and live, so its page is, and we own it.
        unsafe {
            let page = &*page_of(segment_of(ptr), ptr);
            let slack = page.block_size.get() - new_size;
            if !page.slack_fits(slack) {
                return false;
            }
            let old = page.requested_size(ptr, true);
            if page.class.get() as usize >= LARGE_CLASS {
                page.slack_key.set(slack as u32);
            } else {
                page.set_slack(ptr, slack);
            }
            if new_size >= old {
                self.add_owner_bytes(new_size - old);
            } else {
                self.give_room(old - new_size);
            }
        }
        true
    }

    /// Whether the heap's account, if it has one, admits `size` more bytes:
    /// asked on the slow paths only (see [`Account`](super::Account)).
    ///
    /// # Safety
    ///
    /// The caller is the owner.
    #[inline]
    unsafe fn admits(&self, size: usize) -> bool {
        match self.account() {
            None => true,
            // SAFETY: the account's members share this heap's owner, the caller.
            Some(account) => unsafe { account.admit(size) },
        }
    }

    /// The current page of `class` is exhausted (or missing): reclaim remote
    /// frees, move to the next page with free blocks, or start a new page.
    ///
    /// # Safety
    ///
    /// The caller is the owner.
    ///
    /// C ABI (cannot unwind), so that the fast path's call is a tail call.
    #[cold]
    unsafe extern "C" fn alloc_paged_slow(&self, class: usize, size: usize) -> *mut u8 {
        // SAFETY: (whole body) the caller is the owner, so `local`, the queued
        // pages and our segments are ours to change.
        unsafe {
            self.drain_remote();
            // Also here, so that a heap that keeps allocating in the segments
            // it has still gives retained segments and idle pages back in time.
            self.release_unused();
            if !self.admits(class_size(class)) {
                return ptr::null_mut();
            }
            loop {
                let page = self.local().bins[class];
                if page.is_null() {
                    if self.new_paged_page(class).is_null() {
                        self.count_failure();
                        return ptr::null_mut();
                    }
                    continue;
                }
                let block = self.take_free_block_here(&*page, class, size);
                if !block.is_null() {
                    return block;
                }
                if self.extend_free_list(&*page) {
                    continue;
                }
                // Full: it leaves the queue until a block comes back.
                self.unqueue(page);
            }
        }
    }

    /// A block with a page span (or a segment) of its own.
    ///
    /// # Safety
    ///
    /// The caller is the owner.
    ///
    /// C ABI (cannot unwind), so that the fast path's call is a tail call.
    #[cold]
    unsafe extern "C" fn alloc_large(&self, size: usize) -> *mut u8 {
        // SAFETY: the caller is the owner. Blocks others freed come back
        // first: a big block freed elsewhere (an interpreter's state, which
        // CPython frees without a thread state) is then reused, not mapped anew.
        unsafe {
            self.drain_remote();
            self.release_unused();
        }
        // SAFETY: the caller is the owner.
        if !unsafe { self.admits(size) } {
            return ptr::null_mut();
        }
        if size <= MAX_LARGE_SIZE {
            let span = size.div_ceil(SLOT_SIZE);
            // SAFETY: the caller is the owner.
            let Some((seg, first)) = (unsafe { self.take_slots(span) }) else {
                self.count_failure();
                return ptr::null_mut();
            };
            let usable = span * SLOT_SIZE;
            // SAFETY: `take_slots` reserved the span in our segment.
            let bytes = unsafe {
                let page = &*ptr::addr_of_mut!((*seg).pages[first]);
                page.block_size.set(usable);
                page.class.set(LARGE_CLASS as u8);
                page.used.set(1);
                page.free.set(ptr::null_mut());
                self.record_big_size(page, size)
            };
            self.count_big_alloc(LARGE_CLASS, bytes);
            return slot_address(seg, first);
        }
        let round = |n: usize| n.checked_add(OS_PAGE - 1).map(|n| n & !(OS_PAGE - 1));
        // The mapping reserves room to grow in place (address space only: the
        // OS backs a page when it is first touched), so that a block that keeps
        // growing by realloc (a list being appended to) is not copied, and its
        // old and new copies are never resident at once.
        let reserve = (size / 2).min(HUGE_GROWTH_RESERVE);
        let (Some(usable), Some(map_size)) =
            (round(size), size.checked_add(HUGE_BLOCK_OFFSET + reserve).and_then(round))
        else {
            self.count_failure();
            return ptr::null_mut();
        };
        let Some(base) = os::map_aligned(map_size) else {
            self.count_failure();
            return ptr::null_mut();
        };
        let seg = base as *mut Segment;
        // SAFETY: the mapping is fresh, zeroed, ours and large enough for the header.
        let bytes = unsafe {
            ptr::addr_of_mut!((*seg).heap).write(self);
            ptr::addr_of_mut!((*seg).kind).write(SegmentKind::Huge);
            ptr::addr_of_mut!((*seg).map_size).write(map_size);
            let page = &*ptr::addr_of_mut!((*seg).pages[0]);
            page.block_size.set(usable);
            page.class.set(HUGE_CLASS as u8);
            page.used.set(1);
            page.span.set(1);
            page.set_first(0);
            self.record_big_size(page, size)
        };
        os::publish_segment(base);
        add_serial(&self.counters.mapped_bytes, map_size as u64);
        self.count_big_alloc(HUGE_CLASS, bytes);
        // SAFETY: the block starts inside the mapping.
        unsafe { base.add(HUGE_BLOCK_OFFSET) }
    }
}
