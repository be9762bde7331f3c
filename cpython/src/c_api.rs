//! The allocator's C API, exported by the launcher and the embedding library
//! (feature `c-api`). Declared in `include/interheap_allocator.h`.
//!
//! The Python extension module finds these symbols at run time with
//! `dlsym(RTLD_DEFAULT, ...)`: they exist only in a process whose main program
//! (or a library it loaded globally) installed the allocator.

use std::ffi::{c_char, c_int, c_uint, CString};
use std::ptr;

use crate::allocator::{self, install_before_init_with, installed, report_json, Domains, InstallOptions};
use crate::interp_figures::InterpFigures;

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
    // SAFETY: per the contract.
    unsafe { interheap_allocator_install_with(domains, 0, err, err_len) }
}

/// `options` of [`interheap_allocator_install_with`]: the heaps keep requested sizes.
pub const OPTION_REQUESTED_SIZES: c_uint = 1;

/// [`interheap_allocator_install`] with `options` (a bit mask:
/// [`OPTION_REQUESTED_SIZES`]); an unknown option bit is refused.
///
/// # Safety
///
/// `err` is NULL or points to `err_len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn interheap_allocator_install_with(
    domains: c_uint,
    options: c_uint,
    err: *mut c_char,
    err_len: usize,
) -> c_int {
    if options & !OPTION_REQUESTED_SIZES != 0 {
        let unknown = format!("unknown option bits {:#x} (INTERHEAP_OPTION_REQUESTED_SIZES is 1)", options);
        // SAFETY: per the contract.
        return unsafe { status(Err::<(), _>(unknown), err, err_len) };
    }
    let domains = u8::try_from(domains).map(Domains).unwrap_or(Domains(0xFF));
    let options =
        InstallOptions { requested_sizes: options & OPTION_REQUESTED_SIZES != 0, ..Default::default() };
    // SAFETY: per the contract.
    unsafe { status(install_before_init_with(domains, options), err, err_len) }
}

/// 0 for `Ok`; -1 with the error's message in `err` otherwise.
///
/// # Safety
///
/// `err` is NULL or points to `err_len` writable bytes.
unsafe fn status<E: std::fmt::Display>(result: Result<(), E>, err: *mut c_char, err_len: usize) -> c_int {
    let Err(e) = result else { return 0 };
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

/// A limit from C: negative means none.
fn limit_from_c(limit: i64) -> Option<u64> {
    u64::try_from(limit).ok()
}

/// Sets interpreter `id`'s limit on its live bytes in its mem, object and
/// raw heaps (`limit` < 0: none). Returns 0, or -1 with a message in `err`
/// (unknown or ended interpreter, or the allocator does not serve mem and
/// object here). Nothing changes on failure.
///
/// # Safety
///
/// `err` is NULL or points to `err_len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn interheap_allocator_set_limit(
    id: i64,
    limit: i64,
    err: *mut c_char,
    err_len: usize,
) -> c_int {
    // SAFETY: per the contract.
    unsafe { status(allocator::set_limit(id, limit_from_c(limit)), err, err_len) }
}

/// Interpreter `id`'s limit in bytes; -1 if it has none, -2 if it has no heaps.
#[no_mangle]
pub extern "C" fn interheap_allocator_get_limit(id: i64) -> i64 {
    match allocator::budget(id) {
        None => -2,
        Some(b) => b.limit.map_or(-1, |l| l.min(i64::MAX as u64) as i64),
    }
}

/// Gives every interpreter with an ID of at least `from_id`, whose own limit
/// is never set, a limit of `limit` bytes once it is created (`limit` < 0:
/// no default). Returns 0, or -1 with a message in `err`.
///
/// # Safety
///
/// `err` is NULL or points to `err_len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn interheap_allocator_set_default_limit(
    limit: i64,
    from_id: i64,
    err: *mut c_char,
    err_len: usize,
) -> c_int {
    // SAFETY: per the contract.
    unsafe { status(allocator::set_default_limit(limit_from_c(limit), from_id), err, err_len) }
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

/// Whether the allocator runs its checking layer (`INTERHEAP_CHECK=1`:
/// buffer overruns and uses after free in the mem and object domains).
#[no_mangle]
pub extern "C" fn interheap_allocator_checks_on() -> c_uint {
    crate::allocator_check::is_on() as c_uint
}

/// Sends the checking layer's findings to `sink` (NULL: back to this
/// library's own checker): `kind` is an index into the engine's
/// `FindingKind::ALL`, `domain` into `Domain::ALL`, `note` a NUL-terminated
/// UTF-8 string valid during the call. The sink runs inside an allocator
/// call, on the thread that made it.
#[no_mangle]
pub extern "C" fn interheap_allocator_check_sink(sink: Option<crate::allocator_check::FindingSink>) {
    crate::allocator_check::set_sink(sink);
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

/// Interpreter `id`'s figures in the allocator: 0, or -1 if the allocator
/// does not serve mem and object here, -2 if the interpreter has no heaps.
///
/// # Safety
///
/// `out` points to a writable `interheap_interp_figures`.
#[no_mangle]
pub unsafe extern "C" fn interheap_allocator_interp_figures(id: i64, out: *mut InterpFigures) -> c_int {
    if !allocator::serves_interpreters() {
        return -1;
    }
    let Some((live, budget)) = allocator::interpreter_figures(id) else { return -2 };
    // SAFETY: `out` is writable, per the contract.
    unsafe { out.write(InterpFigures::new(live, &budget)) };
    0
}

/// Lowers interpreter `id`'s limit to `limit` bytes: 0; 1 (nothing changed)
/// if that would raise it; -1 with a message in `err` otherwise.
///
/// # Safety
///
/// `err` is NULL or points to `err_len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn interheap_allocator_lower_limit(
    id: i64,
    limit: u64,
    err: *mut c_char,
    err_len: usize,
) -> c_int {
    match allocator::lower_limit(id, limit) {
        Ok(true) => 0,
        Ok(false) => 1,
        // SAFETY: per the contract.
        Err(e) => unsafe { status(Err::<(), _>(e), err, err_len) },
    }
}

/// The figures of every interpreter, and of calls without a thread state,
/// from the allocator's heaps (`crate::heap_figures`): for interheap's
/// Python module, which has its own copy of this crate (the same
/// `FiguresRecord` layout; `record_size` is checked). Writes up to
/// `capacity` records to `out` and returns how many there are (call again
/// with more room if that is more than `capacity`); -1 if the allocator
/// cannot give them (it does not serve every domain or its heaps do not
/// keep requested sizes) or `record_size` is not this library's.
///
/// # Safety
///
/// `out` points to `capacity` writable records (may be NULL if `capacity` is 0).
#[no_mangle]
pub unsafe extern "C" fn interheap_allocator_figures(
    out: *mut crate::heap_figures::FiguresRecord,
    capacity: usize,
    record_size: usize,
) -> isize {
    if record_size != std::mem::size_of::<crate::heap_figures::FiguresRecord>() {
        return -1;
    }
    let Some(records) = allocator::figures_records() else { return -1 };
    let n = records.len().min(capacity);
    if n > 0 {
        // SAFETY: `out` has room for `capacity >= n` records, per the contract.
        unsafe { ptr::copy_nonoverlapping(records.as_ptr(), out, n) };
    }
    records.len() as isize
}
