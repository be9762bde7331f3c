//! [`Gate`]: what every adapter call passes through. It decides, per call,
//! whether the wrapped allocator may be called without a lock, and keeps the
//! adapter's figures (calls, lock acquisitions, contended acquisitions).
//!
//! The protocol (modes, the unlocked-to-locked switch and why it is
//! race-free, the `membarrier` asymmetric barrier) is
//! [`interheap_sync::gate`], written over an atomics facade so that its loom
//! model runs the same code; the adapters use it with `std`'s atomics and
//! their futex lock ([`RawLock`]). What is here is that instantiation and
//! the `fork()` handling of the lock.

use interheap_sync::gate::GateLock;
pub use interheap_sync::gate::{Acquired, Barrier, Caller, GateStats, Mode, NO_INTERPRETER};

use super::lock::RawLock;

/// See [`interheap_sync::gate`].
pub type Gate = interheap_sync::gate::Gate<RawLock>;

impl GateLock for RawLock {
    #[inline(always)]
    fn lock(&self) -> Acquired {
        RawLock::lock_or_nested(self)
    }
    #[inline(always)]
    fn unlock(&self) {
        RawLock::unlock(self)
    }
}

/// The `fork()` handling of a gate's lock.
pub(crate) trait GateFork {
    /// Takes the lock for a `fork()` (prepare handler), unless the gate never locks.
    fn lock_for_fork(&self);
    /// Releases what [`GateFork::lock_for_fork`] took (parent side).
    fn unlock_after_fork(&self);
    /// Frees the lock in a `fork()` child.
    ///
    /// # Safety
    /// The caller is the child's only thread.
    unsafe fn reset_in_fork_child(&self);
}

impl GateFork for Gate {
    fn lock_for_fork(&self) {
        if self.mode() != Mode::ThreadSafe {
            self.lock().lock_for_fork();
        }
    }

    fn unlock_after_fork(&self) {
        if self.mode() != Mode::ThreadSafe {
            self.lock().unlock_after_fork();
        }
    }

    unsafe fn reset_in_fork_child(&self) {
        // SAFETY: forwarded from the caller.
        unsafe { self.lock().reset_in_fork_child() };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::atomic::Ordering::Relaxed;
    use std::sync::{Arc, Barrier as StdBarrier, Mutex};

    #[test]
    fn unlocked_calls_take_no_lock() {
        let gate = Gate::new(Mode::Unlocked, Barrier::best(), RawLock::new());
        for _ in 0..10 {
            assert_eq!(gate.run(|| Caller::MainGil, || 7), 7);
        }
        assert_eq!(gate.mode(), Mode::Unlocked);
        assert_eq!(gate.stats(), GateStats { calls: 10, ..GateStats::default() });
    }

    #[test]
    fn another_gil_switches_for_good() {
        let gate = Gate::new(Mode::Unlocked, Barrier::best(), RawLock::new());
        gate.run(|| Caller::MainGil, || ());
        gate.run(|| Caller::Other(3), || ());
        assert_eq!(gate.mode(), Mode::Locked);
        gate.run(|| Caller::MainGil, || ());
        let s = gate.stats();
        assert_eq!((s.calls, s.lock_acquisitions, s.switched_by), (3, 2, Some(3)));
    }

    #[test]
    fn nested_unlocked_call_during_a_drain_does_not_wait() {
        let gate = Arc::new(Gate::new(Mode::Unlocked, Barrier::Fences, RawLock::new()));
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

    /// An allocator that calls back into its own domain inside a locked
    /// call (a wrapped allocator with a reentrancy guard of its own, say)
    /// passes through the gate again instead of waiting for itself, while
    /// other threads still wait for the outer call.
    #[test]
    fn a_call_nested_in_a_locked_call_does_not_wait_for_itself() {
        let gate = Arc::new(Gate::new(Mode::Locked, Barrier::Fences, RawLock::new()));
        let inside = Arc::new(AtomicUsize::new(0));
        let (in_tx, in_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let (g, ins) = (Arc::clone(&gate), Arc::clone(&inside));
        let outer = std::thread::spawn(move || {
            g.run(
                || Caller::Other(2),
                || {
                    ins.fetch_add(1, Relaxed);
                    let nested = g.run(|| Caller::Other(2), || ins.load(Relaxed));
                    in_tx.send(()).unwrap();
                    go_rx.recv().unwrap();
                    ins.fetch_sub(1, Relaxed);
                    nested
                },
            )
        });
        in_rx.recv().unwrap();
        let (g, ins) = (Arc::clone(&gate), Arc::clone(&inside));
        // Another thread's call waits for the outer one to return.
        let other = std::thread::spawn(move || g.run(|| Caller::Other(3), || ins.load(Relaxed)));
        std::thread::sleep(std::time::Duration::from_millis(50));
        go_tx.send(()).unwrap();
        assert_eq!(outer.join().unwrap(), 1, "the nested call ran inside the outer one");
        assert_eq!(other.join().unwrap(), 0, "the other thread ran after the outer call");
        let s = gate.stats();
        assert_eq!((s.calls, s.lock_acquisitions), (3, 2), "a nested call is a call, not an acquisition");
        assert!(!gate.lock().is_held());
    }

    #[test]
    fn no_thread_state_switches_and_is_recorded() {
        let gate = Gate::new(Mode::Unlocked, Barrier::Fences, RawLock::new());
        gate.run(|| Caller::Other(NO_INTERPRETER), || ());
        assert_eq!(gate.stats().switched_by, Some(NO_INTERPRETER));
    }

    #[test]
    fn thread_safe_and_locked_modes() {
        let safe = Gate::new(Mode::ThreadSafe, Barrier::Fences, RawLock::new());
        safe.run(|| unreachable!("thread-safe gates never ask"), || ());
        assert_eq!(safe.stats(), GateStats { calls: 1, ..GateStats::default() });
        let locked = Gate::new(Mode::Locked, Barrier::Fences, RawLock::new());
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
                gate: Gate::new(Mode::Unlocked, barrier, RawLock::new()),
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
