//! Figures of a heap, as read by [`Heap::snapshot`](super::Heap::snapshot).

use super::heap::HeapLabel;
use super::size_class::{HUGE_CLASS, LARGE_CLASS};

/// One size class's counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassSnapshot {
    /// Block size of the class (0 for the large and huge pseudo-classes).
    pub block_size: u64,
    pub allocations: u64,
    /// Frees by the heap's owner.
    pub frees: u64,
    /// Frees by anyone else (another thread, another interpreter, or anyone
    /// after the heap ended).
    pub remote_frees: u64,
}

impl ClassSnapshot {
    /// Blocks allocated and not freed.
    pub fn live_blocks(&self) -> u64 {
        self.allocations.wrapping_sub(self.frees).wrapping_sub(self.remote_frees)
    }
}

/// A heap's figures. Bytes are block (usable) sizes, or the sizes callers
/// asked for when `requested_sizes`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeapSnapshot {
    pub label: HeapLabel,
    pub ended: bool,
    /// Whether live and peak bytes are requested sizes (see
    /// [`Heap::new_keeping_requested_sizes`](super::Heap::new_keeping_requested_sizes)).
    pub requested_sizes: bool,
    pub live_bytes: i64,
    pub peak_bytes: u64,
    pub reallocations: u64,
    /// Reallocations that moved a block within the heap: each is also in
    /// its classes' allocations and frees (see [`allocations_by_callers`](Self::allocations_by_callers)).
    pub moves: u64,
    /// Requests that could not be served (the OS refused memory, or sizes overflowed).
    pub failures: u64,
    /// Bytes the heap has mapped from the OS now (segments, including partly used ones).
    pub mapped_bytes: u64,
    /// Per class: the paged classes in order, then large, then huge.
    pub classes: Vec<ClassSnapshot>,
}

impl HeapSnapshot {
    pub fn allocations(&self) -> u64 {
        self.classes.iter().map(|c| c.allocations).sum()
    }
    pub fn frees(&self) -> u64 {
        self.classes.iter().map(|c| c.frees).sum()
    }
    pub fn remote_frees(&self) -> u64 {
        self.classes.iter().map(|c| c.remote_frees).sum()
    }
    /// Allocations callers asked for: [`allocations`](Self::allocations)
    /// without the ones made to move a block on reallocation (a profiler
    /// counts those as reallocations only).
    pub fn allocations_by_callers(&self) -> u64 {
        self.allocations().wrapping_sub(self.moves)
    }
    /// Frees callers asked for: owner and remote frees, without those of
    /// blocks moved on reallocation.
    pub fn frees_by_callers(&self) -> u64 {
        self.frees().wrapping_add(self.remote_frees()).wrapping_sub(self.moves)
    }
    pub fn live_blocks(&self) -> u64 {
        self.classes.iter().map(ClassSnapshot::live_blocks).sum()
    }
    /// The large pseudo-class (blocks with a page span of their own).
    pub fn large(&self) -> &ClassSnapshot {
        &self.classes[LARGE_CLASS]
    }
    /// The huge pseudo-class (blocks with a segment of their own).
    pub fn huge(&self) -> &ClassSnapshot {
        &self.classes[HUGE_CLASS]
    }
}
