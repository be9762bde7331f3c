//! Finding the calling thread's interpreter from inside an allocator hook.
//!
//! Only calls that never block and never allocate are used:
//! `PyThreadState_GetUnchecked` (`_PyThreadState_UncheckedGet` on 3.12, via
//! pyo3-ffi's compat shim), `PyThreadState_GetInterpreter` and
//! `PyInterpreterState_GetID`. A NULL thread state is normal (raw calls
//! without a thread state, pre-init, finalization, released-GIL regions,
//! threads Python never saw) and yields `None`.

use pyo3_ffi as ffi;

/// The ID of the interpreter whose thread state is current on this thread,
/// or `None` if the thread has no current thread state.
#[inline]
pub fn current_interpreter_id() -> Option<i64> {
    current_interpreter().map(|(id, _)| id)
}

/// The current thread state's interpreter, as its ID and its address (the
/// address only identifies it while it is alive: key by the ID, fact 6).
#[inline(always)]
pub fn current_interpreter() -> Option<(i64, *mut ffi::PyInterpreterState)> {
    // SAFETY: PyThreadState_GetUnchecked only reads a thread-local; it is
    // documented to be callable without an attached thread state.
    let tstate = unsafe { ffi::compat::PyThreadState_GetUnchecked() };
    if tstate.is_null() {
        return None;
    }
    // SAFETY: `tstate` is the current thread's own thread state, which cannot
    // be freed while this thread is using it; the call only reads a field.
    let interp = unsafe { ffi::PyThreadState_GetInterpreter(tstate) };
    if interp.is_null() {
        return None;
    }
    // SAFETY: `interp` is non-NULL and outlives the thread states bound to it;
    // for a non-NULL argument the call only reads the ID (no error, no allocation).
    let id = unsafe { ffi::PyInterpreterState_GetID(interp) };
    (id >= 0).then_some((id, interp))
}

/// The first fields of CPython's `struct _ts` (`PyThreadState`), public in
/// `Include/cpython/pystate.h` and the same in 3.12 and 3.13: `prev`, `next`,
/// `interp`. Read directly only after [`fast_tstate`] verified, once per
/// process, that `interp` is where it says and agrees with
/// `PyThreadState_GetInterpreter`.
#[repr(C)]
struct ThreadStateHead {
    prev: *mut ffi::PyThreadState,
    next: *mut ffi::PyThreadState,
    interp: *mut ffi::PyInterpreterState,
}

/// This thread's current thread state, read from libpython's own
/// thread-local slot: null when there is none, or when the slot is not found
/// (yet; see [`fast_tstate`]). One TLS load and one load, no call.
#[inline(always)]
pub fn current_thread_state_fast() -> *mut ffi::PyThreadState {
    // SAFETY: the slot is this thread's instance of libpython's
    // `_Py_tss_tstate` (verified when it was found), live as long as the
    // thread, or a static null until then.
    unsafe { *fast_tstate::slot() }
}

/// The interpreter of `tstate`, read from its head (layout verified by
/// [`fast_tstate`], the only source of the thread states passed here).
///
/// # Safety
///
/// `tstate` is a live thread state read from a slot [`fast_tstate`] found.
#[inline(always)]
pub unsafe fn thread_state_interpreter(tstate: *mut ffi::PyThreadState) -> *mut ffi::PyInterpreterState {
    // SAFETY: per the contract.
    unsafe { (*(tstate as *const ThreadStateHead)).interp }
}

/// The fast half of [`current_thread_interpreter`]: null when this thread's
/// slot holds no thread state, or its slot is not found (yet); the caller
/// then takes its slow path, which calls [`current_thread_interpreter`].
#[inline(always)]
pub fn current_thread_interpreter_fast() -> *mut ffi::PyInterpreterState {
    let tstate = current_thread_state_fast();
    if tstate.is_null() {
        return std::ptr::null_mut();
    }
    // SAFETY: `tstate` is this thread's current thread state, which cannot be
    // freed while it is current; the layout was verified. A thread state
    // always has an interpreter.
    unsafe { (*(tstate as *const ThreadStateHead)).interp }
}

/// The current thread state's interpreter (null without a thread state), as
/// cheaply as this process allows: two loads once [`fast_tstate`] has found
/// libpython's own thread-local slot for this thread, else the public API
/// (`PyThreadState_GetUnchecked`, `PyThreadState_GetInterpreter`).
#[inline(always)]
pub fn current_thread_interpreter() -> *mut ffi::PyInterpreterState {
    let interp = current_thread_interpreter_fast();
    if interp.is_null() {
        return fast_tstate::current_interpreter_slow();
    }
    interp
}

/// Finds and caches the address of libpython's thread-local `_Py_tss_tstate`
/// for each thread, so that reading the current thread state costs two loads
/// instead of a call into libpython that calls `__tls_get_addr`.
///
/// libpython does not export the variable, so it is found by value: once per
/// process, on a thread with a current thread state, the one 8-byte word of
/// libpython's TLS block (`dl_iterate_phdr` gives its address for the calling
/// thread) that holds that thread state. Anything other than exactly one
/// match, no TLS block, or a later disagreement with
/// `PyThreadState_GetUnchecked` turns the fast path off for good, and the
/// public API serves. 3.12 to 3.14 have one match. 3.15 has two: a second
/// thread-local next to `_Py_tss_tstate` holds the same thread state on
/// every call an allocator sees (checked on main and subinterpreter
/// threads), so the word cannot be told apart by value and 3.15 takes the
/// API (Debian's libpython is stripped: no symbol names the offset). Per thread, the slot's address is `__tls_get_addr` of
/// (libpython's TLS module, offset), checked against the API once.
///
/// Only on glibc Linux; elsewhere the public API always serves.
pub mod fast_tstate {
    use std::cell::Cell;
    use std::ptr;
    use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

    use pyo3_ffi as ffi;

    use super::ThreadStateHead;

    const UNPROBED: u8 = 0;
    const READY: u8 = 1;
    const DISABLED: u8 = 2;

    static STATE: AtomicU8 = AtomicU8::new(UNPROBED);
    /// libpython's TLS module ID and the slot's offset in its block (set before READY).
    static MODULE: AtomicUsize = AtomicUsize::new(0);
    static OFFSET: AtomicUsize = AtomicUsize::new(0);

    type Slot = *const *mut ffi::PyThreadState;

    /// What a thread reads until its slot is found: always null, so the
    /// fast path falls through to the public API without a second check.
    struct NoSlot(*mut ffi::PyThreadState);
    // SAFETY: never written; a null pointer read from any thread.
    unsafe impl Sync for NoSlot {}
    static NO_SLOT: NoSlot = NoSlot(ptr::null_mut());

    thread_local! {
        /// This thread's instance of `_Py_tss_tstate`, or `NO_SLOT` until found (or if unavailable).
        static SLOT: Cell<Slot> = const { Cell::new(&NO_SLOT.0) };
    }

    /// This thread's slot: always readable (see `NO_SLOT`).
    #[inline(always)]
    pub fn slot() -> Slot {
        SLOT.with(Cell::get)
    }

    /// What [`slot`] returns on a thread whose slot is not found: a null
    /// thread state that is not this thread's answer.
    pub fn no_slot() -> Slot {
        &NO_SLOT.0
    }

    fn has_slot() -> bool {
        !ptr::eq(slot(), &NO_SLOT.0)
    }

    /// Whether the fast path is on in this process (for tests and reports).
    pub fn enabled() -> bool {
        STATE.load(Ordering::Acquire) == READY
    }

    /// Turns the fast path off for good (before any thread found its slot):
    /// the public API then always serves.
    pub fn disable() {
        STATE.store(DISABLED, Ordering::Release);
    }

    fn api_tstate() -> *mut ffi::PyThreadState {
        // SAFETY: only reads a thread-local; callable without an attached thread state.
        unsafe { ffi::compat::PyThreadState_GetUnchecked() }
    }

    /// No thread state in this thread's slot: there is none, or the slot is
    /// not found yet. The public API answers, and finds the slot when it can.
    #[cold]
    pub fn current_interpreter_slow() -> *mut ffi::PyInterpreterState {
        if has_slot() {
            return ptr::null_mut();
        }
        let tstate = api_tstate();
        match STATE.load(Ordering::Acquire) {
            READY => adopt_slot(tstate),
            UNPROBED if !tstate.is_null() => probe(tstate),
            _ => {}
        }
        if tstate.is_null() {
            return ptr::null_mut();
        }
        // SAFETY: `tstate` is this thread's current thread state.
        unsafe { ffi::PyThreadState_GetInterpreter(tstate) }
    }

    #[repr(C)]
    struct TlsIndex {
        module: usize,
        offset: usize,
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    extern "C" {
        /// glibc's (ld.so's) TLS resolver: the calling thread's address of a variable.
        fn __tls_get_addr(index: *const TlsIndex) -> *mut u8;
    }

    /// Finds this thread's slot from the process-wide (module, offset).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn adopt_slot(tstate: *mut ffi::PyThreadState) {
        let index =
            TlsIndex { module: MODULE.load(Ordering::Relaxed), offset: OFFSET.load(Ordering::Relaxed) };
        // SAFETY: (module, offset) name an 8-byte variable of libpython's TLS
        // block (found by `probe`); the resolver gives this thread's instance.
        let slot = unsafe { __tls_get_addr(&index) } as Slot;
        // SAFETY: the slot is this thread's, aligned and readable.
        if slot.is_null() || unsafe { *slot } != tstate {
            STATE.store(DISABLED, Ordering::Release);
            return;
        }
        // If thread-locals are being torn down, the slot is simply not cached.
        let _ = SLOT.try_with(|s| s.set(slot));
    }

    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    fn adopt_slot(_tstate: *mut ffi::PyThreadState) {}

    /// What `dl_iterate_phdr` found for the object that holds libpython's code.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    struct Found {
        code: usize,
        module: usize,
        block: *const u8,
        block_size: usize,
        found: bool,
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe extern "C" fn find_object(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        data: *mut libc::c_void,
    ) -> i32 {
        // SAFETY: glibc passes a valid info record; `data` is our `Found`.
        let (info, found) = unsafe { (&*info, &mut *(data as *mut Found)) };
        let mut contains = false;
        let mut tls_size = 0;
        for i in 0..info.dlpi_phnum as usize {
            // SAFETY: `dlpi_phdr` has `dlpi_phnum` entries.
            let ph = unsafe { &*info.dlpi_phdr.add(i) };
            let start = info.dlpi_addr as usize + ph.p_vaddr as usize;
            if ph.p_type == libc::PT_LOAD && (start..start + ph.p_memsz as usize).contains(&found.code) {
                contains = true;
            }
            if ph.p_type == libc::PT_TLS {
                tls_size = ph.p_memsz as usize;
            }
        }
        if !contains {
            return 0;
        }
        found.found = true;
        found.module = info.dlpi_tls_modid;
        found.block = info.dlpi_tls_data as *const u8;
        found.block_size = tls_size;
        1
    }

    /// Finds (module, offset) on a thread whose current thread state is `tstate`.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn probe(tstate: *mut ffi::PyThreadState) {
        let code = ffi::PyThreadState_GetInterpreter as *const () as usize;
        let mut found = Found { code, module: 0, block: ptr::null(), block_size: 0, found: false };
        // SAFETY: the callback only reads what glibc hands it and writes `found`.
        unsafe { libc::dl_iterate_phdr(Some(find_object), &mut found as *mut Found as *mut libc::c_void) };
        let words = found.block_size / 8;
        if !found.found
            || found.module == 0
            || found.block.is_null()
            || !(found.block as usize).is_multiple_of(8)
        {
            STATE.store(DISABLED, Ordering::Release);
            return;
        }
        // SAFETY: the block is this thread's instance of libpython's TLS
        // segment, `block_size` bytes long, aligned (checked above).
        let block = unsafe { std::slice::from_raw_parts(found.block as *const usize, words) };
        let mut matches = block.iter().enumerate().filter(|(_, w)| **w == tstate as usize);
        let (Some((index, _)), None) = (matches.next(), matches.next()) else {
            STATE.store(DISABLED, Ordering::Release);
            return;
        };
        // The thread state's head must say what the API says.
        // SAFETY: `tstate` is this thread's current thread state.
        let interp = unsafe { ffi::PyThreadState_GetInterpreter(tstate) };
        // SAFETY: as above; reading the public struct's first fields.
        if unsafe { (*(tstate as *const ThreadStateHead)).interp } != interp {
            STATE.store(DISABLED, Ordering::Release);
            return;
        }
        MODULE.store(found.module, Ordering::Relaxed);
        OFFSET.store(index * 8, Ordering::Relaxed);
        if STATE.compare_exchange(UNPROBED, READY, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            adopt_slot(tstate);
        }
    }

    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    fn probe(_tstate: *mut ffi::PyThreadState) {
        STATE.store(DISABLED, Ordering::Release);
    }
}

/// Where an interpreter came from: CPython's `_PyInterpreterState_WHENCE_*`
/// codes (`Include/internal/pycore_interp.h`, 3.13+), as returned by
/// `_PyInterpreterState_GetWhence` and `_interpreters.whence()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Whence {
    /// CPython does not know (`WHENCE_UNKNOWN`).
    Unknown = 0,
    /// The main interpreter, made by the runtime's initialization (`WHENCE_RUNTIME`).
    Runtime = 1,
    /// `Py_NewInterpreter()` (`WHENCE_LEGACY_CAPI`).
    LegacyCapi = 2,
    /// `Py_NewInterpreterFromConfig()` (`WHENCE_CAPI`).
    Capi = 3,
    /// The cross-interpreter C API, `_PyXI_NewInterpreter()` (`WHENCE_XI`).
    Xi = 4,
    /// The stdlib module `_interpreters`, behind `concurrent.interpreters`
    /// and `InterpreterPoolExecutor` on 3.14 (`WHENCE_STDLIB`).
    Stdlib = 5,
}

impl Whence {
    const ALL: [Whence; 6] =
        [Whence::Unknown, Whence::Runtime, Whence::LegacyCapi, Whence::Capi, Whence::Xi, Whence::Stdlib];

    /// CPython's code, or `None` for a value this version does not know.
    pub fn from_code(code: std::ffi::c_long) -> Option<Whence> {
        Whence::ALL.into_iter().find(|w| *w as std::ffi::c_long == code)
    }

    /// A stable machine name (used in interheap's JSON).
    pub fn name(self) -> &'static str {
        match self {
            Whence::Unknown => "unknown",
            Whence::Runtime => "runtime",
            Whence::LegacyCapi => "legacy_capi",
            Whence::Capi => "capi",
            Whence::Xi => "xi",
            Whence::Stdlib => "stdlib",
        }
    }
}

/// What the hooks learn about an interpreter while it lives, kept with its
/// figures in the engine's ledger (packed into an
/// [`interheap_engine::InterpreterInfo`]) so that it outlives the interpreter.
///
/// Sources, all read from inside an allocator hook on the interpreter's own
/// thread, through functions that only read fields (no lock, no allocation,
/// no Python code), resolved with `dlsym` so that a missing one gives `None`:
///
/// * `whence`: `_PyInterpreterState_GetWhence` (exported by 3.13 and 3.14;
///   3.12 has no such field, so `None` there). The main interpreter (ID 0)
///   is always the runtime's, on every version.
/// * `own_gil`, `own_obmalloc`: `caller::features` (the adapters' own-GIL
///   detection): `_PyInterpreterConfig_InitFromState` on 3.13+ (copies the
///   feature flags and `ceval.own_gil`); on 3.12 only the obmalloc flag,
///   through `_PyInterpreterState_HasFeature`, and the GIL is `None`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    /// Where the interpreter came from (`None`: this CPython cannot tell).
    pub whence: Option<Whence>,
    /// Whether it has its own GIL (`None`: unknown).
    pub own_gil: Option<bool>,
    /// Whether it has its own object-allocator (obmalloc) state (`None`: unknown).
    pub own_obmalloc: Option<bool>,
}

fn pack_flag(flag: Option<bool>) -> u16 {
    match flag {
        None => 0,
        Some(false) => 1,
        Some(true) => 2,
    }
}

fn unpack_flag(bits: u16) -> Option<bool> {
    match bits & 3 {
        1 => Some(false),
        2 => Some(true),
        _ => None,
    }
}

impl Origin {
    /// Bits 0-2: whence + 1 (0: none); bits 3-4: own GIL; bits 5-6: own
    /// obmalloc (0: unknown, 1: no, 2: yes); bit 7: described at all.
    pub fn pack(self) -> interheap_engine::InterpreterInfo {
        let whence = self.whence.map_or(0, |w| w as u16 + 1);
        whence | pack_flag(self.own_gil) << 3 | pack_flag(self.own_obmalloc) << 5 | 1 << 7
    }

    /// The inverse of [`Origin::pack`]; `None` if nothing was recorded (0).
    pub fn unpack(info: interheap_engine::InterpreterInfo) -> Option<Origin> {
        if info & 1 << 7 == 0 {
            return None;
        }
        Some(Origin {
            whence: (info & 7).checked_sub(1).and_then(|c| Whence::from_code(std::ffi::c_long::from(c))),
            own_gil: unpack_flag(info >> 3),
            own_obmalloc: unpack_flag(info >> 5),
        })
    }
}

type GetWhence = unsafe extern "C" fn(*mut ffi::PyInterpreterState) -> std::ffi::c_long;

fn get_whence_fn() -> Option<GetWhence> {
    static F: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    // dlsym, as for the adapters' symbols; NULL (3.12) when missing.
    let addr = *F.get_or_init(|| crate::adapters::caller::lookup(c"_PyInterpreterState_GetWhence") as usize);
    // SAFETY: a non-zero address is CPython's exported
    // `long _PyInterpreterState_GetWhence(PyInterpreterState *)`.
    (addr != 0).then(|| unsafe { std::mem::transmute::<usize, GetWhence>(addr) })
}

/// Whether CPython records where an interpreter came from (3.13+; not 3.12).
pub fn records_whence() -> bool {
    get_whence_fn().is_some()
}

/// Whether CPython records `interp` as made through the C API: an
/// interpreter that `concurrent.interpreters` is still creating (see
/// [`describe_current`]), or one made with `Py_NewInterpreterFromConfig`.
/// False where CPython records nothing (3.12). Only reads a field; call
/// [`prepare_describe`] first so that no allocator path resolves the symbol.
///
/// # Safety
///
/// `interp` is a live interpreter (for example the caller's current one).
pub unsafe fn whence_is_capi(interp: *mut ffi::PyInterpreterState) -> bool {
    // SAFETY: `interp` is live (the contract); the function only returns a
    // field (Python/pystate.c, 3.13 and 3.14).
    get_whence_fn().is_some_and(|f| Whence::from_code(unsafe { f(interp) }) == Some(Whence::Capi))
}

/// Resolves the symbols [`describe_current`] uses, so that no hook does
/// (`dlsym` may allocate with the C allocator). Called by `hooks::install`.
pub fn prepare_describe() {
    let _ = get_whence_fn();
    crate::adapters::caller::prepare();
}

/// The hooks' [`interheap_engine::Describer`]: describes the calling thread's
/// interpreter if `bucket` is its bucket. Called from the ledger's cold path
/// only (a bucket's first use, and later uses while the answer is
/// provisional), never per allocation once settled.
///
/// Why "provisional": CPython sets an interpreter's whence to `CAPI` when it
/// creates it, and `_PyXI_NewInterpreter` (behind `_interpreters.create()`,
/// `concurrent.interpreters.create()`) changes it to `STDLIB` or `XI` only
/// after creation, which itself allocates a lot in the new interpreter
/// (Python/crossinterp.c, Python/pylifecycle.c in 3.14). So `CAPI` is
/// provisional: the interpreter is asked again at its next cold-path use,
/// and the first use after creation (its first `exec`, or its finalization)
/// settles it. An interpreter that really comes from
/// `Py_NewInterpreterFromConfig` keeps `CAPI`, settled after
/// `interheap_engine::ledger::PROVISIONAL_LIMIT` asks. The GIL and obmalloc
/// settings: 3.13 and 3.14 load them before the new interpreter's first
/// thread state is current; 3.12 allocates through that thread state first,
/// so an interpreter whose settings are not loaded yet is provisional too
/// (see `caller::features_and_settings`).
pub fn describe_current(bucket: interheap_engine::BucketId) -> interheap_engine::Description {
    use interheap_engine::{BucketId, Description};
    let Some((id, interp)) = current_interpreter() else { return Description::NotCurrent };
    if BucketId::for_interpreter(Some(id)) != bucket {
        return Description::NotCurrent;
    }
    // Its state's address, to see it freed when the interpreter ends.
    crate::interp_end::register(id, interp as usize);
    // SAFETY: `interp` is the calling thread's live interpreter.
    let (origin, settled) = unsafe { describe_interpreter(id, interp) };
    if settled {
        Description::Final(origin)
    } else {
        Description::Provisional(origin)
    }
}

/// What is known of interpreter `id` at `interp` (packed), and whether it
/// is final (see [`describe_current`]). Only reads fields; call
/// [`prepare_describe`] first.
///
/// # Safety
///
/// `interp` is live while the call runs (it may be another thread's
/// interpreter); for `id` 0 it may be null.
pub unsafe fn describe_interpreter(
    id: i64,
    interp: *mut ffi::PyInterpreterState,
) -> (interheap_engine::InterpreterInfo, bool) {
    let whence = if id == 0 {
        Some(Whence::Runtime)
    } else {
        // SAFETY: `interp` is live (the contract); the function only returns
        // a field (Python/pystate.c, 3.13 and 3.14).
        get_whence_fn().and_then(|f| Whence::from_code(unsafe { f(interp) }))
    };
    let (own_gil, own_obmalloc, loaded) = if id == 0 {
        (Some(true), Some(true), true)
    } else {
        crate::adapters::caller::features_and_settings(interp)
    };
    let origin = Origin { whence, own_gil, own_obmalloc }.pack();
    (origin, whence != Some(Whence::Capi) && loaded)
}

#[cfg(test)]
mod origin_tests {
    use super::*;

    #[test]
    fn origin_round_trips() {
        assert_eq!(Origin::unpack(0), None);
        for whence in [None, Some(Whence::Unknown), Some(Whence::Runtime), Some(Whence::Stdlib)] {
            for own_gil in [None, Some(false), Some(true)] {
                for own_obmalloc in [None, Some(false), Some(true)] {
                    let o = Origin { whence, own_gil, own_obmalloc };
                    assert_eq!(Origin::unpack(o.pack()), Some(o));
                }
            }
        }
        assert_eq!(Whence::from_code(5), Some(Whence::Stdlib));
        assert_eq!(Whence::from_code(6), None);
    }
}
