"""Text rendering of a :class:`~interheap.Snapshot` (the ``run`` report)."""

from __future__ import annotations

# Not `from typing import TYPE_CHECKING`: `run` loads this module at exit, and
# typing costs about 0.4 MiB there.
TYPE_CHECKING = False

if TYPE_CHECKING:
    from ._stats import DomainStats, Snapshot

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(n: int | None) -> str:
    """1536 -> '1.5 KiB'; negative values keep their sign; None -> '-'."""
    if n is None:
        return "-"
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    for unit in _UNITS:
        if value < 1024 or unit == _UNITS[-1]:
            if unit == "B":
                return f"{sign}{int(value)} B"
            return f"{sign}{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_count(n: int) -> str:
    return f"{n:,}"


_COLUMNS = ("interpreter", "state", "domain", "live", "peak", "live blocks", "allocs", "reallocs", "frees")


def _row(name: str, state: str, domain: str, s: DomainStats) -> list[str]:
    return [
        name,
        state,
        domain,
        human_bytes(s.live_bytes),
        human_bytes(s.peak_bytes),
        human_count(s.live_blocks),
        human_count(s.allocations),
        human_count(s.reallocations),
        human_count(s.frees),
    ]


def format_snapshot(snap: Snapshot) -> str:
    rows: list[list[str] | None] = []
    for entry in snap.interpreters:
        if entry.alive is None:
            state = "-"
        else:
            state = "alive" if entry.alive else "destroyed"
        label = entry.label
        for i, (domain, stats) in enumerate(entry.domains.items()):
            rows.append(_row(label if i == 0 else "", state if i == 0 else "", domain, stats))
        rows.append(_row("", "", "all", entry.all))
        rows.append(None)
    for i, (domain, stats) in enumerate(snap.totals.items()):
        rows.append(_row("total" if i == 0 else "", "", domain, stats))
    rows.append(_row("", "", "all", snap.total))

    widths = [len(c) for c in _COLUMNS]
    for row in rows:
        if row:
            widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=False)]

    def render(cells: list[str] | tuple[str, ...]) -> str:
        out = []
        for i, (cell, width) in enumerate(zip(cells, widths, strict=False)):
            out.append(cell.ljust(width) if i < 3 else cell.rjust(width))
        return "  ".join(out).rstrip()

    mode = "free-threaded" if snap.free_threaded else "default build"
    lines = [
        f"interheap: memory by interpreter and domain (Python {snap.python}, {mode})",
        render(_COLUMNS),
        render(["-" * w for w in widths]),
    ]
    for row in rows:
        lines.append(render(row) if row else "")
    untracked = sum(snap.untracked_frees.values())
    missed = sum(snap.missed_frees.values())
    if snap.source == "heaps":
        lines.append(
            "figures from interheap-python's heaps since the process started (bytes asked for, no hooks); "
            "calls without a thread state count as raw, their peak is the sum of the threads' peaks"
        )
    else:
        lines.append(
            f"frees of blocks allocated before the hooks: {human_count(untracked)}"
            f"   missed frees: {human_count(missed)}"
            f"   block table: {human_count(snap.table.get('entries', 0))} entries,"
            f" {human_bytes(snap.table.get('bytes', 0))}"
        )
    limited = [e for e in snap.interpreters if e.limit is not None or e.refused]
    if limited:
        lines.append("")
        lines.append("memory limits (live bytes over raw + mem + object):")
        for e in limited:
            # Exact while limited; before a limit, only the domains' peaks
            # are known, and the peak of their sum is at most their sum.
            peak = e.total_peak or sum(d.peak_bytes or 0 for d in e.domains.values())
            peak_label = "peak" if e.total_peak else "peak at most"
            limit = "none (removed)" if e.limit is None else human_bytes(e.limit)
            refused = f"refused {human_count(e.refused)}"
            if e.refused:
                refused += f" (largest {human_bytes(e.largest_refused)})"
            lines.append(
                f"  {e.label}: limit {limit}   live {human_bytes(e.live_bytes)}"
                f"   {peak_label} {human_bytes(peak)}   {refused}"
            )
    if snap.adapters:
        lines.append("")
        lines.append("adapters: id  domain  kind  mode  calls  lock acquisitions  contended")
        for a in snap.adapters:
            state = "" if a.installed else "  (uninstalled)"
            lines.append(
                f"  {a.id}  {a.domain}  {a.name}  {a.mode}  {human_count(a.calls)}"
                f"  {human_count(a.lock_acquisitions)}  {human_count(a.contended_acquisitions)}{state}"
            )
    return "\n".join(lines)
