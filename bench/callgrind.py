"""Running a command under ``valgrind --tool=callgrind`` and reading its
instruction count (shared by the instruction benchmarks)."""

from __future__ import annotations

import os
import re
import subprocess
import sys


def events_of(
    command: list[str], out_file: str, env: dict[str, str] | None = None, cache_sim: bool = False
) -> tuple[dict[str, int], str]:
    """Runs ``command`` under callgrind; returns ({event: total}, its stdout).

    Events are callgrind's names: ``Ir`` always; with ``cache_sim`` also the
    simulated cache's misses (``I1mr D1mr D1mw ILmr DLmr DLmw``)."""
    proc = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out_file}",
            *(["--cache-sim=yes"] if cache_sim else []),
            *command,
        ],
        capture_output=True,
        text=True,
        env=None if env is None else dict(os.environ, **env),
    )
    if proc.returncode != 0:
        sys.exit(f"valgrind failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    names = re.search(r"Events\s*:\s*(.+)", proc.stderr)
    values = re.search(r"Collected\s*:\s*(.+)", proc.stderr)
    if not names or not values:
        sys.exit(f"no event totals in valgrind's output:\n{proc.stderr[-2000:]}")
    return dict(zip(names.group(1).split(), map(int, values.group(1).split()), strict=True)), proc.stdout


def estimated_cycles(events: dict[str, int]) -> int:
    """KCachegrind's cycle estimate: an L1 miss costs 10 cycles, a last-level miss 100."""
    l1 = events["I1mr"] + events["D1mr"] + events["D1mw"]
    last_level = events["ILmr"] + events["DLmr"] + events["DLmw"]
    return events["Ir"] + 10 * l1 + 100 * last_level


def instructions_of(command: list[str], out_file: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Runs ``command`` under callgrind; returns (instructions, its stdout)."""
    events, stdout = events_of(command, out_file, env)
    return events["Ir"], stdout
