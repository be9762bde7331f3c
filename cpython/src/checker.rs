//! The checker's half of the hooks: what `interheap check` finds, decided
//! inside the allocator call, before anything is forwarded.
//!
//! `hooks::install_checking` installs the hooks with their checking
//! branches compiled in (`CHECK = true`); the ordinary hooks have none, so
//! they cost exactly what they cost without a checker. The findings, their
//! grouping, rate limit and quarantine live in `interheap_engine::checker`;
//! this module decides what a call is:
//!
//! * **cross-interpreter free / realloc**: a mem or object block whose
//!   owner's obmalloc state differs from the caller's (DESIGN.md fact 7). The
//!   state of an interpreter is its own if it was created with its own
//!   obmalloc, else main's; the hooks recorded that when the interpreter was
//!   first seen (`interp::describe_current`), so it is known even after the
//!   owner is gone. An unknown state is never a finding. On a default build
//!   the block is *quarantined*: not freed (pymalloc would corrupt the
//!   other state's pools), counted, and left as a leak. A realloc gets a new
//!   block of the caller's, with the bytes copied. On a free-threaded build
//!   both domains are mimalloc, which frees across threads and interpreters
//!   correctly, so the block is forwarded and the finding is a portability one.
//! * **domain mismatch**: the block's record says another domain; the free
//!   or realloc is forwarded to the allocator of the domain that made it.
//! * **no thread state**: a mem or object call with none attached. Its
//!   Python stack is the thread's last attached thread state's, if that one
//!   is still alive (see [`ThreadStates`]). Forwarding it would crash
//!   (pymalloc, and the free-threaded build's mimalloc, find their state
//!   through the thread state), so an allocation is served by the raw
//!   allocator ([`RAW_SERVED`]) and a free of any other block is quarantined.
//! * **double free**: a free or realloc of an address the checker let
//!   through to a free and the allocator has not handed out since
//!   (`FreedAddresses`); not forwarded.
//! * **foreign pointer**: a free or realloc of an address the hooks never
//!   saw that lies inside a loaded program or library (`dladdr`) or inside
//!   the calling thread's stack; not forwarded. Any other address the hooks
//!   never saw is a block allocated before they were installed: forwarded,
//!   and not a finding (the hooks cannot tell it from a foreign heap
//!   pointer; `interheap-python` can).
//! * **leak at interpreter end**: when an interpreter with its own obmalloc
//!   state ends (`interp_end` sees its state freed, CPython's last step),
//!   the mem and object blocks its figures still hold: they outlive the
//!   state that made them. One finding per sampled allocation site of those
//!   blocks when sites are sampled (`check --sites RATE`; `--sites 1`
//!   samples every allocation), else one per domain with the exact blocks
//!   and bytes. Not a finding: raw blocks (the raw domain is process-wide;
//!   keeping one is allowed) and blocks of an interpreter that shares
//!   main's state (a legacy interpreter's interned strings and caches are
//!   main's to keep).

use std::cell::Cell;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;

use interheap_engine::checker::{AddressMap, Finding, FindingKind, Findings};
use interheap_engine::sites::FrameText;
use interheap_engine::{BlockRecord, BucketId, BucketKind, Domain, Nursery};
use pyo3_ffi as ffi;

use crate::hook_thread::InHook;
use crate::hooks::TRACKER;

/// The process's findings.
pub static FINDINGS: Findings = Findings::new();
/// Addresses let through to a free and not handed out since (with the
/// domain they were freed in) that have no granule in the block table
/// (unaligned or out of its range): the others get a tombstone there, which
/// costs no lock of its own and no memory beyond the granule (see
/// [`remember_freed`]).
pub static FREED: AddressMap = AddressMap::new();

/// Remembers that the block at `addr` was let through to a free in `domain`,
/// so that a second free of it is a double free: a tombstone in the block
/// table's granule map, or else an entry in [`FREED`].
#[inline]
fn remember_freed(addr: usize, domain: Domain) {
    if !TRACKER.table().bury(addr, domain) {
        FREED.insert(addr, domain);
    }
}

/// The domain the block at `addr` was freed in, if it was let through to a
/// free and its address not handed out since. Ask only once no live record
/// of `addr` was found: a block recorded since, in a nursery, leaves the
/// tombstone until it reaches the table or is freed.
#[inline]
fn freed_in(addr: usize) -> Option<Domain> {
    TRACKER.table().freed_domain(addr).or_else(|| FREED.get(addr))
}

/// A block was made at `addr` and recorded: an earlier free of the address
/// no longer makes its frees double ones. A tombstone there may stay (live
/// records are looked for first, and recording the block in the table
/// replaces it); an entry in [`FREED`] goes.
#[inline]
fn recorded_at(addr: usize) {
    if !interheap_engine::granule_map::covers(addr) {
        FREED.remove(addr);
    }
}
/// Mem and object blocks served by the raw allocator because the call had no
/// thread state (pymalloc and the free-threaded build's mimalloc find their
/// state through it, so forwarding would crash): their frees, and reallocs,
/// go to the raw allocator too.
pub static RAW_SERVED: AddressMap = AddressMap::new();
/// Whether the installed hooks are the checking ones.
pub static CHECKING: AtomicBool = AtomicBool::new(false);
/// Whether leaks at interpreter end are findings (`check --leaks`): off by
/// default, because CPython itself leaves blocks behind in isolated
/// interpreters (3.14: thousands of object blocks in each interpreter that
/// used `concurrent.interpreters` queues), which would bury an extension's own.
pub static LEAKS: AtomicBool = AtomicBool::new(false);

/// A raw free of an address the hooks never saw (so of unknown size) drops
/// every thread state registered this far above it: the largest block that
/// can hold thread states (an interpreter state, with its first thread state
/// inside) is smaller.
const UNKNOWN_SPAN: usize = 1 << 20;

/// The thread states seen attached in a checked call, while they live.
///
/// A call made with no attached thread state has no current stack; the
/// thread's last attached thread state still holds its Python frames, which
/// do not move while the thread runs C code. Reading them is safe only while
/// that thread state lives, so every raw free (thread states and
/// interpreter states are raw blocks) drops the thread states inside the
/// freed block from here *before* it is forwarded, and a reader holds the
/// lock while it reads. A thread state freed by a path the hooks do not see
/// would stay listed; CPython frees them all with `PyMem_RawFree`.
struct ThreadStates {
    live: Mutex<Vec<usize>>,
    /// Lowest and highest listed address (0 / 0: none), to skip the lock on
    /// raw frees far from every thread state.
    low: AtomicUsize,
    high: AtomicUsize,
}

static THREAD_STATES: ThreadStates =
    ThreadStates { live: Mutex::new(Vec::new()), low: AtomicUsize::new(0), high: AtomicUsize::new(0) };

impl ThreadStates {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<usize>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lists `tstate`, which `thread` (the calling thread) has current.
    #[inline(always)]
    fn note(&self, thread: InHook, tstate: usize) {
        if thread.note_checked_thread_state(tstate) {
            self.list(tstate);
        }
    }

    #[cold]
    #[inline(never)]
    fn list(&self, tstate: usize) {
        let mut live = self.lock();
        if !live.contains(&tstate) {
            live.push(tstate);
            self.bounds(&live);
        }
    }

    fn bounds(&self, live: &[usize]) {
        self.low.store(live.iter().copied().min().unwrap_or(0), Relaxed);
        self.high.store(live.iter().copied().max().unwrap_or(0), Relaxed);
    }

    /// A raw block of `span` bytes at `addr` is about to be freed.
    fn freeing(&self, addr: usize, span: usize) {
        let end = addr.saturating_add(span.max(1));
        if self.high.load(Relaxed) < addr || self.low.load(Relaxed) >= end {
            return;
        }
        let mut live = self.lock();
        live.retain(|&t| !(addr..end).contains(&t));
        self.bounds(&live);
    }
}

#[inline]
fn domain_of<const D: usize>() -> Domain {
    Domain::ALL[D]
}

fn interpreter_id_of(tstate: *mut ffi::PyThreadState) -> Option<i64> {
    // SAFETY: `tstate` is live (the caller holds THREAD_STATES' lock, or it
    // is current); both functions read one field each.
    let id = unsafe { ffi::PyInterpreterState_GetID(ffi::PyThreadState_GetInterpreter(tstate)) };
    (id >= 0).then_some(id)
}

/// The obmalloc state a bucket's blocks come from: its own interpreter's, or
/// main's (0); None when unknown.
fn obmalloc_state(bucket: BucketId) -> Option<i64> {
    match bucket.kind() {
        BucketKind::Interpreter(0) => Some(0),
        BucketKind::Interpreter(id) => {
            let origin = crate::interp::Origin::unpack(TRACKER.ledger().info(bucket))?;
            Some(if origin.own_obmalloc? { id } else { 0 })
        }
        _ => None,
    }
}

/// Whether freeing `rec` from `caller` crosses obmalloc states.
fn crosses_states(rec: &BlockRecord, caller: BucketId) -> bool {
    rec.domain != Domain::Raw
        && rec.owner != caller
        && matches!((obmalloc_state(rec.owner), obmalloc_state(caller)), (Some(a), Some(b)) if a != b)
}

/// Records a finding, with the calling thread's stack (or `tstate`'s).
#[cold]
#[inline(never)]
#[allow(clippy::too_many_arguments)]
fn report(
    kind: FindingKind,
    domain: Domain,
    allocated_in: Option<Domain>,
    owner: Option<BucketId>,
    caller: BucketId,
    size: usize,
    note: String,
    allocated_at: Vec<FrameText>,
) {
    if !FINDINGS.admit_details() {
        FINDINGS.count_only(kind);
        return;
    }
    // SAFETY: called from a checked hook: a current thread state, if any, is
    // attached (CPython called the allocator with it).
    let stack = crate::sites::frames_text(&unsafe { crate::stack::capture() });
    FINDINGS.report(Finding {
        kind,
        domain,
        allocated_in,
        owner,
        caller,
        size,
        stack,
        note: note.into(),
        allocated_at,
    });
}

/// Every checked call first: notes the thread state, or reports a mem or
/// object call made without one. True for such a call: it must not reach
/// the domain's allocator (see [`RAW_SERVED`]).
#[inline]
pub(crate) fn on_call<const D: usize>(thread: InHook, size: usize) -> bool {
    let tstate = thread.thread_state();
    if !tstate.is_null() {
        THREAD_STATES.note(thread, tstate as usize);
        false
    } else if D != Domain::Raw.index() {
        no_thread_state(thread, domain_of::<D>(), size);
        true
    } else {
        false
    }
}

#[cold]
#[inline(never)]
fn no_thread_state(thread: InHook, domain: Domain, size: usize) {
    if !FINDINGS.admit_details() {
        FINDINGS.count_only(FindingKind::NoThreadState);
        return;
    }
    let last = thread.last_checked_thread_state();
    // The lock keeps the thread state alive while its frames are read.
    let (stack, interp) = {
        let live = THREAD_STATES.lock();
        if last != 0 && live.contains(&last) {
            let tstate = last as *mut ffi::PyThreadState;
            // SAFETY: listed, so alive (see ThreadStates); it is this
            // thread's, detached while the thread runs C code, so its frames
            // hold still.
            let captured = unsafe { crate::stack::capture_from(tstate) };
            (crate::sites::frames_text(&captured), interpreter_id_of(tstate))
        } else {
            (Vec::new(), None)
        }
    };
    let note = if cfg!(Py_GIL_DISABLED) {
        "no attached thread state: the call raced with every other thread of the interpreter"
    } else {
        "the GIL was not held: pymalloc is not thread-safe without it"
    };
    FINDINGS.report(Finding {
        kind: FindingKind::NoThreadState,
        domain,
        allocated_in: None,
        owner: None,
        caller: BucketId::for_interpreter(interp),
        size,
        stack,
        note: note.into(),
        allocated_at: Vec::new(),
    });
}

/// A nested call (made by the wrapped allocator inside a hook, such as
/// pymalloc growing its arena list with `PyMem_RawRealloc`) returned
/// `block`: it is live, though not recorded, so an earlier free of its
/// address no longer makes its later free a double one.
#[inline]
pub(crate) fn allocated_nested(block: *mut c_void) {
    if !block.is_null() {
        TRACKER.table().unbury(block as usize);
        FREED.remove(block as usize);
    }
}

/// An allocation returned `block` (the raw allocator's if `raw_served`):
/// its address is live again.
#[inline]
pub(crate) fn allocated<const D: usize>(block: *mut c_void, raw_served: bool) {
    if !block.is_null() {
        recorded_at(block as usize);
        if raw_served {
            RAW_SERVED.insert(block as usize, domain_of::<D>());
        }
    }
}

/// Where a pointer the hooks never saw points, if it cannot be a heap block.
/// Called for every free of a block from before the hooks (free lists make
/// those common), so both answers come from caches: this thread's stack
/// bounds, and the loaded objects' segments ([`IMAGES`]).
fn foreign(addr: usize) -> Option<String> {
    if let Some(name) = IMAGES.containing(addr) {
        return Some(format!("points into {name}, not into any heap; not freed"));
    }
    if on_this_threads_stack(addr) {
        return Some("points into the calling thread's stack; not freed".into());
    }
    None
}

thread_local! {
    /// This thread's stack, [low, high) (0, 0: not read yet; 1, 0: unknown).
    static STACK_BOUNDS: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
}

fn on_this_threads_stack(addr: usize) -> bool {
    let (mut low, mut high) = STACK_BOUNDS.with(Cell::get);
    if (low, high) == (0, 0) {
        (low, high) = read_stack_bounds().unwrap_or((1, 0));
        STACK_BOUNDS.with(|c| c.set((low, high)));
    }
    (low..high).contains(&addr)
}

/// Reads the calling thread's stack bounds (slow for the main thread:
/// glibc reads /proc/self/maps), once per thread.
fn read_stack_bounds() -> Option<(usize, usize)> {
    // SAFETY: `attr` is initialised by pthread_getattr_np before use and
    // destroyed after; the out-parameters are valid.
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        if libc::pthread_getattr_np(libc::pthread_self(), &mut attr) != 0 {
            return None;
        }
        let (mut base, mut size): (*mut c_void, usize) = (std::ptr::null_mut(), 0);
        let ok = libc::pthread_attr_getstack(&attr, &mut base, &mut size) == 0;
        libc::pthread_attr_destroy(&mut attr);
        ok.then(|| (base as usize, (base as usize).saturating_add(size)))
    }
}

/// The loaded program and libraries' segments, for [`foreign`]: rebuilt
/// from `dl_iterate_phdr` whenever the loader's count of loads or unloads
/// changed (read by a `dl_iterate_phdr` that stops at the first object).
struct LoadedImages {
    cache: Mutex<ImageCache>,
}

#[derive(Default)]
struct ImageCache {
    /// (loads, unloads) when built.
    generation: (u64, u64),
    /// (start, end, index into names), sorted by start.
    segments: Vec<(usize, usize, usize)>,
    names: Vec<String>,
}

static IMAGES: LoadedImages = LoadedImages { cache: Mutex::new(ImageCache::new()) };

impl ImageCache {
    const fn new() -> ImageCache {
        ImageCache { generation: (u64::MAX, u64::MAX), segments: Vec::new(), names: Vec::new() }
    }
}

unsafe extern "C" fn read_generation(info: *mut libc::dl_phdr_info, _size: usize, data: *mut c_void) -> i32 {
    // SAFETY: `data` is the (u64, u64) `generation` passes; `info` is the
    // loader's record of an object, valid during the callback.
    unsafe { *(data as *mut (u64, u64)) = ((*info).dlpi_adds, (*info).dlpi_subs) };
    1 // stop: the counters are the same in every record
}

unsafe extern "C" fn collect_segments(info: *mut libc::dl_phdr_info, _size: usize, data: *mut c_void) -> i32 {
    // SAFETY: `data` is the ImageCache `rebuild` passes; `info` and its
    // program headers are valid during the callback.
    unsafe {
        let cache = &mut *(data as *mut ImageCache);
        let info = &*info;
        let name = if info.dlpi_name.is_null() || *info.dlpi_name == 0 {
            "the program".to_string()
        } else {
            std::ffi::CStr::from_ptr(info.dlpi_name).to_string_lossy().into_owned()
        };
        let index = cache.names.len();
        cache.names.push(name);
        for i in 0..info.dlpi_phnum as usize {
            let ph = &*info.dlpi_phdr.add(i);
            if ph.p_type == libc::PT_LOAD {
                let start = (info.dlpi_addr as usize).wrapping_add(ph.p_vaddr as usize);
                cache.segments.push((start, start.wrapping_add(ph.p_memsz as usize), index));
            }
        }
    }
    0
}

impl LoadedImages {
    /// The name of the loaded object whose segments hold `addr`, if any.
    fn containing(&self, addr: usize) -> Option<String> {
        let mut generation = (0u64, 0u64);
        // SAFETY: the callback writes the counters into `generation` only.
        unsafe { libc::dl_iterate_phdr(Some(read_generation), &mut generation as *mut _ as *mut c_void) };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.generation != generation {
            let mut fresh = ImageCache { generation, ..ImageCache::default() };
            // SAFETY: the callback only appends to `fresh`.
            unsafe { libc::dl_iterate_phdr(Some(collect_segments), &mut fresh as *mut _ as *mut c_void) };
            fresh.segments.sort_unstable();
            *cache = fresh;
        }
        let i = cache.segments.partition_point(|&(start, _, _)| start <= addr);
        let &(start, end, index) = cache.segments.get(i.checked_sub(1)?)?;
        (start..end).contains(&addr).then(|| cache.names[index].clone())
    }
}

fn current_bucket() -> BucketId {
    BucketId::for_interpreter(crate::interp::current_interpreter_id())
}

/// A checked free of `ptr` (non-null) through domain `D`: decides, forwards
/// (through `forward_free`, given the domain to free in) or keeps the block.
#[inline(never)]
pub(crate) fn free<const D: usize>(thread: InHook, ptr: *mut c_void, forward_free: impl Fn(Domain)) {
    let domain = domain_of::<D>();
    let addr = ptr as usize;
    let local = thread.existing_nursery();
    let no_thread_state = on_call::<D>(thread, 0);
    let caller = thread.bucket();
    // A block the raw allocator served goes back to it, whoever frees it.
    let raw_served = D != Domain::Raw.index() && RAW_SERVED.remove(addr).is_some();
    match TRACKER.take(local, addr) {
        Some(rec) => {
            if rec.domain == Domain::Raw {
                THREAD_STATES.freeing(addr, rec.size);
                crate::interp_end::raw_freeing(addr, rec.size);
            }
            let crosses = crosses_states(&rec, caller);
            // Where the block was made, if sampled (all of them with --sites 1),
            // read before its sample ends with it.
            let allocated_at = if crosses || rec.domain != domain {
                crate::sites::allocation_stack(addr)
            } else {
                Vec::new()
            };
            crate::hooks::forget_sample(ptr);
            if raw_served {
                TRACKER.account_free(local, rec);
                remember_freed(addr, rec.domain);
                return forward_free(Domain::Raw);
            }
            if no_thread_state && rec.domain != Domain::Raw {
                // Already reported; freeing it without a thread state would crash.
                TRACKER.account_free(local, rec);
                FINDINGS.quarantine(rec.size);
                return;
            }
            if crosses {
                TRACKER.account_free(local, rec);
                if cfg!(Py_GIL_DISABLED) {
                    let note = "forwarded: mimalloc frees across interpreters on free-threaded builds";
                    report_cross(FindingKind::CrossInterpreterFree, domain, &rec, caller, note, allocated_at);
                    remember_freed(addr, rec.domain);
                    forward_free(rec.domain);
                } else {
                    let note = "quarantined: not freed, so the other interpreter's pools stay intact";
                    report_cross(FindingKind::CrossInterpreterFree, domain, &rec, caller, note, allocated_at);
                    FINDINGS.quarantine(rec.size);
                }
                return;
            }
            if rec.domain != domain {
                report_mismatch(domain, &rec, caller, "freed", allocated_at);
            }
            TRACKER.account_free(local, rec);
            // Before forwarding: once freed, another thread may get the address.
            remember_freed(addr, rec.domain);
            forward_free(rec.domain);
        }
        None => {
            if let Some(freed_in) = freed_in(addr) {
                let note = "freed before and not allocated since; not freed again".into();
                report(FindingKind::DoubleFree, domain, Some(freed_in), None, caller, 0, note, Vec::new());
                return;
            }
            if let Some(note) = foreign(addr) {
                report(FindingKind::ForeignPointer, domain, None, None, caller, 0, note, Vec::new());
                return;
            }
            if no_thread_state {
                // Allocated before the hooks, freed without a thread state: keep it.
                return;
            }
            // Allocated before the hooks were installed: not a finding.
            if domain == Domain::Raw {
                THREAD_STATES.freeing(addr, UNKNOWN_SPAN);
            }
            crate::hooks::forget_sample(ptr);
            TRACKER.account_untracked_free(domain);
            remember_freed(addr, domain);
            forward_free(domain);
        }
    }
}

#[cold]
fn report_mismatch(
    domain: Domain,
    rec: &BlockRecord,
    caller: BucketId,
    done: &str,
    allocated_at: Vec<FrameText>,
) {
    let note = format!("{done} through {}'s allocator instead", rec.domain.name());
    let (owner, size) = (Some(rec.owner), rec.size);
    report(FindingKind::DomainMismatch, domain, Some(rec.domain), owner, caller, size, note, allocated_at);
}

#[cold]
fn report_cross(
    kind: FindingKind,
    domain: Domain,
    rec: &BlockRecord,
    caller: BucketId,
    note: &str,
    allocated_at: Vec<FrameText>,
) {
    report(kind, domain, Some(rec.domain), Some(rec.owner), caller, rec.size, note.into(), allocated_at);
}

/// What a checked realloc of a block must do instead of the plain path.
pub(crate) enum ReallocVerdict {
    /// Go on, forwarding to this domain's allocator.
    Forward(Domain),
    /// Return this pointer: the checker handled the call.
    Return(*mut c_void),
}

/// A checked realloc of `ptr` (non-null), after the hooks took its record
/// (`old`). `malloc_in(domain, size)` allocates through a domain's allocator.
pub(crate) fn realloc<const D: usize>(
    thread: InHook,
    local: Option<&Nursery>,
    ptr: *mut c_void,
    size: usize,
    old: Option<BlockRecord>,
    caller: BucketId,
    malloc_in: impl Fn(Domain, usize) -> *mut c_void,
) -> ReallocVerdict {
    let domain = domain_of::<D>();
    let no_thread_state = on_call::<D>(thread, size);
    if D != Domain::Raw.index() && RAW_SERVED.get(ptr as usize).is_some() {
        // Served by the raw allocator: it reallocates it (see `reallocated`).
        return ReallocVerdict::Forward(Domain::Raw);
    }
    match old {
        Some(rec) if no_thread_state && rec.domain != Domain::Raw => {
            // Reallocating it here would crash: a raw block, the bytes copied.
            move_out(local, ptr, size, rec, caller, Domain::Raw, &malloc_in)
        }
        Some(rec) if crosses_states(&rec, caller) && !cfg!(Py_GIL_DISABLED) => {
            let note = "moved to a new block of the caller's; the old one is quarantined";
            let allocated_at = crate::sites::allocation_stack(ptr as usize);
            report_cross(FindingKind::CrossInterpreterRealloc, domain, &rec, caller, note, allocated_at);
            move_out(local, ptr, size, rec, caller, domain, &malloc_in)
        }
        Some(rec) => {
            if crosses_states(&rec, caller) {
                let note = "forwarded: mimalloc reallocates across interpreters on free-threaded builds";
                let allocated_at = crate::sites::allocation_stack(ptr as usize);
                report_cross(FindingKind::CrossInterpreterRealloc, domain, &rec, caller, note, allocated_at);
            }
            if rec.domain != domain {
                let allocated_at = crate::sites::allocation_stack(ptr as usize);
                report_mismatch(domain, &rec, caller, "reallocated", allocated_at);
            }
            ReallocVerdict::Forward(rec.domain)
        }
        None => {
            let addr = ptr as usize;
            if let Some(freed_in) = freed_in(addr) {
                let note = "realloc of a freed block: refused (NULL)".into();
                report(FindingKind::DoubleFree, domain, Some(freed_in), None, caller, size, note, Vec::new());
                return ReallocVerdict::Return(std::ptr::null_mut());
            }
            if let Some(note) = foreign(addr) {
                let note = note.replace("not freed", "refused (NULL)");
                report(FindingKind::ForeignPointer, domain, None, None, caller, size, note, Vec::new());
                return ReallocVerdict::Return(std::ptr::null_mut());
            }
            if no_thread_state {
                // A block from before the hooks: its size is unknown, so it
                // cannot be moved; refuse rather than crash.
                return ReallocVerdict::Return(std::ptr::null_mut());
            }
            ReallocVerdict::Forward(domain)
        }
    }
}

/// Replaces `ptr` (record `rec`) by a new block of `size` bytes from
/// `from`'s allocator, with the bytes copied; the old block is quarantined.
fn move_out(
    local: Option<&Nursery>,
    ptr: *mut c_void,
    size: usize,
    rec: BlockRecord,
    caller: BucketId,
    from: Domain,
    malloc_in: &impl Fn(Domain, usize) -> *mut c_void,
) -> ReallocVerdict {
    let block = malloc_in(from, size.max(1));
    if block.is_null() {
        // The old block stays as it was, with its record.
        TRACKER.reallocated(local, caller, rec.domain, ptr as usize, Some(rec), 0, size);
        return ReallocVerdict::Return(block);
    }
    // SAFETY: the old block holds rec.size bytes and the new one at least
    // size; they are distinct live blocks.
    unsafe { std::ptr::copy_nonoverlapping(ptr as *const u8, block as *mut u8, rec.size.min(size)) };
    crate::hooks::forget_sample(ptr);
    TRACKER.account_free(local, rec);
    FINDINGS.quarantine(rec.size);
    TRACKER.allocated(local, caller, rec.domain, block as usize, size);
    recorded_at(block as usize);
    if from == Domain::Raw && rec.domain != Domain::Raw {
        RAW_SERVED.insert(block as usize, rec.domain);
    }
    ReallocVerdict::Return(block)
}

/// A checked realloc of `ptr` forwarded to `to`'s allocator returned
/// `block` (null: it failed and `ptr` is untouched).
#[inline]
pub(crate) fn reallocated<const D: usize>(ptr: *mut c_void, block: *mut c_void, to: Domain) {
    if block.is_null() {
        return;
    }
    recorded_at(block as usize);
    if to == Domain::Raw && D != Domain::Raw.index() {
        RAW_SERVED.remove(ptr as usize);
        RAW_SERVED.insert(block as usize, domain_of::<D>());
    }
}

/// A finding of the allocator's checking layer (`crate::allocator_check`):
/// a use after free or a buffer overrun of a `domain` block of `size` bytes,
/// with `at` as its stack when given (where the block was freed), else the
/// calling thread's.
#[cold]
pub fn report_memory_error(
    kind: FindingKind,
    domain: Domain,
    size: usize,
    note: String,
    at: Option<FrameText>,
) {
    let caller = current_bucket();
    match at {
        Some(frame) if FINDINGS.admit_details() => FINDINGS.report(Finding {
            kind,
            domain,
            allocated_in: Some(domain),
            owner: Some(caller),
            caller,
            size,
            stack: vec![frame],
            note: note.into(),
            allocated_at: Vec::new(),
        }),
        _ => report(kind, domain, Some(domain), Some(caller), caller, size, note, Vec::new()),
    }
}

/// An interpreter ended (`crate::interp_end`): if it had its own obmalloc
/// state, the mem and object blocks its figures still hold are leaked (see
/// the module docs). Reported per sampled site of those blocks where there
/// are samples, else once per domain with no stack.
pub(crate) fn interpreter_ended(bucket: BucketId) {
    let BucketKind::Interpreter(id) = bucket.kind() else { return };
    if !CHECKING.load(Relaxed) || !LEAKS.load(Relaxed) || obmalloc_state(bucket) != Some(id) || id == 0 {
        return;
    }
    // The census merges what threads' nurseries have not folded yet.
    let census = TRACKER.snapshot();
    let Some(figures) = census.buckets.iter().find(|b| b.bucket == bucket) else { return };
    let sites = crate::sites::SITES.snapshot();
    for domain in [Domain::Mem, Domain::Object] {
        let held = &figures.domains[domain.index()];
        if held.live_bytes <= 0 && held.live_blocks <= 0 {
            continue;
        }
        let in_all = format!(
            "{} block(s), {} B still held by the interpreter in its {} domain when it ended",
            held.live_blocks,
            held.live_bytes,
            domain.name()
        );
        let leaked = |size: u64, stack: Vec<FrameText>, note: String| Finding {
            kind: FindingKind::LeakAtInterpreterEnd,
            domain,
            allocated_in: Some(domain),
            owner: Some(bucket),
            caller: bucket,
            size: size as usize,
            stack,
            note: note.into(),
            allocated_at: Vec::new(),
        };
        let mut sampled = false;
        for site in
            sites.iter().filter(|s| s.bucket == bucket && s.domain == domain && s.totals.live_samples > 0)
        {
            let note = format!("about {} B allocated here (sampled sites); {in_all}", site.totals.live_bytes);
            FINDINGS.report(leaked(site.totals.live_bytes, site.stack.to_vec(), note));
            sampled = true;
        }
        if !sampled {
            let note = format!("{in_all}; run with --sites RATE (--sites 1: every allocation) to see where");
            FINDINGS.report(leaked(held.live_bytes.max(0) as u64, Vec::new(), note));
        }
    }
}

/// Forgets every finding and remembered address (a fresh install).
pub fn reset() {
    LEAKS.store(false, Relaxed);
    FINDINGS.reset();
    FREED.clear();
    RAW_SERVED.clear();
}
