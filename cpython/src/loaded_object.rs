//! The objects loaded in this process (the program and its shared
//! libraries), read through their ELF program headers.
//!
//! Two parts of interheap look at loaded objects: the launcher gives back the
//! resident pages of its own read-only segments, and [`crate::raw_swap_guard`]
//! finds libpython's dynamic section and the RELRO range around its GOT. Both
//! turn a program header into an absolute address range the same way; this
//! module does it once.

use std::ffi::CStr;
use std::ops::Range;

/// One loaded object, as `dl_iterate_phdr` describes it.
pub struct LoadedObject<'a> {
    /// The path the loader opened; empty for the main program.
    pub path: &'a [u8],
    /// The load bias: what to add to a header's `p_vaddr`.
    pub bias: usize,
    /// The object's program headers.
    pub headers: &'a [libc::Elf64_Phdr],
}

impl LoadedObject<'_> {
    /// The absolute address range of a header's segment in memory.
    pub fn range(&self, header: &libc::Elf64_Phdr) -> Range<usize> {
        let start = self.bias + header.p_vaddr as usize;
        start..start + header.p_memsz as usize
    }

    /// The headers of one type (`PT_LOAD`, `PT_DYNAMIC`, ...), with their ranges.
    pub fn segments(&self, kind: u32) -> impl Iterator<Item = (&libc::Elf64_Phdr, Range<usize>)> + '_ {
        self.headers.iter().filter(move |h| h.p_type == kind).map(|h| (h, self.range(h)))
    }

    /// Whether one of the object's loaded segments holds `address`.
    pub fn contains(&self, address: usize) -> bool {
        self.segments(libc::PT_LOAD).any(|(_, range)| range.contains(&address))
    }

    /// The range that the loader makes read-only after relocating (`PT_GNU_RELRO`).
    pub fn relro(&self) -> Option<Range<usize>> {
        self.segments(libc::PT_GNU_RELRO).map(|(_, range)| range).next()
    }

    /// The last component of the path (`libgcc_s.so.1`); empty for the main program.
    pub fn file_name(&self) -> &[u8] {
        self.path.rsplit(|&b| b == b'/').next().unwrap_or_default()
    }
}

/// Calls `visit` on each loaded object, the main program first, until it
/// returns `Some`; returns that value.
pub fn find_loaded_object<T>(mut visit: impl FnMut(&LoadedObject<'_>) -> Option<T>) -> Option<T> {
    struct Walk<'v, T> {
        visit: &'v mut dyn FnMut(&LoadedObject<'_>) -> Option<T>,
        found: Option<T>,
    }

    unsafe extern "C" fn each<T>(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        data: *mut libc::c_void,
    ) -> i32 {
        // SAFETY: glibc passes a valid record for the duration of the call,
        // and `data` is the `Walk` that `find_loaded_object` lent it.
        let (info, walk) = unsafe { (&*info, &mut *data.cast::<Walk<'_, T>>()) };
        let path = if info.dlpi_name.is_null() {
            &[][..]
        } else {
            // SAFETY: `dlpi_name` is a NUL-terminated string.
            unsafe { CStr::from_ptr(info.dlpi_name) }.to_bytes()
        };
        let headers = if info.dlpi_phdr.is_null() {
            &[][..]
        } else {
            // SAFETY: `dlpi_phdr` points to `dlpi_phnum` headers.
            unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) }
        };
        let object = LoadedObject { path, bias: info.dlpi_addr as usize, headers };
        walk.found = (walk.visit)(&object);
        i32::from(walk.found.is_some())
    }

    let mut walk = Walk { visit: &mut visit, found: None };
    // SAFETY: the callback only reads the records glibc hands it, and `walk`
    // outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(each::<T>), (&raw mut walk).cast()) };
    walk.found
}

/// The size of a memory page.
pub fn page_size() -> usize {
    // SAFETY: sysconf only reads a system constant.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_main_program_comes_first_and_holds_its_own_code() {
        let here = the_main_program_comes_first_and_holds_its_own_code as fn() as usize;
        let first = find_loaded_object(|o| Some((o.path.is_empty(), o.contains(here))));
        assert_eq!(first, Some((true, true)));
    }

    #[test]
    fn libc_is_found_by_an_address_inside_it_and_has_a_dynamic_section() {
        // Not malloc: a sanitizer's runtime (ThreadSanitizer's, linked into
        // the test program) defines its own, so malloc's address is in the
        // program there. No sanitizer intercepts getpid.
        let getpid_address = libc::getpid as *const () as usize;
        let (name, dynamic) = find_loaded_object(|o| {
            o.contains(getpid_address).then(|| (o.file_name().to_vec(), o.segments(libc::PT_DYNAMIC).count()))
        })
        .expect("some object holds getpid");
        assert!(name.starts_with(b"libc."), "{}", String::from_utf8_lossy(&name));
        assert_eq!(dynamic, 1);
    }

    #[test]
    fn an_address_no_object_holds_is_not_found() {
        let heap = Box::new(7u64);
        let address = &*heap as *const u64 as usize;
        assert!(find_loaded_object(|o| o.contains(address).then_some(())).is_none());
    }

    #[test]
    fn ranges_are_absolute_and_pages_are_a_power_of_two() {
        let page = page_size();
        assert!(page.is_power_of_two() && page >= 4096);
        find_loaded_object(|o| {
            for (header, range) in o.segments(libc::PT_LOAD) {
                assert_eq!(range.len(), header.p_memsz as usize);
                assert!(range.start >= o.bias);
            }
            None::<()>
        });
    }
}
