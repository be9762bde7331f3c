"""Pools several runs of ``bench/pyperformance_hooks.py`` into one set of ratios.

One run of the timed benchmark on a shared 2-core machine moves by about 1%
in its geometric mean, and single benchmarks by 5% or more. Runs written
with ``--json`` can be pooled: every timed value of every run goes into one
median per benchmark and configuration, and the ratios and their geometric
mean are taken from those medians. Peak RSS is the median of the runs'
``maxrss``. Each run's own geometric mean is printed too, to show the
spread that the pooled figure smooths.

    python bench/pool_runs.py out/run1.json out/run2.json ... [--baseline none]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict

from pyperformance_hooks import geomean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="JSON files written by pyperformance_hooks.py --json")
    parser.add_argument("--baseline", default="none", help="the configuration ratios are taken against")
    args = parser.parse_args()

    times: dict[tuple[str, str], list[float]] = defaultdict(list)
    peaks: dict[tuple[str, str], list[int]] = defaultdict(list)
    configs: list[str] = []
    per_run: list[tuple[str, dict[str, float]]] = []
    for path in args.runs:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
        if args.baseline not in document["configs"]:
            sys.exit(f"error: {path} has no {args.baseline!r} configuration (it has {document['configs']})")
        configs += [c for c in document["configs"] if c not in configs]
        for run in document["runs"]:
            if run["returncode"] == 0 and run["values"]:
                key = (run["benchmark"], run["config"])
                times[key] += run["values"]
                peaks[key].append(run["maxrss_kib"])
        summary = document["summary"]["benchmarks"]
        per_run.append(
            (
                path,
                {
                    c: geomean([b[c]["time_ratio"] for b in summary.values() if "time_ratio" in b.get(c, {})])
                    for c in document["configs"]
                    if c != args.baseline
                },
            )
        )
    others = [c for c in configs if c != args.baseline]
    benchmarks = sorted({b for b, c in times if c == args.baseline})
    complete = [b for b in benchmarks if all((b, c) in times for c in others)]
    if not complete:
        sys.exit("error: no benchmark has values for every configuration")

    print(f"{len(args.runs)} runs pooled; ratios of medians against {args.baseline}")
    header = f"{'benchmark':<20}{'values':>8}" + "".join(f"{c + ' time':>16}{c + ' RSS':>15}" for c in others)
    print(header)
    print("-" * len(header))
    time_ratios: dict[str, list[float]] = defaultdict(list)
    rss_ratios: dict[str, list[float]] = defaultdict(list)
    for b in complete:
        base_time = statistics.median(times[(b, args.baseline)])
        base_rss = statistics.median(peaks[(b, args.baseline)])
        row = f"{b:<20}{len(times[(b, args.baseline)]):>8}"
        for c in others:
            t = statistics.median(times[(b, c)]) / base_time
            m = statistics.median(peaks[(b, c)]) / base_rss
            time_ratios[c].append(t)
            rss_ratios[c].append(m)
            row += f"{t:>16.3f}{m:>15.3f}"
        print(row)
    print()
    for c in others:
        spread = ", ".join(f"{g[c]:.3f}" for _, g in per_run if c in g)
        print(
            f"{c}: pooled geomean time {geomean(time_ratios[c]):.4f}, peak RSS {geomean(rss_ratios[c]):.4f}"
            f" (single runs: {spread})"
        )


if __name__ == "__main__":
    main()
