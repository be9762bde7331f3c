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
    (
        "nursery: evict takes the block with a store instead of a CAS",
        "interheap-engine",
        "eviction_racing_a_foreign_free_moves_the_block_once",
        "engine/src/nursery.rs",
        "if self.key.compare_exchange(old, old | EVICTING, Ordering::AcqRel, Ordering::Acquire).is_err() {",
        "if { self.key.store(old | EVICTING, Ordering::Release); false } {",
    ),
    (
        "nursery: claim takes the block with a store instead of a CAS",
        "interheap-engine",
        "eviction_racing_a_foreign_free_moves_the_block_once",
        "engine/src/nursery.rs",
        "if self.key.compare_exchange(addr, 0, Ordering::AcqRel, Ordering::Acquire).is_ok() {",
        "if { self.key.store(0, Ordering::Release); true } {",
    ),
    (
        "nursery: claim does not wait out an eviction in progress",
        "interheap-engine",
        "eviction_racing_a_foreign_free_moves_the_block_once",
        "engine/src/nursery.rs",
        "            if key == addr | EVICTING {",
        "            if false {",
    ),
    (
        "nursery: evict clears the slot before inserting the block",
        "interheap-engine",
        "eviction_racing_a_foreign_free_moves_the_block_once",
        "engine/src/nursery.rs",
        "table.insert_then(old, BlockRecord::unpack(packed), || self.key.store(0, Ordering::Release))",
        """self.key.store(0, Ordering::Release);
        table.insert_then(old, BlockRecord::unpack(packed), || ())""",
    ),
    (
        "nursery: foreign free without the table lookup after the scan",
        "interheap-engine",
        "eviction_racing_a_foreign_free_moves_the_block_once",
        "engine/src/nursery.rs",
        "    slots.find_map(|s| s.claim(addr)).or_else(|| table.remove(addr))",
        "    slots.find_map(|s| s.claim(addr))",
    ),
    (
        "nursery: record writes the new record before evicting the old block",
        "interheap-engine",
        "eviction_racing_a_foreign_free_moves_the_block_once",
        "engine/src/nursery.rs",
        """        let old = self.key.load(Ordering::Acquire);
        let mut displaced = None;""",
        """        let old = self.key.load(Ordering::Acquire);
        self.packed.store(rec.pack(), Ordering::Relaxed);
        let mut displaced = None;""",
    ),
    (
        "nursery: record_if_empty does not check that the slot is empty",
        "interheap-engine",
        "fast_recording_racing_a_foreign_free_loses_no_block",
        "engine/src/nursery.rs",
        """        if self.key.load(Ordering::Relaxed) != 0 {
            return false;
        }
        self.packed.store(packed(), Ordering::Relaxed);""",
        "        self.packed.store(packed(), Ordering::Relaxed);",
    ),
    (
        "nursery: evict clears the slot after releasing the shard lock",
        "interheap-engine",
        "a_fork_child_does_not_resurrect_a_block_freed_during_its_eviction",
        "engine/src/nursery.rs",
        "table.insert_then(old, BlockRecord::unpack(packed), || self.key.store(0, Ordering::Release))",
        """let displaced = table.insert_then(old, BlockRecord::unpack(packed), || ());
        self.key.store(0, Ordering::Release);
        displaced""",
    ),
    (
        "grants: the locked path does not revoke the grants first",
        "interheap-engine",
        "an_unused_grant_never_inflates_a_new_peak",
        "engine/src/grants.rs",
        """        if self.outstanding.load(Relaxed) != 0 {
            cells.for_each(&mut |cell| {""",
        """        if false {
            cells.for_each(&mut |cell| {""",
    ),
    (
        "grants: the lock-free path adds past the peak",
        "interheap-engine",
        "an_unused_grant_never_inflates_a_new_peak",
        "engine/src/grants.rs",
        "            if now > peak || (now as i64) < 0 {",
        "            if (now as i64) < 0 {",
    ),
    (
        "grants: consume takes with a store instead of a CAS",
        "interheap-engine",
        "blocks_live_at_once_make_an_exact_peak",
        "engine/src/grants.rs",
        "            cell.compare_exchange(word, word - bytes, Relaxed, Relaxed).is_ok()",
        """            cell.store(word - bytes, Relaxed);
            true""",
    ),
    (
        "grants: replenish adds with a store instead of a CAS",
        "interheap-engine",
        "a_free_racing_a_revocation_counts_once",
        "engine/src/grants.rs",
        "            cell.compare_exchange(word, word + bytes, Relaxed, Relaxed).is_ok()",
        """            cell.store(word + bytes, Relaxed);
            true""",
    ),
    (
        "grants: revoke takes any cell, whatever its key",
        "interheap-engine",
        "a_free_racing_a_revocation_counts_once",
        "engine/src/grants.rs",
        """        let mut word = cell.load(Relaxed);
        while let Some(amount) = amount_for(word, key) {""",
        """        let mut word = cell.load(Relaxed);
        while let Some(amount) = (word != 0).then_some(word & AMOUNT_MASK) {""",
    ),
    (
        "gate: unlocked path without its light barrier",
        "interheap-sync",
        "no_call_overlaps_an_unlocked_one_with_membarrier",
        "sync/src/gate.rs",
        """                self.barrier.light::<M>();
""",
        "",
    ),
    (
        "gate: drain without its heavy barrier",
        "interheap-sync",
        "no_call_overlaps_an_unlocked_one_with_membarrier",
        "sync/src/gate.rs",
        """        self.barrier.heavy::<M>();
""",
        "",
    ),
    (
        "gate: unlocked path trusts the mode read before its barrier",
        "interheap-sync",
        "no_call_overlaps_an_unlocked_one_with_membarrier",
        "sync/src/gate.rs",
        "if depth > 0 || self.mode.load(Relaxed) == Mode::Unlocked as u8 {",
        "if depth > 0 || mode == Mode::Unlocked as u8 {",
    ),
    (
        "gate: drain does not wait for the unlocked call",
        "interheap-sync",
        "no_call_overlaps_an_unlocked_one_with_membarrier",
        "sync/src/gate.rs",
        "while self.in_call.load(Acquire) != 0 {",
        "while false && self.in_call.load(Acquire) != 0 {",
    ),
    (
        "gate: a locked call does not drain",
        "interheap-sync",
        "no_call_overlaps_an_unlocked_one_with_membarrier",
        "sync/src/gate.rs",
        """        if self.mode.load(Relaxed) != Mode::Locked as u8 {
            self.drain(who);""",
        """        if false {
            self.drain(who);""",
    ),
    (
        "gate: unlocked call's end Release -> Relaxed",
        "interheap-sync",
        "no_call_overlaps_an_unlocked_one_with_membarrier",
        "sync/src/gate.rs",
        """                    let result = call();
                    self.in_call.store(depth, Release);""",
        """                    let result = call();
                    self.in_call.store(depth, Relaxed);""",
    ),
    (
        "gate: drain's load of in_call Acquire -> Relaxed",
        "interheap-sync",
        "no_call_overlaps_an_unlocked_one_with_membarrier",
        "sync/src/gate.rs",
        "while self.in_call.load(Acquire) != 0 {",
        "while self.in_call.load(Relaxed) != 0 {",
    ),
    (
        "gate: fences flavour's fast-path fence weakened to a compiler fence",
        "interheap-sync",
        "no_call_overlaps_an_unlocked_one_with_fences",
        "sync/src/gate.rs",
        """            Barrier::Fences => M::fence(SeqCst),
        }
    }

    fn heavy""",
        """            Barrier::Fences => std::sync::atomic::compiler_fence(SeqCst),
        }
    }

    fn heavy""",
    ),
    (
        "gate: fences flavour's switching side without its fence",
        "interheap-sync",
        "no_call_overlaps_an_unlocked_one_with_fences",
        "sync/src/gate.rs",
        """            Barrier::Fences => M::fence(SeqCst),
        }
    }
}""",
        """            Barrier::Fences => {}
        }
    }
}""",
    ),
    (
        "gate: a nested call is not exempt from the mode check",
        "interheap-sync",
        "a_nested_call_during_the_switch_does_not_wait",
        "sync/src/gate.rs",
        "if depth > 0 || self.mode.load(Relaxed) == Mode::Unlocked as u8 {",
        "if self.mode.load(Relaxed) == Mode::Unlocked as u8 {",
    ),
    (
        "keys: forget_keys_in without its clearing exchange",
        "interheap-sync",
        "a_freed_key_never_matches_its_reused_address",
        "sync/src/keys.rs",
        "let _ = key.compare_exchange(current, NO_KEY, Ordering::Relaxed, Ordering::Relaxed);",
        "let _ = current;",
    ),
    (
        "keys: delist leaves the slot listed",
        "interheap-sync",
        "a_clear_racing_a_thread_exit_never_writes_the_dead_slot",
        "sync/src/keys.rs",
        "listed.retain(|&s| s != me);",
        "let _ = me;",
    ),
    (
        "pyalloc parked frees: park pushes the block before writing its size",
        "interheap-pyalloc",
        "parked_blocks_are_freed_once_with_their_sizes",
        "frontends/rust-global-alloc/src/deferred.rs",
        """            S::write(base, size);
            self.stack.push(base);""",
        """            self.stack.push(base);
            S::write(base, size);""",
    ),
    (
        "pyalloc route header: the header loses its route bit",
        "interheap-pyalloc",
        "parked_blocks_are_freed_once_with_their_sizes",
        "frontends/rust-global-alloc/src/layout.rs",
        "user.sub(WORD).cast::<usize>().write(offset << 1 | tag);",
        "user.sub(WORD).cast::<usize>().write(offset << 1);",
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
            # A model that panics inside a destructor aborts the test binary
            # (no "test result" line): that is a caught mutation too, unlike
            # a mutation that does not compile.
            failed_tests = "test result: FAILED" in run.stdout or (
                "panicked at" in run.stderr and "could not compile" not in run.stderr
            )
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
