//! Adapters for allocators written before per-interpreter GILs (options 2,
//! 3, 4 and 5 of the "custom allocators and the GIL" discussion).
//!
//! * [`adapter`]: installs an allocator for a domain behind a [`gate::Gate`]:
//!   a `PyMemAllocatorEx` (the **lock wrapper**, option 2, or with the
//!   **thread-safe flag**, option 3), or an **interpreter-aware** allocator
//!   ([`adapter::InterpreterAware`], options 4 and 5) whose calls receive
//!   the calling interpreter, domain, and whether it has its own GIL and
//!   object-allocator state. Enforces what may be installed when (facts 2, 3).
//! * [`gate`]: the per-call decision to lock or not, the race-free switch
//!   from unlocked to locked when a second GIL appears, and the figures.
//!   Pure concurrency, tested without Python.
//! * [`lock`]: the futex lock (bounded spin, then sleep).
//! * [`caller`]: who is calling (interpreter, own GIL, own obmalloc).
//! * [`dispatcher`]: one allocator instance per interpreter, frees routed
//!   to the owning instance, instances released after their interpreter.
//! * [`c_abi`]: the `#[repr(C)]` structs of `include/interheap.h`.

pub mod adapter;
pub mod c_abi;
pub mod caller;
pub mod dispatcher;
pub mod gate;
pub mod lock;

pub use adapter::{
    install_aware, install_legacy, list, stats, uninstall, AdapterError, AdapterStats, InterpreterAware,
    Kind, Options,
};
pub use caller::CallContext;
pub use dispatcher::{Dispatcher, Instance, InstanceFactory, InstanceStats};
pub use gate::Mode;
