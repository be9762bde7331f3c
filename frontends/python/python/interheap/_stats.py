"""Snapshots of interheap's figures: what ``interheap.stats()`` returns.

The extension module hands over raw dicts (one per bucket); this module turns
them into small immutable objects, adds what only Python can tell (which
interpreters are still alive), and renders them as JSON or a text table.
"""

from __future__ import annotations

import sys
import sysconfig
from dataclasses import dataclass, field, fields
from typing import Any

from .adapters import AdapterStats

DOMAINS = ("raw", "mem", "object")


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


@dataclass(frozen=True)
class InterpreterStats:
    """Figures of one interpreter, or of calls made with no interpreter.

    ``kind`` is ``"interpreter"`` (``id`` is its interpreter ID), ``"none"``
    (raw calls made without a thread state: ``id`` and ``alive`` are None) or
    ``"overflow"`` (interpreters with IDs too large for a bucket of their own).
    """

    id: int | None
    kind: str
    alive: bool | None
    raw: DomainStats
    mem: DomainStats
    object: DomainStats

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
    free_threaded: bool = field(default_factory=lambda: bool(sysconfig.get_config_var("Py_GIL_DISABLED")))

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
        )

    def format_table(self) -> str:
        """A readable table: one block per interpreter, one row per domain."""
        from ._report import format_snapshot

        return format_snapshot(self)

    def __str__(self) -> str:
        return self.format_table()


def _alive_interpreter_ids() -> set[int] | None:
    """IDs of the interpreters that exist now, or None if that can't be known."""
    try:
        import _interpreters as mod  # 3.13+
    except ImportError:
        try:
            import _xxsubinterpreters as mod  # 3.12
        except ImportError:
            return None
    ids = set()
    for entry in mod.list_all():
        # 3.13: (id, whence) tuples; 3.12: InterpreterID objects.
        ids.add(int(entry[0] if isinstance(entry, tuple) else entry))
    return ids


def build_snapshot(raw: dict[str, Any], installed: bool) -> Snapshot:
    """Turns the extension's raw dict into a :class:`Snapshot`."""
    alive = _alive_interpreter_ids()
    entries = []
    for bucket in raw["buckets"]:
        kind, interp_id = bucket["kind"], bucket["id"]
        if kind == "interpreter":
            is_alive = None if alive is None else interp_id in alive
        else:
            is_alive = None
        domains = {d: DomainStats(**bucket["domains"][d]) for d in DOMAINS}
        entries.append(InterpreterStats(id=interp_id, kind=kind, alive=is_alive, **domains))
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
    )
