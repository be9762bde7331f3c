"""Cost of interheap's hooks on pyperformance, side by side with tracemalloc.

Runs pyperformance's benchmark scripts in pyperf worker mode, one process per run, under
these configurations (by default the first five), interleaved in one session:

    none         python -u run_benchmark.py [ARGS] --worker ...   (pymalloc)
    hooks        python -u -m interheap run run_benchmark.py [ARGS] --worker ...
    tracemalloc  python -u -X tracemalloc=1 run_benchmark.py [ARGS] --worker ...
    mimalloc     PYTHONMALLOC=mimalloc python -u run_benchmark.py ...   (3.13+)
    interheap    interheap-python -u run_benchmark.py ...   (the interheap allocator)
    sites        python -u -m interheap run --sites run_benchmark.py ...   (hooks + sampling)
    timeline     python -u -m interheap run --timeline run_benchmark.py ...   (hooks + timeline)
    check        python -u -m interheap check run_benchmark.py ...   (the checking hooks)
    debug        PYTHONMALLOC=debug python -u run_benchmark.py ...   (CPython's debug hooks)

(``--configs none,mimalloc,interheap`` compares allocators: ``make bench-allocator``;
``--configs none,hooks,sites,timeline`` what allocation-site sampling at the default rate
and the timeline at the default interval add to the hooks: ``make bench-sites``;
``--configs none,hooks,check,debug --vs hooks`` what the checking hooks cost, against the
hooks and against CPython's debug hooks: ``make bench-check``.)

Every run uses the same fixed ``--loops`` (calibrated once with ``none`` at the start),
``--warmups`` and ``--values`` and writes its values to a pyperf JSON file. Each round runs
every benchmark under the configurations in a shuffled order. The report gives, per
benchmark, the median time of ``none`` and median(config) / median(none) for the others,
then the geometric means of those ratios, for time and for the child's peak RSS
(``ru_maxrss`` from ``os.wait4``). Absolute times on a shared machine mean little; the
ratios, measured interleaved, are the result. When ``sites``, ``timeline`` or ``check``
runs with ``hooks``, a second table gives their ratios against ``hooks`` (``--vs`` picks
another second baseline, or ``--vs none`` drops it).

Usage (from a venv with interheap, pyperformance and pyperf installed):

    python bench/pyperformance_hooks.py [--benchmarks a,b,c] [--rounds N] [--quick]
        [--configs none,hooks,tracemalloc] [--vs hooks] [--json OUT] [--python PATH]

On a shared 2-core machine the default (16 benchmarks, 3 rounds) takes about 6 minutes
and ``--quick`` (4 benchmarks, 1 round) about 10 seconds.

``--python`` benchmarks another interpreter, which needs pyperf (and, for ``hooks``,
``sites``, ``timeline`` and ``check``, interheap) installed; the benchmark scripts are read
from this interpreter's pyperformance.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

try:
    import pyperf
except ImportError:
    sys.exit("error: pyperf is not installed (pip install pyperformance pyperf)")

CONFIGS = (
    "none",
    "hooks",
    "tracemalloc",
    "mimalloc",
    "interheap",
    "interheap-run",
    "sites",
    "timeline",
    "check",
    "debug",
)
DEFAULT_CONFIGS = CONFIGS[:5]
# Configurations that run interheap's hooks (``python -m interheap run`` or ``check``).
HOOKED = ("hooks", "sites", "timeline", "check", "interheap-run")
# Configurations measured against hooks as well when both run (--vs by default).
ON_HOOKS = ("sites", "timeline", "check")

# Benchmarks known to run in worker mode: name -> (bm_ directory, extra script args).
# All are pure Python, need nothing beyond pyperf and run on 3.12 to 3.15 and 3.14t; each
# script defines exactly one pyperf benchmark (with the args given).
KNOWN = {
    "richards": ("bm_richards", ()),
    "nbody": ("bm_nbody", ()),
    "float": ("bm_float", ()),
    "chaos": ("bm_chaos", ()),
    "deltablue": ("bm_deltablue", ()),
    "go": ("bm_go", ()),
    "hexiom": ("bm_hexiom", ()),
    "raytrace": ("bm_raytrace", ()),
    "spectral_norm": ("bm_spectral_norm", ()),
    "nqueens": ("bm_nqueens", ()),
    "json_dumps": ("bm_json_dumps", ()),
    "json_loads": ("bm_json_loads", ()),
    "pickle_pure_python": ("bm_pickle", ("--pure-python", "pickle")),
    "generators": ("bm_generators", ()),
    "regex_compile": ("bm_regex_compile", ()),
    "pyflate": ("bm_pyflate", ()),
    # Not in the default set (slow per loop, or redundant), but known to work:
    "unpickle_pure_python": ("bm_pickle", ("--pure-python", "unpickle")),
    "fannkuch": ("bm_fannkuch", ()),
    "coroutines": ("bm_coroutines", ()),
    "comprehensions": ("bm_comprehensions", ()),
    "unpack_sequence": ("bm_unpack_sequence", ()),
    "meteor_contest": ("bm_meteor_contest", ()),
    "richards_super": ("bm_richards_super", ()),
    "gc_collect": ("bm_gc_collect", ()),
    "async_tree_none": ("bm_async_tree", ("none",)),
}
DEFAULT_BENCHMARKS = list(KNOWN)[:16]
QUICK_BENCHMARKS = ["richards", "float", "deltablue", "json_dumps"]


@dataclass
class Run:
    """One child process: one benchmark under one configuration."""

    benchmark: str
    config: str
    round: int
    loops: int
    argv: list[str]
    returncode: int | None = None
    values: list[float] = field(default_factory=list)  # seconds per (inner) loop
    inner_loops: int = 1  # set by the script; one value takes loops * inner_loops * v
    maxrss_kib: int | None = None
    wall_s: float | None = None
    error: str | None = None


def find_benchmarks_dir() -> Path:
    spec = importlib.util.find_spec("pyperformance")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("error: pyperformance is not installed (pip install pyperformance pyperf)")
    root = Path(next(iter(spec.submodule_search_locations)))
    bench_dir = root / "data-files" / "benchmarks"
    if not bench_dir.is_dir():
        sys.exit(f"error: no benchmarks directory at {bench_dir}")
    return bench_dir


def resolve(name: str, bench_dir: Path) -> tuple[Path, tuple[str, ...]]:
    """Return (script, extra args) for a benchmark name (or a bare bm_ directory)."""
    dirname, extra = KNOWN.get(name, (f"bm_{name}", ()))
    script = bench_dir / dirname / "run_benchmark.py"
    if not script.is_file():
        sys.exit(f"error: unknown benchmark {name!r} (no {script})")
    return script, extra


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONTRACEMALLOC", None)  # only the tracemalloc config traces
    return env


def command(
    python: str,
    config: str,
    script: Path,
    extra: tuple[str, ...],
    loops: int,
    values: int,
    warmups: int,
    output: Path,
) -> list[str]:
    hooks = [python, "-u", "-m", "interheap", "run"]
    prefix = {
        "none": [python, "-u"],
        "hooks": hooks,
        # The hooks plus sampled allocation sites (default rate, 512 KiB), or plus the
        # timeline (default interval, 10 ms): each one feature on top of the hooks.
        "sites": [*hooks, "--sites"],
        "timeline": [*hooks, "--timeline"],
        # The checking hooks: the hooks plus the memory-bug checks (exit 1 on findings).
        "check": [python, "-u", "-m", "interheap", "check"],
        "tracemalloc": [python, "-u", "-X", "tracemalloc=1"],
        # CPython's own mimalloc (3.13+), and the interheap allocator via the launcher.
        "mimalloc": ["env", "PYTHONMALLOC=mimalloc", python, "-u"],
        # CPython's debug hooks on its allocators (pymalloc underneath), no interheap.
        "debug": ["env", "PYTHONMALLOC=debug", python, "-u"],
        "interheap": [str(Path(python).with_name("interheap-python")), "-u"],
        # `interheap run` under the launcher: its heaps keep requested sizes and
        # the figures are read from them, no hook installed.
        "interheap-run": [str(Path(python).with_name("interheap-python")), "-u", "-m", "interheap", "run"],
    }[config]
    worker = [
        "--worker",
        "--loops",
        str(loops),
        "--values",
        str(values),
        "--warmups",
        str(warmups),
        "--output",
        str(output),
    ]
    return [*prefix, str(script), *extra, *worker]


def run_child(argv: list[str], cwd: Path, log_prefix: Path, timeout: float) -> tuple:
    """Run argv to completion; return (returncode, rusage, wall seconds, stderr tail)."""
    out_path = log_prefix.with_suffix(".stdout")
    err_path = log_prefix.with_suffix(".stderr")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            # wait4 gives this child's own rusage; ru_maxrss is its peak RSS in KiB.
            _, status, rusage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            timer.cancel()
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    tail = err_path.read_text(errors="replace")[-3000:]
    return proc.returncode, rusage, wall, tail


def load_values(path: Path) -> tuple[list[float], int]:
    """Values (seconds per loop) and inner loops of the one benchmark in a pyperf file."""
    suite = pyperf.BenchmarkSuite.load(str(path))
    benchmarks = suite.get_benchmarks()
    if len(benchmarks) != 1:
        raise ValueError(f"{path}: expected 1 benchmark, got {len(benchmarks)}")
    bench = benchmarks[0]
    return list(bench.get_values()), int(bench.get_metadata().get("inner_loops", 1))


class Session:
    def __init__(self, args: argparse.Namespace, bench_dir: Path, workdir: Path) -> None:
        self.args = args
        self.bench_dir = bench_dir
        self.workdir = workdir
        self.runs: list[Run] = []
        self.calibration: list[Run] = []
        self.counter = 0

    def execute(self, name: str, config: str, loops: int, values: int, warmups: int, rnd: int) -> Run:
        script, extra = resolve(name, self.bench_dir)
        self.counter += 1
        tag = f"{self.counter:04d}-{name}-{config}-r{rnd}"
        output = self.workdir / f"{tag}.json"
        argv = command(self.args.python, config, script, extra, loops, values, warmups, output)
        run = Run(name, config, rnd, loops, argv)
        rc, rusage, wall, tail = run_child(argv, script.parent, self.workdir / tag, self.args.timeout)
        run.returncode, run.maxrss_kib, run.wall_s = rc, rusage.ru_maxrss, wall
        if rc != 0:
            run.error = f"exit code {rc}\n{tail}"
        else:
            try:
                run.values, run.inner_loops = load_values(output)
            except (OSError, ValueError, KeyError) as exc:
                run.error = f"cannot read {output}: {exc}\n{tail}"
        if run.error:
            print(f"\n  FAILED {name} [{config}]: {shlex.join(argv)}", file=sys.stderr)
            print("    " + run.error.replace("\n", "\n    ").rstrip(), file=sys.stderr)
        return run

    def calibrate(self, name: str) -> int | None:
        """Loops so that one value takes about --target-time seconds (config none)."""
        loops = 1
        for _ in range(4):
            run = self.execute(name, "none", loops, 1, 1, 0)
            self.calibration.append(run)
            if run.error or not run.values:
                return None
            # pyperf divides by inner loops too; an outer loop takes inner_loops values.
            per_loop = max(min(run.values) * run.inner_loops, 1e-9)
            if per_loop * loops >= 0.02:
                break
            # Too short to trust: measure again with enough loops for ~0.05 s.
            loops = max(loops + 1, math.ceil(0.05 / per_loop))
        return max(1, round(self.args.target_time / per_loop))


def geomean(xs: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(x) for x in xs)) if xs else float("nan")


def python_info(python: str) -> str:
    code = (
        "import sys, sysconfig; ft = sysconfig.get_config_var('Py_GIL_DISABLED'); "
        "print(sys.version.replace(chr(10), ' '), '(free-threaded)' if ft else '')"
    )
    out = subprocess.run(
        [python, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env=child_env(),
    )
    return out.stdout.strip()


# Imports interheap and compiles its modules to bytecode, as installing its wheel does:
# an editable install under PYTHONDONTWRITEBYTECODE would otherwise compile the package
# from source in every child, which costs time and peak RSS that users do not pay (the
# benchmarks and pyperf are compiled once, by pip).
_PREPARE_INTERHEAP = (
    "import compileall, os, interheap; "
    "compileall.compile_dir(os.path.dirname(interheap.__file__), quiet=1, workers=1)"
)


def check_interheap(python: str) -> None:
    proc = subprocess.run(
        [python, "-c", _PREPARE_INTERHEAP],
        check=False,
        capture_output=True,
        text=True,
        env=child_env(),
    )
    if proc.returncode != 0:
        sys.exit(
            f"error: configs {', '.join(HOOKED)} need interheap importable by {python}:\n"
            f"{proc.stderr.strip()}\n(use --configs none,tracemalloc to skip it)"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="interheap hooks vs tracemalloc vs nothing on pyperformance.",
        epilog="known benchmarks: " + ", ".join(KNOWN),
    )
    p.add_argument(
        "--benchmarks",
        help="comma-separated names (default: the first 16 known; 'all' for all known)",
    )
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick 1)")
    p.add_argument("--quick", action="store_true", help="smoke test: 4 benchmarks, 1 round")
    p.add_argument(
        "--configs",
        default=",".join(DEFAULT_CONFIGS),
        help=f"comma-separated subset of {','.join(CONFIGS)} (none is always run; "
        f"default {','.join(DEFAULT_CONFIGS)})",
    )
    p.add_argument(
        "--vs",
        metavar="CONFIG",
        help="also give every other config's ratios against CONFIG in a second table "
        "(default: hooks when sites, timeline or check runs with hooks; 'none' for no second table)",
    )
    p.add_argument("--values", type=int, help="values per run (default 5; quick 3)")
    p.add_argument("--warmups", type=int, default=1, help="warmup values per run")
    p.add_argument(
        "--target-time",
        type=float,
        help="seconds per value for loop calibration (default 0.1; quick 0.05)",
    )
    p.add_argument("--python", default=sys.executable, help="interpreter to benchmark")
    p.add_argument("--json", metavar="OUT", help="write every raw number to OUT")
    p.add_argument("--seed", type=int, help="seed for the shuffled order")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before a run is killed")
    p.add_argument("--keep", action="store_true", help="keep the per-run files")
    args = p.parse_args(argv)

    if args.benchmarks == "all":
        args.benchmarks = list(KNOWN)
    elif args.benchmarks:
        args.benchmarks = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    else:
        args.benchmarks = QUICK_BENCHMARKS if args.quick else DEFAULT_BENCHMARKS
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.values is None:
        args.values = 3 if args.quick else 5
    if args.target_time is None:
        args.target_time = 0.05 if args.quick else 0.1
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        p.error(f"unknown config(s): {', '.join(sorted(unknown))}")
    args.configs = [c for c in CONFIGS if c == "none" or c in configs]
    if args.vs is None:
        on_hooks = "hooks" in args.configs and any(c in args.configs for c in ON_HOOKS)
        args.vs = "hooks" if on_hooks else "none"
    elif args.vs not in args.configs:
        p.error(f"--vs {args.vs}: not among the configs ({', '.join(args.configs)})")
    if args.rounds < 1 or args.values < 1 or args.warmups < 0:
        p.error("--rounds and --values must be >= 1, --warmups >= 0")
    if args.seed is None:
        args.seed = random.randrange(2**32)
    return args


def report(args: argparse.Namespace, runs: list[Run], loops: dict[str, int]) -> dict:
    configs = args.configs
    others = [c for c in configs if c != "none"]
    summary: dict = {"benchmarks": {}, "geomean": {}}
    time_ratios: dict[str, list[float]] = {c: [] for c in others}
    rss_ratios: dict[str, list[float]] = {c: [] for c in others}
    medians_of: dict[str, dict[str, float]] = {}  # benchmark -> config -> median
    rss_of: dict[str, dict[str, float]] = {}

    head = f"{'benchmark':<22} {'loops':>6} {'none (ms)':>11}"
    head += "".join(f" {c + ' ratio':>17}" for c in others)
    head += f" {'none RSS MiB':>13}"
    head += "".join(f" {c[:5] + ' RSS ratio':>16}" for c in others)
    print()
    print(head)
    print("-" * len(head))
    for name in args.benchmarks:
        entry: dict = {"loops": loops.get(name)}
        medians: dict[str, float] = {}
        rss: dict[str, float] = {}
        for c in configs:
            mine = [r for r in runs if r.benchmark == name and r.config == c]
            vals = [v for r in mine for v in r.values]
            failed = sum(1 for r in mine if r.error)
            if vals and not failed:
                medians[c] = statistics.median(vals)
            ok = [r.maxrss_kib for r in mine if not r.error and r.maxrss_kib]
            if ok:
                rss[c] = statistics.median(ok)
            entry[c] = {
                "median_s": medians.get(c),
                "median_maxrss_kib": rss.get(c),
                "failed_runs": failed,
            }
        medians_of[name], rss_of[name] = medians, rss
        line = f"{name:<22} {loops.get(name, 0):>6} "
        line += f"{medians['none'] * 1e3:>11.4g}" if "none" in medians else f"{'FAILED':>11}"
        for c in others:
            if "none" in medians and c in medians:
                ratio = medians[c] / medians["none"]
                time_ratios[c].append(ratio)
                entry[c]["time_ratio"] = ratio
                line += f" {ratio:>17.3f}"
            else:
                line += f" {'FAILED' if c not in medians else '-':>17}"
        line += f" {rss['none'] / 1024:>13.1f}" if "none" in rss else f" {'-':>13}"
        for c in others:
            if "none" in rss and c in rss:
                ratio = rss[c] / rss["none"]
                rss_ratios[c].append(ratio)
                entry[c]["rss_ratio"] = ratio
                line += f" {ratio:>16.3f}"
            else:
                line += f" {'-':>16}"
        print(line)
        summary["benchmarks"][name] = entry
    print()
    if others:
        parts = [f"{c}/none = {geomean(time_ratios[c]):.3f}" for c in others]
        print("geomean " + "   ".join(parts))
        parts = [f"{c}/none = {geomean(rss_ratios[c]):.3f}" for c in others]
        print("geomean peak RSS " + "   ".join(parts))
        for c in others:
            summary["geomean"][c] = {
                "time_ratio": geomean(time_ratios[c]),
                "rss_ratio": geomean(rss_ratios[c]),
                "benchmarks": len(time_ratios[c]),
            }
    if args.vs != "none":
        summary["vs"] = report_vs(args, loops, medians_of, rss_of)
    return summary


def report_vs(
    args: argparse.Namespace,
    loops: dict[str, int],
    medians_of: dict[str, dict[str, float]],
    rss_of: dict[str, dict[str, float]],
) -> dict:
    """The second table: every config but none and the baseline, against the baseline
    (``--vs``), from the same medians as the first."""
    base = args.vs
    others = [c for c in args.configs if c not in ("none", base)]
    doc: dict = {"baseline": base, "benchmarks": {}, "geomean": {}}
    time_ratios: dict[str, list[float]] = {c: [] for c in others}
    rss_ratios: dict[str, list[float]] = {c: [] for c in others}
    head = f"{'benchmark':<22} {'loops':>6} {base[:8] + ' (ms)':>13}"
    head += "".join(f" {c[:8] + '/' + base[:8]:>17}" for c in others)
    head += f" {base[:5] + ' RSS MiB':>13}"
    head += "".join(f" {c[:5] + '/' + base[:5] + ' RSS':>16}" for c in others)
    print()
    print(f"against {base}: median(config) / median({base}), same runs as above")
    print(head)
    print("-" * len(head))
    for name in args.benchmarks:
        medians, rss = medians_of.get(name, {}), rss_of.get(name, {})
        entry: dict = {c: {} for c in others}
        line = f"{name:<22} {loops.get(name, 0):>6} "
        line += f"{medians[base] * 1e3:>13.4g}" if base in medians else f"{'FAILED':>13}"
        for c in others:
            if base in medians and c in medians:
                ratio = medians[c] / medians[base]
                time_ratios[c].append(ratio)
                entry[c]["time_ratio"] = ratio
                line += f" {ratio:>17.3f}"
            else:
                line += f" {'FAILED' if c not in medians else '-':>17}"
        line += f" {rss[base] / 1024:>13.1f}" if base in rss else f" {'-':>13}"
        for c in others:
            if base in rss and c in rss:
                ratio = rss[c] / rss[base]
                rss_ratios[c].append(ratio)
                entry[c]["rss_ratio"] = ratio
                line += f" {ratio:>16.3f}"
            else:
                line += f" {'-':>16}"
        print(line)
        doc["benchmarks"][name] = entry
    print()
    if others:
        parts = [f"{c}/{base} = {geomean(time_ratios[c]):.3f}" for c in others]
        print("geomean " + "   ".join(parts))
        parts = [f"{c}/{base} = {geomean(rss_ratios[c]):.3f}" for c in others]
        print("geomean peak RSS " + "   ".join(parts))
        for c in others:
            doc["geomean"][c] = {
                "time_ratio": geomean(time_ratios[c]),
                "rss_ratio": geomean(rss_ratios[c]),
                "benchmarks": len(time_ratios[c]),
            }
    return doc


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench_dir = find_benchmarks_dir()
    for name in args.benchmarks:
        resolve(name, bench_dir)  # fail early on unknown names
    if any(c in args.configs for c in HOOKED):
        check_interheap(args.python)
    info = python_info(args.python)
    rng = random.Random(args.seed)

    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"python:  {args.python}")
    print(f"         {info}")
    print(f"pyperformance benchmarks: {bench_dir}")
    print(
        f"configs: {', '.join(args.configs)}; rounds {args.rounds}; values {args.values}; "
        f"warmups {args.warmups}; ~{args.target_time} s per value; seed {args.seed}"
    )
    for c in args.configs:
        example = command(
            args.python,
            c,
            Path("run_benchmark.py"),
            (),
            0,
            args.values,
            args.warmups,
            Path("OUT.json"),
        )
        example_cmd = shlex.join(example).replace("--loops 0", "--loops N")
        print(f"{c + ':':<13}{example_cmd}")

    workdir = Path(tempfile.mkdtemp(prefix="interheap-bench-"))
    session = Session(args, bench_dir, workdir)
    start = time.perf_counter()
    loops: dict[str, int] = {}
    try:
        print("\ncalibrating loops (config none): ", end="", flush=True)
        for name in args.benchmarks:
            n = session.calibrate(name)
            if n is None:
                print(f"{name}=FAILED ", end="", flush=True)
                continue
            loops[name] = n
            print(f"{name}={n} ", end="", flush=True)
        print()
        names = [b for b in args.benchmarks if b in loops]
        for rnd in range(1, args.rounds + 1):
            print(f"round {rnd}/{args.rounds}: ", end="", flush=True)
            order = names[:]
            rng.shuffle(order)
            for name in order:
                configs = args.configs[:]
                rng.shuffle(configs)
                for c in configs:
                    run = session.execute(name, c, loops[name], args.values, args.warmups, rnd)
                    session.runs.append(run)
                recent = session.runs[-len(configs) :]
                print("F" if any(r.error for r in recent) else ".", end="", flush=True)
            print(f" ({time.perf_counter() - start:.0f} s)")
    finally:
        if args.keep:
            print(f"per-run files kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    summary = report(args, session.runs, loops)
    elapsed = time.perf_counter() - start
    print(f"total {elapsed:.0f} s, {len(session.runs)} runs")

    failed = any(r.error for r in session.runs) or len(loops) < len(args.benchmarks)
    if args.json:
        doc = {
            "command": [sys.executable, *sys.argv],
            "python": args.python,
            "python_version": info,
            "configs": args.configs,
            "benchmarks": args.benchmarks,
            "rounds": args.rounds,
            "values": args.values,
            "warmups": args.warmups,
            "target_time": args.target_time,
            "seed": args.seed,
            "loops": loops,
            "elapsed_s": elapsed,
            "summary": summary,
            "calibration_runs": [asdict(r) for r in session.calibration],
            "runs": [asdict(r) for r in session.runs],
        }
        with open(args.json, "w", encoding="utf-8") as fp:
            json.dump(doc, fp, indent=1)
        print(f"raw numbers written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
