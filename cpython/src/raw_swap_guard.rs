//! Closing CPython 3.12's raw-allocator swap during subinterpreter start-up.
//!
//! Every interpreter that 3.12 starts runs `init_sys_streams`, which ends
//! with `_Py_ClearStandardStreamEncoding()`. That function sets the
//! process-wide raw domain back to `malloc` (`_PyMem_SetDefaultAllocator`),
//! frees two strings that only `Py_SetStandardStreamEncoding` ever sets, and
//! puts the previous raw allocator back. Under one GIL nobody could see the
//! gap. With own-GIL subinterpreters running in parallel, another
//! interpreter's `PyMem_RawFree` can land in that window and hand one of
//! *our* blocks to glibc's `free` ("munmap_chunk(): invalid pointer"), or
//! take a glibc block we later receive. This is CPython gh-111924, fixed in
//! 3.14 by never swapping; 3.13 no longer has the function.
//!
//! Once a replacement raw allocator is installed on 3.12, this module points
//! libpython's own call slot for `_Py_ClearStandardStreamEncoding` (its PLT
//! GOT entry, found through the ELF dynamic section) at [`clear_streams`],
//! which calls the original only where no other interpreter can be running:
//! in the main interpreter (its start-up, before any subinterpreter exists)
//! or with no thread state (`Py_Main`'s clean-up after finalization). In a
//! subinterpreter the strings were already cleared by the main interpreter's
//! start-up, so skipping the call there loses nothing but the swap.
//!
//! Patching the slot rather than defining the symbol in the launcher makes
//! it independent of link order, so it covers programs that link
//! libinterheap too. A libpython linked statically has no slot; the guard
//! then reports [`SwapGuard::Unavailable`].

/// What [`close`] achieved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwapGuard {
    /// This CPython never swaps the raw allocator while interpreters run.
    NotNeeded,
    /// libpython's calls to `_Py_ClearStandardStreamEncoding` now go through
    /// the guard.
    Installed,
    /// The slot could not be found or written (the reason).
    Unavailable(&'static str),
}

impl std::fmt::Display for SwapGuard {
    /// The words the report and the Python API use: `installed`,
    /// `not needed`, `unavailable: <why>`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SwapGuard::NotNeeded => f.write_str("not needed"),
            SwapGuard::Installed => f.write_str("installed"),
            SwapGuard::Unavailable(why) => write!(f, "unavailable: {why}"),
        }
    }
}

/// Installs the guard once (idempotent, thread-safe); returns its state.
pub fn close() -> SwapGuard {
    imp::close()
}

/// The guard's state in this copy of the glue: `None` on 3.12 until
/// something replaced the raw domain (nothing to guard yet). A process may
/// hold two copies (the launcher's and the extension module's); either one
/// closing the gap closes it for the process.
pub fn state() -> Option<SwapGuard> {
    imp::state()
}

#[cfg(Py_3_13)]
mod imp {
    use super::SwapGuard;

    pub fn close() -> SwapGuard {
        SwapGuard::NotNeeded
    }

    pub fn state() -> Option<SwapGuard> {
        Some(SwapGuard::NotNeeded)
    }
}

#[cfg(all(not(Py_3_13), not(all(target_os = "linux", target_pointer_width = "64"))))]
mod imp {
    use super::SwapGuard;

    pub fn close() -> SwapGuard {
        SwapGuard::Unavailable("only implemented for 64-bit Linux (ELF)")
    }

    pub fn state() -> Option<SwapGuard> {
        Some(close())
    }
}

#[cfg(all(not(Py_3_13), target_os = "linux", target_pointer_width = "64"))]
mod imp {
    use super::SwapGuard;
    use crate::loaded_object::{find_loaded_object, page_size};
    use std::ffi::{c_void, CStr};
    use std::ops::Range;
    use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
    use std::sync::OnceLock;

    const SYMBOL: &CStr = c"_Py_ClearStandardStreamEncoding";

    static STATE: OnceLock<SwapGuard> = OnceLock::new();
    /// libpython's own `_Py_ClearStandardStreamEncoding`, set before the slot
    /// is pointed at [`clear_streams`] (so the guard never sees it null).
    static ORIGINAL: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());

    pub fn close() -> SwapGuard {
        *STATE.get_or_init(patch)
    }

    pub fn state() -> Option<SwapGuard> {
        STATE.get().copied()
    }

    /// Stands in for `_Py_ClearStandardStreamEncoding` (see the module docs).
    extern "C" fn clear_streams() {
        // SAFETY: reading the calling thread's state pointer never blocks and
        // is valid with or without an attached thread state.
        let tstate = unsafe { pyo3_ffi::compat::PyThreadState_GetUnchecked() };
        let alone = tstate.is_null()
            // SAFETY: `tstate` is the caller's live, current thread state.
            || unsafe { pyo3_ffi::PyThreadState_GetInterpreter(tstate) == pyo3_ffi::PyInterpreterState_Main() };
        let original = ORIGINAL.load(Ordering::Acquire);
        if alone && !original.is_null() {
            // SAFETY: ORIGINAL is the address of libpython's
            // `void _Py_ClearStandardStreamEncoding(void)`.
            let original: extern "C" fn() = unsafe { std::mem::transmute(original) };
            original();
        }
    }

    #[repr(C)]
    struct Dyn {
        tag: i64,
        val: u64,
    }

    #[repr(C)]
    struct Rela {
        offset: u64,
        info: u64,
        addend: i64,
    }

    #[repr(C)]
    struct Sym {
        name: u32,
        info: u8,
        other: u8,
        shndx: u16,
        value: u64,
        size: u64,
    }

    const DT_NULL: i64 = 0;
    const DT_PLTRELSZ: i64 = 2;
    const DT_STRTAB: i64 = 5;
    const DT_SYMTAB: i64 = 6;
    const DT_RELA: i64 = 7;
    const DT_RELASZ: i64 = 8;
    const DT_JMPREL: i64 = 23;

    /// The loaded object that defines [`SYMBOL`].
    struct Search {
        bias: usize,
        dynamic: usize,
        relro: Range<usize>,
    }

    /// libpython's own `_Py_ClearStandardStreamEncoding`, and the object
    /// that defines it (libpython).
    fn find_libpython() -> Result<(*mut c_void, Search), &'static str> {
        // SAFETY: dlsym with a NUL-terminated name only looks the symbol up.
        let original = unsafe { libc::dlsym(libc::RTLD_DEFAULT, SYMBOL.as_ptr()) };
        if original.is_null() {
            return Err("libpython does not export _Py_ClearStandardStreamEncoding");
        }
        let found = find_loaded_object(|object| {
            object.contains(original as usize).then(|| Search {
                bias: object.bias,
                dynamic: object.segments(libc::PT_DYNAMIC).next().map_or(0, |(_, range)| range.start),
                relro: object.relro().unwrap_or_default(),
            })
        });
        match found {
            Some(search) if search.dynamic != 0 => Ok((original, search)),
            _ => Err("no dynamic section for the object defining the symbol"),
        }
    }

    fn patch() -> SwapGuard {
        let (original, search) = match find_libpython() {
            Ok(found) => found,
            Err(why) => return SwapGuard::Unavailable(why),
        };
        // SAFETY: `dynamic` is the loaded object's PT_DYNAMIC, which glibc
        // keeps mapped for the object's life and which ends with DT_NULL.
        let slots = unsafe { find_slots(&search) };
        if slots.is_empty() {
            return SwapGuard::Unavailable(
                "libpython calls _Py_ClearStandardStreamEncoding directly (no slot)",
            );
        }
        ORIGINAL.store(original, Ordering::Release);
        let guard = clear_streams as extern "C" fn() as usize;
        for slot in slots {
            // SAFETY: `slot` is a GOT entry of a loaded object, 8-byte aligned.
            let written = unsafe { write_slot(slot, &search.relro, guard) };
            if let Err(why) = written {
                return SwapGuard::Unavailable(why);
            }
        }
        SwapGuard::Installed
    }

    /// The GOT entries through which the object calls [`SYMBOL`]: its PLT
    /// slots (`DT_JMPREL`) and, for `-fno-plt` builds, `DT_RELA` entries.
    ///
    /// # Safety
    /// `search.dynamic` is a loaded object's dynamic section.
    unsafe fn find_slots(search: &Search) -> Vec<usize> {
        // glibc relocates most d_ptr values in place (x86-64, AArch64), other
        // loaders do not: an address below the load bias is still relative.
        let absolute = |value: u64| {
            let value = value as usize;
            if value < search.bias {
                value + search.bias
            } else {
                value
            }
        };
        let (mut strtab, mut symtab) = (0, 0);
        let mut tables = [(0usize, 0usize); 2]; // (JMPREL, PLTRELSZ), (RELA, RELASZ)
        let mut entry = search.dynamic as *const Dyn;
        loop {
            // SAFETY: the section ends with DT_NULL, which stops the loop.
            let d = unsafe { &*entry };
            match d.tag {
                DT_NULL => break,
                DT_STRTAB => strtab = absolute(d.val),
                DT_SYMTAB => symtab = absolute(d.val),
                DT_JMPREL => tables[0].0 = absolute(d.val),
                DT_PLTRELSZ => tables[0].1 = d.val as usize,
                DT_RELA => tables[1].0 = absolute(d.val),
                DT_RELASZ => tables[1].1 = d.val as usize,
                _ => {}
            }
            // SAFETY: still inside the section (DT_NULL not reached yet).
            entry = unsafe { entry.add(1) };
        }
        if strtab == 0 || symtab == 0 {
            return Vec::new();
        }
        let mut slots = Vec::new();
        for (start, bytes) in tables.into_iter().filter(|&(start, _)| start != 0) {
            // SAFETY: the table lies in a loaded segment, `bytes` long.
            let relocations = unsafe {
                std::slice::from_raw_parts(start as *const Rela, bytes / std::mem::size_of::<Rela>())
            };
            for r in relocations {
                let index = (r.info >> 32) as usize;
                if index == 0 {
                    continue;
                }
                // SAFETY: a relocation's symbol index is within the symbol
                // table, and its name offset within the string table.
                let name = unsafe {
                    let sym = &*(symtab as *const Sym).add(index);
                    CStr::from_ptr((strtab + sym.name as usize) as *const libc::c_char)
                };
                if name == SYMBOL {
                    slots.push(search.bias + r.offset as usize);
                }
            }
        }
        slots
    }

    /// Stores `value` in the GOT slot, lifting RELRO's read-only protection
    /// around the write when the slot lies in it (`-z now` builds).
    ///
    /// # Safety
    /// `slot` is an aligned GOT entry of a loaded object.
    unsafe fn write_slot(slot: usize, relro: &Range<usize>, value: usize) -> Result<(), &'static str> {
        let page = page_size();
        let start = slot & !(page - 1);
        let protected = relro.contains(&slot);
        let protect = |flags| {
            // SAFETY: `start` is a mapped page of the object (it holds `slot`).
            unsafe { libc::mprotect(start as *mut c_void, page, flags) == 0 }
        };
        if protected && !protect(libc::PROT_READ | libc::PROT_WRITE) {
            return Err("mprotect refused to make the GOT page writable");
        }
        // SAFETY: the slot is a word other threads may load concurrently (a
        // call through the PLT); an atomic store keeps every load whole.
        unsafe { AtomicUsize::from_ptr(slot as *mut usize) }.store(value, Ordering::Release);
        // Restores RELRO's protection.
        if protected && !protect(libc::PROT_READ) {
            return Err("mprotect refused to restore the GOT page's protection");
        }
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// The permissions `/proc/self/maps` shows for the mapping holding `address`.
        fn permissions_at(address: usize) -> String {
            let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
            for line in maps.lines() {
                let (range, rest) = line.split_once(' ').unwrap();
                let (start, end) = range.split_once('-').unwrap();
                let (start, end) =
                    (usize::from_str_radix(start, 16).unwrap(), usize::from_str_radix(end, 16).unwrap());
                if (start..end).contains(&address) {
                    return rest[..4].to_owned();
                }
            }
            panic!("no mapping holds {address:#x}");
        }

        /// A slot in a read-only page, as in a `-z now` libpython (the path
        /// pyenv's lazily bound builds never take).
        #[test]
        fn a_slot_under_relro_is_written_and_the_page_made_read_only_again() {
            let page = page_size();
            // SAFETY: a fresh anonymous mapping, unmapped at the end.
            let base = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    page,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(base, libc::MAP_FAILED);
            let slot = base as usize + 64;
            // SAFETY: `slot` is inside the writable mapping; then it is made read-only.
            unsafe {
                *(slot as *mut usize) = 0x1234;
                assert_eq!(libc::mprotect(base, page, libc::PROT_READ), 0);
            }
            assert_eq!(permissions_at(slot), "r--p");
            let relro = base as usize..base as usize + page;
            // SAFETY: `slot` is an aligned word of a mapping we own.
            assert_eq!(unsafe { write_slot(slot, &relro, 0xabcd) }, Ok(()));
            // SAFETY: the page is still mapped (readable).
            assert_eq!(unsafe { *(slot as *const usize) }, 0xabcd);
            assert_eq!(permissions_at(slot), "r--p", "RELRO's protection is back");
            // SAFETY: unmapping what we mapped.
            unsafe { libc::munmap(base, page) };
        }

        #[test]
        fn a_slot_outside_relro_is_written_without_changing_protection() {
            let mut word = 0usize;
            let slot = &raw mut word as usize;
            let before = permissions_at(slot);
            // SAFETY: `slot` is our own aligned, writable word.
            assert_eq!(unsafe { write_slot(slot, &(0..0), 42) }, Ok(()));
            assert_eq!(word, 42);
            assert_eq!(permissions_at(slot), before);
        }

        #[test]
        fn the_guard_is_in_place_in_libpython_after_closing() {
            assert_eq!(close(), SwapGuard::Installed);
            assert_eq!(state(), Some(SwapGuard::Installed));
            let (_, search) = find_libpython().expect("libpython is loaded");
            // SAFETY: `dynamic` is libpython's dynamic section.
            let slots = unsafe { find_slots(&search) };
            assert!(!slots.is_empty());
            for slot in slots {
                // SAFETY: a GOT entry of libpython, readable.
                let target = unsafe { *(slot as *const usize) };
                assert_eq!(target, clear_streams as extern "C" fn() as usize);
            }
        }
    }
}
