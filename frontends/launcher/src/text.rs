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

/// Drops the resident mappings of the launcher's and `libgcc_s`'s read-only segments.
#[cfg(target_os = "linux")]
pub fn release_start_up_pages() {
    // SAFETY: the callback only reads what glibc hands it and calls madvise
    // on ranges it computed from the main program's own program headers.
    unsafe { libc::dl_iterate_phdr(Some(release_read_only_segments), std::ptr::null_mut()) };
}

#[cfg(not(target_os = "linux"))]
pub fn release_start_up_pages() {}

#[cfg(target_os = "linux")]
unsafe extern "C" fn release_read_only_segments(
    info: *mut libc::dl_phdr_info,
    _size: usize,
    _data: *mut libc::c_void,
) -> i32 {
    // SAFETY: glibc passes a valid record; the first one is the main program
    // (empty name); `dlpi_name` is a NUL-terminated string.
    let info = unsafe { &*info };
    let name = if info.dlpi_name.is_null() {
        &[][..]
    } else {
        // SAFETY: as above.
        unsafe { std::ffi::CStr::from_ptr(info.dlpi_name) }.to_bytes()
    };
    let ours =
        name.is_empty() || name.rsplit(|&b| b == b'/').next().is_some_and(|f| f.starts_with(b"libgcc_s."));
    if !ours {
        return 0;
    }
    // SAFETY: `dlpi_phdr` has `dlpi_phnum` entries.
    let headers = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) };
    let page = 4096usize;
    let base = info.dlpi_addr as usize;
    let range =
        |ph: &libc::Elf64_Phdr| (base + ph.p_vaddr as usize, base + (ph.p_vaddr + ph.p_memsz) as usize);
    let relro: Vec<(usize, usize)> =
        headers.iter().filter(|ph| ph.p_type == libc::PT_GNU_RELRO).map(range).collect();
    for ph in headers.iter().filter(|ph| ph.p_type == libc::PT_LOAD && ph.p_flags & libc::PF_W == 0) {
        let (start, end) = range(ph);
        // Whole pages inside the segment only (a shared edge page may belong
        // to a neighbour), and none of them in RELRO.
        let (start, end) = ((start + page - 1) & !(page - 1), end & !(page - 1));
        if start >= end || relro.iter().any(|&(r0, r1)| r0 < end && start < r1) {
            continue;
        }
        // SAFETY: [start, end) lies in a read-only, file-backed mapping
        // that no one wrote to: dropping it only unmaps page-cache pages,
        // which a later touch maps back unchanged.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
    }
    0
}
