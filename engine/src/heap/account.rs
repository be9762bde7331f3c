//! [`Account`]: heaps whose live bytes one [`Budget`] limits (one
//! interpreter's mem, object and raw heaps), and the admission check that the
//! heaps' slow paths make against it.
//!
//! The rule itself (limit, reserve, refusal figures) is `crate::limits`,
//! shared with the hooks; this module only says what the heaps hold now.
//!
//! # Where the check is, and how exact it is
//!
//! Only the slow paths ask: starting or moving to another page of a size
//! class, a large or huge block, growing a block in place. The fast path
//! (a free block of the current page) is unchanged, so an interpreter can go
//! over its limit by what the current pages of the classes it uses still
//! hold free: at most one page per size class in use (16 KiB for most
//! classes). Once over, every slow path refuses until it is back under.
//!
//! # Concurrency
//!
//! Every member heap has the same owner (the interpreter's GIL), and only
//! the owner's slow path asks, so the members' owner-side figures are read
//! by their owner. Remote frees are read from their atomics. Members are
//! added once, before the heaps are used.

use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};

use super::heap::Heap;
use crate::limits::{Admission, Budget};

/// Most heaps one account holds (an interpreter's mem, object and raw heaps).
pub const MAX_MEMBERS: usize = 3;

/// Called on a slow path's admission while the budget was never configured,
/// by the heaps' owner: the creator may configure it then (the allocator
/// glue applies a default limit once the interpreter is created).
pub type OnUnconfigured = fn(&Account);

/// Heaps whose live bytes one budget limits. See the module docs.
pub struct Account {
    budget: Budget,
    members: [AtomicPtr<Heap>; MAX_MEMBERS],
    /// The creator's name for what the account stands for (an interpreter ID).
    tag: i64,
    on_unconfigured: Option<OnUnconfigured>,
}

impl Default for Account {
    fn default() -> Self {
        Self::new()
    }
}

impl Account {
    /// An account with no member and no limit.
    pub const fn new() -> Self {
        Self::with_hook(0, None)
    }

    /// An account tagged `tag` that calls `on_unconfigured` (see [`OnUnconfigured`]).
    pub const fn with_hook(tag: i64, on_unconfigured: Option<OnUnconfigured>) -> Self {
        Account {
            budget: Budget::new(),
            members: [const { AtomicPtr::new(ptr::null_mut()) }; MAX_MEMBERS],
            tag,
            on_unconfigured,
        }
    }

    /// The tag given at creation.
    pub fn tag(&self) -> i64 {
        self.tag
    }

    /// The budget: set or read the limit and what it refused here.
    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// Adds `heap` to the heaps whose live bytes count. Call it before the
    /// heap allocates; every member must have the same owner.
    ///
    /// # Panics
    ///
    /// If the account has [`MAX_MEMBERS`] already.
    pub fn add_member(&self, heap: &'static Heap) {
        let slot = self
            .members
            .iter()
            .find(|m| m.load(Ordering::Acquire).is_null())
            .expect("an account holds at most MAX_MEMBERS heaps");
        slot.store(heap as *const Heap as *mut Heap, Ordering::Release);
    }

    /// The members' live bytes now, as their owner counts them.
    ///
    /// # Safety
    ///
    /// The caller owns every member heap.
    pub unsafe fn owner_live_bytes(&self) -> u64 {
        let mut live: i64 = 0;
        for member in &self.members {
            // SAFETY: members are leaked heaps (never freed).
            if let Some(heap) = unsafe { member.load(Ordering::Acquire).as_ref() } {
                // SAFETY: the caller owns every member (the contract).
                live = live.wrapping_add(unsafe { heap.owner_live_bytes() });
            }
        }
        live.max(0) as u64
    }

    /// Asks for `size` more bytes: false if the budget refuses (it counts the refusal).
    ///
    /// # Safety
    ///
    /// The caller owns every member heap, and counts the block in a member's
    /// live bytes before it asks again.
    pub unsafe fn admit(&self, size: usize) -> bool {
        if !self.budget.configured() {
            if let Some(hook) = self.on_unconfigured {
                hook(self);
            }
        }
        // SAFETY: per the contract.
        match self.budget.admit(size as u64, || unsafe { self.owner_live_bytes() }) {
            Admission::Unlimited => true,
            Admission::Admitted => {
                // The owner counts the block before anyone of this account
                // asks again (one owner), so nothing stays in flight.
                self.budget.settle(size as u64);
                true
            }
            Admission::Refused => false,
        }
    }
}
