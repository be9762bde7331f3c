//! A per-thread flag that marks "this thread is inside an interheap hook".
//!
//! While set, hooks forward without recording. That keeps a block counted
//! once, in the domain its caller used: when `PyObject_Malloc` (hooked) falls
//! through to `PyMem_RawMalloc` (also hooked) for a large block, the inner raw
//! call is part of the outer object allocation, not a second block.

use std::cell::Cell;

thread_local! {
    // `const` initialisation and a type without `Drop`: no lazy init and no
    // destructor registration, so this is usable at any point of a thread's
    // life, including its teardown (when C code may still free memory).
    static IN_HOOK: Cell<bool> = const { Cell::new(false) };
}

/// Proof that this thread entered a hook; clears the flag when dropped.
pub struct ReentryGuard(());

impl ReentryGuard {
    /// Sets the flag and returns a guard, or `None` if this thread is
    /// already inside a hook.
    #[inline]
    pub fn enter() -> Option<ReentryGuard> {
        IN_HOOK.with(|flag| {
            if flag.get() {
                None
            } else {
                flag.set(true);
                Some(ReentryGuard(()))
            }
        })
    }
}

impl Drop for ReentryGuard {
    #[inline]
    fn drop(&mut self) {
        IN_HOOK.with(|flag| flag.set(false));
    }
}

/// Sets or clears this thread's flag directly, for the `fork` handlers, which
/// must keep it set from the prepare handler until the parent or child handler.
pub(crate) fn set_in_hook(value: bool) {
    IN_HOOK.with(|flag| flag.set(value));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_entry_is_refused_until_dropped() {
        let outer = ReentryGuard::enter().expect("first entry");
        assert!(ReentryGuard::enter().is_none());
        drop(outer);
        assert!(ReentryGuard::enter().is_some());
    }

    #[test]
    fn flag_is_per_thread() {
        let _outer = ReentryGuard::enter().expect("first entry");
        std::thread::spawn(|| assert!(ReentryGuard::enter().is_some())).join().unwrap();
    }
}
