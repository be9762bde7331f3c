//! The interheap allocator as CPython's allocator: one heap per interpreter.
//!
//! Installed before `Py_Initialize` (after `Py_PreInitialize`), this module
//! *replaces* CPython's allocators (DESIGN.md fact 2 allows that only before
//! initialization) with the engine's heaps (`interheap_engine::heap`):
//!
//! * **mem and object** calls made in interpreter *I* come from *I*'s own
//!   heaps (one per domain, so figures stay per domain). CPython makes these
//!   calls only while holding *I*'s GIL, so that GIL is the heaps' owner: the
//!   fast path takes no lock and no atomic read-modify-write. The owner token
//!   is derived from the interpreter ID (fact 6: never reused, unlike
//!   `PyInterpreterState*`).
//! * **raw** calls made in *I* (a thread state of *I* current) come from
//!   *I*'s third heap, when the allocator serves all three domains: on a
//!   default build a current thread state holds *I*'s GIL, so the same owner
//!   rule holds, and *I*'s raw bytes count in its figures and its limit.
//! * Calls made without a thread state (and every raw call when mem and
//!   object are not ours, as on free-threaded builds) come from the *shared*
//!   heap: one engine heap per thread (a thread cache), adopted from a pool
//!   when a thread starts, ended when it exits.
//! * A block freed by anyone who is not its heap's owner (another
//!   interpreter, another thread, no thread state) goes onto the owner's
//!   remote-free list and is counted there as a remote (cross-interpreter, or
//!   cross-thread) free. Mixed-up domains (`PyMem_Free` on an object block)
//!   are served correctly, because the block's heap is found from its address.
//! * Pointers that are not ours (allocated before installation by the
//!   previous allocator) are recognised through the segment map without
//!   being touched, and handed back to the previous allocator.
//! * When CPython frees an interpreter's state (`PyInterpreterState_Delete`
//!   ends with `PyMem_RawFree` of the struct; no thread of it can run after
//!   that), the interpreter's heaps end: their figures are final, their free
//!   memory goes back to the OS, and what it leaked stays valid and reported.
//! * Free-threaded builds keep CPython's mimalloc for mem and object (fact
//!   3): installing those domains there is refused; raw is served.
//!
//! # Concurrency invariants
//!
//! * An interpreter heap is touched as owner only by a thread whose current
//!   thread state belongs to that interpreter: it holds that interpreter's
//!   GIL (CPython's rule for mem and object calls; for raw calls, CPython
//!   makes a thread state current only after taking its GIL and clears it
//!   before dropping it, `_PyThreadState_Attach`/`detach_thread`). The free
//!   path checks the token of the *current* interpreter against the block's heap.
//! * A thread heap is owned by its thread; its token is the address of the
//!   thread's own thread-local slot (even), interpreter tokens are odd.
//! * After its thread-local destructor ran, a thread allocates from one
//!   process-wide *exiting* heap whose owner is whoever holds [`EXITING`].
//! * [`INTERPRETERS`] is only changed under its lock; heaps are never freed.
//! * Each thread caches the interpreter it last allocated in, keyed by the
//!   address of the thread state it allocated under ([`CACHE`]; a thread
//!   state belongs to one interpreter for life). Before CPython can reuse
//!   the address of a key, the key is cleared in every thread's cache
//!   ([`KEYED`], `interheap_sync::keys`, which has the argument and its
//!   loom models): when an interpreter's
//!   state (which holds its first thread state) is freed, when a raw block
//!   of a thread state's size is freed, and when a raw block that is not
//!   ours is freed. So the fast paths trust a key that equals the current
//!   thread state, with no other check. Without the raw domain interheap
//!   cannot see those frees, and the cache is used by interpreter ID only.
//! * The current thread state comes from libpython's own thread-local slot
//!   when [`crate::interp::fast_tstate`] could find it (two loads), else from
//!   the C API; `INTERHEAP_FAST_THREAD_STATE=0` forces the C API.

use std::cell::Cell;
use std::ffi::c_void;
use std::fmt;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::OnceLock;

use interheap_engine::heap::{self, Account, Heap, HeapLabel, HeapPool, HeapSnapshot, Realloc, NO_OWNER};
use interheap_engine::limits::{BudgetSnapshot, DefaultLimit};
use interheap_engine::Domain;
use interheap_sync::{KeyRegistry, KeySlot, SpinLock};
use pyo3_ffi as ffi;
use pyo3_ffi::PyMemAllocatorEx;

use crate::hooks::{get_allocator, set_allocator};
use crate::interp::{current_thread_interpreter, current_thread_state_fast};

/// Label kind of an interpreter's heap (`id` = interpreter ID, `part` = domain).
pub const KIND_INTERPRETER: u8 = 1;
/// Label kind of a thread's share of the shared heap.
pub const KIND_THREAD: u8 = 2;
/// Label kind of the heap threads use after their thread-local state is gone.
pub const KIND_EXITING: u8 = 3;

/// A set of allocator domains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Domains(pub u8);

impl Domains {
    pub const RAW: Domains = Domains(1 << Domain::Raw as u8);
    pub const MEM: Domains = Domains(1 << Domain::Mem as u8);
    pub const OBJECT: Domains = Domains(1 << Domain::Object as u8);
    pub const ALL: Domains = Domains(0b111);

    pub fn contains(self, domain: Domain) -> bool {
        self.0 & (1 << domain as u8) != 0
    }

    /// The domains this build lets the allocator serve: all three, or raw
    /// only on free-threaded builds (fact 3).
    pub fn supported() -> Domains {
        if cfg!(Py_GIL_DISABLED) {
            Domains::RAW
        } else {
            Domains::ALL
        }
    }

    /// Names, as in reports ("raw", "mem", "object").
    pub fn names(self) -> Vec<&'static str> {
        Domain::ALL.iter().filter(|d| self.contains(**d)).map(|d| d.name()).collect()
    }
}

/// Why the allocator could not be installed. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstallError {
    /// Python is already initialized: only wrapping is allowed now (fact 2).
    AlreadyInitialized,
    /// The allocator is already installed.
    AlreadyInstalled,
    /// No domain was asked for, or an unknown one.
    NoDomains,
    /// mem or object was asked for on a free-threaded build (fact 3).
    FreeThreadedKeepsMimalloc,
}

impl fmt::Display for InstallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InstallError::AlreadyInitialized => {
                "Python is already initialized: the interheap allocator must be installed after \
                 Py_PreInitialize() and before Py_Initialize() (after that, allocators may only be \
                 wrapped; use interheap's hooks instead)"
            }
            InstallError::AlreadyInstalled => "the interheap allocator is already installed",
            InstallError::NoDomains => "no valid allocator domain was given (raw=1, mem=2, object=4)",
            InstallError::FreeThreadedKeepsMimalloc => {
                "this is a free-threaded build: the mem and object domains must stay CPython's \
                 mimalloc (the GC walks its heaps), so the interheap allocator can serve only the \
                 raw domain here"
            }
        })
    }
}

impl std::error::Error for InstallError {}

/// Domains the allocator serves (0 until installed).
static INSTALLED: AtomicU8 = AtomicU8::new(0);
/// Whether every heap keeps the size each block was asked for (set at install).
static REQUESTED_SIZES: AtomicBool = AtomicBool::new(false);

/// How [`install_before_init_with`] installs the allocator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InstallOptions {
    /// The checking layer (`crate::allocator_check`: buffer overruns and
    /// uses after free) over the mem and object domains.
    pub checking: bool,
    /// Every heap keeps the size each block was asked for
    /// (`Heap::new_keeping_requested_sizes`), so that the heaps' figures are
    /// the bytes callers asked for, as the hooks count them, and interheap's
    /// figures can come from the heaps with no hook installed
    /// (`crate::figures`). Costs about 13 instructions per allocation and
    /// free pair, and a byte (two above 2 KiB) per block of a shared page.
    pub requested_sizes: bool,
}

/// Whether the installed allocator's heaps keep requested sizes.
pub fn keeps_requested_sizes() -> bool {
    REQUESTED_SIZES.load(Ordering::Acquire)
}

/// What each domain had before installation: it frees pointers that are not ours.
struct Previous([PyMemAllocatorEx; Domain::COUNT]);
// SAFETY: CPython's allocator structs are plain function pointers and ctx
// values, meant to be called from any thread (the previous allocators are
// CPython's own, which are usable from any thread within their rules).
unsafe impl Send for Previous {}
// SAFETY: as above; the struct is never changed after it is set.
unsafe impl Sync for Previous {}
static PREVIOUS: OnceLock<Previous> = OnceLock::new();

/// Installs the interheap allocator for `domains`.
///
/// Call it after `Py_PreInitialize*()` (which may set up its own allocators,
/// for example from `PYTHONMALLOC`) and before `Py_Initialize*()`. To keep
/// CPython's debug hooks, call `PyMem_SetupDebugHooks()` afterwards.
pub fn install_before_init(domains: Domains) -> Result<(), InstallError> {
    install_before_init_checked(domains, false)
}

/// [`install_before_init`], with the checking layer (`crate::allocator_check`:
/// buffer overruns and uses after free) over the mem and object domains
/// when `checking`.
pub fn install_before_init_checked(domains: Domains, checking: bool) -> Result<(), InstallError> {
    install_before_init_with(domains, InstallOptions { checking, ..InstallOptions::default() })
}

/// [`install_before_init`] with [`InstallOptions`].
pub fn install_before_init_with(domains: Domains, options: InstallOptions) -> Result<(), InstallError> {
    let InstallOptions { checking, requested_sizes } = options;
    if domains.0 == 0 || domains.0 & !Domains::ALL.0 != 0 {
        return Err(InstallError::NoDomains);
    }
    if domains.0 & !Domains::supported().0 != 0 {
        return Err(InstallError::FreeThreadedKeepsMimalloc);
    }
    // SAFETY: Py_IsInitialized only reads a runtime flag; callable at any time.
    if unsafe { ffi::Py_IsInitialized() } != 0 {
        return Err(InstallError::AlreadyInitialized);
    }
    if INSTALLED.load(Ordering::Acquire) != 0 || PREVIOUS.get().is_some() {
        return Err(InstallError::AlreadyInstalled);
    }
    // An escape hatch and a way to measure the difference: the public API only.
    if std::env::var_os("INTERHEAP_FAST_THREAD_STATE").is_some_and(|v| v == "0") {
        crate::interp::fast_tstate::disable();
    }
    let previous = Previous(Domain::ALL.map(get_allocator));
    if PREVIOUS.set(previous).is_err() {
        return Err(InstallError::AlreadyInstalled);
    }
    // Before any heap exists: every heap has the one mode the fast paths assume.
    REQUESTED_SIZES.store(requested_sizes, Ordering::Release);
    THREAD_POOL.keep_requested_sizes(requested_sizes);
    for domain in Domain::ALL {
        if domains.contains(domain) {
            let ours = our_allocator(domain, domains);
            let ours = if checking && domain != Domain::Raw {
                crate::allocator_check::wrap(domain, ours)
            } else {
                ours
            };
            set_allocator(domain, ours);
        }
    }
    INSTALLED.store(domains.0, Ordering::Release);
    // SAFETY: registering plain extern "C" handlers; they only take and release our own locks.
    unsafe { libc::pthread_atfork(Some(fork_prepare), Some(fork_finish), Some(fork_child)) };
    Ok(())
}

/// `fork()` handlers: the child must not inherit a lock held by a thread that
/// does not exist there. Lock order, as everywhere: pool, exiting heap,
/// interpreter registry, then heaps (`end_interpreters_in` ends heaps while
/// holding the registry; nothing takes the registry while holding a heap).
extern "C" fn fork_prepare() {
    crate::allocator_check::lock_for_fork();
    THREAD_POOL.lock_for_fork();
    std::mem::forget(EXITING.lock());
    std::mem::forget(INTERPRETERS.lock());
    KEYED.lock_for_fork();
    heap::fork_prepare();
}

/// In the child only this thread exists: the other threads' caches (and
/// their thread-locals) are gone, so they leave the list.
extern "C" fn fork_child() {
    // SAFETY: fork_prepare took KEYED's lock on this thread just before the
    // fork; fork_finish releases it.
    CACHE.with(|me| unsafe { KEYED.keep_only_after_fork(&me.key) });
    fork_finish();
}

extern "C" fn fork_finish() {
    // SAFETY: fork_prepare took every one of these locks on this thread just
    // before the fork; heaps are only created under INTERPRETERS or the pool
    // lock, both held, so the set of heaps did not change.
    unsafe {
        heap::fork_finish();
        KEYED.unlock_after_fork();
        INTERPRETERS.force_unlock();
        EXITING.force_unlock();
        THREAD_POOL.unlock_after_fork();
        crate::allocator_check::unlock_after_fork();
    }
}

/// The domains the interheap allocator serves in this process.
pub fn installed() -> Domains {
    Domains(INSTALLED.load(Ordering::Acquire))
}

/// The functions interheap installs for `domain`, when it serves `domains`.
fn our_allocator(domain: Domain, domains: Domains) -> PyMemAllocatorEx {
    match domain {
        // Raw calls come from the interpreters' heaps only where those exist.
        Domain::Raw if domains.contains(Domain::Mem) && domains.contains(Domain::Object) => {
            raw_allocator::<true>()
        }
        Domain::Raw => raw_allocator::<false>(),
        Domain::Mem if keeps_requested_sizes() => interp_allocator::<1, true>(),
        Domain::Object if keeps_requested_sizes() => interp_allocator::<2, true>(),
        Domain::Mem => interp_allocator::<1, false>(),
        Domain::Object => interp_allocator::<2, false>(),
    }
}

fn raw_allocator<const BY_INTERPRETER: bool>() -> PyMemAllocatorEx {
    PyMemAllocatorEx {
        ctx: ptr::null_mut(),
        malloc: Some(raw_malloc::<BY_INTERPRETER>),
        calloc: Some(raw_calloc::<BY_INTERPRETER>),
        realloc: Some(raw_realloc::<BY_INTERPRETER>),
        free: Some(raw_free),
    }
}

/// `R`: whether the heaps keep requested sizes (the fast paths' mode).
fn interp_allocator<const D: usize, const R: bool>() -> PyMemAllocatorEx {
    PyMemAllocatorEx {
        ctx: ptr::null_mut(),
        malloc: Some(interp_malloc::<D, R>),
        calloc: Some(interp_calloc::<D>),
        realloc: Some(interp_realloc::<D>),
        free: Some(interp_free::<D, R>),
    }
}

// ----- the shared heap: one engine heap per thread -----

static THREAD_POOL: HeapPool = HeapPool::new();
const THREAD_LABEL: HeapLabel = HeapLabel { kind: KIND_THREAD, id: 0, part: Domain::Raw as u8 };

/// Phases of a thread's use of the shared heap.
const NO_HEAP: u8 = 0;
const HAS_HEAP: u8 = 1;
const EXITED: u8 = 2;

thread_local! {
    /// This thread's heap (null until first use). Its address is the thread's owner token.
    static THREAD_HEAP: Cell<*const Heap> = const { Cell::new(ptr::null()) };
    static THREAD_PHASE: Cell<u8> = const { Cell::new(NO_HEAP) };
    /// Registered on first use; its destructor hands the heap back to the pool.
    static RELEASE_AT_EXIT: ReleaseAtExit = const { ReleaseAtExit };
}

struct ReleaseAtExit;

impl Drop for ReleaseAtExit {
    fn drop(&mut self) {
        let heap = THREAD_HEAP.with(|h| h.replace(ptr::null()));
        THREAD_PHASE.with(|p| p.set(EXITED));
        // SAFETY: the heap is this thread's, and this thread never uses it
        // as owner again (its phase is now EXITED).
        if let Some(heap) = unsafe { heap.as_ref() } {
            // SAFETY: as above; the heap came from THREAD_POOL.
            unsafe { THREAD_POOL.release(heap) };
        }
    }
}

#[inline(always)]
fn thread_token() -> usize {
    THREAD_HEAP.with(|h| h as *const Cell<*const Heap> as usize)
}

/// The exiting heap and the lock that makes its holder the owner.
static EXITING: SpinLock<()> = SpinLock::new(());
static EXITING_HEAP: OnceLock<&'static Heap> = OnceLock::new();
/// Owner token of the exiting heap (even, never a thread-local address).
const EXITING_TOKEN: usize = 2;

fn exiting_heap() -> &'static Heap {
    EXITING_HEAP.get_or_init(|| {
        new_heap(HeapLabel { kind: KIND_EXITING, id: 0, part: Domain::Raw as u8 }, EXITING_TOKEN, None)
    })
}

/// A heap in the mode chosen at install (see [`InstallOptions::requested_sizes`]).
fn new_heap(label: HeapLabel, token: usize, account: Option<&'static Account>) -> &'static Heap {
    match account {
        _ if keeps_requested_sizes() => Heap::new_keeping_requested_sizes(label, token, account),
        Some(account) => Heap::new_in_account(label, token, account),
        None => Heap::new(label, token),
    }
}

/// Runs `f` with the heap this thread owns in the shared heap: its own, or
/// (after its thread-local state is gone) the exiting heap under its lock.
#[inline(always)]
fn with_thread_heap<R>(f: impl FnOnce(&'static Heap) -> R) -> R {
    let heap = THREAD_HEAP.with(Cell::get);
    // SAFETY: a non-null THREAD_HEAP is this thread's active heap (leaked).
    match unsafe { heap.as_ref() } {
        Some(heap) => f(heap),
        None => with_thread_heap_slow(f),
    }
}

#[cold]
fn with_thread_heap_slow<R>(f: impl FnOnce(&'static Heap) -> R) -> R {
    if THREAD_PHASE.with(Cell::get) == NO_HEAP {
        let heap = THREAD_POOL.acquire(THREAD_LABEL, thread_token());
        THREAD_HEAP.with(|h| h.set(heap));
        THREAD_PHASE.with(|p| p.set(HAS_HEAP));
        // Registers the destructor. If thread-locals are being torn down
        // already, registration fails; the heap then stays with this thread
        // until it exits (its blocks remain valid either way).
        let _ = RELEASE_AT_EXIT.try_with(|_| ());
        return f(heap);
    }
    let _owner = EXITING.lock();
    f(exiting_heap())
}

// ----- interpreter heaps -----

/// One interpreter's heaps, for mem, object and raw (see [`PARTS`]), and the
/// account whose budget limits them together.
struct InterpreterHeaps {
    id: i64,
    /// Address of the interpreter's state, to notice when CPython frees it
    /// (0 for an entry made before the interpreter existed: main's, when its
    /// limit is set before initialization).
    state: usize,
    heaps: [&'static Heap; PARTS],
    account: &'static Account,
    ended: Cell<bool>,
    /// What is known of the interpreter (`interp::Origin::pack`) and whether
    /// it is final: described when figures are read ([`figures_records`])
    /// and when it ends, once the figures' reader has resolved the symbols.
    info: Cell<(interheap_engine::InterpreterInfo, bool)>,
    /// When the interpreter ended (`interp_end::monotonic_ns`; 0: it has not).
    ended_at: Cell<u64>,
}

struct Interpreters(Vec<&'static InterpreterHeaps>);
// SAFETY: the entries are leaked and only changed under the INTERPRETERS lock.
unsafe impl Send for Interpreters {}
static INTERPRETERS: SpinLock<Interpreters> = SpinLock::new(Interpreters(Vec::new()));

/// A thread's cache of the interpreter it last allocated in.
///
/// Keyed by the thread state the thread allocated under, which names one
/// interpreter for its whole life and is one load away (the interpreter is
/// two). A key must never outlive its thread state, since the address can
/// come back as another interpreter's: whoever frees a raw block that may
/// hold a keyed thread state first clears every key inside it
/// ([`KEYED`]`.forget_keys_in`), so the fast paths compare one word and
/// nothing else. The protocol, its argument and its loom models are
/// `interheap_sync::keys`'s; this type adds what only the thread touches.
///
/// When interheap does not serve raw it never sees those frees, so the key
/// stays unset and the cache is used by interpreter ID only (the slow path).
struct InterpreterCache {
    /// The thread state this entry was filled under (its address), or unset.
    key: KeySlot,
    /// The rest is only touched by the thread itself: the interpreter's
    /// heaps, by part (null before the first fill), its owner token, its ID.
    heaps: Cell<[*const Heap; PARTS]>,
    token: Cell<usize>,
    id: Cell<i64>,
    /// Registration in [`KEYED`]: `UNLISTED`, `LISTED`, or `DELISTED` (the
    /// thread is exiting: its cache is never keyed again).
    listing: Cell<u8>,
}

// CACHE relies on this: a thread-local without a destructor is never torn down.
const _: () = assert!(!std::mem::needs_drop::<InterpreterCache>());

const UNLISTED: u8 = 0;
const LISTED: u8 = 1;
const DELISTED: u8 = 2;

thread_local! {
    /// No destructor (nothing in it needs dropping), so it stays usable to
    /// the thread's very end, during other thread-locals' destructors too.
    static CACHE: InterpreterCache = const {
        InterpreterCache {
            key: KeySlot::new(),
            heaps: Cell::new([ptr::null(); PARTS]),
            token: Cell::new(NO_OWNER),
            id: Cell::new(-1),
            listing: Cell::new(UNLISTED),
        }
    };
    /// Registered when the cache is listed; its destructor delists it.
    static DELIST_AT_EXIT: DelistAtExit = const { DelistAtExit };
}

/// Every keyed thread's cache key, so that freeing a thread state can clear
/// the keys that name it. A thread delists itself before its thread-locals
/// go away.
static KEYED: KeyRegistry = KeyRegistry::new();

struct DelistAtExit;

impl Drop for DelistAtExit {
    fn drop(&mut self) {
        CACHE.with(|cache| {
            KEYED.delist(&cache.key);
            cache.listing.set(DELISTED);
        });
    }
}

/// The usable size of the raw blocks that hold thread states (0 until a
/// cache is first keyed by one). CPython allocates every thread state
/// (other than an interpreter's first, which lives inside the interpreter's
/// state) with `PyMem_RawCalloc` of one fixed size, so only raw frees of
/// blocks this size (and of interpreter states) look for keys to clear.
static TSTATE_BLOCK_SIZE: AtomicUsize = AtomicUsize::new(0);

/// Whether the thread state `tstate` may key a cache: its address cannot be
/// reused before the key is cleared. True for a block of ours of the
/// thread-state size (recorded on first use), for an address inside one of
/// our blocks (an interpreter's first thread state, inside the interpreter
/// state, whose free clears keys in it) and for memory that is not ours
/// (static, or freed through `raw_free`'s foreign path, which clears keys).
fn tstate_may_key(tstate: *mut ffi::PyThreadState) -> bool {
    // SAFETY: `tstate` is the current thread state, live while it is current.
    let Some(size) = (unsafe { heap::usable_size(tstate as *const u8) }) else { return true };
    if !heap::owns(tstate as *const u8) {
        return true;
    }
    match TSTATE_BLOCK_SIZE.compare_exchange(0, size, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => true,
        Err(known) => known == size,
    }
}

/// Lists this thread's cache in [`KEYED`] (once); false if it may not be
/// keyed (its thread is exiting).
fn list_cache(cache: &InterpreterCache) -> bool {
    match cache.listing.get() {
        LISTED => true,
        DELISTED => false,
        _ => {
            // Without the destructor the entry would dangle after the thread exits.
            if DELIST_AT_EXIT.try_with(|_| ()).is_err() {
                cache.listing.set(DELISTED);
                return false;
            }
            // SAFETY: DelistAtExit (registered just above) delists it before
            // the thread-local goes away; `listing` makes this the only time.
            unsafe { KEYED.list(&cache.key) };
            cache.listing.set(LISTED);
            true
        }
    }
}

#[inline(always)]
fn interpreter_token(id: i64) -> usize {
    ((id as usize) << 1) | 1
}

/// Whether this thread's cache is keyed by its current thread state. A null
/// thread state (none, or its slot not found) never matches: see [`interheap_sync::NO_KEY`].
#[inline(always)]
fn cache_is_current(cache: &InterpreterCache) -> bool {
    cache.key.matches(current_thread_state_fast() as usize)
}

/// The calling thread's heap for domain part `part` (see [`PARTS`])
/// in its current interpreter, if this thread's cache knows it: the
/// allocation fast path. `None` sends the caller to its slow path.
#[inline(always)]
fn cached_interpreter_heap(part: usize) -> Option<&'static Heap> {
    CACHE.with(|cache| {
        if !cache_is_current(cache) {
            return None;
        }
        // SAFETY: a keyed entry has all its heaps (leaked, so never null),
        // and `part` is below PARTS.
        Some(unsafe {
            let heap = *cache.heaps.get().get_unchecked(part);
            std::hint::assert_unchecked(!heap.is_null());
            &*heap
        })
    })
}

/// Whether the calling thread owns `heap` as the heap of domain part `part`
/// of its current interpreter, by its cache only (false sends the caller to
/// its slow path): the free fast path's test. A block of the other part's
/// heap takes the slow path.
#[inline(always)]
fn owns_cached(heap: *const Heap, part: usize) -> bool {
    CACHE.with(|cache| {
        // SAFETY: `part` is below PARTS.
        heap == unsafe { *cache.heaps.get().get_unchecked(part) } && cache_is_current(cache)
    })
}

/// The calling thread's heap for domain part `part` in its current
/// interpreter (created on its first allocation), or `None` without a
/// thread state.
#[inline(always)]
fn current_interpreter_heap(part: usize) -> Option<&'static Heap> {
    match cached_interpreter_heap(part) {
        Some(heap) => Some(heap),
        None => current_interpreter_heap_slow(part),
    }
}

#[cold]
fn current_interpreter_heap_slow(part: usize) -> Option<&'static Heap> {
    let interp = current_thread_interpreter();
    if interp.is_null() {
        return None;
    }
    // SAFETY: `interp` is the current thread state's interpreter, alive while
    // it is current; for a non-null argument the call only reads the ID.
    let id = unsafe { ffi::PyInterpreterState_GetID(interp) };
    if id < 0 {
        return None;
    }
    let heaps = CACHE.with(|cache| {
        let previous = cache.heaps.get()[0];
        if cache.id.get() != id && !previous.is_null() {
            // This thread left the interpreter it last allocated in: if it
            // was creating it, its start-up is over (see apply_default_limit).
            // SAFETY: cached heaps are leaked, never freed.
            if let Some(account) = unsafe { &*previous }.account() {
                account.budget().mark_started();
            }
        }
        let heaps = if cache.id.get() == id && !previous.is_null() {
            cache.heaps.get()
        } else {
            let entry = interpreter_heaps_lookup(id, interp);
            entry.heaps.map(|h| h as *const Heap)
        };
        // Unkeyed while the entry changes; keyed last, only by a thread state
        // that is current (so no one can free it meanwhile).
        cache.key.unkey();
        cache.heaps.set(heaps);
        cache.token.set(interpreter_token(id));
        cache.id.set(id);
        let tstate = current_thread_state_fast();
        if !tstate.is_null()
            && installed().contains(Domain::Raw)
            && tstate_may_key(tstate)
            && list_cache(cache)
        {
            cache.key.key(tstate as usize);
        }
        heaps
    });
    // SAFETY: both entries point to leaked heaps.
    Some(unsafe { &*heaps[part] })
}

/// The calling thread's interpreter token, if this thread's cache knows its
/// interpreter.
#[inline(always)]
fn cached_interpreter_token() -> Option<usize> {
    CACHE.with(|cache| cache_is_current(cache).then(|| cache.token.get()))
}

/// The calling thread's owner token for interpreter heaps: its current
/// interpreter's, or [`NO_OWNER`] without a thread state. Creates nothing.
#[inline(always)]
fn current_interpreter_token() -> usize {
    cached_interpreter_token().unwrap_or_else(current_interpreter_token_slow)
}

#[cold]
fn current_interpreter_token_slow() -> usize {
    let interp = current_thread_interpreter();
    if interp.is_null() {
        return NO_OWNER;
    }
    // SAFETY: as in current_interpreter_heap_slow.
    let id = unsafe { ffi::PyInterpreterState_GetID(interp) };
    if id < 0 {
        NO_OWNER
    } else {
        interpreter_token(id)
    }
}

/// The caller's owner token for a heap whose owner token is `owner` (see the
/// module docs): interpreter tokens are odd, thread tokens even, so the
/// heap's own token tells which one the caller would hold.
#[inline(always)]
fn token_for(owner: usize) -> usize {
    if owner & 1 == 1 {
        current_interpreter_token()
    } else {
        thread_token()
    }
}

/// The heaps of interpreter `id` (created on its first allocation).
#[cold]
fn interpreter_heaps_lookup(id: i64, state: *mut ffi::PyInterpreterState) -> &'static InterpreterHeaps {
    let mut all = INTERPRETERS.lock();
    if let Some(entry) = all.0.iter().find(|e| e.id == id) {
        return entry;
    }
    let token = interpreter_token(id);
    let label = |domain: Domain| HeapLabel { kind: KIND_INTERPRETER, id, part: domain as u8 };
    let account: &'static Account = Box::leak(Box::new(Account::with_hook(id, Some(apply_default_limit))));
    let entry: &'static InterpreterHeaps = Box::leak(Box::new(InterpreterHeaps {
        id,
        state: state as usize,
        heaps: [
            new_heap(label(Domain::Mem), token, Some(account)),
            new_heap(label(Domain::Object), token, Some(account)),
            new_heap(label(Domain::Raw), token, Some(account)),
        ],
        account,
        ended: Cell::new(false),
        info: Cell::new((0, false)),
        ended_at: Cell::new(0),
    }));
    all.0.push(entry);
    entry
}

/// CPython is freeing the raw block `[block, block + size)`: if an
/// interpreter's state lives there, that interpreter is gone; end its heaps.
#[cold]
fn end_interpreters_in(block: usize, size: usize) {
    let all = INTERPRETERS.lock();
    for entry in all.0.iter() {
        if !entry.ended.get() && entry.id != 0 && (block..block + size).contains(&entry.state) {
            // Last chance to say what it was: its state is still there.
            describe_entry(entry);
            entry.ended_at.set(crate::interp_end::monotonic_ns());
            entry.ended.set(true);
            for heap in entry.heaps {
                // SAFETY: the interpreter's threads are gone (CPython deletes
                // them before the interpreter state), so no owner can run.
                unsafe { heap.end() };
            }
            // The state holds the interpreter's first thread state.
            KEYED.forget_keys_in(block, block + size);
        }
    }
}

/// The smallest raw block that can hold an interpreter state (all of 3.12's
/// and 3.13's are far larger), so small frees skip the check.
const MIN_INTERPRETER_STATE: usize = 4096;

// ----- the allocator functions -----

/// Index of the interpreter heap for const domain `D` (1 = mem, 2 = object).
const fn part<const D: usize>() -> usize {
    D - 1
}

/// An interpreter's heaps, by part: mem (0), object (1) and raw ([`RAW_PART`]).
const PARTS: usize = 3;
/// The part of an interpreter's raw heap: raw calls made while one of its
/// thread states is current, when the allocator serves all three domains
/// (see [`raw_malloc`]).
const RAW_PART: usize = 2;

extern "C" fn interp_malloc<const D: usize, const R: bool>(ctx: *mut c_void, size: usize) -> *mut c_void {
    if let Some(heap) = cached_interpreter_heap(part::<D>()) {
        // SAFETY: mem/object calls hold the GIL of the current interpreter,
        // which owns that interpreter's heaps (module docs); every heap has
        // the mode R was chosen for at install.
        return unsafe { heap.alloc_as::<R>(size) } as *mut c_void;
    }
    interp_malloc_slow::<D>(ctx, size)
}

/// Same signature as the fast path, so that the call to it is a jump.
#[cold]
extern "C" fn interp_malloc_slow<const D: usize>(_ctx: *mut c_void, size: usize) -> *mut c_void {
    match current_interpreter_heap_slow(part::<D>()) {
        // SAFETY: mem/object calls hold the GIL of the current interpreter,
        // which owns that interpreter's heaps (module docs).
        Some(heap) => unsafe { heap.alloc(size) as *mut c_void },
        // SAFETY: with_thread_heap hands us a heap we own.
        None => with_thread_heap(|h| unsafe { h.alloc(size) }) as *mut c_void,
    }
}

extern "C" fn interp_calloc<const D: usize>(_ctx: *mut c_void, count: usize, size: usize) -> *mut c_void {
    match current_interpreter_heap(part::<D>()) {
        // SAFETY: as in interp_malloc.
        Some(heap) => unsafe { heap.alloc_zeroed(count, size) as *mut c_void },
        // SAFETY: with_thread_heap hands us a heap we own.
        None => with_thread_heap(|h| unsafe { h.alloc_zeroed(count, size) }) as *mut c_void,
    }
}

extern "C" fn interp_realloc<const D: usize>(_ctx: *mut c_void, p: *mut c_void, size: usize) -> *mut c_void {
    let outcome = match current_interpreter_heap(part::<D>()) {
        // SAFETY: as in interp_malloc; `p` is null or a live block per CPython's contract.
        Some(heap) => unsafe { heap.realloc(p as *mut u8, size, token_for) },
        // SAFETY: with_thread_heap hands us a heap we own.
        None => with_thread_heap(|h| unsafe { h.realloc(p as *mut u8, size, token_for) }),
    };
    match outcome {
        Realloc::Done(q) => q as *mut c_void,
        Realloc::NotOurs => forward_realloc(D, p, size),
    }
}

extern "C" fn interp_free<const D: usize, const R: bool>(ctx: *mut c_void, p: *mut c_void) {
    // SAFETY: `p` is null (never ours: the segment map has no segment at 0)
    // or a live block that the caller gives up; owns_cached is true only for
    // the current interpreter's heap, which its GIL (held) owns; every heap
    // has the mode R was chosen for at install.
    if unsafe { heap::free_fast::<R>(p as *mut u8, |heap| owns_cached(heap, part::<D>())) } {
        return;
    }
    interp_free_slow::<D>(ctx, p);
}

/// Same signature as the fast path, so that the call to it is a jump.
#[cold]
extern "C" fn interp_free_slow<const D: usize>(_ctx: *mut c_void, p: *mut c_void) {
    if p.is_null() {
        return;
    }
    // SAFETY: `p` is a live block that the caller gives up.
    if !unsafe { heap::free(p as *mut u8, token_for) } {
        forward_free(D, p);
    }
}

/// The heap a raw call is served from. With `BY_INTERPRETER` (the allocator
/// serves all three domains, so a default build: fact 3), a call made while
/// a thread state is current comes from that interpreter's raw heap: on a
/// default build a current thread state holds its interpreter's GIL
/// (CPython takes the GIL before it makes a thread state current and clears
/// it before it drops the GIL, `_PyThreadState_Attach`/`detach_thread`), the
/// raw heap's owner, as for mem and object. So its raw bytes count in its
/// figures and against its limit, exactly. Calls without a thread state
/// (start-up, threads that are not Python's, code that released the GIL) are
/// never limited: they come from the calling thread's heap.
#[inline(always)]
fn with_raw_heap<const BY_INTERPRETER: bool, R>(f: impl FnOnce(&'static Heap) -> R) -> R {
    if BY_INTERPRETER {
        if let Some(heap) = current_interpreter_heap(RAW_PART) {
            return f(heap);
        }
    }
    with_thread_heap(f)
}

extern "C" fn raw_malloc<const BY_INTERPRETER: bool>(_ctx: *mut c_void, size: usize) -> *mut c_void {
    // SAFETY: with_raw_heap hands us a heap we own.
    with_raw_heap::<BY_INTERPRETER, _>(|h| unsafe { h.alloc(size) }) as *mut c_void
}

extern "C" fn raw_calloc<const BY_INTERPRETER: bool>(
    _ctx: *mut c_void,
    count: usize,
    size: usize,
) -> *mut c_void {
    // SAFETY: with_raw_heap hands us a heap we own.
    with_raw_heap::<BY_INTERPRETER, _>(|h| unsafe { h.alloc_zeroed(count, size) }) as *mut c_void
}

extern "C" fn raw_realloc<const BY_INTERPRETER: bool>(
    _ctx: *mut c_void,
    p: *mut c_void,
    size: usize,
) -> *mut c_void {
    // SAFETY: with_raw_heap hands us a heap we own; `p` is null or live.
    match with_raw_heap::<BY_INTERPRETER, _>(|h| unsafe { h.realloc(p as *mut u8, size, token_for) }) {
        Realloc::Done(q) => q as *mut c_void,
        Realloc::NotOurs => forward_realloc(Domain::Raw as usize, p, size),
    }
}

extern "C" fn raw_free(_ctx: *mut c_void, p: *mut c_void) {
    if p.is_null() {
        return;
    }
    let end_if_interpreter_state = |size: usize| {
        if size >= MIN_INTERPRETER_STATE {
            end_interpreters_in(p as usize, size);
        } else if size == TSTATE_BLOCK_SIZE.load(Ordering::Relaxed) {
            // Maybe a thread state that keys a cache (see InterpreterCache).
            KEYED.forget_keys_in(p as usize, p as usize + size);
        }
    };
    // SAFETY: `p` is a live block that the caller gives up.
    if !unsafe { heap::free_with(p as *mut u8, end_if_interpreter_state, token_for) } {
        // Not ours, of unknown size: it may hold a thread state that keys a cache.
        KEYED.forget_keys_in(0, usize::MAX);
        forward_free(Domain::Raw as usize, p);
    }
}

/// Hands a pointer that is not ours to the allocator that made it.
#[cold]
fn forward_free(domain: usize, p: *mut c_void) {
    if let Some(prev) = PREVIOUS.get() {
        let a = &prev.0[domain];
        if let Some(free) = a.free {
            // `p` was allocated by the previous allocator of this domain (it
            // is not ours), which is still usable.
            free(a.ctx, p);
        }
    }
}

#[cold]
fn forward_realloc(domain: usize, p: *mut c_void, size: usize) -> *mut c_void {
    match PREVIOUS.get().and_then(|prev| prev.0[domain].realloc.map(|r| (r, prev.0[domain].ctx))) {
        // As in forward_free: the previous allocator made `p`.
        Some((realloc, ctx)) => realloc(ctx, p, size),
        None => ptr::null_mut(),
    }
}

// ----- memory limits -----

/// The limit of interpreters whose own limit was never set (see [`set_default_limit`]).
static DEFAULT_LIMIT: DefaultLimit = DefaultLimit::new();

/// Why a limit could not be set. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitError {
    /// The allocator does not serve mem and object here (not installed, or a
    /// free-threaded build), so it cannot see what interpreters hold.
    NotServing,
    /// No interpreter with this ID has allocated (it does not exist).
    UnknownInterpreter(i64),
    /// The interpreter has ended.
    Ended(i64),
}

impl fmt::Display for LimitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitError::NotServing => f.write_str(
                "the interheap allocator does not serve the mem and object domains in this process \
                 (not installed, or a free-threaded build, where they stay CPython's mimalloc), so \
                 it cannot limit interpreters: use interheap's hooks (python -m interheap run --limit)",
            ),
            LimitError::UnknownInterpreter(id) => {
                write!(f, "interpreter {id} has no heaps (it does not exist)")
            }
            LimitError::Ended(id) => write!(f, "interpreter {id} has ended"),
        }
    }
}

impl std::error::Error for LimitError {}

/// Whether the allocator serves mem and object here, so it sees (and can
/// limit) what interpreters hold.
pub fn serves_interpreters() -> bool {
    installed().contains(Domain::Mem) && installed().contains(Domain::Object)
}

/// Interpreter `id`'s heaps, if it has any.
fn find_entry(id: i64) -> Option<&'static InterpreterHeaps> {
    INTERPRETERS.lock().0.iter().find(|e| e.id == id).copied()
}

/// The heaps of a live interpreter whose limit may change (main's are made
/// if they do not exist yet: its limit may be set before initialization).
fn limitable_entry(id: i64) -> Result<&'static InterpreterHeaps, LimitError> {
    if !serves_interpreters() {
        return Err(LimitError::NotServing);
    }
    let entry = if id == 0 {
        interpreter_heaps_lookup(0, ptr::null_mut())
    } else {
        find_entry(id).ok_or(LimitError::UnknownInterpreter(id))?
    };
    if entry.ended.get() {
        return Err(LimitError::Ended(id));
    }
    Ok(entry)
}

/// Sets (or with `None` removes) the limit on interpreter `id`'s live bytes
/// in its mem, object and raw heaps. The allocation that would cross it, on a
/// heap's slow path, fails (MemoryError in that interpreter); an interpreter
/// can go over by at most what the current pages of its size classes still
/// hold free (see `interheap_engine::heap::Account`). Main's limit (ID 0)
/// may be set before initialization.
pub fn set_limit(id: i64, limit: Option<u64>) -> Result<(), LimitError> {
    limitable_entry(id)?.account.budget().set_limit(limit);
    Ok(())
}

/// Lowers interpreter `id`'s limit to `limit` (or sets one where there was
/// none): what an interpreter may do to itself. `Ok(false)`, changing
/// nothing, if that would raise it.
pub fn lower_limit(id: i64, limit: u64) -> Result<bool, LimitError> {
    let entry = limitable_entry(id)?;
    // A default that applies counts as the limit to lower (the interpreter
    // runs code, so it is created: see `apply_default_limit`).
    if id != 0 {
        DEFAULT_LIMIT.apply(entry.account.budget(), id);
    }
    Ok(entry.account.budget().lower_limit(limit))
}

/// Interpreter `id`'s live bytes in its three heaps, its limit and
/// what it refused; `None` if it has no heaps.
pub fn interpreter_figures(id: i64) -> Option<(i64, BudgetSnapshot)> {
    let entry = find_entry(id)?;
    let live = entry.heaps.iter().map(|h| h.snapshot().live_bytes).sum();
    Some((live, entry.account.budget().snapshot()))
}

/// Interpreter `id`'s limit and what it refused; `None` if it has no heaps.
pub fn budget(id: i64) -> Option<BudgetSnapshot> {
    find_entry(id).map(|e| e.account.budget().snapshot())
}

/// Gives every interpreter with an ID of at least `from_id` whose limit was
/// never set a limit of its own (`None` removes the default). It applies once
/// the interpreter is created, not to its start-up, where CPython records
/// where an interpreter came from (3.13+): `concurrent.interpreters` and its
/// pool get it when they first run code; an interpreter made with the C API
/// only through [`set_limit`]. On 3.12, which records neither, it applies
/// once the thread that created the interpreter has left it (start-up is over).
pub fn set_default_limit(limit: Option<u64>, from_id: i64) -> Result<(), LimitError> {
    if limit.is_some() && !serves_interpreters() {
        return Err(LimitError::NotServing);
    }
    crate::interp::prepare_describe();
    DEFAULT_LIMIT.set(limit, from_id);
    Ok(())
}

/// The default limit and the first interpreter ID it applies to.
pub fn default_limit() -> Option<(u64, i64)> {
    DEFAULT_LIMIT.get()
}

/// The accounts' [`interheap_engine::heap::OnUnconfigured`]: on a heap's
/// slow path (its interpreter's GIL held), gives the interpreter the default
/// limit once it is created. CPython records an interpreter that
/// `concurrent.interpreters` is still creating as made by the C API (see
/// `interp::describe_current`); one made with the C API keeps that, and gets
/// a limit only through [`set_limit`]. 3.12 records nothing: the default
/// applies once the account is marked started (its creator left it).
fn apply_default_limit(account: &Account) {
    let id = account.tag();
    if id == 0 || DEFAULT_LIMIT.for_interpreter(id).is_none() {
        return;
    }
    let interp = current_thread_interpreter();
    // SAFETY: `interp` is the calling thread's interpreter, alive while it is
    // current; for a non-null argument the call only reads the ID.
    if interp.is_null() || unsafe { ffi::PyInterpreterState_GetID(interp) } != id {
        return;
    }
    if crate::interp::records_whence() {
        // SAFETY: as above.
        if unsafe { crate::interp::whence_is_capi(interp) } {
            return;
        }
    } else if !account.budget().is_started() {
        // 3.12 records no whence. An interpreter is created on one thread,
        // start to end, under its own thread state; the creator then switches
        // back to its own (`Py_NewInterpreterFromConfig`'s callers do), which
        // marks the account started (current_interpreter_heap_slow).
        return;
    }
    DEFAULT_LIMIT.apply(account.budget(), id);
}

// ----- figures -----

/// Set once a reader of the figures has resolved the symbols describing
/// interpreters needs (`interp::prepare_describe`, which may allocate, so
/// never from inside the allocator).
static DESCRIBE_READY: AtomicBool = AtomicBool::new(false);

/// Describes `entry`'s interpreter if it is live and not described for
/// good yet. Called under the [`INTERPRETERS`] lock, which keeps its state
/// from being freed (the free ends it under that lock first).
fn describe_entry(entry: &InterpreterHeaps) {
    if entry.ended.get() || entry.info.get().1 || !DESCRIBE_READY.load(Ordering::Acquire) {
        return;
    }
    if entry.id != 0 && entry.state == 0 {
        return;
    }
    // SAFETY: the state is live (see above); main's may be null, and is not read.
    let described = unsafe { crate::interp::describe_interpreter(entry.id, entry.state as *mut _) };
    entry.info.set(described);
}

/// Every interpreter's figures from its heaps, and those of calls made
/// without a thread state (ID -1), for `crate::heap_figures`; `None` unless
/// the allocator serves every domain this build has and its heaps keep
/// requested sizes (only then are they the figures the hooks would count).
pub fn figures_records() -> Option<Vec<crate::heap_figures::FiguresRecord>> {
    use crate::heap_figures::{DomainRecord, FiguresRecord};
    if installed() != Domains::ALL || !keeps_requested_sizes() {
        return None;
    }
    if !DESCRIBE_READY.load(Ordering::Acquire) {
        crate::interp::prepare_describe();
        DESCRIBE_READY.store(true, Ordering::Release);
    }
    let domain_of_part = [Domain::Mem, Domain::Object, Domain::Raw];
    let mut records: Vec<FiguresRecord> = {
        let all = INTERPRETERS.lock();
        all.0
            .iter()
            .map(|entry| {
                describe_entry(entry);
                let budget = entry.account.budget().snapshot();
                let mut record = FiguresRecord {
                    id: entry.id,
                    info: u32::from(entry.info.get().0),
                    settled: u32::from(entry.info.get().1),
                    ended_at: entry.ended_at.get(),
                    limit: budget.limit.map_or(-1, |l| l.min(i64::MAX as u64) as i64),
                    refused: budget.refused,
                    largest_refused: budget.largest_refused,
                    domains: Default::default(),
                };
                for (heap, domain) in entry.heaps.iter().zip(domain_of_part) {
                    record.domains[domain.index()] = DomainRecord::from_heap(&heap.snapshot());
                }
                record
            })
            .collect()
    };
    let mut shared = FiguresRecord { id: -1, limit: -1, ..FiguresRecord::default() };
    for heap in heap::heaps().filter(|h| matches!(h.label().kind, KIND_THREAD | KIND_EXITING)) {
        shared.domains[Domain::Raw.index()].add(&DomainRecord::from_heap(&heap.snapshot()));
    }
    records.push(shared);
    Some(records)
}

/// Every heap of the interheap allocator, with its figures.
pub fn heap_snapshots() -> Vec<HeapSnapshot> {
    heap::heaps()
        .filter(|h| matches!(h.label().kind, KIND_INTERPRETER | KIND_THREAD | KIND_EXITING))
        .map(Heap::snapshot)
        .collect()
}

/// The figures as JSON (see `report_json` in the docs of the Python package).
pub fn report_json() -> String {
    let guard = crate::raw_swap_guard::state().map_or("null".to_owned(), |g| {
        format!("\"{}\"", g.to_string().replace('\\', "\\\\").replace('"', "\\\""))
    });
    let mut out = format!(
        "{{\"version\":1,\"fast_thread_state\":{},\"raw_swap_guard\":{guard},\"requested_sizes\":{},\"installed\":[",
        crate::interp::fast_tstate::enabled(),
        keeps_requested_sizes()
    );
    let names = installed().names();
    out.push_str(&names.iter().map(|n| format!("\"{n}\"")).collect::<Vec<_>>().join(","));
    out.push_str("],\"heaps\":[");
    let mut snaps = heap_snapshots();
    snaps.sort_by_key(|s| (s.label.kind, s.label.id, s.label.part));
    for (i, s) in snaps.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let kind = match s.label.kind {
            KIND_INTERPRETER => "interpreter",
            KIND_THREAD => "thread",
            _ => "exiting",
        };
        let domain = Domain::from_index(s.label.part as usize).map_or("raw", Domain::name);
        let classes: Vec<String> = s
            .classes
            .iter()
            .enumerate()
            .filter(|(_, c)| c.allocations > 0)
            .map(|(i, c)| format!("[{i},{},{},{},{}]", c.block_size, c.allocations, c.frees, c.remote_frees))
            .collect();
        out.push_str(&format!(
            "{{\"kind\":\"{kind}\",\"id\":{},\"domain\":\"{domain}\",\"ended\":{},\"live_bytes\":{},\
             \"peak_bytes\":{},\"live_blocks\":{},\"allocations\":{},\"frees\":{},\"remote_frees\":{},\
             \"reallocations\":{},\"failures\":{},\"mapped_bytes\":{},\"classes\":[{}]}}",
            s.label.id,
            s.ended,
            s.live_bytes,
            s.peak_bytes,
            s.live_blocks(),
            s.allocations(),
            s.frees(),
            s.remote_frees(),
            s.reallocations,
            s.failures,
            s.mapped_bytes,
            classes.join(",")
        ));
    }
    out.push_str("],\"limits\":[");
    let budgets: Vec<String> = {
        let all = INTERPRETERS.lock();
        all.0
            .iter()
            .map(|e| {
                let b = e.account.budget().snapshot();
                let limit = b.limit.map_or("null".to_owned(), |l| l.to_string());
                format!(
                    "{{\"id\":{},\"limit\":{limit},\"refused\":{},\"largest_refused\":{}}}",
                    e.id, b.refused, b.largest_refused
                )
            })
            .collect()
    };
    out.push_str(&budgets.join(","));
    let default = default_limit().map_or("null".to_owned(), |(l, from)| format!("[{l},{from}]"));
    out.push_str(&format!("],\"default_limit\":{default}}}"));
    out
}
