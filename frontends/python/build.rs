//! With the `launcher` feature (on in pyproject.toml, so every wheel maturin
//! builds has it), builds for the same interpreter as this extension:
//!
//! * `interheap-python` (frontends/launcher), into `wheel-data/scripts/`,
//!   which maturin packs into the wheel's `.data/scripts/` and pip installs
//!   into the environment's `bin/`;
//! * the in-interpreter module (frontends/python-interp), into
//!   `python/interheap_interp/_core<EXT_SUFFIX>` (the suffix names the
//!   interpreter, so that the builds for each one live side by side in the
//!   source tree that `maturin develop` installs).
//!
//! maturin has no way to ship a workspace's binary or a second extension
//! beside an extension module (PyO3/maturin#368), hence nested cargo builds
//! here. Without the feature (cargo build/clippy/test of the workspace), or
//! with `INTERHEAP_WHEEL_LAUNCHER=0` (`make demo`), this does nothing.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

/// What the launcher and the in-interpreter module are built from, relative
/// to the workspace root.
const LAUNCHER_SOURCES: [&str; 7] = [
    "frontends/launcher",
    "frontends/python-interp",
    "cpython",
    "engine/src",
    "engine/Cargo.toml",
    "Cargo.toml",
    "Cargo.lock",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=PYO3_PYTHON");
    // INTERHEAP_WHEEL_LAUNCHER=0 skips it too (`make demo` needs no launcher).
    println!("cargo:rerun-if-env-changed=INTERHEAP_WHEEL_LAUNCHER");
    if std::env::var_os("CARGO_FEATURE_LAUNCHER").is_none()
        || std::env::var("INTERHEAP_WHEEL_LAUNCHER").as_deref() == Ok("0")
    {
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
    let invoked =
        std::fs::metadata(out_dir.with_file_name("invoked.timestamp")).and_then(|m| m.modified()).ok();
    install(&built, &data_file, invoked);

    build_interp_module(&root, &manifest_dir, &out_dir, &python, release, invoked);
}

/// Builds the in-interpreter module (frontends/python-interp) as an extension
/// of `python`'s, into `python/interheap_interp/_core<EXT_SUFFIX>`.
fn build_interp_module(
    root: &Path,
    manifest_dir: &Path,
    out_dir: &Path,
    python: &str,
    release: bool,
    invoked: Option<SystemTime>,
) {
    let suffix = Command::new(python)
        .args(["-c", "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))"])
        .output()
        .unwrap_or_else(|e| panic!("running {python} for its EXT_SUFFIX: {e}"));
    let suffix = String::from_utf8_lossy(&suffix.stdout).trim().to_owned();
    assert!(suffix.ends_with(".so"), "unexpected EXT_SUFFIX {suffix:?} from {python}");
    let dest = manifest_dir.join("python/interheap_interp").join(format!("_core{suffix}"));
    // Rebuilt if this interpreter's copy is missing (as for the launcher above).
    println!("cargo:rerun-if-changed={}", dest.display());
    let target_dir = out_dir.ancestors().nth(3).unwrap().join("interheap-interp");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "interheap-interp", "--manifest-path"])
        .arg(root.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    if release {
        cmd.arg("--release");
    }
    // An extension module, like this one: PyO3's settings from maturin stay
    // (it must not link libpython), only our target dir goes.
    cmd.env_remove("CARGO_TARGET_DIR").env("PYO3_PYTHON", python);
    let status =
        cmd.status().unwrap_or_else(|e| panic!("could not run cargo to build interheap_interp: {e}"));
    assert!(status.success(), "building interheap_interp (frontends/python-interp) failed: {status}");
    let built = target_dir.join(if release { "release" } else { "debug" }).join("libinterheap_interp.so");
    install(&built, &dest, invoked);
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
