//! [`RawLock`]: the adapters' mutex. Spins briefly, then parks the thread on
//! a futex; never spins without bound.
//!
//! The three-state futex mutex of Drepper's "Futexes Are Tricky" (0 free,
//! 1 held, 2 held with possible waiters), with a short bounded spin before
//! the first sleep. On two cores an unbounded spin would burn the holder's
//! CPU; a bounded spin costs at most [`SPIN_LIMIT`] `pause` instructions
//! before the waiter sleeps in the kernel until the holder wakes it.
//!
//! The lock allocates nothing and takes no other lock, so it can be taken
//! inside an allocator call. It records its holder, so that a gate's call
//! nested in the holder's own locked call (an allocator that calls back into
//! its own domain) passes instead of waiting for itself
//! ([`RawLock::lock_or_nested`]). It also knows about `fork()`: the adapters'
//! `atfork` prepare handler takes every lock on the forking thread and marks
//! that thread, so an allocation the forking thread makes before the fork
//! completes does not wait for itself ([`Acquired::ByForkingThread`]).

use std::cell::Cell;
use std::sync::atomic::{
    AtomicBool, AtomicU32, AtomicUsize, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};

/// Spins (each a `pause`) before a waiter sleeps.
pub const SPIN_LIMIT: u32 = 100;

const FREE: u32 = 0;
const HELD: u32 = 1;
const HELD_WAITERS: u32 = 2;

thread_local! {
    /// Set on the thread that runs the `atfork` prepare handler, from the
    /// moment it holds every adapter lock until the fork has completed.
    static FORKING: Cell<bool> = const { Cell::new(false) };
}

/// A futex-based mutex without data (the adapters protect foreign state).
pub struct RawLock {
    state: AtomicU32,
    /// Set while the `fork()` prepare handler holds this lock.
    held_for_fork: AtomicBool,
    /// The holder's `pthread_self()`, or 0. Written only by the holder, just
    /// after it takes the lock and just before it releases it: a thread that
    /// reads its own ID here therefore holds the lock.
    holder: AtomicUsize,
}

/// How [`RawLock::lock`] got the lock (shared with the gate's protocol).
pub use interheap_sync::gate::Acquired;

impl Default for RawLock {
    fn default() -> Self {
        Self::new()
    }
}

impl RawLock {
    /// A free lock.
    pub const fn new() -> Self {
        RawLock {
            state: AtomicU32::new(FREE),
            held_for_fork: AtomicBool::new(false),
            holder: AtomicUsize::new(0),
        }
    }

    /// Takes the lock, spinning briefly and then sleeping if it is held.
    #[inline]
    pub fn lock(&self) -> Acquired {
        self.take(false)
    }

    /// [`RawLock::lock`], except that a thread that holds the lock already
    /// gets [`Acquired::Nested`] (and must not unlock) instead of waiting for
    /// itself for ever. For the gates only: what they protect is a foreign
    /// allocator's state, which a nested call is that allocator's own
    /// business, not a second `&mut` to Rust data.
    #[inline]
    pub fn lock_or_nested(&self) -> Acquired {
        self.take(true)
    }

    #[inline(always)]
    fn take(&self, nested_passes: bool) -> Acquired {
        // The uncontended case first: a nested call finds the lock held.
        let how = if self.state.compare_exchange(FREE, HELD, Acquire, Relaxed).is_ok() {
            Acquired::Uncontended
        } else if nested_passes && self.holder.load(Relaxed) == this_thread() {
            return Acquired::Nested;
        } else {
            self.lock_contended()
        };
        if how != Acquired::ByForkingThread {
            self.holder.store(this_thread(), Relaxed);
        }
        how
    }

    #[cold]
    #[inline(never)]
    fn lock_contended(&self) -> Acquired {
        if self.held_for_fork.load(Relaxed) && FORKING.with(Cell::get) {
            return Acquired::ByForkingThread;
        }
        // Spin a little while the holder may be about to release it, but not
        // once someone sleeps (state 2): then the holder will wake a waiter.
        for _ in 0..SPIN_LIMIT {
            match self.state.load(Relaxed) {
                FREE if self.state.compare_exchange(FREE, HELD, Acquire, Relaxed).is_ok() => {
                    return Acquired::Contended;
                }
                HELD_WAITERS => break,
                _ => {}
            }
            std::hint::spin_loop();
        }
        // Announce a waiter (state 2) and sleep until the lock is free. A
        // thread that takes the lock this way leaves state 2, so its unlock
        // wakes the next sleeper (at worst one needless wake-up).
        while self.state.swap(HELD_WAITERS, Acquire) != FREE {
            futex_wait(&self.state, HELD_WAITERS);
        }
        Acquired::Contended
    }

    /// Releases the lock, waking one sleeper if there may be one.
    #[inline]
    pub fn unlock(&self) {
        self.holder.store(0, Relaxed);
        if self.state.swap(FREE, Release) == HELD_WAITERS {
            futex_wake_one(&self.state);
        }
    }

    /// Whether some thread holds the lock (a racy hint, for tests and figures).
    pub fn is_held(&self) -> bool {
        self.state.load(Relaxed) != FREE
    }

    /// Takes the lock in a `fork()` prepare handler: until
    /// [`RawLock::unlock_after_fork`] or [`RawLock::reset_in_fork_child`],
    /// the thread marked with [`set_forking`] passes it without waiting.
    pub fn lock_for_fork(&self) {
        self.lock();
        self.held_for_fork.store(true, Relaxed);
    }

    /// Releases what [`RawLock::lock_for_fork`] took (in the parent).
    pub fn unlock_after_fork(&self) {
        self.held_for_fork.store(false, Relaxed);
        self.unlock();
    }

    /// Frees the lock without waking anyone: for a `fork()` child, whose
    /// only thread is the one that took every lock before forking.
    ///
    /// # Safety
    /// No other thread may use the lock (the caller is a fork child's only
    /// thread, or the lock is otherwise unshared).
    pub unsafe fn reset_in_fork_child(&self) {
        self.held_for_fork.store(false, Relaxed);
        self.holder.store(0, Relaxed);
        self.state.store(FREE, Relaxed);
    }
}

/// The calling thread's ID for [`RawLock::holder`] (never 0).
#[inline(always)]
fn this_thread() -> usize {
    // SAFETY: pthread_self has no preconditions.
    unsafe { libc::pthread_self() as usize }
}

/// Marks (or unmarks) the calling thread as the one that holds every adapter
/// lock for a `fork()` (see [`Acquired::ByForkingThread`]).
pub fn set_forking(value: bool) {
    FORKING.with(|f| f.set(value));
}

#[cfg(target_os = "linux")]
fn futex_wait(word: &AtomicU32, expected: u32) {
    // SAFETY: FUTEX_WAIT_PRIVATE reads the aligned u32 behind `word` (valid for
    // the call) and sleeps only while it still equals `expected`; a spurious
    // or interrupted return is handled by the caller's loop.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expected,
            std::ptr::null::<libc::timespec>(),
        );
    }
}

#[cfg(target_os = "linux")]
fn futex_wake_one(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE_PRIVATE only uses the address of `word` as a key.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG, 1);
    }
}

// Elsewhere: no futex, so a waiter yields its CPU between checks instead of
// sleeping. Still no unbounded busy spin: each round gives the CPU away.
#[cfg(not(target_os = "linux"))]
fn futex_wait(word: &AtomicU32, expected: u32) {
    if word.load(Relaxed) == expected {
        std::thread::yield_now();
    }
}

#[cfg(not(target_os = "linux"))]
fn futex_wake_one(_word: &AtomicU32) {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    #[test]
    fn uncontended_then_contended() {
        let lock = RawLock::new();
        assert_eq!(lock.lock(), Acquired::Uncontended);
        assert!(lock.is_held());
        let lock = Arc::new(lock);
        let other = Arc::clone(&lock);
        let waiter = std::thread::spawn(move || {
            let how = other.lock();
            other.unlock();
            how
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        lock.unlock();
        assert_eq!(waiter.join().unwrap(), Acquired::Contended);
        assert!(!lock.is_held());
    }

    #[test]
    fn the_holder_nests_and_other_threads_still_wait() {
        let lock = Arc::new(RawLock::new());
        assert_eq!(lock.lock_or_nested(), Acquired::Uncontended);
        assert_eq!(lock.lock_or_nested(), Acquired::Nested);
        let other = Arc::clone(&lock);
        let waiter = std::thread::spawn(move || {
            let how = other.lock_or_nested();
            other.unlock();
            how
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!waiter.is_finished(), "another thread passed a held lock");
        lock.unlock();
        assert_eq!(waiter.join().unwrap(), Acquired::Contended);
        assert!(!lock.is_held());
        // Once released, the former holder takes it again like anyone.
        assert_eq!(lock.lock_or_nested(), Acquired::Uncontended);
        lock.unlock();
    }

    /// Mutual exclusion under heavy contention: more threads than cores, a
    /// non-atomic read-modify-write inside the lock, and an overlap detector.
    #[test]
    fn excludes_under_contention() {
        const THREADS: usize = 6;
        const ROUNDS: usize = 20_000;
        struct Shared {
            lock: RawLock,
            inside: AtomicUsize,
            overlaps: AtomicUsize,
            counter: AtomicUsize,
        }
        let shared = Arc::new(Shared {
            lock: RawLock::new(),
            inside: AtomicUsize::new(0),
            overlaps: AtomicUsize::new(0),
            counter: AtomicUsize::new(0),
        });
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                let s = Arc::clone(&shared);
                std::thread::spawn(move || {
                    for _ in 0..ROUNDS {
                        let how = s.lock.lock();
                        assert_ne!(how, Acquired::ByForkingThread);
                        if s.inside.fetch_add(1, Relaxed) != 0 {
                            s.overlaps.fetch_add(1, Relaxed);
                        }
                        // A load and a store, not an atomic add: lost
                        // updates would show if two threads were inside.
                        let v = s.counter.load(Relaxed);
                        std::hint::spin_loop();
                        s.counter.store(v + 1, Relaxed);
                        s.inside.fetch_sub(1, Relaxed);
                        s.lock.unlock();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(shared.overlaps.load(Relaxed), 0);
        assert_eq!(shared.counter.load(Relaxed), THREADS * ROUNDS);
        assert!(!shared.lock.is_held());
    }

    #[test]
    fn forking_thread_passes_its_own_locks() {
        let lock = RawLock::new();
        let other = RawLock::new();
        other.lock();
        lock.lock_for_fork();
        set_forking(true);
        assert_eq!(lock.lock(), Acquired::ByForkingThread);
        // A lock the prepare handler did not take is waited for as usual.
        let waiter = std::thread::scope(|s| {
            let h = s.spawn(|| {
                set_forking(true);
                other.lock()
            });
            std::thread::sleep(std::time::Duration::from_millis(20));
            other.unlock();
            h.join().unwrap()
        });
        assert_eq!(waiter, Acquired::Contended);
        other.unlock();
        set_forking(false);
        // SAFETY: the lock is local to this test.
        unsafe { lock.reset_in_fork_child() };
        assert_eq!(lock.lock(), Acquired::Uncontended);
        lock.unlock();
    }
}
