"""Run four isolated subinterpreters in parallel, each with its own allocation workload.

Each subinterpreter is created with its own GIL ("isolated" config) and runs in its own
thread, so the four workloads really run at the same time. Every workload allocates a
known amount of memory, computed inside the interpreter with ``sys.getsizeof``, and keeps
it alive until its script ends (after spinning ``--hold`` CPU seconds, so all of them are
alive at once); then the host destroys the interpreter. The main interpreter keeps a small
workload of its own, so a per-interpreter memory report shows five interpreters with
distinct figures. The host prints, per interpreter, its ID, what it did, the bytes it
intended and its times; with own GILs the summed CPU time exceeds the wall time
(``--config legacy``, one shared GIL, shows the contrast on default builds):

    python examples/parallel_interpreters.py [--scale 0.1] [--hold 0] [--config legacy]
    python -m interheap run examples/parallel_interpreters.py

Uses ``concurrent.interpreters`` (PEP 734) on CPython 3.14+, including free-threaded
builds; only where that is missing, the private modules: ``_interpreters`` on 3.13 and
``_xxsubinterpreters`` on 3.12. This script does not import interheap.

Workloads at ``--scale 1.0`` ("intended" = what the script means to allocate, as measured
by ``sys.getsizeof``; the allocator adds its own rounding and overhead on top):

    name     where  what                                                    intended
    main     main   list of small str objects, kept until exit             ~5 MB kept
    keeper   sub    list of (int, str) tuples, kept until the script ends  ~50 MB kept
    churn    sub    batches of short-lived (float, float) tuples           ~200 MB total, ~0.1 MB peak
    bytes    sub    2 bytes + 2 bytearray buffers of ~7.5 MB each          ~30 MB kept (large blocks)
    dicts    sub    small dicts and sets of ints, kept                     ~20 MB kept
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

MB = 1_000_000

# name -> (intended bytes at scale 1.0, description)
WORKLOADS = {
    "keeper": (50 * MB, "kept list of (int, str) tuples"),
    "churn": (200 * MB, "short-lived (float, float) tuples, cumulative"),
    "bytes": (30 * MB, "kept large bytes/bytearray buffers"),
    "dicts": (20 * MB, "kept small dicts and sets of ints"),
}
MAIN_WORKLOAD = (5 * MB, "kept list of small str objects")


# --- subinterpreter API, hiding the 3.12 / 3.13 / 3.14+ difference --------------------------

if sys.version_info >= (3, 14):
    import concurrent.interpreters as interpreters

    def create_interpreter(isolated: bool = True) -> interpreters.Interpreter:
        """Create an interpreter: own GIL and obmalloc state, or (legacy) main's."""
        if isolated:
            return interpreters.create()
        # concurrent.interpreters only makes isolated interpreters (PEP 734). The legacy
        # config, kept for comparison, is made by the module behind it, asking for the
        # same reference counting as create(), and is then used like any other.
        import _interpreters

        return interpreters.Interpreter(_interpreters.create("legacy", reqrefs=True))

    def run_in(interp: interpreters.Interpreter, code: str) -> None:
        """Run source code in the interpreter's __main__; raise in the host on failure."""
        try:
            interp.exec(code)
        except interpreters.ExecutionFailed as exc:
            raise RuntimeError(f"subinterpreter {interp.id} failed:\n{exc}") from exc

    def destroy(interp: interpreters.Interpreter) -> None:
        interp.close()

    def interp_id(interp: interpreters.Interpreter) -> int:
        return interp.id

elif sys.version_info >= (3, 13):
    import _interpreters as _interp

    def create_interpreter(isolated: bool = True) -> int:
        """Create an interpreter: own GIL and obmalloc state, or (legacy) main's."""
        return _interp.create(_interp.new_config("isolated" if isolated else "legacy"))

    def run_in(interp_id: int, code: str) -> None:
        """Run source code in the interpreter's __main__; raise in the host on failure."""
        # 3.13 returns an exception snapshot (or None) instead of raising.
        exc = _interp.exec(interp_id, code)
        if exc is not None:
            detail = getattr(exc, "errdisplay", None) or getattr(exc, "formatted", exc)
            raise RuntimeError(f"subinterpreter {interp_id} failed:\n{detail}")

    def destroy(interp_id: int) -> None:
        _interp.destroy(interp_id)

    def interp_id(handle: int) -> int:
        return int(handle)

else:
    import _xxsubinterpreters as _interp

    def create_interpreter(isolated: bool = True) -> _interp.InterpreterID:
        """Create an interpreter: own GIL and obmalloc state, or (legacy) main's.

        Keep the returned InterpreterID object alive: in 3.12 the interpreter is
        destroyed as soon as the last reference to its ID object goes away.
        """
        return _interp.create(isolated=isolated)

    def run_in(interp_id: _interp.InterpreterID, code: str) -> None:
        """Run source code in the interpreter's __main__; raise in the host on failure."""
        # 3.12 raises RunFailedError itself; re-raise with the interpreter ID attached.
        try:
            _interp.run_string(interp_id, code)
        except Exception as exc:
            raise RuntimeError(f"subinterpreter {interp_id} failed: {exc}") from exc

    def destroy(interp_id: _interp.InterpreterID) -> None:
        _interp.destroy(interp_id)

    def interp_id(handle: _interp.InterpreterID) -> int:
        return int(handle)


# --- workload code run inside the subinterpreters -------------------------------------------
# Each script receives TARGET (intended bytes), HOLD (CPU seconds to spin afterwards) and
# RESULT_FD (write end of a pipe), stores its objects in module globals (alive until the
# interpreter is destroyed) and writes repr({...}) of its figures to RESULT_FD. Only
# builtins, sys, os and time are used, so nothing depends on which extension modules
# support subinterpreters.

PRELUDE = """\
import os, sys, time
_t0 = time.perf_counter()
"""

EPILOGUE = """\
_elapsed = time.perf_counter() - _t0
# Hold the objects while burning HOLD seconds of this thread's CPU time (allocating
# next to nothing), so that all interpreters are alive at once and the host can show
# that they ran in parallel.
_h0 = time.thread_time()
while time.thread_time() - _h0 < HOLD:
    pass
os.write(RESULT_FD, repr({"intended": intended, "elapsed": _elapsed,
                          "detail": detail}).encode())
"""

SCRIPTS = {
    # Object sizes differ between builds (free-threaded objects are larger), so the
    # count comes from the size of a sample entry: tuple + int + str + a list slot.
    "keeper": """\
getsizeof = sys.getsizeof
def entry(i):
    return (i + 1_000_000, f"item-{i:06d}")
sample = entry(0)
per_entry = getsizeof(sample) + getsizeof(sample[0]) + getsizeof(sample[1]) + 8
n = max(1, TARGET // per_entry)
kept = [entry(i) for i in range(n)]
intended = getsizeof(kept) + sum(getsizeof(t) + getsizeof(t[0]) + getsizeof(t[1]) for t in kept)
detail = f"{len(kept)} tuples kept"
""",
    # Batches of 1000 tuples built and dropped; every batch has the same shape, so the
    # cumulative size is batches * size of one batch.
    "churn": """\
getsizeof = sys.getsizeof
def make_batch(k):
    return [(k + 0.5, j * 1.5) for j in range(1000)]
sample = make_batch(0)
per_batch = getsizeof(sample) + sum(getsizeof(t) + getsizeof(t[0]) + getsizeof(t[1]) for t in sample)
del sample
batches = max(1, TARGET // per_batch)
for k in range(batches):
    batch = make_batch(k)
del batch
intended = batches * per_batch
detail = f"{batches} batches of {per_batch} B, peak ~{per_batch} B"
""",
    # Large buffers bypass pymalloc's small-object path: PyObject_Malloc/Calloc forwards
    # them to the raw allocator. bytes * n goes through malloc, bytearray(n) through calloc.
    "bytes": """\
getsizeof = sys.getsizeof
size = max(1, TARGET // 4)
kept = [b"\\x5a" * size, b"\\xa5" * size, bytearray(size), bytearray(size)]
intended = sum(getsizeof(b) for b in kept)
detail = f"4 buffers of {size} B"
""",
    # One group is a 3-key dict + an 8-int set, their 11 ints and 2 list slots.
    "dicts": """\
getsizeof = sys.getsizeof
base = 10_000_000
def make_dict(i):
    return {"a": base + i, "b": base + 2 * i, "c": base + 3 * i}
def make_set(i):
    return set(range(base + 8 * i, base + 8 * i + 8))
d, s = make_dict(1), make_set(1)
per_group = (getsizeof(d) + sum(getsizeof(v) for v in d.values())
             + getsizeof(s) + sum(getsizeof(v) for v in s) + 16)
del d, s
n = max(1, TARGET // per_group)
dicts = [make_dict(i) for i in range(n)]
sets = [make_set(i) for i in range(n)]
intended = (getsizeof(dicts) + getsizeof(sets)
            + sum(getsizeof(d) + sum(getsizeof(v) for v in d.values()) for d in dicts)
            + sum(getsizeof(s) + sum(getsizeof(v) for v in s) for s in sets))
detail = f"{n} dicts + {n} sets kept"
""",
}


@dataclass
class Outcome:
    """What one subinterpreter did, as seen from the host."""

    workload: str
    interp_id: int
    result: dict  # figures reported by the workload script itself
    elapsed: float  # wall-clock seconds of create + exec + destroy
    cpu: float  # CPU seconds of the OS thread that ran create + exec + destroy


def run_workload(workload: str, target_bytes: int, isolated: bool, hold: float) -> Outcome:
    """Create an interpreter, run one workload in it, destroy it (in the calling thread).

    Any failure, in the host or inside the interpreter, raises here; the executor hands
    it to the host's ``future.result()``.
    """
    t0 = time.perf_counter()
    c0 = time.thread_time()
    rfd, wfd = os.pipe()
    try:
        # Keep the handle referenced until destroy() (3.12 destroys on last reference).
        handle = create_interpreter(isolated)
        try:
            params = f"TARGET = {target_bytes}\nHOLD = {hold!r}\nRESULT_FD = {wfd}\n"
            code = params + PRELUDE + SCRIPTS[workload] + EPILOGUE
            run_in(handle, code)
        finally:
            destroy(handle)
        os.close(wfd)
        wfd = -1
        chunks = []
        while chunk := os.read(rfd, 65536):
            chunks.append(chunk)
        result = ast.literal_eval(b"".join(chunks).decode())
    finally:
        if wfd >= 0:
            os.close(wfd)
        os.close(rfd)
    # This OS thread ran create + exec + destroy, so its CPU time is the interpreter's,
    # whatever the other threads did meanwhile.
    return Outcome(
        workload,
        interp_id(handle),
        result,
        time.perf_counter() - t0,
        time.thread_time() - c0,
    )


def main_workload(target_bytes: int) -> tuple[list[str], int]:
    """The main interpreter's own workload: small str objects kept until exit."""
    per_entry = sys.getsizeof(f"main-object-{0:08d}") + 8  # str + list slot
    n = max(1, target_bytes // per_entry)
    kept = [f"main-object-{i:08d}" for i in range(n)]
    intended = sys.getsizeof(kept) + sum(sys.getsizeof(s) for s in kept)
    return kept, intended


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every workload size (default 1.0)",
    )
    parser.add_argument(
        "--config",
        choices=("isolated", "legacy"),
        default="isolated",
        help="subinterpreter config: own GIL and allocator state (default), or legacy, "
        "sharing the main interpreter's GIL and obmalloc state (for comparison)",
    )
    parser.add_argument(
        "--hold",
        type=float,
        default=0.5,
        help="CPU seconds each subinterpreter spins, holding its objects, after its "
        "workload (default 0.5; 0 to skip)",
    )
    args = parser.parse_args(argv)
    if args.scale <= 0:
        parser.error("--scale must be positive")
    if args.hold < 0:
        parser.error("--hold must be >= 0")

    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    print(
        f"python {sys.version.split()[0]} ({'GIL' if gil else 'free-threaded'}), "
        f"scale {args.scale}, {args.config} subinterpreters, pid {os.getpid()}"
    )

    t0 = time.perf_counter()
    main_target = int(MAIN_WORKLOAD[0] * args.scale)
    main_kept, main_intended = main_workload(main_target)
    main_elapsed = time.perf_counter() - t0

    isolated = args.config == "isolated"
    t1 = time.perf_counter()
    # One thread per interpreter; each creates, runs and destroys its own interpreter.
    with ThreadPoolExecutor(max_workers=len(WORKLOADS), thread_name_prefix="interp") as pool:
        futures = [
            pool.submit(run_workload, name, int(size * args.scale), isolated, args.hold)
            for name, (size, _) in WORKLOADS.items()
        ]
        outcomes = [f.result() for f in futures]  # raises the first failure, loudly
    wall = time.perf_counter() - t1

    # "work s": the workload inside the interpreter; "wall s"/"cpu s": the whole thread
    # (create + exec incl. --hold + destroy), wall-clock and CPU time of that OS thread.
    header = f"{'name':<7} {'interp':>6} {'intended B':>13} {'work s':>7} {'wall s':>7} {'cpu s':>7}  what"
    print(header)
    print("-" * len(header))
    print(
        f"{'main':<7} {0:>6} {main_intended:>13,} {main_elapsed:>7.2f} {'-':>7} {'-':>7}  "
        f"{MAIN_WORKLOAD[1]} ({len(main_kept)} str)"
    )
    for o in outcomes:
        r = o.result
        print(
            f"{o.workload:<7} {o.interp_id:>6} {r['intended']:>13,} {r['elapsed']:>7.2f} "
            f"{o.elapsed:>7.2f} {o.cpu:>7.2f}  {WORKLOADS[o.workload][1]} ({r['detail']})"
        )
    cpu = sum(o.cpu for o in outcomes)
    print(
        f"threads: wall {wall:.2f} s, sum of per-interpreter CPU {cpu:.2f} s, "
        f"parallelism {cpu / wall:.2f}x on {os.cpu_count()} CPUs"
    )
    del main_kept  # kept alive until here on purpose
    return 0


if __name__ == "__main__":
    sys.exit(main())
