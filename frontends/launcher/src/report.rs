//! The per-interpreter report the launcher prints or writes at exit.

use std::collections::BTreeMap;
use std::io::Write;

use interheap_cpython::allocator::{self, KIND_INTERPRETER};
use interheap_cpython::raw_swap_guard::SwapGuard;
use interheap_engine::heap::HeapSnapshot;
use interheap_engine::Domain;

/// Where the report goes, from `INTERHEAP_REPORT`.
enum Target {
    Stderr,
    Json(String),
}

fn target() -> Option<Target> {
    let value = std::env::var("INTERHEAP_REPORT").ok()?;
    match value.as_str() {
        "" | "0" => None,
        "1" | "-" | "stderr" => Some(Target::Stderr),
        path => Some(Target::Json(path.replace("%p", &std::process::id().to_string()))),
    }
}

extern "C" fn report_at_exit() {
    match target() {
        Some(Target::Stderr) => {
            let _ = std::io::stderr().write_all(table().as_bytes());
        }
        Some(Target::Json(path)) => {
            if let Err(e) = std::fs::write(&path, allocator::report_json()) {
                eprintln!("interheap-python: could not write the report to {path}: {e}");
            }
        }
        None => {}
    }
}

/// Registers the report to run when the process exits (after finalization,
/// also when Python calls `exit()` itself).
pub fn register_at_exit() {
    if target().is_some() {
        // SAFETY: registering a plain extern "C" function with libc's atexit.
        unsafe { libc::atexit(report_at_exit) };
    }
}

fn human(bytes: i128) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value.abs() >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", units[unit])
    }
}

/// The report as a table: one row per interpreter and domain, then the
/// shared heap (raw calls and calls without a thread state).
pub fn table() -> String {
    let installed = allocator::installed();
    let mut out = String::new();
    if installed.0 == 0 {
        out.push_str("interheap: the interheap allocator is not installed in this process\n");
        return out;
    }
    let unit = if allocator::keeps_requested_sizes() { "bytes asked for" } else { "block sizes" };
    out.push_str(&format!(
        "interheap allocator report (serving: {}; live and peak in {unit})\n",
        installed.names().join(", ")
    ));
    match interheap_cpython::raw_swap_guard::state() {
        None | Some(SwapGuard::NotNeeded) => {}
        Some(guard) => out.push_str(&format!("raw-swap guard (CPython 3.12, gh-111924): {guard}\n")),
    }
    out.push_str(&line([
        "interpreter",
        "state",
        "domain",
        "live",
        "peak",
        "live blocks",
        "allocs",
        "frees",
        "remote frees",
        "mapped",
    ]));
    let snaps = allocator::heap_snapshots();
    let mut interpreters: BTreeMap<i64, Vec<&HeapSnapshot>> = BTreeMap::new();
    let mut shared: Vec<&HeapSnapshot> = Vec::new();
    for s in &snaps {
        if s.label.kind == KIND_INTERPRETER {
            interpreters.entry(s.label.id).or_default().push(s);
        } else {
            shared.push(s);
        }
    }
    for (id, heaps) in &interpreters {
        let mut first = true;
        let mut heaps = heaps.clone();
        heaps.sort_by_key(|s| s.label.part);
        for s in heaps {
            let name = if !first {
                String::new()
            } else if *id == 0 {
                "main (0)".to_string()
            } else {
                format!("interp {id}")
            };
            let state = if !first {
                ""
            } else if s.ended {
                "destroyed"
            } else {
                "alive"
            };
            first = false;
            let domain = Domain::from_index(s.label.part as usize).map_or("?", Domain::name);
            out.push_str(&line([
                &name,
                state,
                domain,
                &human(s.live_bytes as i128),
                &human(s.peak_bytes as i128),
                &s.live_blocks().to_string(),
                &s.allocations().to_string(),
                &s.frees().to_string(),
                &s.remote_frees().to_string(),
                &human(s.mapped_bytes as i128),
            ]));
        }
    }
    let sum = |f: &dyn Fn(&HeapSnapshot) -> u64| shared.iter().map(|s| f(s) as u128).sum::<u128>() as u64;
    let live: i128 = shared.iter().map(|s| s.live_bytes as i128).sum();
    out.push_str(&line([
        "shared",
        &format!("{} heaps", shared.len()),
        "raw*",
        &human(live),
        "-",
        &sum(&|s| s.live_blocks()).to_string(),
        &sum(&|s| s.allocations()).to_string(),
        &sum(&|s| s.frees()).to_string(),
        &sum(&|s| s.remote_frees()).to_string(),
        &human(sum(&|s| s.mapped_bytes) as i128),
    ]));
    out.push_str(
        "raw*: raw calls, and mem/object calls made without a thread state. Bytes are block sizes.\n",
    );
    out.push_str(&limits_section(interpreters.keys().copied()));
    out
}

/// The "memory limits" lines: each interpreter with a limit or a refusal.
fn limits_section(ids: impl Iterator<Item = i64>) -> String {
    let mut out = String::new();
    for id in ids {
        let Some(b) = allocator::budget(id) else { continue };
        if b.limit.is_none() && b.refused == 0 {
            continue;
        }
        if out.is_empty() {
            out.push_str("memory limits (live mem and object bytes; exact to one page per size class):\n");
        }
        let name = if id == 0 { "main (0)".to_string() } else { format!("interp {id}") };
        let limit = b.limit.map_or("none".to_string(), |l| human(l as i128));
        out.push_str(&format!("  {name:<14} limit {limit:>10}   refused {}", b.refused));
        if b.refused > 0 {
            out.push_str(&format!(" (largest {})", human(b.largest_refused as i128)));
        }
        out.push('\n');
    }
    out
}

/// One row of the table: three left-aligned columns, then seven right-aligned ones.
fn line(cells: [&str; 10]) -> String {
    format!(
        "{:<16}{:<11}{:<8}{:>11}{:>11}{:>13}{:>13}{:>13}{:>13}{:>11}\n",
        cells[0], cells[1], cells[2], cells[3], cells[4], cells[5], cells[6], cells[7], cells[8], cells[9]
    )
}
