//! A timeline of each interpreter's exact live bytes per domain, as the hooks
//! count them: a background thread reads the tracker's figures every
//! interval and keeps a point whenever an interpreter's figures changed.
//!
//! The thread only reads atomics (the ledger's counters, through
//! [`interheap_engine::Tracker::snapshot`]); it never calls Python or holds a
//! GIL, so it reads while every interpreter runs and costs the program
//! nothing but its own CPU time. A point also marks when an interpreter first
//! appeared and when its limit refused a request (the budget's count grew).
//! A `fork` child has no recorder thread: there the timeline reads as
//! stopped, with the points the parent had (if it can take them at once).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use interheap_engine::ledger::BucketKind;
use interheap_engine::Domain;

/// One reading of one interpreter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Point {
    /// Nanoseconds since the timeline started.
    pub nanos: u64,
    /// The interpreter's ID (-1: calls made without a thread state).
    pub interp: i64,
    /// Live bytes per domain, indexed by [`Domain::index`].
    pub live: [i64; Domain::COUNT],
    /// Requests its limit has refused so far.
    pub refused: u64,
}

/// What the recorder thread shares: the points, and each ended
/// interpreter's end (nanoseconds since the timeline started).
#[derive(Default)]
struct Recorded {
    points: Vec<Point>,
    ends: Vec<(i64, u64)>,
}

struct Recorder {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    points: Arc<Mutex<Recorded>>,
    /// The process that started the thread: a `fork` child has no such
    /// thread (and must not join it, nor wait for a lock it held).
    pid: u32,
}

impl Recorder {
    fn forked(&self) -> bool {
        self.pid != std::process::id()
    }
}

static RECORDER: Mutex<Option<Recorder>> = Mutex::new(None);

/// Longest timeline kept, in points (about 100 MB); later points are dropped.
const MAX_POINTS: usize = 4_000_000;

/// Starts recording every `interval` (a timeline already running is
/// replaced, and its points dropped).
pub fn start(interval: Duration) {
    stop();
    let stop_flag = Arc::new(AtomicBool::new(false));
    let points = Arc::new(Mutex::new(Recorded::default()));
    let (flag, sink) = (stop_flag.clone(), points.clone());
    let thread = std::thread::Builder::new()
        .name("interheap-timeline".into())
        .spawn(move || record(interval, &flag, &sink))
        .ok();
    *RECORDER.lock().unwrap_or_else(|e| e.into_inner()) =
        Some(Recorder { stop: stop_flag, thread, points, pid: std::process::id() });
}

/// Stops recording; the points stay readable through [`points`].
pub fn stop() {
    let mut guard = RECORDER.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(recorder) = guard.as_mut() {
        recorder.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = recorder.thread.take() {
            // In a fork child the thread does not exist: forget it.
            if !recorder.forked() {
                let _ = thread.join();
            }
        }
    }
}

/// Whether a timeline is being recorded.
pub fn is_running() -> bool {
    let guard = RECORDER.lock().unwrap_or_else(|e| e.into_inner());
    guard.as_ref().is_some_and(|r| r.thread.is_some() && !r.forked())
}

/// The points recorded so far (of the running timeline, or the last one),
/// and the ends of interpreters: (interpreter ID, nanoseconds since start).
pub fn points() -> (Vec<Point>, Vec<(i64, u64)>) {
    let recorder = RECORDER.lock().unwrap_or_else(|e| e.into_inner());
    let Some((sink, forked)) = recorder.as_ref().map(|r| (r.points.clone(), r.forked())) else {
        return (Vec::new(), Vec::new());
    };
    drop(recorder);
    let read = |r: &Recorded| (r.points.clone(), r.ends.clone());
    if forked {
        // The parent's thread may have held the lock at the fork: never wait.
        return sink.try_lock().map(|r| read(&r)).unwrap_or_default();
    }
    let recorded = sink.lock().unwrap_or_else(|e| e.into_inner());
    read(&recorded)
}

fn record(interval: Duration, stop: &AtomicBool, sink: &Mutex<Recorded>) {
    let start = crate::interp_end::monotonic_ns();
    // Per interpreter, its figures at its last point.
    let mut last: HashMap<i64, ([i64; Domain::COUNT], u64)> = HashMap::new();
    let mut ended: HashMap<i64, u64> = HashMap::new();
    loop {
        let nanos = crate::interp_end::monotonic_ns().saturating_sub(start);
        let snap = crate::heap_figures::snapshot();
        let mut fresh = Vec::new();
        let mut fresh_ends = Vec::new();
        for bucket in &snap.buckets {
            let interp = match bucket.kind {
                BucketKind::Interpreter(id) => id,
                BucketKind::NoInterpreter => -1,
                BucketKind::OverflowInterpreters => continue,
            };
            let live = Domain::ALL.map(|d| bucket.domains[d.index()].live_bytes);
            let refused = bucket.budget.refused;
            if last.insert(interp, (live, refused)) != Some((live, refused)) {
                fresh.push(Point { nanos, interp, live, refused });
            }
            // An end before the timeline started is not on it.
            if bucket.ended_at > start && !ended.contains_key(&interp) {
                ended.insert(interp, bucket.ended_at);
                fresh_ends.push((interp, bucket.ended_at - start));
            }
        }
        if !fresh.is_empty() || !fresh_ends.is_empty() {
            let mut recorded = sink.lock().unwrap_or_else(|e| e.into_inner());
            let room = MAX_POINTS.saturating_sub(recorded.points.len());
            recorded.points.extend(fresh.into_iter().take(room));
            recorded.ends.extend(fresh_ends);
        }
        if stop.load(Ordering::Relaxed) {
            return;
        }
        std::thread::sleep(interval);
    }
}
