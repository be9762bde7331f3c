//! `interheap-python`: runs CPython exactly as `python` would, with the
//! interheap allocator installed before initialization.
//!
//! It pre-initializes CPython from its own command line (so `-E`, `-I`,
//! `-X utf8`, `PYTHONMALLOC` and the rest mean what they mean to `python`),
//! installs the allocator (`interheap_cpython::allocator`), and hands the
//! untouched command line to `Py_BytesMain`. `sys.executable` is the launcher,
//! so subprocesses (multiprocessing, `python -m test -j`, pyperf workers) run
//! on it too.
//!
//! Environment:
//! * `INTERHEAP_REPORT`: at exit, print the per-interpreter report to stderr
//!   (`1`, `-` or `stderr`) or write it as JSON to a path (`%p` becomes the
//!   process ID, so subprocesses do not overwrite each other).
//! * `INTERHEAP_ALLOCATOR`: which domains the allocator serves: unset or `1`
//!   for every domain this build supports (raw, mem and object; raw only on
//!   free-threaded builds), a comma-separated list such as `raw,mem`, or `0`
//!   for none (plain CPython). Asking for a domain the build cannot serve
//!   exits with status 2 and says why.
//! * `PYTHONMALLOC=malloc|pymalloc|mimalloc` asks CPython for that allocator,
//!   so the launcher does not install its own; `debug` (and `*_debug`) keeps
//!   CPython's debug hooks, on top of the interheap allocator.
//! * `INTERHEAP_LIMIT`, `INTERHEAP_MAIN_LIMIT`: memory limits (`"256 MB"`,
//!   `"2 GiB"`, bytes): every subinterpreter gets a limit of its own on its
//!   live mem and object bytes, once it is created; the main interpreter
//!   gets `INTERHEAP_MAIN_LIMIT`. Crossing one raises MemoryError in that
//!   interpreter only. A bad size, or a limit on a build where the allocator
//!   cannot serve mem and object (free-threaded), exits with status 2.
//! * `INTERHEAP_CHECK=1`: runs the program as `python -m interheap check
//!   --memory-errors` would (every finding of `interheap check`), with the
//!   allocator's checking layer under it (`interheap_cpython::allocator_check`:
//!   buffer overruns and uses after free, which need every block made by
//!   the allocator from the start). The program comes first (`SCRIPT | -m
//!   MODULE | -c CODE`); Python's own options go in `PYTHON*` variables.
//!   Free-threaded builds refuse it (mem and object stay CPython's mimalloc).
//! * `INTERHEAP_REQUESTED_SIZES=1`: the heaps keep the size each block was
//!   asked for, so that their figures (this launcher's report, and
//!   `interheap`'s figures with no hooks: `python -m interheap run`) are the
//!   bytes callers asked for, at a cost of about 14 instructions per
//!   allocation and free and a byte per small block. On by default when the
//!   command line runs `-m interheap` (its `run` reads them), off otherwise;
//!   `0` turns it off.

mod report;
mod text;

use std::ffi::{c_char, c_int, CString};
use std::os::unix::ffi::OsStrExt;

use interheap_cpython::allocator::{self, install_before_init_with, Domains, InstallOptions};
use interheap_engine::limits::parse_size;
use interheap_engine::Domain;
use pyo3_ffi as ffi;

fn main() {
    let mut args: Vec<CString> = std::env::args_os()
        .map(|a| CString::new(a.as_bytes()).unwrap_or_else(|_| CString::new("?").unwrap()))
        .collect();
    let checking = match requested_checking(&args) {
        Ok(checking) => checking,
        Err(message) => {
            eprintln!("interheap-python: {message}");
            std::process::exit(2);
        }
    };
    if checking {
        let check = ["-m", "interheap", "check", "--memory-errors"].map(|a| CString::new(a).unwrap());
        args.splice(1..1, check);
    }
    let mut argv: Vec<*mut c_char> = args.iter().map(|a| a.as_ptr() as *mut c_char).collect();
    argv.push(std::ptr::null_mut());
    let argc = args.len() as c_int;

    let domains = match requested_domains(std::env::var("INTERHEAP_ALLOCATOR").ok().as_deref()) {
        Ok(domains) => domains,
        Err(message) => {
            eprintln!("interheap-python: {message}");
            std::process::exit(2);
        }
    };
    let requested_sizes = match requested_sizes(&args) {
        Ok(on) => on,
        Err(message) => {
            eprintln!("interheap-python: {message}");
            std::process::exit(2);
        }
    };
    let limits = match requested_limits() {
        Ok(limits) => limits,
        Err(message) => {
            eprintln!("interheap-python: {message}");
            std::process::exit(2);
        }
    };
    let pythonmalloc = std::env::var("PYTHONMALLOC").unwrap_or_default();
    let wants_ours = domains.0 != 0
        && matches!(
            pythonmalloc.as_str(),
            "" | "debug" | "pymalloc_debug" | "malloc_debug" | "mimalloc_debug"
        );
    let debug_hooks = pythonmalloc.ends_with("debug");

    // SAFETY: the pre-init config is initialised by CPython before use, and
    // argv is a NULL-terminated array of NUL-terminated strings that outlives
    // the calls (it lives until the process exits).
    unsafe {
        let mut preconfig = std::mem::MaybeUninit::<ffi::PyPreConfig>::zeroed();
        ffi::PyPreConfig_InitPythonConfig(preconfig.as_mut_ptr());
        let status = ffi::Py_PreInitializeFromBytesArgs(
            preconfig.as_ptr(),
            argc as ffi::Py_ssize_t,
            argv.as_mut_ptr(),
        );
        if ffi::PyStatus_Exception(status) != 0 {
            ffi::Py_ExitStatusException(status);
        }
    }
    if checking && !(wants_ours && domains.contains(Domain::Mem) && domains.contains(Domain::Object)) {
        eprintln!(
            "interheap-python: INTERHEAP_CHECK=1 needs the interheap allocator to serve the mem and object \
             domains (INTERHEAP_ALLOCATOR or PYTHONMALLOC chose otherwise)"
        );
        std::process::exit(2);
    }
    if wants_ours {
        if let Err(e) = install_before_init_with(domains, InstallOptions { checking, requested_sizes }) {
            eprintln!("interheap-python: the interheap allocator was not installed: {e}");
            std::process::exit(2);
        }
        if debug_hooks {
            // SAFETY: called before initialization, on top of the allocator just installed.
            unsafe { ffi::PyMem_SetupDebugHooks() };
        }
    }
    if let Err(message) = apply_limits(limits) {
        eprintln!("interheap-python: {message}");
        std::process::exit(2);
    }
    report::register_at_exit();
    text::release_start_up_pages();
    // SAFETY: as above; Py_BytesMain runs Python and finalizes it.
    let code = unsafe { ffi::Py_BytesMain(argc, argv.as_mut_ptr()) };
    std::process::exit(code);
}

/// Whether the heaps keep requested sizes (`INTERHEAP_REQUESTED_SIZES`, see
/// the module docs): by default, when Python's own options are followed by
/// `-m interheap`.
fn requested_sizes(args: &[CString]) -> Result<bool, String> {
    match std::env::var("INTERHEAP_REQUESTED_SIZES").ok().as_deref() {
        Some("1") => return Ok(true),
        Some("0") => return Ok(false),
        None | Some("") => {}
        Some(other) => {
            return Err(format!("INTERHEAP_REQUESTED_SIZES={other:?}: use 1 (keep them) or 0 (do not)"));
        }
    }
    Ok(runs_interheap(args.iter().skip(1).map(|a| a.as_bytes())))
}

/// Whether a command line (without the program name) runs `-m interheap`:
/// options up to the first that is not one, and `-m interheap` (or
/// `-minterheap`) there. Options that take a value (`-X`, `-W`, `-c`...)
/// are skipped with it.
fn runs_interheap<'a>(mut args: impl Iterator<Item = &'a [u8]>) -> bool {
    while let Some(arg) = args.next() {
        match arg {
            b"-m" => return args.next() == Some(b"interheap".as_slice()),
            b"-minterheap" => return true,
            b"-X" | b"-W" | b"--check-hash-based-pycs" => {
                args.next();
            }
            _ if arg.starts_with(b"-") && arg != b"-" && !arg.starts_with(b"-c") => {}
            _ => return false,
        }
    }
    false
}

/// `INTERHEAP_LIMIT` and `INTERHEAP_MAIN_LIMIT` (see the module docs): the
/// subinterpreters' and main's limits.
struct Limits {
    each: Option<u64>,
    main: Option<u64>,
}

fn requested_limits() -> Result<Limits, String> {
    let read = |name: &str| -> Result<Option<u64>, String> {
        match std::env::var(name) {
            Err(_) => Ok(None),
            Ok(v) if v.trim().is_empty() => Ok(None),
            Ok(v) => parse_size(&v).map(Some).map_err(|e| format!("{name}={v:?}: {e}")),
        }
    };
    Ok(Limits { each: read("INTERHEAP_LIMIT")?, main: read("INTERHEAP_MAIN_LIMIT")? })
}

/// Whether `INTERHEAP_CHECK` asks for checking, and whether it can be done
/// with this command line and this build (see the module docs).
fn requested_checking(args: &[CString]) -> Result<bool, String> {
    match std::env::var("INTERHEAP_CHECK").ok().as_deref() {
        None | Some("") | Some("0") => return Ok(false),
        Some("1") => {}
        Some(other) => return Err(format!("INTERHEAP_CHECK={other:?}: use 1 (check) or 0 (do not)")),
    }
    if !Domains::supported().contains(Domain::Mem) {
        return Err("INTERHEAP_CHECK=1: this is a free-threaded build: the mem and object domains stay \
             CPython's mimalloc, so the use-after-free and buffer-overrun checks (the interheap allocator \
             must make every block) cannot run here; python -m interheap check runs the other checks"
            .into());
    }
    let first = args.get(1).map(|a| a.to_bytes());
    match first {
        Some(b"-m") | Some(b"-c") => Ok(true),
        Some(a) if a.starts_with(b"-m") || a.starts_with(b"-c") || !a.starts_with(b"-") => Ok(true),
        _ => Err(
            "INTERHEAP_CHECK=1 runs interheap-python -m interheap check --memory-errors PROGRAM: give the \
             program first (SCRIPT | -m MODULE | -c CODE) and Python's own options in PYTHON* environment \
             variables"
                .into(),
        ),
    }
}

/// Sets the limits once the allocator is installed (before initialization).
fn apply_limits(limits: Limits) -> Result<(), String> {
    if limits.each.is_none() && limits.main.is_none() {
        return Ok(());
    }
    if !allocator::serves_interpreters() {
        let why = if Domains::supported().contains(Domain::Mem) {
            "the interheap allocator does not serve the mem and object domains in this run \
             (INTERHEAP_ALLOCATOR or PYTHONMALLOC chose otherwise)"
        } else {
            "this is a free-threaded build: mem and object stay CPython's mimalloc, which the \
             interheap allocator cannot limit"
        };
        return Err(format!(
            "INTERHEAP_LIMIT / INTERHEAP_MAIN_LIMIT cannot be applied: {why}; run the program with \
             python -m interheap run --limit SIZE instead (interheap's hooks limit every domain)"
        ));
    }
    if let Some(main) = limits.main {
        allocator::set_limit(0, Some(main)).map_err(|e| e.to_string())?;
    }
    allocator::set_default_limit(limits.each, 1).map_err(|e| e.to_string())
}

/// The domains `INTERHEAP_ALLOCATOR` asks for (see the module docs).
fn requested_domains(value: Option<&str>) -> Result<Domains, String> {
    let value = match value {
        None | Some("") | Some("1") => return Ok(Domains::supported()),
        Some("0") => return Ok(Domains(0)),
        Some(v) => v,
    };
    let mut domains = Domains(0);
    for name in value.split(',').map(str::trim) {
        domains.0 |= match name {
            "raw" => Domains::RAW.0,
            "mem" => Domains::MEM.0,
            "object" => Domains::OBJECT.0,
            "all" => Domains::ALL.0,
            other => {
                return Err(format!(
                    "INTERHEAP_ALLOCATOR={value:?}: unknown domain {other:?} (use 0, 1, or a comma-separated \
                     list of raw, mem, object)"
                ))
            }
        };
    }
    Ok(domains)
}

#[cfg(test)]
mod tests {
    use super::runs_interheap;

    fn runs(line: &str) -> bool {
        runs_interheap(line.split_whitespace().map(str::as_bytes))
    }

    #[test]
    fn finds_dash_m_interheap_after_python_options_only() {
        assert!(runs("-m interheap run app.py"));
        assert!(runs("-I -X dev -W error -minterheap"));
        assert!(runs("-u -Xutf8 -m interheap"));
        assert!(!runs("-m interheapx"));
        assert!(!runs("app.py -m interheap"));
        assert!(!runs("-c import -m interheap"));
        assert!(!runs("-X -m interheap"));
        assert!(!runs(""));
    }
}
