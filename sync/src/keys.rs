//! Per-thread keys that must never outlive the memory they name.
//!
//! The glue's allocator keeps, per thread, a cache of the interpreter it
//! last allocated in, keyed by the address of the thread state it allocated
//! under (one load away on the fast path). An address can come back as
//! another interpreter's thread state once the first is freed, so a key
//! must be cleared before the memory it names is freed: whoever frees a
//! block that may hold a key clears every key inside it
//! ([`KeyRegistry::forget_keys_in`]), and the fast path then compares one
//! word and nothing else ([`KeySlot::matches`]).
//!
//! # Concurrency invariants
//!
//! * A slot's key is written only by its own thread ([`KeySlot::key`],
//!   [`KeySlot::unkey`]), and only with an address that cannot be freed
//!   meanwhile (the thread's current thread state). Any thread may clear it,
//!   and only with a compare-exchange from the value it read, so a clear
//!   never undoes a newer key (that would be harmless, a slow path, but
//!   it is not needed).
//! * The owner's store of a key happens before a clearer's exchange (the
//!   key's thread state stopped being current, then was freed: CPython
//!   orders those), and the exchange happens before the owner can see the
//!   address again (the free, the reuse and making the new thread state
//!   current are ordered by the allocator and CPython). So the owner's load
//!   returns the cleared value or a later key of its own, by the coherence
//!   of that one word: no ordering on it adds anything, and the loads and
//!   stores are `Relaxed`. Dropping the clear is the only way to break it.
//! * Slots are listed in the registry under its lock, and a thread delists
//!   its slot, under the same lock, before the slot's memory goes away (a
//!   thread-local's destructor). A clearer walks the list under the lock, so
//!   it never writes a slot whose memory is reused.
//!
//! The model tests (`models.rs`) check both halves: a freed key never
//! matches its reused address, and a clear racing a thread's exit never
//! writes the dead slot.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::memory::{Atomic, Memory, Std};
use crate::spin_lock::SpinLock;

/// What a slot holds for "no key": never an address of anything that can be
/// freed (address 1, below any allocation), and not 0 (a fast path's "no
/// thread state"), so it matches nothing a caller compares with.
pub const NO_KEY: usize = 1;

/// One thread's key. See the module docs.
pub struct KeySlot<M: Memory = Std> {
    key: M::Usize,
}

impl KeySlot<Std> {
    /// An unkeyed slot (const: it can be a thread-local's initialiser).
    pub const fn new() -> Self {
        KeySlot { key: AtomicUsize::new(NO_KEY) }
    }
}

impl Default for KeySlot<Std> {
    fn default() -> Self {
        Self::new()
    }
}

impl<M: Memory> KeySlot<M> {
    /// An unkeyed slot over any [`Memory`] (a model's, for example).
    pub fn new_in() -> Self {
        KeySlot { key: Atomic::new(NO_KEY) }
    }

    /// Whether the slot is keyed by `current` (the fast path's test).
    #[inline(always)]
    pub fn matches(&self, current: usize) -> bool {
        self.key.load(Ordering::Relaxed) == current
    }

    /// Keys the slot by `key`. Only the slot's own thread calls it, with an
    /// address nobody can free while it runs, and only once the slot is
    /// listed ([`KeyRegistry::list`]), so that a free of that address finds
    /// the key.
    #[inline]
    pub fn key(&self, key: usize) {
        self.key.store(key, Ordering::Relaxed);
    }

    /// Unkeys the slot (its own thread, while what the key stands for changes).
    #[inline]
    pub fn unkey(&self) {
        self.key.store(NO_KEY, Ordering::Relaxed);
    }
}

/// Every listed slot, so that a free can clear the keys inside the block.
pub struct KeyRegistry<M: Memory = Std> {
    /// Addresses of listed [`KeySlot`]s.
    listed: SpinLock<Vec<usize>, M>,
}

impl KeyRegistry<Std> {
    /// An empty registry (const: it can be a `static`).
    pub const fn new() -> Self {
        KeyRegistry { listed: SpinLock::new(Vec::new()) }
    }
}

impl Default for KeyRegistry<Std> {
    fn default() -> Self {
        Self::new()
    }
}

impl<M: Memory> KeyRegistry<M> {
    /// An empty registry over any [`Memory`].
    pub fn new_in() -> Self {
        KeyRegistry { listed: SpinLock::new_in(Vec::new()) }
    }

    /// Lists `slot`, so that frees clear its keys. Allocates (the list grows).
    ///
    /// # Safety
    /// `slot` stays live until it is passed to [`delist`](Self::delist), and
    /// is listed once.
    pub unsafe fn list(&self, slot: &KeySlot<M>) {
        self.listed.lock().push(slot as *const KeySlot<M> as usize);
    }

    /// Delists `slot` and unkeys it: after this returns no clear touches it,
    /// and its memory may go.
    pub fn delist(&self, slot: &KeySlot<M>) {
        let me = slot as *const KeySlot<M> as usize;
        let mut listed = self.listed.lock();
        listed.retain(|&s| s != me);
        slot.unkey();
        drop(listed);
    }

    /// Clears every listed key in `[start, end)`: the memory there is about
    /// to be freed.
    #[cold]
    pub fn forget_keys_in(&self, start: usize, end: usize) {
        let listed = self.listed.lock();
        for &slot in listed.iter() {
            // SAFETY: a listed slot is live: its thread delists it (under
            // this lock) before its memory goes away.
            let key = unsafe { &(*(slot as *const KeySlot<M>)).key };
            let current = key.load(Ordering::Relaxed);
            if (start..end).contains(&current) {
                // Fails only if the owner re-keyed meanwhile, to a live address.
                let _ = key.compare_exchange(current, NO_KEY, Ordering::Relaxed, Ordering::Relaxed);
            }
        }
    }

    /// `fork()`'s prepare handler: takes the lock and keeps it across the
    /// fork, so the child does not inherit it held by a thread it lacks.
    pub fn lock_for_fork(&self) {
        std::mem::forget(self.listed.lock());
    }

    /// In a fork child, before [`unlock_after_fork`](Self::unlock_after_fork):
    /// only the forking thread exists, so every other slot (with the
    /// thread-locals that held it) is gone and leaves the list.
    ///
    /// # Safety
    /// This thread took the lock with [`lock_for_fork`](Self::lock_for_fork).
    pub unsafe fn keep_only_after_fork(&self, survivor: &KeySlot<M>) {
        let me = survivor as *const KeySlot<M> as usize;
        // SAFETY: the caller holds the lock (its guard was forgotten).
        unsafe { self.listed.get_unlocked() }.retain(|&s| s == me);
    }

    /// Releases the lock [`lock_for_fork`](Self::lock_for_fork) took.
    ///
    /// # Safety
    /// This thread took it with `lock_for_fork`, and holds no guard.
    pub unsafe fn unlock_after_fork(&self) {
        // SAFETY: as the caller promises.
        unsafe { self.listed.force_unlock() }
    }

    /// How many slots are listed.
    pub fn len(&self) -> usize {
        self.listed.lock().len()
    }

    /// Whether no slot is listed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_free_clears_the_keys_inside_it_and_no_others() {
        let registry = KeyRegistry::new();
        let (inside, at_end, other) = (KeySlot::new(), KeySlot::new(), KeySlot::new());
        for slot in [&inside, &at_end, &other] {
            // SAFETY: the slots outlive the registry's use of them (delisted below).
            unsafe { registry.list(slot) };
        }
        inside.key(0x1008);
        at_end.key(0x1040);
        other.key(0x5000);
        registry.forget_keys_in(0x1000, 0x1040);
        assert!(!inside.matches(0x1008), "a key inside the freed block survived");
        assert!(at_end.matches(0x1040) && other.matches(0x5000), "a key outside the block was cleared");
        assert!(inside.matches(NO_KEY));
        for slot in [&inside, &at_end, &other] {
            registry.delist(slot);
        }
        assert!(registry.is_empty());
    }

    #[test]
    fn a_delisted_slot_is_unkeyed_and_never_cleared_again() {
        let registry = KeyRegistry::new();
        let slot = KeySlot::new();
        // SAFETY: delisted below, before it goes.
        unsafe { registry.list(&slot) };
        slot.key(0x2000);
        registry.delist(&slot);
        assert!(slot.matches(NO_KEY) && registry.is_empty());
        // Its memory, reused, holds a word inside the next freed block.
        slot.key(0x2010);
        registry.forget_keys_in(0, usize::MAX);
        assert!(slot.matches(0x2010));
    }

    #[test]
    fn a_fork_child_keeps_only_its_own_slot() {
        let registry = KeyRegistry::new();
        let (mine, theirs) = (KeySlot::new(), KeySlot::new());
        // SAFETY: both outlive the test's use of the registry.
        unsafe {
            registry.list(&mine);
            registry.list(&theirs);
        }
        registry.lock_for_fork();
        // SAFETY: this thread took the lock just above.
        unsafe {
            registry.keep_only_after_fork(&mine);
            registry.unlock_after_fork();
        }
        assert_eq!(registry.len(), 1);
        theirs.key(0x3000);
        registry.forget_keys_in(0x3000, 0x3001);
        assert!(theirs.matches(0x3000), "a slot of a thread the child lacks is still listed");
        registry.delist(&mine);
    }
}
