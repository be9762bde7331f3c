//! Memory from the operating system, and the map that says which is ours.
//!
//! Memory comes from the OS in *segments*: mappings aligned to
//! [`SEGMENT_SIZE`] (1 MiB), so that any pointer's segment header is found by
//! masking its low bits. The *segment map* is one byte per 1 MiB of address
//! space, set while a segment starts there. It lets the allocator answer "is
//! this pointer ours?" without touching memory it does not own: a pointer
//! whose 1 MiB unit has no mark is someone else's (pointers allocated
//! before interheap was installed, by another allocator), and is never
//! dereferenced.
//!
//! The map covers the 47-bit user address space of x86-64 and AArch64 Linux
//! with one byte per unit: 128 MiB of zero-initialised static memory, which
//! the OS only backs where it is written (one 4 KiB page of the map per 4 GiB
//! of address space that holds segments). A byte rather than a bit saves the
//! free fast path four instructions (no word and bit arithmetic). Mappings
//! above it are refused, so the map never lies.
//!
//! Under Miri (`cfg(miri)`), which has no partial `munmap` and no `madvise`,
//! segments come from Rust's global allocator instead, with the same size,
//! alignment and zeroing (see `miri_memory`), and the segment map covers
//! less address space (see `ADDRESS_BITS`); everything else is the same code.

use std::ptr;
use std::sync::atomic::{AtomicU8, Ordering};

/// log2 of the segment size and alignment.
pub const SEGMENT_SHIFT: usize = 20;
/// Segment size and alignment: 1 MiB (64 slots of 16 KiB, one `u64` slot map).
pub const SEGMENT_SIZE: usize = 1 << SEGMENT_SHIFT;
/// Mask of the offset inside a segment.
pub const SEGMENT_MASK: usize = SEGMENT_SIZE - 1;
/// Address bits covered by the segment map.
#[cfg(not(miri))]
const ADDRESS_BITS: usize = 47;
/// Under Miri, 64 GiB of address space: Miri hands out addresses upward from
/// near zero (reusing freed ones), so a run of tests stays far below that,
/// and a 128 MiB static map costs Miri minutes to set up. A segment above it
/// is refused (an allocation failure a test would see), never misread.
#[cfg(miri)]
const ADDRESS_BITS: usize = 36;
const MAP_UNITS: usize = 1 << (ADDRESS_BITS - SEGMENT_SHIFT);
/// The OS page size we round huge mappings to.
pub const OS_PAGE: usize = 4096;

/// One byte per segment-aligned unit of address space: nonzero while a segment starts there.
static SEGMENT_MAP: [AtomicU8; MAP_UNITS] = [const { AtomicU8::new(0) }; MAP_UNITS];

#[inline(always)]
fn map_slot(addr: usize) -> Option<&'static AtomicU8> {
    let unit = addr >> SEGMENT_SHIFT;
    // The element is reached through a raw pointer rather than
    // `SEGMENT_MAP.get(unit)`: the same code, but no reference to the whole
    // map, which Miri would retag, byte by byte, on every lookup.
    // SAFETY: `unit` is in bounds of the static map, which lives forever.
    (unit < MAP_UNITS).then(|| unsafe { &*ptr::addr_of!(SEGMENT_MAP).cast::<AtomicU8>().add(unit) })
}

/// Whether an interheap segment starts at `base` (a segment-aligned address).
///
/// Reads only the segment map. Ordering: a segment is published in the map
/// (Release) after its header is written, so a thread that learns of a block
/// in it (through any synchronised hand-off) and then sees the mark (Acquire)
/// also sees the header.
#[inline(always)]
pub fn is_segment(base: usize) -> bool {
    match map_slot(base) {
        Some(unit) => unit.load(Ordering::Acquire) != 0,
        None => false,
    }
}

fn set_segment_mark(base: usize, on: bool) {
    if let Some(unit) = map_slot(base) {
        unit.store(on as u8, Ordering::Release);
    }
}

/// Maps `size` bytes (a multiple of [`OS_PAGE`]) of zeroed memory aligned to
/// [`SEGMENT_SIZE`], or returns `None` if the OS refuses.
pub fn map_aligned(size: usize) -> Option<*mut u8> {
    let base = map_aligned_raw(size)?;
    if map_slot(base as usize + size - 1).is_none() {
        // Above the segment map's reach: we could not recognise it later.
        // SAFETY: [base, base + size) is the mapping we own and nobody else knows of.
        unsafe { unmap_raw(base, size) };
        return None;
    }
    Some(base)
}

/// `size` bytes of zeroed memory aligned to [`SEGMENT_SIZE`], straight from the OS.
#[cfg(not(miri))]
fn map_aligned_raw(size: usize) -> Option<*mut u8> {
    let padded = size.checked_add(SEGMENT_SIZE)?;
    // SAFETY: an anonymous private mapping with no address hint touches no
    // existing memory; failure is reported as MAP_FAILED.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            padded,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return None;
    }
    let raw = raw as usize;
    let base = (raw + SEGMENT_MASK) & !SEGMENT_MASK;
    let head = base - raw;
    let tail = padded - head - size;
    // SAFETY: both ranges lie inside the mapping just created and outside
    // [base, base + size), which is what we keep.
    unsafe {
        if head > 0 {
            libc::munmap(raw as *mut libc::c_void, head);
        }
        if tail > 0 {
            libc::munmap((base + size) as *mut libc::c_void, tail);
        }
    }
    Some(base as *mut u8)
}

/// Returns a whole mapping from [`map_aligned_raw`] to the OS.
///
/// # Safety
///
/// `base..base+size` is exactly such a mapping, and nothing uses it any more.
#[cfg(not(miri))]
unsafe fn unmap_raw(base: *mut u8, size: usize) {
    // SAFETY: the caller hands over a whole mapping of ours that is unused.
    unsafe { libc::munmap(base as *mut libc::c_void, size) };
}

/// A monotonic clock in nanoseconds (for how long free segments are kept).
/// Read on segment-level slow paths only: `clock_gettime` through the vDSO,
/// no system call and no allocation.
pub fn now_nanos() -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `t` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    (t.tv_sec as u64).wrapping_mul(1_000_000_000).wrapping_add(t.tv_nsec as u64)
}

/// Publishes a segment at `base` in the segment map (after its header is written).
pub fn publish_segment(base: *mut u8) {
    set_segment_mark(base as usize, true);
}

/// Removes the segment at `base` from the map and returns its `size` bytes to the OS.
///
/// # Safety
///
/// `base..base+size` must be a mapping from [`map_aligned`] that nothing uses any more.
pub unsafe fn unmap_segment(base: *mut u8, size: usize) {
    set_segment_mark(base as usize, false);
    // SAFETY: the caller hands over a whole mapping of ours that is unused.
    unsafe { unmap_raw(base, size) };
}

/// Returns a mapping from [`map_aligned`] that was never published as a
/// segment (memory for other uses: the block table's granule map) to the OS.
///
/// # Safety
///
/// `base..base+size` must be such a mapping, and nothing uses it any more.
pub unsafe fn unmap(base: *mut u8, size: usize) {
    // SAFETY: the caller hands over a whole mapping of ours that is unused.
    unsafe { unmap_raw(base, size) };
}

/// Tells the OS it may drop the contents of `len` bytes at `addr` (they read as zero afterwards).
///
/// # Safety
///
/// The range must be page-aligned, inside one of our mappings, and hold no live data.
pub unsafe fn discard(addr: *mut u8, len: usize) {
    #[cfg(not(miri))]
    // SAFETY: per the contract, the range is ours and holds nothing live.
    unsafe {
        libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED)
    };
    #[cfg(miri)]
    // SAFETY: per the contract, the range is ours and holds nothing live; it
    // reads as zero afterwards, as after MADV_DONTNEED.
    unsafe {
        addr.write_bytes(0, len)
    };
}

/// Segments from Rust's global allocator, for Miri: it implements `mmap` of
/// anonymous memory, but not the partial `munmap` that trims a mapping to its
/// aligned part, nor `madvise`. The allocator hands out the same size and
/// alignment, zeroed; Miri then checks every access to segments as it does
/// any heap allocation (bounds, use after unmap, provenance, data races).
#[cfg(miri)]
mod miri_memory {
    use std::alloc::{alloc_zeroed, dealloc, Layout};

    use super::SEGMENT_SIZE;

    fn layout(size: usize) -> Option<Layout> {
        Layout::from_size_align(size, SEGMENT_SIZE).ok()
    }

    pub(super) fn map_aligned_raw(size: usize) -> Option<*mut u8> {
        let layout = layout(size)?;
        // SAFETY: `size` is nonzero (callers map at least one OS page).
        let base = unsafe { alloc_zeroed(layout) };
        (!base.is_null()).then_some(base)
    }

    /// # Safety
    ///
    /// `base..base+size` came from `map_aligned_raw(size)` and nothing uses it any more.
    pub(super) unsafe fn unmap_raw(base: *mut u8, size: usize) {
        if let Some(layout) = layout(size) {
            // SAFETY: per the contract, allocated with this layout and unused.
            unsafe { dealloc(base, layout) };
        }
    }
}
#[cfg(miri)]
use miri_memory::{map_aligned_raw, unmap_raw};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_is_aligned_zeroed_and_recognised_only_while_published() {
        let size = 2 * SEGMENT_SIZE + OS_PAGE;
        let base = map_aligned(size).expect("mmap");
        assert_eq!(base as usize & SEGMENT_MASK, 0);
        // SAFETY: the mapping is ours and `size` bytes long.
        let bytes = unsafe { std::slice::from_raw_parts(base, size) };
        assert!(bytes.iter().step_by(997).all(|&b| b == 0));
        assert!(!is_segment(base as usize));
        publish_segment(base);
        assert!(is_segment(base as usize));
        assert!(!is_segment(base as usize + SEGMENT_SIZE), "only the start unit is marked");
        // SAFETY: nothing uses the mapping.
        unsafe { unmap_segment(base, size) };
        assert!(!is_segment(base as usize));
    }

    #[test]
    fn foreign_and_out_of_range_addresses_are_not_ours() {
        let on_stack = 0u64;
        assert!(!is_segment(&on_stack as *const u64 as usize & !SEGMENT_MASK));
        assert!(!is_segment(usize::MAX & !SEGMENT_MASK));
    }
}
