//! Giving back the launcher's start-up code pages before Python runs.
//!
//! The launcher's read-only segments (about 430 KB of code and constants,
//! most of it Rust's standard library: formatting, argument handling, panic
//! and backtrace support), and those of `libgcc_s` (loaded for Rust's
//! unwinder, which `python` does not load), are mapped page by page as
//! start-up touches them, and the kernel maps whole 64 KiB windows around
//! each touch. They would count in the process's resident memory for its
//! whole life (about 0.4 MB, 1 to 2% of a small benchmark's peak) although,
//! once CPython runs, only the allocator's own functions execute. Dropping
//! those mappings with `MADV_DONTNEED` costs nothing: the pages stay in the
//! page cache, and a page that is needed again is mapped back by a minor
//! fault. (Python's own libraries are left alone.)
//!
//! Only whole pages of read-only, file-backed segments are dropped: never a
//! writable segment, and never the RELRO range (pages the loader wrote
//! relocations into, which `MADV_DONTNEED` would reset).

#[cfg(target_os = "linux")]
use interheap_cpython::loaded_object::{find_loaded_object, page_size, LoadedObject};

/// Drops the resident mappings of the launcher's and `libgcc_s`'s read-only segments.
#[cfg(target_os = "linux")]
pub fn release_start_up_pages() {
    let page = page_size();
    find_loaded_object(|object| {
        let ours = object.path.is_empty() || object.file_name().starts_with(b"libgcc_s.");
        if ours {
            release_read_only_segments(object, page);
        }
        None::<()>
    });
}

#[cfg(not(target_os = "linux"))]
pub fn release_start_up_pages() {}

#[cfg(target_os = "linux")]
fn release_read_only_segments(object: &LoadedObject<'_>, page: usize) {
    let relro = object.relro().unwrap_or_default();
    for (header, range) in object.segments(libc::PT_LOAD) {
        if header.p_flags & libc::PF_W != 0 {
            continue;
        }
        // Whole pages inside the segment only (a shared edge page may belong
        // to a neighbour), and none of them in RELRO.
        let (start, end) = ((range.start + page - 1) & !(page - 1), range.end & !(page - 1));
        if start >= end || (relro.start < end && start < relro.end) {
            continue;
        }
        // SAFETY: [start, end) lies in a read-only, file-backed mapping
        // that no one wrote to: dropping it only unmaps page-cache pages,
        // which a later touch maps back unchanged.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
    }
}
