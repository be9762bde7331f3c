"""The live view of ``python -m interheap run --live``: a terminal screen,
refreshed every second while the program runs, of every interpreter's live
and peak bytes per domain, its limit, and its top sampled sites.

It is drawn by Rich (``rich.live.Live``, an optional dependency:
``pip install 'interheap[live]'``) from a daemon thread of the main
interpreter. The program's own output still shows: Rich prints it above the
view. The view reads the same figures as :func:`interheap.stats` and
:func:`interheap.sites_snapshot`; its own few allocations (building the
screen once a second) count in the main interpreter, like any other code.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from ._report import human_bytes

REFRESH_SECONDS = 1.0
#: Sites shown per interpreter, and interpreters shown at most.
TOP_SITES = 3
MAX_ROWS = 30


def require_rich() -> None:
    """Raises ImportError with how to get Rich if it is missing."""
    try:
        import rich.live  # noqa: F401
    except ImportError:
        raise ImportError(
            "--live draws with the 'rich' package, which is not installed: pip install 'interheap[live]'"
        ) from None


def render(started: float) -> Any:
    """One screen of the view, from the figures now."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    import interheap

    snap = interheap.stats()
    title = f"interheap live: {time.monotonic() - started:6.1f} s, Python {snap.python}" + (
        ", free-threaded" if snap.free_threaded else ""
    )
    table = Table(title=title, title_justify="left", expand=False, header_style="bold")
    for name, justify in (
        ("interpreter", "left"),
        ("state", "left"),
        ("raw", "right"),
        ("mem", "right"),
        ("object", "right"),
        ("live", "right"),
        ("peak", "right"),
        ("limit", "right"),
        ("refused", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    entries = sorted(snap.interpreters, key=lambda e: -e.live_bytes)
    for entry in entries[:MAX_ROWS]:
        state = "-" if entry.alive is None else ("alive" if entry.alive else "destroyed")
        peak = entry.total_peak or sum(d.peak_bytes or 0 for d in entry.domains.values())
        peak_text = human_bytes(peak) if entry.total_peak else "≤ " + human_bytes(peak)
        table.add_row(
            entry.label,
            state,
            *(human_bytes(d.live_bytes) for d in entry.domains.values()),
            human_bytes(entry.live_bytes),
            peak_text,
            human_bytes(entry.limit) if entry.limit is not None else "-",
            f"{entry.refused:,}",
            style="dim" if entry.alive is False else None,
        )
    if len(entries) > MAX_ROWS:
        table.caption = f"{len(entries) - MAX_ROWS} more interpreters not shown"
    parts: list[Any] = [table]
    if interheap._native.sites_rate():
        sites = interheap.sites_snapshot()
        lines = Text(f"top sites (sampled, one per {sites.rate / 1024:g} KiB)\n", style="bold")
        for interp in sites.interpreters():
            for stat in sites.statistics("lineno", interp=interp)[:TOP_SITES]:
                if stat.size <= 0:
                    continue
                name = stat.traceback[0].name if stat.traceback else ""
                who = "-" if stat.interp is None else stat.interp
                lines.append(
                    f"  {who:>4}  {human_bytes(stat.size):>10} live"
                    f"  {'+'.join(stat.domains):<10} {stat.where} ({name})\n"
                )
        parts.append(lines)
    return Group(*parts)


class LiveView:
    """The view's thread: starts with :meth:`start`, ends with :meth:`stop`."""

    def __init__(self, refresh: float = REFRESH_SECONDS) -> None:
        self.refresh = refresh
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        require_rich()
        self._thread = threading.Thread(target=self._run, name="interheap-live", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        from rich.console import Console
        from rich.live import Live

        started = time.monotonic()
        console = Console(file=sys.__stderr__)
        try:
            # The program's stdout is drawn above the view only when it is the
            # terminal too; a redirected stdout stays the program's own.
            redirect = bool(sys.stdout and sys.stdout.isatty())
            with Live(
                render(started),
                console=console,
                auto_refresh=False,
                redirect_stdout=redirect,
                redirect_stderr=True,
            ) as live:
                while not self._stop.wait(self.refresh):
                    live.update(render(started), refresh=True)
                live.update(render(started), refresh=True)
        except Exception as exc:  # the view must never take the program down
            print(f"interheap: the live view stopped: {exc!r}", file=sys.__stderr__)
