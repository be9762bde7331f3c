//! Giving blocks back: the owner's frees, everyone else's through the heap's
//! remote-free list, and the entry points that find a block's page and heap
//! from its address alone.

use std::sync::atomic::Ordering;

use super::heap::{add_serial, Heap};
use super::os;
use super::page::DISCARD_SPAN;
use super::segment::{page_of, segment_of, Block, Page};
use super::size_class::PAGED_CLASSES;

impl Heap {
    /// The owner frees `block` of `page` (counted as an owner free).
    ///
    /// # Safety
    ///
    /// The caller is the owner; `block` is a live block of `page`, a page of ours.
    #[inline]
    unsafe fn free_local(&self, page: *mut Page, block: *mut u8) {
        // SAFETY: per the contract.
        unsafe {
            if self.requested {
                self.count_owner_free::<true, false>(&*page, block);
            } else {
                self.count_owner_free::<false, false>(&*page, block);
            }
            self.give_back(page, block);
        }
    }

    /// Counts the owner's free of `block`, a block of `p`.
    ///
    /// # Safety
    ///
    /// The caller is the owner; `p` is a live page of ours and `block` a live
    /// block of it; `REQUESTED` is the heap's mode; if `NARROW`, the page's
    /// blocks are at most `SLACK_BYTE_MAX`.
    #[inline(always)]
    unsafe fn count_owner_free<const REQUESTED: bool, const NARROW: bool>(&self, p: &Page, block: *const u8) {
        let class = p.class.get() as usize;
        // Read before the count is written, which the compiler cannot tell
        // apart from the page's fields.
        // SAFETY: per the contract.
        let bytes = unsafe { p.requested_size_as::<NARROW>(block, REQUESTED) };
        // SAFETY: a page's class is a paged class, LARGE_CLASS or HUGE_CLASS: all < STAT_CLASSES.
        add_serial(unsafe { self.counters.frees.get_unchecked(class) }, 1);
        // SAFETY: the caller is the owner.
        unsafe { self.give_room(bytes) };
    }

    /// Returns `block` to `page` (no counting): the structural half of a free.
    ///
    /// # Safety
    ///
    /// The caller is the owner (or holds `lock` while ended); `block` is a
    /// block of `page` that is not on any free list.
    #[inline]
    pub(super) unsafe fn give_back(&self, page: *mut Page, block: *mut u8) {
        // SAFETY: per the contract.
        unsafe {
            let p = &*page;
            if p.class.get() as usize >= PAGED_CLASSES {
                return self.retire_single(page, block);
            }
            let used = push_free(p, block);
            // One branch on the fast path: the page was full (not queued) or is now empty.
            if !p.queued.get() | (used == 0) {
                self.after_give_back(page, used);
            }
        }
    }

    /// A page that was full gets queued again; an empty page that is not
    /// the current one (or belongs to an ended heap) is retired.
    ///
    /// # Safety
    ///
    /// As for `give_back`, right after it returned a block to `page`.
    ///
    /// C ABI (cannot unwind), so that the free fast path's call is a tail call.
    #[cold]
    unsafe extern "C" fn after_give_back(&self, page: *mut Page, used: u32) {
        // SAFETY: per the contract.
        unsafe {
            let p = &*page;
            if !p.queued.get() {
                self.enqueue_second(page);
            } else if used == 0 {
                let class = p.class.get() as usize;
                if self.local().bins[class] != page || self.is_ended() {
                    self.retire_page(page);
                } else if p.span.get() as usize >= DISCARD_SPAN {
                    let local = self.local();
                    local.idle |= 1 << class;
                    local.idle_since[class] = os::now_nanos();
                }
            }
        }
    }

    /// Someone other than the owner frees `block` of `page`.
    ///
    /// # Safety
    ///
    /// `block` is a live block of `page`, a page of this heap; the caller is not the owner.
    #[cold]
    pub(super) unsafe fn free_foreign(&self, page: *mut Page, block: *mut u8) {
        // SAFETY: `class`, `block_size` and the block's slack do not change
        // while the block is live (only its holder, the caller, may resize it).
        let (class, size) =
            unsafe { ((*page).class.get() as usize, (*page).requested_size(block, self.requested)) };
        self.counters.remote_frees[class].fetch_add(1, Ordering::Relaxed);
        self.counters.remote_bytes.fetch_add(size as u64, Ordering::Relaxed);
        // SAFETY: the caller gives the block up; blocks come back under the
        // lock of an ended heap only.
        unsafe { self.remote.free_foreign(block as *mut Block, |b| self.give_back_pushed(b)) };
    }

    /// Gives back a block that was on the remote-free stack (or is freed while
    /// the heap is ended).
    ///
    /// # Safety
    ///
    /// As for `give_back`: the caller is the owner, or holds the lock of an
    /// ended heap; `block` is a block of ours on no free list.
    #[inline]
    pub(super) unsafe fn give_back_pushed(&self, block: *mut Block) {
        // SAFETY: per the contract.
        unsafe {
            let seg = segment_of(block as *const u8);
            self.give_back(page_of(seg, block as *const u8), block as *mut u8);
        }
    }

    /// Gives every remotely freed block back to its page.
    ///
    /// # Safety
    ///
    /// The caller is the owner.
    #[inline]
    pub(super) unsafe fn drain_remote(&self) {
        // SAFETY: per the contract.
        unsafe { self.remote.drain(|b| self.give_back_pushed(b)) };
    }
}

/// Frees `ptr` if it is ours; returns false (touching nothing) if it is not.
///
/// `token_for(owner)`, given the owner token of the heap that owns the block,
/// must return the caller's own token for that heap: equal to `owner` if the
/// caller is that heap's owner, anything else (for example [`NO_OWNER`]) if
/// not. The block goes straight back to its page when the caller is the
/// owner, and onto the owner's remote-free list otherwise.
///
/// # Safety
///
/// `ptr` is a live block (of any allocator) that is not used again.
#[inline]
pub unsafe fn free(ptr: *mut u8, token_for: impl FnOnce(usize) -> usize) -> bool {
    // SAFETY: per this function's contract.
    unsafe { free_with(ptr, |_| {}, token_for) }
}

/// The fast path of [`free`]: frees `ptr` and returns true only if it is
/// ours, `owns(heap)` says the caller owns the heap that holds it, and the
/// block is a small block of a page whose frees may take this path
/// ([`Page::fast_free`]: queued, and only paged pages are ever queued).
/// Otherwise it returns false and touches nothing; the caller then
/// calls [`free`]. Its only call, when the page became empty, is a tail
/// call, so the caller's fast path needs no saved registers; `owns` must make
/// no calls.
///
/// # Safety
///
/// As for [`free`]; `owns(heap)` returns true only if the caller owns `heap`.
///
/// `REQUESTED` must be whether the heaps `owns` accepts keep requested sizes
/// (see [`Heap::new_keeping_requested_sizes`]).
#[inline(always)]
pub unsafe fn free_fast<const REQUESTED: bool>(ptr: *mut u8, owns: impl FnOnce(*const Heap) -> bool) -> bool {
    let seg = segment_of(ptr);
    if !os::is_segment(seg as usize) {
        return false;
    }
    // SAFETY: the segment map says the segment is ours and live, and `ptr`, a
    // live block of it, keeps it (and its heap) alive; as the owner we may
    // read and change the page.
    unsafe {
        let heap = (*seg).heap;
        if !owns(heap) {
            return false;
        }
        let heap = &*heap;
        let page = page_of(seg, ptr);
        let p = &*page;
        // Queued, and (keeping requested sizes) with byte-wide slack entries.
        if !p.fast_free.get() {
            return false;
        }
        // SAFETY (of the hint): only paged pages are ever queued; telling the
        // compiler spares count_owner_free its large-block branch here.
        std::hint::assert_unchecked((p.class.get() as usize) < PAGED_CLASSES);
        debug_assert_eq!(REQUESTED, heap.requested);
        heap.count_owner_free::<REQUESTED, true>(p, ptr);
        if push_free(p, ptr) == 0 {
            heap.after_give_back(page, 0);
        }
    }
    true
}

/// Pushes `block` onto the free list of its paged page `p` and returns the
/// page's blocks still in use (the structural core of every small free).
///
/// # Safety
///
/// The caller owns the page's heap (or holds its lock while ended); `block`
/// is a live block of `p`.
#[inline(always)]
unsafe fn push_free(p: &Page, block: *mut u8) -> u32 {
    let b = block as *mut Block;
    // SAFETY: per the contract, the block is ours to write (its first word links the list).
    unsafe { (*b).next = p.free.get() };
    p.free.set(b);
    let used = p.used.get() - 1;
    p.used.set(used);
    used
}

/// [`free`], calling `before(usable_size)` first when the block is ours (one
/// lookup for callers that need the block's size too).
///
/// # Safety
///
/// As for [`free`].
#[inline(always)]
pub unsafe fn free_with(
    ptr: *mut u8,
    before: impl FnOnce(usize),
    token_for: impl FnOnce(usize) -> usize,
) -> bool {
    let seg = segment_of(ptr);
    if !os::is_segment(seg as usize) {
        return false;
    }
    // SAFETY: the segment map says the segment is ours and live, and `ptr`, a
    // live block of it, keeps it (and its heap) alive.
    unsafe {
        let heap = &*(*seg).heap;
        let page = page_of(seg, ptr);
        before((*page).block_size.get());
        let owner = heap.owner();
        if owner == token_for(owner) {
            heap.free_local(page, ptr);
        } else {
            heap.free_foreign(page, ptr);
        }
    }
    true
}
