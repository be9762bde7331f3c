//! [`Gate`]: what every adapter call passes through. It decides, per call,
//! whether the wrapped allocator may be called without a lock, and keeps the
//! adapter's figures (calls, lock acquisitions, contended acquisitions).
//!
//! Pure concurrency, no Python: the caller passes a closure that says whether
//! the calling thread runs under the *main GIL* (see `super::caller`), so the
//! whole protocol is tested here with plain threads standing in for GILs.
//!
//! # Modes
//!
//! * [`Mode::ThreadSafe`]: the allocator said it is thread-safe (option 3):
//!   every call is forwarded, no lock.
//! * [`Mode::Locked`]: every call holds the gate's [`RawLock`]. Where a
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

use std::sync::atomic::{
    compiler_fence, fence, AtomicI64, AtomicU32, AtomicU64, AtomicU8, Ordering::Acquire, Ordering::Relaxed,
    Ordering::Release, Ordering::SeqCst,
};
use std::sync::OnceLock;

use super::lock::{Acquired, RawLock};

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
    /// Compiler fence on the fast path, `membarrier` on the switching side.
    Membarrier,
    /// `SeqCst` fences on both sides.
    Fences,
}

impl Barrier {
    /// `Membarrier` if this process could register for it, else `Fences`.
    /// Registered once per process, on first use.
    pub fn best() -> Barrier {
        static BEST: OnceLock<Barrier> = OnceLock::new();
        *BEST.get_or_init(|| if membarrier::register() { Barrier::Membarrier } else { Barrier::Fences })
    }

    #[inline(always)]
    fn light(self) {
        match self {
            Barrier::Membarrier => compiler_fence(SeqCst),
            Barrier::Fences => fence(SeqCst),
        }
    }

    fn heavy(self) {
        fence(SeqCst);
        if self == Barrier::Membarrier && !membarrier::private_expedited() {
            // Cannot happen once registered; if it did, the fast path would
            // be unprotected, and no answer here would be right.
            std::process::abort();
        }
    }
}

mod membarrier {
    #[cfg(target_os = "linux")]
    const QUERY: libc::c_int = 0;
    #[cfg(target_os = "linux")]
    const PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
    #[cfg(target_os = "linux")]
    const REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;

    #[cfg(target_os = "linux")]
    fn call(cmd: libc::c_int) -> libc::c_long {
        // SAFETY: membarrier takes two integers (and an unused CPU id) and
        // touches no memory of ours; unknown commands fail with EINVAL.
        unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0 as libc::c_uint, 0 as libc::c_int) }
    }

    #[cfg(target_os = "linux")]
    pub fn register() -> bool {
        if std::env::var_os("INTERHEAP_NO_MEMBARRIER").is_some() {
            return false;
        }
        let supported = call(QUERY);
        supported >= 0
            && supported & libc::c_long::from(PRIVATE_EXPEDITED) != 0
            && call(REGISTER_PRIVATE_EXPEDITED) == 0
    }

    #[cfg(target_os = "linux")]
    pub fn private_expedited() -> bool {
        call(PRIVATE_EXPEDITED) == 0
    }

    #[cfg(not(target_os = "linux"))]
    pub fn register() -> bool {
        false
    }

    #[cfg(not(target_os = "linux"))]
    pub fn private_expedited() -> bool {
        false
    }
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
pub struct Gate {
    mode: AtomicU8,
    /// Depth of the unlocked call in flight (0: none). Written only by the
    /// main-GIL holder; more than 1 when the allocator calls back into its
    /// own domain.
    in_call: AtomicU32,
    barrier: Barrier,
    lock: RawLock,
    calls: AtomicU64,
    acquisitions: AtomicU64,
    contended: AtomicU64,
    switched_by: AtomicI64,
}

/// Adds one to a counter whose writers are serialised by the caller.
#[inline(always)]
fn bump(counter: &AtomicU64) {
    counter.store(counter.load(Relaxed).wrapping_add(1), Relaxed);
}

impl Gate {
    /// A gate starting in `mode` (`Draining` is not a valid start).
    pub fn new(mode: Mode, barrier: Barrier) -> Gate {
        assert_ne!(mode, Mode::Draining, "a gate cannot start draining");
        Gate {
            mode: AtomicU8::new(mode as u8),
            in_call: AtomicU32::new(0),
            barrier,
            lock: RawLock::new(),
            calls: AtomicU64::new(0),
            acquisitions: AtomicU64::new(0),
            contended: AtomicU64::new(0),
            switched_by: AtomicI64::new(NEVER),
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
                self.barrier.light();
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
        bump(&self.acquisitions);
        if acquired == Acquired::Contended {
            bump(&self.contended);
        }
        let result = call();
        if acquired != Acquired::ByForkingThread {
            self.lock.unlock();
        }
        result
    }

    /// Unlocked -> Locked. Runs with the lock held.
    #[cold]
    #[inline(never)]
    fn drain(&self, who: i64) {
        self.mode.store(Mode::Draining as u8, Relaxed);
        self.barrier.heavy();
        let mut rounds: u32 = 0;
        while self.in_call.load(Acquire) != 0 {
            // One allocator call of the main-GIL holder is in flight; it
            // never waits for us. Spin briefly, then give the CPU away.
            rounds += 1;
            if rounds < 100 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
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

    /// Takes the lock for a `fork()` (prepare handler), unless the gate never locks.
    pub(crate) fn lock_for_fork(&self) {
        if self.mode() != Mode::ThreadSafe {
            self.lock.lock_for_fork();
        }
    }

    /// Releases what [`Gate::lock_for_fork`] took (parent side).
    pub(crate) fn unlock_after_fork(&self) {
        if self.mode() != Mode::ThreadSafe {
            self.lock.unlock_after_fork();
        }
    }

    /// Frees the lock in a `fork()` child.
    ///
    /// # Safety
    /// The caller is the child's only thread.
    pub(crate) unsafe fn reset_in_fork_child(&self) {
        // SAFETY: forwarded from the caller.
        unsafe { self.lock.reset_in_fork_child() };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::{Arc, Barrier as StdBarrier, Mutex};

    #[test]
    fn unlocked_calls_take_no_lock() {
        let gate = Gate::new(Mode::Unlocked, Barrier::best());
        for _ in 0..10 {
            assert_eq!(gate.run(|| Caller::MainGil, || 7), 7);
        }
        assert_eq!(gate.mode(), Mode::Unlocked);
        assert_eq!(gate.stats(), GateStats { calls: 10, ..GateStats::default() });
    }

    #[test]
    fn another_gil_switches_for_good() {
        let gate = Gate::new(Mode::Unlocked, Barrier::best());
        gate.run(|| Caller::MainGil, || ());
        gate.run(|| Caller::Other(3), || ());
        assert_eq!(gate.mode(), Mode::Locked);
        gate.run(|| Caller::MainGil, || ());
        let s = gate.stats();
        assert_eq!((s.calls, s.lock_acquisitions, s.switched_by), (3, 2, Some(3)));
    }

    #[test]
    fn nested_unlocked_call_during_a_drain_does_not_wait() {
        let gate = Arc::new(Gate::new(Mode::Unlocked, Barrier::Fences));
        let (entered_tx, entered_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let g = Arc::clone(&gate);
        let main = std::thread::spawn(move || {
            g.run(
                || Caller::MainGil,
                || {
                    entered_tx.send(()).unwrap();
                    go_rx.recv().unwrap();
                    // The switch has begun; the allocator calls back into its domain.
                    while g.mode() != Mode::Draining {
                        std::thread::yield_now();
                    }
                    g.run(|| Caller::MainGil, || ())
                },
            )
        });
        entered_rx.recv().unwrap();
        let g = Arc::clone(&gate);
        let other = std::thread::spawn(move || g.run(|| Caller::Other(1), || ()));
        go_tx.send(()).unwrap();
        main.join().unwrap();
        other.join().unwrap();
        assert_eq!(gate.mode(), Mode::Locked);
        assert_eq!(gate.stats().calls, 3);
    }

    #[test]
    fn no_thread_state_switches_and_is_recorded() {
        let gate = Gate::new(Mode::Unlocked, Barrier::Fences);
        gate.run(|| Caller::Other(NO_INTERPRETER), || ());
        assert_eq!(gate.stats().switched_by, Some(NO_INTERPRETER));
    }

    #[test]
    fn thread_safe_and_locked_modes() {
        let safe = Gate::new(Mode::ThreadSafe, Barrier::Fences);
        safe.run(|| unreachable!("thread-safe gates never ask"), || ());
        assert_eq!(safe.stats(), GateStats { calls: 1, ..GateStats::default() });
        let locked = Gate::new(Mode::Locked, Barrier::Fences);
        locked.run(|| unreachable!("locked gates never ask"), || ());
        let s = locked.stats();
        assert_eq!((s.calls, s.lock_acquisitions, s.switched_by), (1, 1, None));
    }

    /// The switch under stress, without Python: "main" threads hold a mutex
    /// standing in for the main GIL and call as `MainGil`; "own-GIL" threads
    /// start while they run and call as `Other`. An overlap detector inside
    /// the "allocator" counts any two calls inside at once; a non-atomic
    /// counter shows lost updates. Many rounds, each with a fresh gate.
    fn switch_stress(barrier: Barrier) {
        const ROUNDS: usize = 300;
        const MAIN_THREADS: usize = 2;
        const OWN_GIL_THREADS: usize = 2;
        const CALLS: usize = 400;
        struct Shared {
            gate: Gate,
            main_gil: Mutex<()>,
            inside: AtomicUsize,
            overlaps: AtomicUsize,
            counter: AtomicUsize,
        }
        let mut total_overlaps = 0;
        for _ in 0..ROUNDS {
            let s = Arc::new(Shared {
                gate: Gate::new(Mode::Unlocked, barrier),
                main_gil: Mutex::new(()),
                inside: AtomicUsize::new(0),
                overlaps: AtomicUsize::new(0),
                counter: AtomicUsize::new(0),
            });
            let start = Arc::new(StdBarrier::new(MAIN_THREADS + OWN_GIL_THREADS));
            let allocator = |s: &Shared| {
                if s.inside.fetch_add(1, Relaxed) != 0 {
                    s.overlaps.fetch_add(1, Relaxed);
                }
                let v = s.counter.load(Relaxed);
                for _ in 0..20 {
                    std::hint::spin_loop();
                }
                s.counter.store(v + 1, Relaxed);
                s.inside.fetch_sub(1, Relaxed);
            };
            let mut threads = Vec::new();
            for t in 0..MAIN_THREADS + OWN_GIL_THREADS {
                let s = Arc::clone(&s);
                let start = Arc::clone(&start);
                threads.push(std::thread::spawn(move || {
                    start.wait();
                    let own_gil = t >= MAIN_THREADS;
                    for i in 0..CALLS {
                        if own_gil {
                            // Starts a little later, while the main threads run.
                            if i == 0 {
                                std::thread::yield_now();
                            }
                            s.gate.run(|| Caller::Other(t as i64), || allocator(&s));
                        } else {
                            let _gil = s.main_gil.lock().unwrap();
                            s.gate.run(|| Caller::MainGil, || allocator(&s));
                        }
                    }
                }));
            }
            for t in threads {
                t.join().unwrap();
            }
            total_overlaps += s.overlaps.load(Relaxed);
            assert_eq!(s.counter.load(Relaxed), (MAIN_THREADS + OWN_GIL_THREADS) * CALLS);
            assert_eq!(s.gate.mode(), Mode::Locked);
            assert_eq!(s.gate.stats().calls as usize, (MAIN_THREADS + OWN_GIL_THREADS) * CALLS);
        }
        assert_eq!(total_overlaps, 0);
    }

    #[test]
    fn switch_under_stress_with_membarrier() {
        // Falls back to fences where the kernel refuses membarrier.
        switch_stress(Barrier::best());
    }

    #[test]
    fn switch_under_stress_with_fences() {
        switch_stress(Barrier::Fences);
    }

    /// The control experiment: without the gate, the same workload overlaps,
    /// so the stress test above can see an overlap when there is one.
    #[test]
    fn detector_sees_overlaps_without_a_gate() {
        let inside = Arc::new(AtomicUsize::new(0));
        let overlaps = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (inside, overlaps) = (Arc::clone(&inside), Arc::clone(&overlaps));
                std::thread::spawn(move || {
                    for _ in 0..200_000 {
                        if inside.fetch_add(1, Relaxed) != 0 {
                            overlaps.fetch_add(1, Relaxed);
                        }
                        for _ in 0..20 {
                            std::hint::spin_loop();
                        }
                        inside.fetch_sub(1, Relaxed);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(overlaps.load(Relaxed) > 0);
    }
}
