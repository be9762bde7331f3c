//! Exposes the target interpreter's build flags as cfgs (`Py_GIL_DISABLED`).
//!
//! With the `launcher` feature (on in pyproject.toml, so every wheel maturin
//! builds has it), builds `interheap-python` (frontends/launcher) for the same
//! interpreter as this extension and puts it in `wheel-data/scripts/`, which
//! maturin packs into the wheel's `.data/scripts/` and pip installs into the
//! environment's `bin/`. maturin has no way to ship a workspace's binary
//! beside an extension module (PyO3/maturin#368), hence a nested cargo
//! build here. Without the feature (cargo build/clippy/test of the workspace)
//! this does nothing; with `INTERHEAP_WHEEL_LAUNCHER=0` it builds no launcher
//! and removes any other interpreter's from `wheel-data/`, so none ships.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

/// What the launcher is built from, relative to the workspace root.
const LAUNCHER_SOURCES: [&str; 6] =
    ["frontends/launcher", "cpython", "engine/src", "engine/Cargo.toml", "Cargo.toml", "Cargo.lock"];

fn main() {
    // `Py_GIL_DISABLED` and the version cfgs, for the in-interpreter module's slots.
    pyo3_build_config::use_pyo3_cfgs();
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=PYO3_PYTHON");
    // INTERHEAP_WHEEL_LAUNCHER=0 skips it too (`make demo` needs no launcher).
    println!("cargo:rerun-if-env-changed=INTERHEAP_WHEEL_LAUNCHER");
    if std::env::var_os("CARGO_FEATURE_LAUNCHER").is_none() {
        return;
    }
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.join("../..");
    // The binary maturin packs. Every target dir (one per interpreter) writes
    // this one file, so this script reruns when the file is missing or newer
    // than this target dir's last run: then another interpreter's launcher
    // may be there (install() gives it this run's start time as mtime).
    let data_file = manifest_dir.join("wheel-data/scripts/interheap-python-bin");
    println!("cargo:rerun-if-changed={}", data_file.display());
    if std::env::var("INTERHEAP_WHEEL_LAUNCHER").as_deref() == Ok("0") {
        // No launcher for this build, so none may ship: the file is whichever
        // interpreter's launcher a full build made last, and maturin would
        // install it into this environment as its interheap-python.
        match std::fs::remove_file(&data_file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("could not remove {}: {e}", data_file.display()),
        }
        return;
    }
    // Cargo checks these for changes (directories recursively); the nested
    // build below decides itself what to recompile.
    for path in LAUNCHER_SOURCES {
        println!("cargo:rerun-if-changed={}", root.join(path).display());
    }

    // The interpreter PyO3 builds this extension for (maturin sets PYO3_PYTHON).
    let config = pyo3_build_config::get();
    let python = config
        .executable()
        .map(str::to_owned)
        .or_else(|| std::env::var("PYO3_PYTHON").ok())
        .expect("no Python interpreter for the launcher: set PYO3_PYTHON");

    // A target dir of its own (cargo's lock on ours is held while we run),
    // kept beside ours so that it is cached with it.
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let target_dir = out_dir.ancestors().nth(3).unwrap().join("interheap-launcher");
    let release = std::env::var("PROFILE").as_deref() == Ok("release");

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("-p")
        .arg("interheap-launcher")
        .arg("--manifest-path")
        .arg(root.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    if release {
        cmd.arg("--release");
    }
    // The launcher embeds CPython, so it must link libpython: drop what tells
    // PyO3 that it builds an extension module (maturin sets it for us).
    for var in ["PYO3_BUILD_EXTENSION_MODULE", "PYO3_CONFIG_FILE", "CARGO_TARGET_DIR"] {
        cmd.env_remove(var);
    }
    cmd.env("PYO3_PYTHON", &python);
    let status = cmd.status().unwrap_or_else(|e| panic!("could not run cargo to build the launcher: {e}"));
    assert!(status.success(), "building interheap-python (frontends/launcher) failed: {status}");

    let built = target_dir.join(if release { "release" } else { "debug" }).join("interheap-python");
    // Cargo's start time for this run: the copy gets it as its mtime (below).
    let invoked = std::fs::metadata(out_dir.with_file_name("invoked.timestamp")).and_then(|m| m.modified());
    install(&built, &data_file, invoked.ok());
}

/// Copies the binary through a temporary file and a rename, so that a reader
/// (maturin, a running install) never sees a half-written one. With `mtime`
/// (the time cargo started this run, against which it compares
/// rerun-if-changed paths next time) the copy counts as unchanged for this
/// target dir until another build (another interpreter's) rewrites it.
fn install(from: &Path, to: &Path, mtime: Option<SystemTime>) {
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp)
        .unwrap_or_else(|e| panic!("copying {} to {}: {e}", from.display(), tmp.display()));
    if let Some(mtime) = mtime {
        let file = std::fs::File::options().write(true).open(&tmp);
        file.and_then(|f| f.set_modified(mtime))
            .unwrap_or_else(|e| panic!("setting the mtime of {}: {e}", tmp.display()));
    }
    std::fs::rename(&tmp, to).unwrap_or_else(|e| panic!("renaming {}: {e}", tmp.display()));
}
