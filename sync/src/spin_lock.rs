//! A small spin lock for short critical sections.
//!
//! It guards the engine's block-table shards, heap transitions and pools,
//! and `interheap-pyalloc`'s counter registry. Critical sections are a few
//! dozen instructions and contention is rare, so the uncontended path is
//! what counts: one compare-and-swap to lock and a plain release store to
//! unlock (a general-purpose mutex must use a read-modify-write to unlock, to
//! learn whether a waiter is parked). Under contention a waiter spins briefly
//! with a CPU pause hint, then yields its time slice between attempts, so on
//! an oversubscribed machine a preempted holder gets the CPU back instead of
//! being starved by spinners.
//!
//! # Concurrency invariants
//!
//! `locked` is true while a thread holds the lock. Taking it is a successful
//! `Acquire` CAS from false; releasing is a `Release` store of false, so
//! everything a holder did happens before what the next holder does.

use std::cell::UnsafeCell;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::memory::{Atomic, Memory, Std};

/// Spins before the first yield; a holder's critical section is far shorter.
const SPINS_BEFORE_YIELD: u32 = 64;

/// A test-and-test-and-set lock around a `T`. See the module docs.
pub struct SpinLock<T, M: Memory = Std> {
    locked: M::Bool,
    value: UnsafeCell<T>,
}

// SAFETY: the lock hands out access to `value` to one thread at a time
// (Acquire on lock pairs with Release on unlock), so sharing the lock is
// sound whenever the value may be sent between threads.
unsafe impl<T: Send, M: Memory> Sync for SpinLock<T, M> where M::Bool: Sync {}
// SAFETY: moving the lock moves the value; nothing is tied to a thread.
unsafe impl<T: Send, M: Memory> Send for SpinLock<T, M> where M::Bool: Send {}

/// Access to the locked value; unlocks when dropped.
pub struct SpinGuard<'a, T, M: Memory = Std> {
    lock: &'a SpinLock<T, M>,
}

impl<T> SpinLock<T, Std> {
    /// An unlocked lock around `value` (const: it can be a `static`).
    pub const fn new(value: T) -> Self {
        SpinLock { locked: AtomicBool::new(false), value: UnsafeCell::new(value) }
    }
}

impl<T, M: Memory> SpinLock<T, M> {
    /// An unlocked lock around `value`, over any [`Memory`] (a model's, for example).
    pub fn new_in(value: T) -> Self {
        SpinLock { locked: Atomic::new(false), value: UnsafeCell::new(value) }
    }

    /// Locks, waiting as described in the module docs.
    #[inline]
    pub fn lock(&self) -> SpinGuard<'_, T, M> {
        if self.locked.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            self.lock_contended();
        }
        SpinGuard { lock: self }
    }

    /// Locks if the lock is free now; `None` (without waiting) if it is held.
    #[inline]
    pub fn try_lock(&self) -> Option<SpinGuard<'_, T, M>> {
        if self.locked.load(Ordering::Relaxed) {
            return None;
        }
        self.locked
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| SpinGuard { lock: self })
    }

    #[cold]
    fn lock_contended(&self) {
        let mut spins = 0u32;
        loop {
            // Wait on a plain load (no cache-line ping-pong), then retry.
            while self.locked.load(Ordering::Relaxed) {
                if spins < SPINS_BEFORE_YIELD {
                    spins += 1;
                    M::spin_hint();
                } else {
                    M::yield_now();
                }
            }
            if self.locked.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                return;
            }
        }
    }

    /// The value of a lock whose guard was forgotten (see `force_unlock`).
    ///
    /// # Safety
    ///
    /// The caller holds the lock (its guard forgotten) and no other reference to the value exists.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn get_unlocked(&self) -> &mut T {
        // SAFETY: exclusive access per the contract.
        unsafe { &mut *self.value.get() }
    }

    /// Releases a lock whose guard was forgotten (see `BlockTable::lock_all`).
    ///
    /// # Safety
    ///
    /// The lock must be held, and no guard for it may exist.
    pub unsafe fn force_unlock(&self) {
        self.locked.store(false, Ordering::Release);
    }
}

impl<T, M: Memory> Deref for SpinGuard<'_, T, M> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: the guard exists only while this thread holds the lock.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T, M: Memory> DerefMut for SpinGuard<'_, T, M> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard exists only while this thread holds the lock,
        // and `&mut self` makes this the only live reference through it.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T, M: Memory> Drop for SpinGuard<'_, T, M> {
    #[inline]
    fn drop(&mut self) {
        self.lock.locked.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_exactly_under_contention() {
        const THREADS: usize = crate::iterations(8, 4);
        const ROUNDS: usize = crate::iterations(20_000, 200);
        let lock = SpinLock::new(0u64);
        std::thread::scope(|s| {
            for _ in 0..THREADS {
                s.spawn(|| {
                    for _ in 0..ROUNDS {
                        *lock.lock() += 1;
                    }
                });
            }
        });
        assert_eq!(*lock.lock(), (THREADS * ROUNDS) as u64);
    }

    #[test]
    fn force_unlock_releases_a_forgotten_guard() {
        let lock = SpinLock::new(1);
        std::mem::forget(lock.lock());
        assert!(Atomic::load(&lock.locked, Ordering::Relaxed));
        // SAFETY: the lock is held and its guard was forgotten.
        unsafe { lock.force_unlock() };
        assert_eq!(*lock.lock(), 1);
    }
}
