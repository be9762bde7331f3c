"""pyperformance by instruction count: the allocators compared without timing noise.

Timed ratios on a shared 2-core machine move by several percent from run to
run; instruction counts from ``valgrind --tool=callgrind`` repeat exactly. For
each benchmark and configuration, the pyperformance worker runs twice under
callgrind, with ``L`` and ``2 L`` loops (one value, no warmup); the difference
of the two totals over ``L`` is the instructions of one loop of the benchmark
alone (start-up, imports and pyperf's own work cancel). Configurations as in
``bench/pyperformance_hooks.py``: by default ``none`` (pymalloc), ``mimalloc``
(``PYTHONMALLOC=mimalloc``, 3.13+) and ``interheap`` (the launcher);
``--configs`` picks others among them, such as ``none,hooks,sites,timeline``
(``python -m interheap run``, plus ``--sites`` or ``--timeline``). When
``sites`` or ``timeline`` runs with ``hooks``, a second table gives their
ratios against ``hooks``. The timeline's recorder thread wakes every 10 ms
of wall time, and under callgrind a loop lasts ~50 times longer: its
instructions here are ~50 times what they are per loop outside callgrind.

Instructions are not time: cache misses and branch mispredictions are not
counted, and an allocator that saves instructions but spreads memory can
lose them again in misses. ``--cache-sim`` also runs callgrind's cache model
(the host's L1 and last-level geometry) and prints, per benchmark, the ratio
of estimated cycles (instructions + 10 per L1 miss + 100 per last-level
miss, KCachegrind's estimate) and of L1 data misses: stand-ins for time
on a machine where timing is noise. Misses depend on addresses (mapping
places, temporary file names), so they move by about 1% from run to run,
where instruction counts repeat exactly. The timed benchmark
(``make bench-allocator``) is the other half.

``--allocator-share`` also counts the instructions spent under allocator
functions (``callgrind.ALLOCATOR_FUNCTION``: CPython's entry points, pymalloc,
mimalloc, glibc malloc, interheap; with what they call, such as thread-state
lookups) and prints each configuration's share of the loop. ``1 - share``
of pymalloc is the instruction ratio that an allocator costing nothing at
all would reach: no allocator can beat it by saving instructions.

    python bench/pyperformance_instructions.py [--benchmarks a,b] [--jobs 2] [--cache-sim]
        [--allocator-share] [--configs none,hooks,sites,timeline] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from callgrind import allocator_instructions, estimated_cycles, events_of
from pyperformance_hooks import CONFIGS, ON_HOOKS, child_env, command, find_benchmarks_dir, geomean, resolve

# Benchmarks whose loop takes at most about 0.3 s (callgrind runs ~50x slower).
DEFAULT_BENCHMARKS = [
    "richards",
    "nbody",
    "float",
    "chaos",
    "deltablue",
    "go",
    "hexiom",
    "nqueens",
    "json_dumps",
    "json_loads",
    "pickle_pure_python",
    "generators",
]
# Loops per benchmark for the short run (the long one runs twice as many):
# enough that one loop's work dwarfs the noise of pyperf's bookkeeping.
LOOPS = {"deltablue": 8, "hexiom": 4, "json_dumps": 2, "json_loads": 40, "pickle_pure_python": 4}


def per_loop(
    python: str, config: str, name: str, bench_dir: Path, workdir: str, cache_sim: bool, share: bool
) -> dict[str, float]:
    """Per loop of the benchmark: instructions (``Ir``); with the cache model,
    estimated cycles (``cycles``) and L1 data misses (``D1m``); with ``share``,
    the instructions under allocator functions (``alloc``)."""
    script, extra = resolve(name, bench_dir)
    loops = LOOPS.get(name, 1)
    totals = []
    for n in (loops, 2 * loops):
        out = Path(workdir, f"{name}.{config}.{n}.json")
        argv = command(python, config, script, extra, n, 1, 0, out)
        if argv[0] == "env":  # the mimalloc config: set the variable ourselves
            argv = argv[2:]
        env = child_env()
        if config == "mimalloc":
            env["PYTHONMALLOC"] = "mimalloc"
        env["PYTHONHASHSEED"] = "0"
        profile = str(out) + ".cg"
        events, _ = events_of(argv, profile, env=env, cache_sim=cache_sim)
        metrics = {"Ir": events["Ir"]}
        if share:
            metrics["alloc"] = allocator_instructions(profile)
        os.unlink(profile)  # tens of MB each
        if cache_sim:
            metrics["cycles"] = estimated_cycles(events)
            metrics["D1m"] = events["D1mr"] + events["D1mw"]
        totals.append(metrics)
    return {k: (totals[1][k] - totals[0][k]) / loops for k in totals[0]}


def print_table(
    title: str, metric: str, names: list[str], configs: list[str], figures: dict, base: str = "none"
) -> dict[str, float]:
    """One table of ratios against ``base`` (``none`` unless given); returns the
    geometric means."""
    print(title)
    others = [c for c in configs if c != base]
    labels = [f"{c} ratio" if base == "none" else f"{c}/{base}" for c in others]
    header = f"{'benchmark':<20}{base[:8] + ' (M)':>12}" + "".join(f"{label:>18}" for label in labels)
    print(header)
    print("-" * len(header))
    ratios: dict[str, list[float]] = {c: [] for c in others}
    for n in names:
        reference = figures[(n, base)][metric]
        row = f"{n:<20}{reference / 1e6:>12.1f}"
        for c in others:
            ratio = figures[(n, c)][metric] / reference
            ratios[c].append(ratio)
            row += f"{ratio:>18.3f}"
        print(row)
    geo = {c: geomean(rs) for c, rs in ratios.items()}
    print("geomean " + "   ".join(f"{c}/{base} = {g:.3f}" for c, g in geo.items()))
    print()
    return geo


def print_shares(names: list[str], configs: list[str], figures: dict) -> dict[str, float]:
    """The allocator's share of each loop's instructions, per configuration,
    and the floor: the instruction ratio of an allocator that cost nothing
    (pymalloc's loop without its allocator). Returns the floor's geomean."""
    print("share of each loop's instructions spent under allocator functions")
    header = f"{'benchmark':<20}" + "".join(f"{c + ' share':>18}" for c in configs) + f"{'floor ratio':>14}"
    print(header)
    print("-" * len(header))
    floors = []
    for n in names:
        row = f"{n:<20}"
        for c in configs:
            row += f"{100 * figures[(n, c)]['alloc'] / figures[(n, c)]['Ir']:>17.2f}%"
        base = figures[(n, "none")]
        floors.append(1 - base["alloc"] / base["Ir"])
        print(row + f"{floors[-1]:>14.3f}")
    floor = geomean(floors)
    print(f"geomean floor = {floor:.3f}: no allocator can go below this by saving instructions")
    print()
    return {"zero-cost allocator": floor}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmarks", default=",".join(DEFAULT_BENCHMARKS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cache-sim", action="store_true", help="also estimated cycles and L1 misses")
    parser.add_argument(
        "--allocator-share", action="store_true", help="also the instructions spent under allocator functions"
    )
    parser.add_argument(
        "--configs",
        help=f"comma-separated subset of {','.join(CONFIGS)} (none is always run; "
        "default none,mimalloc,interheap, without mimalloc before 3.13)",
    )
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    python = sys.executable
    if args.configs:
        chosen = {c.strip() for c in args.configs.split(",") if c.strip()}
        if chosen - set(CONFIGS):
            parser.error(f"unknown config(s): {', '.join(sorted(chosen - set(CONFIGS)))}")
        configs = [c for c in CONFIGS if c == "none" or c in chosen]
    else:
        configs = ["none", *(["mimalloc"] if sys.version_info >= (3, 13) else []), "interheap"]
    # sites and timeline are the hooks plus one feature: also give them against the hooks.
    on_hooks = ["hooks", *(c for c in configs if c in ON_HOOKS)] if "hooks" in configs else []
    names = [b for b in args.benchmarks.split(",") if b]
    bench_dir = find_benchmarks_dir()
    with tempfile.TemporaryDirectory() as workdir, ThreadPoolExecutor(args.jobs) as pool:
        jobs = {
            (n, c): pool.submit(
                per_loop, python, c, n, bench_dir, workdir, args.cache_sim, args.allocator_share
            )
            for n in names
            for c in configs
        }
        figures = {key: job.result() for key, job in jobs.items()}
    version = sys.version.split()[0]
    geomeans = {
        "Ir": print_table(
            f"instructions per benchmark loop (callgrind), Python {version}", "Ir", names, configs, figures
        )
    }
    if len(on_hooks) > 1:
        geomeans["Ir vs hooks"] = print_table(
            "instructions per loop against the hooks alone", "Ir", names, on_hooks, figures, base="hooks"
        )
    if args.cache_sim:
        geomeans["cycles"] = print_table(
            "estimated cycles per loop (Ir + 10 x L1 misses + 100 x last-level misses)",
            "cycles",
            names,
            configs,
            figures,
        )
        geomeans["D1m"] = print_table("L1 data-cache misses per loop", "D1m", names, configs, figures)
        if len(on_hooks) > 1:
            title = "estimated cycles per loop against the hooks alone"
            geomeans["cycles vs hooks"] = print_table(title, "cycles", names, on_hooks, figures, "hooks")
    if args.allocator_share:
        geomeans["floor"] = print_shares(names, configs, figures)
    if args.json:
        doc = {
            "python": sys.version,
            "per_loop": {f"{n}/{c}": v for (n, c), v in figures.items()},
            "geomean": geomeans,
        }
        Path(args.json).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
