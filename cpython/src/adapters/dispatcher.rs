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
        adapter::register_fork_handlers();
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

/// Takes every dispatcher lock (the adapters' `fork()` prepare handler calls
/// this after taking the gates' locks: one order for every lock).
pub(crate) fn lock_all_for_fork() {
    each_dispatcher(|d| d.lock_for_fork());
}

/// Releases them in the parent.
pub(crate) fn unlock_all_after_fork() {
    each_dispatcher(|d| d.unlock_after_fork());
}

/// Frees them in the child.
///
/// # Safety
/// Only in a fork child (one thread).
pub(crate) unsafe fn reset_all_in_fork_child() {
    // SAFETY: the caller is the child's only thread.
    each_dispatcher(|d| unsafe { d.reset_in_fork_child() });
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

#[cfg(test)]
mod tests {
    //! The dispatcher's routing and figures, driven directly with call
    //! contexts (no Python): the `install` path is tested from C.
    use super::*;
    use std::alloc::{alloc, dealloc, Layout};
    use std::sync::atomic::AtomicI64;
    use std::sync::Arc;

    /// A non-thread-safe instance: counts its blocks, detects overlapping calls.
    struct Counting {
        out: i64,
        inside: Arc<AtomicUsize>,
        overlaps: Arc<AtomicUsize>,
        dropped: Arc<AtomicI64>,
    }

    impl Counting {
        fn enter(&self) {
            if self.inside.fetch_add(1, Relaxed) != 0 {
                self.overlaps.fetch_add(1, Relaxed);
            }
        }
        fn leave(&self) {
            self.inside.fetch_sub(1, Relaxed);
        }
    }

    impl Instance for Counting {
        fn malloc(&mut self, size: usize) -> *mut c_void {
            self.enter();
            // SAFETY: non-zero size (HEADER included), valid alignment.
            let p = unsafe { alloc(Layout::from_size_align(size, 16).unwrap()) } as *mut c_void;
            self.out += 1;
            self.leave();
            p
        }
        unsafe fn free(&mut self, ptr: *mut c_void, size: usize) {
            self.enter();
            // SAFETY: allocated by `malloc` with this size.
            unsafe { dealloc(ptr as *mut u8, Layout::from_size_align(size, 16).unwrap()) };
            self.out -= 1;
            self.leave();
        }
    }

    impl Drop for Counting {
        fn drop(&mut self) {
            self.dropped.fetch_add(1, Relaxed);
        }
    }

    #[derive(Default)]
    struct Factory {
        created: AtomicU64,
        dropped: Arc<AtomicI64>,
        overlaps: Arc<AtomicUsize>,
    }

    impl InstanceFactory for Arc<Factory> {
        type Instance = Counting;
        fn create(&self, _cx: &CallContext) -> Option<Counting> {
            self.created.fetch_add(1, Relaxed);
            Some(Counting {
                out: 0,
                inside: Arc::new(AtomicUsize::new(0)),
                overlaps: Arc::clone(&self.overlaps),
                dropped: Arc::clone(&self.dropped),
            })
        }
    }

    fn cx(interpreter: Option<i64>, domain: Domain) -> CallContext {
        CallContext { interpreter, domain, own_gil: None, own_obmalloc: None }
    }

    fn figures(d: &Dispatcher<Arc<Factory>>, interp: Option<i64>) -> InstanceStats {
        d.instances().into_iter().find(|s| s.interpreter == interp).unwrap()
    }

    #[test]
    fn routes_frees_to_the_owner_and_releases_after_end() {
        let factory = Arc::new(Factory::default());
        let d = Dispatcher::new(Arc::clone(&factory));
        let (main, sub) = (cx(Some(0), Domain::Mem), cx(Some(1), Domain::Mem));
        let a = d.allocate(&main, 100, false);
        let b = d.allocate(&sub, 40, true);
        // SAFETY: `b` holds 40 zeroed bytes.
        assert!(unsafe { std::slice::from_raw_parts(b as *const u8, 40) }.iter().all(|&x| x == 0));
        assert_eq!(a as usize % 16, 0);
        // Interpreter 1 frees main's block: it goes back to main's instance.
        d.release_block(&sub, a);
        let m = figures(d, Some(0)).domains[Domain::Mem.index()];
        assert_eq!((m.allocations, m.frees, m.cross_frees, m.live_blocks, m.live_bytes), (1, 1, 1, 0, 0));
        // Ending interpreter 1 keeps its instance while it holds a block...
        let ended = d.end_interpreter(1).unwrap();
        assert!(ended.ended && !ended.released && ended.live_blocks() == 1 && ended.live_bytes() == 40);
        assert_eq!(factory.dropped.load(Relaxed), 0);
        // ...and releases it when main frees that block.
        d.release_block(&main, b);
        let s = figures(d, Some(1));
        assert!(s.released && s.live_blocks() == 0);
        assert_eq!(s.domains[Domain::Mem.index()].cross_frees, 1);
        assert_eq!(factory.dropped.load(Relaxed), 1);
        assert_eq!(d.releases(), 1);
        assert!(d.end_interpreter(7).is_none());
    }

    #[test]
    fn realloc_in_place_or_moves_to_the_caller() {
        let factory = Arc::new(Factory::default());
        let d = Dispatcher::new(Arc::clone(&factory));
        let (main, sub) = (cx(Some(0), Domain::Object), cx(Some(2), Domain::Object));
        let p = d.resize(&main, std::ptr::null_mut(), 8);
        // SAFETY: `p` holds 8 bytes.
        unsafe { std::ptr::copy_nonoverlapping(b"abcdefgh".as_ptr(), p as *mut u8, 8) };
        let p = d.resize(&main, p, 64);
        let m = figures(d, Some(0)).domains[Domain::Object.index()];
        assert_eq!((m.allocations, m.reallocations, m.live_bytes), (1, 1, 64));
        // Another interpreter resizes it: the block moves to its instance.
        let q = d.resize(&sub, p, 4);
        // SAFETY: `q` holds 4 bytes, copied from the old block.
        assert_eq!(unsafe { std::slice::from_raw_parts(q as *const u8, 4) }, b"abcd");
        let m = figures(d, Some(0)).domains[Domain::Object.index()];
        let s = figures(d, Some(2)).domains[Domain::Object.index()];
        assert_eq!((m.live_blocks, m.frees, m.cross_frees), (0, 1, 1));
        assert_eq!((s.live_blocks, s.live_bytes, s.allocations), (1, 4, 1));
        d.release_block(&sub, q);
        // calloc overflow is refused by the trampoline; size + HEADER overflow here.
        assert!(d.allocate(&main, usize::MAX - 4, false).is_null());
        assert_eq!(figures(d, Some(0)).domains[Domain::Object.index()].failures, 1);
    }

    /// Four "interpreters" in parallel threads, each allocating and freeing
    /// in its instance and freeing blocks handed over by its neighbour.
    /// Instances are not thread-safe: the dispatcher must serialise each.
    #[test]
    fn parallel_interpreters_exact_per_instance() {
        const THREADS: i64 = 4;
        const ROUNDS: usize = 20_000;
        let factory = Arc::new(Factory::default());
        let d = Dispatcher::new(Arc::clone(&factory));
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..THREADS).map(|_| std::sync::mpsc::channel::<usize>()).unzip();
        let sent_all = std::sync::Barrier::new(THREADS as usize);
        std::thread::scope(|scope| {
            for (t, rx) in rxs.into_iter().enumerate() {
                let next = txs[(t + 1) % THREADS as usize].clone();
                let sent_all = &sent_all;
                scope.spawn(move || {
                    let me = cx(Some(t as i64), Domain::Mem);
                    let mut mine = Vec::new();
                    for i in 0..ROUNDS {
                        let p = d.allocate(&me, 16 + i % 300, false);
                        if i % 4 == 0 {
                            next.send(p as usize).unwrap();
                        } else {
                            mine.push(p);
                        }
                        if mine.len() > 64 {
                            d.release_block(&me, mine.swap_remove(i % 64));
                        }
                        while let Ok(theirs) = rx.try_recv() {
                            d.release_block(&me, theirs as *mut c_void);
                        }
                    }
                    for p in mine {
                        d.release_block(&me, p);
                    }
                    sent_all.wait();
                    while let Ok(theirs) = rx.try_recv() {
                        d.release_block(&me, theirs as *mut c_void);
                    }
                });
            }
            drop(txs);
        });
        assert_eq!(factory.overlaps.load(Relaxed), 0);
        assert_eq!(factory.created.load(Relaxed), THREADS as u64);
        for s in d.instances() {
            let f = s.domains[Domain::Mem.index()];
            // Every block freed, every fourth one by the neighbour.
            assert_eq!(
                (f.allocations, f.frees, f.live_blocks, f.live_bytes),
                (ROUNDS as u64, ROUNDS as u64, 0, 0)
            );
            assert_eq!(f.cross_frees, (ROUNDS as u64).div_ceil(4));
        }
    }
}
