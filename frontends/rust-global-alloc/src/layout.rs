//! Where a caller's bytes sit inside the block a backend returned, and the
//! one-word header in front of them that names the block's route.
//!
//! ```text
//! base                       user - WORD   user                   user + size
//! |<- padding for alignment ->|  header  |<--- caller's bytes --->|<- slack ->|
//! ```
//!
//! The header word is `offset << 1 | route`, where `offset = user - base`
//! (at least [`WORD`]; below `isize::MAX`, as every Layout's size is) and
//! the route bit is 1 for Python's raw domain, 0 for the libc fallback. `dealloc` and `realloc`
//! read it to hand the block back to the backend that allocated it, and to
//! find `base`, whatever the caller's alignment.
//!
//! A block of `size` bytes aligned to `align` asks its backend for
//! `size + max(align, WORD)` bytes (at least [`MIN_BLOCK`]). That fits the
//! header and any alignment padding as long as the backend returns
//! WORD-aligned memory, which C's `malloc` and every PEP 445 allocator do
//! (they must align for any fundamental type). The placement is still checked
//! on every allocation: a backend that returns less gets a second request
//! sized for the worst case, never a block that overflows.

use std::mem::size_of;
use std::ptr;

/// Size of the header, and the smallest alignment of every user pointer.
pub(crate) const WORD: usize = size_of::<usize>();

/// Smallest request made of a backend: a block freed without a thread state
/// is parked on the deferred list, which keeps two words in it.
pub(crate) const MIN_BLOCK: usize = 2 * WORD;

/// Blocks with an alignment up to this are resized with the backend's own
/// `realloc`; larger alignments are moved (allocate, copy, free), since a
/// resized block rarely keeps a large alignment.
pub(crate) const REALLOC_IN_PLACE_MAX_ALIGN: usize = 2 * WORD;

const ROUTE_BIT: usize = 1;

/// Which allocator a block came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    /// `PyMem_RawMalloc` / `PyMem_RawCalloc` / `PyMem_RawRealloc`.
    Python,
    /// libc `malloc` / `calloc` / `realloc`.
    Fallback,
}

/// One of the two allocators behind the blocks. Implementations are plain
/// C allocators: `malloc`-like contracts, NULL on failure, never unwinding.
pub(crate) trait Backend {
    const ROUTE: Route;
    /// # Safety
    /// Must be called only where the route allows (see `route.rs`).
    unsafe fn malloc(&self, n: usize) -> *mut u8;
    /// # Safety
    /// As [`Backend::malloc`].
    unsafe fn calloc(&self, n: usize) -> *mut u8;
    /// # Safety
    /// `p` came from this backend and is live; as [`Backend::malloc`].
    unsafe fn realloc(&self, p: *mut u8, n: usize) -> *mut u8;
    /// # Safety
    /// `p` came from this backend and is live; as [`Backend::malloc`].
    unsafe fn free(&self, p: *mut u8);
}

/// A live block, as its header describes it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Block {
    pub base: *mut u8,
    pub offset: usize,
    pub route: Route,
}

/// Reads the header in front of `user`.
///
/// # Safety
/// `user` was returned by [`allocate`] or [`resize_in_place`] and is live.
#[inline]
pub(crate) unsafe fn block_of(user: *mut u8) -> Block {
    // SAFETY: the caller guarantees a live block of ours, which always has a
    // WORD-aligned header word right before `user`.
    let word = unsafe { user.sub(WORD).cast::<usize>().read() };
    let offset = word >> 1;
    debug_assert!(offset >= WORD, "interheap-pyalloc: corrupt block header");
    let route = if word & ROUTE_BIT != 0 { Route::Python } else { Route::Fallback };
    // SAFETY: `offset` is how far `user` is from the start of its block.
    Block { base: unsafe { user.sub(offset) }, offset, route }
}

/// The alignment user pointers get: at least WORD, so the header is aligned.
#[inline]
fn effective_align(align: usize) -> usize {
    align.max(WORD)
}

/// Bytes asked beyond `size` when the backend returns WORD-aligned blocks.
#[inline]
fn extra(align: usize) -> usize {
    effective_align(align)
}

/// Bytes asked beyond `size` for a backend that may return any address.
#[inline]
fn worst_case_extra(align: usize) -> Option<usize> {
    (effective_align(align) - 1).checked_add(WORD)
}

/// Offset of the user pointer inside a block at `base`, if it fits in `extra`.
#[inline]
fn place(base: *mut u8, align: usize, extra: usize) -> Option<usize> {
    let align = effective_align(align);
    let first = (base as usize).checked_add(WORD)?;
    let user = first.checked_add(align - 1)? & !(align - 1);
    let offset = user - base as usize;
    (offset <= extra).then_some(offset)
}

/// Writes the header and returns the user pointer.
///
/// # Safety
/// `base + offset` lies inside a live block with at least WORD bytes of it
/// before, and `base + offset` is WORD-aligned.
#[inline]
unsafe fn finish(base: *mut u8, offset: usize, route: Route) -> *mut u8 {
    // SAFETY: per the contract, `user - WORD .. user` is inside the block and aligned.
    unsafe {
        let user = base.add(offset);
        let tag = if route == Route::Python { ROUTE_BIT } else { 0 };
        user.sub(WORD).cast::<usize>().write(offset << 1 | tag);
        user
    }
}

#[inline]
fn request(size: usize, extra: usize) -> Option<usize> {
    Some(size.checked_add(extra)?.max(MIN_BLOCK))
}

/// Allocates `size` bytes aligned to `align` from `backend`, zeroed if asked.
/// Returns NULL if the backend fails or the request overflows.
///
/// # Safety
/// `align` is a power of two; the backend may be called here (route rules).
#[inline]
pub(crate) unsafe fn allocate<B: Backend>(backend: &B, size: usize, align: usize, zeroed: bool) -> *mut u8 {
    debug_assert!(align.is_power_of_two());
    // SAFETY: forwarded contract.
    if let Some(p) = unsafe { allocate_with(backend, size, align, zeroed, extra(align)) } {
        return p;
    }
    // The backend returned a block that is not even WORD-aligned: ask for
    // room for any base address (this cannot miss again).
    let Some(extra) = worst_case_extra(align) else { return ptr::null_mut() };
    // SAFETY: forwarded contract.
    let placed = unsafe { allocate_with(backend, size, align, zeroed, extra) };
    placed.unwrap_or(ptr::null_mut())
}

/// One request of `size + extra` bytes: the user pointer (NULL if the
/// backend failed or the size overflows), or `None` if the block's base left
/// too little room to place it (the block is then freed again).
#[inline]
unsafe fn allocate_with<B: Backend>(
    backend: &B,
    size: usize,
    align: usize,
    zeroed: bool,
    extra: usize,
) -> Option<*mut u8> {
    let Some(total) = request(size, extra) else { return Some(ptr::null_mut()) };
    // SAFETY: forwarded contract.
    let base = unsafe {
        if zeroed {
            backend.calloc(total)
        } else {
            backend.malloc(total)
        }
    };
    if base.is_null() {
        return Some(base);
    }
    match place(base, align, extra) {
        // SAFETY: `offset <= extra`, so the user bytes end inside the block,
        // and `offset >= WORD` leaves room for the aligned header.
        Some(offset) => Some(unsafe { finish(base, offset, B::ROUTE) }),
        None => {
            // SAFETY: `base` came from this backend just now.
            unsafe { backend.free(base) };
            None
        }
    }
}

/// The outcome of [`resize_in_place`].
pub(crate) enum Resized {
    /// The block now holds `new_size` bytes at this pointer.
    Done(*mut u8),
    /// The backend failed; the old block is untouched.
    Failed,
    /// This block can't be resized by its backend; move it instead.
    MustMove,
}

/// Resizes `block` (holding `old_size` bytes aligned to `align`) with its
/// backend's `realloc`, keeping the header and the caller's bytes.
///
/// # Safety
/// `block` describes the live block at `user`, which `backend` allocated, and
/// the backend may be called here (route rules).
#[inline]
pub(crate) unsafe fn resize_in_place<B: Backend>(
    backend: &B,
    block: Block,
    old_size: usize,
    align: usize,
    new_size: usize,
) -> Resized {
    debug_assert_eq!(block.route, B::ROUTE);
    let extra = extra(align);
    if align > REALLOC_IN_PLACE_MAX_ALIGN || block.offset > extra {
        return Resized::MustMove;
    }
    let Some(total) = request(new_size, extra) else { return Resized::Failed };
    // SAFETY: `block.base` is live and from this backend.
    let base = unsafe { backend.realloc(block.base, total) };
    if base.is_null() {
        return Resized::Failed;
    }
    // The backend copied header and bytes to the same offset in the new block.
    // SAFETY: `offset <= extra`, so `base + offset` is inside the new block.
    let user = unsafe { base.add(block.offset) };
    if (user as usize).is_multiple_of(effective_align(align)) {
        return Resized::Done(user);
    }
    // The new block has a different alignment than the old one had: move the
    // bytes within it to where they belong now.
    match place(base, align, extra) {
        Some(offset) => {
            // SAFETY: both ranges hold `min(old, new)` bytes and end inside the
            // new block (`offset`, `block.offset` <= extra); `copy` allows overlap.
            unsafe {
                ptr::copy(user, base.add(offset), old_size.min(new_size));
                Resized::Done(finish(base, offset, B::ROUTE))
            }
        }
        // A backend that returns blocks that are not WORD-aligned, and a
        // caller's bytes we can no longer give back: nothing sound is left.
        None => std::process::abort(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// libc underneath, but each block starts at the next of `skews` bytes
    /// past a 16-aligned address, so placement meets every base alignment.
    /// Its `realloc` always moves, to the next skew.
    struct Shifting {
        skews: &'static [usize],
        next: Cell<usize>,
        live: Cell<isize>,
    }

    impl Shifting {
        fn new(skews: &'static [usize]) -> Self {
            Shifting { skews, next: Cell::new(0), live: Cell::new(0) }
        }
        fn raw_of(p: *mut u8) -> *mut u8 {
            // SAFETY: `p - 1` holds the skew byte written by `malloc`.
            unsafe { p.sub(16 + p.sub(1).read() as usize) }
        }
    }

    impl Backend for Shifting {
        const ROUTE: Route = Route::Fallback;
        unsafe fn malloc(&self, n: usize) -> *mut u8 {
            let skew = self.skews[self.next.get() % self.skews.len()];
            self.next.set(self.next.get() + 1);
            self.live.set(self.live.get() + 1);
            // SAFETY: a libc block of `n + 48` bytes; `p` lies 16..40 bytes
            // into it, its size word at the start and the skew byte before `p`.
            unsafe {
                let raw = libc::malloc(n + 48).cast::<u8>();
                raw.cast::<usize>().write(n);
                let p = raw.add(16 + skew);
                p.sub(1).write(skew as u8);
                p
            }
        }
        unsafe fn calloc(&self, n: usize) -> *mut u8 {
            // SAFETY: `malloc` returned `n` bytes at `p`.
            unsafe {
                let p = self.malloc(n);
                p.write_bytes(0, n);
                p
            }
        }
        unsafe fn realloc(&self, p: *mut u8, n: usize) -> *mut u8 {
            // SAFETY: `p` came from `malloc` and holds `old` bytes.
            unsafe {
                let old = Self::raw_of(p).cast::<usize>().read();
                let q = self.malloc(n);
                ptr::copy_nonoverlapping(p, q, old.min(n));
                self.free(p);
                q
            }
        }
        unsafe fn free(&self, p: *mut u8) {
            self.live.set(self.live.get() - 1);
            // SAFETY: `p` came from `malloc`.
            unsafe { libc::free(Self::raw_of(p).cast()) }
        }
    }

    fn fill(p: *mut u8, n: usize, seed: u8) {
        for i in 0..n {
            // SAFETY: the test owns `n` bytes at `p`.
            unsafe { p.add(i).write(seed.wrapping_add(i as u8)) };
        }
    }

    fn check(p: *mut u8, n: usize, seed: u8) {
        for i in 0..n {
            // SAFETY: the test owns `n` bytes at `p`.
            assert_eq!(unsafe { p.add(i).read() }, seed.wrapping_add(i as u8), "byte {i}");
        }
    }

    fn release<B: Backend>(b: &B, p: *mut u8) {
        // SAFETY: `p` is a live block of ours from `b`.
        unsafe { b.free(block_of(p).base) };
    }

    #[test]
    fn every_alignment_and_base_is_placed_inside_the_block() {
        let b = Shifting::new(&[0, 1, 3, 8, 16, 24]);
        for shift in 0..=13 {
            let align = 1usize << shift;
            for size in [1, 7, 8, 33, 4096, 10_000] {
                for zeroed in [false, true] {
                    // SAFETY: power-of-two alignment; test backend.
                    let p = unsafe { allocate(&b, size, align, zeroed) };
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align.max(WORD), 0, "align {align}");
                    if zeroed {
                        check_zero(p, size);
                    }
                    fill(p, size, shift as u8);
                    // SAFETY: `p` is live and ours.
                    assert_eq!(unsafe { block_of(p) }.route, Route::Fallback);
                    check(p, size, shift as u8);
                    release(&b, p);
                }
            }
        }
        assert_eq!(b.live.get(), 0, "a block leaked");
    }

    fn check_zero(p: *mut u8, n: usize) {
        for i in 0..n {
            // SAFETY: the test owns `n` bytes at `p`.
            assert_eq!(unsafe { p.add(i).read() }, 0);
        }
    }

    #[test]
    fn overflowing_requests_fail_cleanly() {
        let b = Shifting::new(&[0]);
        // SAFETY: power-of-two alignments; the backend is never reached.
        unsafe {
            assert!(allocate(&b, usize::MAX - 3, 8, false).is_null());
            assert!(allocate(&b, usize::MAX - 4000, 4096, false).is_null());
            assert!(allocate(&b, usize::MAX, 1, true).is_null());
        }
        assert_eq!(b.live.get(), 0);
    }

    #[test]
    fn resizing_keeps_bytes_header_and_alignment_when_the_base_moves() {
        // Each resize lands on a base with another alignment (0 or 8 mod 16).
        let b = Shifting::new(&[0, 8]);
        for align in [1, 2, 8, 16] {
            // SAFETY: test backend, power-of-two alignment.
            let mut p = unsafe { allocate(&b, 24, align, false) };
            fill(p, 24, 7);
            let mut size = 24;
            for new_size in [100, 5000, 3, 70_000, 16, 17] {
                // SAFETY: `p` is live, holds `size` bytes, from `b`.
                match unsafe { resize_in_place(&b, block_of(p), size, align, new_size) } {
                    Resized::Done(q) => p = q,
                    _ => panic!("align {align} should resize in place"),
                }
                assert_eq!(p as usize % align.max(WORD), 0);
                check(p, size.min(new_size), 7);
                fill(p, new_size, 7);
                size = new_size;
            }
            release(&b, p);
        }
        assert_eq!(b.live.get(), 0);
    }

    #[test]
    fn large_alignments_are_moved_not_resized() {
        let b = Shifting::new(&[0]);
        // SAFETY: test backend.
        let p = unsafe { allocate(&b, 64, 64, false) };
        // SAFETY: `p` is live and from `b`.
        assert!(matches!(unsafe { resize_in_place(&b, block_of(p), 64, 64, 128) }, Resized::MustMove));
        release(&b, p);
        assert_eq!(b.live.get(), 0);
    }
}
