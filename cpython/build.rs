//! Exposes the target interpreter's build flags (`Py_GIL_DISABLED`, `Py_3_13`, ...)
//! as cfgs, so the glue can tell free-threaded builds apart at compile time,
//! and compiles the stack reader (`src/stack.c`) against that interpreter's
//! own headers: it reads CPython's frame structs, whose layout is per version.
use std::process::Command;

fn main() {
    pyo3_build_config::use_pyo3_cfgs();
    // The hooks' per-thread pointer (initial-exec TLS, which Rust cannot ask for).
    println!("cargo:rerun-if-changed=src/thread_slot.c");
    cc::Build::new().file("src/thread_slot.c").warnings_into_errors(true).compile("interheap_thread_slot");
    println!("cargo:rerun-if-changed=src/stack.c");
    println!("cargo:rerun-if-env-changed=PYO3_PYTHON");
    let config = pyo3_build_config::get();
    let python = config.executable().map(str::to_owned).or_else(|| std::env::var("PYO3_PYTHON").ok());
    let Some(include) = python.as_deref().and_then(include_dir) else {
        // Only a configuration that names no runnable interpreter gets here
        // (PyO3's own build refuses it, or linking fails on the reader).
        println!("cargo:warning=no runnable target interpreter: the stack reader (src/stack.c) is not built");
        return;
    };
    cc::Build::new()
        .file("src/stack.c")
        .include(&include)
        // -Wall -Werror for our code; CPython's internal headers have unused parameters (-Wextra).
        .extra_warnings(false)
        .warnings_into_errors(true)
        .compile("interheap_stack");
}

/// Where `python`'s headers are (`sysconfig`'s "include" path).
fn include_dir(python: &str) -> Option<String> {
    let out = Command::new(python)
        .args(["-c", "import sysconfig; print(sysconfig.get_path('include'))"])
        .output()
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
