//! The C ABI of the interpreter-aware interface (`include/interheap.h`):
//! `#[repr(C)]` mirrors of its structs and their adapters to the Rust traits.
//! Shared by the C library (`frontends/c`) and the Python module.

use std::ffi::{c_int, c_void};
use std::ptr::null_mut;

use interheap_engine::Domain;

use super::adapter::{AdapterError, InterpreterAware};
use super::caller::CallContext;
use super::dispatcher::{Instance, InstanceFactory};

/// `interheap_context`: what every interpreter-aware call receives.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterheapContext {
    /// The calling interpreter's ID, or -1 without a thread state.
    pub interpreter_id: i64,
    /// `PyMemAllocatorDomain` of the call (0 raw, 1 mem, 2 object).
    pub domain: c_int,
    /// 1: the interpreter has its own GIL; 0: it shares the main GIL; -1: unknown.
    pub own_gil: c_int,
    /// 1: its own object-allocator state; 0: the main interpreter's; -1: unknown.
    pub own_obmalloc: c_int,
}

fn tri(v: Option<bool>) -> c_int {
    match v {
        Some(true) => 1,
        Some(false) => 0,
        None => -1,
    }
}

impl From<&CallContext> for InterheapContext {
    fn from(cx: &CallContext) -> Self {
        InterheapContext {
            interpreter_id: cx.interpreter.unwrap_or(-1),
            domain: cx.domain as c_int,
            own_gil: tri(cx.own_gil),
            own_obmalloc: tri(cx.own_obmalloc),
        }
    }
}

/// `interheap_aware_allocator`: an interpreter-aware allocator in C.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct InterheapAwareAllocator {
    /// Passed back as each function's first argument.
    pub ctx: *mut c_void,
    /// `malloc(ctx, cx, size)`.
    pub malloc: Option<unsafe extern "C" fn(*mut c_void, *const InterheapContext, usize) -> *mut c_void>,
    /// `calloc(ctx, cx, nelem, elsize)`.
    pub calloc:
        Option<unsafe extern "C" fn(*mut c_void, *const InterheapContext, usize, usize) -> *mut c_void>,
    /// `realloc(ctx, cx, ptr, size)`.
    pub realloc:
        Option<unsafe extern "C" fn(*mut c_void, *const InterheapContext, *mut c_void, usize) -> *mut c_void>,
    /// `free(ctx, cx, ptr)`.
    pub free: Option<unsafe extern "C" fn(*mut c_void, *const InterheapContext, *mut c_void)>,
}

/// A checked [`InterheapAwareAllocator`] (every function present).
pub struct CAware {
    a: InterheapAwareAllocator,
}

// SAFETY: plain data; the gate decides how calls may overlap, as the
// installer asked (serialised unless declared thread-safe).
unsafe impl Send for CAware {}
// SAFETY: as above.
unsafe impl Sync for CAware {}

impl CAware {
    /// Checks that every function is present.
    pub fn new(a: &InterheapAwareAllocator) -> Result<CAware, AdapterError> {
        let missing = |f: &str| AdapterError::Invalid(format!("interheap_aware_allocator.{f} is NULL"));
        a.malloc.ok_or_else(|| missing("malloc"))?;
        a.calloc.ok_or_else(|| missing("calloc"))?;
        a.realloc.ok_or_else(|| missing("realloc"))?;
        a.free.ok_or_else(|| missing("free"))?;
        Ok(CAware { a: *a })
    }
}

impl InterpreterAware for CAware {
    fn malloc(&self, cx: &CallContext, size: usize) -> *mut c_void {
        let c = InterheapContext::from(cx);
        // SAFETY: checked present in `new`; the installer vouched for the function.
        self.a.malloc.map_or(null_mut(), |f| unsafe { f(self.a.ctx, &c, size) })
    }
    fn calloc(&self, cx: &CallContext, nelem: usize, elsize: usize) -> *mut c_void {
        let c = InterheapContext::from(cx);
        // SAFETY: as for malloc.
        self.a.calloc.map_or(null_mut(), |f| unsafe { f(self.a.ctx, &c, nelem, elsize) })
    }
    unsafe fn realloc(&self, cx: &CallContext, ptr: *mut c_void, size: usize) -> *mut c_void {
        let c = InterheapContext::from(cx);
        // SAFETY: as for malloc.
        self.a.realloc.map_or(null_mut(), |f| unsafe { f(self.a.ctx, &c, ptr, size) })
    }
    unsafe fn free(&self, cx: &CallContext, ptr: *mut c_void) {
        let c = InterheapContext::from(cx);
        if let Some(f) = self.a.free {
            // SAFETY: as for malloc.
            unsafe { f(self.a.ctx, &c, ptr) }
        }
    }
}

/// `interheap_instance_allocator`: how the dispatcher makes and uses
/// per-interpreter instances written in C.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct InterheapInstanceAllocator {
    /// Passed back as each function's first argument.
    pub ctx: *mut c_void,
    /// A new instance for `cx`'s interpreter, or NULL.
    pub create: Option<unsafe extern "C" fn(*mut c_void, *const InterheapContext) -> *mut c_void>,
    /// Releases an instance (the dispatcher calls it once the instance's
    /// interpreter has ended and it holds no block).
    pub destroy: Option<unsafe extern "C" fn(*mut c_void, *mut c_void)>,
    /// `malloc(ctx, instance, size)`: 16-byte-aligned, or NULL.
    pub malloc: Option<unsafe extern "C" fn(*mut c_void, *mut c_void, usize) -> *mut c_void>,
    /// Optional: `realloc(ctx, instance, ptr, old_size, size)`; NULL keeps the block.
    pub realloc:
        Option<unsafe extern "C" fn(*mut c_void, *mut c_void, *mut c_void, usize, usize) -> *mut c_void>,
    /// `free(ctx, instance, ptr, size)`.
    pub free: Option<unsafe extern "C" fn(*mut c_void, *mut c_void, *mut c_void, usize)>,
}

/// A checked [`InterheapInstanceAllocator`], as a factory.
pub struct CFactory {
    a: InterheapInstanceAllocator,
}

// SAFETY: plain data; the dispatcher serialises calls per instance, and the
// header documents that `create`/`destroy` may run on any thread.
unsafe impl Send for CFactory {}
// SAFETY: as above.
unsafe impl Sync for CFactory {}

impl CFactory {
    /// Checks the required functions (`realloc` is optional).
    pub fn new(a: &InterheapInstanceAllocator) -> Result<CFactory, AdapterError> {
        let missing = |f: &str| AdapterError::Invalid(format!("interheap_instance_allocator.{f} is NULL"));
        a.create.ok_or_else(|| missing("create"))?;
        a.destroy.ok_or_else(|| missing("destroy"))?;
        a.malloc.ok_or_else(|| missing("malloc"))?;
        a.free.ok_or_else(|| missing("free"))?;
        Ok(CFactory { a: *a })
    }
}

/// One C instance.
pub struct CInstance {
    a: InterheapInstanceAllocator,
    instance: *mut c_void,
}

// SAFETY: the dispatcher hands an instance to one thread at a time (under its lock).
unsafe impl Send for CInstance {}

impl Instance for CInstance {
    fn malloc(&mut self, size: usize) -> *mut c_void {
        // SAFETY: checked present; the instance came from `create`.
        self.a.malloc.map_or(null_mut(), |f| unsafe { f(self.a.ctx, self.instance, size) })
    }
    unsafe fn realloc(&mut self, ptr: *mut c_void, old_size: usize, size: usize) -> *mut c_void {
        match self.a.realloc {
            // SAFETY: as for malloc.
            Some(f) => unsafe { f(self.a.ctx, self.instance, ptr, old_size, size) },
            None => {
                let new = self.malloc(size);
                if !new.is_null() {
                    // SAFETY: both blocks hold at least min(old_size, size) bytes.
                    unsafe {
                        std::ptr::copy_nonoverlapping(ptr as *const u8, new as *mut u8, old_size.min(size))
                    };
                    // SAFETY: `ptr` is this instance's live block (the caller's contract).
                    unsafe { self.free(ptr, old_size) };
                }
                new
            }
        }
    }
    unsafe fn free(&mut self, ptr: *mut c_void, size: usize) {
        if let Some(f) = self.a.free {
            // SAFETY: as for malloc.
            unsafe { f(self.a.ctx, self.instance, ptr, size) }
        }
    }
}

impl Drop for CInstance {
    fn drop(&mut self) {
        if let Some(f) = self.a.destroy {
            // SAFETY: checked present; each instance is destroyed once.
            unsafe { f(self.a.ctx, self.instance) }
        }
    }
}

impl InstanceFactory for CFactory {
    type Instance = CInstance;
    fn create(&self, cx: &CallContext) -> Option<CInstance> {
        let c = InterheapContext::from(cx);
        // SAFETY: checked present in `new`.
        let instance = self.a.create.map_or(null_mut(), |f| unsafe { f(self.a.ctx, &c) });
        (!instance.is_null()).then_some(CInstance { a: self.a, instance })
    }
}

/// The domain of a `PyMemAllocatorDomain` value.
pub fn domain_from_c(value: c_int) -> Result<Domain, AdapterError> {
    usize::try_from(value)
        .ok()
        .and_then(Domain::from_index)
        .ok_or_else(|| AdapterError::Invalid(format!("unknown domain {value}")))
}
