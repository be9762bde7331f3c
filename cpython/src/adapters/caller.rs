//! Who is calling an adapter: the interpreter, whether it has its own GIL and
//! its own object-allocator state. Read from inside allocator calls, so only
//! functions that never block, allocate or raise are used (DESIGN.md fact 5).
//!
//! # Own GIL: what each version can tell
//!
//! The public API of 3.12 and 3.13 cannot tell whether an interpreter has
//! its own GIL. interheap uses what each version exports:
//!
//! * **3.13+**: `_PyInterpreterConfig_InitFromState` (exported; it only
//!   copies the interpreter's feature flags and `own_gil` into a
//!   `PyInterpreterConfig`, no lock, no allocation). Exact: legacy
//!   interpreters (shared GIL) are known to share the main GIL.
//! * **3.12**: `_PyInterpreterState_HasFeature(interp, USE_MAIN_OBMALLOC)`
//!   tells the object-allocator state, but nothing exported tells the GIL.
//!   interheap is conservative there: every interpreter other than main is
//!   assumed to have its own GIL. Consequence: on 3.12 a lock wrapper
//!   switches to locking at the first call from *any* subinterpreter,
//!   including legacy ones that share the main GIL (correct, only slower).
//!
//! Both symbols are looked up with `dlsym` once; if one is missing (a
//! future version), the conservative answer is used.
//!
//! A mem or object call without a thread state counts as "other" (it
//! switches a lock wrapper to locking) once any interpreter besides main
//! exists; while main is the only interpreter, CPython's contract (mem and
//! object calls hold a GIL) means it holds the main GIL.

use std::ffi::{c_int, c_ulong, c_void, CStr};
use std::ptr::null_mut;
use std::sync::atomic::{AtomicPtr, Ordering::Relaxed};
use std::sync::OnceLock;

use interheap_engine::Domain;
use pyo3_ffi as ffi;

use super::gate::{Caller, NO_INTERPRETER};

/// What an interpreter-aware allocator learns about each call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallContext {
    /// The calling thread's interpreter, `None` without a thread state.
    pub interpreter: Option<i64>,
    /// The domain the call came through.
    pub domain: Domain,
    /// Whether the interpreter has its own GIL (`None`: unknown, or no interpreter).
    pub own_gil: Option<bool>,
    /// Whether it has its own object-allocator state (`None`: unknown, or no interpreter).
    pub own_obmalloc: Option<bool>,
}

/// `PyInterpreterConfig` of 3.12-3.14 (seven ints), with room to spare in
/// case a later version appends fields.
#[repr(C)]
#[derive(Default)]
struct InterpreterConfig {
    use_main_obmalloc: c_int,
    allow_fork: c_int,
    allow_exec: c_int,
    allow_threads: c_int,
    allow_daemon_threads: c_int,
    check_multi_interp_extensions: c_int,
    gil: c_int,
    _spare: [c_int; 9],
}

const OWN_GIL: c_int = 2;
const USE_MAIN_OBMALLOC: c_ulong = 1 << 5;

type ConfigFromState = unsafe extern "C" fn(*mut InterpreterConfig, *mut ffi::PyInterpreterState) -> c_int;
type HasFeature = unsafe extern "C" fn(*mut ffi::PyInterpreterState, c_ulong) -> c_int;

pub(crate) fn lookup(name: &CStr) -> *mut c_void {
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only reads;
    // a missing symbol gives NULL.
    unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) }
}

fn config_from_state() -> Option<ConfigFromState> {
    static F: OnceLock<usize> = OnceLock::new();
    let addr = *F.get_or_init(|| {
        if cfg!(Py_3_13) {
            lookup(c"_PyInterpreterConfig_InitFromState") as usize
        } else {
            0
        }
    });
    // SAFETY: a non-zero address is the exported function of that name,
    // whose C signature ConfigFromState matches.
    (addr != 0).then(|| unsafe { std::mem::transmute::<usize, ConfigFromState>(addr) })
}

fn has_feature() -> Option<HasFeature> {
    static F: OnceLock<usize> = OnceLock::new();
    let addr = *F.get_or_init(|| lookup(c"_PyInterpreterState_HasFeature") as usize);
    // SAFETY: as above, for `_PyInterpreterState_HasFeature`.
    (addr != 0).then(|| unsafe { std::mem::transmute::<usize, HasFeature>(addr) })
}

/// Resolves the symbols now, so that the first allocator call does not.
/// (`dlsym` may allocate with the C allocator; never with Python's.)
pub fn prepare() {
    let _ = config_from_state();
    let _ = has_feature();
}

/// The first fields of CPython's `struct _ts` (`PyThreadState`), which
/// `cpython/pystate.h` declares in the public, non-limited API, in this order
/// on 3.12, 3.13 and 3.14, default and free-threaded builds.
#[repr(C)]
struct ThreadStateHead {
    prev: *mut c_void,
    next: *mut c_void,
    interp: *mut ffi::PyInterpreterState,
}

/// The calling thread's interpreter state, or NULL without a thread state.
/// One call into CPython (a thread-local read) and one load: this is on the
/// lock wrapper's fast path.
#[inline(always)]
fn current_interp() -> *mut ffi::PyInterpreterState {
    // SAFETY: reads a thread-local; callable without an attached thread state.
    let tstate = unsafe { ffi::compat::PyThreadState_GetUnchecked() };
    if tstate.is_null() {
        return null_mut();
    }
    // SAFETY: `tstate` is the calling thread's own, live thread state, whose
    // layout starts with ThreadStateHead (see there).
    unsafe { (*(tstate as *const ThreadStateHead)).interp }
}

/// The main interpreter's state, cached once it exists. Its address never
/// changes (CPython 3.12+ keeps it in static storage).
#[inline(always)]
fn main_interp() -> *mut ffi::PyInterpreterState {
    static MAIN: AtomicPtr<ffi::PyInterpreterState> = AtomicPtr::new(null_mut());
    let main = MAIN.load(Relaxed);
    if !main.is_null() {
        return main;
    }
    // SAFETY: only reads the runtime's main-interpreter pointer (NULL before init).
    let main = unsafe { ffi::PyInterpreterState_Main() };
    MAIN.store(main, Relaxed);
    main
}

/// The calling thread's interpreter state and ID, if it has a thread state.
#[inline]
fn current() -> Option<(*mut ffi::PyInterpreterState, i64)> {
    let interp = current_interp();
    if interp.is_null() {
        return None;
    }
    // SAFETY: non-NULL interpreter; only reads its ID.
    let id = unsafe { ffi::PyInterpreterState_GetID(interp) };
    (id >= 0).then_some((interp, id))
}

/// (own GIL, own object-allocator state) of a non-main interpreter.
pub(crate) fn features(interp: *mut ffi::PyInterpreterState) -> (Option<bool>, Option<bool>) {
    let (own_gil, own_obmalloc, _) = features_and_settings(interp);
    (own_gil, own_obmalloc)
}

/// [`features`], and whether the interpreter's settings are loaded yet: also
/// used by the hooks to describe interpreters (`crate::interp::describe_current`).
///
/// Every valid config sets at least one feature flag (own obmalloc requires
/// `check_multi_interp_extensions`; main's obmalloc sets `USE_MAIN_OBMALLOC`),
/// so no flag at all means CPython has not loaded them yet: 3.12's
/// `new_interpreter` makes the new thread state current, and allocates
/// through it, before `init_interp_settings` (3.13 and 3.14 do it after).
/// Unknown (no symbol) counts as loaded.
pub(crate) fn features_and_settings(
    interp: *mut ffi::PyInterpreterState,
) -> (Option<bool>, Option<bool>, bool) {
    if let Some(f) = config_from_state() {
        let mut config = InterpreterConfig::default();
        // SAFETY: `interp` is a live interpreter (the caller's own, or one
        // whose state the allocator's registry lock keeps from being freed);
        // CPython only reads its fields (Python/interpconfig.c), and the
        // out-parameter is a writable struct at least as large as CPython's.
        if unsafe { f(&mut config, interp) } == 0 {
            let loaded = [
                config.use_main_obmalloc,
                config.allow_fork,
                config.allow_exec,
                config.allow_threads,
                config.allow_daemon_threads,
                config.check_multi_interp_extensions,
            ]
            .iter()
            .any(|flag| *flag != 0);
            return (Some(config.gil == OWN_GIL), Some(config.use_main_obmalloc == 0), loaded);
        }
    }
    match has_feature() {
        // SAFETY: as above; the function only tests bits of the flags.
        Some(f) => unsafe { (None, Some(f(interp, USE_MAIN_OBMALLOC) == 0), f(interp, c_ulong::MAX) != 0) },
        None => (None, None, true),
    }
}

/// For a lock wrapper's unlocked mode: does this call run under the main GIL?
///
/// Fast path, without touching a thread-local: if the newest interpreter
/// (the head of CPython's interpreter list) is the main one, no other
/// interpreter exists, so the call runs under the main GIL (mem and object
/// calls hold a GIL by CPython's contract). An interpreter is linked into
/// that list when it is created, before it can make any allocator call, and
/// every thread that later runs it synchronised with its creation; so a call
/// from any other interpreter always finds the head changed. (Reading the
/// head is a plain load without CPython's lock: a stale value can only be
/// seen by threads that are not that interpreter's.) Otherwise the calling
/// thread's interpreter decides.
#[inline(always)]
pub fn classify() -> Caller {
    let main = main_interp();
    // SAFETY: only reads the runtime's interpreter-list head.
    if unsafe { ffi::PyInterpreterState_Head() } == main {
        return Caller::MainGil;
    }
    let interp = current_interp();
    if !interp.is_null() && interp == main {
        return Caller::MainGil;
    }
    classify_other()
}

#[cold]
#[inline(never)]
fn classify_other() -> Caller {
    match current() {
        None => Caller::Other(NO_INTERPRETER),
        Some((_, 0)) => Caller::MainGil,
        Some((interp, id)) => match features(interp).0 {
            Some(false) => Caller::MainGil,
            _ => Caller::Other(id),
        },
    }
}

/// The full context of a call, for interpreter-aware allocators.
#[inline]
pub fn context(domain: Domain) -> CallContext {
    match current() {
        None => CallContext { interpreter: None, domain, own_gil: None, own_obmalloc: None },
        Some((_, 0)) => {
            CallContext { interpreter: Some(0), domain, own_gil: Some(true), own_obmalloc: Some(true) }
        }
        Some((interp, id)) => {
            let (own_gil, own_obmalloc) = features(interp);
            CallContext { interpreter: Some(id), domain, own_gil, own_obmalloc }
        }
    }
}

/// The calling thread's interpreter ID, `None` without a thread state.
#[inline]
pub fn current_id() -> Option<i64> {
    current().map(|(_, id)| id)
}
