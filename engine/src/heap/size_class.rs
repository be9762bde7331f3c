//! Size classes: which block size serves a request, and how big a page is.
//!
//! Requests up to 512 bytes are served in 16-byte steps (32 classes), as
//! pymalloc serves them: most Python objects are in that range. Above 512,
//! each power of two is split into four steps (at most 25% waste), up to
//! [`MAX_PAGED_SIZE`] (64 KiB). Every class size is a multiple of 16, and
//! pages start slot-aligned (16 KiB), so every block is 16-byte aligned as
//! CPython requires. Larger requests get a page of their own ([`LARGE_CLASS`]) or,
//! above [`MAX_LARGE_SIZE`], a segment of their own ([`HUGE_CLASS`]).

/// Classes served from shared pages (16 B ..= 64 KiB).
pub const PAGED_CLASSES: usize = 60;
/// Pseudo-class of blocks that own a page span inside a segment.
pub const LARGE_CLASS: usize = PAGED_CLASSES;
/// Pseudo-class of blocks that own a whole segment.
pub const HUGE_CLASS: usize = PAGED_CLASSES + 1;
/// Number of classes that statistics are kept for.
pub const STAT_CLASSES: usize = PAGED_CLASSES + 2;

/// Largest block served from a shared page.
pub const MAX_PAGED_SIZE: usize = 64 * 1024;
/// Largest block served from a span inside a segment; above it, a segment of its own.
pub const MAX_LARGE_SIZE: usize = 512 * 1024;

/// Largest request served in 16-byte steps. Peak RSS against pymalloc on
/// 25 pyperformance benchmarks (short runs, where fixed costs weigh most):
/// 16-byte steps to 128 then four per power of two, 1.074; to 512, 1.066;
/// to 512 then eight per power of two, 1.086 (more classes, more partly
/// used pages: those cost more than rounding up does).
const FINE_LIMIT: usize = 512;
/// Classes in 16-byte steps (16 ..= [`FINE_LIMIT`]).
const FINE_CLASSES: usize = FINE_LIMIT / 16;

/// Block sizes of the paged classes.
const CLASS_SIZES: [u32; PAGED_CLASSES] = {
    let mut table = [0u32; PAGED_CLASSES];
    let mut c = 0;
    while c < PAGED_CLASSES {
        table[c] = compute_class_size(c) as u32;
        c += 1;
    }
    table
};

/// The block size of paged class `class` (`class < PAGED_CLASSES`).
#[inline(always)]
pub const fn class_size(class: usize) -> usize {
    CLASS_SIZES[class] as usize
}

const fn compute_class_size(class: usize) -> usize {
    if class < FINE_CLASSES {
        (class + 1) * 16
    } else {
        let k = 9 + (class - FINE_CLASSES) / 4;
        let step = (class - FINE_CLASSES) % 4;
        (1 << k) + (step + 1) * (1 << (k - 2))
    }
}

/// `class_of` for sizes up to 1024, indexed by `(size + 15) / 16`.
const SMALL_CLASS_OF: [u8; 65] = {
    let mut table = [0u8; 65];
    let mut i = 0;
    while i < 65 {
        table[i] = compute_class_of(i * 16) as u8;
        i += 1;
    }
    table
};

/// The paged class serving `size` bytes (`size <= MAX_PAGED_SIZE`); 0 is served as 1.
#[inline(always)]
pub const fn class_of(size: usize) -> usize {
    if size <= 1024 {
        SMALL_CLASS_OF[(size + 15) >> 4] as usize
    } else {
        compute_class_of(size)
    }
}

const fn compute_class_of(size: usize) -> usize {
    if size <= FINE_LIMIT {
        // size 0 maps to class 0 too: (0 + 15) / 16 = 0, saturating below.
        let c = (size + 15) >> 4;
        if c == 0 {
            0
        } else {
            c - 1
        }
    } else {
        let s = size - 1;
        let k = (usize::BITS - 1 - s.leading_zeros()) as usize;
        let step = (s >> (k - 2)) & 3;
        FINE_CLASSES + (k - 9) * 4 + step
    }
}

/// Largest request the allocation fast path maps straight to a page
/// (through a heap's direct table, indexed by [`direct_index`]).
pub const MAX_DIRECT_SIZE: usize = 1024;
/// Entries of a heap's direct table (sizes 0 ..= [`MAX_DIRECT_SIZE`]).
pub const DIRECT_SLOTS: usize = MAX_DIRECT_SIZE / 16 + 1;

/// The direct-table entry serving `size` (`size <= MAX_DIRECT_SIZE`): every
/// size in one 16-byte step has the same class, as class sizes are multiples of 16.
#[inline(always)]
pub const fn direct_index(size: usize) -> usize {
    (size + 15) >> 4
}

/// Per paged class, the direct-table entries it serves, as `first..end`
/// (empty for classes above [`MAX_DIRECT_SIZE`]).
pub const DIRECT_RANGE: [(u8, u8); PAGED_CLASSES] = {
    let mut table = [(0u8, 0u8); PAGED_CLASSES];
    let mut i = 0;
    while i < DIRECT_SLOTS {
        let c = SMALL_CLASS_OF[i] as usize;
        if table[c].1 == 0 {
            table[c].0 = i as u8;
        }
        table[c].1 = i as u8 + 1;
        i += 1;
    }
    table
};

/// Slots that a page of paged class `class` spans: one, or as many as
/// hold eight blocks.
pub const fn page_slots(class: usize) -> usize {
    let slot = 1 << super::segment::SLOT_SHIFT;
    let span = (8 * class_size(class)).div_ceil(slot);
    if span == 0 {
        1
    } else {
        span
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block handed out for a request in a class up to
    /// `SLACK_BYTE_MAX` has a slack below 256 (its slack entry is a byte).
    #[test]
    fn byte_wide_classes_are_at_most_256_apart() {
        use crate::heap::segment::SLACK_BYTE_MAX;
        for c in 0..PAGED_CLASSES {
            if class_size(c) <= SLACK_BYTE_MAX {
                let below = if c == 0 { 0 } else { class_size(c - 1) };
                assert!(class_size(c) - below <= 256, "class {c}");
            }
        }
    }

    #[test]
    fn classes_are_increasing_aligned_and_end_at_64k() {
        for c in 0..PAGED_CLASSES {
            assert_eq!(class_size(c) % 16, 0, "class {c}");
            if c > 0 {
                assert!(class_size(c) > class_size(c - 1));
            }
        }
        assert_eq!(class_size(PAGED_CLASSES - 1), MAX_PAGED_SIZE);
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "arithmetic over every size up to 64 KiB, with no unsafe code or memory for Miri to \
                  check: a quarter of a minute under it"
    )]
    fn class_of_is_the_smallest_class_that_fits() {
        for size in 0..=MAX_PAGED_SIZE {
            let c = class_of(size);
            assert!(c < PAGED_CLASSES, "size {size}");
            assert!(class_size(c) >= size.max(1), "size {size} class {c}");
            if c > 0 {
                assert!(class_size(c - 1) < size, "size {size} fits a smaller class");
            }
        }
    }

    #[test]
    fn direct_entries_serve_their_class() {
        for size in 0..=MAX_DIRECT_SIZE {
            let (first, end) = DIRECT_RANGE[class_of(size)];
            assert!((first as usize..end as usize).contains(&direct_index(size)), "size {size}");
        }
        let covered: usize = DIRECT_RANGE.iter().map(|(f, e)| (e - f) as usize).sum();
        assert_eq!(covered, DIRECT_SLOTS, "each entry belongs to exactly one class");
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "arithmetic over every size up to 64 KiB, with no unsafe code or memory for Miri to \
                  check: a quarter of a minute under it"
    )]
    fn waste_is_bounded() {
        for size in 1..=FINE_LIMIT {
            assert!(class_size(class_of(size)) - size < 16, "size {size}");
        }
        for size in FINE_LIMIT + 1..=MAX_PAGED_SIZE {
            let bs = class_size(class_of(size));
            assert!((bs - size) * 4 <= size, "size {size} -> {bs}");
        }
    }

    #[test]
    fn pages_hold_at_least_eight_blocks() {
        for c in 0..PAGED_CLASSES {
            assert!(
                page_slots(c) * (1 << crate::heap::segment::SLOT_SHIFT) / class_size(c) >= 8,
                "class {c}"
            );
        }
    }
}
