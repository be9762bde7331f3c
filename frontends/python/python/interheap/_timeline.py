"""Each interpreter's exact live bytes over time, per domain.

A background thread (native, holding no GIL) reads the hooks' counters every
``interval`` seconds and keeps a point whenever an interpreter's figures
changed, so a quiet interpreter costs nothing. A point also shows when an
interpreter first appeared and how many requests its limit had refused;
``ended(interp)`` is when the hooks saw the interpreter's state freed, the
last step of destroying it.

    interheap.install()
    interheap.start_timeline(0.01)
    ...
    tl = interheap.timeline()
    tl.peak(3)          # (seconds since start, total live bytes) of interpreter 3's peak
    tl.series(3)        # {"t": [...], "raw": [...], "mem": [...], "object": [...], "refused": [...]}
    tl.ended(3)         # seconds since start when interpreter 3 was destroyed (None: not seen)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import _native
from ._sites import interp_label

DOMAINS = ("raw", "mem", "object")


@dataclass(frozen=True)
class TimelinePoint:
    """One reading: ``t`` in seconds since the timeline started; ``interp`` is
    an interpreter ID (None: calls without a thread state)."""

    t: float
    interp: int | None
    raw: int
    mem: int
    object: int
    refused: int

    @property
    def total(self) -> int:
        return self.raw + self.mem + self.object


class Timeline:
    """The points of a timeline (see :func:`timeline`)."""

    def __init__(
        self, points: list[TimelinePoint], interval: float, ends: dict[int, float] | None = None
    ) -> None:
        self.points = points
        self.interval = interval
        #: Interpreter ID -> seconds since start when it was destroyed.
        self.ends = dict(ends or {})

    def ended(self, interp: int | None) -> float | None:
        """When ``interp`` was destroyed (seconds since start; None: not while recorded)."""
        return None if interp is None else self.ends.get(interp)

    def interpreters(self) -> list[int | None]:
        """The interpreters with points, in the order they first appeared."""
        seen: dict[int | None, None] = {}
        for p in self.points:
            seen.setdefault(p.interp)
        return list(seen)

    def series(self, interp: int | None) -> dict[str, list[Any]]:
        """One interpreter's readings as columns: ``t``, ``raw``, ``mem``,
        ``object``, ``total``, ``refused``."""
        mine = [p for p in self.points if p.interp == interp]
        return {
            "t": [p.t for p in mine],
            "raw": [p.raw for p in mine],
            "mem": [p.mem for p in mine],
            "object": [p.object for p in mine],
            "total": [p.total for p in mine],
            "refused": [p.refused for p in mine],
        }

    def peak(self, interp: int | None) -> tuple[float, int] | None:
        """(t, total live bytes) at the highest total seen for ``interp``."""
        mine = [p for p in self.points if p.interp == interp]
        if not mine:
            return None
        best = max(mine, key=lambda p: p.total)
        return best.t, best.total

    def first_refusal(self, interp: int | None) -> float | None:
        """When ``interp``'s limit first refused a request (None: never, while recorded)."""
        return next((p.t for p in self.points if p.interp == interp and p.refused), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "interval": self.interval,
            "points": [[p.t, p.interp, p.raw, p.mem, p.object, p.refused] for p in self.points],
            "ends": {str(k): v for k, v in self.ends.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Timeline:
        points = [TimelinePoint(*row) for row in data["points"]]
        ends = {int(k): float(v) for k, v in data.get("ends", {}).items()}
        return cls(points, float(data["interval"]), ends)

    def format_summary(self) -> str:
        """One line per interpreter: when it appeared, its peak and when, where it ended."""
        lines = [f"timeline ({len(self.points)} points, every {self.interval * 1000:g} ms)"]
        for interp in self.interpreters():
            s = self.series(interp)
            peak = self.peak(interp)
            assert peak is not None
            refusal = self.first_refusal(interp)
            limit = f", limit first hit at {refusal:.3f} s" if refusal is not None else ""
            end = self.ended(interp)
            limit += f", destroyed at {end:.3f} s" if end is not None else ""
            lines.append(
                f"  {interp_label(interp):<16} from {s['t'][0]:8.3f} s  "
                f"peak {peak[1] / 2**20:8.1f} MiB at {peak[0]:8.3f} s  "
                f"last {s['total'][-1] / 2**20:8.1f} MiB at {s['t'][-1]:8.3f} s{limit}"
            )
        return "\n".join(lines)


_interval = 0.01


def start_timeline(interval: float = 0.01) -> None:
    """Starts recording every interpreter's live bytes every ``interval``
    seconds (replacing a running timeline). Needs interheap counting
    (:func:`interheap.install`)."""
    if _native.figures_source() is None:
        raise RuntimeError(
            "the timeline reads interheap's figures: call interheap.install() first "
            "(or run the program with python -m interheap run --timeline)"
        )
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not interval > 0:
        raise ValueError(f"the interval must be a positive number of seconds, not {interval!r}")
    global _interval
    _interval = float(interval)
    _native.timeline_start(float(interval))


def stop_timeline() -> None:
    """Stops recording; the points stay readable."""
    _native.timeline_stop()


def timeline() -> Timeline:
    """The timeline recorded so far."""
    points = [
        TimelinePoint(nanos / 1e9, None if interp < 0 else interp, raw, mem, obj, refused)
        for nanos, interp, raw, mem, obj, refused in _native.timeline_points()
    ]
    ends = {interp: nanos / 1e9 for interp, nanos in _native.timeline_ends()}
    return Timeline(points, _interval, ends)
