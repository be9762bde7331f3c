//! Installing adapters: a [`Backend`] (the allocator being adapted) behind a
//! [`Gate`], registered with CPython for one domain.
//!
//! Each installed adapter is a leaked `Adapter<B>` whose address is the `ctx`
//! CPython passes back to our trampolines, so any number of adapters can be
//! installed, on the same domain or on different ones. They stay allocated
//! after `uninstall` (a call may still be in flight, and their figures stay
//! readable); there are at most [`MAX_ADAPTERS`] per process.
//!
//! # Rules enforced here (DESIGN.md facts 2 and 3)
//!
//! * An allocator that **owns its memory** (a replacement: it does not
//!   forward to the allocator installed before it) can only be installed
//!   before `Py_Initialize`, and never for the mem or object domain of a
//!   free-threaded build, whose GC walks mimalloc's heaps. It can never be
//!   uninstalled: CPython still holds blocks it handed out.
//! * An allocator that **wraps** (forwards to the one installed before it,
//!   as tracemalloc does) can be installed and uninstalled at any time,
//!   while no other thread allocates (`PyMem_SetAllocator`'s own rule).
//!   Uninstalling restores the allocator that was installed before it, and
//!   is refused if something else was installed on top since.
//!
//! # Concurrency invariants
//!
//! * An adapter's fields other than the gate's are written before the
//!   adapter is handed to `PyMem_SetAllocator`, and never again
//!   (`installed` is an atomic flag written under [`CONTROL`]).
//! * [`REGISTRY`] is append-only: slots are published with a release store
//!   after the adapter is complete, and read with acquire loads, so the
//!   `fork()` handlers and the figures can walk it without a lock.

use std::ffi::c_void;
use std::fmt;
use std::ptr::null_mut;
use std::sync::atomic::{
    AtomicBool, AtomicPtr, AtomicUsize, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};
use std::sync::{Mutex, Once};

use interheap_engine::Domain;
use pyo3_ffi::PyMemAllocatorEx;

use super::caller::{self, CallContext};
use super::gate::{Barrier, Gate, GateFork, GateStats, Mode};
use super::lock::RawLock;
use crate::hooks::{get_allocator, same_allocator, set_allocator};

/// The most adapters one process can install.
pub const MAX_ADAPTERS: usize = 256;

/// The allocator behind an adapter, called by the trampolines under the gate.
pub trait Backend: Send + Sync + 'static {
    /// `malloc(size)`.
    fn malloc(&self, domain: Domain, size: usize) -> *mut c_void;
    /// `calloc(nelem, elsize)`; the trampoline has checked that the product does not overflow.
    fn calloc(&self, domain: Domain, nelem: usize, elsize: usize) -> *mut c_void;
    /// `realloc(ptr, size)`.
    ///
    /// # Safety
    /// `ptr` is NULL or a live block of this allocator's domain.
    unsafe fn realloc(&self, domain: Domain, ptr: *mut c_void, size: usize) -> *mut c_void;
    /// `free(ptr)`.
    ///
    /// # Safety
    /// `ptr` is NULL or a live block of this allocator's domain.
    unsafe fn free(&self, domain: Domain, ptr: *mut c_void);
}

/// What kind of adapter an installation is (shown in the figures).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A `PyMemAllocatorEx` (options 2 and 3).
    Legacy,
    /// An interpreter-aware allocator (options 4 and 5).
    InterpreterAware,
    /// The per-interpreter dispatcher.
    Dispatcher,
}

impl Kind {
    /// The name used in figures.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Legacy => "legacy",
            Kind::InterpreterAware => "interpreter-aware",
            Kind::Dispatcher => "dispatcher",
        }
    }
}

/// How to install an allocator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// The allocator is thread-safe: no lock, ever (option 3).
    pub thread_safe: bool,
    /// The allocator owns its memory (a replacement, not a wrapper): only
    /// before `Py_Initialize`, never uninstallable.
    pub owns_memory: bool,
}

/// Why an adapter operation was refused. Nothing was changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdapterError {
    /// A required function pointer is NULL, or another argument is invalid.
    Invalid(String),
    /// A replacement allocator after `Py_Initialize`.
    AfterInit(Domain),
    /// A replacement for mem or object on a free-threaded build.
    FreeThreaded(Domain),
    /// No adapter has this ID.
    Unknown(u64),
    /// The adapter owns memory CPython still holds.
    OwnsMemory(u64),
    /// The adapter was already uninstalled.
    NotInstalled(u64),
    /// Something was installed on top of the adapter since.
    NotOnTop(u64, Domain),
    /// [`MAX_ADAPTERS`] adapters are installed already.
    TooMany,
}

impl fmt::Display for AdapterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdapterError::Invalid(why) => write!(f, "invalid allocator: {why}"),
            AdapterError::AfterInit(d) => write!(
                f,
                "an allocator that owns its memory can only be installed before Py_Initialize \
                 (the {} domain already holds blocks from the current allocator); after \
                 initialization only a wrapper that forwards to the current allocator can be installed",
                d.name()
            ),
            AdapterError::FreeThreaded(d) => write!(
                f,
                "free-threaded CPython requires its own mimalloc for the {} domain (the garbage \
                 collector walks mimalloc's heaps): an allocator that owns its memory can only \
                 replace the raw domain there; wrappers are fine",
                d.name()
            ),
            AdapterError::Unknown(id) => write!(f, "no adapter has ID {id}"),
            AdapterError::OwnsMemory(id) => write!(
                f,
                "adapter {id} owns its memory and CPython still holds blocks from it: it cannot be uninstalled"
            ),
            AdapterError::NotInstalled(id) => write!(f, "adapter {id} is not installed"),
            AdapterError::NotOnTop(id, d) => write!(
                f,
                "adapter {id} is no longer the installed {} allocator: something installed after it \
                 (tracemalloc, a hook, another adapter) sits on top; remove that first",
                d.name()
            ),
            AdapterError::TooMany => write!(f, "too many adapters (at most {MAX_ADAPTERS} per process)"),
        }
    }
}

impl std::error::Error for AdapterError {}

/// An adapter's figures and state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterStats {
    /// The adapter's ID (unique in the process, from 1).
    pub id: u64,
    /// The name given at install.
    pub name: String,
    /// Its kind.
    pub kind: Kind,
    /// Its domain.
    pub domain: Domain,
    /// Its gate's mode now.
    pub mode: Mode,
    /// Whether it is still installed.
    pub installed: bool,
    /// Whether CPython calls it first in its domain right now.
    pub on_top: bool,
    /// Whether it owns its memory.
    pub owns_memory: bool,
    /// Whether the fast path uses `membarrier` (otherwise fences).
    pub membarrier: bool,
    /// Calls, lock acquisitions, contended acquisitions, what switched it.
    pub gate: GateStats,
}

/// The parts of an adapter that do not depend on its backend.
pub struct AdapterCore {
    id: u64,
    name: String,
    kind: Kind,
    domain: Domain,
    owns_memory: bool,
    gate: Gate,
    installed: AtomicBool,
    ours: PyMemAllocatorEx,
    previous: PyMemAllocatorEx,
}

// SAFETY: the allocator structs are plain data (function pointers and
// opaque ctx values only passed back to those functions), written before
// the adapter is shared and never again; everything else is atomic or immutable.
unsafe impl Sync for AdapterCore {}
// SAFETY: as above.
unsafe impl Send for AdapterCore {}

impl AdapterCore {
    /// The figures now.
    pub fn stats(&self) -> AdapterStats {
        AdapterStats {
            id: self.id,
            name: self.name.clone(),
            kind: self.kind,
            domain: self.domain,
            mode: self.gate.mode(),
            installed: self.installed.load(Relaxed),
            on_top: same_allocator(&get_allocator(self.domain), &self.ours),
            owns_memory: self.owns_memory,
            membarrier: self.gate.barrier() == Barrier::Membarrier,
            gate: self.gate.stats(),
        }
    }
}

#[repr(C)]
struct Adapter<B: Backend> {
    core: AdapterCore,
    backend: B,
}

static REGISTRY: [AtomicPtr<AdapterCore>; MAX_ADAPTERS] =
    [const { AtomicPtr::new(null_mut()) }; MAX_ADAPTERS];
static REGISTERED: AtomicUsize = AtomicUsize::new(0);
/// Serialises install and uninstall.
static CONTROL: Mutex<()> = Mutex::new(());

fn registered() -> impl Iterator<Item = &'static AdapterCore> {
    let n = REGISTERED.load(Acquire);
    REGISTRY[..n].iter().filter_map(|slot| {
        let p = slot.load(Acquire);
        // SAFETY: published slots point to leaked, complete adapters.
        (!p.is_null()).then(|| unsafe { &*p })
    })
}

/// Every adapter installed in this process (including uninstalled ones), in install order.
pub fn list() -> Vec<AdapterStats> {
    registered().map(AdapterCore::stats).collect()
}

/// One adapter's figures.
pub fn stats(id: u64) -> Result<AdapterStats, AdapterError> {
    find(id).map(AdapterCore::stats)
}

fn find(id: u64) -> Result<&'static AdapterCore, AdapterError> {
    registered().find(|a| a.id == id).ok_or(AdapterError::Unknown(id))
}

// The trampolines: CPython calls these with ctx = our `Adapter<B>`.

fn adapter<B: Backend>(ctx: *mut c_void) -> &'static Adapter<B> {
    // SAFETY: we only register these trampolines with ctx pointing to a
    // leaked `Adapter<B>` of the same `B`.
    unsafe { &*(ctx as *const Adapter<B>) }
}

extern "C" fn t_malloc<B: Backend>(ctx: *mut c_void, size: usize) -> *mut c_void {
    let a = adapter::<B>(ctx);
    a.core.gate.run(caller::classify, || a.backend.malloc(a.core.domain, size))
}

extern "C" fn t_calloc<B: Backend>(ctx: *mut c_void, nelem: usize, elsize: usize) -> *mut c_void {
    let a = adapter::<B>(ctx);
    // Fact 8: an overflowing nelem * elsize fails before any allocator sees it.
    if nelem.checked_mul(elsize).is_none() {
        return null_mut();
    }
    a.core.gate.run(caller::classify, || a.backend.calloc(a.core.domain, nelem, elsize))
}

extern "C" fn t_realloc<B: Backend>(ctx: *mut c_void, ptr: *mut c_void, size: usize) -> *mut c_void {
    let a = adapter::<B>(ctx);
    // SAFETY: CPython passes a block of this domain (or NULL).
    a.core.gate.run(caller::classify, || unsafe { a.backend.realloc(a.core.domain, ptr, size) })
}

extern "C" fn t_free<B: Backend>(ctx: *mut c_void, ptr: *mut c_void) {
    let a = adapter::<B>(ctx);
    // SAFETY: CPython passes a block of this domain (or NULL).
    a.core.gate.run(caller::classify, || unsafe { a.backend.free(a.core.domain, ptr) })
}

fn is_initialized() -> bool {
    // SAFETY: Py_IsInitialized only reads a flag; callable at any time.
    unsafe { pyo3_ffi::Py_IsInitialized() != 0 }
}

/// The mode a new gate starts in (see `gate`'s module docs).
fn starting_mode(domain: Domain, options: Options) -> Mode {
    if options.thread_safe {
        Mode::ThreadSafe
    } else if domain == Domain::Raw || cfg!(Py_GIL_DISABLED) {
        Mode::Locked
    } else {
        Mode::Unlocked
    }
}

/// Installs `backend` for `domain` behind a gate. Returns the adapter's ID.
pub fn install<B: Backend>(
    domain: Domain,
    backend: B,
    options: Options,
    kind: Kind,
    name: &str,
) -> Result<u64, AdapterError> {
    let _control = CONTROL.lock().unwrap_or_else(|e| e.into_inner());
    if options.owns_memory && cfg!(Py_GIL_DISABLED) && domain != Domain::Raw {
        return Err(AdapterError::FreeThreaded(domain));
    }
    if options.owns_memory && is_initialized() {
        return Err(AdapterError::AfterInit(domain));
    }
    let slot = REGISTERED.load(Relaxed);
    if slot >= MAX_ADAPTERS {
        return Err(AdapterError::TooMany);
    }
    register_fork_handlers();
    caller::prepare();
    let previous = get_allocator(domain);
    let adapter: &'static mut Adapter<B> = Box::leak(Box::new(Adapter {
        core: AdapterCore {
            id: slot as u64 + 1,
            name: name.to_owned(),
            kind,
            domain,
            owns_memory: options.owns_memory,
            gate: Gate::new(starting_mode(domain, options), Barrier::best(), RawLock::new()),
            installed: AtomicBool::new(true),
            ours: PyMemAllocatorEx { ctx: null_mut(), malloc: None, calloc: None, realloc: None, free: None },
            previous,
        },
        backend,
    }));
    let ctx = adapter as *mut Adapter<B> as *mut c_void;
    adapter.core.ours = PyMemAllocatorEx {
        ctx,
        malloc: Some(t_malloc::<B>),
        calloc: Some(t_calloc::<B>),
        realloc: Some(t_realloc::<B>),
        free: Some(t_free::<B>),
    };
    let core: &'static AdapterCore = &adapter.core;
    REGISTRY[slot].store(core as *const AdapterCore as *mut AdapterCore, Release);
    REGISTERED.store(slot + 1, Release);
    set_allocator(domain, core.ours);
    Ok(core.id)
}

/// Removes adapter `id`, restoring the allocator installed before it.
pub fn uninstall(id: u64) -> Result<(), AdapterError> {
    let _control = CONTROL.lock().unwrap_or_else(|e| e.into_inner());
    let core = find(id)?;
    if core.owns_memory {
        return Err(AdapterError::OwnsMemory(id));
    }
    if !core.installed.load(Relaxed) {
        return Err(AdapterError::NotInstalled(id));
    }
    if !same_allocator(&get_allocator(core.domain), &core.ours) {
        return Err(AdapterError::NotOnTop(id, core.domain));
    }
    set_allocator(core.domain, core.previous);
    core.installed.store(false, Relaxed);
    Ok(())
}

// ---------------------------------------------------------------------------
// Legacy allocators: a PyMemAllocatorEx (options 2 and 3).

/// A `PyMemAllocatorEx` as a backend: calls its functions with its `ctx`.
pub struct LegacyBackend {
    ctx: *mut c_void,
    malloc: unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void,
    calloc: unsafe extern "C" fn(*mut c_void, usize, usize) -> *mut c_void,
    realloc: unsafe extern "C" fn(*mut c_void, *mut c_void, usize) -> *mut c_void,
    free: unsafe extern "C" fn(*mut c_void, *mut c_void),
}

// SAFETY: the backend is plain data; calling the allocator from any thread
// is exactly what the gate makes safe (serialised unless declared thread-safe).
unsafe impl Send for LegacyBackend {}
// SAFETY: as above.
unsafe impl Sync for LegacyBackend {}

impl LegacyBackend {
    /// Checks that every function is present.
    pub fn new(a: &PyMemAllocatorEx) -> Result<LegacyBackend, AdapterError> {
        let missing = |what: &str| AdapterError::Invalid(format!("PyMemAllocatorEx.{what} is NULL"));
        Ok(LegacyBackend {
            ctx: a.ctx,
            malloc: a.malloc.ok_or_else(|| missing("malloc"))?,
            calloc: a.calloc.ok_or_else(|| missing("calloc"))?,
            realloc: a.realloc.ok_or_else(|| missing("realloc"))?,
            free: a.free.ok_or_else(|| missing("free"))?,
        })
    }
}

impl Backend for LegacyBackend {
    #[inline(always)]
    fn malloc(&self, _: Domain, size: usize) -> *mut c_void {
        // SAFETY: the installer vouched for the allocator (a PEP 445 allocator
        // with this ctx); the gate serialises calls as its mode requires.
        unsafe { (self.malloc)(self.ctx, size) }
    }
    #[inline(always)]
    fn calloc(&self, _: Domain, nelem: usize, elsize: usize) -> *mut c_void {
        // SAFETY: as for malloc.
        unsafe { (self.calloc)(self.ctx, nelem, elsize) }
    }
    #[inline(always)]
    unsafe fn realloc(&self, _: Domain, ptr: *mut c_void, size: usize) -> *mut c_void {
        // SAFETY: as for malloc.
        unsafe { (self.realloc)(self.ctx, ptr, size) }
    }
    #[inline(always)]
    unsafe fn free(&self, _: Domain, ptr: *mut c_void) {
        // SAFETY: as for malloc.
        unsafe { (self.free)(self.ctx, ptr) }
    }
}

/// Installs a `PyMemAllocatorEx` for `domain` behind the lock wrapper (or
/// without a lock if `options.thread_safe`). Returns the adapter's ID.
pub fn install_legacy(
    domain: Domain,
    allocator: &PyMemAllocatorEx,
    options: Options,
    name: &str,
) -> Result<u64, AdapterError> {
    install(domain, LegacyBackend::new(allocator)?, options, Kind::Legacy, name)
}

// ---------------------------------------------------------------------------
// Interpreter-aware allocators (options 4 and 5).

/// An allocator whose every call receives the calling interpreter (option 5).
///
/// Installed with [`install_aware`] behind the same gate as a legacy
/// allocator: serialised (lock once a second GIL exists; always for raw and
/// on free-threaded builds) unless installed as thread-safe.
pub trait InterpreterAware: Send + Sync + 'static {
    /// `malloc(size)`: must return a unique non-NULL pointer for size 0.
    fn malloc(&self, cx: &CallContext, size: usize) -> *mut c_void;
    /// `calloc(nelem, elsize)`: the product is known not to overflow.
    fn calloc(&self, cx: &CallContext, nelem: usize, elsize: usize) -> *mut c_void;
    /// `realloc(ptr, size)`: `ptr` may be NULL (an allocation).
    ///
    /// # Safety
    /// `ptr` is NULL or a live block this allocator returned (possibly to
    /// another interpreter).
    unsafe fn realloc(&self, cx: &CallContext, ptr: *mut c_void, size: usize) -> *mut c_void;
    /// `free(ptr)`: `ptr` may be NULL, and may come from another interpreter.
    ///
    /// # Safety
    /// As for `realloc`.
    unsafe fn free(&self, cx: &CallContext, ptr: *mut c_void);
}

/// Adapts an [`InterpreterAware`] allocator to a [`Backend`].
pub struct AwareBackend<T: InterpreterAware>(pub T);

impl<T: InterpreterAware> Backend for AwareBackend<T> {
    #[inline]
    fn malloc(&self, domain: Domain, size: usize) -> *mut c_void {
        self.0.malloc(&caller::context(domain), size)
    }
    #[inline]
    fn calloc(&self, domain: Domain, nelem: usize, elsize: usize) -> *mut c_void {
        self.0.calloc(&caller::context(domain), nelem, elsize)
    }
    #[inline]
    unsafe fn realloc(&self, domain: Domain, ptr: *mut c_void, size: usize) -> *mut c_void {
        // SAFETY: forwarded from the caller.
        unsafe { self.0.realloc(&caller::context(domain), ptr, size) }
    }
    #[inline]
    unsafe fn free(&self, domain: Domain, ptr: *mut c_void) {
        // SAFETY: forwarded from the caller.
        unsafe { self.0.free(&caller::context(domain), ptr) }
    }
}

/// Installs an interpreter-aware allocator for `domain`.
pub fn install_aware<T: InterpreterAware>(
    domain: Domain,
    allocator: T,
    options: Options,
    name: &str,
) -> Result<u64, AdapterError> {
    install(domain, AwareBackend(allocator), options, Kind::InterpreterAware, name)
}

// ---------------------------------------------------------------------------
// fork(): no adapter lock may be inherited held.

// One handler set for every adapter lock, taken in one order: the gates (an
// allocator behind a gate may call into a dispatcher), then the dispatchers.

extern "C" fn before_fork() {
    super::lock::set_forking(true);
    for a in registered() {
        a.gate.lock_for_fork();
    }
    super::dispatcher::lock_all_for_fork();
}

extern "C" fn after_fork_in_parent() {
    super::dispatcher::unlock_all_after_fork();
    for a in registered() {
        a.gate.unlock_after_fork();
    }
    super::lock::set_forking(false);
}

extern "C" fn after_fork_in_child() {
    // SAFETY: in the child, this thread is the only one.
    unsafe { super::dispatcher::reset_all_in_fork_child() };
    for a in registered() {
        // SAFETY: as above.
        unsafe { a.gate.reset_in_fork_child() };
    }
    super::lock::set_forking(false);
}

pub(crate) fn register_fork_handlers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: static extern "C" handlers without arguments.
        let rc = unsafe {
            libc::pthread_atfork(Some(before_fork), Some(after_fork_in_parent), Some(after_fork_in_child))
        };
        debug_assert_eq!(rc, 0, "pthread_atfork failed");
    });
}
