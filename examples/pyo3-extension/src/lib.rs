//! `interheap_example_ext`: a PyO3 extension whose Rust allocations go
//! through Python's raw allocator, with one line (the `#[global_allocator]`
//! below). The functions exist to show and test what that gives: blocks
//! made while attached are seen by tracemalloc and interheap; blocks made
//! detached or on Rust threads take the libc fallback and never deadlock.
//!
//! Being a PyO3 module, it loads in the main interpreter only (DESIGN.md
//! fact 9). It declares `gil_used = false`, so a free-threaded build keeps
//! the GIL off when it is imported.

use std::alloc::{GlobalAlloc, Layout};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use interheap_pyalloc::workload::{self, Worker};
use interheap_pyalloc::{RouteStats, Stats};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyDict;

// The one line an extension needs is
//     #[global_allocator]
//     static ALLOC: interheap_pyalloc::PyRawAlloc = interheap_pyalloc::PyRawAlloc::new();
// Here it is a `cfg_attr` only so that `--features without-pyalloc` can build
// the "before" variant of the README (the static is then unused as allocator).
#[cfg_attr(not(feature = "without-pyalloc"), global_allocator)]
static ALLOC: interheap_pyalloc::PyRawAlloc = interheap_pyalloc::PyRawAlloc::new();

/// A Rust `Vec<u8>` owned by a Python object.
#[pyclass(module = "interheap_example_ext")]
struct RustBuffer {
    data: Option<Vec<u8>>,
    fill: u8,
}

#[pymethods]
impl RustBuffer {
    /// Allocates `nbytes` filled with `fill`, on the calling (attached)
    /// thread: the Python route, visible to tracemalloc and interheap.
    #[new]
    #[pyo3(signature = (nbytes, fill = 0x5A))]
    fn new(nbytes: usize, fill: u8) -> Self {
        RustBuffer { data: Some(vec![fill; nbytes]), fill }
    }

    /// Bytes held (0 once freed).
    #[getter]
    fn nbytes(&self) -> usize {
        self.data.as_ref().map_or(0, Vec::len)
    }

    /// Whether every byte still holds the fill value.
    fn check(&self) -> bool {
        self.data.as_ref().is_some_and(|d| d.iter().all(|&b| b == self.fill))
    }

    /// Frees the vector now, on this attached thread.
    fn free(&mut self) {
        self.data = None;
    }

    /// Frees the vector with the thread detached (inside `py.detach`): a
    /// Python-route block is then parked until the next attached call.
    fn free_detached(&mut self, py: Python<'_>) {
        let data = self.data.take();
        py.detach(move || drop(data));
    }

    /// Grows (or shrinks) the vector to `nbytes`, keeping its bytes and
    /// filling new ones; `detached=True` resizes with the thread detached.
    #[pyo3(signature = (nbytes, detached = false))]
    fn resize(&mut self, py: Python<'_>, nbytes: usize, detached: bool) -> PyResult<()> {
        let mut data = self.data.take().ok_or_else(|| PyValueError::new_err("buffer already freed"))?;
        let fill = self.fill;
        let resize = move || {
            data.resize(nbytes, fill);
            data.shrink_to_fit();
            data
        };
        self.data = Some(if detached { py.detach(resize) } else { resize() });
        Ok(())
    }
}

/// A buffer allocated with the thread detached: the fallback route, which
/// Python's tools do not see.
#[pyfunction]
#[pyo3(signature = (nbytes, fill = 0x5A))]
fn alloc_detached(py: Python<'_>, nbytes: usize, fill: u8) -> RustBuffer {
    let data = py.detach(move || vec![fill; nbytes]);
    RustBuffer { data: Some(data), fill }
}

fn route_dict<'py>(py: Python<'py>, r: &RouteStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("allocations", r.allocations)?;
    d.set_item("reallocations", r.reallocations)?;
    d.set_item("frees", r.frees)?;
    d.set_item("live_blocks", r.live_blocks)?;
    d.set_item("live_bytes", r.live_bytes)?;
    Ok(d)
}

fn stats_dict<'py>(py: Python<'py>, s: &Stats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("python", route_dict(py, &s.python)?)?;
    d.set_item("fallback", route_dict(py, &s.fallback)?)?;
    let deferred = PyDict::new(py);
    deferred.set_item("pending_blocks", s.deferred.pending_blocks)?;
    deferred.set_item("pending_bytes", s.deferred.pending_bytes)?;
    deferred.set_item("deferred_frees", s.deferred.deferred_frees)?;
    d.set_item("deferred", deferred)?;
    d.set_item("moved_to_fallback", s.moved_to_fallback)?;
    Ok(d)
}

/// The allocator's counters (`interheap_pyalloc::stats()`): what went
/// through Python (`python`), what went around it (`fallback`), and Python
/// blocks freed while detached that wait to be freed (`deferred`).
#[pyfunction]
fn allocator_stats(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    stats_dict(py, &interheap_pyalloc::stats())
}

/// Frees the parked Python-route blocks now; returns how many.
#[pyfunction]
fn flush_deferred() -> PyResult<usize> {
    interheap_pyalloc::flush_deferred()
        .ok_or_else(|| PyRuntimeError::new_err("this thread cannot use the Python route now"))
}

/// Whether an allocation made now, on this thread, would go through Python.
#[pyfunction]
fn routes_to_python() -> bool {
    interheap_pyalloc::routes_to_python()
}

/// What a plain `#[global_allocator]` over `PyMem_Raw*` does (the approach
/// of PyO3 #6279): every call goes to Python's raw allocator, whatever the
/// thread. Used only by `gil_held_join(naive=True)`, to show the hazard.
struct NaiveRawAlloc;

// SAFETY: forwards to CPython's raw allocator, which returns blocks aligned
// for any fundamental type; the layouts used here ask for no more.
unsafe impl GlobalAlloc for NaiveRawAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the raw domain takes any size; alignment <= 16 here.
        unsafe { ffi::PyMem_RawMalloc(layout.size()).cast() }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from `alloc`.
        unsafe { ffi::PyMem_RawFree(ptr.cast()) }
    }
}

fn allocate_many(naive: bool, allocations: usize, size: usize) {
    let layout = Layout::from_size_align(size.max(1), 8).expect("valid layout");
    for i in 0..allocations {
        if naive {
            // SAFETY: non-zero layout; written and freed at once.
            unsafe {
                let p = NaiveRawAlloc.alloc(layout);
                assert!(!p.is_null());
                p.write_bytes(i as u8, layout.size());
                NaiveRawAlloc.dealloc(black_box(p), layout);
            }
        } else {
            let v = black_box(vec![i as u8; layout.size()]);
            assert!(v.iter().all(|&b| b == i as u8));
        }
    }
}

/// The deadlock of PyO3 #6268. The caller keeps holding the GIL (its thread
/// stays attached) while it waits for a thread that allocates:
///
/// * `thread="foreign"`: a Rust thread Python never saw;
/// * `thread="detached"`: a Rust thread that attached to Python, then
///   released it (`py.detach`) before allocating.
///
/// With `naive=True` the thread allocates through a plain `PyMem_RawMalloc`
/// allocator instead of this module's global allocator. Returns whether the
/// thread finished within `timeout` seconds; afterwards the GIL is released
/// so that a blocked thread can finish, and the thread is joined.
#[pyfunction]
#[pyo3(signature = (thread = "foreign", naive = false, allocations = 1000, size = 256, timeout = 10.0))]
fn gil_held_join(
    py: Python<'_>,
    thread: &str,
    naive: bool,
    allocations: usize,
    size: usize,
    timeout: f64,
) -> PyResult<bool> {
    let attach_first = match thread {
        "foreign" => false,
        "detached" => true,
        other => {
            return Err(PyValueError::new_err(format!(
                "thread must be 'foreign' or 'detached', not {other:?}"
            )))
        }
    };
    let ready = Arc::new(AtomicBool::new(false));
    let go = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let handle = {
        let (ready, go, done) = (ready.clone(), go.clone(), done.clone());
        std::thread::spawn(move || {
            let work = || {
                ready.store(true, Ordering::Release);
                while !go.load(Ordering::Acquire) {
                    std::thread::yield_now();
                }
                allocate_many(naive, allocations, size);
                done.store(true, Ordering::Release);
            };
            if attach_first {
                Python::attach(|py| py.detach(work));
            } else {
                work();
            }
        })
    };
    // Let the thread attach (it needs the GIL for that) and detach again.
    py.detach(|| {
        while !ready.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
    });
    // From here on this thread holds the GIL, as `join()` inside `Python::attach` would.
    go.store(true, Ordering::Release);
    let deadline = Instant::now() + Duration::from_secs_f64(timeout);
    while !done.load(Ordering::Acquire) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let finished = done.load(Ordering::Acquire);
    py.detach(|| handle.join()).map_err(|_| PyRuntimeError::new_err("the allocating thread panicked"))?;
    Ok(finished)
}

/// Runs the checked random-layout workload on this thread for `ops`
/// operations, in slices of `slice`, switching between attached and
/// detached at random between slices. Blocks are exchanged with every other
/// worker through a shared pool. Returns the operations done.
#[pyfunction]
#[pyo3(signature = (ops, seed = 0, slice = 64))]
fn churn(py: Python<'_>, ops: usize, seed: u64, slice: usize) -> u64 {
    let mut worker = Worker::new(seed);
    let mut detached = false;
    while (worker.ops as usize) < ops {
        if worker.coin() {
            detached = !detached;
        }
        if detached {
            py.detach(|| worker.run(slice));
        } else {
            worker.run(slice);
        }
    }
    worker.finish()
}

/// One worker's whole run on a thread Python never sees.
fn run_worker(seed: u64, ops: usize) -> u64 {
    let mut worker = Worker::new(seed);
    worker.run(ops);
    worker.finish()
}

/// The same workload on `threads` Rust threads Python never sees (the GIL
/// is released while they run). Returns the operations done.
#[pyfunction]
#[pyo3(signature = (threads, ops, seed = 0))]
fn foreign_churn(py: Python<'_>, threads: u64, ops: usize, seed: u64) -> PyResult<u64> {
    py.detach(|| {
        let handles: Vec<_> = (0..threads)
            .map(|t| std::thread::spawn(move || run_worker(seed.wrapping_add(1000 + t), ops)))
            .collect();
        handles.into_iter().map(|h| h.join()).sum::<Result<u64, _>>()
    })
    .map_err(|_| PyRuntimeError::new_err("a worker thread panicked (see stderr)"))
}

/// Starts `threads` Rust threads that run the workload until the process
/// ends, never joined: they keep allocating while Python finalizes and after.
#[pyfunction]
#[pyo3(signature = (threads, seed = 0))]
fn start_background_churn(threads: u64, seed: u64) {
    for t in 0..threads {
        std::thread::spawn(move || {
            let mut worker = Worker::new(seed.wrapping_add(2000 + t));
            loop {
                worker.run(1000);
            }
        });
    }
}

/// Checks and frees the blocks workers left in the shared pool.
#[pyfunction]
fn drain_pool(py: Python<'_>) -> usize {
    py.detach(workload::drain_pool)
}

/// Many threads at once: `python_threads` Rust threads that attach to
/// Python and switch between attached and detached as they go, and
/// `foreign_threads` that never attach, all running the checked workload
/// (random layouts, alignments up to 4096) and exchanging blocks. Returns
/// the operations done and the allocator's counters before and after.
#[pyfunction]
#[pyo3(signature = (python_threads = 4, foreign_threads = 2, ops = 20_000, seed = 0))]
fn stress<'py>(
    py: Python<'py>,
    python_threads: u64,
    foreign_threads: u64,
    ops: usize,
    seed: u64,
) -> PyResult<Bound<'py, PyDict>> {
    let before = interheap_pyalloc::stats();
    let total = py
        .detach(|| {
            std::thread::scope(|scope| {
                let mut handles = Vec::new();
                for t in 0..python_threads {
                    handles.push(
                        scope.spawn(move || Python::attach(|py| churn(py, ops, seed.wrapping_add(t), 64))),
                    );
                }
                for t in 0..foreign_threads {
                    handles.push(scope.spawn(move || run_worker(seed.wrapping_add(500 + t), ops)));
                }
                handles.into_iter().map(|h| h.join()).sum::<Result<u64, _>>()
            })
        })
        .map_err(|_| PyRuntimeError::new_err("a stress thread panicked (see stderr)"))?;
    drain_pool(py);
    interheap_pyalloc::flush_deferred();
    let after = interheap_pyalloc::stats();
    let d = PyDict::new(py);
    d.set_item("ops", total)?;
    d.set_item("before", stats_dict(py, &before)?)?;
    d.set_item("after", stats_dict(py, &after)?)?;
    Ok(d)
}

fn pairs_ns<A: GlobalAlloc>(a: &A, layout: Layout, pairs: usize) -> f64 {
    let start = Instant::now();
    for _ in 0..pairs {
        // SAFETY: non-zero layout; freed at once.
        unsafe {
            let p = a.alloc(layout);
            a.dealloc(black_box(p), layout);
        }
    }
    start.elapsed().as_nanos() as f64 / pairs as f64
}

/// Benchmark: ns per allocation + free pair inside this extension (where
/// thread-locals cost more than in an executable), for Rust's system
/// allocator and for the global allocator attached and detached, measured
/// side by side in interleaved rounds. Returns the median of each.
#[pyfunction]
#[pyo3(signature = (size = 32, align = 8, pairs = 200_000, rounds = 9))]
fn pair_cost(
    py: Python<'_>,
    size: usize,
    align: usize,
    pairs: usize,
    rounds: usize,
) -> PyResult<Bound<'_, PyDict>> {
    let layout =
        Layout::from_size_align(size.max(1), align).map_err(|e| PyValueError::new_err(e.to_string()))?;
    let mut runs: [Vec<f64>; 3] = Default::default();
    for _ in 0..rounds.max(1) {
        runs[0].push(pairs_ns(&std::alloc::System, layout, pairs));
        runs[1].push(pairs_ns(&ALLOC, layout, pairs));
        runs[2].push(py.detach(|| pairs_ns(&ALLOC, layout, pairs)));
    }
    let d = PyDict::new(py);
    for (name, mut v) in ["system", "attached", "detached"].into_iter().zip(runs) {
        v.sort_by(f64::total_cmp);
        d.set_item(name, v[v.len() / 2])?;
    }
    Ok(d)
}

#[pymodule(gil_used = false)]
fn interheap_example_ext(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<RustBuffer>()?;
    m.add_function(wrap_pyfunction!(alloc_detached, m)?)?;
    m.add_function(wrap_pyfunction!(allocator_stats, m)?)?;
    m.add_function(wrap_pyfunction!(flush_deferred, m)?)?;
    m.add_function(wrap_pyfunction!(routes_to_python, m)?)?;
    m.add_function(wrap_pyfunction!(gil_held_join, m)?)?;
    m.add_function(wrap_pyfunction!(churn, m)?)?;
    m.add_function(wrap_pyfunction!(foreign_churn, m)?)?;
    m.add_function(wrap_pyfunction!(start_background_churn, m)?)?;
    m.add_function(wrap_pyfunction!(drain_pool, m)?)?;
    m.add_function(wrap_pyfunction!(stress, m)?)?;
    m.add_function(wrap_pyfunction!(pair_cost, m)?)?;
    Ok(())
}
