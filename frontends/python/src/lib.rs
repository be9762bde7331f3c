//! `interheap._native`: the Python extension module behind `import interheap`.
//!
//! A thin layer: it turns the glue's control operations into Python calls and
//! the engine's snapshots into plain dicts; the `interheap` package builds
//! the user-facing API on top. The module declares `gil_used = false`, so
//! importing it on a free-threaded build keeps the GIL off. Being a PyO3
//! module, it loads in the main interpreter only (DESIGN.md fact 9); the hooks
//! it installs serve every interpreter.

use interheap_cpython::adapters::{self, c_abi, AdapterError, AdapterStats};
use interheap_cpython::heap_figures;
use interheap_cpython::hooks::{self, TRACKER};
use interheap_cpython::interp::{Origin, Whence};
use interheap_cpython::interp_figures::InterpFigures;

mod interp_module;
use interheap_engine::{BucketKind, Domain, DomainSnapshot};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

fn control_error(e: hooks::HookError) -> PyErr {
    PyRuntimeError::new_err(e.to_string())
}

/// Wrap the raw, mem and object allocators with interheap's hooks and start
/// counting from zero. Call while no other thread allocates. With `check`,
/// the hooks also look for misuse (`interheap check`).
///
/// With `from_heaps`, install no hook: the figures are read from the
/// interheap allocator's heaps (`interheap_cpython::heap_figures`), which
/// needs the allocator serving every domain with requested sizes kept
/// (`interheap-python -m interheap ...`, or `INTERHEAP_REQUESTED_SIZES=1`).
#[pyfunction]
#[pyo3(signature = (check = false, from_heaps = false))]
fn install(check: bool, from_heaps: bool) -> PyResult<()> {
    if !from_heaps {
        if heap_figures::reading_from_heaps() {
            return Err(control_error(hooks::HookError::AlreadyInstalled));
        }
        return hooks::install_with(check).map_err(control_error);
    }
    if check {
        return Err(PyValueError::new_err(
            "the checker needs the hooks: it cannot read its findings from the heaps",
        ));
    }
    if hooks::is_installed() || heap_figures::reading_from_heaps() {
        return Err(control_error(hooks::HookError::AlreadyInstalled));
    }
    if !heap_figures::read_from_heaps(allocator_figures) {
        return Err(PyRuntimeError::new_err(heap_figures_unavailable()));
    }
    Ok(())
}

/// Why the figures cannot be read from the allocator's heaps here.
fn heap_figures_unavailable() -> String {
    let Some(api) = allocator_api() else {
        return "the interheap allocator is not installed in this process: run the program with \
                interheap-python"
            .to_owned();
    };
    let served = (api.installed)();
    if cfg!(Py_GIL_DISABLED) {
        "this is a free-threaded build: the mem and object domains stay CPython's mimalloc, so only the \
         hooks see them"
            .to_owned()
    } else if served != 7 {
        "the interheap allocator does not serve every domain here (INTERHEAP_ALLOCATOR chose fewer)"
            .to_owned()
    } else {
        "the interheap allocator's heaps do not keep requested sizes: run interheap-python with \
         INTERHEAP_REQUESTED_SIZES=1 (on by default for -m interheap)"
            .to_owned()
    }
}

/// The allocator's figures records, through its C API (see
/// `interheap_cpython::heap_figures`); `None` if it cannot give them.
fn allocator_figures() -> Option<Vec<heap_figures::FiguresRecord>> {
    type Figures = unsafe extern "C" fn(*mut heap_figures::FiguresRecord, usize, usize) -> isize;
    static FIGURES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let address = *FIGURES.get_or_init(|| {
        // SAFETY: dlsym with RTLD_DEFAULT only searches the global symbol scope.
        unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"interheap_allocator_figures".as_ptr()) as usize }
    });
    if address == 0 {
        return None;
    }
    // SAFETY: the symbol is the C API's `interheap_allocator_figures`, with this signature.
    let figures = unsafe { std::mem::transmute::<usize, Figures>(address) };
    let size = std::mem::size_of::<heap_figures::FiguresRecord>();
    let mut records = Vec::with_capacity(16);
    loop {
        // SAFETY: the vector has room for its capacity in records.
        let n = unsafe { figures(records.as_mut_ptr(), records.capacity(), size) };
        let n = usize::try_from(n).ok()?;
        if n <= records.capacity() {
            // SAFETY: the call wrote `n` records.
            unsafe { records.set_len(n) };
            return Some(records);
        }
        records.reserve(n);
    }
}

/// Whether `install(from_heaps=True)` can read the figures from the allocator's heaps here.
#[pyfunction]
fn heap_figures_available() -> bool {
    allocator_figures().is_some()
}

/// Where the figures are read from: "hooks", "heaps", or None if neither is installed.
#[pyfunction]
fn figures_source() -> Option<&'static str> {
    if heap_figures::reading_from_heaps() {
        Some("heaps")
    } else if hooks::is_installed() {
        Some("hooks")
    } else {
        None
    }
}

/// Whether the installed hooks are the checking ones.
#[pyfunction]
fn check_enabled() -> bool {
    interheap_cpython::checker::CHECKING.load(std::sync::atomic::Ordering::Relaxed) && hooks::is_installed()
}

fn bucket_interp(bucket: interheap_engine::BucketId) -> Option<i64> {
    match bucket.kind() {
        BucketKind::Interpreter(id) => Some(id),
        _ => None,
    }
}

/// Whether interheap-python's allocator runs with its checking layer
/// (`INTERHEAP_CHECK=1`: buffer overruns and uses after free). If it does,
/// its findings are sent to this module's checker from now on: the
/// launcher's copy of the glue is another library than this module's.
#[pyfunction]
fn allocator_checks_on() -> bool {
    type ChecksOn = extern "C" fn() -> std::ffi::c_uint;
    type SetSink = extern "C" fn(Option<interheap_cpython::allocator_check::FindingSink>);
    // SAFETY: dlsym with RTLD_DEFAULT only searches the global symbol scope.
    let (on, sink) = unsafe {
        (
            libc::dlsym(libc::RTLD_DEFAULT, c"interheap_allocator_checks_on".as_ptr()),
            libc::dlsym(libc::RTLD_DEFAULT, c"interheap_allocator_check_sink".as_ptr()),
        )
    };
    if on.is_null() || sink.is_null() {
        return false;
    }
    // SAFETY: the C API of include/interheap_allocator.h, with these signatures.
    let (on, sink) = unsafe {
        (
            std::mem::transmute::<*mut std::ffi::c_void, ChecksOn>(on),
            std::mem::transmute::<*mut std::ffi::c_void, SetSink>(sink),
        )
    };
    if on() == 0 {
        return false;
    }
    sink(Some(memory_error_sink));
    true
}

/// Receives a finding of the launcher's allocator checking layer (see
/// `allocator_checks_on`) into this module's checker.
extern "C" fn memory_error_sink(
    kind: std::ffi::c_uint,
    domain: std::ffi::c_uint,
    size: usize,
    note: *const std::ffi::c_char,
    file: *const std::ffi::c_char,
    name: *const std::ffi::c_char,
    line: std::ffi::c_int,
) {
    use interheap_engine::checker::FindingKind;
    let kind = FindingKind::ALL.get(kind as usize).copied().unwrap_or(FindingKind::UseAfterFree);
    let domain =
        interheap_engine::Domain::ALL.get(domain as usize).copied().unwrap_or(interheap_engine::Domain::Mem);
    // SAFETY: the caller passes NUL-terminated strings valid during the call
    // (file and name are read only when not NULL).
    let text =
        |s: *const std::ffi::c_char| unsafe { std::ffi::CStr::from_ptr(s) }.to_string_lossy().into_owned();
    let note = text(note);
    let at = (!file.is_null() && !name.is_null()).then(|| interheap_engine::sites::FrameText {
        file: text(file).into(),
        name: text(name).into(),
        line,
    });
    interheap_cpython::checker::report_memory_error(kind, domain, size, note, at);
}

/// Whether blocks an isolated interpreter still holds when it ends are
/// findings (`python -m interheap check --leaks`); off after each install.
#[pyfunction]
fn set_check_leaks(on: bool) {
    interheap_cpython::checker::LEAKS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// The checker's findings, grouped by call site: dicts with `kind`,
/// `domain`, `allocated_in`, `owner` and `caller` (interpreter IDs or None),
/// `size`, `stack` ((file, function, line), innermost first), `note`,
/// `count`, `bytes`, `pairs` ((owner, caller) interpreter pairs seen) and
/// `allocated_at` (the block's allocation stack when it was sampled).
#[pyfunction]
fn check_findings(py: Python<'_>) -> PyResult<Vec<Bound<'_, PyDict>>> {
    interheap_cpython::checker::FINDINGS
        .snapshot()
        .into_iter()
        .map(|group| {
            let f = &group.first;
            let dict = PyDict::new(py);
            dict.set_item("kind", f.kind.name())?;
            dict.set_item("domain", f.domain.name())?;
            dict.set_item("allocated_in", f.allocated_in.map(|d| d.name()))?;
            dict.set_item("owner", f.owner.and_then(bucket_interp))?;
            dict.set_item("caller", bucket_interp(f.caller))?;
            dict.set_item("size", f.size)?;
            let frames = |stack: &[interheap_engine::sites::FrameText]| -> Vec<(String, String, i32)> {
                stack.iter().map(|fr| (fr.file.to_string(), fr.name.to_string(), fr.line)).collect()
            };
            dict.set_item("stack", frames(&f.stack))?;
            dict.set_item("allocated_at", frames(&f.allocated_at))?;
            dict.set_item("note", f.note.as_ref())?;
            dict.set_item("count", group.count)?;
            dict.set_item("bytes", group.bytes)?;
            let pairs: Vec<(Option<i64>, Option<i64>)> =
                group.pairs.iter().map(|(o, c)| (o.and_then(bucket_interp), bucket_interp(*c))).collect();
            dict.set_item("pairs", pairs)?;
            Ok(dict)
        })
        .collect()
}

/// The checker's totals: findings per kind, findings counted without
/// details (rate limit), and the blocks and bytes kept in quarantine.
#[pyfunction]
fn check_totals(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let totals = interheap_cpython::checker::FINDINGS.totals();
    let dict = PyDict::new(py);
    let per_kind = PyDict::new(py);
    for (kind, n) in interheap_engine::checker::FindingKind::ALL.iter().zip(totals.per_kind) {
        per_kind.set_item(kind.name(), n)?;
    }
    dict.set_item("per_kind", per_kind)?;
    dict.set_item("undetailed", totals.undetailed)?;
    dict.set_item("quarantined_blocks", totals.quarantined_blocks)?;
    dict.set_item("quarantined_bytes", totals.quarantined_bytes)?;
    Ok(dict)
}

/// Remove the hooks, restoring the allocators they wrapped. Refuses if
/// something else was installed on top of them since.
#[pyfunction]
fn uninstall() -> PyResult<()> {
    if heap_figures::reading_from_heaps() {
        heap_figures::stop_reading_from_heaps();
        return Ok(());
    }
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
    let (snap, table) = heap_figures::census();
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
            // What the hooks recorded while the interpreter lived (see
            // `interheap_cpython::interp::Origin`); None where nothing was.
            let origin = Origin::unpack(b.info);
            dict.set_item("whence", origin.and_then(|o| o.whence).map(Whence::name))?;
            dict.set_item("own_gil", origin.and_then(|o| o.own_gil))?;
            dict.set_item("own_obmalloc", origin.and_then(|o| o.own_obmalloc))?;
            let domains = PyDict::new(py);
            for domain in Domain::ALL {
                domains.set_item(domain.name(), domain_dict(py, &b.domains[domain.index()])?)?;
            }
            dict.set_item("domains", domains)?;
            dict.set_item("limit", b.budget.limit)?;
            dict.set_item("refused", b.budget.refused)?;
            dict.set_item("largest_refused", b.budget.largest_refused)?;
            dict.set_item("total_peak", b.budget.peak)?;
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
    result.set_item("adapters", adapter_list(py)?)?;
    Ok(result)
}

/// Sets (or with `None` removes) the memory limit of interpreter `id`: its
/// live bytes over the raw, mem and object domains, as the hooks count them.
/// The `interheap` package checks that the interpreter exists.
#[pyfunction]
#[pyo3(signature = (id, limit))]
fn set_limit(id: i64, limit: Option<u64>) -> PyResult<()> {
    if id < 0 {
        return Err(PyValueError::new_err(format!("invalid interpreter ID {id}")));
    }
    if let Some(l) = limit {
        if l > i64::MAX as u64 {
            return Err(PyValueError::new_err(format!("limit {l} is too large")));
        }
    }
    let bucket = interheap_engine::BucketId::for_interpreter(Some(id));
    if !TRACKER.set_limit(bucket, limit) {
        return Err(PyValueError::new_err(format!(
            "interpreter {id} cannot be limited: its ID is beyond the {} interpreters interheap keeps figures for",
            interheap_engine::ledger::MAX_BUCKETS - 2
        )));
    }
    Ok(())
}

/// The memory limit of interpreter `id`, if one is set.
#[pyfunction]
fn get_limit(id: i64) -> Option<u64> {
    if id < 0 {
        return None;
    }
    TRACKER.limit(interheap_engine::BucketId::for_interpreter(Some(id)))
}

/// Sets (or with `None` removes) the limit every interpreter with an ID of
/// at least `from_id` gets unless its own is set.
#[pyfunction]
#[pyo3(signature = (limit, from_id))]
fn set_default_limit(limit: Option<u64>, from_id: i64) -> PyResult<()> {
    if limit.is_some_and(|l| l > i64::MAX as u64) {
        return Err(PyValueError::new_err("the default limit is too large"));
    }
    TRACKER.set_default_limit(limit, from_id);
    Ok(())
}

/// Starts (True) or stops (False) watching every interpreter's exact peak of
/// live bytes over all domains (`total_peak` in the snapshot), from the live
/// bytes now; interpreters created meanwhile are watched from their start.
#[pyfunction]
fn watch_peaks(on: bool) -> PyResult<()> {
    if on && !hooks::is_installed() {
        return Err(PyRuntimeError::new_err(
            "watching peaks needs interheap's hooks: call interheap.install() first",
        ));
    }
    TRACKER.watch_peaks(on);
    Ok(())
}

/// Interpreter `id`'s figures as the hooks count them (for `interheap_interp`);
/// `None` if the hooks are not installed.
fn hooks_interp_figures(id: i64) -> Option<InterpFigures> {
    if !hooks::is_installed() || id < 0 {
        return None;
    }
    let bucket = interheap_engine::BucketId::for_interpreter(Some(id));
    let snap = TRACKER.ledger().bucket_snapshot(bucket);
    let live = snap.domains.iter().map(|d| d.live_bytes).sum();
    let mut budget = snap.budget;
    budget.limit = TRACKER.limit(bucket);
    Some(InterpFigures::new(live, &budget))
}

/// Lowers interpreter `id`'s limit in the hooks (for `interheap_interp`):
/// false if the hooks are not installed, the interpreter cannot be limited,
/// or that would raise the limit.
fn hooks_lower_limit(id: i64, limit: u64) -> bool {
    hooks::is_installed()
        && id >= 0
        && TRACKER.lower_limit(interheap_engine::BucketId::for_interpreter(Some(id)), limit)
}

/// The default limit and the first interpreter ID it applies to, or None.
#[pyfunction]
fn get_default_limit() -> Option<(u64, i64)> {
    TRACKER.default_limit()
}

/// A size in bytes from a text such as "256 MB" or "1.5 GiB" (see
/// `interheap_engine::parse_size`); ValueError for anything else.
#[pyfunction]
fn parse_size(text: &str) -> PyResult<u64> {
    interheap_engine::parse_size(text).map_err(PyValueError::new_err)
}

fn adapter_error(e: AdapterError) -> PyErr {
    match e {
        AdapterError::Invalid(_) | AdapterError::Unknown(_) => PyValueError::new_err(e.to_string()),
        _ => PyRuntimeError::new_err(e.to_string()),
    }
}

fn parse_domain(name: &str) -> PyResult<Domain> {
    Domain::ALL.into_iter().find(|d| d.name() == name).ok_or_else(|| {
        PyValueError::new_err(format!("unknown domain {name:?}: use 'raw', 'mem' or 'object'"))
    })
}

/// Installs the allocator whose struct is at `address` for `domain`, behind
/// an adapter. `kind` is "legacy" (a `PyMemAllocatorEx`) or
/// "interpreter-aware" (an `interheap_aware_allocator`). The struct is
/// copied; its functions and ctx must stay valid for the process's life.
/// Returns the adapter's ID. The `interheap.adapters` module checks the
/// allocator object and finds its address.
#[pyfunction]
#[pyo3(signature = (domain, address, kind, thread_safe, owns_memory, name))]
fn adapter_install(
    domain: &str,
    address: usize,
    kind: &str,
    thread_safe: bool,
    owns_memory: bool,
    name: &str,
) -> PyResult<u64> {
    let domain = parse_domain(domain)?;
    if address == 0 {
        return Err(PyValueError::new_err("the allocator's address is NULL"));
    }
    let options = adapters::Options { thread_safe, owns_memory };
    match kind {
        "legacy" => {
            // SAFETY: the caller (interheap.adapters) passes the address of a
            // live PyMemAllocatorEx (a ctypes structure or a capsule's pointer);
            // read_unaligned copies it without assuming alignment.
            let a = unsafe { std::ptr::read_unaligned(address as *const pyo3::ffi::PyMemAllocatorEx) };
            adapters::install_legacy(domain, &a, options, name).map_err(adapter_error)
        }
        "interpreter-aware" => {
            // SAFETY: as above, for an interheap_aware_allocator.
            let a = unsafe { std::ptr::read_unaligned(address as *const c_abi::InterheapAwareAllocator) };
            let aware = c_abi::CAware::new(&a).map_err(adapter_error)?;
            adapters::install_aware(domain, aware, options, name).map_err(adapter_error)
        }
        other => Err(PyValueError::new_err(format!("unknown adapter kind {other:?}"))),
    }
}

/// Removes adapter `id`, restoring the allocator installed before it.
#[pyfunction]
fn adapter_uninstall(id: u64) -> PyResult<()> {
    adapters::uninstall(id).map_err(adapter_error)
}

fn adapter_dict<'py>(py: Python<'py>, a: &AdapterStats) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("id", a.id)?;
    dict.set_item("name", &a.name)?;
    dict.set_item("kind", a.kind.name())?;
    dict.set_item("domain", a.domain.name())?;
    dict.set_item("mode", a.mode.name())?;
    dict.set_item("installed", a.installed)?;
    dict.set_item("on_top", a.on_top)?;
    dict.set_item("owns_memory", a.owns_memory)?;
    dict.set_item("membarrier", a.membarrier)?;
    dict.set_item("calls", a.gate.calls)?;
    dict.set_item("lock_acquisitions", a.gate.lock_acquisitions)?;
    dict.set_item("contended_acquisitions", a.gate.contended_acquisitions)?;
    dict.set_item("switched_by", a.gate.switched_by)?;
    Ok(dict)
}

/// Every adapter installed in this process (also uninstalled ones), as dicts.
#[pyfunction]
fn adapter_list(py: Python<'_>) -> PyResult<Vec<Bound<'_, PyDict>>> {
    adapters::list().iter().map(|a| adapter_dict(py, a)).collect()
}

/// The ID of the interpreter the calling thread runs in, as the hooks see it.
#[pyfunction]
fn current_interpreter_id() -> Option<i64> {
    interheap_cpython::interp::current_interpreter_id()
}

/// The interheap allocator's C API, if the process installed it (the
/// launcher, or an embedding program linked with the embedding library).
/// Looked up at run time: this module never installs the allocator itself.
struct AllocatorApi {
    installed: extern "C" fn() -> std::ffi::c_uint,
    report_json: extern "C" fn() -> *mut std::ffi::c_char,
    free_string: unsafe extern "C" fn(*mut std::ffi::c_char),
    set_limit: unsafe extern "C" fn(i64, i64, *mut std::ffi::c_char, usize) -> std::ffi::c_int,
    get_limit: extern "C" fn(i64) -> i64,
    set_default_limit: unsafe extern "C" fn(i64, i64, *mut std::ffi::c_char, usize) -> std::ffi::c_int,
}

type LimitSetter = unsafe extern "C" fn(i64, i64, *mut std::ffi::c_char, usize) -> std::ffi::c_int;

fn allocator_api() -> Option<AllocatorApi> {
    fn lookup(name: &std::ffi::CStr) -> Option<*mut std::ffi::c_void> {
        // SAFETY: dlsym with RTLD_DEFAULT only searches the global symbol scope.
        let sym = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
        (!sym.is_null()).then_some(sym)
    }
    let installed = lookup(c"interheap_allocator_installed")?;
    let report_json = lookup(c"interheap_allocator_report_json")?;
    let free_string = lookup(c"interheap_allocator_free_string")?;
    let set_limit = lookup(c"interheap_allocator_set_limit")?;
    let get_limit = lookup(c"interheap_allocator_get_limit")?;
    let set_default_limit = lookup(c"interheap_allocator_set_default_limit")?;
    // SAFETY: these symbols are the C API declared in include/interheap_allocator.h,
    // with exactly these signatures.
    unsafe {
        Some(AllocatorApi {
            installed: std::mem::transmute::<*mut std::ffi::c_void, extern "C" fn() -> std::ffi::c_uint>(
                installed,
            ),
            report_json: std::mem::transmute::<*mut std::ffi::c_void, extern "C" fn() -> *mut std::ffi::c_char>(
                report_json,
            ),
            free_string: std::mem::transmute::<
                *mut std::ffi::c_void,
                unsafe extern "C" fn(*mut std::ffi::c_char),
            >(free_string),
            set_limit: std::mem::transmute::<*mut std::ffi::c_void, LimitSetter>(set_limit),
            get_limit: std::mem::transmute::<*mut std::ffi::c_void, extern "C" fn(i64) -> i64>(get_limit),
            set_default_limit: std::mem::transmute::<*mut std::ffi::c_void, LimitSetter>(set_default_limit),
        })
    }
}

/// Bit mask of the domains the interheap allocator serves in this process
/// (raw=1, mem=2, object=4); 0 if it is not installed.
#[pyfunction]
fn allocator_domains() -> u32 {
    allocator_api().map_or(0, |api| (api.installed)())
}

/// The interheap allocator's figures as a JSON string, or None if it is not installed.
#[pyfunction]
fn allocator_report_json() -> Option<String> {
    let api = allocator_api()?;
    if (api.installed)() == 0 {
        return None;
    }
    let raw = (api.report_json)();
    if raw.is_null() {
        return None;
    }
    // SAFETY: a NUL-terminated string from the API, freed right after copying.
    let text = unsafe { std::ffi::CStr::from_ptr(raw) }.to_string_lossy().into_owned();
    // SAFETY: `raw` came from report_json and is freed once.
    unsafe { (api.free_string)(raw) };
    Some(text)
}

/// Calls one of the allocator's limit setters; ValueError with its message on failure.
fn call_limit_setter(setter: LimitSetter, a: i64, b: i64) -> PyResult<()> {
    let mut err = [0 as std::ffi::c_char; 512];
    // SAFETY: `err` has `err.len()` writable bytes, as the C API asks.
    if unsafe { setter(a, b, err.as_mut_ptr(), err.len()) } == 0 {
        return Ok(());
    }
    // SAFETY: on failure the API wrote a NUL-terminated message into `err`.
    let message = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
    Err(PyValueError::new_err(message))
}

fn allocator_limit_api() -> PyResult<AllocatorApi> {
    allocator_api()
        .ok_or_else(|| PyRuntimeError::new_err("the interheap allocator is not installed in this process"))
}

/// Sets (None: removes) interpreter `id`'s limit in the interheap allocator.
#[pyfunction]
#[pyo3(signature = (id, limit))]
fn allocator_set_limit(id: i64, limit: Option<u64>) -> PyResult<()> {
    let api = allocator_limit_api()?;
    let limit = limit.map_or(-1, |l| l.min(i64::MAX as u64) as i64);
    call_limit_setter(api.set_limit, id, limit)
}

/// Interpreter `id`'s limit in the interheap allocator, or None.
#[pyfunction]
fn allocator_get_limit(id: i64) -> PyResult<Option<u64>> {
    let api = allocator_limit_api()?;
    Ok(u64::try_from((api.get_limit)(id)).ok())
}

/// Sets (None: removes) the allocator's default limit, for IDs from `from_id` on.
#[pyfunction]
#[pyo3(signature = (limit, from_id))]
fn allocator_set_default_limit(limit: Option<u64>, from_id: i64) -> PyResult<()> {
    let api = allocator_limit_api()?;
    let limit = limit.map_or(-1, |l| l.min(i64::MAX as u64) as i64);
    call_limit_setter(api.set_default_limit, limit, from_id)
}

/// The state of the guard against CPython 3.12's raw-allocator swap
/// (gh-111924) as this module's copy of the glue knows it: set once the
/// hooks replaced the raw domain; `None` before that on 3.12.
#[pyfunction]
fn raw_swap_guard() -> Option<String> {
    interheap_cpython::raw_swap_guard::state().map(|g| g.to_string())
}

/// Starts sampling allocation sites (one allocation per `rate` bytes on
/// average; 0 stops), with repeatable gaps from `seed` if given. The hooks
/// must be installed for anything to be sampled.
#[pyfunction]
#[pyo3(signature = (rate, seed=None))]
fn sites_start(rate: u64, seed: Option<u64>) {
    interheap_cpython::sites::start(rate, seed);
}

/// The sampling rate in bytes (0: off).
#[pyfunction]
fn sites_rate() -> u64 {
    interheap_cpython::sites::SITES.rate()
}

/// Forgets every sample (sampling stays on or off as it is).
#[pyfunction]
fn sites_reset() {
    interheap_cpython::sites::SITES.reset();
}

/// Every sampled site: a list of dicts with `interp` (an ID, or None for
/// calls without a thread state), `domain`, `stack` ([(file, name, line)],
/// innermost first), `samples`, `live_samples`, `allocated_bytes` and
/// `live_bytes` (estimates).
#[pyfunction]
fn sites_snapshot(py: Python<'_>) -> PyResult<Vec<Bound<'_, PyDict>>> {
    interheap_cpython::sites::SITES
        .snapshot()
        .into_iter()
        .map(|site| {
            let dict = PyDict::new(py);
            let interp = match site.bucket.kind() {
                BucketKind::Interpreter(id) => Some(id),
                _ => None,
            };
            dict.set_item("interp", interp)?;
            dict.set_item("domain", site.domain.name())?;
            let stack: Vec<(&str, &str, i32)> =
                site.stack.iter().map(|f| (f.file.as_ref(), f.name.as_ref(), f.line)).collect();
            dict.set_item("stack", stack)?;
            dict.set_item("samples", site.totals.samples)?;
            dict.set_item("live_samples", site.totals.live_samples)?;
            dict.set_item("allocated_bytes", site.totals.allocated_bytes)?;
            dict.set_item("live_bytes", site.totals.live_bytes)?;
            Ok(dict)
        })
        .collect()
}

/// Starts recording the timeline: each interpreter's live bytes per domain
/// every `interval` seconds (a running timeline is replaced).
#[pyfunction]
fn timeline_start(interval: f64) -> PyResult<()> {
    if !(interval.is_finite() && interval > 0.0) {
        return Err(PyValueError::new_err(format!(
            "the interval must be a positive number of seconds, not {interval}"
        )));
    }
    interheap_cpython::timeline::start(std::time::Duration::from_secs_f64(interval));
    Ok(())
}

/// Stops recording the timeline (its points stay).
#[pyfunction]
fn timeline_stop(py: Python<'_>) {
    py.detach(interheap_cpython::timeline::stop);
}

/// Whether the timeline is being recorded.
#[pyfunction]
fn timeline_running() -> bool {
    interheap_cpython::timeline::is_running()
}

/// The timeline's points: (nanoseconds since start, interpreter ID or -1,
/// raw, mem, object live bytes, refused requests so far).
#[pyfunction]
fn timeline_points() -> Vec<(u64, i64, i64, i64, i64, u64)> {
    let (points, _) = interheap_cpython::timeline::points();
    points.into_iter().map(|p| (p.nanos, p.interp, p.live[0], p.live[1], p.live[2], p.refused)).collect()
}

/// When interpreters ended on the timeline: (interpreter ID, nanoseconds since start).
#[pyfunction]
fn timeline_ends() -> Vec<(i64, u64)> {
    interheap_cpython::timeline::points().1
}

#[pymodule(gil_used = false)]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(install, m)?)?;
    m.add_function(wrap_pyfunction!(figures_source, m)?)?;
    m.add_function(wrap_pyfunction!(heap_figures_available, m)?)?;
    m.add_function(wrap_pyfunction!(check_enabled, m)?)?;
    m.add_function(wrap_pyfunction!(check_findings, m)?)?;
    m.add_function(wrap_pyfunction!(set_check_leaks, m)?)?;
    m.add_function(wrap_pyfunction!(allocator_checks_on, m)?)?;
    m.add_function(wrap_pyfunction!(check_totals, m)?)?;
    m.add_function(wrap_pyfunction!(uninstall, m)?)?;
    m.add_function(wrap_pyfunction!(is_installed, m)?)?;
    m.add_function(wrap_pyfunction!(on_top, m)?)?;
    m.add_function(wrap_pyfunction!(snapshot, m)?)?;
    m.add_function(wrap_pyfunction!(current_interpreter_id, m)?)?;
    m.add_function(wrap_pyfunction!(allocator_domains, m)?)?;
    m.add_function(wrap_pyfunction!(allocator_report_json, m)?)?;
    m.add_function(wrap_pyfunction!(raw_swap_guard, m)?)?;
    m.add_function(wrap_pyfunction!(adapter_install, m)?)?;
    m.add_function(wrap_pyfunction!(adapter_uninstall, m)?)?;
    m.add_function(wrap_pyfunction!(adapter_list, m)?)?;
    m.add_function(wrap_pyfunction!(set_limit, m)?)?;
    m.add_function(wrap_pyfunction!(get_limit, m)?)?;
    m.add_function(wrap_pyfunction!(parse_size, m)?)?;
    m.add_function(wrap_pyfunction!(set_default_limit, m)?)?;
    m.add_function(wrap_pyfunction!(get_default_limit, m)?)?;
    m.add_function(wrap_pyfunction!(watch_peaks, m)?)?;
    m.add_function(wrap_pyfunction!(allocator_set_limit, m)?)?;
    m.add_function(wrap_pyfunction!(allocator_get_limit, m)?)?;
    m.add_function(wrap_pyfunction!(allocator_set_default_limit, m)?)?;
    m.add_function(wrap_pyfunction!(sites_start, m)?)?;
    m.add_function(wrap_pyfunction!(sites_rate, m)?)?;
    m.add_function(wrap_pyfunction!(sites_reset, m)?)?;
    m.add_function(wrap_pyfunction!(sites_snapshot, m)?)?;
    m.add_function(wrap_pyfunction!(timeline_start, m)?)?;
    m.add_function(wrap_pyfunction!(timeline_stop, m)?)?;
    m.add_function(wrap_pyfunction!(timeline_running, m)?)?;
    m.add_function(wrap_pyfunction!(timeline_points, m)?)?;
    m.add_function(wrap_pyfunction!(timeline_ends, m)?)?;
    Ok(())
}
