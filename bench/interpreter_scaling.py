"""Throughput of 2 isolated interpreters in parallel threads against 1.

Each interpreter runs the same allocation-heavy loop (building and dropping
lists, dicts, strings and bytes) for a fixed number of iterations; the figure
is (work done by 2 interpreters / wall time) / (work done by 1 / wall time),
median of several alternating trials. Run it under ``interheap-python`` and
under the plain ``python`` (pymalloc) to compare; on 2 cores the ideal is 2.0.

    interheap-python bench/interpreter_scaling.py [--iterations N] [--trials K]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

try:  # 3.14+: the public API (PEP 734); its interpreters are isolated (own GIL)
    from concurrent import interpreters

    def create() -> object:
        return interpreters.create()

    def run(interp: object, code: str) -> None:
        interp.exec(code)

except ImportError:
    try:  # 3.13
        import _interpreters as interpreters

        def create() -> object:
            return interpreters.create("isolated")

        def run(interp: object, code: str) -> None:
            failure = interpreters.exec(interp, code)
            if failure is not None:
                raise RuntimeError(failure)

    except ImportError:  # 3.12
        import _xxsubinterpreters as interpreters

        def create() -> object:
            return interpreters.create(isolated=True)

        def run(interp: object, code: str) -> None:
            interpreters.run_string(interp, code)


WORK = """
for i in range({n}):
    items = [str(j) * 3 for j in range(50)]
    table = {{s: len(s) for s in items}}
    blob = b"".join(s.encode() for s in items)
    del items, table, blob
"""


def timed(interps: list[object], n: int) -> float:
    code = WORK.format(n=n)
    threads = [threading.Thread(target=run, args=(i, code)) for i in interps]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20000)
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    interps = [create(), create()]
    timed(interps, 500)  # warm up both
    ratios = []
    for _ in range(args.trials):
        one = timed(interps[:1], args.iterations)
        two = timed(interps, args.iterations)
        ratios.append((2 * args.iterations / two) / (args.iterations / one))
    import sys

    try:
        import interheap

        allocator = interheap.allocator_domains() or "pymalloc/default"
    except ImportError:
        allocator = "?"
    print(
        f"2 interpreters / 1: median throughput ratio {statistics.median(ratios):.2f} "
        f"(trials {', '.join(f'{r:.2f}' for r in ratios)}), "
        f"Python {sys.version.split()[0]}, allocator {allocator}"
    )


if __name__ == "__main__":
    main()
