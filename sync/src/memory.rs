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
    /// A memory fence.
    fn fence(order: Ordering);
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

impl Memory for Std {
    type Ptr<T> = std::sync::atomic::AtomicPtr<T>;
    type Bool = std::sync::atomic::AtomicBool;
    type U8 = std::sync::atomic::AtomicU8;
    type U32 = std::sync::atomic::AtomicU32;
    type U64 = std::sync::atomic::AtomicU64;
    type Usize = std::sync::atomic::AtomicUsize;
    #[inline(always)]
    fn fence(order: Ordering) {
        std::sync::atomic::fence(order)
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
impl Memory for Loom {
    type Ptr<T> = loom::sync::atomic::AtomicPtr<T>;
    type Bool = loom::sync::atomic::AtomicBool;
    type U8 = loom::sync::atomic::AtomicU8;
    type U32 = loom::sync::atomic::AtomicU32;
    type U64 = loom::sync::atomic::AtomicU64;
    type Usize = loom::sync::atomic::AtomicUsize;
    fn fence(order: Ordering) {
        loom::sync::atomic::fence(order)
    }
    fn spin_hint() {
        loom::thread::yield_now()
    }
    fn yield_now() {
        loom::thread::yield_now()
    }
}
