//! [`Gate`]: what every call of the glue's allocator adapters passes through. It decides, per call,
//! whether the wrapped allocator may be called without a lock, and keeps the
//! adapter's figures (calls, lock acquisitions, contended acquisitions).
//!
//! Pure concurrency, no Python: the caller passes a closure that says whether
//! the calling thread runs under the *main GIL* (the glue's
//! `adapters::caller`), so the whole protocol is tested with plain threads
//! standing in for GILs (the glue's `adapters::gate` tests, with its futex
//! lock) and model-checked here under loom.
//!
//! Written over [`Memory`] and a [`GateLock`]: the glue runs it with [`Std`]
//! and its futex lock; the loom model at the end of this module runs the
//! same code with `Loom` and a loom spin lock, and the asymmetric barrier
//! as two `SeqCst` fences (see [`Memory::heavy_fence`] for why that is a
//! sound model of `membarrier`).
//!
//! # Modes
//!
//! * [`Mode::ThreadSafe`]: the allocator said it is thread-safe (option 3):
//!   every call is forwarded, no lock.
//! * [`Mode::Locked`]: every call holds the gate's lock ([`GateLock`]). Where a
//!   gate starts: the raw domain (called without any GIL) and every domain
//!   of a free-threaded build.
//! * [`Mode::Unlocked`]: the mem and object domains of a default build start
//!   here. While only the main GIL exists, CPython serialises every call into
//!   those domains with it (PEP 445's contract, checked by CPython's debug
//!   hooks), so the allocator needs no lock. The first call that does not
//!   come from under the main GIL (an interpreter with its own GIL, or a
//!   call without a thread state) switches the gate to `Locked` for good.
//! * [`Mode::Draining`]: the switch in progress.
//!
//! # Why the switch is race-free
//!
//! The hazard: the main-GIL holder `M` is inside an unlocked call when a
//! thread `S` of an own-GIL interpreter makes its first call. `S` must not
//! enter the allocator until `M` has left it, and no call may enter
//! unlocked after that.
//!
//! `M`'s unlocked path: store `in_call = true`; *light barrier*; load `mode`;
//! if still `Unlocked`, call the allocator, then store `in_call = false`
//! (release); otherwise clear `in_call` and take the locked path. (`in_call`
//! is a depth, so that an allocator calling back into its own domain keeps
//! it set until the outer call returns; a nested call never waits.)
//!
//! `S`'s path (every call that is not unlocked): take the lock; if `mode` is
//! not yet `Locked`: store `mode = Draining`; *heavy barrier*; wait until
//! `in_call` is false (acquire); store `mode = Locked`; then call the
//! allocator under the lock.
//!
//! This is Dekker's pattern: each side stores its flag, then reads the
//! other's. The barriers guarantee that at least one side sees the other's
//! store: either `M` sees `Draining` and backs off into the lock (where it
//! waits for `S` to finish draining), or `S` sees `in_call == true` and waits
//! for `M`'s call to end; `M`'s release store then makes everything its call
//! wrote visible to `S`. Only one thread can be in an unlocked call at a
//! time (they all hold the main GIL), so one flag suffices, and the main GIL
//! orders one unlocked call's `in_call = false` before the next one's
//! `in_call = true`. Every thread that finds the mode not `Unlocked` goes
//! through the lock, and the lock holder completes the drain before it
//! calls, so no locked call overlaps an unlocked one either. `M` never
//! waits while inside an unlocked call, so the drain ends.
//!
//! The barriers are asymmetric when the kernel allows: on Linux the gate
//! registers `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`; the fast path
//! then needs only a compiler fence (the store and the load stay in program
//! order), and the switching side's `membarrier` makes every running thread
//! of the process execute a full memory barrier, which is what `M`'s missing
//! hardware fence would have provided. Where `membarrier` is unavailable
//! (other kernels, seccomp), both sides use a `SeqCst` fence, which the C++
//! memory model alone shows correct. The switch happens once per gate, so
//! the heavy barrier's cost (an IPI per CPU) does not matter.
//!
//! # Figures
//!
//! Counters are written by plain loads and stores where the protocol already
//! serialises their writers (unlocked calls: the main GIL; locked calls: the
//! lock), and by atomic adds where nothing does (thread-safe mode). Readers
//! may see a busy gate's counters one call behind.

use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};
use std::sync::OnceLock;

use crate::memory::{Atomic, AtomicInt, Memory, Std};

/// A gate's mode; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Calls run without a lock (only the main GIL exists).
    Unlocked = 0,
    /// Switching from `Unlocked` to `Locked`.
    Draining = 1,
    /// Every call holds the lock.
    Locked = 2,
    /// The allocator is thread-safe: no lock, ever.
    ThreadSafe = 3,
}

impl Mode {
    fn from_u8(v: u8) -> Mode {
        match v {
            0 => Mode::Unlocked,
            1 => Mode::Draining,
            2 => Mode::Locked,
            _ => Mode::ThreadSafe,
        }
    }

    /// The name used in figures ("unlocked", "draining", "locked", "thread-safe").
    pub fn name(self) -> &'static str {
        match self {
            Mode::Unlocked => "unlocked",
            Mode::Draining => "draining",
            Mode::Locked => "locked",
            Mode::ThreadSafe => "thread-safe",
        }
    }
}

/// Who is calling, as far as the unlocked mode cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A thread holding the main GIL (the main interpreter, or one sharing its GIL).
    MainGil,
    /// Anything else; the value is what the figures record as the switch's
    /// cause: an interpreter ID, or [`NO_INTERPRETER`].
    Other(i64),
}

/// [`Caller::Other`]'s value for a call made without a thread state.
pub const NO_INTERPRETER: i64 = -1;
const NEVER: i64 = i64::MIN;

/// How the two sides of the switch order their store and load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Barrier {
    /// [`Memory::light_fence`] on the fast path, [`Memory::heavy_fence`]
    /// (`membarrier`) on the switching side.
    Membarrier,
    /// `SeqCst` fences on both sides.
    Fences,
}

impl Barrier {
    /// `Membarrier` if this process could register for it, else `Fences`.
    /// Registered once per process, on first use.
    pub fn best() -> Barrier {
        static BEST: OnceLock<Barrier> = OnceLock::new();
        *BEST
            .get_or_init(|| if crate::membarrier::register() { Barrier::Membarrier } else { Barrier::Fences })
    }

    #[inline(always)]
    fn light<M: Memory>(self) {
        match self {
            Barrier::Membarrier => M::light_fence(),
            Barrier::Fences => M::fence(SeqCst),
        }
    }

    fn heavy<M: Memory>(self) {
        match self {
            Barrier::Membarrier => {
                if !M::heavy_fence() {
                    // Cannot happen once registered; if it did, the fast path
                    // would be unprotected, and no answer here would be right.
                    std::process::abort();
                }
            }
            Barrier::Fences => M::fence(SeqCst),
        }
    }
}

/// How [`GateLock::lock`] got the lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acquired {
    /// At the first attempt.
    Uncontended,
    /// After spinning or sleeping: another thread held it.
    Contended,
    /// Not at all: this thread is forking and already holds every adapter
    /// lock. The caller must not call [`GateLock::unlock`].
    ByForkingThread,
    /// Not at all: this thread already holds it, in the locked call this one
    /// is nested in (the allocator called back into its own domain). The
    /// caller must not call [`GateLock::unlock`].
    Nested,
}

/// The lock of a gate's locked calls: a mutex without data (the gate
/// protects foreign state).
pub trait GateLock {
    /// Takes the lock (`Acquire`), unless it says [`Acquired::ByForkingThread`]
    /// or [`Acquired::Nested`].
    fn lock(&self) -> Acquired;
    /// Releases it (`Release`).
    fn unlock(&self);
}

/// A gate's figures at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GateStats {
    /// Calls forwarded to the allocator.
    pub calls: u64,
    /// Calls that took the lock.
    pub lock_acquisitions: u64,
    /// Of those, the ones that found it held by another thread.
    pub contended_acquisitions: u64,
    /// What switched the gate to `Locked`: `Some(interpreter ID)`,
    /// `Some(NO_INTERPRETER)`, or `None` if it never switched.
    pub switched_by: Option<i64>,
}

/// See the module docs.
///
/// # Concurrency invariants
///
/// * `mode` leaves `Unlocked` only under `lock`, for `Draining` then
///   `Locked`, never back; `ThreadSafe` and `Locked` never change.
/// * `in_call` is written only by the main-GIL holder (the main GIL orders
///   its writers); it is non-zero exactly while an unlocked call runs.
/// * No call runs while a call in the unlocked path runs: the drain
///   (under the lock) waits for `in_call` to be 0 after its heavy barrier,
///   and an unlocked caller rechecks `mode` after its light barrier.
pub struct Gate<L, M: Memory = Std> {
    mode: M::U8,
    /// Depth of the unlocked call in flight (0: none). Written only by the
    /// main-GIL holder; more than 1 when the allocator calls back into its
    /// own domain.
    in_call: M::U32,
    barrier: Barrier,
    lock: L,
    calls: M::U64,
    acquisitions: M::U64,
    contended: M::U64,
    switched_by: M::I64,
}

/// Adds one to a counter whose writers are serialised by the caller.
#[inline(always)]
fn bump<C: Atomic<u64>>(counter: &C) {
    counter.store(counter.load(Relaxed).wrapping_add(1), Relaxed);
}

impl<L: GateLock, M: Memory> Gate<L, M> {
    /// A gate starting in `mode` (`Draining` is not a valid start), whose
    /// locked calls hold `lock`.
    pub fn new(mode: Mode, barrier: Barrier, lock: L) -> Self {
        assert_ne!(mode, Mode::Draining, "a gate cannot start draining");
        Gate {
            mode: Atomic::new(mode as u8),
            in_call: Atomic::new(0),
            barrier,
            lock,
            calls: Atomic::new(0),
            acquisitions: Atomic::new(0),
            contended: Atomic::new(0),
            switched_by: Atomic::new(NEVER),
        }
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        Mode::from_u8(self.mode.load(Acquire))
    }

    /// The barrier flavour this gate uses.
    pub fn barrier(&self) -> Barrier {
        self.barrier
    }

    /// The lock of the locked calls (for `fork` handlers).
    pub fn lock(&self) -> &L {
        &self.lock
    }

    /// Runs `call` (one allocator call) as the mode requires. `caller` is
    /// asked only in `Unlocked` mode.
    #[inline(always)]
    pub fn run<R>(&self, caller: impl FnOnce() -> Caller, call: impl FnOnce() -> R) -> R {
        let mode = self.mode.load(Acquire);
        if mode == Mode::ThreadSafe as u8 {
            self.calls.fetch_add(1, Relaxed);
            return call();
        }
        if mode == Mode::Locked as u8 {
            return self.run_locked(NEVER, call);
        }
        // Unlocked, or draining.
        match caller() {
            Caller::MainGil => {
                let depth = self.in_call.load(Relaxed);
                self.in_call.store(depth + 1, Relaxed);
                self.barrier.light::<M>();
                // A nested call (the allocator called back into its own
                // domain) runs inside the outer unlocked call, which a drain
                // is already waiting for: it must not wait itself.
                if depth > 0 || self.mode.load(Relaxed) == Mode::Unlocked as u8 {
                    bump(&self.calls);
                    let result = call();
                    self.in_call.store(depth, Release);
                    return result;
                }
                self.in_call.store(depth, Release);
                self.run_locked(NEVER, call)
            }
            Caller::Other(who) => self.run_locked(who, call),
        }
    }

    #[inline(never)]
    fn run_locked<R>(&self, who: i64, call: impl FnOnce() -> R) -> R {
        let acquired = self.lock.lock();
        if self.mode.load(Relaxed) != Mode::Locked as u8 {
            self.drain(who);
        }
        bump(&self.calls);
        if acquired != Acquired::Nested {
            bump(&self.acquisitions);
        }
        if acquired == Acquired::Contended {
            bump(&self.contended);
        }
        let result = call();
        if !matches!(acquired, Acquired::ByForkingThread | Acquired::Nested) {
            self.lock.unlock();
        }
        result
    }

    /// Unlocked -> Locked. Runs with the lock held.
    #[cold]
    #[inline(never)]
    fn drain(&self, who: i64) {
        self.mode.store(Mode::Draining as u8, Relaxed);
        self.barrier.heavy::<M>();
        let mut rounds: u32 = 0;
        while self.in_call.load(Acquire) != 0 {
            // One allocator call of the main-GIL holder is in flight; it
            // never waits for us. Spin briefly, then give the CPU away.
            rounds += 1;
            if rounds < 100 {
                M::spin_hint();
            } else {
                M::yield_now();
            }
        }
        self.switched_by.store(if who == NEVER { NO_INTERPRETER } else { who }, Relaxed);
        self.mode.store(Mode::Locked as u8, Release);
    }

    /// The figures now.
    pub fn stats(&self) -> GateStats {
        let switched = self.switched_by.load(Relaxed);
        GateStats {
            calls: self.calls.load(Relaxed),
            lock_acquisitions: self.acquisitions.load(Relaxed),
            contended_acquisitions: self.contended.load(Relaxed),
            switched_by: (switched != NEVER).then_some(switched),
        }
    }
}

// Loom explores the interleavings itself; its thread stacks need system
// calls Miri does not run, so the models are not built under Miri.
#[cfg(all(test, not(miri)))]
mod models {
    //! Loom models of the switch. Each names the mutations it catches;
    //! `scripts/mutants.py` applies them and checks that the model fails.
    //!
    //! The allocator is a counter in a loom cell, so loom reports any two
    //! calls not ordered by the gate (an unlocked call overlapping a locked
    //! one, or one whose writes the next call cannot see). The futex lock of
    //! the glue is replaced by a loom spin lock; `membarrier` by a `SeqCst`
    //! fence ([`Memory::heavy_fence`]).
    //!
    //! Not checkable here: the `Release` of `mode = Locked` (a call that
    //! reads `Locked` takes the lock, which orders it after the drain).

    use loom::cell::UnsafeCell;
    use loom::sync::atomic::AtomicBool;
    use loom::sync::Arc;
    use loom::thread;

    use super::*;
    use crate::memory::Loom;

    /// The model's stand-in for the glue's futex lock.
    struct ModelLock(AtomicBool);

    impl GateLock for ModelLock {
        fn lock(&self) -> Acquired {
            if self.0.compare_exchange(false, true, Acquire, Relaxed).is_ok() {
                return Acquired::Uncontended;
            }
            while self.0.compare_exchange(false, true, Acquire, Relaxed).is_err() {
                thread::yield_now();
            }
            Acquired::Contended
        }
        fn unlock(&self) {
            self.0.store(false, Release);
        }
    }

    struct Shared {
        gate: Gate<ModelLock, Loom>,
        /// The wrapped allocator's state: not thread-safe.
        heap: UnsafeCell<u32>,
    }

    // SAFETY: `heap` is only touched inside gate calls, which the gate
    // serialises (what the models check).
    unsafe impl Sync for Shared {}
    // SAFETY: as above.
    unsafe impl Send for Shared {}

    impl Shared {
        fn new(barrier: Barrier) -> Arc<Shared> {
            Arc::new(Shared {
                gate: Gate::new(Mode::Unlocked, barrier, ModelLock(AtomicBool::new(false))),
                heap: UnsafeCell::new(0),
            })
        }
        /// One allocator call.
        fn allocate(&self) {
            // SAFETY: loom checks that no two calls overlap.
            self.heap.with_mut(|h| unsafe { *h += 1 });
        }
        fn allocations(&self) -> u32 {
            // SAFETY: read after every thread was joined.
            self.heap.with(|h| unsafe { *h })
        }
    }

    /// The main-GIL holder makes two calls while a thread of another
    /// interpreter makes its first call, which switches the gate. No two
    /// calls overlap, and each sees the one before it.
    fn switch_during_unlocked_calls(barrier: Barrier) {
        crate::model(move || {
            let s = Shared::new(barrier);
            let other = {
                let s = s.clone();
                thread::spawn(move || s.gate.run(|| Caller::Other(7), || s.allocate()))
            };
            for _ in 0..2 {
                s.gate.run(|| Caller::MainGil, || s.allocate());
            }
            other.join().unwrap();
            assert_eq!(s.allocations(), 3);
            assert_eq!(s.gate.mode(), Mode::Locked);
            let stats = s.gate.stats();
            assert_eq!((stats.calls, stats.switched_by), (3, Some(7)));
        });
    }

    /// [`switch_during_unlocked_calls`] with the asymmetric barrier
    /// (`membarrier`, modelled as two `SeqCst` fences).
    ///
    /// Mutations caught: the unlocked path without its light barrier; the
    /// drain without its heavy barrier; the unlocked path not re-reading the
    /// mode after its barrier (it trusts the mode read before it stored
    /// `in_call`); the drain not waiting for `in_call` to be 0; a locked
    /// call that does not drain; the unlocked call's end (`in_call = depth`)
    /// `Release` -> `Relaxed`; the drain's load of `in_call` `Acquire` ->
    /// `Relaxed` (all: loom reports two calls not ordered).
    #[test]
    fn no_call_overlaps_an_unlocked_one_with_membarrier() {
        switch_during_unlocked_calls(Barrier::Membarrier);
    }

    /// [`switch_during_unlocked_calls`] with `SeqCst` fences on both sides.
    ///
    /// Mutations caught: the fast path's fence (of the `Fences` flavour)
    /// weakened to a compiler fence.
    #[test]
    fn no_call_overlaps_an_unlocked_one_with_fences() {
        switch_during_unlocked_calls(Barrier::Fences);
    }

    /// The allocator calls back into its own domain while the gate switches:
    /// the nested call runs inside the outer unlocked call, which the drain
    /// waits for, so it must not wait for the drain. (The other thread
    /// starts inside the outer call: a call that nests inside a *locked*
    /// call waits for its own thread's lock; the gate does not promise
    /// otherwise.)
    ///
    /// Mutations caught: a nested call not exempt from the mode check (it
    /// waits for the lock that the draining thread holds while that thread
    /// waits for it: loom exceeds its branch limit).
    #[test]
    fn a_nested_call_during_the_switch_does_not_wait() {
        crate::model(|| {
            let s = Shared::new(Barrier::Membarrier);
            let other = s.gate.run(
                || Caller::MainGil,
                || {
                    s.allocate();
                    let other = {
                        let s = s.clone();
                        thread::spawn(move || s.gate.run(|| Caller::Other(7), || s.allocate()))
                    };
                    s.gate.run(|| Caller::MainGil, || s.allocate());
                    other
                },
            );
            other.join().unwrap();
            assert_eq!(s.allocations(), 3);
            assert_eq!(s.gate.mode(), Mode::Locked);
        });
    }
}
