"""The checker: memory bugs that subinterpreters and free-threading create,
reported instead of crashing.

    interheap.install(check=True)    # the checking hooks (or: python -m interheap check)
    ...
    report = interheap.check_report()
    for finding in report.findings:
        print(finding)

What it finds, and what it does with each (the hooks decide inside the
allocator call, before forwarding; see ``cpython/src/checker.rs``):

* ``cross-interpreter free`` / ``cross-interpreter realloc``: a mem or object
  block allocated under one obmalloc state and freed (or reallocated) under
  another. Quarantined on default builds: never freed into the wrong state.
* ``domain mismatch``: freed or reallocated through another domain than the
  one that allocated it; sent to its own domain's allocator.
* ``no thread state``: a mem or object call with no attached thread state
  (the GIL not held; on free-threaded builds, no attached thread state).
* ``double free``: a free of an address already freed and not allocated
  since; not freed again.
* ``foreign pointer``: a free of an address inside a loaded program or
  library, or inside the thread's stack; not freed.
* ``use after free`` and ``buffer overrun`` (``INTERHEAP_CHECK=1
  interheap-python``, which runs ``check --memory-errors``): a mem or object
  block written after its free (it is poisoned and kept out of use for a
  while) or past its end (a guard after it, checked on free).
* ``leak at interpreter end``: blocks an interpreter still holds when it is
  destroyed, per sampled allocation site (``check --sites RATE``; ``--sites
  1`` samples every allocation), else per domain with no stack.

A finding never stops the program. Findings are grouped by kind and call
site; at most 2,000 per second get their Python stack taken, the rest are
counted (``undetailed``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import _native

KINDS = (
    "cross-interpreter free",
    "cross-interpreter realloc",
    "domain mismatch",
    "no thread state",
    "double free",
    "foreign pointer",
    "leak at interpreter end",
    "use after free",
    "buffer overrun",
)


def _interp(interp: int | None) -> str:
    return "no interpreter" if interp is None else f"interp {interp}"


@dataclass(frozen=True)
class Finding:
    """One group of findings: a kind at one call site (its first finding's
    details, and how many there were)."""

    kind: str
    domain: str
    allocated_in: str | None
    owner: int | None
    caller: int | None
    size: int
    stack: tuple[tuple[str, str, int], ...]
    note: str
    count: int
    bytes: int
    pairs: tuple[tuple[int | None, int | None], ...] = field(default=())
    #: Where the block was allocated, when it was a sampled block (``check
    #: --sites RATE``; ``--sites 1`` samples every block); else empty.
    allocated_at: tuple[tuple[str, str, int], ...] = field(default=())

    @property
    def where(self) -> str:
        """The bad call's innermost Python frame, ``file:line``."""
        if not self.stack:
            return "(no Python frame)"
        file, _, line = self.stack[0]
        return f"{file}:{line}"

    @property
    def interpreters(self) -> str:
        """Who was involved: ``interp 1 -> interp 2`` (owner -> caller)."""
        if self.owner is None or self.owner == self.caller:
            return _interp(self.caller)
        return f"{_interp(self.owner)} -> {_interp(self.caller)}"

    def __str__(self) -> str:
        mixed = self.allocated_in not in (None, self.domain)
        domains = f"{self.allocated_in} -> {self.domain}" if mixed else self.domain
        times = f" ({self.count} times)" if self.count > 1 else ""
        size = f" of {self.size} B" if self.size else ""
        leak = self.kind == "leak at interpreter end"
        what = f"{domains} blocks, {self.size} B" if leak else f"{domains} block{size}"
        lines = [f"{self.kind}: {what}, {self.interpreters}{times}", f"  {self.note}"]
        for file, name, line in self.stack[:8]:
            lines.append(f'    File "{file}", line {line}, in {name}')
        if len(self.stack) > 8:
            lines.append(f"    ... {len(self.stack) - 8} more frames")
        if self.allocated_at:
            lines.append("  allocated at:")
            for file, name, line in self.allocated_at[:8]:
                lines.append(f'    File "{file}", line {line}, in {name}')
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "domain": self.domain,
            "allocated_in": self.allocated_in,
            "owner": self.owner,
            "caller": self.caller,
            "size": self.size,
            "stack": [list(f) for f in self.stack],
            "note": self.note,
            "count": self.count,
            "bytes": self.bytes,
            "pairs": [list(p) for p in self.pairs],
            "allocated_at": [list(f) for f in self.allocated_at],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Finding:
        return cls(
            kind=d["kind"],
            domain=d["domain"],
            allocated_in=d["allocated_in"],
            owner=d["owner"],
            caller=d["caller"],
            size=d["size"],
            stack=tuple(tuple(f) for f in d["stack"]),  # type: ignore[misc]
            note=d["note"],
            count=d["count"],
            bytes=d["bytes"],
            pairs=tuple(tuple(p) for p in d.get("pairs", ())),  # type: ignore[misc]
            allocated_at=tuple(tuple(f) for f in d.get("allocated_at", ())),  # type: ignore[misc]
        )


@dataclass(frozen=True)
class CheckReport:
    """Every finding so far, with totals."""

    findings: tuple[Finding, ...]
    per_kind: dict[str, int]
    undetailed: int
    quarantined_blocks: int
    quarantined_bytes: int

    @property
    def total(self) -> int:
        return sum(self.per_kind.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "findings": [f.to_dict() for f in self.findings],
            "per_kind": dict(self.per_kind),
            "undetailed": self.undetailed,
            "quarantined_blocks": self.quarantined_blocks,
            "quarantined_bytes": self.quarantined_bytes,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckReport:
        return cls(
            findings=tuple(Finding.from_dict(f) for f in d["findings"]),
            per_kind=dict(d["per_kind"]),
            undetailed=d["undetailed"],
            quarantined_blocks=d["quarantined_blocks"],
            quarantined_bytes=d["quarantined_bytes"],
        )

    def format(self) -> str:
        """The findings as text, one block per call site."""
        if not self.total:
            return "interheap check: no findings"
        kinds = ", ".join(f"{n} {k}" for k, n in self.per_kind.items() if n)
        lines = [f"interheap check: {self.total} findings at {len(self.findings)} call sites ({kinds})"]
        for finding in self.findings:
            lines.append("")
            lines.append(str(finding))
        if self.quarantined_blocks:
            lines.append("")
            lines.append(
                f"quarantined (kept out of the allocator): {self.quarantined_blocks} blocks, "
                f"{self.quarantined_bytes} B"
            )
        if self.undetailed:
            lines.append(f"{self.undetailed} more findings were counted without a stack (rate limit)")
        return "\n".join(lines)


def check_report() -> CheckReport:
    """The checker's findings so far (empty unless ``install(check=True)``)."""
    totals = _native.check_totals()
    findings = tuple(Finding.from_dict(g) for g in _native.check_findings())
    return CheckReport(
        findings=findings,
        per_kind=dict(totals["per_kind"]),
        undetailed=totals["undetailed"],
        quarantined_blocks=totals["quarantined_blocks"],
        quarantined_bytes=totals["quarantined_bytes"],
    )


def check_enabled() -> bool:
    """Whether the checking hooks are installed."""
    return bool(_native.check_enabled())
