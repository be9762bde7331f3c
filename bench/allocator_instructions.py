"""Instructions per ``PyObject_Malloc(32)`` + ``PyObject_Free`` pair, by callgrind
(``--domain raw``: ``PyMem_RawMalloc`` + ``PyMem_RawFree``, called with the GIL).

A tiny C loop (compiled here with the interpreter's headers, loaded with
ctypes.PyDLL so the GIL is held) calls ``PyObject_Malloc(size)`` and
``PyObject_Free`` N times. The process runs twice under callgrind, with N and
N/4 pairs; the difference of the two instruction totals over the difference of
pair counts is the cost of one pair as a caller sees it: CPython's dispatch
through the allocator struct plus the allocator itself, plus 4 instructions of
loop (included in every figure). Everything else (start-up, the ctypes call)
is identical in both runs and cancels (PYTHONHASHSEED is fixed). Compared side
by side in one run:

* ``pymalloc``: the venv's python with ``PYTHONMALLOC=pymalloc``
* ``mimalloc``: the venv's python with ``PYTHONMALLOC=mimalloc`` (3.13+)
* ``interheap``: ``interheap-python`` (mem and object from the interpreter's heap)
* ``requested``: ``interheap-python`` with ``INTERHEAP_REQUESTED_SIZES=1``: the
  heaps keep each block's requested size, as under ``-m interheap``
* ``limited``: ``interheap-python`` with a memory limit on the main interpreter
  (``INTERHEAP_MAIN_LIMIT=1GB``): the limit is checked on the heaps' slow
  paths only, so the pair should cost what ``interheap`` does

With ``--domain raw`` the ``interheap`` row is the interpreter's own raw
heap (a thread state is current), ``raw-only`` is ``INTERHEAP_ALLOCATOR=raw``
(no interpreter heaps: the calling thread's part of the shared heap), and
pymalloc's row is CPython's raw allocator, glibc's ``malloc``.

With ``--hooks`` each row is measured a second time with interheap's hooks
installed (``interheap.install()``, what ``python -m interheap run`` does)
before the loop, and the instructions the hooks add per pair are printed
beside it: the cost issue 16 bounds. The ``requested`` row is measured
with ``install(figures="heaps")`` instead, what ``interheap-python -m
interheap run`` does (no hook; the figures come from the heaps), and its
cost over plain ``interheap-python`` is printed last. Both runs then import interheap, since
loading any extension module makes libpython's own thread-local lookups
dearer (about 17 instructions per pair under pymalloc here).

    python bench/allocator_instructions.py [--pairs N] [--size 32] [--domain object|mem|raw] [--hooks]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

LOOP_C = r"""
#include <Python.h>
__attribute__((noinline)) void interheap_bench_pairs(long n, size_t size) {
    for (long i = 0; i < n; i++) {
        void *p = MALLOC(size);
        __asm__ volatile("" : : "r"(p) : "memory");
        FREE(p);
    }
}
"""

CHILD = r"""
import ctypes, sys
if sys.argv[4] != "none":
    import interheap
if sys.argv[4] == "hooks":
    interheap.install()
if sys.argv[4] == "heaps":
    interheap.install(figures="heaps")
lib = ctypes.PyDLL(sys.argv[3])
lib.interheap_bench_pairs.argtypes = [ctypes.c_long, ctypes.c_size_t]
lib.interheap_bench_pairs(int(sys.argv[1]), int(sys.argv[2]))
"""


# The functions each domain's pair calls.
DOMAIN_CALLS = {
    "object": ("PyObject_Malloc", "PyObject_Free"),
    "mem": ("PyMem_Malloc", "PyMem_Free"),
    "raw": ("PyMem_RawMalloc", "PyMem_RawFree"),
}


def build_loop(workdir: str, domain: str) -> str:
    source = Path(workdir, "loop.c")
    malloc, free = DOMAIN_CALLS[domain]
    source.write_text(LOOP_C.replace("MALLOC", malloc).replace("FREE", free))
    library = Path(workdir, "loop.so")
    include = sysconfig.get_path("include")
    subprocess.run(
        ["gcc", "-O2", "-shared", "-fPIC", f"-I{include}", "-o", str(library), str(source)], check=True
    )
    return str(library)


def count(cmd: list[str], env: dict[str, str], workdir: str, name: str) -> int:
    out_file = os.path.join(workdir, f"cg.{name}")
    proc = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out_file}",
            *cmd,
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        sys.exit(f"{name}: valgrind failed:\n{proc.stderr[-3000:]}")
    match = re.search(r"^summary:\s+(\d+)", Path(out_file).read_text(), re.M)
    if not match:
        sys.exit(f"{name}: no summary in callgrind output")
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--domain", choices=sorted(DOMAIN_CALLS), default="object")
    parser.add_argument(
        "--hooks", action="store_true", help="also measure each row under interheap's hooks, side by side"
    )
    args = parser.parse_args()
    if not shutil.which("valgrind"):
        sys.exit("valgrind is required (apt-get install valgrind)")
    python = sys.executable
    # The launcher binary itself: `interheap-python` may be the wheel's wrapper
    # script (as `maturin develop` leaves it), which execs the binary, and
    # callgrind would then count the wrapper only.
    launcher = str(Path(python).with_name("interheap-python-bin"))
    drop = (
        "PYTHONMALLOC",
        "INTERHEAP_ALLOCATOR",
        "INTERHEAP_LIMIT",
        "INTERHEAP_MAIN_LIMIT",
        "INTERHEAP_REQUESTED_SIZES",
    )
    base_env = {k: v for k, v in os.environ.items() if k not in drop}
    base_env["PYTHONHASHSEED"] = "0"
    free_threaded = sysconfig.get_config_var("Py_GIL_DISABLED") == 1
    if free_threaded:
        # A free-threaded build has only mimalloc (PYTHONMALLOC=pymalloc is refused).
        modes = [("mimalloc", python, {})]
    else:
        modes = [("pymalloc", python, {"PYTHONMALLOC": "pymalloc"})]
        if sys.version_info >= (3, 13):
            modes.append(("mimalloc", python, {"PYTHONMALLOC": "mimalloc"}))
    has_launcher = Path(launcher).exists()
    if not has_launcher:
        print(f"note: no interheap-python beside {python} (make setup builds it): its rows are left out")
    modes.append(("interheap", launcher, {"INTERHEAP_REQUESTED_SIZES": "0"}))
    # The heaps keeping requested sizes: what `interheap-python -m interheap run` runs on.
    modes.append(("requested", launcher, {"INTERHEAP_REQUESTED_SIZES": "1"}))
    if args.domain == "raw":
        # Raw alone: no interpreter heaps, so raw calls use the per-thread heap.
        modes.append(("raw-only", launcher, {"INTERHEAP_ALLOCATOR": "raw"}))
    if not free_threaded:
        modes.append(("limited", launcher, {"INTERHEAP_MAIN_LIMIT": "1GB"}))
    if not has_launcher:
        modes = [m for m in modes if m[1] != launcher]
    results = {}
    hooked = {}
    with tempfile.TemporaryDirectory() as workdir:
        library = build_loop(workdir, args.domain)

        def per_pair(name: str, exe: str, env: dict[str, str], hooks: str) -> float:
            # Two loop lengths: the difference cancels start-up, install and warm-up calls.
            runs = []
            for label, pairs in (("s", args.pairs // 4), ("l", args.pairs)):
                cmd = [exe, "-c", CHILD, str(pairs), str(args.size), library, hooks]
                runs.append(count(cmd, env, workdir, f"{name}.{hooks}.{label}"))
            return (runs[1] - runs[0]) / (args.pairs - args.pairs // 4)

        for name, exe, extra in modes:
            env = {**base_env, **extra}
            # With --hooks, the bare run imports interheap too: loading an
            # extension module changes the cost of libpython's own thread-local
            # lookups (glibc's TLS generation), which is not the hooks' cost.
            results[name] = per_pair(name, exe, env, "imported" if args.hooks else "none")
            if args.hooks and name != "limited":
                # What `interheap-python -m interheap run` does: no hook, the
                # figures read from heaps that keep requested sizes.
                hooked[name] = per_pair(name, exe, env, "heaps" if name == "requested" else "hooks")
    malloc, free = DOMAIN_CALLS[args.domain]
    version = sys.version.split()[0]
    print(f"instructions per {malloc}({args.size}) + {free} pair (callgrind), Python {version}")
    base = modes[0][0]
    for name, pair in results.items():
        ratio = pair / results[base]
        line = f"  {name:<10} {pair:7.1f}   ({ratio:.2f}x {base})"
        if name in hooked:
            line += f"   under the hooks {hooked[name]:7.1f}   (the hooks add {hooked[name] - pair:+.1f})"
        print(line)
    if "requested" in hooked and "interheap" in results:
        run_cost = hooked["requested"] - results["interheap"]
        print(
            f"  interheap-python -m interheap run (heaps keep requested sizes, figures read from them, "
            f"no hook): {hooked['requested']:.1f}, {run_cost:+.1f} over interheap-python"
        )
    if "limited" in results:
        extra = results["limited"] - results["interheap"]
        print(f"  a limit set costs {extra:+.1f} instructions per pair")


if __name__ == "__main__":
    main()
