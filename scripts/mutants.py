#!/usr/bin/env python3
"""Mutation check of the loom models: each mutation weakens one ordering or
drops one step of a lock-free protocol, and the model test named with it
must then fail. A mutation that survives means the model does not check
what its documentation says it checks.

Usage: scripts/mutants.py [NAME-SUBSTRING]
The mutations run in a copy of the sources (the working tree is never
changed), with the target directory in the cache.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("INTERHEAP_CACHE", Path.home() / ".cache" / "interheap"))

# (name, package, test filter, file, text, mutated text). Each text must
# occur exactly once in its file.
MUTATIONS = [
    (
        "stack: push's CAS Release -> Relaxed",
        "interheap-sync",
        "stack_pushes_are_drained_once",
        "sync/src/stack.rs",
        "compare_exchange_weak(head, node, Release, Relaxed)",
        "compare_exchange_weak(head, node, Relaxed, Relaxed)",
    ),
    (
        "stack: take_all's swap Acquire -> Relaxed",
        "interheap-sync",
        "stack_pushes_are_drained_once",
        "sync/src/stack.rs",
        "self.head.swap(ptr::null_mut(), Acquire)",
        "self.head.swap(ptr::null_mut(), Relaxed)",
    ),
    (
        "stack: link written after the CAS instead of before",
        "interheap-sync",
        "stack_pushes_are_drained_once",
        "sync/src/stack.rs",
        """            unsafe { L::set_next(node, head) };
            match self.head.compare_exchange_weak(head, node, Release, Relaxed) {
                Ok(_) => return,""",
        """            match self.head.compare_exchange_weak(head, node, Release, Relaxed) {
                Ok(_) => {
                    // SAFETY: mutation.
                    unsafe { L::set_next(node, head) };
                    return;
                }""",
    ),
    (
        "spin lock: lock's CAS Acquire -> Relaxed",
        "interheap-sync",
        "spin_lock_excludes_and_publishes",
        "sync/src/spin_lock.rs",
        """    pub fn lock(&self) -> SpinGuard<'_, T, M> {
        if self.locked.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {""",
        """    pub fn lock(&self) -> SpinGuard<'_, T, M> {
        if self.locked.compare_exchange_weak(false, true, Ordering::Relaxed, Ordering::Relaxed).is_err() {""",
    ),
    (
        "spin lock: unlock Release -> Relaxed",
        "interheap-sync",
        "spin_lock_excludes_and_publishes",
        "sync/src/spin_lock.rs",
        "        self.lock.locked.store(false, Ordering::Release);",
        "        self.lock.locked.store(false, Ordering::Relaxed);",
    ),
    (
        "remote frees: no fence between the push and the state re-check",
        "interheap-engine",
        "frees_racing_end_are_never_stranded",
        "engine/src/heap/remote.rs",
        """                unsafe { self.stack.push(block) };
                // The store-buffering hand-off with `end` (module docs).
                M::fence(SeqCst);""",
        """                unsafe { self.stack.push(block) };""",
    ),
    (
        "remote frees: no fence between end's state store and its drain",
        "interheap-engine",
        "frees_racing_end_are_never_stranded",
        "engine/src/heap/remote.rs",
        """        self.state.store(ENDED, Release);
        // The store-buffering hand-off with `free_foreign` (module docs).
        M::fence(SeqCst);""",
        """        self.state.store(ENDED, Release);""",
    ),
    (
        "remote frees: no re-check of the state after the push",
        "interheap-engine",
        "frees_racing_end_are_never_stranded",
        "engine/src/heap/remote.rs",
        """                if self.state.load(Relaxed) == ENDED {
                    let _guard = self.lock.lock();""",
        """                if false {
                    let _guard = self.lock.lock();""",
    ),
]


def copy_tree(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True, capture_output=True
    ).stdout.split(b"\0")
    for f in files:
        if not f:
            continue
        src = ROOT / os.fsdecode(f)
        if src.is_file():
            (dest / os.fsdecode(f)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / os.fsdecode(f))


def main() -> int:
    wanted = sys.argv[1] if len(sys.argv) > 1 else ""
    chosen = [m for m in MUTATIONS if wanted in m[0]]
    env = dict(os.environ, CARGO_TARGET_DIR=str(CACHE / "target" / "mutants"))
    survived = []
    with tempfile.TemporaryDirectory(prefix="interheap-mutants-") as tmp:
        work = Path(tmp)
        copy_tree(work)
        for name, package, test, file, text, mutated in chosen:
            path = work / file
            original = path.read_text()
            if original.count(text) != 1:
                print(f"MUTATION NOT APPLICABLE ({original.count(text)} matches): {name}")
                survived.append(name)
                continue
            path.write_text(original.replace(text, mutated))
            start = time.monotonic()
            run = subprocess.run(
                ["cargo", "test", "--quiet", "-p", package, "--lib", test],
                cwd=work,
                env=env,
                capture_output=True,
                text=True,
            )
            path.write_text(original)
            took = time.monotonic() - start
            failed_tests = "test result: FAILED" in run.stdout
            if run.returncode != 0 and failed_tests:
                print(f"caught    ({took:4.0f} s) {name}  [{test}]")
            elif run.returncode != 0:
                print(f"BUILD FAILED ({took:4.0f} s) {name}\n{run.stderr[-3000:]}")
                survived.append(name)
            else:
                print(f"SURVIVED  ({took:4.0f} s) {name}  [{test}]")
                survived.append(name)
    print(f"{len(chosen) - len(survived)} of {len(chosen)} mutations caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
