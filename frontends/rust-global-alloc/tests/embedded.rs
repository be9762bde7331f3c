//! The allocator in an embedding program, through a whole interpreter life:
//! before `Py_Initialize`, attached, detached, on a foreign thread while the
//! main thread holds the GIL (PyO3 #6268) under tracemalloc, in a
//! `Py_AtExit` callback during finalisation, after `Py_FinalizeEx`, and
//! after a second `Py_Initialize`. Each step checks which route the blocks
//! took, with exact counter deltas, and what tracemalloc saw.

mod common;

use std::alloc::{alloc, dealloc, Layout};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use common::{run, traced_memory, Detached, Watchdog};
use interheap_pyalloc::{flush_deferred, routes_to_python, stats, PyRawAlloc, Stats};
use pyo3_ffi as ffi;

#[global_allocator]
static ALLOC: PyRawAlloc = PyRawAlloc::new();

const MIB: usize = 1 << 20;

/// Counter changes between two snapshots, as signed numbers.
#[derive(Debug, PartialEq, Eq, Default)]
struct Delta {
    py_allocs: i64,
    py_frees: i64,
    py_reallocs: i64,
    py_live: i64,
    fb_allocs: i64,
    fb_frees: i64,
    fb_reallocs: i64,
    fb_live: i64,
    pending: i64,
    moved: i64,
}

fn delta(a: &Stats, b: &Stats) -> Delta {
    let d = |x: u64, y: u64| y as i64 - x as i64;
    Delta {
        py_allocs: d(a.python.allocations, b.python.allocations),
        py_frees: d(a.python.frees, b.python.frees),
        py_reallocs: d(a.python.reallocations, b.python.reallocations),
        py_live: d(a.python.live_bytes, b.python.live_bytes),
        fb_allocs: d(a.fallback.allocations, b.fallback.allocations),
        fb_frees: d(a.fallback.frees, b.fallback.frees),
        fb_reallocs: d(a.fallback.reallocations, b.fallback.reallocations),
        fb_live: d(a.fallback.live_bytes, b.fallback.live_bytes),
        pending: d(a.deferred.pending_blocks, b.deferred.pending_blocks),
        moved: d(a.moved_to_fallback, b.moved_to_fallback),
    }
}

// What the Py_AtExit callback saw: 0 = not run, 1 = fallback, 2 = Python.
static AT_EXIT_ROUTE: AtomicU8 = AtomicU8::new(0);
static AT_EXIT_FREED: AtomicBool = AtomicBool::new(false);

extern "C" fn at_exit() {
    let route = if routes_to_python() { 2 } else { 1 };
    AT_EXIT_ROUTE.store(route, Ordering::SeqCst);
    let before = stats();
    let v = black_box(vec![1u8; 4321]);
    drop(v);
    let d = delta(&before, &stats());
    AT_EXIT_FREED.store(d.fb_allocs == 1 && d.fb_frees == 1 && d.fb_live == 0, Ordering::SeqCst);
}

fn main() {
    // The watchdog's own thread allocates: start it before any measurement.
    let _watchdog = Watchdog::new("the embedded test", Duration::from_secs(120));

    // 1. Before Py_Initialize: no thread state, the fallback serves.
    assert!(!routes_to_python());
    let s0 = stats();
    let pre = black_box(vec![7u8; 1000]);
    let aligned_layout = Layout::from_size_align(8192, 4096).unwrap();
    // SAFETY: non-zero size.
    let pre_aligned = unsafe { alloc(aligned_layout) };
    assert!(!pre_aligned.is_null() && (pre_aligned as usize).is_multiple_of(4096));
    // SAFETY: 8192 bytes are ours.
    unsafe { pre_aligned.write_bytes(0xAB, 8192) };
    let d = delta(&s0, &stats());
    assert_eq!(d, Delta { fb_allocs: 2, fb_live: 1000 + 8192, ..Delta::default() }, "before init");

    // 2. Initialised: the main thread is attached, Python serves.
    // SAFETY: first initialisation of this process.
    unsafe { ffi::Py_InitializeEx(0) };
    assert!(routes_to_python());
    let s1 = stats();
    let mut during = black_box(vec![1u8; 5000]);
    drop(pre); // a fallback block, freed by libc although attached
    during.reserve_exact(20_000); // realloc in place, by Python
    let d = delta(&s1, &stats());
    assert_eq!(
        d,
        Delta {
            py_allocs: 1,
            py_reallocs: 1,
            py_live: 5000 + 20_000,
            fb_frees: 1,
            fb_live: -1000,
            ..Delta::default()
        },
        "attached"
    );
    // SAFETY: the block is live and holds 8192 bytes.
    assert!(unsafe { std::slice::from_raw_parts(pre_aligned, 8192) }.iter().all(|&b| b == 0xAB));
    // SAFETY: allocated above with this layout.
    unsafe { dealloc(pre_aligned, aligned_layout) };

    // 3. tracemalloc sees Python-route blocks, with their exact sizes.
    run(c"import tracemalloc; tracemalloc.start()");
    let t0 = traced_memory();
    let big = black_box(vec![3u8; 20 * MIB]);
    let t1 = traced_memory();
    assert!(t1 - t0 >= 20 * MIB && t1 - t0 < 20 * MIB + 64 * 1024, "traced {t0} -> {t1}");
    drop(big);
    let t2 = traced_memory();
    assert!(t2 < t0 + 64 * 1024, "traced {t1} -> {t2} after the free");

    // 4. Detached: new blocks from the fallback; Python blocks freed here
    //    are parked, and one resized here moves to the fallback.
    let keep = black_box(vec![5u8; 8 * MIB]);
    let mut grow = black_box(vec![6u8; 100]);
    let for_thread = black_box(vec![8u8; 4096]);
    let t3 = traced_memory();
    let s2 = stats();
    let local_len;
    {
        let _detached = Detached::new();
        assert!(!routes_to_python());
        let local = black_box(vec![9u8; 3000]);
        local_len = local.len();
        drop(keep);
        grow.reserve_exact(10_000);
        assert!(grow.iter().all(|&b| b == 6));
        // A thread Python never saw frees a Python block and allocates.
        std::thread::scope(|scope| {
            scope.spawn(move || {
                assert!(!routes_to_python());
                assert!(for_thread.iter().all(|&b| b == 8));
                drop(for_thread);
            });
        });
        drop(local);
    }
    let s3 = stats();
    let d = delta(&s2, &s3);
    assert_eq!(d.pending, 3, "keep, grow's old block, for_thread wait for an attached call: {d:?}");
    assert_eq!(d.moved, 1);
    assert_eq!(d.py_frees, 0);
    assert_eq!(d.py_live, 0, "parked blocks are still live for Python");
    assert!(d.fb_live as usize >= 10_100 && local_len == 3000);
    let t4 = traced_memory(); // the C API does not call us: nothing drained yet
    assert!(t4 + 4096 >= t3, "parked blocks still traced: {t3} -> {t4}");
    assert_eq!(flush_deferred(), Some(3));
    let t5 = traced_memory();
    assert!(t4 - t5 >= 8 * MIB, "parked blocks freed: {t4} -> {t5}");
    let d = delta(&s3, &stats());
    assert_eq!((d.pending, d.py_frees, d.py_live), (-3, 3, -(8 * MIB as i64) - 100 - 4096));
    drop(grow);

    // 5. PyO3 #6268: the main thread holds the GIL and joins a thread that
    //    allocates, while tracemalloc traces. A plain PyMem_RawMalloc
    //    allocator hangs here; the watchdog turns a hang into a failure.
    std::thread::spawn(|| {
        for i in 0..2000usize {
            black_box(vec![i as u8; 64 + i]);
        }
    })
    .join()
    .unwrap();
    assert!(routes_to_python());

    // 6. Finalisation: a Python block outlives the interpreter; a Py_AtExit
    //    callback allocates when no thread state is left.
    let survivor = black_box(vec![2u8; 777]);
    // SAFETY: initialised; `at_exit` never unwinds into C (its asserts only store flags).
    assert_eq!(unsafe { ffi::Py_AtExit(Some(at_exit)) }, 0);
    // SAFETY: attached main thread; tracemalloc is still tracing.
    assert_eq!(unsafe { ffi::Py_FinalizeEx() }, 0);
    assert_eq!(AT_EXIT_ROUTE.load(Ordering::SeqCst), 1, "Py_AtExit callbacks have no thread state");
    assert!(AT_EXIT_FREED.load(Ordering::SeqCst));
    assert!(!routes_to_python());
    let s4 = stats();
    assert!(survivor.iter().all(|&b| b == 2));
    drop(survivor); // parked: no thread state after finalisation
    let after = black_box(vec![4u8; 100]);
    drop(after);
    let d = delta(&s4, &stats());
    assert_eq!(d, Delta { pending: 1, fb_allocs: 1, fb_frees: 1, ..Delta::default() }, "after finalize");

    // 7. A second interpreter: its first attached call frees the parked block.
    // SAFETY: re-initialisation after a complete finalisation.
    unsafe { ffi::Py_InitializeEx(0) };
    let s5 = stats();
    let x = black_box(Box::new(11u64));
    let d = delta(&s5, &stats());
    assert_eq!(
        d,
        Delta { pending: -1, py_frees: 1, py_live: -777 + 8, py_allocs: 1, ..Delta::default() },
        "re-initialised"
    );
    drop(x);
    drop(during);
    // SAFETY: attached main thread.
    assert_eq!(unsafe { ffi::Py_FinalizeEx() }, 0);
    println!("embedded: every step took the expected route");
}
