"""The interheap allocator's figures, as seen from Python.

The allocator itself is installed before CPython initializes, by the
``interheap-python`` launcher (or an embedding program that calls
``interheap_allocator_install``). This module reads its figures through the C
API of the process, exactly and without any pointer table: each interpreter
has its own heaps for the mem and object domains, and for the raw calls made
while one of its thread states is current; raw calls without a thread state
(and, on free-threaded builds, every raw call) share one heap made of
per-thread parts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from . import _native

_DOMAIN_BITS = (("raw", 1), ("mem", 2), ("object", 4))


def allocator_domains() -> tuple[str, ...]:
    """The domains the interheap allocator serves in this process: ``()`` if it
    is not installed (plain ``python``), ``("raw", "mem", "object")`` under
    ``interheap-python``, ``("raw",)`` there on free-threaded builds."""
    mask = _native.allocator_domains()
    return tuple(name for name, bit in _DOMAIN_BITS if mask & bit)


def allocator_installed() -> bool:
    """Whether the interheap allocator serves at least one domain in this process."""
    return bool(allocator_domains())


@dataclass(frozen=True)
class HeapStats:
    """Figures of one heap (or a sum of heaps). Bytes are block sizes.

    ``remote_frees`` counts blocks freed by someone other than the heap's
    owner: for an interpreter's heap, frees made in another interpreter (or
    without a thread state); for the shared heap, frees by another thread.
    ``classes`` maps a block size (0 for blocks with pages of their own) to
    ``(allocations, frees, remote_frees)``.
    """

    live_bytes: int = 0
    peak_bytes: int | None = 0
    live_blocks: int = 0
    allocations: int = 0
    frees: int = 0
    remote_frees: int = 0
    reallocations: int = 0
    failures: int = 0
    mapped_bytes: int = 0
    classes: dict[int, tuple[int, int, int]] = field(default_factory=dict)

    @classmethod
    def from_json(cls, heap: dict[str, Any]) -> HeapStats:
        classes: dict[int, tuple[int, int, int]] = {}
        for index, block_size, allocs, frees, remote in heap["classes"]:
            key = block_size if block_size else -index  # large (-44) and huge (-45) pseudo-classes
            classes[key] = (allocs, frees, remote)
        return cls(
            live_bytes=heap["live_bytes"],
            peak_bytes=heap["peak_bytes"],
            live_blocks=heap["live_blocks"],
            allocations=heap["allocations"],
            frees=heap["frees"],
            remote_frees=heap["remote_frees"],
            reallocations=heap["reallocations"],
            failures=heap["failures"],
            mapped_bytes=heap["mapped_bytes"],
            classes=classes,
        )

    def __add__(self, other: HeapStats) -> HeapStats:
        classes = dict(self.classes)
        for key, (a, f, r) in other.classes.items():
            a0, f0, r0 = classes.get(key, (0, 0, 0))
            classes[key] = (a0 + a, f0 + f, r0 + r)
        return HeapStats(
            live_bytes=self.live_bytes + other.live_bytes,
            peak_bytes=None,
            live_blocks=self.live_blocks + other.live_blocks,
            allocations=self.allocations + other.allocations,
            frees=self.frees + other.frees,
            remote_frees=self.remote_frees + other.remote_frees,
            reallocations=self.reallocations + other.reallocations,
            failures=self.failures + other.failures,
            mapped_bytes=self.mapped_bytes + other.mapped_bytes,
            classes=classes,
        )


@dataclass(frozen=True)
class InterpreterHeaps:
    """One interpreter's heaps. ``ended`` is true once CPython freed the
    interpreter: its figures are final, and what it leaked is what is live."""

    id: int
    ended: bool
    mem: HeapStats
    object: HeapStats
    #: Raw calls made while one of its thread states was current.
    raw: HeapStats = field(default_factory=HeapStats)
    #: The interpreter's memory limit on its live bytes in all three (None: none).
    limit: int | None = None
    #: Requests refused because of the limit, and the largest of them in bytes.
    refused: int = 0
    largest_refused: int = 0

    @property
    def live_bytes(self) -> int:
        """Live bytes in its three heaps: what a limit is checked against."""
        return self.mem.live_bytes + self.object.live_bytes + self.raw.live_bytes


@dataclass(frozen=True)
class AllocatorStats:
    """What ``interheap.allocator_stats()`` returns."""

    domains: tuple[str, ...]
    interpreters: tuple[InterpreterHeaps, ...]
    shared: HeapStats
    raw_json: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)
    #: Whether the allocator reads the current thread state from libpython's
    #: own thread-local slot (the fast path) rather than through the C API.
    fast_thread_state: bool = False
    #: The guard against CPython 3.12's raw-allocator swap (see
    #: :func:`raw_swap_guard`) in the allocator's copy of the glue.
    raw_swap_guard: str | None = None
    #: Whether live and peak bytes are the sizes callers asked for (the heaps
    #: keep them: ``INTERHEAP_REQUESTED_SIZES=1``, on by default under
    #: ``interheap-python -m interheap``) rather than block sizes.
    requested_sizes: bool = False

    def interpreter(self, interp_id: int) -> InterpreterHeaps:
        for interp in self.interpreters:
            if interp.id == interp_id:
                return interp
        raise KeyError(f"no heaps for interpreter {interp_id} (it never allocated in mem or object)")


def parse_report(document: dict[str, Any]) -> AllocatorStats:
    """Builds an :class:`AllocatorStats` from the allocator's JSON report
    (also what ``interheap-python`` writes with ``INTERHEAP_REPORT=file.json``)."""
    per_interp: dict[int, dict[str, Any]] = {}
    shared = HeapStats(peak_bytes=None)
    for heap in document["heaps"]:
        stats = HeapStats.from_json(heap)
        if heap["kind"] == "interpreter":
            entry = per_interp.setdefault(heap["id"], {"ended": heap["ended"]})
            entry[heap["domain"]] = stats
        else:
            shared = shared + stats
    budgets = {b["id"]: b for b in document.get("limits", ())}
    no_budget = {"limit": None, "refused": 0, "largest_refused": 0}
    interpreters = tuple(
        InterpreterHeaps(
            id=i,
            ended=e["ended"],
            mem=e.get("mem", HeapStats()),
            object=e.get("object", HeapStats()),
            raw=e.get("raw", HeapStats()),
            limit=budgets.get(i, no_budget)["limit"],
            refused=budgets.get(i, no_budget)["refused"],
            largest_refused=budgets.get(i, no_budget)["largest_refused"],
        )
        for i, e in sorted(per_interp.items())
    )
    return AllocatorStats(
        domains=tuple(document["installed"]),
        interpreters=interpreters,
        shared=shared,
        raw_json=document,
        fast_thread_state=bool(document.get("fast_thread_state", False)),
        raw_swap_guard=document.get("raw_swap_guard"),
        requested_sizes=bool(document.get("requested_sizes", False)),
    )


def allocator_stats() -> AllocatorStats:
    """The interheap allocator's figures now.

    Raises RuntimeError if the allocator is not installed in this process
    (run the program with ``interheap-python`` instead of ``python``).
    """
    text = _native.allocator_report_json()
    if text is None:
        raise RuntimeError(
            "the interheap allocator is not installed in this process: it must be installed before "
            "CPython initializes, so run the program with interheap-python (or embed CPython and call "
            "interheap_allocator_install)"
        )
    return parse_report(json.loads(text))


def raw_swap_guard() -> str | None:
    """The guard against CPython 3.12's raw-allocator swap, in this process.

    CPython 3.12 sets the raw domain back to ``malloc`` for a moment in every
    interpreter's start-up (gh-111924). With own-GIL subinterpreters running
    in parallel, another interpreter's raw call can land in that window, so
    whenever interheap replaces the raw domain (the launcher, the embedding
    library, the hooks, a raw adapter) it closes the window. Returns:

    * ``"installed"``: the window is closed (3.12);
    * ``"not needed"``: this CPython never swaps (3.13 and later);
    * ``"unavailable: <why>"``: 3.12, but the guard could not be put in place
      (a statically linked libpython, say): parallel subinterpreters that use
      the raw domain are at risk;
    * ``None``: 3.12, and nothing of interheap replaced the raw domain yet.
    """
    text = _native.allocator_report_json()
    if text is not None:
        state = json.loads(text).get("raw_swap_guard")
        if state is not None:
            return state
    return _native.raw_swap_guard()
