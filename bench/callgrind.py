"""Running a command under ``valgrind --tool=callgrind`` and reading its
instruction count (shared by the instruction benchmarks)."""

from __future__ import annotations

import os
import re
import subprocess
import sys


def instructions_of(command: list[str], out_file: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Runs ``command`` under callgrind; returns (instructions, its stdout)."""
    proc = subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}", *command],
        capture_output=True,
        text=True,
        env=None if env is None else dict(os.environ, **env),
    )
    if proc.returncode != 0:
        sys.exit(f"valgrind failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    match = re.search(r"refs:\s+([\d,]+)", proc.stderr)
    if not match:
        sys.exit(f"no instruction count in valgrind's output:\n{proc.stderr[-2000:]}")
    return int(match.group(1).replace(",", "")), proc.stdout
