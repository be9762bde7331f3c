//! The interheap allocator's checking layer: buffer overruns and uses after
//! free in the mem and object domains (`INTERHEAP_CHECK=1 interheap-python`).
//!
//! These two checks change what a block is: a guard after the caller's
//! bytes, and a freed block kept poisoned for a while instead of reused. So
//! every block must be made this way from the start, which only an
//! allocator installed before initialization can promise; the hooks alone
//! (installed later, over blocks CPython already holds) refuse them.
//!
//! # Layout of a checked block of `size` bytes
//!
//! `[size bytes: the caller's][GUARD bytes of GUARD_BYTE][slack][size: the
//! last word of the usable block]`. A free checks the guard (a mismatch is a
//! *buffer overrun*, reported with the freeing call's stack), poisons the
//! whole usable block and puts it in the quarantine instead of freeing it.
//!
//! # Quarantine
//!
//! A FIFO of freed blocks, bounded in bytes and blocks. A block leaves it
//! (and goes back to the allocator underneath) when the bounds are passed;
//! it is checked then, every byte still poison, else it was written after
//! its free (*use after free*, reported with a note that it was noticed
//! late). Sooner: each thread remembers its last frees and the innermost
//! Python frame of each (read at the free, about a thousand instructions),
//! and its next call here checks their first bytes, so a write right after
//! a free is reported at the Python line that freed the block.
//!
//! # Concurrency
//!
//! The quarantine and its sequence numbers are behind one lock, taken by
//! every checked free and by a call that has recent frees to check. A
//! thread's recent frees are checked under that lock, and only while their
//! sequence number says they are still quarantined, so a block that left
//! (and may be someone's live block again) is never read. The guard and
//! trailer of a live block belong to whoever holds the block.

use std::cell::Cell;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::ffi::{c_char, c_int, c_uint, c_void, CString};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering::Relaxed};
use std::sync::OnceLock;

use interheap_engine::checker::FindingKind;
use interheap_engine::heap;
use interheap_engine::sites::FrameText;
use interheap_engine::Domain;
use interheap_sync::SpinLock;
use pyo3_ffi::PyMemAllocatorEx;

/// Bytes of guard after the caller's bytes.
const GUARD: usize = 8;
/// The trailer: the caller's size, in the last word of the usable block.
const TRAILER: usize = 8;
const GUARD_BYTE: u8 = 0xFB;
const POISON: u8 = 0xDF;
/// The quarantine's bounds.
const QUARANTINE_BYTES: usize = 16 << 20;
const QUARANTINE_BLOCKS: usize = 16 << 10;
/// Frees a thread remembers, and the bytes of each its next call checks.
const RECENT: usize = 4;
const RECENT_CHECKED: usize = 64;

/// Whether the checking layer is installed (set once, before initialization).
static ON: AtomicBool = AtomicBool::new(false);

/// Where findings go when not to this library's own checker: the Python
/// module's checker, whose copy of this crate is another library than the
/// launcher's (`interheap_allocator_check_sink`).
/// `file` and `name` are NULL, and `line` -1, when the finding takes the
/// calling thread's stack; else they are the frame where the block was freed.
pub type FindingSink = extern "C" fn(
    kind: c_uint,
    domain: c_uint,
    size: usize,
    note: *const c_char,
    file: *const c_char,
    name: *const c_char,
    line: c_int,
);
static SINK: AtomicPtr<()> = AtomicPtr::new(ptr::null_mut());

/// Sends findings to `sink` (None: to this library's checker).
pub fn set_sink(sink: Option<FindingSink>) {
    SINK.store(sink.map_or(ptr::null_mut(), |f| f as *mut ()), Relaxed);
}

/// Reports a finding of this layer, at `at` (where the block was freed) or
/// with the calling thread's stack.
fn report(kind: FindingKind, domain: Domain, size: usize, note: String, at: Option<FrameText>) {
    let sink = SINK.load(Relaxed);
    if sink.is_null() {
        return crate::checker::report_memory_error(kind, domain, size, note, at);
    }
    // SAFETY: a non-null SINK was stored from a FindingSink by set_sink (as
    // a pointer, not an integer, so it keeps its provenance).
    let sink: FindingSink = unsafe { std::mem::transmute::<*mut (), FindingSink>(sink) };
    let index = FindingKind::ALL.iter().position(|&k| k == kind).unwrap_or(0);
    let text = |s: &str| CString::new(s).unwrap_or_default();
    let note = text(&note);
    let (file, name, line) = match &at {
        Some(f) => (Some(text(&f.file)), Some(text(&f.name)), f.line),
        None => (None, None, -1),
    };
    let ptr_of = |s: &Option<CString>| s.as_ref().map_or(ptr::null(), |s| s.as_ptr());
    sink(index as c_uint, domain.index() as c_uint, size, note.as_ptr(), ptr_of(&file), ptr_of(&name), line);
}

/// The allocator underneath, per domain (mem and object only).
struct Inner(PyMemAllocatorEx);
// SAFETY: plain function pointers and a ctx meant to be called from any thread.
unsafe impl Send for Inner {}
// SAFETY: as above; never changed once set.
unsafe impl Sync for Inner {}
static INNER: [OnceLock<Inner>; Domain::COUNT] = [const { OnceLock::new() }; Domain::COUNT];

struct Quarantined {
    addr: usize,
    usable: usize,
    size: usize,
    domain: Domain,
    seq: u64,
}

#[derive(Default)]
struct Quarantine {
    blocks: VecDeque<Quarantined>,
    bytes: usize,
    /// Sequence number of the next block in.
    next_seq: u64,
    /// Blocks with a smaller sequence number have left.
    left_before: u64,
}

static QUARANTINE: SpinLock<Option<Quarantine>> = SpinLock::new(None);

thread_local! {
    /// This thread's last frees: (address, sequence number + 1), 0 = none.
    static RECENT_FREES: Cell<[(usize, u64); RECENT]> = const { Cell::new([(0, 0); RECENT]) };
    /// Where each of them was freed (the innermost Python frame), if known.
    static RECENT_WHERE: RefCell<[Option<FrameText>; RECENT]> = const { RefCell::new([const { None }; RECENT]) };
}

/// Whether the checking layer is on in this process.
pub fn is_on() -> bool {
    ON.load(Relaxed)
}

/// Wraps `inner`, the allocator for `domain` (mem or object), in the
/// checking layer. Called once per domain, before initialization.
pub(crate) fn wrap(domain: Domain, inner: PyMemAllocatorEx) -> PyMemAllocatorEx {
    ON.store(true, Relaxed);
    let _ = INNER[domain.index()].set(Inner(inner));
    match domain {
        Domain::Mem => checked_allocator::<1>(),
        _ => checked_allocator::<2>(),
    }
}

fn checked_allocator<const D: usize>() -> PyMemAllocatorEx {
    PyMemAllocatorEx {
        ctx: ptr::null_mut(),
        malloc: Some(checked_malloc::<D>),
        calloc: Some(checked_calloc::<D>),
        realloc: Some(checked_realloc::<D>),
        free: Some(checked_free::<D>),
    }
}

fn domain_of<const D: usize>() -> Domain {
    Domain::ALL[D]
}

fn inner<const D: usize>() -> &'static PyMemAllocatorEx {
    &INNER[D].get().expect("the checking layer is installed before it is called").0
}

/// Writes the guard and the trailer of a block of `size` bytes at `p` (ours).
///
/// # Safety
///
/// `p` is a live block of ours of at least `size + GUARD + TRAILER` bytes.
unsafe fn arm(p: *mut u8, size: usize) {
    // SAFETY: `p` is ours and live (the contract).
    let usable = unsafe { heap::usable_size(p) }.unwrap_or(size + GUARD + TRAILER);
    // SAFETY: the block holds size + GUARD + TRAILER <= usable bytes.
    unsafe {
        ptr::write_bytes(p.add(size), GUARD_BYTE, GUARD);
        p.add(usable - TRAILER).cast::<usize>().write_unaligned(size);
    }
}

extern "C" fn checked_malloc<const D: usize>(_ctx: *mut c_void, size: usize) -> *mut c_void {
    check_recent_frees::<D>();
    let Some(total) = size.checked_add(GUARD + TRAILER) else { return ptr::null_mut() };
    let a = inner::<D>();
    let p = a.malloc.map_or(ptr::null_mut(), |m| m(a.ctx, total));
    if !p.is_null() && heap::owns(p as *const u8) {
        // SAFETY: a fresh block of ours of `total` bytes.
        unsafe { arm(p as *mut u8, size) };
    }
    p
}

extern "C" fn checked_calloc<const D: usize>(_ctx: *mut c_void, count: usize, size: usize) -> *mut c_void {
    check_recent_frees::<D>();
    // Fact 8: an overflowing count * size is refused before anything else.
    let Some(total) = count.checked_mul(size).and_then(|n| n.checked_add(GUARD + TRAILER)) else {
        return ptr::null_mut();
    };
    let a = inner::<D>();
    let p = a.calloc.map_or(ptr::null_mut(), |c| c(a.ctx, 1, total));
    if !p.is_null() && heap::owns(p as *const u8) {
        // SAFETY: a fresh block of ours of `total` bytes.
        unsafe { arm(p as *mut u8, total - GUARD - TRAILER) };
    }
    p
}

/// A realloc always moves a block of ours (new block, copy, checked free),
/// so the old one is quarantined like any freed block.
extern "C" fn checked_realloc<const D: usize>(ctx: *mut c_void, p: *mut c_void, size: usize) -> *mut c_void {
    if p.is_null() {
        return checked_malloc::<D>(ctx, size);
    }
    if !heap::owns(p as *const u8) {
        // From before installation: the allocator underneath forwards it.
        let a = inner::<D>();
        return a.realloc.map_or(ptr::null_mut(), |r| r(a.ctx, p, size));
    }
    // SAFETY: a live block of ours (CPython's contract), armed at allocation.
    let old = unsafe { caller_size(p as *mut u8) };
    let q = checked_malloc::<D>(ctx, size);
    if q.is_null() {
        return q; // the old block stays as it was
    }
    // SAFETY: both are live blocks of ours holding at least min(old, size) bytes.
    unsafe { ptr::copy_nonoverlapping(p as *const u8, q as *mut u8, old.min(size)) };
    checked_free::<D>(ctx, p);
    q
}

/// The size the caller asked for, from the trailer of a live block of ours
/// (clamped to what the block can hold).
///
/// # Safety
///
/// `p` is a live block of ours.
unsafe fn caller_size(p: *mut u8) -> usize {
    // SAFETY: the contract.
    let usable = unsafe { heap::usable_size(p) }.unwrap_or(0);
    if usable < GUARD + TRAILER {
        return 0;
    }
    // SAFETY: the trailer is the block's last word.
    let size = unsafe { p.add(usable - TRAILER).cast::<usize>().read_unaligned() };
    size.min(usable - GUARD - TRAILER)
}

extern "C" fn checked_free<const D: usize>(_ctx: *mut c_void, p: *mut c_void) {
    if p.is_null() {
        return;
    }
    check_recent_frees::<D>();
    let a = inner::<D>();
    if !heap::owns(p as *const u8) {
        if let Some(free) = a.free {
            free(a.ctx, p); // from before installation: forwarded underneath
        }
        return;
    }
    let block = p as *mut u8;
    // SAFETY: a live block of ours, given up by the caller.
    let (usable, size) = unsafe { (heap::usable_size(block).unwrap_or(0), caller_size(block)) };
    // SAFETY: the guard lies inside the block (caller_size clamps).
    let guard = unsafe { std::slice::from_raw_parts(block.add(size), GUARD) };
    if let Some(at) = guard.iter().position(|&b| b != GUARD_BYTE) {
        let note = format!(
            "{} byte(s) written past the end of the block, from offset {size}; the block was freed normally",
            GUARD - at
        );
        report(FindingKind::BufferOverrun, domain_of::<D>(), size, note, None);
    }
    // SAFETY: the whole usable block is ours until it leaves the quarantine.
    unsafe { ptr::write_bytes(block, POISON, usable) };
    // Where it was freed: a write right after it is reported at that line.
    let at = crate::sites::innermost_frame_text();
    let _ = RECENT_WHERE.try_with(|r| {
        if let Ok(mut r) = r.try_borrow_mut() {
            r.rotate_right(1);
            r[0] = at;
        }
    });
    let leaving =
        quarantine(Quarantined { addr: p as usize, usable, size, domain: domain_of::<D>(), seq: 0 });
    for gone in leaving {
        release(gone);
    }
}

/// Puts `block` in the quarantine; returns the blocks that must leave.
fn quarantine(mut block: Quarantined) -> Vec<Quarantined> {
    let mut guard = QUARANTINE.lock();
    let q = guard.get_or_insert_with(Quarantine::default);
    block.seq = q.next_seq;
    q.next_seq += 1;
    q.bytes += block.usable;
    let seq = block.seq;
    let addr = block.addr;
    q.blocks.push_back(block);
    let mut leaving = Vec::new();
    while q.bytes > QUARANTINE_BYTES || q.blocks.len() > QUARANTINE_BLOCKS {
        let Some(old) = q.blocks.pop_front() else { break };
        q.bytes -= old.usable;
        q.left_before = old.seq + 1;
        // Checked while still ours: nobody can have it yet.
        check_poison(&old, old.usable, "when it left the quarantine, long after its free", None);
        leaving.push(old);
    }
    drop(guard);
    RECENT_FREES.with(|recent| {
        let mut r = recent.get();
        r.rotate_right(1);
        r[0] = (addr, seq + 1); // + 1: 0 means none
        recent.set(r);
    });
    leaving
}

/// Hands a block that left the quarantine to the allocator underneath.
fn release(block: Quarantined) {
    let a = &INNER[block.domain.index()].get().expect("installed").0;
    if let Some(free) = a.free {
        free(a.ctx, block.addr as *mut c_void);
    }
}

/// Reports a use after free if the first `upto` bytes of a quarantined
/// block are not all poison (then poisons them again, so it is reported once).
fn check_poison(block: &Quarantined, upto: usize, when: &str, at: Option<FrameText>) {
    let p = block.addr as *mut u8;
    // SAFETY: a quarantined block: ours, `usable` bytes, handed to nobody.
    let bytes = unsafe { std::slice::from_raw_parts(p, upto.min(block.usable)) };
    if let Some(offset) = bytes.iter().position(|&b| b != POISON) {
        let note = format!(
            "written after its free, at offset {offset}; noticed {when}; the block was kept out of use"
        );
        report(FindingKind::UseAfterFree, block.domain, block.size, note, at);
        // SAFETY: as above.
        unsafe { ptr::write_bytes(p, POISON, block.usable) };
    }
}

/// Checks the first bytes of this thread's last frees, if any are still in
/// the quarantine: a write right after a free is reported here, with the
/// stack of the code that made it.
#[inline]
fn check_recent_frees<const D: usize>() {
    let recent = RECENT_FREES.with(Cell::get);
    if recent[0].1 == 0 {
        return;
    }
    RECENT_FREES.with(|r| r.set([(0, 0); RECENT]));
    let places = RECENT_WHERE
        .try_with(|r| r.try_borrow_mut().map(|mut r| std::mem::take(&mut *r)).unwrap_or_default())
        .unwrap_or_default();
    let guard = QUARANTINE.lock();
    let Some(q) = guard.as_ref() else { return };
    for ((addr, seq_plus_one), at) in recent.into_iter().zip(places) {
        if seq_plus_one == 0 || seq_plus_one - 1 < q.left_before {
            continue; // none, or it left: not ours to read any more
        }
        let index = (seq_plus_one - 1 - q.left_before) as usize;
        if let Some(block) = q.blocks.get(index).filter(|b| b.addr == addr) {
            let when = "at this thread's next allocator call; the stack is where it was freed";
            check_poison(block, RECENT_CHECKED, when, at);
        }
    }
}

/// For `fork`: the quarantine's lock, held across it (see `allocator`'s handlers).
pub(crate) fn lock_for_fork() {
    std::mem::forget(QUARANTINE.lock());
}

/// Releases what [`lock_for_fork`] took.
///
/// # Safety
///
/// Follows [`lock_for_fork`] on the same thread.
pub(crate) unsafe fn unlock_after_fork() {
    // SAFETY: lock_for_fork holds it and forgot its guard.
    unsafe { QUARANTINE.force_unlock() };
}
