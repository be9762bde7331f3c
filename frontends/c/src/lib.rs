//! `libinterheap`: the C ABI declared in `include/interheap.h`, for C and C++
//! programs that embed CPython.
//!
//! A thin layer over `interheap_cpython::adapters`: it checks pointers,
//! turns errors into `interheap_status` codes plus a per-thread message, and
//! converts figures into the header's structs. Nothing here unwinds into C:
//! the functions only call code that does not panic on valid input, and the
//! crate is built with the workspace's release profile.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_uint, CStr, CString};

use interheap_cpython::adapters::{
    self,
    c_abi::{self, InterheapAwareAllocator, InterheapInstanceAllocator},
    AdapterError, AdapterStats, Dispatcher, InstanceStats, Kind, Mode, Options,
};
use interheap_engine::Domain;
use pyo3_ffi::PyMemAllocatorEx;

/// `INTERHEAP_THREAD_SAFE`.
pub const THREAD_SAFE: c_uint = 0x1;
/// `INTERHEAP_OWNS_MEMORY`.
pub const OWNS_MEMORY: c_uint = 0x2;

const OK: c_int = 0;
const ERR_INVALID: c_int = 1;
const ERR_UNKNOWN: c_int = 4;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(message: &str) {
    let c = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

fn status(e: &AdapterError) -> c_int {
    match e {
        AdapterError::Invalid(_) => ERR_INVALID,
        AdapterError::AfterInit(_) => 2,
        AdapterError::FreeThreaded(_) => 3,
        AdapterError::Unknown(_) => ERR_UNKNOWN,
        AdapterError::OwnsMemory(_) => 5,
        AdapterError::NotInstalled(_) => 6,
        AdapterError::NotOnTop(..) => 7,
        AdapterError::TooMany => 8,
    }
}

fn fail(e: AdapterError) -> c_int {
    set_error(&e.to_string());
    status(&e)
}

fn done(result: Result<u64, AdapterError>, id_out: *mut u64) -> c_int {
    match result {
        Ok(id) => {
            set_error("");
            if !id_out.is_null() {
                // SAFETY: the caller passes NULL or a writable interheap_adapter_id.
                unsafe { id_out.write(id) };
            }
            OK
        }
        Err(e) => fail(e),
    }
}

/// Domains arrive as plain ints (a C enum may hold any value; a Rust enum
/// parameter may not), and are checked here.
fn domain(d: c_int) -> Result<Domain, AdapterError> {
    c_abi::domain_from_c(d)
}

fn options(flags: c_uint) -> Result<Options, AdapterError> {
    if flags & !(THREAD_SAFE | OWNS_MEMORY) != 0 {
        return Err(AdapterError::Invalid(format!("unknown flags {flags:#x}")));
    }
    Ok(Options { thread_safe: flags & THREAD_SAFE != 0, owns_memory: flags & OWNS_MEMORY != 0 })
}

fn name_of(name: *const c_char, default: &str) -> String {
    if name.is_null() {
        default.to_owned()
    } else {
        // SAFETY: the caller passes NULL or a NUL-terminated string.
        unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned()
    }
}

/// `interheap_last_error`.
#[no_mangle]
pub extern "C" fn interheap_last_error() -> *const c_char {
    // The CString lives in this thread's slot until the next call replaces it.
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// `interheap_status_name`.
#[no_mangle]
pub extern "C" fn interheap_status_name(status: c_int) -> *const c_char {
    let name: &'static CStr = match status {
        0 => c"INTERHEAP_OK",
        1 => c"INTERHEAP_ERR_INVALID",
        2 => c"INTERHEAP_ERR_AFTER_INIT",
        3 => c"INTERHEAP_ERR_FREE_THREADED",
        4 => c"INTERHEAP_ERR_UNKNOWN",
        5 => c"INTERHEAP_ERR_OWNS_MEMORY",
        6 => c"INTERHEAP_ERR_NOT_INSTALLED",
        7 => c"INTERHEAP_ERR_NOT_ON_TOP",
        8 => c"INTERHEAP_ERR_TOO_MANY",
        _ => c"INTERHEAP_UNKNOWN_STATUS",
    };
    name.as_ptr()
}

/// `interheap_install`.
///
/// # Safety
/// `allocator` is NULL or a valid `PyMemAllocatorEx`; `name` is NULL or a C
/// string; `id_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn interheap_install(
    domain_: c_int,
    allocator: *const PyMemAllocatorEx,
    flags: c_uint,
    name: *const c_char,
    id_out: *mut u64,
) -> c_int {
    if allocator.is_null() {
        return fail(AdapterError::Invalid("allocator is NULL".into()));
    }
    let result = (|| {
        let d = domain(domain_)?;
        let label = name_of(name, &format!("legacy {}", d.name()));
        // SAFETY: non-NULL, and valid per the caller's contract.
        adapters::install_legacy(d, unsafe { &*allocator }, options(flags)?, &label)
    })();
    done(result, id_out)
}

/// `interheap_uninstall`.
#[no_mangle]
pub extern "C" fn interheap_uninstall(id: u64) -> c_int {
    match adapters::uninstall(id) {
        Ok(()) => {
            set_error("");
            OK
        }
        Err(e) => fail(e),
    }
}

/// `interheap_adapter_stats` (the header's struct).
#[repr(C)]
pub struct CAdapterStats {
    id: u64,
    domain: c_int,
    kind: c_int,
    mode: c_int,
    installed: c_int,
    on_top: c_int,
    owns_memory: c_int,
    membarrier: c_int,
    calls: u64,
    lock_acquisitions: u64,
    contended_acquisitions: u64,
    has_switched: c_int,
    switched_by: i64,
}

fn c_stats(a: &AdapterStats) -> CAdapterStats {
    CAdapterStats {
        id: a.id,
        domain: a.domain as c_int,
        kind: match a.kind {
            Kind::Legacy => 0,
            Kind::InterpreterAware => 1,
            Kind::Dispatcher => 2,
        },
        mode: match a.mode {
            Mode::Unlocked => 0,
            Mode::Draining => 1,
            Mode::Locked => 2,
            Mode::ThreadSafe => 3,
        },
        installed: a.installed.into(),
        on_top: a.on_top.into(),
        owns_memory: a.owns_memory.into(),
        membarrier: a.membarrier.into(),
        calls: a.gate.calls,
        lock_acquisitions: a.gate.lock_acquisitions,
        contended_acquisitions: a.gate.contended_acquisitions,
        has_switched: a.gate.switched_by.is_some().into(),
        switched_by: a.gate.switched_by.unwrap_or(i64::MIN),
    }
}

/// `interheap_adapter_stats_get`.
///
/// # Safety
/// `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn interheap_adapter_stats_get(id: u64, out: *mut CAdapterStats) -> c_int {
    if out.is_null() {
        return fail(AdapterError::Invalid("out is NULL".into()));
    }
    match adapters::stats(id) {
        Ok(a) => {
            // SAFETY: non-NULL and writable per the caller's contract.
            unsafe { out.write(c_stats(&a)) };
            OK
        }
        Err(e) => fail(e),
    }
}

/// `interheap_install_aware`.
///
/// # Safety
/// As for [`interheap_install`], with an `interheap_aware_allocator`.
#[no_mangle]
pub unsafe extern "C" fn interheap_install_aware(
    domain_: c_int,
    allocator: *const InterheapAwareAllocator,
    flags: c_uint,
    name: *const c_char,
    id_out: *mut u64,
) -> c_int {
    if allocator.is_null() {
        return fail(AdapterError::Invalid("allocator is NULL".into()));
    }
    let result = (|| {
        let d = domain(domain_)?;
        // SAFETY: non-NULL, and valid per the caller's contract.
        let aware = c_abi::CAware::new(unsafe { &*allocator })?;
        let label = name_of(name, &format!("interpreter-aware {}", d.name()));
        adapters::install_aware(d, aware, options(flags)?, &label)
    })();
    done(result, id_out)
}

/// The opaque `interheap_dispatcher`.
pub type CDispatcher = Dispatcher<c_abi::CFactory>;

/// `interheap_dispatcher_new`.
///
/// # Safety
/// `allocator` is NULL or a valid `interheap_instance_allocator`.
#[no_mangle]
pub unsafe extern "C" fn interheap_dispatcher_new(
    allocator: *const InterheapInstanceAllocator,
) -> *const CDispatcher {
    if allocator.is_null() {
        fail(AdapterError::Invalid("allocator is NULL".into()));
        return std::ptr::null();
    }
    // SAFETY: non-NULL, and valid per the caller's contract.
    match c_abi::CFactory::new(unsafe { &*allocator }) {
        Ok(factory) => Dispatcher::new(factory),
        Err(e) => {
            fail(e);
            std::ptr::null()
        }
    }
}

/// `interheap_dispatcher_install`.
///
/// # Safety
/// `d` is NULL or from [`interheap_dispatcher_new`]; `name` NULL or a C
/// string; `id_out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn interheap_dispatcher_install(
    d: *const CDispatcher,
    domain_: c_int,
    name: *const c_char,
    id_out: *mut u64,
) -> c_int {
    if d.is_null() {
        return fail(AdapterError::Invalid("dispatcher is NULL".into()));
    }
    // SAFETY: dispatchers are leaked ('static) by `Dispatcher::new`.
    let d: &'static CDispatcher = unsafe { &*d };
    let result = (|| {
        let dom = domain(domain_)?;
        d.install(dom, &name_of(name, &format!("dispatcher {}", dom.name())))
    })();
    done(result, id_out)
}

/// `interheap_domain_figures`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct CDomainFigures {
    live_bytes: u64,
    live_blocks: u64,
    allocations: u64,
    frees: u64,
    reallocations: u64,
    cross_frees: u64,
    failures: u64,
}

/// `interheap_instance_stats`.
#[repr(C)]
pub struct CInstanceStats {
    interpreter_id: i64,
    domains: [CDomainFigures; 3],
    ended: c_int,
    released: c_int,
    created: u64,
}

fn c_instance(s: &InstanceStats) -> CInstanceStats {
    CInstanceStats {
        interpreter_id: s.interpreter.unwrap_or(-1),
        domains: s.domains.map(|f| CDomainFigures {
            live_bytes: f.live_bytes,
            live_blocks: f.live_blocks,
            allocations: f.allocations,
            frees: f.frees,
            reallocations: f.reallocations,
            cross_frees: f.cross_frees,
            failures: f.failures,
        }),
        ended: s.ended.into(),
        released: s.released.into(),
        created: s.created,
    }
}

/// `interheap_dispatcher_end_interpreter`.
///
/// # Safety
/// `d` as for [`interheap_dispatcher_install`]; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn interheap_dispatcher_end_interpreter(
    d: *const CDispatcher,
    id: i64,
    out: *mut CInstanceStats,
) -> c_int {
    if d.is_null() {
        return fail(AdapterError::Invalid("dispatcher is NULL".into()));
    }
    // SAFETY: as in `interheap_dispatcher_install`.
    let d: &CDispatcher = unsafe { &*d };
    match d.end_interpreter(id) {
        Some(s) => {
            if !out.is_null() {
                // SAFETY: non-NULL and writable per the caller's contract.
                unsafe { out.write(c_instance(&s)) };
            }
            OK
        }
        None => {
            set_error(&format!("interpreter {id} never allocated through this dispatcher"));
            ERR_UNKNOWN
        }
    }
}

/// `interheap_dispatcher_instances`.
///
/// # Safety
/// `d` as for [`interheap_dispatcher_install`]; `out` NULL (with capacity 0)
/// or writable for `capacity` entries.
#[no_mangle]
pub unsafe extern "C" fn interheap_dispatcher_instances(
    d: *const CDispatcher,
    out: *mut CInstanceStats,
    capacity: usize,
) -> usize {
    if d.is_null() {
        fail(AdapterError::Invalid("dispatcher is NULL".into()));
        return 0;
    }
    // SAFETY: as in `interheap_dispatcher_install`.
    let d: &CDispatcher = unsafe { &*d };
    let all = d.instances();
    if !out.is_null() {
        for (i, s) in all.iter().take(capacity).enumerate() {
            // SAFETY: i < capacity, and `out` holds `capacity` entries.
            unsafe { out.add(i).write(c_instance(s)) };
        }
    }
    all.len()
}
