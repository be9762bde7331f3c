//! [`Heap`]: one owner's pages, its remote-free list, and its exact figures.
//!
//! This file holds the heap's state and its life (creation, ending,
//! adoption, `fork`), its figures, and the pointer lookups. What the heap
//! does is split by concern, as mimalloc splits its sources: allocation in
//! `alloc.rs`, frees in `free.rs`, pages and segments in `page.rs`.

use std::cell::UnsafeCell;
use std::ptr;
use std::sync::atomic::{fence, AtomicI64, AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use super::account::Account;
use super::os;
use super::remote::RemoteFrees;
use super::segment::{
    page_of, segment_of, slot_address, Page, Segment, SegmentKind, HUGE_BLOCK_OFFSET, SLOTS, SLOT_SHIFT,
    SLOT_SIZE,
};
use super::size_class::{class_size, DIRECT_SLOTS, HUGE_CLASS, LARGE_CLASS, PAGED_CLASSES, STAT_CLASSES};
use super::stats::{ClassSnapshot, HeapSnapshot};

/// How long an entirely free segment stays resident for reuse (see
/// `Local::retained`). Measured on pyperformance: 100 ms took float's page
/// faults per loop from 4,100 to 430 but raised pyflate's peak RSS by 8%
/// (memory one heap kept while another grew); 20 ms kept 3,000 faults; 50 ms
/// halves them (1,900) and leaves peak RSS within 0.5%.
pub(super) const RETAIN_NANOS: u64 = 50_000_000;

const _: () = assert!(PAGED_CLASSES <= 64, "Local::idle is a bit per paged class");

/// What an empty direct-table entry points to: a page with no free block,
/// so the allocation fast path needs no null test (it falls into the slow
/// path). Never written: only a page with a free block is ever changed.
pub(super) struct EmptyPage(pub(super) Page);
// SAFETY: never written (see above), so sharing it between threads is sound.
unsafe impl Sync for EmptyPage {}
pub(super) static EMPTY_PAGE: EmptyPage = EmptyPage(Page::empty());

/// The owner token of an ended heap; no caller may use it.
pub const ENDED_OWNER: usize = usize::MAX;
/// The token of a caller that owns no heap: it matches no heap.
pub const NO_OWNER: usize = 0;

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
/// the bytes freed remotely. The owner's net bytes are kept only as the
/// distance to the peak trigger (`peak_room`), which the fast paths update
/// anyway to check the peak; readers pair it with the trigger under a
/// sequence lock that only the peak check (a slow path) writes.
///
/// Bytes are block sizes, or, for a heap that keeps requested sizes, the
/// sizes callers asked for (see [`Heap::new_keeping_requested_sizes`]).
pub struct Heap {
    pub(super) owner: AtomicUsize,
    /// Frees by anyone but the owner, the active/ended state and the lock.
    pub(super) remote: RemoteFrees,
    pub(super) label: HeapLabel,
    pub(super) local: UnsafeCell<Local>,
    pub(super) counters: Counters,
    /// Next heap in the registry (set once before the heap is published).
    pub(super) registry_next: *const Heap,
    /// Next heap waiting in a [`HeapPool`](super::HeapPool) (changed under the pool's lock).
    pub(super) pool_next: AtomicPtr<Heap>,
    /// The account whose budget limits this heap's live bytes, or null (set
    /// at creation, never changed; see [`Account`]).
    pub(super) account: *const Account,
    /// Whether the heap keeps each block's requested size (see
    /// [`Heap::new_keeping_requested_sizes`]): its byte figures are then
    /// requested bytes. Set at creation, never changed.
    pub(super) requested: bool,
}

// SAFETY: shared fields are atomics or the lock; `local` and the pages are
// touched only by the owner or under `lock` (see the type docs), and the raw
// pointers refer to segments whose lifetime the heap manages.
unsafe impl Sync for Heap {}
// SAFETY: as above; nothing in a heap is tied to the thread that created it.
unsafe impl Send for Heap {}

/// State only the owner (or the holder of `lock` when ended) touches.
pub(super) struct Local {
    /// Per class, the queue of pages that have free blocks; the head is the current page.
    pub(super) bins: [*mut Page; PAGED_CLASSES],
    /// For requests up to `MAX_DIRECT_SIZE`, by [`direct_index`]: the
    /// current page of the class serving that size (its `bins` head), or
    /// `EMPTY_PAGE`. Saves the fast path the class lookup. Changed only
    /// through `set_bin`, with `bins`.
    pub(super) direct: [*const Page; DIRECT_SLOTS],
    /// Normal segments of this heap.
    pub(super) segments: *mut Segment,
    /// Entirely free normal segments kept mapped, and resident, for reuse:
    /// newest first, linked through `next`, each stamped in `freed_at`. A
    /// program that builds and drops a large structure over and over (most
    /// benchmarks' loops) then reuses the same memory instead of faulting
    /// fresh pages in. One goes back to the OS once it has been free for
    /// `retain_nanos`, or when more than `RETAIN_MAX` are kept (checked
    /// whenever a segment is freed or taken, and on the allocation slow path).
    pub(super) retained: *mut Segment,
    /// How long a retained segment, or an idle page, stays (`RETAIN_NANOS`
    /// unless changed).
    pub(super) retain_nanos: u64,
    /// Bit `class` set: that class's current page spans several slots and
    /// became empty at `idle_since[class]`. It stays, so that a program that
    /// takes and drops one big block over and over does not fault its memory
    /// in each time; once it has been empty for `retain_nanos`, the next slow
    /// path gives its slots back (spans that big are discarded at once). Without
    /// this, every big class kept up to eight blocks resident that nothing
    /// used: 1.1 MiB of a 22 MiB pyperformance run, 5% of peak RSS.
    pub(super) idle: u64,
    pub(super) idle_since: [u64; PAGED_CLASSES],
}

pub(super) struct Counters {
    pub(super) allocations: [AtomicU64; STAT_CLASSES],
    pub(super) frees: [AtomicU64; STAT_CLASSES],
    pub(super) remote_frees: [AtomicU64; STAT_CLASSES],
    /// `peak_trigger` minus the owner's net bytes (allocated minus freed by
    /// the owner, in the heap's unit: block sizes, or requested sizes), so
    /// that the fast paths check the peak with one subtraction (allocation)
    /// or addition (free) and a sign test. Below zero, the peak is checked.
    /// Written only by the owner (plain load and store); read by anyone
    /// through [`Heap::owner_bytes`], which pairs it with `peak_trigger`.
    pub(super) peak_room: AtomicI64,
    /// `peak_bytes` plus the remote bytes seen when the peak was last
    /// checked. Remote bytes only grow, so while the owner's net bytes stay
    /// at or below this, live bytes cannot exceed the peak and the fast path
    /// need not read the shared remote figure. Changed only in `check_peak`,
    /// inside a `peak_epoch` write (see there).
    pub(super) peak_trigger: AtomicU64,
    /// A sequence lock around `check_peak`'s rewrite of the trigger and the
    /// room: odd while it runs. Readers on other threads retry until they
    /// read both under one even value, so the owner's net bytes they derive
    /// were true at one instant. The fast paths never touch it.
    pub(super) peak_epoch: AtomicU64,
    pub(super) remote_bytes: AtomicU64,
    pub(super) peak_bytes: AtomicU64,
    pub(super) reallocations: AtomicU64,
    /// Reallocations that moved a block within this heap (counted in the
    /// classes as an allocation and an owner free too).
    pub(super) moves: AtomicU64,
    pub(super) failures: AtomicU64,
    pub(super) mapped_bytes: AtomicU64,
}

/// Adds `n` to a counter that only one writer changes at a time.
#[inline(always)]
pub(super) fn add_serial(counter: &AtomicU64, n: u64) {
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
        Self::create(label, owner, ptr::null(), false)
    }

    /// [`Heap::new`] for a heap whose live bytes count in `account` (whose
    /// other members, if any, have the same owner): its slow paths refuse
    /// what the account's budget refuses.
    pub fn new_in_account(label: HeapLabel, owner: usize, account: &'static Account) -> &'static Heap {
        let heap = Self::create(label, owner, account, false);
        account.add_member(heap);
        heap
    }

    /// [`Heap::new`] (in `account`, if given) for a heap that keeps the size
    /// each block was asked for, so that its live and peak bytes are the
    /// bytes callers asked for, as a profiler reports them, and
    /// [`requested_size`] answers for its blocks.
    ///
    /// The cost: a small block's page holds a byte (two above 512 bytes)
    /// per block beside its blocks, so a page holds up to 6% fewer blocks
    /// of 16 bytes and under 1% fewer of 128; allocation writes it and
    /// free reads it. Pass `REQUESTED = true` to the fast paths
    /// ([`Heap::alloc_as`], [`free_fast`](super::free_fast)) for this heap.
    pub fn new_keeping_requested_sizes(
        label: HeapLabel,
        owner: usize,
        account: Option<&'static Account>,
    ) -> &'static Heap {
        let heap = Self::create(label, owner, account.map_or(ptr::null(), |a| a as *const Account), true);
        if let Some(account) = account {
            account.add_member(heap);
        }
        heap
    }

    fn create(label: HeapLabel, owner: usize, account: *const Account, requested: bool) -> &'static Heap {
        let heap = Box::leak(Box::new(Heap {
            owner: AtomicUsize::new(owner),
            remote: RemoteFrees::new(),
            label,
            local: UnsafeCell::new(Local {
                bins: [ptr::null_mut(); PAGED_CLASSES],
                direct: [&EMPTY_PAGE.0; DIRECT_SLOTS],
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
                peak_room: AtomicI64::new(0),
                peak_trigger: AtomicU64::new(0),
                peak_epoch: AtomicU64::new(0),
                remote_bytes: AtomicU64::new(0),
                peak_bytes: AtomicU64::new(0),
                reallocations: AtomicU64::new(0),
                moves: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                mapped_bytes: AtomicU64::new(0),
            },
            registry_next: ptr::null(),
            pool_next: AtomicPtr::new(ptr::null_mut()),
            account,
            requested,
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

    /// The account this heap's live bytes count in, if any.
    pub fn account(&self) -> Option<&'static Account> {
        // SAFETY: a non-null account was given as `&'static` at creation.
        unsafe { self.account.as_ref() }
    }

    /// Live bytes as the owner counts them: exact, including remote frees
    /// pushed so far (O(1), unlike a [`snapshot`](Self::snapshot)).
    ///
    /// # Safety
    ///
    /// The caller is the owner.
    pub(super) unsafe fn owner_live_bytes(&self) -> i64 {
        let c = &self.counters;
        // The owner is the only writer of the trigger and the room: no epoch needed.
        let owner_bytes =
            c.peak_trigger.load(Ordering::Relaxed).wrapping_sub(c.peak_room.load(Ordering::Relaxed) as u64);
        owner_bytes.wrapping_sub(c.remote_bytes.load(Ordering::Relaxed)) as i64
    }

    /// The owner's net bytes (allocated minus freed by the owner), read
    /// from any thread: true at one instant during the call (see `peak_epoch`).
    fn owner_bytes(&self) -> u64 {
        let c = &self.counters;
        loop {
            let before = c.peak_epoch.load(Ordering::Acquire);
            let trigger = c.peak_trigger.load(Ordering::Relaxed);
            let room = c.peak_room.load(Ordering::Relaxed);
            // Orders the two reads before the epoch's second read: if either
            // saw a write made after check_peak's release fence, that read
            // sees the odd epoch written before the fence (or a later one).
            fence(Ordering::Acquire);
            if before & 1 == 0 && c.peak_epoch.load(Ordering::Relaxed) == before {
                return trigger.wrapping_sub(room as u64);
            }
            std::hint::spin_loop();
        }
    }

    /// Whether the heap keeps requested sizes (see [`Heap::new_keeping_requested_sizes`]).
    pub fn keeps_requested_sizes(&self) -> bool {
        self.requested
    }

    /// Whether the heap has ended (and not been adopted since).
    pub fn is_ended(&self) -> bool {
        self.remote.is_ended()
    }

    /// # Safety
    ///
    /// The caller is the owner, or holds `lock` while the heap is ended, and
    /// does not keep the reference across a call that may take it again.
    #[allow(clippy::mut_from_ref)]
    #[inline(always)]
    pub(super) unsafe fn local(&self) -> &mut Local {
        // SAFETY: exclusive access per the contract above.
        unsafe { &mut *self.local.get() }
    }

    /// Counts the owner's allocation of a large or huge block: `bytes` in
    /// the heap's unit (see [`Heap::new_keeping_requested_sizes`]).
    pub(super) fn count_big_alloc(&self, class: usize, bytes: usize) {
        debug_assert!(class == LARGE_CLASS || class == HUGE_CLASS);
        add_serial(&self.counters.allocations[class], 1);
        self.add_owner_bytes(bytes);
    }

    /// The owner's net bytes grow by `bytes` outside the paged fast path
    /// (large and huge blocks, and resizing in place), peak checked.
    pub(super) fn add_owner_bytes(&self, bytes: usize) {
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
    pub(super) unsafe fn take_room(&self, bytes: usize) -> bool {
        let room = &self.counters.peak_room;
        // The owner is the only writer: a plain load and store.
        let left = room.load(Ordering::Relaxed).wrapping_sub(bytes as i64);
        room.store(left, Ordering::Relaxed);
        left >= 0
    }

    /// The owner's net bytes shrink by `bytes`.
    ///
    /// # Safety
    ///
    /// The caller is the owner.
    #[inline(always)]
    pub(super) unsafe fn give_room(&self, bytes: usize) {
        let room = &self.counters.peak_room;
        room.store(room.load(Ordering::Relaxed).wrapping_add(bytes as i64), Ordering::Relaxed);
    }

    /// [`check_peak`](Self::check_peak), then hands back `block`: the
    /// allocation fast path ends in a jump here (a C-ABI function cannot
    /// unwind, so the call can be a tail call).
    #[cold]
    pub(super) extern "C" fn check_peak_then(&self, block: *mut u8) -> *mut u8 {
        self.check_peak();
        block
    }

    /// The owner's net bytes passed the trigger: live bytes may be a new peak.
    #[cold]
    pub(super) fn check_peak(&self) {
        let c = &self.counters;
        // Only the owner allocates, hence checks the peak, and only it writes these.
        let trigger = c.peak_trigger.load(Ordering::Relaxed);
        let owner_bytes = trigger.wrapping_sub(c.peak_room.load(Ordering::Relaxed) as u64);
        let remote = c.remote_bytes.load(Ordering::Relaxed);
        // Signed: while remote frees race ahead of the owner's count, live
        // may read below zero, which must never become a peak.
        let live = owner_bytes.wrapping_sub(remote) as i64;
        let mut peak = c.peak_bytes.load(Ordering::Relaxed);
        if live > peak as i64 {
            peak = live as u64;
            c.peak_bytes.store(peak, Ordering::Relaxed);
        }
        let new_trigger = peak.wrapping_add(remote);
        // A sequence-lock write (see `peak_epoch` and `owner_bytes`).
        let epoch = c.peak_epoch.load(Ordering::Relaxed);
        c.peak_epoch.store(epoch.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        c.peak_trigger.store(new_trigger, Ordering::Relaxed);
        c.peak_room.store(new_trigger.wrapping_sub(owner_bytes) as i64, Ordering::Relaxed);
        c.peak_epoch.store(epoch.wrapping_add(2), Ordering::Release);
    }

    pub(super) fn count_failure(&self) {
        add_serial(&self.counters.failures, 1);
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
        let guard = self.remote.lock.lock();
        if self.remote.is_ended() {
            return;
        }
        self.owner.store(ENDED_OWNER, Ordering::Relaxed);
        // SAFETY: (whole block) we hold the lock and the heap is ended (no owner runs).
        unsafe {
            self.remote.end(&guard, |block| self.give_back_pushed(block));
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
        let guard = self.remote.lock.lock();
        if !self.remote.is_ended() {
            return false;
        }
        self.owner.store(owner, Ordering::Relaxed);
        // SAFETY: we hold the lock of an ended heap.
        unsafe { self.remote.adopt(&guard, |block| self.give_back_pushed(block)) }
    }

    // ----- fork -----

    /// Takes the heap's lock and keeps it (for `fork`: see [`fork_prepare`](super::fork_prepare)).
    pub(super) fn lock_for_fork(&self) {
        std::mem::forget(self.remote.lock.lock());
    }

    /// Releases the lock taken by `lock_for_fork`.
    ///
    /// # Safety
    ///
    /// `lock_for_fork` was called and its lock is not released yet.
    pub(super) unsafe fn unlock_after_fork(&self) {
        // SAFETY: per the contract, we hold the lock and no guard exists.
        unsafe { self.remote.lock.force_unlock() };
    }

    // ----- figures -----

    /// The heap's figures now. Each figure is exact; a heap in use may change between reads.
    pub fn snapshot(&self) -> HeapSnapshot {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        // Remote bytes first: read after the owner's figure, a remote free
        // that lands in between could make live bytes briefly negative.
        let remote_bytes = load(&c.remote_bytes);
        let owner_bytes = self.owner_bytes();
        let classes: Vec<ClassSnapshot> = (0..STAT_CLASSES)
            .map(|class| ClassSnapshot {
                block_size: if class < PAGED_CLASSES { class_size(class) as u64 } else { 0 },
                allocations: load(&c.allocations[class]),
                frees: load(&c.frees[class]),
                remote_frees: load(&c.remote_frees[class]),
            })
            .collect();
        HeapSnapshot {
            label: self.label,
            ended: self.is_ended(),
            requested_sizes: self.requested,
            live_bytes: owner_bytes.wrapping_sub(remote_bytes) as i64,
            peak_bytes: load(&c.peak_bytes),
            reallocations: load(&c.reallocations),
            moves: load(&c.moves),
            failures: load(&c.failures),
            mapped_bytes: load(&c.mapped_bytes),
            classes,
        }
    }
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

/// The size `ptr` was asked for if it is one of our live blocks' addresses
/// and its heap keeps requested sizes; its usable size if the heap does not;
/// `None` if it is not ours.
///
/// # Safety
///
/// As for [`usable_size`]; a caller other than the block's holder must not
/// race with its resizing.
#[inline]
pub unsafe fn requested_size(ptr: *const u8) -> Option<usize> {
    let seg = segment_of(ptr);
    if !os::is_segment(seg as usize) {
        return None;
    }
    // SAFETY: the segment is ours and live while `ptr` is; heaps are never freed.
    unsafe { Some((*page_of(seg, ptr)).requested_size(ptr, (*(*seg).heap).requested)) }
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
