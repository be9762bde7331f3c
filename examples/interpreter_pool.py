"""A concurrent.futures.InterpreterPoolExecutor workload (CPython 3.14+) that checks its results.

``--workers`` isolated interpreters (PEP 734: own GIL, own allocator state), each in its
own thread, run ``--tasks`` tasks between them. A task builds a structure of a known
size (a list of ``(int, str)`` tuples, measured inside the worker with
``sys.getsizeof``), keeps it in its worker interpreter until the pool shuts down, and
returns which interpreter ran it, the bytes it kept and a checksum. The host checks
every checksum against a closed form, that the tasks ran in interpreters other than
main, at most one per worker, and prints per worker what it kept. It prints
``RESULT ok`` and exits 0, or says what is wrong and exits 1. Below 3.14 it exits 2.

    python examples/interpreter_pool.py [--workers 4] [--tasks 8] [--scale 1.0]
    python -m interheap run examples/interpreter_pool.py     # memory per worker interpreter

At ``--scale 1.0`` a task keeps about 4 MB, so the default run keeps about 32 MB in
four worker interpreters, until the pool ends them. This script does not import interheap.
"""

from __future__ import annotations

import argparse
import sys
import time

MB = 1_000_000
TASK_BYTES = 4 * MB  # per task at --scale 1.0

# Module globals of each worker interpreter's copy of this module: what its tasks keep.
_KEPT: list[list[tuple[int, str]]] = []


def entry(task: int, i: int) -> tuple[int, str]:
    return (task * 1_000_003 + i, f"task-{task:03d}-item-{i:07d}")


def expected_checksum(task: int, n: int) -> int:
    """The checksum of ``build_and_keep(task, n)``, in closed form (nothing built)."""
    # sum of the ints, plus the sum of the str lengths (all "task-TTT-item-IIIIIII": 21
    # characters while i < 10**7), mod 2**61 - 1.
    ints = n * task * 1_000_003 + n * (n - 1) // 2
    return (ints + 21 * n) % (2**61 - 1)


def build_and_keep(task: int, n: int) -> tuple[int, int, int]:
    """Runs in a worker interpreter: builds and keeps ``n`` entries.

    Returns (interpreter ID, bytes kept as measured by sys.getsizeof, checksum).
    """
    from concurrent import interpreters

    getsizeof = sys.getsizeof
    kept = [entry(task, i) for i in range(n)]
    _KEPT.append(kept)  # alive until the pool ends this interpreter
    size = getsizeof(kept) + sum(getsizeof(t) + getsizeof(t[0]) + getsizeof(t[1]) for t in kept)
    checksum = (sum(x for x, _ in kept) + sum(len(s) for _, s in kept)) % (2**61 - 1)
    return interpreters.get_current().id, size, checksum


def entries_for(target_bytes: int) -> int:
    """How many entries make about ``target_bytes`` (from one sample's size)."""
    sample = entry(0, 0)
    per_entry = sys.getsizeof(sample) + sys.getsizeof(sample[0]) + sys.getsizeof(sample[1]) + 8
    return max(1, target_bytes // per_entry)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4, help="worker interpreters (default 4)")
    parser.add_argument("--tasks", type=int, default=8, help="tasks in all (default 8)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply each task's size (default 1.0)")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.tasks < 1 or args.scale <= 0:
        parser.error("--workers and --tasks must be >= 1, --scale > 0")
    if sys.version_info < (3, 14):
        print(
            f"interpreter_pool.py needs CPython 3.14+ (concurrent.futures.InterpreterPoolExecutor, "
            f"PEP 734); this is {sys.version.split()[0]}",
            file=sys.stderr,
        )
        return 2
    from concurrent.futures import InterpreterPoolExecutor

    n = entries_for(int(TASK_BYTES * args.scale))
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    print(
        f"python {sys.version.split()[0]} ({'GIL' if gil else 'free-threaded'}): "
        f"{args.workers} worker interpreters, {args.tasks} tasks of {n} entries each"
    )
    t0 = time.perf_counter()
    with InterpreterPoolExecutor(max_workers=args.workers) as pool:
        futures = {task: pool.submit(build_and_keep, task, n) for task in range(args.tasks)}
        results = {task: f.result() for task, f in futures.items()}  # raises a task's failure
    wall = time.perf_counter() - t0

    problems = []
    per_worker: dict[int, list[int]] = {}
    for task, (interp_id, size, checksum) in results.items():
        if checksum != expected_checksum(task, n):
            problems.append(f"task {task}: checksum {checksum}, expected {expected_checksum(task, n)}")
        if interp_id == 0:
            problems.append(f"task {task} ran in the main interpreter")
        per_worker.setdefault(interp_id, []).append(size)
    if len(per_worker) > args.workers:
        problems.append(f"{len(per_worker)} interpreters ran tasks, more than {args.workers} workers")

    print(f"{'worker':>8} {'tasks':>5} {'kept B':>13}")
    for interp_id, sizes in sorted(per_worker.items()):
        print(f"interp {interp_id:>2} {len(sizes):>5} {sum(sizes):>13,}")
    print(f"{args.tasks} tasks in {wall:.2f} s, checksums {'FAILED' if problems else 'ok'}")
    print("workers:", " ".join(str(i) for i in sorted(per_worker)))
    for problem in problems:
        print("PROBLEM:", problem)
    print("RESULT", "ok" if not problems else "FAILED")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
