//! The atomics facade: what a protocol may do with shared memory.
//!
//! A protocol is written against a [`Memory`], never against
//! `std::sync::atomic` directly. Production code instantiates it with
//! [`Std`], which is `std::sync::atomic` itself (every method is an inlined
//! forward, so the generated code is the same as writing std by hand).
//! Model tests instantiate the same code with `Loom` (feature `loom`), whose
//! atomics, fences and spin hints are loom's: the model checker then explores
//! every interleaving and every value a weaker-than-SeqCst load may return.
//!
//! One limit of loom matters here: it treats `SeqCst` loads and stores as
//! `AcqRel` (only `SeqCst` fences are modelled as sequentially consistent).
//! So a protocol that needs a total order (a store-buffering handshake)
//! states it with `fence(SeqCst)`, which both std and loom honour.

use std::sync::atomic::Ordering;

/// An atomic cell holding a `V`: the operations every atomic type has.
pub trait Atomic<V: Copy> {
    /// A new cell holding `value`.
    fn new(value: V) -> Self;
    /// `load` with `order`.
    fn load(&self, order: Ordering) -> V;
    /// `store` with `order`.
    fn store(&self, value: V, order: Ordering);
    /// `swap` with `order`.
    fn swap(&self, value: V, order: Ordering) -> V;
    /// `compare_exchange` with the given orderings.
    fn compare_exchange(&self, current: V, new: V, success: Ordering, failure: Ordering) -> Result<V, V>;
    /// `compare_exchange_weak` with the given orderings (may fail spuriously).
    fn compare_exchange_weak(&self, current: V, new: V, success: Ordering, failure: Ordering)
        -> Result<V, V>;
}

/// An atomic integer: [`Atomic`] plus the arithmetic read-modify-writes.
pub trait AtomicInt<V: Copy>: Atomic<V> {
    /// `fetch_add` with `order` (wrapping).
    fn fetch_add(&self, value: V, order: Ordering) -> V;
    /// `fetch_sub` with `order` (wrapping).
    fn fetch_sub(&self, value: V, order: Ordering) -> V;
    /// `fetch_or` with `order`.
    fn fetch_or(&self, value: V, order: Ordering) -> V;
    /// `fetch_and` with `order`.
    fn fetch_and(&self, value: V, order: Ordering) -> V;
}

/// A family of atomics, a fence and a spin hint: std's or loom's.
pub trait Memory: 'static {
    /// An atomic pointer to `T`.
    type Ptr<T>: Atomic<*mut T>;
    /// An atomic `bool`.
    type Bool: Atomic<bool>;
    /// An atomic `u8`.
    type U8: AtomicInt<u8>;
    /// An atomic `u32`.
    type U32: AtomicInt<u32>;
    /// An atomic `u64`.
    type U64: AtomicInt<u64>;
    /// An atomic `usize`.
    type Usize: AtomicInt<usize>;
    /// An atomic `i64`.
    type I64: AtomicInt<i64>;
    /// A memory fence.
    fn fence(order: Ordering);
    /// The cheap side of an asymmetric store-load barrier: orders this
    /// thread's earlier stores before its later loads *as seen by a thread
    /// that runs [`heavy_fence`](Memory::heavy_fence)*, and only then.
    ///
    /// [`Std`]: a compiler fence (the store and the load stay in program
    /// order), valid only once [`membarrier::register`](crate::membarrier::register)
    /// succeeded, since `heavy_fence` does the hardware's part. `Loom`: a
    /// `SeqCst` fence (see `heavy_fence` for why that models it soundly).
    fn light_fence();
    /// The expensive side of the asymmetric barrier; false if it could not
    /// be run (then the light side was unprotected).
    ///
    /// [`Std`]: a `SeqCst` fence, then `membarrier(PRIVATE_EXPEDITED)`, which
    /// returns only after every thread of the process that runs on a CPU has
    /// executed a full memory barrier (threads that do not run pass through
    /// the scheduler, which is one). `Loom`, which cannot express that: a
    /// `SeqCst` fence. The model is sound for a store-load handshake (each
    /// side stores, fences, loads the other's flag), the only use: the light
    /// side's barrier (from the IPI) falls before its store, between its
    /// store and its load, or after its load. Before: the heavy side's store
    /// precedes it, so the light side's load sees that store. After: the
    /// light side's store precedes a barrier that precedes the heavy side's
    /// return, so the heavy side's load sees it. Between: exactly a fence
    /// at the light fence's place. In every case at least one side sees the
    /// other's store, which is what two `SeqCst` fences guarantee, and all
    /// that the model may assume.
    fn heavy_fence() -> bool;
    /// Called in every iteration of a wait loop: a CPU pause in production,
    /// a yield to the scheduler in a model (loom requires one, or it would
    /// explore the loop forever).
    fn spin_hint();
    /// Gives up the time slice (a wait that has spun long enough).
    fn yield_now();
}

/// Production: `std::sync::atomic`.
#[derive(Debug)]
pub enum Std {}

macro_rules! forward_atomic {
    ($cell:ty, $v:ty $(, $param:ident)?) => {
        impl$(<$param>)? Atomic<$v> for $cell {
            #[inline(always)]
            fn new(value: $v) -> Self {
                <$cell>::new(value)
            }
            #[inline(always)]
            fn load(&self, order: Ordering) -> $v {
                <$cell>::load(self, order)
            }
            #[inline(always)]
            fn store(&self, value: $v, order: Ordering) {
                <$cell>::store(self, value, order)
            }
            #[inline(always)]
            fn swap(&self, value: $v, order: Ordering) -> $v {
                <$cell>::swap(self, value, order)
            }
            #[inline(always)]
            fn compare_exchange(&self, current: $v, new: $v, success: Ordering, failure: Ordering) -> Result<$v, $v> {
                <$cell>::compare_exchange(self, current, new, success, failure)
            }
            #[inline(always)]
            fn compare_exchange_weak(
                &self,
                current: $v,
                new: $v,
                success: Ordering,
                failure: Ordering,
            ) -> Result<$v, $v> {
                <$cell>::compare_exchange_weak(self, current, new, success, failure)
            }
        }
    };
}

macro_rules! forward_int {
    ($cell:ty, $v:ty) => {
        forward_atomic!($cell, $v);
        impl AtomicInt<$v> for $cell {
            #[inline(always)]
            fn fetch_add(&self, value: $v, order: Ordering) -> $v {
                <$cell>::fetch_add(self, value, order)
            }
            #[inline(always)]
            fn fetch_sub(&self, value: $v, order: Ordering) -> $v {
                <$cell>::fetch_sub(self, value, order)
            }
            #[inline(always)]
            fn fetch_or(&self, value: $v, order: Ordering) -> $v {
                <$cell>::fetch_or(self, value, order)
            }
            #[inline(always)]
            fn fetch_and(&self, value: $v, order: Ordering) -> $v {
                <$cell>::fetch_and(self, value, order)
            }
        }
    };
}

forward_atomic!(std::sync::atomic::AtomicPtr<T>, *mut T, T);
forward_atomic!(std::sync::atomic::AtomicBool, bool);
forward_int!(std::sync::atomic::AtomicU8, u8);
forward_int!(std::sync::atomic::AtomicU32, u32);
forward_int!(std::sync::atomic::AtomicU64, u64);
forward_int!(std::sync::atomic::AtomicUsize, usize);
forward_int!(std::sync::atomic::AtomicI64, i64);

impl Memory for Std {
    type Ptr<T> = std::sync::atomic::AtomicPtr<T>;
    type Bool = std::sync::atomic::AtomicBool;
    type U8 = std::sync::atomic::AtomicU8;
    type U32 = std::sync::atomic::AtomicU32;
    type U64 = std::sync::atomic::AtomicU64;
    type Usize = std::sync::atomic::AtomicUsize;
    type I64 = std::sync::atomic::AtomicI64;
    #[inline(always)]
    fn fence(order: Ordering) {
        std::sync::atomic::fence(order)
    }
    #[inline(always)]
    fn light_fence() {
        std::sync::atomic::compiler_fence(Ordering::SeqCst)
    }
    fn heavy_fence() -> bool {
        std::sync::atomic::fence(Ordering::SeqCst);
        crate::membarrier::private_expedited()
    }
    #[inline(always)]
    fn spin_hint() {
        std::hint::spin_loop()
    }
    #[inline]
    fn yield_now() {
        std::thread::yield_now()
    }
}

/// Model tests: loom's atomics (feature `loom`). Use only inside `loom::model`.
#[cfg(any(test, feature = "loom"))]
#[derive(Debug)]
pub enum Loom {}

#[cfg(any(test, feature = "loom"))]
forward_atomic!(loom::sync::atomic::AtomicPtr<T>, *mut T, T);
#[cfg(any(test, feature = "loom"))]
forward_atomic!(loom::sync::atomic::AtomicBool, bool);
#[cfg(any(test, feature = "loom"))]
forward_int!(loom::sync::atomic::AtomicU8, u8);
#[cfg(any(test, feature = "loom"))]
forward_int!(loom::sync::atomic::AtomicU32, u32);
#[cfg(any(test, feature = "loom"))]
forward_int!(loom::sync::atomic::AtomicU64, u64);
#[cfg(any(test, feature = "loom"))]
forward_int!(loom::sync::atomic::AtomicUsize, usize);
#[cfg(any(test, feature = "loom"))]
forward_int!(loom::sync::atomic::AtomicI64, i64);

#[cfg(any(test, feature = "loom"))]
impl Memory for Loom {
    type Ptr<T> = loom::sync::atomic::AtomicPtr<T>;
    type Bool = loom::sync::atomic::AtomicBool;
    type U8 = loom::sync::atomic::AtomicU8;
    type U32 = loom::sync::atomic::AtomicU32;
    type U64 = loom::sync::atomic::AtomicU64;
    type Usize = loom::sync::atomic::AtomicUsize;
    type I64 = loom::sync::atomic::AtomicI64;
    fn fence(order: Ordering) {
        loom::sync::atomic::fence(order)
    }
    fn light_fence() {
        loom::sync::atomic::fence(Ordering::SeqCst)
    }
    fn heavy_fence() -> bool {
        loom::sync::atomic::fence(Ordering::SeqCst);
        true
    }
    fn spin_hint() {
        loom::thread::yield_now()
    }
    fn yield_now() {
        loom::thread::yield_now()
    }
}
