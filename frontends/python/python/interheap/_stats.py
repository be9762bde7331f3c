"""Snapshots of interheap's figures: what ``interheap.stats()`` returns.

The extension module hands over raw dicts (one per bucket); this module turns
them into small immutable objects, adds what only Python can tell (which
interpreters are still alive), and renders them as JSON or a text table.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields

from ._limits import _alive_interpreter_ids

# Not `from typing import TYPE_CHECKING`: `run` loads this module at exit, and
# typing costs about 0.4 MiB there.
TYPE_CHECKING = False

DOMAINS = ("raw", "mem", "object")

if TYPE_CHECKING:
    from typing import Any

# The build's ABI flags ("t": free-threaded), not sysconfig's data: loading
# that (with threading) costs about 0.5 MiB, which `run`'s report at exit
# would add to the program's peak.
_FREE_THREADED = "t" in sys.abiflags


@dataclass(frozen=True)
class AdapterStats:
    """One adapter (:mod:`interheap.adapters`)'s figures (``interheap.stats().adapters``).

    ``mode`` is ``"unlocked"`` (no lock: only the main GIL exists),
    ``"locked"``, ``"thread-safe"`` or, briefly, ``"draining"``.
    ``switched_by`` is the interpreter ID whose call switched the adapter to
    locking (-1: a call without a thread state), or None.
    """

    id: int
    name: str
    kind: str
    domain: str
    mode: str
    installed: bool
    on_top: bool
    owns_memory: bool
    membarrier: bool
    calls: int
    lock_acquisitions: int
    contended_acquisitions: int
    switched_by: int | None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class DomainStats:
    """One domain's figures in one interpreter (or in the totals).

    ``peak_bytes`` is exact per interpreter and domain. In totals and in the
    ``all`` row it is ``None``: a peak of a sum is not the sum of the peaks,
    and tracking it would need one counter shared by every thread.
    """

    live_bytes: int = 0
    peak_bytes: int | None = 0
    live_blocks: int = 0
    allocations: int = 0
    reallocations: int = 0
    frees: int = 0
    failures: int = 0

    def __add__(self, other: DomainStats) -> DomainStats:
        return DomainStats(
            live_bytes=self.live_bytes + other.live_bytes,
            peak_bytes=None,
            live_blocks=self.live_blocks + other.live_blocks,
            allocations=self.allocations + other.allocations,
            reallocations=self.reallocations + other.reallocations,
            frees=self.frees + other.frees,
            failures=self.failures + other.failures,
        )

    def to_dict(self) -> dict[str, int | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _sum(stats: list[DomainStats]) -> DomainStats:
    total = DomainStats(peak_bytes=None)
    for s in stats:
        total = total + s
    return total


# Where an interpreter came from: the machine name the extension gives for
# CPython's _PyInterpreterState_WHENCE_* code -> what users will recognise.
# "stdlib" is the _interpreters module, behind concurrent.interpreters (and
# InterpreterPoolExecutor) on 3.14+; see _origin_label.
_WHENCE_LABELS = {
    "runtime": "runtime",
    "legacy_capi": "legacy C API",
    "capi": "C API",
    "xi": "cross-interpreter C API",
    "unknown": "unknown",
}


def _origin_label(whence: str | None, python: str) -> str:
    """Readable origin for a whence name recorded under Python ``python``."""
    if whence == "stdlib":
        major_minor = tuple(int(x) for x in python.split(".")[:2] if x.isdigit())
        return "concurrent.interpreters" if major_minor >= (3, 14) else "_interpreters"
    if whence is None:
        return "unknown"
    return _WHENCE_LABELS.get(whence, whence)


@dataclass(frozen=True)
class InterpreterStats:
    """Figures of one interpreter, or of calls made with no interpreter.

    ``kind`` is ``"interpreter"`` (``id`` is its interpreter ID), ``"none"``
    (raw calls made without a thread state: ``id`` and ``alive`` are None) or
    ``"overflow"`` (interpreters with IDs too large for a bucket of their own).

    What the hooks recorded about an interpreter while it lived (so also for
    destroyed ones; None where this CPython cannot tell or nothing was seen):

    * ``whence``: where it came from, CPython's own record
      (``_PyInterpreterState_GetWhence``, 3.13+): ``"runtime"`` (main),
      ``"stdlib"`` (``_interpreters``, behind ``concurrent.interpreters``),
      ``"xi"`` (cross-interpreter C API), ``"capi"``
      (``Py_NewInterpreterFromConfig``), ``"legacy_capi"``
      (``Py_NewInterpreter``), ``"unknown"`` (CPython does not know). None on
      3.12, which keeps no such record (main is still ``"runtime"``).
    * ``own_gil``: its own GIL (``_PyInterpreterConfig_InitFromState``,
      3.13+; None on 3.12).
    * ``own_obmalloc``: its own object-allocator state (same source;
      ``_PyInterpreterState_HasFeature`` on 3.12).
    * ``origin``: ``whence`` as users know it (``"concurrent.interpreters"``
      on 3.14+, ``"_interpreters"`` on 3.13, ``"unknown"`` for None).
    """

    id: int | None
    kind: str
    alive: bool | None
    raw: DomainStats
    mem: DomainStats
    object: DomainStats
    whence: str | None = None
    own_gil: bool | None = None
    own_obmalloc: bool | None = None
    origin: str = "unknown"
    #: Memory limit on live bytes over all three domains (None: no limit),
    #: requests it refused, and the largest of those (bytes; 0: none).
    limit: int | None = None
    refused: int = 0
    largest_refused: int = 0
    #: The peak of live bytes over all three domains, exact, while a limit
    #: was set or peaks were watched (the pytest plugin); 0 if neither.
    total_peak: int = 0

    @property
    def isolation(self) -> str | None:
        """``"isolated"`` (own GIL and obmalloc), ``"legacy"`` (main's), what
        is known otherwise, or None for main and the non-interpreter entries."""
        if self.kind != "interpreter" or self.id == 0:
            return None
        gil, obmalloc = self.own_gil, self.own_obmalloc
        if gil is not None and obmalloc is not None:
            if gil == obmalloc:
                return "isolated" if gil else "legacy"
            return f"{'own' if gil else 'shared'} GIL, {'own' if obmalloc else 'shared'} obmalloc"
        if obmalloc is not None:
            return "own obmalloc" if obmalloc else "shared obmalloc"
        if gil is not None:
            return "own GIL" if gil else "shared GIL"
        return "unknown"

    @property
    def label(self) -> str:
        """How the report names it: ``main (0)``, ``interp 3 (isolated, concurrent.interpreters)``."""
        if self.kind != "interpreter":
            return self.name
        if self.id == 0:
            return "main (0)"
        return f"interp {self.id} ({self.isolation}, {self.origin})"

    @property
    def name(self) -> str:
        if self.kind == "none":
            return "no interpreter"
        if self.kind == "overflow":
            return "other interpreters"
        return "main" if self.id == 0 else f"interpreter {self.id}"

    @property
    def domains(self) -> dict[str, DomainStats]:
        return {"raw": self.raw, "mem": self.mem, "object": self.object}

    @property
    def all(self) -> DomainStats:
        """The three domains added up (``peak_bytes`` is None)."""
        return _sum([self.raw, self.mem, self.object])

    @property
    def live_bytes(self) -> int:
        return self.raw.live_bytes + self.mem.live_bytes + self.object.live_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "name": self.name,
            "alive": self.alive,
            "whence": self.whence,
            "own_gil": self.own_gil,
            "own_obmalloc": self.own_obmalloc,
            "origin": self.origin,
            "isolation": self.isolation,
            "limit": self.limit,
            "refused": self.refused,
            "largest_refused": self.largest_refused,
            "total_peak": self.total_peak,
            "domains": {name: d.to_dict() for name, d in self.domains.items()},
        }


@dataclass(frozen=True)
class Snapshot:
    """Every interpreter's figures at one moment, plus totals.

    Counters are read one by one while other threads may be allocating, so a
    snapshot of a busy process is not an atomic cut; each counter is exact,
    and a snapshot of a quiet process is exact as a whole.
    """

    interpreters: tuple[InterpreterStats, ...]
    installed: bool
    untracked_frees: dict[str, int]
    missed_frees: dict[str, int]
    table: dict[str, int]
    adapters: tuple[AdapterStats, ...] = ()
    python: str = field(default_factory=lambda: sys.version.split()[0])
    #: Where the figures were read: "hooks", "heaps" (interheap-python's
    #: heaps, see :func:`interheap.install`), or None when nothing counted.
    source: str | None = None
    free_threaded: bool = field(default_factory=lambda: _FREE_THREADED)

    @property
    def totals(self) -> dict[str, DomainStats]:
        """Per domain, every interpreter and the no-interpreter bucket added up."""
        return {d: _sum([getattr(i, d) for i in self.interpreters]) for d in DOMAINS}

    @property
    def total(self) -> DomainStats:
        """All domains of all interpreters added up."""
        return _sum(list(self.totals.values()))

    def interpreter(self, interp_id: int | None) -> InterpreterStats | None:
        """The entry of interpreter ``interp_id`` (None: the no-interpreter bucket)."""
        for entry in self.interpreters:
            if interp_id is None and entry.kind == "none":
                return entry
            if entry.kind == "interpreter" and entry.id == interp_id:
                return entry
        return None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``json.dumps(snapshot.to_dict())``)."""
        totals = {d: s.to_dict() for d, s in self.totals.items()}
        totals["all"] = self.total.to_dict()
        return {
            "interheap": 1,
            "python": self.python,
            "free_threaded": self.free_threaded,
            "installed": self.installed,
            "source": self.source,
            "interpreters": [i.to_dict() for i in self.interpreters],
            "totals": totals,
            "untracked_frees": dict(self.untracked_frees),
            "missed_frees": dict(self.missed_frees),
            "table": dict(self.table),
            "adapters": [a.to_dict() for a in self.adapters],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Snapshot:
        """Rebuilds a snapshot from :meth:`to_dict` output (for reports of saved JSON)."""
        interpreters = tuple(
            InterpreterStats(
                id=i["id"],
                kind=i["kind"],
                alive=i["alive"],
                **{d: DomainStats(**i["domains"][d]) for d in DOMAINS},
                # Absent from JSON written before interheap recorded them.
                whence=i.get("whence"),
                own_gil=i.get("own_gil"),
                own_obmalloc=i.get("own_obmalloc"),
                origin=i.get("origin") or _origin_label(i.get("whence"), data["python"]),
                limit=i.get("limit"),
                refused=i.get("refused", 0),
                largest_refused=i.get("largest_refused", 0),
                total_peak=i.get("total_peak", 0),
            )
            for i in data["interpreters"]
        )
        return cls(
            interpreters=interpreters,
            installed=data["installed"],
            untracked_frees=data["untracked_frees"],
            missed_frees=data["missed_frees"],
            table=data["table"],
            adapters=tuple(AdapterStats(**a) for a in data.get("adapters", [])),
            python=data["python"],
            free_threaded=data["free_threaded"],
            source=data.get("source", "hooks" if data["installed"] else None),
        )

    def format_table(self) -> str:
        """A readable table: one block per interpreter, one row per domain."""
        from ._report import format_snapshot

        return format_snapshot(self)

    def __str__(self) -> str:
        return self.format_table()


def _ask_cpython(interp_id: int) -> dict[str, Any]:
    """Whence and config of a live interpreter from ``_interpreters``
    (``whence()`` and ``get_config()``, 3.13+); what is unknown is left out."""
    try:
        import _interpreters
    except ImportError:
        return {}
    found: dict[str, Any] = {}
    names = {getattr(_interpreters, f"WHENCE_{n.upper()}", None): n for n in _WHENCE_LABELS}
    names[getattr(_interpreters, "WHENCE_STDLIB", None)] = "stdlib"
    try:
        found["whence"] = names.get(_interpreters.whence(interp_id), "unknown")
        config = _interpreters.get_config(interp_id)
        found["own_gil"] = config.gil == "own"
        found["own_obmalloc"] = not config.use_main_obmalloc
    except Exception:  # gone meanwhile, or a version without these functions
        pass
    return found


def build_snapshot(raw: dict[str, Any], installed: bool, source: str | None = None) -> Snapshot:
    """Turns the extension's raw dict into a :class:`Snapshot`."""
    alive = _alive_interpreter_ids()
    python = sys.version.split()[0]
    entries = []
    for bucket in raw["buckets"]:
        kind, interp_id = bucket["kind"], bucket["id"]
        if kind == "interpreter":
            is_alive = None if alive is None else interp_id in alive
        else:
            is_alive = None
        domains = {d: DomainStats(**bucket["domains"][d]) for d in DOMAINS}
        # Recorded by the hooks while the interpreter lived (see the
        # extension's snapshot()). For one still alive CPython answers now,
        # which also covers one whose record is still provisional (created,
        # never used since: "capi" until its first use, see
        # interheap_cpython::interp::describe_current) or never seen.
        origin = {k: bucket.get(k) for k in ("whence", "own_gil", "own_obmalloc")}
        if kind == "interpreter" and is_alive and interp_id != 0:
            origin.update(_ask_cpython(interp_id))
        entries.append(
            InterpreterStats(
                id=interp_id,
                kind=kind,
                alive=is_alive,
                **domains,
                **origin,
                origin=_origin_label(origin["whence"], python),
                limit=bucket.get("limit"),
                refused=bucket.get("refused", 0),
                largest_refused=bucket.get("largest_refused", 0),
                total_peak=bucket.get("total_peak", 0),
            )
        )
    # Interpreters first (by ID), then the no-interpreter and overflow buckets.
    order = {"interpreter": 0, "overflow": 1, "none": 2}
    entries.sort(key=lambda e: (order[e.kind], e.id if e.id is not None else -1))
    return Snapshot(
        interpreters=tuple(entries),
        installed=installed,
        untracked_frees=raw["untracked_frees"],
        missed_frees=raw["missed_frees"],
        table=raw["table"],
        adapters=tuple(AdapterStats(**a) for a in raw.get("adapters", [])),
        source=source,
    )
