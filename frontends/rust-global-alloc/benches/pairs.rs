//! Cost of one allocation + free pair: Rust's system allocator against
//! `PyRawAlloc` on each route, measured side by side in one run.
//!
//! * `system`: `std::alloc::System` (glibc malloc).
//! * `pyraw attached`: `PyRawAlloc` on a thread attached to Python (the
//!   Python route: route check, header, `PyMem_RawMalloc` / `PyMem_RawFree`).
//! * `pyraw detached`: `PyRawAlloc` on a detached thread (the libc fallback).
//! * `PyMem_Raw direct`: `PyMem_RawMalloc` + `PyMem_RawFree` called directly,
//!   attached: the floor under the Python route.
//!
//! Timings: rounds interleave the cases (in rotating order); each figure is
//! the median over rounds, and each ratio the median of per-round ratios to
//! `system`. Then, if valgrind is installed, each case runs again under
//! callgrind, collecting only inside its loop: instructions per pair, which
//! unlike times repeat exactly on a busy machine.
//!
//! `cargo bench -p interheap-pyalloc --bench pairs` (or `make bench-pyalloc`).
//! `PYALLOC_BENCH_ROUNDS`, `PYALLOC_BENCH_PAIRS` change the sizes;
//! `PYALLOC_BENCH_NO_CALLGRIND=1` skips callgrind.

#[path = "../tests/common/mod.rs"]
mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::process::Command;
use std::time::Instant;

use common::Detached;
use interheap_pyalloc::PyRawAlloc;
use pyo3_ffi as ffi;

const LAYOUTS: [(usize, usize); 3] = [(32, 8), (1024, 8), (256, 4096)];
const CHILD_ENV: &str = "PYALLOC_BENCH_CALLGRIND_CASE";

#[derive(Clone, Copy)]
enum Case {
    System,
    Attached,
    Detached,
    RawDirect,
}

const CASES: [Case; 4] = [Case::System, Case::Attached, Case::Detached, Case::RawDirect];

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::System => "system",
            Case::Attached => "pyraw attached",
            Case::Detached => "pyraw detached",
            Case::RawDirect => "PyMem_Raw direct",
        }
    }
    fn symbol(self) -> &'static str {
        match self {
            Case::System => "pyalloc_bench_system",
            Case::Attached | Case::Detached => "pyalloc_bench_pyraw",
            Case::RawDirect => "pyalloc_bench_raw_direct",
        }
    }
    /// Runs `pairs` pairs, detaching first for the detached case.
    fn run(self, layout: Layout, pairs: usize) {
        match self {
            Case::System => pyalloc_bench_system(layout, pairs),
            Case::Attached => pyalloc_bench_pyraw(layout, pairs),
            Case::Detached => {
                let _detached = Detached::new();
                pyalloc_bench_pyraw(layout, pairs)
            }
            Case::RawDirect => pyalloc_bench_raw_direct(layout, pairs),
        }
    }
}

#[no_mangle]
#[inline(never)]
fn pyalloc_bench_system(layout: Layout, pairs: usize) {
    for _ in 0..pairs {
        // SAFETY: non-zero layout; freed at once.
        unsafe {
            let p = System.alloc(layout);
            System.dealloc(black_box(p), layout);
        }
    }
}

#[no_mangle]
#[inline(never)]
fn pyalloc_bench_pyraw(layout: Layout, pairs: usize) {
    for _ in 0..pairs {
        // SAFETY: non-zero layout; freed at once.
        unsafe {
            let p = PyRawAlloc::new().alloc(layout);
            PyRawAlloc::new().dealloc(black_box(p), layout);
        }
    }
}

#[no_mangle]
#[inline(never)]
fn pyalloc_bench_raw_direct(layout: Layout, pairs: usize) {
    if layout.align() > 16 {
        return; // the raw domain has no aligned allocation
    }
    for _ in 0..pairs {
        // SAFETY: attached thread; freed at once.
        unsafe {
            let p = ffi::PyMem_RawMalloc(layout.size());
            ffi::PyMem_RawFree(black_box(p));
        }
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn timings(rounds: usize, pairs: usize) {
    println!("ns per allocation + free pair (median of {rounds} interleaved rounds of {pairs} pairs)");
    println!("{:<18} {:>14} {:>10} {:>10}", "case", "layout", "ns/pair", "x system");
    for (size, align) in LAYOUTS {
        let layout = Layout::from_size_align(size, align).unwrap();
        let mut ns = vec![Vec::new(); CASES.len()];
        let mut ratio = vec![Vec::new(); CASES.len()];
        for round in 0..rounds + 1 {
            let mut this = [0.0; CASES.len()];
            for k in 0..CASES.len() {
                let i = (k + round) % CASES.len(); // rotate who goes first
                let start = Instant::now();
                CASES[i].run(layout, pairs);
                this[i] = start.elapsed().as_nanos() as f64 / pairs as f64;
            }
            if round == 0 {
                continue; // warm-up
            }
            for i in 0..CASES.len() {
                ns[i].push(this[i]);
                ratio[i].push(this[i] / this[0]);
            }
        }
        for (i, case) in CASES.iter().enumerate() {
            if matches!(case, Case::RawDirect) && align > 16 {
                continue;
            }
            let label = format!("{size} B, align {align}");
            println!(
                "{:<18} {:>14} {:>10.1} {:>10.2}",
                case.name(),
                label,
                median(&mut ns[i]),
                median(&mut ratio[i])
            );
        }
    }
}

/// Instructions per pair from one callgrind run of `case`, or `None`.
fn callgrind(case: usize, layout: usize, pairs: usize) -> Option<f64> {
    let exe = std::env::current_exe().ok()?;
    let out = std::env::temp_dir().join(format!("pyalloc-bench.{}.{case}.{layout}.cg", std::process::id()));
    let status = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(format!("--toggle-collect={}", CASES[case].symbol()))
        .arg(&exe)
        .env(CHILD_ENV, format!("{case} {layout} {pairs}"))
        .output()
        .ok()?;
    let text = std::fs::read_to_string(&out).ok();
    let _ = std::fs::remove_file(&out);
    if !status.status.success() {
        eprintln!("callgrind run failed: {}", String::from_utf8_lossy(&status.stderr));
        return None;
    }
    let total: u64 = text?.lines().find_map(|l| l.strip_prefix("totals:"))?.trim().parse().ok()?;
    Some(total as f64 / pairs as f64)
}

fn instructions(pairs: usize) {
    if Command::new("valgrind").arg("--version").output().is_err() {
        println!("\nvalgrind is not installed: no instruction counts");
        return;
    }
    println!("\ninstructions per pair (callgrind, {pairs} pairs, collected inside the loop only)");
    println!("{:<18} {:>14} {:>10} {:>10}", "case", "layout", "Ir/pair", "x system");
    for (l, (size, align)) in LAYOUTS.into_iter().enumerate() {
        let system = callgrind(0, l, pairs);
        for (i, case) in CASES.iter().enumerate() {
            if matches!(case, Case::RawDirect) && align > 16 {
                continue;
            }
            let ir = if i == 0 { system } else { callgrind(i, l, pairs) };
            let label = format!("{size} B, align {align}");
            match (ir, system) {
                (Some(ir), Some(sys)) => {
                    println!("{:<18} {:>14} {:>10.0} {:>10.2}", case.name(), label, ir, ir / sys)
                }
                _ => println!("{:<18} {:>14} {:>10}", case.name(), label, "failed"),
            }
        }
    }
}

fn main() {
    // SAFETY: first initialisation of this process, on its main thread.
    unsafe { ffi::Py_InitializeEx(0) };
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        // A callgrind child: run one case once, collected by --toggle-collect.
        let v: Vec<usize> = spec.split(' ').map(|x| x.parse().unwrap()).collect();
        let (size, align) = LAYOUTS[v[1]];
        CASES[v[0]].run(Layout::from_size_align(size, align).unwrap(), v[2]);
        return;
    }
    timings(env_usize("PYALLOC_BENCH_ROUNDS", 15), env_usize("PYALLOC_BENCH_PAIRS", 200_000));
    if std::env::var_os("PYALLOC_BENCH_NO_CALLGRIND").is_none() {
        instructions(100_000);
    }
}
