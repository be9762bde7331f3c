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


# Functions that belong to an allocator, by the name callgrind records: CPython's
# entry points (the same in every configuration), pymalloc, CPython's mimalloc,
# glibc's malloc (pymalloc's large blocks and the raw domain) and interheap.
ALLOCATOR_FUNCTION = re.compile(
    r"^(?:"
    r"PyObject_(?:Malloc|Calloc|Realloc|Free)|PyMem_(?:Raw)?(?:Malloc|Calloc|Realloc|Free)"
    r"|_PyObject_(?:Malloc|Calloc|Realloc|Free)|_PyMem_Raw(?:Malloc|Calloc|Realloc|Free)"
    r"|pymalloc_\w+|allocate_from_new_pool|new_arena|insert_to_(?:used|free)pool"
    r"|_PyObject_Arena\w+|address_in_range"
    r"|_Py(?:Object|Mem)_Mi\w+|_?mi_\w+"
    r"|malloc|free|calloc|realloc|cfree|__libc_(?:malloc|free|calloc|realloc)|_int_\w+"
    r"|malloc_\w+|unlink_chunk\S*|tcache_\w+|sysmalloc|systrim|munmap_chunk|mremap_chunk"
    r"|interheap_engine::.*|interheap_cpython::allocator::.*"
    r")(?:'\d+)?$"
)


def allocator_instructions(out_file: str) -> int:
    """Instructions spent under allocator functions in a callgrind output file.

    A function counts when ``ALLOCATOR_FUNCTION`` matches its name: its own
    instructions, plus the whole cost of what it calls outside the allocator
    (thread-state lookups through ``__tls_get_addr``, ``mmap``, ``memset`` for
    calloc). Calls from one allocator function to another are not added twice.
    Reads the first event column (``Ir``)."""
    names: dict[str, str] = {}  # "(id)" -> name: callgrind compresses repeated names

    def name_of(spec: str) -> str:
        spec = spec.strip()
        if spec.startswith("("):
            ident, _, name = spec.partition(")")
            ident += ")"
            if name.strip():
                names[ident] = name.strip()
            return names.get(ident, "")
        return spec

    total = 0
    positions = 1  # position columns before the costs ("positions: instr line" has two)
    current_is_allocator = False
    callee_is_allocator = False
    after_calls = False  # the next cost line is a call's inclusive cost
    with open(out_file, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if line.startswith("positions:"):
                positions = len(line.split()) - 1
            elif line.startswith("fn="):
                current_is_allocator = bool(ALLOCATOR_FUNCTION.match(name_of(line[3:])))
            elif line.startswith("cfn="):
                callee_is_allocator = bool(ALLOCATOR_FUNCTION.match(name_of(line[4:])))
            elif line.startswith("calls="):
                after_calls = True
            elif line[:1].isdigit() or line[:1] in "+-*":
                fields = line.split()
                cost = int(fields[positions]) if len(fields) > positions else 0
                if after_calls:
                    after_calls = False
                    if current_is_allocator and not callee_is_allocator:
                        total += cost
                elif current_is_allocator:
                    total += cost
    return total
