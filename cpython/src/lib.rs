//! interheap's CPython glue, over `pyo3-ffi`.
//!
//! This crate owns everything that touches CPython's C API from inside an
//! allocator call:
//!
//! * [`interp`]: which interpreter the calling thread belongs to, without ever
//!   waiting for a GIL (DESIGN.md fact 5);
//! * [`hook_thread`]: each thread's state for the hooks: the guard that keeps
//!   a hook from counting the calls it causes itself (fact 4) and the thread's
//!   nursery of young blocks;
//! * [`hooks`]: PEP 445 wrappers for the raw, mem and object domains that
//!   forward to whatever allocator was installed before them and record every
//!   block in the engine's [`interheap_engine::Tracker`] (option 6 of the
//!   design discussion), plus installing and removing them;
//! * [`adapters`]: adapters for existing custom allocators (options 2, 3, 4
//!   and 5): the lock wrapper, the thread-safe flag, the interpreter-aware
//!   interface and the per-interpreter dispatcher.
//!
//! * [`allocator`]: interheap's own allocator as CPython's allocator, installed
//!   before initialization: one heap per interpreter and domain, a shared
//!   per-thread heap for calls without a thread state (options 1 and 4 of the
//!   design discussion).
//! * [`stack`]: the calling thread's Python stack, read from CPython's frame
//!   structs without running Python code or allocating (for allocation sites
//!   and the checker's findings); [`sites`]: the hooks' sampled allocation
//!   sites (the rule and figures are `interheap_engine::sites`).
//! * [`timeline`]: each interpreter's live bytes over time, read by a
//!   background thread from the hooks' counters.
//! * [`heap_figures`]: where the figures are read from: the hooks' tracker,
//!   or, with no hook at all, the allocator's heaps when they keep requested
//!   sizes (`interheap-python -m interheap run`).
//!
//! * [`raw_swap_guard`]: keeps CPython 3.12 from swapping the raw domain back
//!   to `malloc` while other interpreters run (gh-111924);
//! * `interp_figures`: the C struct of one interpreter's figures, for the
//!   in-interpreter module.
//! * `loaded_object` (Linux): the program headers of the process's loaded
//!   objects, for the guard and the launcher.
//!
//! Nothing here calls Python, raises, or unwinds from a hook (fact 8).

pub mod adapters;
pub mod allocator;
pub mod allocator_check;
#[cfg(feature = "c-api")]
pub mod c_api;
pub mod checker;
pub mod heap_figures;
pub mod hook_thread;
pub mod hooks;
pub mod interp;
pub mod interp_end;
pub mod interp_figures;
#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
pub mod loaded_object;
pub mod raw_swap_guard;
pub mod sites;
pub mod stack;
pub mod timeline;
