"""Instructions per allocator call added by interheap's adapters (callgrind).

Installs a plain forwarding allocator (``tests/c/legacy_allocators.c``) for
the object domain in four ways and counts, with ``valgrind --tool=callgrind``,
the instructions of a C loop of ``PyObject_Malloc(32)`` + ``PyObject_Free``
pairs. Each mode runs twice, with N and 2N pairs; the difference of the two
totals is the cost of N pairs alone (start-up and set-up cancel out):

* ``bare``: installed with ``PyMem_SetAllocator``, no adapter;
* ``wrapper, unlocked``: the lock wrapper while only the main GIL exists
  (the free-threaded build has no such mode: it always locks);
* ``wrapper, locked``: the same after an isolated interpreter has switched it
  to locking (uncontended lock);
* ``thread-safe flag``: no lock, forwarding and counting only.

Prints instructions per call (half a pair) and the overhead over ``bare``.

    python bench/adapter_instructions.py [--pairs N]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from c_build import build_shared  # noqa: E402
from callgrind import instructions_of  # noqa: E402

CHILD = r"""
import ctypes, sys
import interheap.adapters as adapters
lib = ctypes.PyDLL(sys.argv[1])
lib.fw_setup.restype = ctypes.c_void_p
lib.bench_object_pairs.argtypes = [ctypes.c_long]
mode, pairs = sys.argv[2], int(sys.argv[3])
OBJECT = 2
allocator = lib.fw_setup(OBJECT)
handle = None
if mode == "bare":
    lib.fw_install_bare(OBJECT)
else:
    handle = adapters.install("object", allocator, thread_safe=(mode == "thread-safe"))
    if mode == "locked":
        try:
            import _interpreters as m
            m.destroy(m.create("isolated"))
        except ImportError:
            import _xxsubinterpreters as m
            m.destroy(m.create(isolated=True))
lib.bench_object_pairs(1000)  # warm up
lib.bench_object_pairs(pairs)
if handle is not None:
    s = handle.stats()
    print("ADAPTER", s.mode, s.calls, s.lock_acquisitions)
"""

MODES = [
    ("bare", "bare"),
    ("unlocked", "wrapper, unlocked"),
    ("locked", "wrapper, locked"),
    ("thread-safe", "thread-safe flag"),
]


def collect(python: str, lib: Path, mode: str, pairs: int, workdir: str) -> tuple[int, str]:
    out_file = os.path.join(workdir, f"cg.{mode}")
    # A fixed hash seed keeps start-up identical between the two runs.
    command = [python, "-c", CHILD, str(lib), mode, str(pairs)]
    return instructions_of(command, out_file, {"PYTHONHASHSEED": "0"})


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--pairs", type=int, default=100_000, help="malloc+free pairs measured (default 100000)"
    )
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("error: valgrind is not installed")
    free_threaded = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
    with tempfile.TemporaryDirectory() as workdir:
        lib = build_shared(
            ROOT / "tests" / "c" / "legacy_allocators.c", Path(workdir) / "legacy_allocators.so"
        )
        rows = []
        for mode, label in MODES:
            if mode == "unlocked" and free_threaded:
                continue
            # Two runs of different lengths: the difference cancels start-up.
            ir_short, _ = collect(args.python, lib, mode, args.pairs, workdir)
            ir_long, out = collect(args.python, lib, mode, 2 * args.pairs, workdir)
            per_call = (ir_long - ir_short) / args.pairs / 2
            adapter = re.search(r"ADAPTER (\S+) (\d+) (\d+)", out)
            rows.append((label, per_call, adapter.groups() if adapter else None))
    bare = rows[0][1]
    print(f"python: {args.python} ({'free-threaded' if free_threaded else 'default build'})")
    print("instructions per allocator call (PyObject_Malloc(32) or PyObject_Free), object domain:")
    print(
        f"  {'installation':<20} {'per call':>9} {'over bare':>10}   adapter mode, calls, lock acquisitions"
    )
    for label, per_call, adapter in rows:
        extra = "" if adapter is None else f"   {adapter[0]}, {int(adapter[1]):,}, {int(adapter[2]):,}"
        print(f"  {label:<20} {per_call:>9.1f} {per_call - bare:>+10.1f}{extra}")


if __name__ == "__main__":
    main()
