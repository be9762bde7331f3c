//! PEP 445 hooks that wrap the raw, mem and object allocators at run time.
//!
//! Each hook forwards synchronously, on the calling thread, with the caller's
//! arguments unchanged, to the allocator that was installed before it
//! (pymalloc, CPython's mimalloc, tracemalloc, a debug hook, ...), and then
//! records the outcome in [`TRACKER`]. Metadata lives out of band in the
//! engine's sharded block table; pointers and sizes are never altered
//! (DESIGN.md fact 2), so wrapping is safe on every build, including the
//! free-threaded one where mem and object must stay CPython's mimalloc (fact 3).
//!
//! Memory limits: before forwarding an allocation (or a reallocation's
//! growth), a hook asks the interpreter's budget (`Tracker::admit`, the rule
//! in `interheap_engine::limits`). A refused request returns NULL without
//! reaching the allocator, so no pointer changes, and CPython raises
//! MemoryError in that interpreter; a refused realloc leaves the block as it was.
//!
//! # Concurrency invariants
//!
//! * Hooks may run on any number of threads at once (per-interpreter GILs,
//!   free-threading, raw calls with no GIL). They share only [`TRACKER`]
//!   (sharded locks, atomics) and [`FORWARD`] (atomics written by install).
//! * [`FORWARD`] for a domain is written before the hook for that domain is
//!   handed to `PyMem_SetAllocator`, and only then. Installing and
//!   uninstalling must happen while no other thread allocates (fact 2), as
//!   CPython's own `PyMem_SetAllocator` requires; [`CONTROL`] serialises the
//!   control operations themselves.
//! * The `ctx` we register is the previous allocator's own `ctx`. A thread
//!   that reads CPython's allocator struct torn during install (old function
//!   with new ctx, or the reverse) therefore still pairs every function with
//!   the ctx it expects: our hooks ignore their ctx argument.
//! * A hook never re-enters itself: [`HookEntry`] makes nested calls on
//!   the same thread (ours or the wrapped allocator's) forward only.
//! * Each thread records its young blocks in its own nursery (see
//!   `interheap_engine::nursery` for the protocol that lets other threads
//!   free them); the thread-local that holds it retires it at thread exit.
//! * `fork()`: an `atfork` handler holds every table shard across the fork
//!   and marks the forking thread as inside a hook, so the child inherits no
//!   held lock and the forking thread never waits on a lock it holds. In the
//!   child, the nurseries of threads that did not survive are retired.

use std::ffi::c_void;
use std::fmt;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicPtr, Ordering::Acquire, Ordering::Release};
use std::sync::{Mutex, Once};

use interheap_engine::{Admission, BucketId, Domain, FastPath, Tracker};
use pyo3_ffi::{PyMemAllocatorDomain, PyMemAllocatorEx, PyMem_GetAllocator, PyMem_SetAllocator};

use crate::hook_thread::{bucket_of, HookEntry, InHook};
use crate::interp::current_interpreter_id;
use crate::sites::SITES;

type MallocFn = extern "C" fn(*mut c_void, usize) -> *mut c_void;
type CallocFn = extern "C" fn(*mut c_void, usize, usize) -> *mut c_void;
type ReallocFn = extern "C" fn(*mut c_void, *mut c_void, usize) -> *mut c_void;
type FreeFn = extern "C" fn(*mut c_void, *mut c_void);

/// Every block the hooks have seen, and every bucket's figures.
pub static TRACKER: Tracker = Tracker::new();

/// The allocator a domain's hook forwards to. Stored as atomics so that the
/// hooks' reads are well defined even though install writes them at run time.
struct Forward {
    ctx: AtomicPtr<c_void>,
    malloc: AtomicPtr<()>,
    calloc: AtomicPtr<()>,
    realloc: AtomicPtr<()>,
    free: AtomicPtr<()>,
}

/// Never null, so that forwarding tests nothing: until install stores the
/// wrapped allocator (before CPython can call a hook), allocations fail.
static FORWARD: [Forward; Domain::COUNT] = [const {
    Forward {
        ctx: AtomicPtr::new(null_mut()),
        malloc: AtomicPtr::new(refuse_malloc as MallocFn as *mut ()),
        calloc: AtomicPtr::new(refuse_calloc as CallocFn as *mut ()),
        realloc: AtomicPtr::new(refuse_realloc as ReallocFn as *mut ()),
        free: AtomicPtr::new(ignore_free as FreeFn as *mut ()),
    }
}; Domain::COUNT];

extern "C" fn refuse_malloc(_ctx: *mut c_void, _size: usize) -> *mut c_void {
    null_mut()
}

extern "C" fn refuse_calloc(_ctx: *mut c_void, _nelem: usize, _elsize: usize) -> *mut c_void {
    null_mut()
}

extern "C" fn refuse_realloc(_ctx: *mut c_void, _ptr: *mut c_void, _size: usize) -> *mut c_void {
    null_mut()
}

extern "C" fn ignore_free(_ctx: *mut c_void, _ptr: *mut c_void) {}

pub(crate) fn fn_addr<F: Copy>(f: Option<F>) -> *mut () {
    const { assert!(std::mem::size_of::<F>() == std::mem::size_of::<*mut ()>()) };
    // SAFETY: the const assertion above makes `F` exactly pointer-sized (it
    // is only used with the four `extern "C" fn` pointer types), so reading
    // it as a `*mut ()` reads exactly its bytes.
    f.map_or(null_mut(), |f| unsafe { std::mem::transmute_copy::<F, *mut ()>(&f) })
}

impl Forward {
    fn store(&self, a: &PyMemAllocatorEx) {
        // An allocator struct with a missing function (CPython never has
        // one) gets the refusing stand-in, which keeps FORWARD non-null.
        let or = |f: *mut (), stand_in: *mut ()| if f.is_null() { stand_in } else { f };
        self.ctx.store(a.ctx, Release);
        self.malloc.store(or(fn_addr(a.malloc), refuse_malloc as MallocFn as *mut ()), Release);
        self.calloc.store(or(fn_addr(a.calloc), refuse_calloc as CallocFn as *mut ()), Release);
        self.realloc.store(or(fn_addr(a.realloc), refuse_realloc as ReallocFn as *mut ()), Release);
        self.free.store(or(fn_addr(a.free), ignore_free as FreeFn as *mut ()), Release);
    }

    #[inline]
    fn malloc(&self, size: usize) -> *mut c_void {
        let f = self.malloc.load(Acquire);
        // SAFETY: the value is never null: a `MallocFn` stored by `store`, or
        // the stand-in FORWARD starts with.
        let f: MallocFn = unsafe { std::mem::transmute::<*mut (), MallocFn>(f) };
        f(self.ctx.load(Acquire), size)
    }

    #[inline]
    fn calloc(&self, nelem: usize, elsize: usize) -> *mut c_void {
        let f = self.calloc.load(Acquire);
        // SAFETY: the value is never null: a `CallocFn` stored by `store`, or
        // the stand-in FORWARD starts with.
        let f: CallocFn = unsafe { std::mem::transmute::<*mut (), CallocFn>(f) };
        f(self.ctx.load(Acquire), nelem, elsize)
    }

    #[inline]
    fn realloc(&self, ptr: *mut c_void, size: usize) -> *mut c_void {
        let f = self.realloc.load(Acquire);
        // SAFETY: the value is never null: a `ReallocFn` stored by `store`, or
        // the stand-in FORWARD starts with.
        let f: ReallocFn = unsafe { std::mem::transmute::<*mut (), ReallocFn>(f) };
        f(self.ctx.load(Acquire), ptr, size)
    }

    #[inline]
    fn free(&self, ptr: *mut c_void) {
        let f = self.free.load(Acquire);
        // SAFETY: the value is never null: a `FreeFn` stored by `store`, or
        // the stand-in FORWARD starts with.
        let f: FreeFn = unsafe { std::mem::transmute::<*mut (), FreeFn>(f) };
        f(self.ctx.load(Acquire), ptr)
    }
}

const fn domain_of<const D: usize>() -> Domain {
    match Domain::from_index(D) {
        Some(d) => d,
        None => panic!("domain index out of range"),
    }
}

fn current_bucket() -> BucketId {
    BucketId::for_interpreter(current_interpreter_id())
}

/// Whether CPython serialises every update of `D`'s figures for one bucket
/// (see `Tracker::set_serialized`, which install sets to the same).
const fn serialized<const D: usize>() -> bool {
    D != Domain::Raw.index() && !cfg!(Py_GIL_DISABLED)
}

/// The allocation fast path, entered when no limit is set, no peak is
/// watched, the hooks are not checking, and the thread was not inside a hook
/// (`entry`). Then an allocation needs only the thread's own state
/// (`Tracker::allocated_fast`) unless the block says otherwise. `SAMPLE`:
/// sites are sampled too (a separate copy, so that the common one tests
/// nothing for it).
#[inline(always)]
fn fast_allocate<const D: usize, const SAMPLE: bool>(
    entry: HookEntry,
    size: usize,
    forward: impl FnOnce() -> *mut c_void,
) -> *mut c_void {
    // Forward first: fewer values then live across the two calls (the
    // interpreter cannot change inside the allocator).
    let block = forward();
    let id = entry.interpreter_id();
    record_allocation::<D>(entry.view(), id, block, size);
    if SAMPLE && !block.is_null() && entry.sample_due(size) {
        crate::sites::sample(block as usize, bucket_of(id), domain_of::<D>(), size);
    }
    block
}

/// Records what an allocation of `size` bytes by interpreter `id` returned:
/// in the thread's nursery when the fast record takes it, else generally.
#[inline(always)]
fn record_allocation<const D: usize>(thread: InHook, id: i64, block: *mut c_void, size: usize) {
    if block.is_null()
        || !TRACKER.allocated_fast(
            thread.fast_nursery(),
            id,
            domain_of::<D>(),
            serialized::<D>(),
            block as usize,
            size,
        )
    {
        allocated_general::<D>(thread, id, block, size);
    }
}

/// An allocation on the fast path came back, but the fast record could not
/// take it (a failure, another bucket, a busy nursery slot): the general one.
#[cold]
#[inline(never)]
fn allocated_general<const D: usize>(thread: InHook, id: i64, block: *mut c_void, size: usize) {
    let owner = bucket_of(id);
    if block.is_null() {
        TRACKER.failed(thread.existing_nursery(), owner, domain_of::<D>());
    } else {
        TRACKER.allocated(thread.nursery(), owner, domain_of::<D>(), block as usize, size);
    }
}

/// The fast path with a memory limit set: the general path's order
/// (admission before forwarding, so that a refused request never reaches the
/// allocator; settled after the block is counted) around the fast record.
/// Out of line; `None`: the call is nested in a hook.
#[inline(never)]
fn fast_allocate_limited<const D: usize>(
    size: usize,
    forward: impl FnOnce() -> *mut c_void,
) -> Option<*mut c_void> {
    let entry = HookEntry::enter()?;
    let id = entry.interpreter_id();
    let owner = bucket_of(id);
    let admission = TRACKER.admit(owner, size);
    let block = if admission.allowed() { forward() } else { null_mut() };
    record_allocation::<D>(entry.view(), id, block, size);
    TRACKER.settle(owner, size, admission);
    Some(block)
}

/// [`fast_allocate`] with sampling, out of line; `None`: the call is nested
/// in a hook (the general path takes it).
#[inline(never)]
fn fast_allocate_sampled<const D: usize>(
    size: usize,
    forward: impl FnOnce() -> *mut c_void,
) -> Option<*mut c_void> {
    Some(fast_allocate::<D, true>(HookEntry::enter()?, size, forward))
}

// The fast path unless checking, limits with sampling, watched peaks or
// nesting say otherwise; the no-sampling case decided by one test. The match
// is written out in each hook: a shared helper (returning an `Option`, or
// taking the general path as a closure) cost 4 more instructions per pair.
extern "C" fn hook_malloc<const D: usize, const CHECK: bool>(ctx: *mut c_void, size: usize) -> *mut c_void {
    if !CHECK {
        match TRACKER.fast_path() {
            FastPath::Plain => {
                if let Some(entry) = HookEntry::enter() {
                    return fast_allocate::<D, false>(entry, size, || FORWARD[D].malloc(size));
                }
            }
            FastPath::Sampled => {
                if let Some(block) = fast_allocate_sampled::<D>(size, || FORWARD[D].malloc(size)) {
                    return block;
                }
            }
            FastPath::Limited => {
                if let Some(block) = fast_allocate_limited::<D>(size, || FORWARD[D].malloc(size)) {
                    return block;
                }
            }
            FastPath::General => {}
        }
    }
    hook_malloc_general::<D, CHECK>(ctx, size)
}

#[inline(never)]
fn hook_malloc_general<const D: usize, const CHECK: bool>(_ctx: *mut c_void, size: usize) -> *mut c_void {
    let forward = &FORWARD[D];
    let Some(entry) = HookEntry::enter() else {
        let block = forward.malloc(size);
        if CHECK {
            crate::checker::allocated_nested(block);
        }
        return block;
    };
    // The checker may send a call without a thread state to the raw allocator.
    let raw_served = CHECK && crate::checker::on_call::<D>(entry.view(), size);
    let forward = if raw_served { &FORWARD[Domain::Raw.index()] } else { forward };
    let owner = entry.bucket();
    let admission = TRACKER.admit(owner, size);
    let block = if admission.allowed() { forward.malloc(size) } else { null_mut() };
    if block.is_null() {
        TRACKER.failed(entry.existing_nursery(), owner, domain_of::<D>());
    } else {
        TRACKER.allocated(entry.nursery(), owner, domain_of::<D>(), block as usize, size);
        maybe_sample::<D>(&entry, block, owner, size);
        if CHECK {
            crate::checker::allocated::<D>(block, raw_served);
        }
    }
    TRACKER.settle(owner, size, admission);
    block
}

/// Sampled allocation sites (`crate::sites`): one load while sampling is off.
#[inline(always)]
fn maybe_sample<const D: usize>(entry: &HookEntry, block: *mut c_void, owner: BucketId, size: usize) {
    if SITES.rate() != 0 && entry.sample_due(size) {
        crate::sites::sample(block as usize, owner, domain_of::<D>(), size);
    }
}

/// A block that may have been sampled is going away (freed, or moved by realloc).
#[inline(always)]
pub(crate) fn forget_sample(ptr: *mut c_void) {
    if SITES.may_hold(ptr as usize) {
        SITES.freed(ptr as usize);
    }
}

extern "C" fn hook_calloc<const D: usize, const CHECK: bool>(
    ctx: *mut c_void,
    nelem: usize,
    elsize: usize,
) -> *mut c_void {
    // Fact 8: an overflowing nelem * elsize is refused before forwarding (general path).
    let Some(size) = nelem.checked_mul(elsize) else {
        return hook_calloc_general::<D, CHECK>(ctx, nelem, elsize);
    };
    if !CHECK {
        match TRACKER.fast_path() {
            FastPath::Plain => {
                if let Some(entry) = HookEntry::enter() {
                    return fast_allocate::<D, false>(entry, size, || FORWARD[D].calloc(nelem, elsize));
                }
            }
            FastPath::Sampled => {
                if let Some(block) = fast_allocate_sampled::<D>(size, || FORWARD[D].calloc(nelem, elsize)) {
                    return block;
                }
            }
            FastPath::Limited => {
                if let Some(block) = fast_allocate_limited::<D>(size, || FORWARD[D].calloc(nelem, elsize)) {
                    return block;
                }
            }
            FastPath::General => {}
        }
    }
    hook_calloc_general::<D, CHECK>(ctx, nelem, elsize)
}

#[inline(never)]
fn hook_calloc_general<const D: usize, const CHECK: bool>(
    _ctx: *mut c_void,
    nelem: usize,
    elsize: usize,
) -> *mut c_void {
    let forward = &FORWARD[D];
    let Some(entry) = HookEntry::enter() else {
        let block = forward.calloc(nelem, elsize);
        if CHECK {
            crate::checker::allocated_nested(block);
        }
        return block;
    };
    let raw_served = CHECK && crate::checker::on_call::<D>(entry.view(), nelem.saturating_mul(elsize));
    let forward = if raw_served { &FORWARD[Domain::Raw.index()] } else { forward };
    let owner = entry.bucket();
    // Fact 8: refuse an overflowing nelem * elsize before forwarding.
    let Some(size) = nelem.checked_mul(elsize) else {
        TRACKER.failed(entry.existing_nursery(), owner, domain_of::<D>());
        return null_mut();
    };
    let admission = TRACKER.admit(owner, size);
    let block = if admission.allowed() { forward.calloc(nelem, elsize) } else { null_mut() };
    if block.is_null() {
        TRACKER.failed(entry.existing_nursery(), owner, domain_of::<D>());
    } else {
        TRACKER.allocated(entry.nursery(), owner, domain_of::<D>(), block as usize, size);
        maybe_sample::<D>(&entry, block, owner, size);
        if CHECK {
            crate::checker::allocated::<D>(block, raw_served);
        }
    }
    TRACKER.settle(owner, size, admission);
    block
}

extern "C" fn hook_realloc<const D: usize, const CHECK: bool>(
    _ctx: *mut c_void,
    ptr: *mut c_void,
    size: usize,
) -> *mut c_void {
    let forward = &FORWARD[D];
    let Some(entry) = HookEntry::enter() else {
        let block = forward.realloc(ptr, size);
        if CHECK {
            crate::checker::allocated_nested(block);
        }
        return block;
    };
    let owner = entry.bucket();
    if ptr.is_null() {
        let raw_served = CHECK && crate::checker::on_call::<D>(entry.view(), size);
        let forward = if raw_served { &FORWARD[Domain::Raw.index()] } else { forward };
        // realloc(NULL, n) is an allocation.
        let admission = TRACKER.admit(owner, size);
        let block = if admission.allowed() { forward.realloc(ptr, size) } else { null_mut() };
        if block.is_null() {
            TRACKER.failed(entry.existing_nursery(), owner, domain_of::<D>());
        } else {
            TRACKER.allocated(entry.nursery(), owner, domain_of::<D>(), block as usize, size);
            maybe_sample::<D>(&entry, block, owner, size);
            if CHECK {
                crate::checker::allocated::<D>(block, raw_served);
            }
        }
        TRACKER.settle(owner, size, admission);
        return block;
    }
    // Forget the old address first: once the allocator moves the block,
    // another thread may be handed the old address and record it.
    let local = entry.nursery();
    let old = TRACKER.reallocating(local, ptr as usize);
    // The checker may answer itself, or send the call to the block's own domain.
    let mut target = domain_of::<D>();
    if CHECK {
        let malloc_in = |d: Domain, n: usize| FORWARD[d.index()].malloc(n);
        match crate::checker::realloc::<D>(entry.view(), local, ptr, size, old, owner, malloc_in) {
            crate::checker::ReallocVerdict::Return(block) => return block,
            crate::checker::ReallocVerdict::Forward(domain) => target = domain,
        }
    }
    let forward = &FORWARD[target.index()];
    // Growth is charged to the block's owner (whose live bytes grow); a block
    // we never saw counts as a new one of the caller's.
    let (charged, growth) = match old {
        Some(rec) => (rec.owner, size.saturating_sub(rec.size)),
        None => (owner, size),
    };
    let admission = if growth > 0 { TRACKER.admit(charged, growth) } else { Admission::Unlimited };
    // A refused realloc leaves the block as it was (the record goes back).
    let block = if admission.allowed() { forward.realloc(ptr, size) } else { null_mut() };
    TRACKER.reallocated(local, owner, domain_of::<D>(), ptr as usize, old, block as usize, size);
    TRACKER.settle(charged, growth, admission);
    if !block.is_null() {
        // The old block is gone (moved or resized): a sample of it ends, and
        // the new size counts toward the next sample like an allocation.
        forget_sample(ptr);
        maybe_sample::<D>(&entry, block, charged, size);
    }
    if CHECK {
        crate::checker::reallocated::<D>(ptr, block, target);
    }
    block
}

extern "C" fn hook_free<const D: usize, const CHECK: bool>(ctx: *mut c_void, ptr: *mut c_void) {
    // Raw frees also tell interpreter ends apart, and free(NULL) does
    // nothing: both take the general path.
    if D != Domain::Raw.index() && !ptr.is_null() && !CHECK {
        // Limits and sampling rates do not matter to a free.
        if let Some(entry) = HookEntry::enter() {
            let nursery = entry.fast_nursery();
            // Before forwarding: after the free the address may be reused.
            if !TRACKER.freeing_fast(nursery, domain_of::<D>(), serialized::<D>(), ptr as usize) {
                freeing_general::<D>(entry.view(), ptr);
            }
            forget_sample(ptr);
            FORWARD[D].free(ptr);
            return;
        }
    }
    hook_free_general::<D, CHECK>(ctx, ptr)
}

/// A free on the fast path that the fast bookkeeping could not take.
#[cold]
#[inline(never)]
fn freeing_general<const D: usize>(thread: InHook, ptr: *mut c_void) {
    TRACKER.freeing(thread.existing_nursery(), domain_of::<D>(), ptr as usize);
}

#[inline(never)]
fn hook_free_general<const D: usize, const CHECK: bool>(_ctx: *mut c_void, ptr: *mut c_void) {
    let forward = &FORWARD[D];
    if !ptr.is_null() {
        if let Some(entry) = HookEntry::enter() {
            if CHECK {
                // The checker forwards (to the block's own domain) or keeps it.
                let forward_free = |d: Domain| FORWARD[d.index()].free(ptr);
                return crate::checker::free::<D>(entry.view(), ptr, forward_free);
            }
            // Before forwarding: after the free the address may be reused.
            let size = TRACKER.freeing(entry.existing_nursery(), domain_of::<D>(), ptr as usize);
            forget_sample(ptr);
            if D == Domain::Raw.index() {
                if let Some(size) = size {
                    crate::interp_end::raw_freeing(ptr as usize, size);
                }
            }
        } else {
            // Untracked, but a sample or a cached code object must not outlive it.
            forget_sample(ptr);
        }
    }
    forward.free(ptr)
}

fn hooks_for<const D: usize, const CHECK: bool>(ctx: *mut c_void) -> PyMemAllocatorEx {
    PyMemAllocatorEx {
        ctx,
        malloc: Some(hook_malloc::<D, CHECK>),
        calloc: Some(hook_calloc::<D, CHECK>),
        realloc: Some(hook_realloc::<D, CHECK>),
        free: Some(hook_free::<D, CHECK>),
    }
}

pub(crate) fn ffi_domain(domain: Domain) -> PyMemAllocatorDomain {
    match domain {
        Domain::Raw => PyMemAllocatorDomain::PYMEM_DOMAIN_RAW,
        Domain::Mem => PyMemAllocatorDomain::PYMEM_DOMAIN_MEM,
        Domain::Object => PyMemAllocatorDomain::PYMEM_DOMAIN_OBJ,
    }
}

pub(crate) fn get_allocator(domain: Domain) -> PyMemAllocatorEx {
    let mut current =
        PyMemAllocatorEx { ctx: null_mut(), malloc: None, calloc: None, realloc: None, free: None };
    // SAFETY: PyMem_GetAllocator only copies the domain's allocator struct
    // into the out-parameter, which is a valid, writable PyMemAllocatorEx.
    unsafe { PyMem_GetAllocator(ffi_domain(domain), &mut current) };
    current
}

pub(crate) fn set_allocator(domain: Domain, mut allocator: PyMemAllocatorEx) {
    if domain == Domain::Raw {
        // 3.12 would otherwise swap our raw allocator out while other
        // interpreters run (see raw_swap_guard).
        crate::raw_swap_guard::close();
    }
    // SAFETY: `allocator` is a complete, valid allocator struct; CPython
    // copies it. The caller holds CONTROL and, per the module docs, no other
    // thread allocates during install/uninstall.
    unsafe { PyMem_SetAllocator(ffi_domain(domain), &mut allocator) };
}

pub(crate) fn same_allocator(a: &PyMemAllocatorEx, b: &PyMemAllocatorEx) -> bool {
    a.ctx == b.ctx
        && fn_addr(a.malloc) == fn_addr(b.malloc)
        && fn_addr(a.calloc) == fn_addr(b.calloc)
        && fn_addr(a.realloc) == fn_addr(b.realloc)
        && fn_addr(a.free) == fn_addr(b.free)
}

/// What install saved: per domain, what we replaced and what we put there.
#[derive(Clone, Copy)]
struct Installation {
    previous: [PyMemAllocatorEx; Domain::COUNT],
    ours: [PyMemAllocatorEx; Domain::COUNT],
}

// SAFETY: an Installation is plain data (function pointers and opaque ctx
// values that are only ever passed back to those functions); moving it
// between threads is harmless. Access is serialised by CONTROL.
unsafe impl Send for Installation {}

/// Serialises install, uninstall and state queries.
static CONTROL: Mutex<Option<Installation>> = Mutex::new(None);

/// Why a control operation was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HookError {
    /// `install` was called while the hooks are installed.
    AlreadyInstalled,
    /// `uninstall` was called while the hooks are not installed.
    NotInstalled,
    /// Something was installed on top of our hooks since (tracemalloc,
    /// another hook), or replaced them, in these domains.
    NotOnTop(Vec<Domain>),
}

impl fmt::Display for HookError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HookError::AlreadyInstalled => write!(f, "interheap's hooks are already installed"),
            HookError::NotInstalled => write!(f, "interheap's hooks are not installed"),
            HookError::NotOnTop(domains) => {
                let names: Vec<&str> = domains.iter().map(|d| d.name()).collect();
                write!(
                    f,
                    "interheap's hooks are no longer the installed allocator in the {} domain{}: \
                     something installed after them (tracemalloc, another hook) sits on top or \
                     replaced them; remove it first (for tracemalloc: tracemalloc.stop())",
                    names.join(", "),
                    if names.len() == 1 { "" } else { "s" }
                )
            }
        }
    }
}

impl std::error::Error for HookError {}

fn lock_control() -> std::sync::MutexGuard<'static, Option<Installation>> {
    // A panic while holding CONTROL leaves consistent data (each step either
    // happened or not), so a poisoned lock is still usable.
    CONTROL.lock().unwrap_or_else(|e| e.into_inner())
}

extern "C" fn before_fork() {
    crate::hook_thread::set_in_hook(true);
    TRACKER.lock_for_fork();
    SITES.lock_for_fork();
    crate::checker::FREED.lock_for_fork();
    crate::checker::RAW_SERVED.lock_for_fork();
    crate::interp_end::lock_for_fork();
}

extern "C" fn after_fork_in_parent() {
    // SAFETY: runs right after `before_fork` took the locks on this thread.
    unsafe {
        crate::interp_end::unlock_after_fork();
        crate::checker::RAW_SERVED.unlock_after_fork();
        crate::checker::FREED.unlock_after_fork();
        SITES.unlock_after_fork();
        TRACKER.unlock_after_fork();
    }
    crate::hook_thread::set_in_hook(false);
}

extern "C" fn after_fork_in_child() {
    // SAFETY: runs right after `before_fork` took the locks on this thread,
    // which is the child's only thread.
    unsafe {
        crate::interp_end::unlock_after_fork();
        crate::checker::RAW_SERVED.unlock_after_fork();
        crate::checker::FREED.unlock_after_fork();
        SITES.unlock_after_fork();
        TRACKER.unlock_after_fork();
    }
    // The other threads are gone: move their young blocks to the table.
    TRACKER.after_fork_in_child(crate::hook_thread::current_nursery());
    crate::hook_thread::set_in_hook(false);
}

fn register_fork_handlers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: the handlers are `extern "C"` functions with static
        // lifetime that take no arguments, as pthread_atfork requires.
        let rc = unsafe {
            libc::pthread_atfork(Some(before_fork), Some(after_fork_in_parent), Some(after_fork_in_child))
        };
        debug_assert_eq!(rc, 0, "pthread_atfork failed");
    });
}

/// Wraps all three domains. Resets every figure first (a fresh start).
///
/// Call while no other thread allocates (CPython's own rule for
/// `PyMem_SetAllocator`), from a thread attached to the main interpreter.
pub fn install() -> Result<(), HookError> {
    install_with(false)
}

/// [`install`], with the checker's hooks (`crate::checker`) when `checking`.
pub fn install_with(checking: bool) -> Result<(), HookError> {
    let mut control = lock_control();
    if control.is_some() {
        return Err(HookError::AlreadyInstalled);
    }
    register_fork_handlers();
    TRACKER.reset();
    // Frees went unseen while no hooks were on: cached code objects may be gone.
    crate::sites::forget_code();
    // On a default build CPython calls the mem and object allocators only with
    // the GIL of the interpreter that owns the block, which serialises their
    // figures: no locked read-modify-write is needed (see
    // `Tracker::set_serialized`). Raw calls need no GIL; a free-threaded build
    // has none.
    let gil_serialised = !cfg!(Py_GIL_DISABLED);
    TRACKER.set_serialized(Domain::Raw, false);
    TRACKER.set_serialized(Domain::Mem, gil_serialised);
    TRACKER.set_serialized(Domain::Object, gil_serialised);
    // Each interpreter's bucket records where the interpreter came from and
    // whether it is isolated, asked on the bucket's cold path only (see
    // `interp::describe_current`); the symbols are resolved now, not in a hook.
    crate::interp::prepare_describe();
    TRACKER.ledger().set_describer(Some(crate::interp::describe_current));
    // 3.12 records no whence, so a bucket settles during start-up; a default
    // limit then waits for the creator to leave the interpreter.
    TRACKER.require_start_signal(!crate::interp::records_whence());
    // The installing interpreter is listed from the start, even before it allocates.
    TRACKER.ledger().touch(current_bucket());
    crate::checker::reset();
    crate::interp_end::reset();
    crate::checker::CHECKING.store(checking, std::sync::atomic::Ordering::Relaxed);
    let previous = Domain::ALL.map(get_allocator);
    let ours = if checking {
        [
            hooks_for::<0, true>(previous[0].ctx),
            hooks_for::<1, true>(previous[1].ctx),
            hooks_for::<2, true>(previous[2].ctx),
        ]
    } else {
        [
            hooks_for::<0, false>(previous[0].ctx),
            hooks_for::<1, false>(previous[1].ctx),
            hooks_for::<2, false>(previous[2].ctx),
        ]
    };
    for domain in Domain::ALL {
        FORWARD[domain.index()].store(&previous[domain.index()]);
        set_allocator(domain, ours[domain.index()]);
    }
    *control = Some(Installation { previous, ours });
    Ok(())
}

/// Removes the hooks and restores what they wrapped.
///
/// Per domain, the installed allocator must be either our hook (it is put
/// back to what it wrapped) or exactly what our hook wrapped (someone already
/// put that back: nothing to undo). Anything else may be something sitting on
/// top of our hook, which would keep forwarding to it, so nothing is changed
/// and the call fails. (After `tracemalloc.stop()` with tracemalloc started
/// *before* interheap, the domains hold what tracemalloc wrapped: our hook is
/// gone, but that cannot be told apart from being covered, so this refuses.)
/// Figures stay readable.
pub fn uninstall() -> Result<(), HookError> {
    let mut control = lock_control();
    let Some(installation) = *control else { return Err(HookError::NotInstalled) };
    let current = Domain::ALL.map(get_allocator);
    let covered: Vec<Domain> = Domain::ALL
        .into_iter()
        .filter(|d| {
            let now = &current[d.index()];
            !same_allocator(now, &installation.ours[d.index()])
                && !same_allocator(now, &installation.previous[d.index()])
        })
        .collect();
    if !covered.is_empty() {
        return Err(HookError::NotOnTop(covered));
    }
    for domain in Domain::ALL {
        if same_allocator(&current[domain.index()], &installation.ours[domain.index()]) {
            set_allocator(domain, installation.previous[domain.index()]);
        }
    }
    *control = None;
    // Blocks still live will be freed unseen; their records are useless now.
    TRACKER.forget_blocks();
    crate::sites::forget_code();
    Ok(())
}

/// Whether [`install`] has been called without a matching [`uninstall`].
pub fn is_installed() -> bool {
    lock_control().is_some()
}

/// Per domain: whether our hook is the allocator CPython calls first right
/// now. `false` for an installed hook means something sits on top of it.
pub fn on_top() -> [bool; Domain::COUNT] {
    let control = lock_control();
    match *control {
        None => [false; Domain::COUNT],
        Some(inst) => Domain::ALL.map(|d| same_allocator(&get_allocator(d), &inst.ours[d.index()])),
    }
}
