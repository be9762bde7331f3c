//! The per-interpreter dispatcher: one allocator instance per interpreter.
//!
//! Built on the interpreter-aware interface. The first time an interpreter
//! allocates, the dispatcher asks its [`InstanceFactory`] for a new
//! [`Instance`] and routes that interpreter's calls to it; calls without a
//! thread state go to one more instance, for "no interpreter". A free (or a
//! realloc) goes back to the instance that allocated the block, whichever
//! interpreter makes it; a realloc from another interpreter moves the block
//! to the caller's instance. After its interpreter is ended
//! ([`Dispatcher::end_interpreter`]), an instance is released (dropped) as
//! soon as it holds no block; until then its figures show what it still
//! holds, and frees keep returning blocks to it.
//!
//! Instances need not be thread-safe: each has its own [`RawLock`], held
//! for every call into it. Different interpreters' instances run in
//! parallel; the lock is contended only by cross-interpreter frees and by
//! raw or free-threaded calls of one interpreter's threads.
//!
//! # Ownership and headers
//!
//! The dispatcher owns its memory (it is a replacement allocator): it puts a
//! 16-byte header before every block, holding the owning instance's slot and
//! the requested size, so a free finds its owner in O(1) and the figures are
//! exact. It must therefore be installed before anything else allocates in
//! its domains (after `Py_PreInitialize`, before `Py_InitializeFromConfig`
//! and before building a `PyConfig`), as CPython's own debug hooks are, and
//! never for mem or object on a free-threaded build (`install` refuses).
//! Instances must return 16-byte-aligned blocks.
//!
//! # Concurrency invariants
//!
//! * A [`Slot`] (an interpreter's record) is created once, never freed and
//!   never moved; blocks and per-thread caches point to it. Its instance and
//!   figures are touched only under the slot's lock.
//! * `slots` (the ID -> slot map) is touched only under `slots_lock`.
//! * Factories and instances must not call Python's allocators (that would
//!   re-enter the dispatcher); they may use the C allocator or `mmap`.

use std::cell::{Cell, UnsafeCell};
use std::collections::HashMap;
use std::ffi::c_void;
use std::ptr::null_mut;
use std::sync::atomic::{
    AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};
use std::sync::Once;

use interheap_engine::Domain;

use super::adapter::{self, AdapterError, Backend, Kind, Options};
use super::caller::{self, CallContext};
use super::lock::RawLock;

/// Bytes the dispatcher puts before each block.
pub const HEADER: usize = 16;

/// One interpreter's allocator. Calls are serialised by the dispatcher.
pub trait Instance: Send + 'static {
    /// A block of at least `size` bytes, 16-byte aligned, or NULL.
    fn malloc(&mut self, size: usize) -> *mut c_void;
    /// Resizes a block this instance returned; NULL on failure (the block is kept).
    /// The default allocates, copies and frees.
    ///
    /// # Safety
    /// `ptr` is a live block of this instance, of `old_size` bytes.
    unsafe fn realloc(&mut self, ptr: *mut c_void, old_size: usize, size: usize) -> *mut c_void {
        let new = self.malloc(size);
        if !new.is_null() {
            // SAFETY: both blocks are at least min(old_size, size) bytes and distinct.
            unsafe { std::ptr::copy_nonoverlapping(ptr as *const u8, new as *mut u8, old_size.min(size)) };
            // SAFETY: the caller's contract.
            unsafe { self.free(ptr, old_size) };
        }
        new
    }
    /// Frees a block this instance returned (`size` is what it was asked for).
    ///
    /// # Safety
    /// `ptr` is a live block of this instance, of `size` bytes.
    unsafe fn free(&mut self, ptr: *mut c_void, size: usize);
}

/// Makes one [`Instance`] per interpreter.
pub trait InstanceFactory: Send + Sync + 'static {
    /// The instance type.
    type Instance: Instance;
    /// A new instance for the interpreter in `cx` (`cx.domain` is the domain
    /// of the call that needed it). `None` makes that call fail (NULL).
    fn create(&self, cx: &CallContext) -> Option<Self::Instance>;
}

/// One domain's figures in one instance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DomainFigures {
    /// Bytes the instance's blocks hold now (as requested by callers).
    pub live_bytes: u64,
    /// Blocks it holds now.
    pub live_blocks: u64,
    /// Blocks allocated (malloc, calloc, realloc(NULL) and moves into it).
    pub allocations: u64,
    /// Blocks freed (including moves out of it).
    pub frees: u64,
    /// Resizes in place.
    pub reallocations: u64,
    /// Of `frees`, those made by another interpreter (or without one).
    pub cross_frees: u64,
    /// Calls that returned NULL.
    pub failures: u64,
}

/// An instance's figures and state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceStats {
    /// The interpreter (`None`: calls without a thread state).
    pub interpreter: Option<i64>,
    /// Figures per domain, indexed by `Domain::index()`.
    pub domains: [DomainFigures; Domain::COUNT],
    /// [`Dispatcher::end_interpreter`] was called for it.
    pub ended: bool,
    /// Its instance was dropped (it had ended and held nothing).
    pub released: bool,
    /// Instances created for this interpreter (1, or more if it allocated after being released).
    pub created: u64,
}

impl InstanceStats {
    /// Blocks it holds, all domains.
    pub fn live_blocks(&self) -> u64 {
        self.domains.iter().map(|d| d.live_blocks).sum()
    }
    /// Bytes it holds, all domains.
    pub fn live_bytes(&self) -> u64 {
        self.domains.iter().map(|d| d.live_bytes).sum()
    }
}

#[derive(Default)]
struct SlotState<I> {
    instance: Option<I>,
    figures: [DomainFigures; Domain::COUNT],
    ended: bool,
    released: bool,
    created: u64,
}

/// One interpreter's record. See the module docs.
pub struct Slot<I> {
    interpreter: Option<i64>,
    lock: RawLock,
    state: UnsafeCell<SlotState<I>>,
}

// SAFETY: `state` is only accessed with `lock` held (see `with`).
unsafe impl<I: Send> Sync for Slot<I> {}

impl<I> Slot<I> {
    fn with<R>(&self, f: impl FnOnce(&mut SlotState<I>) -> R) -> R {
        let how = self.lock.lock();
        // SAFETY: we hold the lock, so no other reference to the state exists.
        let r = f(unsafe { &mut *self.state.get() });
        if how != super::lock::Acquired::ByForkingThread {
            self.lock.unlock();
        }
        r
    }
}

#[repr(C)]
struct Header {
    slot: usize,
    size: usize,
}

/// See the module docs.
pub struct Dispatcher<F: InstanceFactory> {
    factory: F,
    slots_lock: RawLock,
    slots: UnsafeCell<HashMap<Option<i64>, &'static Slot<F::Instance>>>,
    order: UnsafeCell<Vec<&'static Slot<F::Instance>>>,
    installed: AtomicBool,
    releases: AtomicU64,
}

// SAFETY: `slots` and `order` are only accessed under `slots_lock`.
unsafe impl<F: InstanceFactory> Sync for Dispatcher<F> {}
// SAFETY: as above.
unsafe impl<F: InstanceFactory> Send for Dispatcher<F> {}

thread_local! {
    /// The last (dispatcher, interpreter) -> slot this thread looked up.
    static CACHE: Cell<(usize, i64, usize)> = const { Cell::new((0, i64::MIN, 0)) };
}

trait ForkSafe: Sync {
    fn lock_for_fork(&self);
    fn unlock_after_fork(&self);
    /// # Safety
    /// Only in a fork child (one thread).
    unsafe fn reset_in_fork_child(&self);
}

const MAX_DISPATCHERS: usize = 64;
static DISPATCHERS: [AtomicPtr<()>; MAX_DISPATCHERS] =
    [const { AtomicPtr::new(null_mut()) }; MAX_DISPATCHERS];
static DISPATCHER_FNS: [AtomicUsize; MAX_DISPATCHERS] = [const { AtomicUsize::new(0) }; MAX_DISPATCHERS];
static DISPATCHER_COUNT: AtomicUsize = AtomicUsize::new(0);

impl<F: InstanceFactory> Dispatcher<F> {
    /// A new dispatcher (leaked: it lives as long as the process).
    pub fn new(factory: F) -> &'static Dispatcher<F> {
        let d: &'static Dispatcher<F> = Box::leak(Box::new(Dispatcher {
            factory,
            slots_lock: RawLock::new(),
            slots: UnsafeCell::new(HashMap::new()),
            order: UnsafeCell::new(Vec::new()),
            installed: AtomicBool::new(false),
            releases: AtomicU64::new(0),
        }));
        d.register_for_fork();
        d
    }

    /// Installs the dispatcher for `domain` (before `Py_Initialize`; see the
    /// module docs). One dispatcher can serve several domains: an
    /// interpreter's instance then serves all of them. Returns the adapter ID.
    pub fn install(&'static self, domain: Domain, name: &str) -> Result<u64, AdapterError> {
        let options = Options { thread_safe: true, owns_memory: true };
        let id = adapter::install(domain, DispatcherBackend(self), options, Kind::Dispatcher, name)?;
        self.installed.store(true, Relaxed);
        Ok(id)
    }

    fn with_slots<R>(
        &self,
        f: impl FnOnce(
            &mut HashMap<Option<i64>, &'static Slot<F::Instance>>,
            &mut Vec<&'static Slot<F::Instance>>,
        ) -> R,
    ) -> R {
        let how = self.slots_lock.lock();
        // SAFETY: we hold slots_lock.
        let r = f(unsafe { &mut *self.slots.get() }, unsafe { &mut *self.order.get() });
        if how != super::lock::Acquired::ByForkingThread {
            self.slots_lock.unlock();
        }
        r
    }

    fn slot(&self, interpreter: Option<i64>) -> &'static Slot<F::Instance> {
        let key = interpreter.unwrap_or(-1);
        let me = self as *const Self as usize;
        let (d, id, slot) = CACHE.with(Cell::get);
        if d == me && id == key {
            // SAFETY: the cache only holds slots of this dispatcher, which are never freed.
            return unsafe { &*(slot as *const Slot<F::Instance>) };
        }
        let slot = self.with_slots(|slots, order| {
            *slots.entry(interpreter).or_insert_with(|| {
                let s: &'static Slot<F::Instance> = Box::leak(Box::new(Slot {
                    interpreter,
                    lock: RawLock::new(),
                    state: UnsafeCell::new(SlotState {
                        instance: None,
                        figures: Default::default(),
                        ended: false,
                        released: false,
                        created: 0,
                    }),
                }));
                order.push(s);
                s
            })
        });
        CACHE.with(|c| c.set((me, key, slot as *const _ as usize)));
        slot
    }

    fn header(ptr: *mut c_void) -> *mut Header {
        (ptr as *mut u8).wrapping_sub(HEADER) as *mut Header
    }

    /// Allocates `size` bytes in the instance of `cx`'s interpreter.
    fn allocate(&self, cx: &CallContext, size: usize, zero: bool) -> *mut c_void {
        let d = cx.domain.index();
        let Some(total) = size.checked_add(HEADER) else {
            return self.slot(cx.interpreter).with(|s| {
                s.figures[d].failures += 1;
                null_mut()
            });
        };
        let slot = self.slot(cx.interpreter);
        let raw = slot.with(|s| {
            if s.instance.is_none() {
                s.instance = self.factory.create(cx);
                if s.instance.is_some() {
                    s.created += 1;
                    s.released = false;
                }
            }
            let raw = s.instance.as_mut().map_or(null_mut(), |i| i.malloc(total));
            let f = &mut s.figures[d];
            if raw.is_null() {
                f.failures += 1;
            } else {
                f.allocations += 1;
                f.live_blocks += 1;
                f.live_bytes += size as u64;
            }
            raw
        });
        if raw.is_null() {
            return null_mut();
        }
        let header = raw as *mut Header;
        // SAFETY: the instance returned at least HEADER + size bytes, 16-aligned.
        unsafe { header.write(Header { slot: slot as *const _ as usize, size }) };
        let block = (raw as *mut u8).wrapping_add(HEADER) as *mut c_void;
        if zero {
            // SAFETY: the block has `size` writable bytes.
            unsafe { std::ptr::write_bytes(block as *mut u8, 0, size) };
        }
        block
    }

    /// Frees `ptr` in its owner's instance.
    fn release_block(&self, cx: &CallContext, ptr: *mut c_void) {
        if ptr.is_null() {
            return;
        }
        let header = Self::header(ptr);
        // SAFETY: every block of this domain came from `allocate` (module docs),
        // which wrote this header.
        let Header { slot, size } = unsafe { header.read() };
        // SAFETY: the header holds a slot of this dispatcher; slots are never freed.
        let owner = unsafe { &*(slot as *const Slot<F::Instance>) };
        let d = cx.domain.index();
        let cross = owner.interpreter != cx.interpreter;
        let released = owner.with(|s| {
            if let Some(instance) = s.instance.as_mut() {
                // SAFETY: the block (header included) came from this instance.
                unsafe { instance.free(header as *mut c_void, size + HEADER) };
            }
            let f = &mut s.figures[d];
            f.frees += 1;
            f.live_blocks -= 1;
            f.live_bytes -= size as u64;
            if cross {
                f.cross_frees += 1;
            }
            Self::release_if_done(s)
        });
        if released {
            self.releases.fetch_add(1, Relaxed);
        }
    }

    fn release_if_done(s: &mut SlotState<F::Instance>) -> bool {
        if s.ended && !s.released && s.figures.iter().all(|f| f.live_blocks == 0) {
            s.instance = None;
            s.released = true;
            return true;
        }
        false
    }

    fn resize(&self, cx: &CallContext, ptr: *mut c_void, size: usize) -> *mut c_void {
        if ptr.is_null() {
            return self.allocate(cx, size, false);
        }
        let header = Self::header(ptr);
        // SAFETY: as in `release_block`.
        let Header { slot, size: old } = unsafe { header.read() };
        // SAFETY: as in `release_block`.
        let owner = unsafe { &*(slot as *const Slot<F::Instance>) };
        let d = cx.domain.index();
        if owner.interpreter == cx.interpreter {
            let Some(total) = size.checked_add(HEADER) else { return null_mut() };
            let raw = owner.with(|s| {
                let raw = s.instance.as_mut().map_or(null_mut(), |i| {
                    // SAFETY: the block (header included) came from this instance.
                    unsafe { i.realloc(header as *mut c_void, old + HEADER, total) }
                });
                let f = &mut s.figures[d];
                if raw.is_null() {
                    f.failures += 1;
                } else {
                    f.reallocations += 1;
                    f.live_bytes = f.live_bytes - old as u64 + size as u64;
                }
                raw
            });
            if raw.is_null() {
                return null_mut();
            }
            // SAFETY: the instance returned HEADER + size bytes; the header moved with the block.
            unsafe { (raw as *mut Header).write(Header { slot, size }) };
            return (raw as *mut u8).wrapping_add(HEADER) as *mut c_void;
        }
        // Another interpreter's block: move it into the caller's instance.
        let new = self.allocate(cx, size, false);
        if !new.is_null() {
            // SAFETY: both blocks hold at least min(old, size) bytes and are distinct.
            unsafe { std::ptr::copy_nonoverlapping(ptr as *const u8, new as *mut u8, old.min(size)) };
            self.release_block(cx, ptr);
        }
        new
    }

    /// Marks interpreter `id` as ended (call after `Py_EndInterpreter`). Its
    /// instance is released now if it holds nothing, or as soon as its last
    /// block is freed. Returns its figures (what it still holds), or `None`
    /// if the interpreter never allocated through this dispatcher.
    pub fn end_interpreter(&self, id: i64) -> Option<InstanceStats> {
        let slot = self.with_slots(|slots, _| slots.get(&Some(id)).copied())?;
        let released = slot.with(|s| {
            s.ended = true;
            Self::release_if_done(s)
        });
        if released {
            self.releases.fetch_add(1, Relaxed);
        }
        Some(Self::slot_stats(slot))
    }

    fn slot_stats(slot: &Slot<F::Instance>) -> InstanceStats {
        slot.with(|s| InstanceStats {
            interpreter: slot.interpreter,
            domains: s.figures,
            ended: s.ended,
            released: s.released,
            created: s.created,
        })
    }

    /// Every instance's figures, in the order interpreters first allocated.
    pub fn instances(&self) -> Vec<InstanceStats> {
        let order: Vec<&'static Slot<F::Instance>> = self.with_slots(|_, order| order.clone());
        order.into_iter().map(Self::slot_stats).collect()
    }

    /// How many instances have been released.
    pub fn releases(&self) -> u64 {
        self.releases.load(Relaxed)
    }

    fn register_for_fork(&'static self) {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            // SAFETY: static extern "C" handlers without arguments.
            unsafe {
                libc::pthread_atfork(
                    Some(dispatchers_before_fork),
                    Some(dispatchers_after_fork_parent),
                    Some(dispatchers_after_fork_child),
                )
            };
        });
        let n = DISPATCHER_COUNT.load(Relaxed);
        if n < MAX_DISPATCHERS {
            let obj: &'static dyn ForkSafe = self;
            // Store the fat pointer as its two words.
            // SAFETY: a `&dyn` is two pointer-sized words; we split and rejoin it unchanged.
            let (data, vtable) = unsafe { std::mem::transmute::<&'static dyn ForkSafe, (usize, usize)>(obj) };
            DISPATCHER_FNS[n].store(vtable, Relaxed);
            DISPATCHERS[n].store(data as *mut (), Release);
            DISPATCHER_COUNT.store(n + 1, Release);
        }
    }
}

impl<F: InstanceFactory> ForkSafe for Dispatcher<F> {
    fn lock_for_fork(&self) {
        self.slots_lock.lock_for_fork();
        // SAFETY: we hold slots_lock.
        for s in unsafe { &*self.order.get() } {
            s.lock.lock_for_fork();
        }
    }
    fn unlock_after_fork(&self) {
        // SAFETY: this thread holds slots_lock since `lock_for_fork`.
        for s in unsafe { &*self.order.get() } {
            s.lock.unlock_after_fork();
        }
        self.slots_lock.unlock_after_fork();
    }
    unsafe fn reset_in_fork_child(&self) {
        // SAFETY: the child has one thread, which took every lock.
        unsafe {
            for s in &*self.order.get() {
                s.lock.reset_in_fork_child();
            }
            self.slots_lock.reset_in_fork_child();
        }
    }
}

fn each_dispatcher(f: impl Fn(&dyn ForkSafe)) {
    let n = DISPATCHER_COUNT.load(Acquire);
    for i in 0..n {
        let data = DISPATCHERS[i].load(Acquire) as usize;
        let vtable = DISPATCHER_FNS[i].load(Relaxed);
        // SAFETY: the two words were split from a `&'static dyn ForkSafe` in `register_for_fork`.
        let obj = unsafe { std::mem::transmute::<(usize, usize), &'static dyn ForkSafe>((data, vtable)) };
        f(obj);
    }
}

extern "C" fn dispatchers_before_fork() {
    super::lock::set_forking(true);
    each_dispatcher(|d| d.lock_for_fork());
}

extern "C" fn dispatchers_after_fork_parent() {
    each_dispatcher(|d| d.unlock_after_fork());
    super::lock::set_forking(false);
}

extern "C" fn dispatchers_after_fork_child() {
    // SAFETY: the child's only thread.
    each_dispatcher(|d| unsafe { d.reset_in_fork_child() });
    super::lock::set_forking(false);
}

/// The dispatcher as an adapter backend.
struct DispatcherBackend<F: InstanceFactory>(&'static Dispatcher<F>);

impl<F: InstanceFactory> Backend for DispatcherBackend<F> {
    fn malloc(&self, domain: Domain, size: usize) -> *mut c_void {
        self.0.allocate(&caller::context(domain), size, false)
    }
    fn calloc(&self, domain: Domain, nelem: usize, elsize: usize) -> *mut c_void {
        // The trampoline has checked the product.
        self.0.allocate(&caller::context(domain), nelem.wrapping_mul(elsize), true)
    }
    unsafe fn realloc(&self, domain: Domain, ptr: *mut c_void, size: usize) -> *mut c_void {
        self.0.resize(&caller::context(domain), ptr, size)
    }
    unsafe fn free(&self, domain: Domain, ptr: *mut c_void) {
        self.0.release_block(&caller::context(domain), ptr)
    }
}
