//! Many threads allocate, resize and free blocks of random layouts
//! (alignments 1 to 4096) through the global allocator, hand them to each
//! other, and check every block's contents and alignment at every step
//! (`src/workload.rs`). Threads attached to Python switch between attached
//! and detached as they go, foreign threads never attach, and another
//! thread starts and stops tracemalloc all along (default builds only: see
//! the crate docs). Run under AddressSanitizer by `scripts/test.sh`.
//!
//! Tracemalloc is toggled only while every Python thread has its thread
//! state: CPython allocates a new thread's state in `PyGILState_Ensure` and
//! frees it in `PyGILState_Release` through `PyMem_RawCalloc`/`PyMem_RawFree`
//! without holding the GIL, so a toggle at that moment is a torn read of the
//! raw allocator inside CPython, with no call of ours involved. That race
//! is what crashed this test about once in 30 runs; the crate's README
//! gives its reproducer (`repro/torn_allocator.c`).
//!
//! `PYALLOC_STRESS_OPS` sets the operations per thread (default 20,000).

mod common;
#[allow(dead_code)]
#[path = "../src/workload.rs"]
mod workload;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{run, Attached, Detached, Watchdog};
use interheap_pyalloc::{flush_deferred, stats, PyRawAlloc};
use pyo3_ffi as ffi;
use workload::{drain_pool, Worker};

#[global_allocator]
static ALLOC: PyRawAlloc = PyRawAlloc::new();

const PYTHON_THREADS: u64 = 4;
const FOREIGN_THREADS: u64 = 3;
const SLICE: usize = 64;

fn main() {
    let ops: usize = std::env::var("PYALLOC_STRESS_OPS").ok().and_then(|s| s.parse().ok()).unwrap_or(20_000);
    // SAFETY: first initialisation of this process, on its main thread.
    unsafe { ffi::Py_InitializeEx(0) };
    run(c"import tracemalloc");
    let _watchdog = Watchdog::new("the stress test", Duration::from_secs(600));
    let before = stats();
    // Python threads holding a thread state, and those done with their work.
    let attached = AtomicU64::new(0);
    let finished = AtomicU64::new(0);
    let toggling_over = AtomicBool::new(false);
    let mut toggles = 0;
    {
        let _detached = Detached::new();
        std::thread::scope(|scope| {
            let mut workers = Vec::new();
            for t in 0..PYTHON_THREADS {
                let (attached, finished, toggling_over) = (&attached, &finished, &toggling_over);
                workers.push(scope.spawn(move || {
                    let thread_state = Attached::new();
                    attached.fetch_add(1, Ordering::Release);
                    let mut worker = Worker::new(t);
                    let mut detached: Option<Detached> = None;
                    // Slices of work; attached or detached at random between them.
                    while (worker.ops as usize) < ops {
                        worker.run(SLICE);
                        if worker.coin() {
                            detached = if detached.is_some() { None } else { Some(Detached::new()) };
                        }
                    }
                    worker.finish();
                    drop(detached);
                    // Keep the thread state until tracemalloc stops toggling
                    // (see the module docs), detached meanwhile.
                    finished.fetch_add(1, Ordering::Release);
                    let waiting = Detached::new();
                    while !toggling_over.load(Ordering::Acquire) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    drop(waiting);
                    drop(thread_state);
                }));
            }
            for t in 0..FOREIGN_THREADS {
                workers.push(scope.spawn(move || {
                    let mut worker = Worker::new(100 + t);
                    worker.run(ops);
                    worker.finish();
                }));
            }
            let toggler = scope.spawn(|| {
                let mut n = 0;
                if cfg!(Py_GIL_DISABLED) {
                    toggling_over.store(true, Ordering::Release);
                    return n; // CPython itself crashes when tracemalloc is toggled under load
                }
                let _attached = Attached::new();
                // Toggle only once every Python thread has its thread state.
                let waiting = Detached::new();
                while attached.load(Ordering::Acquire) < PYTHON_THREADS {
                    std::thread::sleep(Duration::from_millis(1));
                }
                drop(waiting);
                while finished.load(Ordering::Acquire) < PYTHON_THREADS {
                    run(c"tracemalloc.start()");
                    drop(Detached::new()); // let the others take the GIL
                    run(c"tracemalloc.stop()");
                    n += 1;
                    let _detached = Detached::new();
                    std::thread::sleep(Duration::from_millis(1));
                }
                n
            });
            toggles = toggler.join().unwrap();
            toggling_over.store(true, Ordering::Release);
            for w in workers {
                w.join().unwrap();
            }
        });
    }
    drain_pool();
    flush_deferred().expect("the main thread is attached");
    let after = stats();
    let s = |a: u64, b: u64| b - a;
    // Every path was taken...
    assert!(s(before.python.allocations, after.python.allocations) > 1000, "{after:?}");
    assert!(s(before.python.reallocations, after.python.reallocations) > 100, "{after:?}");
    assert!(s(before.fallback.allocations, after.fallback.allocations) > 1000, "{after:?}");
    assert!(s(before.fallback.reallocations, after.fallback.reallocations) > 100, "{after:?}");
    assert!(s(before.deferred.deferred_frees, after.deferred.deferred_frees) > 100, "{after:?}");
    assert!(s(before.moved_to_fallback, after.moved_to_fallback) > 10, "{after:?}");
    // ...and every block the workers made is gone (std may free one of its own meanwhile).
    assert_eq!(after.deferred.pending_blocks, 0);
    assert!(after.python.live_blocks <= before.python.live_blocks, "{before:?}\n{after:?}");
    assert!(after.fallback.live_blocks <= before.fallback.live_blocks, "{before:?}\n{after:?}");
    // SAFETY: attached main thread.
    assert_eq!(unsafe { ffi::Py_FinalizeEx() }, 0);
    println!(
        "stress: {} threads x {ops} operations, {toggles} tracemalloc start/stop cycles; \
         python route {} blocks, fallback {}, {} frees deferred, {} moved",
        PYTHON_THREADS + FOREIGN_THREADS,
        s(before.python.allocations, after.python.allocations),
        s(before.fallback.allocations, after.fallback.allocations),
        s(before.deferred.deferred_frees, after.deferred.deferred_frees),
        s(before.moved_to_fallback, after.moved_to_fallback),
    );
}
