//! Pages and segments, by the owner (or under the lock once the heap has
//! ended): starting a page, the per-class page queues, and giving empty
//! pages, spans and segments back, after their retention time for free
//! segments and idle big pages.

use std::ptr;

use super::heap::{add_serial, Heap, EMPTY_PAGE};
use super::os::{self, SEGMENT_SIZE};
use super::segment::{
    find_free_run, segment_of, slot_address, slot_mask, Page, Segment, SegmentKind, ALL_SLOTS_FREE, SLOT_SIZE,
};
use super::size_class::{class_size, page_slots, DIRECT_RANGE};

/// Freed spans of at least this many slots (32 KiB) have their memory
/// returned to the OS at once; single-slot pages, which come and go with
/// every burst of small objects, stay mapped for reuse. (Measured on 14
/// pyperformance benchmarks: 1 slot saves another 0.5% of peak RSS, 8 slots
/// cost 0.3%.)
pub(super) const DISCARD_SPAN: usize = 2;
/// At most this many entirely free segments are kept per heap (32 MiB).
const RETAIN_MAX: usize = 32;

impl Heap {
    /// Starts a page for `class` and queues it at the head; null if out of memory.
    ///
    /// # Safety
    ///
    /// The caller is the owner.
    pub(super) unsafe fn new_paged_page(&self, class: usize) -> *mut Page {
        let span = page_slots(class);
        // SAFETY: the caller is the owner.
        let Some((seg, first)) = (unsafe { self.take_slots(span) }) else { return ptr::null_mut() };
        let size = class_size(class);
        let start = slot_address(seg, first);
        // A heap that keeps requested sizes keeps each block's slack after
        // the last block (see `Page::slack`).
        let capacity = if self.requested {
            Page::capacity_with_slack(span * SLOT_SIZE, size)
        } else {
            span * SLOT_SIZE / size
        };
        // SAFETY: `take_slots` reserved the span in our segment.
        unsafe {
            let page_ptr = ptr::addr_of_mut!((*seg).pages[first]);
            let page = &*page_ptr;
            page.block_size.set(size);
            page.class.set(class as u8);
            page.used.set(0);
            page.free.set(ptr::null_mut());
            page.bump.set(start);
            let end = start.add(capacity * size);
            let (slack_key, slack_base) =
                if self.requested { Page::slack_layout(start, end, capacity, size) } else { (0, end) };
            page.slack_base.set(slack_base);
            page.slack_key.set(slack_key);
            self.enqueue_head(page_ptr);
            page_ptr
        }
    }

    /// Reserves `span` free slots in one of our segments (mapping a new one if
    /// needed) and marks them as one page; returns the segment and first slot.
    ///
    /// # Safety
    ///
    /// The caller is the owner.
    pub(super) unsafe fn take_slots(&self, span: usize) -> Option<(*mut Segment, usize)> {
        // SAFETY: (whole body) the caller is the owner of `local` and of our segments.
        unsafe {
            let local = self.local();
            let mut seg = local.segments;
            while !seg.is_null() {
                if let Some(first) = find_free_run((*seg).free_slots.get(), span) {
                    Self::mark_page(seg, first, span);
                    return Some((seg, first));
                }
                seg = (*seg).next.get();
            }
            let seg = self.new_segment()?;
            let first = find_free_run((*seg).free_slots.get(), span)?;
            Self::mark_page(seg, first, span);
            Some((seg, first))
        }
    }

    /// # Safety
    ///
    /// `seg` is ours, the caller owns it, and slots `first..first+span` are free.
    unsafe fn mark_page(seg: *mut Segment, first: usize, span: usize) {
        // SAFETY: per the contract.
        unsafe {
            let s = &*seg;
            s.free_slots.set(s.free_slots.get() & !slot_mask(first, span));
            for slot in first..first + span {
                s.pages[slot].set_first(first);
            }
            s.pages[first].span.set(span as u8);
            s.pages[first].set_queued(false);
        }
    }

    /// A normal segment, linked at the head of our list: the most recently
    /// freed retained one (its pages are likely still resident and cached),
    /// or a new mapping.
    ///
    /// # Safety
    ///
    /// The caller is the owner.
    unsafe fn new_segment(&self) -> Option<*mut Segment> {
        // SAFETY: (whole body) the caller is the owner; a new mapping is ours alone.
        unsafe {
            let local = self.local();
            let reused = !local.retained.is_null();
            let seg = if reused {
                let seg = local.retained;
                local.retained = (*seg).next.get();
                seg
            } else {
                let base = os::map_aligned(SEGMENT_SIZE)?;
                let seg = base as *mut Segment;
                ptr::addr_of_mut!((*seg).heap).write(self);
                ptr::addr_of_mut!((*seg).kind).write(SegmentKind::Normal);
                ptr::addr_of_mut!((*seg).map_size).write(SEGMENT_SIZE);
                (*seg).free_slots.set(ALL_SLOTS_FREE);
                os::publish_segment(base);
                add_serial(&self.counters.mapped_bytes, SEGMENT_SIZE as u64);
                seg
            };
            (*seg).prev.set(ptr::null_mut());
            (*seg).next.set(local.segments);
            if !local.segments.is_null() {
                (*local.segments).prev.set(seg);
            }
            local.segments = seg;
            if reused {
                // Last: it takes `local` itself, which ends ours.
                self.release_expired(os::now_nanos());
            }
            Some(seg)
        }
    }

    /// # Safety
    ///
    /// The caller is the owner; `page` is a live, unqueued paged page of ours.
    unsafe fn enqueue_head(&self, page: *mut Page) {
        // SAFETY: per the contract.
        unsafe {
            let p = &*page;
            let class = p.class.get() as usize;
            let head = self.local().bins[class];
            p.prev.set(ptr::null_mut());
            p.next.set(head);
            if !head.is_null() {
                (*head).prev.set(page);
            }
            self.set_bin(class, page);
            p.set_queued(true);
        }
    }

    /// Makes `page` (or none) the current page of `class`, in `bins` and in
    /// the direct table.
    ///
    /// # Safety
    ///
    /// The caller is the owner; `page` is null or a live page of ours for `class`.
    pub(super) unsafe fn set_bin(&self, class: usize, page: *mut Page) {
        // SAFETY: the caller is the owner.
        let local = unsafe { self.local() };
        local.bins[class] = page;
        let entry: *const Page = if page.is_null() { &EMPTY_PAGE.0 } else { page };
        let (first, end) = DIRECT_RANGE[class];
        for slot in &mut local.direct[first as usize..end as usize] {
            *slot = entry;
        }
    }

    /// Queues a page that got a block back, behind the current page (so the
    /// current page keeps serving until it runs out).
    ///
    /// # Safety
    ///
    /// The caller is the owner; `page` is a live, unqueued paged page of ours.
    pub(super) unsafe fn enqueue_second(&self, page: *mut Page) {
        // SAFETY: per the contract.
        unsafe {
            let p = &*page;
            let head = self.local().bins[p.class.get() as usize];
            if head.is_null() {
                return self.enqueue_head(page);
            }
            let after = (*head).next.get();
            p.prev.set(head);
            p.next.set(after);
            if !after.is_null() {
                (*after).prev.set(page);
            }
            (*head).next.set(page);
            p.set_queued(true);
        }
    }

    /// # Safety
    ///
    /// The caller is the owner; `page` is queued.
    pub(super) unsafe fn unqueue(&self, page: *mut Page) {
        // SAFETY: per the contract.
        unsafe {
            let p = &*page;
            let (prev, next) = (p.prev.get(), p.next.get());
            if prev.is_null() {
                self.set_bin(p.class.get() as usize, next);
            } else {
                (*prev).next.set(next);
            }
            if !next.is_null() {
                (*next).prev.set(prev);
            }
            p.set_queued(false);
        }
    }

    /// Releases an empty paged page's slots.
    ///
    /// # Safety
    ///
    /// The caller is the owner (or holds `lock` while ended); the page is queued and empty.
    #[cold]
    pub(super) unsafe fn retire_page(&self, page: *mut Page) {
        // SAFETY: per the contract.
        unsafe {
            self.unqueue(page);
            let p = &*page;
            p.block_size.set(0);
            let seg = segment_of(page as *const u8);
            let first = p.first.get() as usize;
            self.release_slots(seg, first, p.span.get() as usize);
        }
    }

    /// Frees a large or huge block (each has its page or segment to itself).
    ///
    /// # Safety
    ///
    /// As for `give_back`.
    #[cold]
    pub(super) unsafe fn retire_single(&self, page: *mut Page, block: *mut u8) {
        // SAFETY: per the contract; a huge segment holds nothing but this block.
        unsafe {
            let p = &*page;
            p.used.set(0);
            p.block_size.set(0);
            let seg = segment_of(block);
            if (*seg).kind == SegmentKind::Huge {
                let size = (*seg).map_size;
                add_serial(&self.counters.mapped_bytes, (size as u64).wrapping_neg());
                os::unmap_segment(seg as *mut u8, size);
            } else {
                self.release_slots(seg, p.first.get() as usize, p.span.get() as usize);
            }
        }
    }

    /// How long this heap keeps an entirely free segment mapped and resident
    /// for reuse before giving it back to the OS (50 ms unless set; at most
    /// 32 segments are kept whatever the time), and how long an empty current
    /// page of a big class (several slots) stays before its slots go back.
    /// Zero gives them back at the next check.
    ///
    /// # Safety
    ///
    /// The caller is the heap's owner.
    pub unsafe fn set_free_segment_retention(&self, time: std::time::Duration) {
        // SAFETY: the caller is the owner.
        unsafe { self.local() }.retain_nanos = u64::try_from(time.as_nanos()).unwrap_or(u64::MAX);
    }

    /// Gives back what has been unused for longer than the retention time:
    /// retained segments, and idle current pages (`Local::idle`).
    ///
    /// # Safety
    ///
    /// The caller is the owner.
    #[inline]
    pub(super) unsafe fn release_unused(&self) {
        // SAFETY: (whole body) the caller is the owner.
        unsafe {
            let local = self.local();
            if local.retained.is_null() && local.idle == 0 {
                return;
            }
            let now = os::now_nanos();
            if local.idle != 0 {
                self.release_idle_pages(now);
            }
            if !self.local().retained.is_null() {
                self.release_expired(now);
            }
        }
    }

    /// Retires the current pages of the classes in `Local::idle` that are
    /// still empty and have been for longer than the retention time.
    ///
    /// # Safety
    ///
    /// The caller is the owner.
    #[cold]
    unsafe fn release_idle_pages(&self, now: u64) {
        // SAFETY: (whole body) the caller is the owner; a class's current
        // page is queued and ours.
        unsafe {
            let (limit, mut pending) = (self.local().retain_nanos, self.local().idle);
            while pending != 0 {
                let class = pending.trailing_zeros() as usize;
                pending &= pending - 1;
                // Taken anew each round: `retire_page` takes `local` itself,
                // which ends any reference held across it.
                let local = self.local();
                let page = local.bins[class];
                if page.is_null() || (*page).used.get() != 0 {
                    // Used again (or gone): no longer idle.
                    local.idle &= !(1 << class);
                } else if now.saturating_sub(local.idle_since[class]) > limit {
                    local.idle &= !(1 << class);
                    self.retire_page(page);
                }
            }
        }
    }

    /// Gives back to the OS the retained segments that have been free for
    /// longer than the heap's retention time, and any beyond the newest `RETAIN_MAX`.
    ///
    /// # Safety
    ///
    /// The caller is the owner (or holds `lock` while ended).
    pub(super) unsafe fn release_expired(&self, now: u64) {
        // SAFETY: (whole body) per the contract; retained segments hold no
        // live block and are linked only from `retained`.
        unsafe {
            let local = self.local();
            // The list is newest first, so ages only grow along it: keep a
            // prefix and release the rest.
            let mut link: *const std::cell::Cell<*mut Segment> = ptr::null();
            let mut seg = local.retained;
            let mut kept = 0;
            let limit = local.retain_nanos;
            while !seg.is_null() && kept < RETAIN_MAX && now.saturating_sub((*seg).freed_at.get()) <= limit {
                kept += 1;
                link = &(*seg).next;
                seg = (*seg).next.get();
            }
            if link.is_null() {
                local.retained = ptr::null_mut();
            } else {
                (*link).set(ptr::null_mut());
            }
            while !seg.is_null() {
                let next = (*seg).next.get();
                add_serial(&self.counters.mapped_bytes, (SEGMENT_SIZE as u64).wrapping_neg());
                os::unmap_segment(seg as *mut u8, SEGMENT_SIZE);
                seg = next;
            }
        }
    }

    /// Marks slots free; an entirely free segment is retained for reuse
    /// (see `Local::retained`), or goes back to the OS if the heap has ended.
    ///
    /// # Safety
    ///
    /// The caller is the owner (or holds `lock` while ended); the slots hold no live block.
    unsafe fn release_slots(&self, seg: *mut Segment, first: usize, span: usize) {
        // SAFETY: per the contract.
        unsafe {
            if span >= DISCARD_SPAN {
                // Give the memory back now: a span this big is rarely reused
                // whole, and a growing block (a list being appended to) would
                // otherwise leave a trail of touched, free spans behind it.
                os::discard(slot_address(seg, first), span * SLOT_SIZE);
            }
            let s = &*seg;
            let free = s.free_slots.get() | slot_mask(first, span);
            s.free_slots.set(free);
            if free != ALL_SLOTS_FREE {
                return;
            }
            let local = self.local();
            let (prev, next) = (s.prev.get(), s.next.get());
            if prev.is_null() {
                local.segments = next;
            } else {
                (*prev).next.set(next);
            }
            if !next.is_null() {
                (*next).prev.set(prev);
            }
            if self.is_ended() {
                add_serial(&self.counters.mapped_bytes, (SEGMENT_SIZE as u64).wrapping_neg());
                os::unmap_segment(seg as *mut u8, SEGMENT_SIZE);
                return;
            }
            // Kept as it is, resident: see `Local::retained`.
            let now = os::now_nanos();
            s.freed_at.set(now);
            s.prev.set(ptr::null_mut());
            s.next.set(local.retained);
            local.retained = seg;
            self.release_expired(now);
        }
    }
}
