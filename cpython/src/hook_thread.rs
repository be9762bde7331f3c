//! What each thread keeps for the hooks: the re-entry flag and its nursery.
//!
//! Both live in one `const`-initialised thread-local without a destructor,
//! so a hook pays for a single thread-local lookup (in a shared library each
//! lookup is a call to `__tls_get_addr`), and the state stays usable at any
//! point of a thread's life, including its teardown, when C code may still
//! allocate and free.
//!
//! * The **re-entry flag** keeps a block counted once, in the domain its
//!   caller used: when `PyObject_Malloc` (hooked) falls through to
//!   `PyMem_RawMalloc` (also hooked) for a large block, the inner raw call is
//!   part of the outer object allocation, not a second block. It also keeps a
//!   hook from re-entering itself through anything it calls.
//! * The **nursery** is adopted on the thread's first tracked allocation. A
//!   separate zero-sized thread-local with a destructor, touched once at
//!   adoption, retires it when the thread ends; after that the thread uses
//!   the shared table only.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use interheap_engine::{BucketId, Nursery};

use crate::hooks::TRACKER;

struct HookThread {
    in_hook: Cell<bool>,
    nursery: Cell<Option<&'static Nursery>>,
    /// `nursery`, or [`EMPTY_NURSERY`] while there is none: what the fast
    /// paths use, so that they test no option.
    fast_nursery: Cell<&'static Nursery>,
    /// Set when the thread's exit-time destructor has run.
    ended: Cell<bool>,
    /// Bytes this thread may still allocate before the next sampled one
    /// (`crate::sites`), and the state of its random gaps (0: not seeded yet).
    until_sample: Cell<i64>,
    sample_rng: Cell<u64>,
    /// This thread's instance of libpython's current-thread-state variable
    /// (`crate::interp::fast_tstate`), or its `no_slot` until found: the
    /// interpreter lookup then costs two loads and no call.
    tstate_slot: Cell<*const *mut pyo3_ffi::PyThreadState>,
    /// The thread state this thread last made a checked call with (the
    /// checker's; 0: none yet).
    last_checked_tstate: Cell<usize>,
}

/// A null thread state read through [`HookThread::tstate_slot`] before the
/// slot is found (`fast_tstate::no_slot` is not const).
struct NullSlot(*mut pyo3_ffi::PyThreadState);
// SAFETY: never written; a null pointer read from any thread.
unsafe impl Sync for NullSlot {}
static NULL_SLOT: NullSlot = NullSlot(std::ptr::null_mut());

thread_local! {
    static HOOK_THREAD: HookThread = const {
        HookThread {
            in_hook: Cell::new(false),
            nursery: Cell::new(None),
            fast_nursery: Cell::new(&EMPTY_NURSERY),
            ended: Cell::new(false),
            until_sample: Cell::new(0),
            sample_rng: Cell::new(0),
            tstate_slot: Cell::new(&NULL_SLOT.0),
            last_checked_tstate: Cell::new(0),
        }
    };
    static RETIRE_AT_EXIT: RetireAtExit = const { RetireAtExit };
}

extern "C" {
    /// `thread_slot.c`: this thread's pointer in initial-exec TLS (one load,
    /// where a Rust thread-local in a shared library calls `__tls_get_addr`).
    #[cfg_attr(all(target_arch = "x86_64", target_os = "linux"), allow(dead_code))]
    fn interheap_thread_slot_get() -> *const std::ffi::c_void;
    fn interheap_thread_slot_set(thread: *const std::ffi::c_void);
}

/// This thread's value of `thread_slot.c`'s initial-exec variable: two
/// instructions (the variable's offset from the thread pointer, from the
/// GOT, then a load through `%fs`), inlined.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[inline(always)]
fn read_thread_slot() -> *const std::ffi::c_void {
    extern "C" {
        static interheap_thread_slot: *const std::ffi::c_void;
    }
    let value: *const std::ffi::c_void;
    // SAFETY: the initial-exec access sequence of the x86-64 TLS ABI for a
    // variable defined with that model in this object (thread_slot.c); it
    // reads this thread's instance, which exists for the thread's life.
    unsafe {
        std::arch::asm!(
            "mov {value}, qword ptr [rip + {slot}@GOTTPOFF]",
            "mov {value}, qword ptr fs:[{value}]",
            slot = sym interheap_thread_slot,
            value = out(reg) value,
            options(nostack, readonly, preserves_flags),
        );
    }
    value
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
#[inline(always)]
fn read_thread_slot() -> *const std::ffi::c_void {
    // SAFETY: reads this thread's own slot; no preconditions.
    unsafe { interheap_thread_slot_get() }
}

/// This thread's [`HookThread`], through the initial-exec slot once set.
#[inline(always)]
fn this_thread() -> *const HookThread {
    let thread = read_thread_slot();
    if thread.is_null() {
        return this_thread_first();
    }
    thread as *const HookThread
}

/// The thread's first hook call: remembers its state's address in the slot.
/// `HOOK_THREAD` has no destructor, so the address is good for the thread's life.
#[cold]
#[inline(never)]
fn this_thread_first() -> *const HookThread {
    let thread = HOOK_THREAD.with(|t| t as *const HookThread);
    // SAFETY: writes this thread's own slot; no preconditions.
    unsafe { interheap_thread_slot_set(thread as *const std::ffi::c_void) };
    thread
}

/// See `Nursery::empty`: matches no fast path, never written.
static EMPTY_NURSERY: Nursery = Nursery::empty();

struct RetireAtExit;

impl Drop for RetireAtExit {
    fn drop(&mut self) {
        HOOK_THREAD.with(|t| {
            t.ended.set(true);
            t.fast_nursery.set(&EMPTY_NURSERY);
            if let Some(nursery) = t.nursery.take() {
                TRACKER.retire_nursery(nursery);
            }
        });
    }
}

/// Proof that this thread entered a hook; clears the flag when dropped.
///
/// It keeps a pointer to this thread's state so that nothing else in the hook
/// needs another thread-local lookup. The raw pointer also makes the guard
/// `!Send`: it is dropped on the thread that created it, while that thread runs.
pub struct HookEntry {
    thread: InHook,
}

/// This thread's hook state, as seen from inside a hook: a copyable view of
/// a [`HookEntry`] (one register), so that out-of-line paths can take it by
/// value. The raw pointer makes it `!Send`: it is used on its own thread.
#[derive(Clone, Copy)]
pub struct InHook {
    thread: *const HookThread,
}

impl std::ops::Deref for HookEntry {
    type Target = InHook;

    #[inline(always)]
    fn deref(&self) -> &InHook {
        &self.thread
    }
}

impl HookEntry {
    /// Sets the flag and returns a guard, or `None` if this thread is
    /// already inside a hook.
    #[inline(always)]
    pub fn enter() -> Option<HookEntry> {
        let thread = this_thread();
        // SAFETY: `thread` points to this thread's own thread-local, which has
        // no destructor and lives as long as the thread; only this thread
        // accesses it.
        let state = unsafe { &*thread };
        if state.in_hook.get() {
            return None;
        }
        state.in_hook.set(true);
        Some(HookEntry { thread: InHook { thread } })
    }

    /// The view of this entry to pass by value.
    #[inline(always)]
    pub fn view(&self) -> InHook {
        self.thread
    }
}

impl InHook {
    #[inline(always)]
    fn state(&self) -> &HookThread {
        // SAFETY: see `HookEntry::enter`; the view is !Send, so this is the
        // owning thread, and the state lives as long as the thread.
        unsafe { &*self.thread }
    }

    /// This thread's nursery, adopting one on first use (`None` once the
    /// thread is ending).
    #[inline(always)]
    pub fn nursery(&self) -> Option<&'static Nursery> {
        match self.state().nursery.get() {
            Some(nursery) => Some(nursery),
            None => self.adopt(),
        }
    }

    #[cold]
    #[inline(never)]
    fn adopt(&self) -> Option<&'static Nursery> {
        let state = self.state();
        // Touching RETIRE_AT_EXIT registers its destructor; if it has already
        // run (or is running), the thread is ending: use the shared table.
        if state.ended.get() || RETIRE_AT_EXIT.try_with(|_| ()).is_err() {
            return None;
        }
        let nursery = TRACKER.adopt_nursery();
        state.nursery.set(Some(nursery));
        state.fast_nursery.set(nursery);
        Some(nursery)
    }

    /// Counts `size` allocated bytes down from this thread's gap to the next
    /// sample: true if this allocation is the one to sample (a new gap is
    /// drawn). Call only while sampling is on.
    #[inline(always)]
    pub fn sample_due(&self, size: usize) -> bool {
        let state = self.state();
        let left = state.until_sample.get().wrapping_sub(size as i64);
        if left > 0 {
            state.until_sample.set(left);
            return false;
        }
        self.next_gap()
    }

    /// The gap ran out or was never drawn: draws the next one (gaps are
    /// exponential, so what this allocation overshot need not carry over).
    /// True if this allocation is sampled (false only for a thread's first
    /// allocation, which seeds its gaps).
    #[cold]
    #[inline(never)]
    fn next_gap(&self) -> bool {
        let state = self.state();
        let mut rng = state.sample_rng.get();
        let first = rng == 0;
        if first {
            rng = seed_for(self.thread as usize);
        }
        let gap = crate::sites::SITES.next_gap(&mut rng);
        state.sample_rng.set(rng);
        state.until_sample.set(gap);
        !first
    }

    /// The ID of the interpreter whose thread state is current on this
    /// thread, or -1 without one: two loads and `PyInterpreterState_GetID`
    /// once the thread's slot is known, else the public API, which finds the
    /// slot when it can.
    #[inline(always)]
    pub fn interpreter_id(&self) -> i64 {
        // SAFETY: the cell holds this thread's libpython slot or NULL_SLOT,
        // both readable for the thread's life.
        let tstate = unsafe { *self.state().tstate_slot.get() };
        if tstate.is_null() {
            return self.interpreter_id_slow();
        }
        // SAFETY: `tstate` is this thread's current thread state (it cannot
        // be freed while current), whose head layout `fast_tstate` verified;
        // its interpreter outlives it, and for a non-null argument
        // PyInterpreterState_GetID only reads the ID.
        unsafe { pyo3_ffi::PyInterpreterState_GetID(crate::interp::thread_state_interpreter(tstate)) }
    }

    /// This thread's current thread state (null: none): one load once the
    /// thread's slot is known, else the public API.
    #[inline(always)]
    pub fn thread_state(&self) -> *mut pyo3_ffi::PyThreadState {
        // SAFETY: as in `interpreter_id`.
        let tstate = unsafe { *self.state().tstate_slot.get() };
        if !tstate.is_null() || !std::ptr::eq(self.state().tstate_slot.get(), &NULL_SLOT.0) {
            return tstate;
        }
        // SAFETY: only reads a thread-local; callable without a thread state.
        unsafe { pyo3_ffi::compat::PyThreadState_GetUnchecked() }
    }

    /// Remembers `tstate` as the one this thread last made a checked call
    /// with; true if it differs from the one before.
    #[inline(always)]
    pub fn note_checked_thread_state(&self, tstate: usize) -> bool {
        self.state().last_checked_tstate.replace(tstate) != tstate
    }

    /// What [`InHook::note_checked_thread_state`] last remembered (0: nothing).
    pub fn last_checked_thread_state(&self) -> usize {
        self.state().last_checked_tstate.get()
    }

    /// The bucket of [`InHook::interpreter_id`]'s interpreter
    /// (`NO_INTERPRETER` without one).
    #[inline(always)]
    pub fn bucket(&self) -> BucketId {
        bucket_of(self.interpreter_id())
    }

    /// No thread state in the slot: there is none, or the slot is not known
    /// yet (then the public API answers and the slot is looked for).
    #[cold]
    #[inline(never)]
    fn interpreter_id_slow(&self) -> i64 {
        let state = self.state();
        if !std::ptr::eq(state.tstate_slot.get(), &NULL_SLOT.0) {
            return -1;
        }
        let interp = crate::interp::fast_tstate::current_interpreter_slow();
        let slot = crate::interp::fast_tstate::slot();
        if !std::ptr::eq(slot, crate::interp::fast_tstate::no_slot()) {
            state.tstate_slot.set(slot);
        }
        if interp.is_null() {
            return -1;
        }
        // SAFETY: `interp` is the current thread state's interpreter, alive
        // while it is current; for a non-null argument the call only reads the ID.
        unsafe { pyo3_ffi::PyInterpreterState_GetID(interp) }
    }

    /// This thread's nursery, or one that no fast path matches (see
    /// `Nursery::empty`) while it has none.
    #[inline(always)]
    pub fn fast_nursery(&self) -> &'static Nursery {
        self.state().fast_nursery.get()
    }

    /// This thread's nursery if it already has one (frees never adopt one).
    #[inline(always)]
    pub fn existing_nursery(&self) -> Option<&'static Nursery> {
        self.state().nursery.get()
    }
}

impl Drop for HookEntry {
    #[inline(always)]
    fn drop(&mut self) {
        self.thread.state().in_hook.set(false);
    }
}

/// The bucket of the interpreter with ID `id` (negative: no interpreter,
/// as `PyInterpreterState_GetID` reports an error).
#[inline(always)]
pub(crate) fn bucket_of(id: i64) -> BucketId {
    BucketId::for_interpreter((id >= 0).then_some(id))
}

/// A fixed seed for every thread's sample gaps (tests), or 0 for seeds from
/// the clock and the thread.
static SAMPLE_SEED: AtomicU64 = AtomicU64::new(0);

/// See [`SAMPLE_SEED`]; threads seeded before keep their gaps.
pub(crate) fn set_sample_seed(seed: Option<u64>) {
    SAMPLE_SEED.store(seed.unwrap_or(0), Ordering::Relaxed);
}

/// A nonzero xorshift seed for the thread whose state is at `thread`.
fn seed_for(thread: usize) -> u64 {
    let fixed = SAMPLE_SEED.load(Ordering::Relaxed);
    let base = if fixed != 0 {
        fixed
    } else {
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        (now as u64) ^ (thread as u64).rotate_left(32)
    };
    // splitmix64 of the base, so that nearby seeds give unrelated gaps.
    let mut z = base.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) | 1
}

/// Sets or clears this thread's flag directly, for the `fork` handlers, which
/// must keep it set from the prepare handler until the parent or child handler.
pub(crate) fn set_in_hook(value: bool) {
    HOOK_THREAD.with(|t| t.in_hook.set(value));
}

/// This thread's nursery, if any, without entering a hook (for `fork`).
pub(crate) fn current_nursery() -> Option<&'static Nursery> {
    HOOK_THREAD.with(|t| t.nursery.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_entry_is_refused_until_dropped() {
        let outer = HookEntry::enter().expect("first entry");
        assert!(HookEntry::enter().is_none());
        drop(outer);
        assert!(HookEntry::enter().is_some());
    }

    #[test]
    fn flag_is_per_thread() {
        let _outer = HookEntry::enter().expect("first entry");
        std::thread::spawn(|| assert!(HookEntry::enter().is_some())).join().unwrap();
    }

    #[test]
    fn nursery_is_adopted_once_and_retired_at_thread_exit() {
        let first = std::thread::spawn(|| {
            let entry = HookEntry::enter().unwrap();
            let n = entry.nursery().unwrap();
            assert!(std::ptr::eq(n, entry.nursery().unwrap()));
            n as *const Nursery as usize
        })
        .join()
        .unwrap();
        // The first thread retired its nursery at exit, so the next adopts it.
        let second = std::thread::spawn(|| {
            let entry = HookEntry::enter().unwrap();
            entry.nursery().unwrap() as *const Nursery as usize
        })
        .join()
        .unwrap();
        assert_eq!(first, second);
    }
}
