//! [`Heap`]: one owner's pages, its remote-free list, and its exact figures.

use std::cell::UnsafeCell;
use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicU8, AtomicUsize, Ordering};

use super::os::{self, OS_PAGE, SEGMENT_SIZE};
use super::segment::{
    find_free_run, page_of, segment_of, slot_address, slot_mask, Block, Page, Segment, SegmentKind,
    ALL_SLOTS_FREE, HUGE_BLOCK_OFFSET, SLOTS, SLOT_SHIFT, SLOT_SIZE,
};
use super::size_class::{
    class_of, class_size, direct_index, page_slots, DIRECT_RANGE, DIRECT_SLOTS, HUGE_CLASS, LARGE_CLASS,
    MAX_DIRECT_SIZE, MAX_LARGE_SIZE, MAX_PAGED_SIZE, PAGED_CLASSES, STAT_CLASSES,
};
use super::stats::{ClassSnapshot, HeapSnapshot};
use crate::shard_lock::ShardLock;

/// Most address space a huge block's mapping reserves beyond the block for
/// growing in place (half the block, up to this).
const HUGE_GROWTH_RESERVE: usize = 64 << 20;

/// Freed spans of at least this many slots (32 KiB) have their memory
/// returned to the OS at once; single-slot pages, which come and go with
/// every burst of small objects, stay mapped for reuse. (Measured on 14
/// pyperformance benchmarks: 1 slot saves another 0.5% of peak RSS, 8 slots
/// cost 0.3%.)
const DISCARD_SPAN: usize = 2;
/// How long an entirely free segment stays resident for reuse (see
/// `Local::retained`). Measured on pyperformance: 100 ms took float's page
/// faults per loop from 4,100 to 430 but raised pyflate's peak RSS by 8%
/// (memory one heap kept while another grew); 20 ms kept 3,000 faults; 50 ms
/// halves them (1,900) and leaves peak RSS within 0.5%.
const RETAIN_NANOS: u64 = 50_000_000;
/// At most this many entirely free segments are kept per heap (32 MiB).
const RETAIN_MAX: usize = 32;

const _: () = assert!(PAGED_CLASSES <= 64, "Local::idle is a bit per paged class");

/// What an empty direct-table entry points to: a page with no free block,
/// so the allocation fast path needs no null test (it falls into the slow
/// path). Never written: only a page with a free block is ever changed.
struct EmptyPage(Page);
// SAFETY: never written (see above), so sharing it between threads is sound.
unsafe impl Sync for EmptyPage {}
static EMPTY_PAGE: EmptyPage = EmptyPage(Page::empty());

/// The owner token of an ended heap; no caller may use it.
pub const ENDED_OWNER: usize = usize::MAX;
/// The token of a caller that owns no heap: it matches no heap.
pub const NO_OWNER: usize = 0;

const ACTIVE: u8 = 0;
const ENDED: u8 = 1;

/// What a heap serves, as its creator describes it. The engine does not
/// interpret it; it is carried into snapshots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeapLabel {
    /// Creator-defined kind (for example "interpreter" or "thread").
    pub kind: u8,
    /// Creator-defined identity (for example an interpreter ID).
    pub id: i64,
    /// Creator-defined sub-part (for example an allocator domain).
    pub part: u8,
}

/// A heap: the pages one owner allocates from, with exact figures.
///
/// # Ownership and concurrency
///
/// A heap is *active* or *ended*.
///
/// * **Active:** exactly one owner uses it at a time: a thread, or any thread
///   holding an exclusion the creator chose (CPython's GIL of one
///   interpreter). The owner is identified by a nonzero token (`owner`), which
///   the caller compares with its own. Only the owner allocates, and only the
///   owner touches `local`, the pages' free lists and the segments' slot
///   maps, with no atomic read-modify-writes. Anyone else who frees a block of
///   this heap pushes it onto `remote` (a lock-free stack), counting it in
///   the atomic remote counters; the owner takes the whole stack with one swap
///   when it needs memory, and gives the blocks back to their pages.
/// * **Ended:** no owner (`owner == ENDED_OWNER`). Every change is made under
///   `lock`: a free takes the lock, gives the block back at once, and returns
///   pages and segments that became empty to the OS. Blocks still live stay
///   valid and are reported; the heap's figures stay readable forever
///   (heaps are never deallocated).
///
/// Transitions take `lock`: `end` (by the owner, or by the creator once the
/// owner can no longer run) and `adopt` (an ended heap gets a new owner).
/// Frees that race with a transition are resolved by the protocol in
/// `free_foreign`: the pusher re-checks the state after its push (SeqCst on
/// both sides), so a block is never stranded on an ended heap's stack.
///
/// Figures: per-class allocation and free counts and the owner's byte
/// totals are written only by the owner (or under the lock when ended), with
/// plain load-then-store on atomics so that readers on other threads never race;
/// remote counts use `fetch_add`. Live bytes are the owner's net bytes minus
/// the bytes freed remotely. The owner's net bytes are not kept as one figure
/// (that would cost the fast paths three instructions each): a paged class's
/// blocks all have the class size, so they follow from its counts, and only
/// large and huge blocks keep a byte total.
pub struct Heap {
    owner: AtomicUsize,
    state: AtomicU8,
    remote: AtomicPtr<Block>,
    lock: ShardLock<()>,
    label: HeapLabel,
    local: UnsafeCell<Local>,
    counters: Counters,
    /// Next heap in the registry (set once before the heap is published).
    registry_next: *const Heap,
    /// Next heap waiting in a [`HeapPool`](super::HeapPool) (changed under the pool's lock).
    pool_next: AtomicPtr<Heap>,
}

// SAFETY: shared fields are atomics or the lock; `local` and the pages are
// touched only by the owner or under `lock` (see the type docs), and the raw
// pointers refer to segments whose lifetime the heap manages.
unsafe impl Sync for Heap {}
// SAFETY: as above; nothing in a heap is tied to the thread that created it.
unsafe impl Send for Heap {}

/// State only the owner (or the holder of `lock` when ended) touches.
struct Local {
    /// Per class, the queue of pages that have free blocks; the head is the current page.
    bins: [*mut Page; PAGED_CLASSES],
    /// For requests up to `MAX_DIRECT_SIZE`, by [`direct_index`]: the
    /// current page of the class serving that size (its `bins` head), or
    /// `EMPTY_PAGE`. Saves the fast path the class lookup. Changed only
    /// through `set_bin`, with `bins`.
    direct: [*const Page; DIRECT_SLOTS],
    /// `peak_trigger` minus the owner's net bytes, so that the fast paths
    /// check the peak with one subtraction (allocation) or addition (free)
    /// and a sign test. Below zero, the peak is checked.
    peak_room: i64,
    /// `peak_bytes` plus the remote bytes seen when the peak was last
    /// checked. Remote bytes only grow, so while the owner's net bytes stay
    /// at or below this, live bytes cannot exceed the peak and the fast path
    /// need not read the shared remote figure.
    peak_trigger: u64,
    /// Normal segments of this heap.
    segments: *mut Segment,
    /// Entirely free normal segments kept mapped, and resident, for reuse:
    /// newest first, linked through `next`, each stamped in `freed_at`. A
    /// program that builds and drops a large structure over and over (most
    /// benchmarks' loops) then reuses the same memory instead of faulting
    /// fresh pages in. One goes back to the OS once it has been free for
    /// `retain_nanos`, or when more than `RETAIN_MAX` are kept (checked
    /// whenever a segment is freed or taken, and on the allocation slow path).
    retained: *mut Segment,
    /// How long a retained segment, or an idle page, stays (`RETAIN_NANOS`
    /// unless changed).
    retain_nanos: u64,
    /// Bit `class` set: that class's current page spans several slots and
    /// became empty at `idle_since[class]`. It stays, so that a program that
    /// takes and drops one big block over and over does not fault its memory
    /// in each time; once it has been empty for `retain_nanos`, the next slow
    /// path gives its slots back (spans that big are discarded at once). Without
    /// this, every big class kept up to eight blocks resident that nothing
    /// used: 1.1 MiB of a 22 MiB pyperformance run, 5% of peak RSS.
    idle: u64,
    idle_since: [u64; PAGED_CLASSES],
}

struct Counters {
    allocations: [AtomicU64; STAT_CLASSES],
    frees: [AtomicU64; STAT_CLASSES],
    remote_frees: [AtomicU64; STAT_CLASSES],
    /// Bytes of large and huge blocks allocated minus those freed by the
    /// owner (wraps below zero while remote frees are pending, which
    /// `remote_bytes` makes up for). Paged bytes follow from the class counts.
    big_owner_bytes: AtomicU64,
    remote_bytes: AtomicU64,
    peak_bytes: AtomicU64,
    reallocations: AtomicU64,
    failures: AtomicU64,
    mapped_bytes: AtomicU64,
}

/// Adds `n` to a counter that only one writer changes at a time.
#[inline(always)]
fn add_serial(counter: &AtomicU64, n: u64) {
    counter.store(counter.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// Registry of every heap ever created (a push-only list, so readers need no lock).
static HEAPS: AtomicPtr<Heap> = AtomicPtr::new(ptr::null_mut());

/// Every heap ever created, newest first.
pub fn heaps() -> impl Iterator<Item = &'static Heap> {
    let mut next = HEAPS.load(Ordering::Acquire) as *const Heap;
    std::iter::from_fn(move || {
        // SAFETY: registered heaps are leaked and never freed.
        let heap = unsafe { next.as_ref()? };
        next = heap.registry_next;
        Some(heap)
    })
}

/// What [`realloc`](Heap::realloc) did.
#[derive(Debug, PartialEq, Eq)]
pub enum Realloc {
    /// The block now at this address (maybe the same), or null if memory ran out
    /// (the old block is then untouched).
    Done(*mut u8),
    /// The pointer is not ours; the caller must hand it to whoever allocated it.
    NotOurs,
}

impl Heap {
    /// Creates an active heap owned by `owner` and registers it.
    ///
    /// `owner` must not be [`NO_OWNER`] or [`ENDED_OWNER`]; it must differ
    /// from every other active heap's owner token unless that owner also owns
    /// this heap (the same exclusion may own several heaps).
    pub fn new(label: HeapLabel, owner: usize) -> &'static Heap {
        debug_assert!(owner != NO_OWNER && owner != ENDED_OWNER);
        let heap = Box::leak(Box::new(Heap {
            owner: AtomicUsize::new(owner),
            state: AtomicU8::new(ACTIVE),
            remote: AtomicPtr::new(ptr::null_mut()),
            lock: ShardLock::new(()),
            label,
            local: UnsafeCell::new(Local {
                bins: [ptr::null_mut(); PAGED_CLASSES],
                direct: [&EMPTY_PAGE.0; DIRECT_SLOTS],
                peak_room: 0,
                peak_trigger: 0,
                segments: ptr::null_mut(),
                retained: ptr::null_mut(),
                retain_nanos: RETAIN_NANOS,
                idle: 0,
                idle_since: [0; PAGED_CLASSES],
            }),
            counters: Counters {
                allocations: [const { AtomicU64::new(0) }; STAT_CLASSES],
                frees: [const { AtomicU64::new(0) }; STAT_CLASSES],
                remote_frees: [const { AtomicU64::new(0) }; STAT_CLASSES],
                big_owner_bytes: AtomicU64::new(0),
                remote_bytes: AtomicU64::new(0),
                peak_bytes: AtomicU64::new(0),
                reallocations: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                mapped_bytes: AtomicU64::new(0),
            },
            registry_next: ptr::null(),
            pool_next: AtomicPtr::new(ptr::null_mut()),
        }));
        let mut head = HEAPS.load(Ordering::Relaxed);
        loop {
            heap.registry_next = head;
            match HEAPS.compare_exchange_weak(head, heap, Ordering::Release, Ordering::Relaxed) {
                Ok(_) => return heap,
                Err(now) => head = now,
            }
        }
    }

    pub(super) fn pool_next(&self) -> *const Heap {
        self.pool_next.load(Ordering::Relaxed)
    }

    pub(super) fn set_pool_next(&self, next: *const Heap) {
        self.pool_next.store(next as *mut Heap, Ordering::Relaxed);
    }

    /// The label given at creation.
    pub fn label(&self) -> HeapLabel {
        self.label
    }

    /// The current owner token ([`ENDED_OWNER`] once ended).
    #[inline(always)]
    pub fn owner(&self) -> usize {
        self.owner.load(Ordering::Relaxed)
    }

    /// Whether the heap has ended (and not been adopted since).
    pub fn is_ended(&self) -> bool {
        self.state.load(Ordering::Acquire) == ENDED
    }

    /// # Safety
    ///
    /// The caller is the owner, or holds `lock` while the heap is ended, and
    /// does not keep the reference across a call that may take it again.
    #[allow(clippy::mut_from_ref)]
    #[inline(always)]
    unsafe fn local(&self) -> &mut Local {
        // SAFETY: exclusive access per the contract above.
        unsafe { &mut *self.local.get() }
    }

    // ----- allocation (owner only) -----

    /// Allocates `size` bytes, 16-byte aligned; null if the OS refuses memory.
    ///
    /// # Safety
    ///
    /// The caller is the heap's owner (see the type docs).
    #[inline(always)]
    pub unsafe fn alloc(&self, size: usize) -> *mut u8 {
        if size <= MAX_DIRECT_SIZE {
            // SAFETY: the caller is the owner; the index is < DIRECT_SLOTS,
            // and an entry is a live page of ours or EMPTY_PAGE.
            let page = unsafe { &**self.local().direct.get_unchecked(direct_index(size)) };
            // SAFETY: as above; a page with a free block is a live paged page of ours.
            let block = unsafe { self.take_free_block(page, page.class.get() as usize) };
            if !block.is_null() {
                return block;
            }
            // SAFETY: the caller is the owner.
            unsafe { self.alloc_paged_slow(class_of(size)) }
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
                let block = unsafe { self.take_free_block(&*page, class) };
                if !block.is_null() {
                    return block;
                }
            }
            // SAFETY: the caller is the owner.
            unsafe { self.alloc_paged_slow(class) }
        } else {
            // SAFETY: the caller is the owner.
            unsafe { self.alloc_large(size) }
        }
    }

    /// A block from `page`'s free list (of paged class `class`), counted;
    /// null if the list is empty (the slow path then extends it from the
    /// page's never-used blocks, or moves on).
    ///
    /// # Safety
    ///
    /// The caller is the owner, and `page` is `EMPTY_PAGE` or a live page of
    /// this heap for `class`.
    #[inline(always)]
    unsafe fn take_free_block(&self, page: &Page, class: usize) -> *mut u8 {
        let block = page.free.get();
        if block.is_null() {
            return ptr::null_mut();
        }
        // SAFETY: free blocks of a live page are ours to read; the first word links the list.
        page.free.set(unsafe { (*block).next });
        page.used.set(page.used.get() + 1);
        // SAFETY: `class` is a paged class, < STAT_CLASSES.
        add_serial(unsafe { self.counters.allocations.get_unchecked(class) }, 1);
        // SAFETY: the caller is the owner.
        if unsafe { self.take_room(page.block_size.get()) } {
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
        let (bump, end, size) = (page.bump.get() as usize, page.end.get() as usize, page.block_size.get());
        if bump >= end {
            return false;
        }
        let os_page_end = (bump & !(OS_PAGE - 1)) + OS_PAGE;
        let count = (os_page_end - bump).div_ceil(size).min((end - bump) / size);
        for i in 0..count {
            let block = (bump + i * size) as *mut Block;
            let next = if i + 1 < count { (bump + (i + 1) * size) as *mut Block } else { ptr::null_mut() };
            // SAFETY: the block lies in the page's never-used range, which is ours.
            unsafe { (*block).next = next };
        }
        page.free.set(bump as *mut Block);
        page.bump.set((bump + count * size) as *mut u8);
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
        add_serial(&self.counters.reallocations, 1);
        let keeps = new_size <= old_size
            && (new_size > old_size / 2
                || (old_size <= MAX_PAGED_SIZE && class_of(new_size) == class_of(old_size)));
        if keeps {
            return Realloc::Done(ptr);
        }
        // SAFETY: `ptr` is a live block of ours (usable_size said so); heaps are never freed.
        if new_size > old_size && unsafe { heap_of(ptr) }.is_some_and(|h| ptr::eq(h, self)) {
            // SAFETY: the caller owns this heap, which owns the block.
            if unsafe { self.grow_in_place(ptr, old_size, new_size) } {
                return Realloc::Done(ptr);
            }
        }
        // SAFETY: the caller is the owner.
        let new = unsafe { self.alloc(new_size) };
        if new.is_null() {
            return Realloc::Done(new);
        }
        // SAFETY: both blocks are live and distinct; we copy what both hold.
        unsafe {
            ptr::copy_nonoverlapping(ptr, new, old_size.min(new_size));
            free(ptr, token_for);
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
    /// The caller is the owner; `ptr` is a live block of this heap of
    /// usable size `old_size`, and `new_size > old_size`.
    unsafe fn grow_in_place(&self, ptr: *mut u8, old_size: usize, new_size: usize) -> bool {
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
            page.block_size.set(new_usable);
            // Counted as a reallocation (by the caller), not as an allocation.
            self.add_big_bytes(new_usable - old_size);
        }
        true
    }

    /// Counts the owner's allocation of a large or huge block of `bytes`.
    fn count_big_alloc(&self, class: usize, bytes: usize) {
        debug_assert!(class == LARGE_CLASS || class == HUGE_CLASS);
        add_serial(&self.counters.allocations[class], 1);
        self.add_big_bytes(bytes);
    }

    /// The owner's large and huge blocks grow by `bytes`.
    fn add_big_bytes(&self, bytes: usize) {
        add_serial(&self.counters.big_owner_bytes, bytes as u64);
        // SAFETY: only the owner allocates.
        if !unsafe { self.take_room(bytes) } {
            self.check_peak();
        }
    }

    /// The owner's net bytes grow by `bytes`: false if they may have passed
    /// the peak trigger (the caller then checks the peak).
    ///
    /// # Safety
    ///
    /// The caller is the owner.
    #[inline(always)]
    unsafe fn take_room(&self, bytes: usize) -> bool {
        // SAFETY: the caller is the owner.
        let local = unsafe { self.local() };
        local.peak_room = local.peak_room.wrapping_sub(bytes as i64);
        local.peak_room >= 0
    }

    /// The owner's net bytes shrink by `bytes`.
    ///
    /// # Safety
    ///
    /// The caller is the owner.
    #[inline(always)]
    unsafe fn give_room(&self, bytes: usize) {
        // SAFETY: the caller is the owner.
        let local = unsafe { self.local() };
        local.peak_room = local.peak_room.wrapping_add(bytes as i64);
    }

    /// [`check_peak`](Self::check_peak), then hands back `block`: the
    /// allocation fast path ends in a jump here (a C-ABI function cannot
    /// unwind, so the call can be a tail call).
    #[cold]
    extern "C" fn check_peak_then(&self, block: *mut u8) -> *mut u8 {
        self.check_peak();
        block
    }

    /// The owner's net bytes passed the trigger: live bytes may be a new peak.
    #[cold]
    fn check_peak(&self) {
        let c = &self.counters;
        // SAFETY: only the owner allocates, hence checks the peak.
        let local = unsafe { self.local() };
        let owner_bytes = local.peak_trigger.wrapping_sub(local.peak_room as u64);
        let remote = c.remote_bytes.load(Ordering::Relaxed);
        // Signed: while remote frees race ahead of the owner's count, live
        // may read below zero, which must never become a peak.
        let live = owner_bytes.wrapping_sub(remote) as i64;
        let mut peak = c.peak_bytes.load(Ordering::Relaxed);
        if live > peak as i64 {
            peak = live as u64;
            c.peak_bytes.store(peak, Ordering::Relaxed);
        }
        local.peak_trigger = peak.wrapping_add(remote);
        local.peak_room = local.peak_trigger.wrapping_sub(owner_bytes) as i64;
    }

    fn count_failure(&self) {
        add_serial(&self.counters.failures, 1);
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
    unsafe extern "C" fn alloc_paged_slow(&self, class: usize) -> *mut u8 {
        // SAFETY: (whole body) the caller is the owner, so `local`, the queued
        // pages and our segments are ours to change.
        unsafe {
            self.drain_remote();
            // Also here, so that a heap that keeps allocating in the segments
            // it has still gives retained segments and idle pages back in time.
            self.release_unused();
            loop {
                let page = self.local().bins[class];
                if page.is_null() {
                    if self.new_paged_page(class).is_null() {
                        self.count_failure();
                        return ptr::null_mut();
                    }
                    continue;
                }
                let block = self.take_free_block(&*page, class);
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
        // SAFETY: the caller is the owner.
        unsafe { self.release_unused() };
        if size <= MAX_LARGE_SIZE {
            let span = size.div_ceil(SLOT_SIZE);
            // SAFETY: the caller is the owner.
            let Some((seg, first)) = (unsafe { self.take_slots(span) }) else {
                self.count_failure();
                return ptr::null_mut();
            };
            let usable = span * SLOT_SIZE;
            // SAFETY: `take_slots` reserved the span in our segment.
            unsafe {
                let page = &*ptr::addr_of_mut!((*seg).pages[first]);
                page.block_size.set(usable);
                page.class.set(LARGE_CLASS as u8);
                page.used.set(1);
                page.free.set(ptr::null_mut());
            }
            self.count_big_alloc(LARGE_CLASS, usable);
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
        unsafe {
            ptr::addr_of_mut!((*seg).heap).write(self);
            ptr::addr_of_mut!((*seg).kind).write(SegmentKind::Huge);
            ptr::addr_of_mut!((*seg).map_size).write(map_size);
            let page = &*ptr::addr_of_mut!((*seg).pages[0]);
            page.block_size.set(usable);
            page.class.set(HUGE_CLASS as u8);
            page.used.set(1);
            page.span.set(1);
            page.set_first(0);
        }
        os::publish_segment(base);
        add_serial(&self.counters.mapped_bytes, map_size as u64);
        self.count_big_alloc(HUGE_CLASS, usable);
        // SAFETY: the block starts inside the mapping.
        unsafe { base.add(HUGE_BLOCK_OFFSET) }
    }

    /// Starts a page for `class` and queues it at the head; null if out of memory.
    ///
    /// # Safety
    ///
    /// The caller is the owner.
    unsafe fn new_paged_page(&self, class: usize) -> *mut Page {
        let span = page_slots(class);
        // SAFETY: the caller is the owner.
        let Some((seg, first)) = (unsafe { self.take_slots(span) }) else { return ptr::null_mut() };
        let size = class_size(class);
        let start = slot_address(seg, first);
        let capacity = span * SLOT_SIZE / size;
        // SAFETY: `take_slots` reserved the span in our segment.
        unsafe {
            let page_ptr = ptr::addr_of_mut!((*seg).pages[first]);
            let page = &*page_ptr;
            page.block_size.set(size);
            page.class.set(class as u8);
            page.used.set(0);
            page.free.set(ptr::null_mut());
            page.bump.set(start);
            page.end.set(start.add(capacity * size));
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
    unsafe fn take_slots(&self, span: usize) -> Option<(*mut Segment, usize)> {
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
            s.pages[first].queued.set(false);
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
            let seg = if !local.retained.is_null() {
                let seg = local.retained;
                local.retained = (*seg).next.get();
                self.release_expired(os::now_nanos());
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
            Some(seg)
        }
    }

    // ----- page queues (owner only) -----

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
            p.queued.set(true);
        }
    }

    /// Makes `page` (or none) the current page of `class`, in `bins` and in
    /// the direct table.
    ///
    /// # Safety
    ///
    /// The caller is the owner; `page` is null or a live page of ours for `class`.
    unsafe fn set_bin(&self, class: usize, page: *mut Page) {
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
    unsafe fn enqueue_second(&self, page: *mut Page) {
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
            p.queued.set(true);
        }
    }

    /// # Safety
    ///
    /// The caller is the owner; `page` is queued.
    unsafe fn unqueue(&self, page: *mut Page) {
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
            p.queued.set(false);
        }
    }

    // ----- giving blocks back -----

    /// The owner frees `block` of `page` (counted as an owner free).
    ///
    /// # Safety
    ///
    /// The caller is the owner; `block` is a live block of `page`, a page of ours.
    #[inline]
    unsafe fn free_local(&self, page: *mut Page, block: *mut u8) {
        // SAFETY: per the contract.
        unsafe {
            self.count_owner_free(&*page);
            self.give_back(page, block);
        }
    }

    /// Counts the owner's free of a block of `p`.
    ///
    /// # Safety
    ///
    /// The caller is the owner; `p` is a live page of ours.
    #[inline(always)]
    unsafe fn count_owner_free(&self, p: &Page) {
        let class = p.class.get() as usize;
        let size = p.block_size.get();
        // SAFETY: a page's class is a paged class, LARGE_CLASS or HUGE_CLASS: all < STAT_CLASSES.
        add_serial(unsafe { self.counters.frees.get_unchecked(class) }, 1);
        if class >= PAGED_CLASSES {
            add_serial(&self.counters.big_owner_bytes, (size as u64).wrapping_neg());
        }
        // SAFETY: the caller is the owner.
        unsafe { self.give_room(size) };
    }

    /// Returns `block` to `page` (no counting): the structural half of a free.
    ///
    /// # Safety
    ///
    /// The caller is the owner (or holds `lock` while ended); `block` is a
    /// block of `page` that is not on any free list.
    #[inline]
    unsafe fn give_back(&self, page: *mut Page, block: *mut u8) {
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

    /// Releases an empty paged page's slots.
    ///
    /// # Safety
    ///
    /// The caller is the owner (or holds `lock` while ended); the page is queued and empty.
    #[cold]
    unsafe fn retire_page(&self, page: *mut Page) {
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
    unsafe fn retire_single(&self, page: *mut Page, block: *mut u8) {
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
    unsafe fn release_unused(&self) {
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
            let local = self.local();
            let limit = local.retain_nanos;
            let mut pending = local.idle;
            while pending != 0 {
                let class = pending.trailing_zeros() as usize;
                pending &= pending - 1;
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
    unsafe fn release_expired(&self, now: u64) {
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

    /// Someone other than the owner frees `block` of `page`.
    ///
    /// # Safety
    ///
    /// `block` is a live block of `page`, a page of this heap; the caller is not the owner.
    #[cold]
    unsafe fn free_foreign(&self, page: *mut Page, block: *mut u8) {
        // SAFETY: `class` and `block_size` do not change while the block is live.
        let (class, size) = unsafe { ((*page).class.get() as usize, (*page).block_size.get()) };
        self.counters.remote_frees[class].fetch_add(1, Ordering::Relaxed);
        self.counters.remote_bytes.fetch_add(size as u64, Ordering::Relaxed);
        loop {
            if self.state.load(Ordering::SeqCst) == ACTIVE {
                self.push_remote(block as *mut Block);
                // If the heap ended meanwhile, the ender may have drained
                // before our push: drain ourselves (under the lock).
                if self.state.load(Ordering::SeqCst) == ENDED {
                    let _guard = self.lock.lock();
                    if self.state.load(Ordering::Relaxed) == ENDED {
                        // SAFETY: we hold the lock of an ended heap.
                        unsafe { self.drain_remote() };
                    }
                }
                return;
            }
            let guard = self.lock.lock();
            if self.state.load(Ordering::Relaxed) == ENDED {
                // SAFETY: we hold the lock of an ended heap, and the block is live.
                unsafe {
                    self.drain_remote();
                    self.give_back(page, block);
                }
                return;
            }
            // Adopted meanwhile: push it to the new owner instead.
            drop(guard);
        }
    }

    fn push_remote(&self, block: *mut Block) {
        let mut head = self.remote.load(Ordering::Relaxed);
        loop {
            // SAFETY: the block is ours to write until it is published by the swap below.
            unsafe { (*block).next = head };
            match self.remote.compare_exchange_weak(head, block, Ordering::SeqCst, Ordering::Relaxed) {
                Ok(_) => return,
                Err(now) => head = now,
            }
        }
    }

    /// Gives every remotely freed block back to its page.
    ///
    /// # Safety
    ///
    /// The caller is the owner (or holds `lock` while ended).
    unsafe fn drain_remote(&self) {
        if self.remote.load(Ordering::Relaxed).is_null() {
            return;
        }
        let mut block = self.remote.swap(ptr::null_mut(), Ordering::SeqCst);
        while !block.is_null() {
            // SAFETY: blocks on our stack are blocks of our pages, pushed whole
            // (the swap's Acquire side orders their `next` writes before us).
            unsafe {
                let next = (*block).next;
                let seg = segment_of(block as *const u8);
                self.give_back(page_of(seg, block as *const u8), block as *mut u8);
                block = next;
            }
        }
    }

    // ----- transitions -----

    /// Ends the heap: it has no owner from now on. Pending remote frees are
    /// reclaimed, empty pages and segments go back to the OS, and the free
    /// parts of segments that still hold live blocks are discarded. Live
    /// blocks stay valid; later frees of them are served under the lock.
    ///
    /// # Safety
    ///
    /// The owner must not run on this heap during or after the call (the
    /// owner calls it itself, or its exclusion is gone for good).
    pub unsafe fn end(&self) {
        let _guard = self.lock.lock();
        if self.state.load(Ordering::Relaxed) == ENDED {
            return;
        }
        self.owner.store(ENDED_OWNER, Ordering::Relaxed);
        self.state.store(ENDED, Ordering::SeqCst);
        // SAFETY: we hold the lock and the heap is ended (no owner runs).
        unsafe {
            self.drain_remote();
            for class in 0..PAGED_CLASSES {
                let mut page = self.local().bins[class];
                while !page.is_null() {
                    let next = (*page).next.get();
                    if (*page).used.get() == 0 {
                        self.retire_page(page);
                    }
                    page = next;
                }
            }
            // An ended heap keeps no free memory: u64::MAX is later than any stamp.
            self.release_expired(u64::MAX);
            let local = self.local();
            let mut seg = local.segments;
            while !seg.is_null() {
                let free = (*seg).free_slots.get();
                for slot in 1..SLOTS {
                    if free & (1 << slot) != 0 {
                        os::discard(slot_address(seg, slot), SLOT_SIZE);
                    }
                }
                seg = (*seg).next.get();
            }
        }
    }

    /// Gives an ended heap a new owner; false if it was not ended.
    pub fn adopt(&self, owner: usize) -> bool {
        debug_assert!(owner != NO_OWNER && owner != ENDED_OWNER);
        let _guard = self.lock.lock();
        if self.state.load(Ordering::Relaxed) != ENDED {
            return false;
        }
        // SAFETY: we hold the lock of an ended heap.
        unsafe { self.drain_remote() };
        self.owner.store(owner, Ordering::Relaxed);
        self.state.store(ACTIVE, Ordering::SeqCst);
        true
    }

    // ----- fork -----

    /// Takes the heap's lock and keeps it (for `fork`: see [`fork_prepare`](super::fork_prepare)).
    pub(super) fn lock_for_fork(&self) {
        std::mem::forget(self.lock.lock());
    }

    /// Releases the lock taken by `lock_for_fork`.
    ///
    /// # Safety
    ///
    /// `lock_for_fork` was called and its lock is not released yet.
    pub(super) unsafe fn unlock_after_fork(&self) {
        // SAFETY: per the contract, we hold the lock and no guard exists.
        unsafe { self.lock.force_unlock() };
    }

    // ----- figures -----

    /// The heap's figures now. Each figure is exact; a heap in use may change between reads.
    pub fn snapshot(&self) -> HeapSnapshot {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        // Remote bytes first: read after the owner's figure, a remote free
        // that lands in between could make live bytes briefly negative.
        let remote_bytes = load(&c.remote_bytes);
        let big_owner_bytes = load(&c.big_owner_bytes);
        let classes: Vec<ClassSnapshot> = (0..STAT_CLASSES)
            .map(|class| ClassSnapshot {
                block_size: if class < PAGED_CLASSES { class_size(class) as u64 } else { 0 },
                allocations: load(&c.allocations[class]),
                frees: load(&c.frees[class]),
                remote_frees: load(&c.remote_frees[class]),
            })
            .collect();
        let paged_owner_bytes = classes
            .iter()
            .map(|k| k.allocations.wrapping_sub(k.frees).wrapping_mul(k.block_size))
            .fold(0u64, u64::wrapping_add);
        let owner_bytes = paged_owner_bytes.wrapping_add(big_owner_bytes);
        HeapSnapshot {
            label: self.label,
            ended: self.is_ended(),
            live_bytes: owner_bytes.wrapping_sub(remote_bytes) as i64,
            peak_bytes: load(&c.peak_bytes),
            reallocations: load(&c.reallocations),
            failures: load(&c.failures),
            mapped_bytes: load(&c.mapped_bytes),
            classes,
        }
    }
}

// ----- pointer lookups (any thread) -----

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
/// block is a small block of a queued page (only paged pages are ever
/// queued). Otherwise it returns false and touches nothing; the caller then
/// calls [`free`]. Its only call, when the page became empty, is a tail
/// call, so the caller's fast path needs no saved registers; `owns` must make
/// no calls.
///
/// # Safety
///
/// As for [`free`]; `owns(heap)` returns true only if the caller owns `heap`.
#[inline(always)]
pub unsafe fn free_fast(ptr: *mut u8, owns: impl FnOnce(*const Heap) -> bool) -> bool {
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
        if !p.queued.get() {
            return false;
        }
        // SAFETY (of the hint): only paged pages are ever queued; telling the
        // compiler spares count_owner_free its large-block branch here.
        std::hint::assert_unchecked((p.class.get() as usize) < PAGED_CLASSES);
        heap.count_owner_free(p);
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

/// The usable size of `ptr` if it is one of our live blocks' addresses, else `None`.
///
/// # Safety
///
/// If `ptr` is ours it must be a live block (the answer reads its page).
#[inline]
pub unsafe fn usable_size(ptr: *const u8) -> Option<usize> {
    let seg = segment_of(ptr);
    if !os::is_segment(seg as usize) {
        return None;
    }
    // SAFETY: the segment is ours and live while `ptr` is.
    unsafe { Some((*page_of(seg, ptr)).block_size.get()) }
}

/// The heap owning `ptr`, if `ptr` lies in one of our segments.
///
/// # Safety
///
/// As for [`usable_size`].
pub unsafe fn heap_of(ptr: *const u8) -> Option<&'static Heap> {
    let seg = segment_of(ptr);
    if !os::is_segment(seg as usize) {
        return None;
    }
    // SAFETY: the segment is ours and live while `ptr` is; heaps are never freed.
    unsafe { Some(&*(*seg).heap) }
}

/// Whether `ptr` is the address of a block of ours (live or free), decided
/// without touching memory that is not ours: the segment map first, then our
/// own headers.
// `ptr` itself is never dereferenced, only our segment header (hence the allow).
#[allow(clippy::not_unsafe_ptr_arg_deref)]
pub fn owns(ptr: *const u8) -> bool {
    let addr = ptr as usize;
    let seg = segment_of(ptr);
    if !os::is_segment(seg as usize) {
        return false;
    }
    // SAFETY: the segment is published, so its header is readable. A segment
    // unmapped concurrently is a use-after-free by the caller (the pointer
    // was not live), which this query does not defend against.
    unsafe {
        let offset = addr - seg as usize;
        if (*seg).kind == SegmentKind::Huge {
            return offset == HUGE_BLOCK_OFFSET && (*seg).pages[0].block_size.get() != 0;
        }
        let slot = offset >> SLOT_SHIFT;
        if slot == 0 {
            return false;
        }
        let page = &*page_of(seg, ptr);
        let size = page.block_size.get();
        if size == 0 {
            return false;
        }
        let start = slot_address(seg, page.first.get() as usize) as usize;
        if page.class.get() as usize >= PAGED_CLASSES {
            return addr == start;
        }
        (addr - start).is_multiple_of(size) && addr < page.bump.get() as usize
    }
}
