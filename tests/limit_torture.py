"""Torture test of memory limits: CPython's own test modules and pyperformance
workloads run inside a limited isolated subinterpreter, with limits swept from
far too small to ample, under both back ends. Every run must end with success
or a MemoryError in that interpreter: never a crash, a hang or a fatal error.

Each run is a process of its own (so a crash or a hang is seen as one):

* hooks: ``python -m interheap run --limit SIZE`` (exact to the byte);
* allocator: ``interheap-python`` with ``INTERHEAP_LIMIT=SIZE`` (default builds).

The subinterpreter gets the limit once it is created (a default limit), runs
the workload, and writes what happened; the process then destroys it and
exits. A run's outcome is one of:

* ``ok``: the workload finished (test failures and errors are counted; those
  whose traceback shows a MemoryError are the limit's doing, the others are
  compared with the run without a limit, ``none``);
* ``MemoryError``: it escaped the workload inside the interpreter;
* ``refused at entry``: the interpreter was over its limit already (start-up
  alone is more than a tiny limit), so running code in it failed in the
  caller, before any of it ran;
* ``refused at creation`` (counted apart): the limit was below the
  interpreter's start-up, which 3.12's hooks cannot exempt, so its creation
  failed with RuntimeError in the caller;
* ``parser crash at entry`` (before 3.14 only, counted apart): CPython
  crashed in the call that runs code in the interpreter, before the first
  line of the code ran. The interpreter was at its limit and the parser's
  first allocation was refused: before gh-150207 (fixed in 2026; 3.14.7 has
  the fix, 3.12 and this machine's 3.13.0 do not) the tokenizer returned
  NULL without setting MemoryError (``tok_new``, ``translate_newlines``), and
  ``_run_script`` (3.12 ``_xxsubinterpreters``; 3.13 ``_interpreters``, through
  ``_PyXI_ApplyCapturedException``) then reads the exception it assumes is
  set: NULL (checked in gdb on 3.12.1 and 3.13.0). Told apart by
  faulthandler's traceback (the crash is in ``run``, or on 3.12 in the
  interpreter before its first frame) and by the outcome file, which the
  code's first line creates and which does not exist;

and anything else (non-zero exit, signal, timeout, no outcome) is a failure.

    python tests/limit_torture.py                       # the full sweep (make torture)
    python tests/limit_torture.py --quick               # what make test runs
    python tests/limit_torture.py --limits 2MB,64MB --workloads test_re,json_dumps
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
STR_TEST = "test_str" if sys.version_info >= (3, 13) else "test_unicode"
TEST_MODULES = ["test_json", "test_re", "test_list", STR_TEST]
PYPERFORMANCE = ["json_dumps", "json_loads", "regex_v8", "nbody", "richards", "float", "go", "deltablue"]
# "none" is the baseline: what the workload does in a subinterpreter with no
# limit (some CPython tests fail in isolated interpreters anyway, such as
# test_re's fork test on 3.13).
LIMITS = ["none", "512KB", "2MB", "4MB", "8MB", "16MB", "32MB", "256MB"]
QUICK = (["test_re", "json_dumps"], ["none", "2MB", "8MB", "256MB"])

# Runs inside the subinterpreter: the workload, then its outcome as JSON.
WORKLOAD = r"""
import os
# Opened first, and written with constants when memory is short: recording
# the outcome must not need the memory the limit just refused.
fd = os.open(OUT, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
outcome = None
try:
    import io, json, sys, traceback, unittest
    kind, name, path = KIND, NAME, PATH
    if kind == "test":
        import importlib
        module = importlib.import_module("test." + name)
        suite = unittest.defaultTestLoader.loadTestsFromModule(module)
        result = unittest.TextTestRunner(stream=io.StringIO(), verbosity=0).run(suite)
        problems = result.errors + result.failures
        outcome = dict(
            outcome="ok",
            ran=result.testsRun,
            problems=len(problems),
            memory_errors=sum("MemoryError" in text for _, text in problems),
            other=[f"{t.id()}: {text.strip().splitlines()[-1]}"[:300]
                   for t, text in problems if "MemoryError" not in text],
        )
        del module, suite, result, problems
    else:
        import types, argparse
        # A stand-in for pyperf: each benchmark function runs once.
        class Runner:
            def __init__(self, *args, **kwargs):
                self.argparser = argparse.ArgumentParser()
                self.metadata = {}
            def parse_args(self, args=None):
                return self.argparser.parse_args([])
            def bench_func(self, name, func, *args, **kwargs):
                func(*args)
            def bench_time_func(self, name, func, *args, **kwargs):
                func(1, *args)
            def bench_async_func(self, name, func, *args, **kwargs):
                import asyncio
                asyncio.run(func(*args))
        pyperf = types.ModuleType("pyperf")
        pyperf.Runner = Runner
        pyperf.perf_counter = __import__("time").perf_counter
        sys.modules["pyperf"] = pyperf
        sys.path.insert(0, path.rsplit("/", 1)[0])
        with open(path) as fh:
            source = fh.read()
        exec(compile(source, path, "exec"), {"__name__": "__main__", "__file__": path})
        outcome = {"outcome": "ok"}
    os.write(fd, json.dumps(outcome).encode())
except MemoryError:
    outcome = None
    os.write(fd, b'{"outcome": "MemoryError"}')
except BaseException as exc:
    outcome = None
    try:
        text = "".join(traceback.format_exception_only(exc)).strip()[:500]
        os.write(fd, json.dumps({"outcome": "error", "error": text}).encode())
    except MemoryError:
        os.write(fd, b'{"outcome": "MemoryError", "while": "recording another error"}')
finally:
    os.close(fd)
"""

# The process: one subinterpreter, limited by the default limit, runs WORKLOAD.
CHILD = r"""
import json, sys
sys.path.insert(0, TESTS_DIR)
from scenario_support import create, run, destroy
kind, name, path, out = sys.argv[1:5]
code = WORKLOAD
for key, value in (("KIND", kind), ("NAME", name), ("PATH", path), ("OUT", out)):
    code = code.replace(key, repr(value))
try:
    iid = create("isolated")
except RuntimeError as exc:
    # 3.12 records nothing that tells when an interpreter's start-up ends, so a
    # default limit counts it there, and one below it fails the creation.
    with open(out, "w") as fh:
        json.dump({"outcome": "refused at creation", "error": f"{type(exc).__name__}: {exc}"[:300]}, fh)
    raise SystemExit(0)
try:
    run(iid, code)
except BaseException as exc:
    # Nothing ran: the interpreter could not even take the code (over its limit).
    with open(out, "w") as fh:
        json.dump({"outcome": "refused at entry", "error": f"{type(exc).__name__}: {exc}"[:300]}, fh)
try:
    destroy(iid)
except BaseException as exc:
    print("destroy failed:", type(exc).__name__, exc, file=sys.stderr)
"""


def pyperformance_script(name: str) -> str | None:
    try:
        import pyperformance
    except ImportError:
        return None
    path = (
        Path(pyperformance.__file__).parent / "data-files" / "benchmarks" / f"bm_{name}" / "run_benchmark.py"
    )
    return str(path) if path.exists() else None


def workloads(names: list[str]) -> list[tuple[str, str, str]]:
    """(kind, name, path) for each workload; pyperformance ones need pyperformance."""
    found = []
    for name in names:
        if name.startswith("test_"):
            found.append(("test", name, ""))
        elif (path := pyperformance_script(name)) is not None:
            found.append(("bench", name, path))
        else:
            print(f"  (skipped {name}: pyperformance is not installed; pip install pyperformance)")
    return found


def command(back_end: str, limit: str) -> tuple[list[str], dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTERHEAP_")}
    child = CHILD.replace("TESTS_DIR", repr(str(TESTS_DIR))).replace("WORKLOAD", repr(WORKLOAD))
    # faulthandler: a crash shows where it happened (see parser_crash_at_entry).
    if back_end == "hooks":
        options = [] if limit == "none" else ["--limit", limit]
        return [
            sys.executable,
            "-X",
            "faulthandler",
            "-m",
            "interheap",
            "run",
            "--no-report",
            *options,
            "-c",
            child,
        ], env
    launcher = str(Path(sys.executable).with_name("interheap-python"))
    env = env if limit == "none" else {**env, "INTERHEAP_LIMIT": limit}
    return [launcher, "-X", "faulthandler", "-c", child], env


def parser_crash_at_entry(returncode: int, stderr: str, outcome_written: bool) -> bool:
    """Whether a crash is gh-150207's, before the code ran (see the module docs)."""
    return (
        sys.version_info < (3, 14)
        and returncode == -11
        and not outcome_written
        and "Segmentation fault" in stderr
        # 3.13 crashes back in the caller's frame (scenario_support.run); 3.12
        # still in the interpreter's thread state, before its first frame.
        and (("scenario_support.py" in stderr and " in run\n" in stderr) or "<no Python frame>" in stderr)
    )


def run_one(back_end: str, workload: tuple[str, str, str], limit: str, timeout: float) -> dict:
    kind, name, path = workload
    cmd, env = command(back_end, limit)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "outcome.json")
        start = time.monotonic()
        try:
            proc = subprocess.run(
                [*cmd, kind, name, path, out], env=env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return {"outcome": "HANG", "seconds": timeout}
        seconds = round(time.monotonic() - start, 1)
        if proc.returncode != 0:
            if parser_crash_at_entry(proc.returncode, proc.stderr, os.path.exists(out)):
                return {"outcome": PARSER_CRASH, "seconds": seconds}
            return {
                "outcome": "CRASH",
                "returncode": proc.returncode,
                "stderr": proc.stderr[-1500:],
                "seconds": seconds,
            }
        if not os.path.exists(out):
            return {"outcome": "NO OUTCOME", "stderr": proc.stderr[-1500:], "seconds": seconds}
        with open(out) as fh:
            text = fh.read()
        try:
            result = json.loads(text)
        except ValueError:
            return {"outcome": "UNREADABLE OUTCOME", "text": text[:300], "seconds": seconds}
        result["seconds"] = seconds
        if "destroy failed" in proc.stderr:
            result["outcome"] = "DESTROY FAILED"
            result["stderr"] = proc.stderr[-1500:]
        return result


PARSER_CRASH = "parser crash at entry"
GOOD = {"ok", "MemoryError", "refused at entry"}
SHORT = {
    "ok": "ok",
    "MemoryError": "MemErr",
    "refused at entry": "entry",
    "refused at creation": "CREATE",
    PARSER_CRASH: "gh150207",
}
# Counted apart (see the module docs): 3.12's hooks cannot exempt start-up,
# and CPython before 3.14 crashes when its parser's first allocation is refused.
KNOWN_GAPS = {"refused at creation", PARSER_CRASH}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short sweep (what make test runs)")
    parser.add_argument("--workloads", help="comma-separated test modules and pyperformance benchmarks")
    parser.add_argument("--limits", help="comma-separated sizes, smallest first")
    parser.add_argument("--back-ends", default="hooks,allocator")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", help="write every run's result here")
    args = parser.parse_args(argv)
    names, limits = (list(QUICK[0]), list(QUICK[1])) if args.quick else (TEST_MODULES + PYPERFORMANCE, LIMITS)
    if args.workloads:
        names = args.workloads.split(",")
    if args.limits:
        limits = args.limits.split(",")
    back_ends = args.back_ends.split(",")
    if FREE_THREADED and "allocator" in back_ends:
        back_ends.remove("allocator")
        print("  (allocator back end left out: a free-threaded build keeps mem and object in mimalloc)")
    print(f"limit torture on Python {sys.version.split()[0]}: back ends {back_ends}, limits {limits}")
    results = []
    bad = 0
    for workload in workloads(names):
        for back_end in back_ends:
            row = []
            for limit in limits:
                r = run_one(back_end, workload, limit, args.timeout)
                results.append({"back_end": back_end, "workload": workload[1], "limit": limit, **r})
                if r["outcome"] not in GOOD | KNOWN_GAPS:
                    bad += 1
                    print(f"  !! {back_end} {workload[1]} {limit}: {r}")
                cell = SHORT.get(r["outcome"], "BAD")
                if r["outcome"] == "ok" and r.get("memory_errors"):
                    cell = f"ok/{r['memory_errors']}ME"
                if r.get("other"):
                    cell += f"+{len(r['other'])}?"
                row.append(f"{limit}:{cell}")
            print(f"  {back_end:<9} {workload[1]:<12} " + "  ".join(row), flush=True)
    # Problems that are not MemoryErrors, and that the run without a limit
    # did not have, are the limit's doing: suspect.
    baseline = {
        (r["back_end"], r["workload"]): set(r.get("other", [])) for r in results if r["limit"] == "none"
    }
    for r in results:
        for line in sorted(set(r.get("other", [])) - baseline.get((r["back_end"], r["workload"]), set()))[:3]:
            print(f"  note: {r['back_end']} {r['workload']} {r['limit']}: {line}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"{len(results)} runs, {bad} crashed, hung, ended without an outcome or in another error")
    for outcome, why in (
        ("refused at creation", "3.12's hooks count start-up against a default limit"),
        (PARSER_CRASH, "CPython before 3.14 crashed when its parser's first allocation was refused"),
    ):
        if count := sum(r["outcome"] == outcome for r in results):
            print(f"{count} runs: {outcome} ({why}; counted apart, see tests/limit_torture.py)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
