"""Instructions the hooks add per allocation + free pair, by callgrind.

Runs the same allocation loop twice under ``valgrind --tool=callgrind``, in
the same kind of process (interheap imported in both), once without the hooks
and once with them, and prints (Ir(hooks) - Ir(none)) / pairs. Instruction
counts are repeatable on a noisy shared machine, unlike times.

    python bench/hook_instructions.py [--pairs N] [--kind list|bytes|dict] [--limited] [--sites]

With ``--limited`` it also measures the hooks with a memory limit set on the
looping interpreter (far above what it uses, so nothing is refused): the
cost of the limit check, side by side in the same run. With ``--sites``,
the hooks with allocation sites sampled at the default rate.

The loop creates and drops a one-element list (one object-domain block and
one mem-domain block per iteration, freed at once: the nursery path), or
bytes / small dicts. Requires valgrind on PATH.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile

from callgrind import instructions_of

CHILD = r"""
import sys
import interheap
mode, n, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
hooks = mode in ("hooks", "limited", "sites", "check")
make = {"list": lambda i: [i], "bytes": lambda i: bytes(40), "dict": lambda i: {"k": i}}[kind]
def work(n):
    for i in range(n):
        x = make(i)
        del x
work(2000)                      # warm up caches, free lists, the nursery
if hooks:
    interheap.install(check=mode == "check")
if mode == "limited":
    interheap.set_limit(0, "1 TB")
if mode == "sites":
    interheap.start_sites(seed=1)   # the default rate, 512 KiB
work(n)
if hooks:
    s = interheap.stats()
    e = s.interpreter(0)
    print("PAIRS", e.object.allocations + e.mem.allocations)
"""


def instructions(python: str, mode: str, pairs: int, kind: str, workdir: str) -> tuple[int, str]:
    """Instructions of `pairs` loop iterations under `mode`: the difference of a run
    with `pairs` and one with a quarter of them, so that start-up, install and exit
    (where the frees of blocks allocated before install take the slow path) cancel.
    The output is the longer run's, with PAIRS the difference of the two."""
    runs = []
    for label, n in (("s", pairs // 4), ("l", pairs)):
        out_file = os.path.join(workdir, f"cg.{mode}.{label}")
        runs.append(instructions_of([python, "-c", CHILD, mode, str(n), kind], out_file))
    (short, short_out), (long, long_out) = runs
    seen = [re.search(r"PAIRS (\d+)", out) for out in (short_out, long_out)]
    if all(seen):
        long_out += f"\nPAIRS {int(seen[1].group(1)) - int(seen[0].group(1))}"
    return long - short, long_out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=200_000, help="loop iterations (default 200000)")
    parser.add_argument("--kind", choices=("list", "bytes", "dict"), default="list")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument(
        "--limited", action="store_true", help="also measure with a memory limit set (nothing refused)"
    )
    parser.add_argument(
        "--sites", action="store_true", help="also measure with allocation sites sampled (512 KiB)"
    )
    parser.add_argument(
        "--check", action="store_true", help="also measure the checking hooks (python -m interheap check)"
    )
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("error: valgrind is not installed")
    with tempfile.TemporaryDirectory() as workdir:
        none, _ = instructions(args.python, "none", args.pairs, args.kind, workdir)
        hooks, out = instructions(args.python, "hooks", args.pairs, args.kind, workdir)
        limited = None
        if args.limited:
            limited, _ = instructions(args.python, "limited", args.pairs, args.kind, workdir)
        sites = None
        if args.sites:
            sites, _ = instructions(args.python, "sites", args.pairs, args.kind, workdir)
        check = None
        if args.check:
            check, _ = instructions(args.python, "check", args.pairs, args.kind, workdir)
    match = re.findall(r"PAIRS (\d+)", out)
    match = re.match(r"(\d+)", match[-1]) if match else None
    pairs = int(match.group(1)) if match else 0
    if pairs <= 0:
        sys.exit(f"the hooks saw no allocations:\n{out}")
    print(f"python: {args.python}  loop: {args.kind} x {args.pairs}")
    print(f"instructions without hooks: {none:,} (loop only: the difference of two loop lengths)")
    print(f"instructions with hooks:    {hooks:,}")
    print(f"allocation + free pairs the hooks saw: {pairs:,}")
    print(f"added instructions per pair: {(hooks - none) / pairs:.0f}")
    if limited is not None:
        print(f"instructions with hooks and a limit set: {limited:,}")
        print(f"the limit check adds per pair: {(limited - hooks) / pairs:.1f}")
    if sites is not None:
        print(f"instructions with hooks and sites sampled: {sites:,}")
        print(f"sampling sites adds per pair: {(sites - hooks) / pairs:.1f}")
    if check is not None:
        print(f"instructions with the checking hooks: {check:,}")
        print(f"checking adds per pair: {(check - hooks) / pairs:.1f}")


if __name__ == "__main__":
    main()
