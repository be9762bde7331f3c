"""Do threads that allocate at once scale as well under interheap's hooks as without them?

Made for free-threaded builds (3.14t), where threads run Python in parallel and every
hook may be called from all of them at once. Each run is one process: THREADS threads
start together and each makes and drops ``--pairs`` small objects (a list, a bytes and a
dict: object and mem blocks through the hooks). The process reports pairs per second over
all threads. Configurations, interleaved in rounds (shuffled order each round):

    none    python thread_scaling.py --child ...
    hooks   the same, after ``interheap.install()`` (what ``python -m interheap run`` does)

For 1 thread and for THREADS threads, it prints the median throughput of each
configuration, and the scaling (throughput with THREADS threads over 1 thread) of each.
The figure issue 16 bounds is the last line: the hooks' scaling over the scaling without
them (1.00: the hooks scale as well). Medians and ratios only: the machine is shared.

    python bench/thread_scaling.py [--threads 8] [--pairs 200000] [--rounds 5] [--python PATH]

On a build with the GIL threads take turns, so scaling stays near 1 for both.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import sysconfig

CHILD = r"""
import sys, threading, time
mode, threads, pairs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if mode == "hooks":
    import interheap
    interheap.install()

def work(n):
    for i in range(n):
        a = [i, i]
        b = bytes(40)
        c = {"k": i}
        del a, b, c

work(2000)                          # warm up this thread's caches and the free lists
start = threading.Barrier(threads + 1)
def run():
    start.wait()
    work(pairs)
workers = [threading.Thread(target=run) for _ in range(threads)]
for t in workers:
    t.start()
start.wait()
t0 = time.perf_counter()
for t in workers:
    t.join()
elapsed = time.perf_counter() - t0
print(threads * pairs / elapsed)
"""


def run(python: str, mode: str, threads: int, pairs: int) -> float:
    out = subprocess.run(
        [python, "-c", CHILD, mode, str(threads), str(pairs)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        sys.exit(f"{mode}, {threads} threads: exit {out.returncode}\n{out.stderr[-3000:]}")
    return float(out.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=200_000, help="iterations per thread (default 200000)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--seed", type=int)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    cells = [(mode, n) for mode in ("none", "hooks") for n in (1, args.threads)]
    results: dict[tuple[str, int], list[float]] = {cell: [] for cell in cells}
    for _ in range(args.rounds):
        rng.shuffle(cells)
        for mode, n in cells:
            # The same total work whatever the thread count: pairs per thread shrinks.
            per_thread = max(1, args.pairs // n) if n > 1 else args.pairs
            results[(mode, n)].append(run(args.python, mode, n, per_thread))
    median = {cell: statistics.median(values) for cell, values in results.items()}
    free_threaded = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
    print(
        f"python: {args.python} ({'free-threaded' if free_threaded else 'with the GIL'}), "
        f"{args.rounds} interleaved rounds, medians"
    )
    print(f"{'threads':>8}  {'none (pairs/s)':>15}  {'hooks (pairs/s)':>15}  hooks/none")
    for n in (1, args.threads):
        none, hooks = median[("none", n)], median[("hooks", n)]
        print(f"{n:>8}  {none:>15,.0f}  {hooks:>15,.0f}  {hooks / none:10.3f}")
    scale_none = median[("none", args.threads)] / median[("none", 1)]
    scale_hooks = median[("hooks", args.threads)] / median[("hooks", 1)]
    print(f"scaling, {args.threads} threads over 1: none {scale_none:.2f}x, hooks {scale_hooks:.2f}x")
    print(f"the hooks' scaling over the scaling without them: {scale_hooks / scale_none:.3f}")


if __name__ == "__main__":
    main()
