//! The allocator's C API, exported by the launcher and the embedding library
//! (feature `c-api`). Declared in `include/interheap_allocator.h`.
//!
//! The Python extension module finds these symbols at run time with
//! `dlsym(RTLD_DEFAULT, ...)`: they exist only in a process whose main program
//! (or a library it loaded globally) installed the allocator.

use std::ffi::{c_char, c_int, c_uint, CString};
use std::ptr;

use crate::allocator::{install_before_init, installed, report_json, Domains};

/// Installs the interheap allocator for `domains` (raw=1, mem=2, object=4).
/// Returns 0 on success; otherwise -1, with a message in `err` (if not NULL,
/// NUL-terminated, truncated to `err_len`). Nothing changes on failure.
///
/// # Safety
///
/// `err` is NULL or points to `err_len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn interheap_allocator_install(
    domains: c_uint,
    err: *mut c_char,
    err_len: usize,
) -> c_int {
    let domains = u8::try_from(domains).map(Domains).unwrap_or(Domains(0xFF));
    match install_before_init(domains) {
        Ok(()) => 0,
        Err(e) => {
            if !err.is_null() && err_len > 0 {
                let msg = e.to_string();
                let n = msg.len().min(err_len - 1);
                // SAFETY: `err` has `err_len` writable bytes and we write `n + 1 <= err_len`.
                unsafe {
                    ptr::copy_nonoverlapping(msg.as_ptr(), err as *mut u8, n);
                    *err.add(n) = 0;
                }
            }
            -1
        }
    }
}

/// The domains the allocator serves (0 if it is not installed).
#[no_mangle]
pub extern "C" fn interheap_allocator_installed() -> c_uint {
    installed().0 as c_uint
}

/// The allocator's figures as a JSON document (free it with
/// `interheap_allocator_free_string`); NULL if out of memory.
#[no_mangle]
pub extern "C" fn interheap_allocator_report_json() -> *mut c_char {
    CString::new(report_json()).map_or(ptr::null_mut(), CString::into_raw)
}

/// Frees a string returned by this API.
///
/// # Safety
///
/// `s` is NULL or came from `interheap_allocator_report_json` and is freed once.
#[no_mangle]
pub unsafe extern "C" fn interheap_allocator_free_string(s: *mut c_char) {
    if !s.is_null() {
        // SAFETY: per the contract, `s` came from CString::into_raw.
        drop(unsafe { CString::from_raw(s) });
    }
}
