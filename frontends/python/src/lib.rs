//! `interheap._native`: the Python extension module behind `import interheap`.
//!
//! A thin layer: it turns the glue's control operations into Python calls and
//! the engine's snapshots into plain dicts; the `interheap` package builds
//! the user-facing API on top. The module declares `gil_used = false`, so
//! importing it on a free-threaded build keeps the GIL off. Being a PyO3
//! module, it loads in the main interpreter only (DESIGN.md fact 9); the hooks
//! it installs serve every interpreter.

use interheap_cpython::hooks::{self, TRACKER};
use interheap_engine::{BucketKind, Domain, DomainSnapshot};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

fn control_error(e: hooks::HookError) -> PyErr {
    PyRuntimeError::new_err(e.to_string())
}

/// Wrap the raw, mem and object allocators with interheap's hooks and start
/// counting from zero. Call while no other thread allocates.
#[pyfunction]
fn install() -> PyResult<()> {
    hooks::install().map_err(control_error)
}

/// Remove the hooks, restoring the allocators they wrapped. Refuses if
/// something else was installed on top of them since.
#[pyfunction]
fn uninstall() -> PyResult<()> {
    hooks::uninstall().map_err(control_error)
}

/// Whether the hooks are installed.
#[pyfunction]
fn is_installed() -> bool {
    hooks::is_installed()
}

/// Per domain name: whether interheap's hook is the outermost allocator.
#[pyfunction]
fn on_top(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let dict = PyDict::new(py);
    for (domain, top) in Domain::ALL.into_iter().zip(hooks::on_top()) {
        dict.set_item(domain.name(), top)?;
    }
    Ok(dict)
}

fn domain_dict<'py>(py: Python<'py>, d: &DomainSnapshot) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("live_bytes", d.live_bytes)?;
    dict.set_item("peak_bytes", d.peak_bytes)?;
    dict.set_item("live_blocks", d.live_blocks)?;
    dict.set_item("allocations", d.allocations)?;
    dict.set_item("reallocations", d.reallocations)?;
    dict.set_item("frees", d.frees)?;
    dict.set_item("failures", d.failures)?;
    Ok(dict)
}

fn per_domain<'py>(py: Python<'py>, values: &[u64; Domain::COUNT]) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    for domain in Domain::ALL {
        dict.set_item(domain.name(), values[domain.index()])?;
    }
    Ok(dict)
}

/// The raw figures: every bucket ever used, plus tracker-wide counters.
///
/// Returns a dict with `buckets` (a list of dicts with `kind` in
/// {"interpreter", "none", "overflow"}, `id`, and `domains`),
/// `untracked_frees`, `missed_frees` and `table`.
#[pyfunction]
fn snapshot(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let (snap, table) = TRACKER.census();
    let buckets = snap
        .buckets
        .iter()
        .map(|b| {
            let dict = PyDict::new(py);
            let (kind, id) = match b.kind {
                BucketKind::NoInterpreter => ("none", None),
                BucketKind::Interpreter(id) => ("interpreter", Some(id)),
                BucketKind::OverflowInterpreters => ("overflow", None),
            };
            dict.set_item("kind", kind)?;
            dict.set_item("id", id)?;
            let domains = PyDict::new(py);
            for domain in Domain::ALL {
                domains.set_item(domain.name(), domain_dict(py, &b.domains[domain.index()])?)?;
            }
            dict.set_item("domains", domains)?;
            Ok(dict)
        })
        .collect::<PyResult<Vec<_>>>()?;
    let result = PyDict::new(py);
    result.set_item("buckets", buckets)?;
    result.set_item("untracked_frees", per_domain(py, &snap.untracked_frees)?)?;
    result.set_item("missed_frees", per_domain(py, &snap.missed_frees)?)?;
    let table_dict = PyDict::new(py);
    table_dict.set_item("entries", table.entries)?;
    table_dict.set_item("slots", table.slots)?;
    table_dict.set_item("bytes", table.bytes)?;
    table_dict.set_item("live_bytes", table.live_bytes)?;
    result.set_item("table", table_dict)?;
    Ok(result)
}

/// The ID of the interpreter the calling thread runs in, as the hooks see it.
#[pyfunction]
fn current_interpreter_id() -> Option<i64> {
    interheap_cpython::interp::current_interpreter_id()
}

#[pymodule(gil_used = false)]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(install, m)?)?;
    m.add_function(wrap_pyfunction!(uninstall, m)?)?;
    m.add_function(wrap_pyfunction!(is_installed, m)?)?;
    m.add_function(wrap_pyfunction!(on_top, m)?)?;
    m.add_function(wrap_pyfunction!(snapshot, m)?)?;
    m.add_function(wrap_pyfunction!(current_interpreter_id, m)?)?;
    Ok(())
}
