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

use interheap_engine::Nursery;

use crate::hooks::TRACKER;

struct HookThread {
    in_hook: Cell<bool>,
    nursery: Cell<Option<&'static Nursery>>,
    /// Set when the thread's exit-time destructor has run.
    ended: Cell<bool>,
    /// Bytes this thread may still allocate before the next sampled one
    /// (`crate::sites`), and the state of its random gaps (0: not seeded yet).
    until_sample: Cell<i64>,
    sample_rng: Cell<u64>,
}

thread_local! {
    static HOOK_THREAD: HookThread = const {
        HookThread {
            in_hook: Cell::new(false),
            nursery: Cell::new(None),
            ended: Cell::new(false),
            until_sample: Cell::new(0),
            sample_rng: Cell::new(0),
        }
    };
    static RETIRE_AT_EXIT: RetireAtExit = const { RetireAtExit };
}

struct RetireAtExit;

impl Drop for RetireAtExit {
    fn drop(&mut self) {
        HOOK_THREAD.with(|t| {
            t.ended.set(true);
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
    thread: *const HookThread,
}

impl HookEntry {
    /// Sets the flag and returns a guard, or `None` if this thread is
    /// already inside a hook.
    #[inline(always)]
    pub fn enter() -> Option<HookEntry> {
        let thread = HOOK_THREAD.with(|t| t as *const HookThread);
        // SAFETY: `thread` points to this thread's own thread-local, which has
        // no destructor and lives as long as the thread; only this thread
        // accesses it.
        let state = unsafe { &*thread };
        if state.in_hook.get() {
            return None;
        }
        state.in_hook.set(true);
        Some(HookEntry { thread })
    }

    #[inline(always)]
    fn state(&self) -> &HookThread {
        // SAFETY: see `enter`; the guard is !Send, so this is the owning thread.
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

    /// This thread's nursery if it already has one (frees never adopt one).
    #[inline(always)]
    pub fn existing_nursery(&self) -> Option<&'static Nursery> {
        self.state().nursery.get()
    }
}

impl Drop for HookEntry {
    #[inline(always)]
    fn drop(&mut self) {
        self.state().in_hook.set(false);
    }
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
