"""Sampled allocation sites per interpreter: which code holds the bytes.

While sampling is on, the hooks sample allocations by bytes (one per
``rate`` bytes on average, at random: every byte has the same chance), and
keep each sampled block's Python stack until the block is freed. Estimates
are the samples scaled by their chance of being sampled, so they are
unbiased: live bytes and allocated bytes per site, per interpreter and per
domain. The stack is read from the interpreter's frames inside the
allocator call, without running Python code (see ``interheap_interp.stack``).

    import interheap
    interheap.install()
    interheap.start_sites()                  # 512 KiB on average between samples
    ...
    snap = interheap.sites_snapshot()
    for stat in snap.statistics("lineno")[:10]:
        print(stat)                          # interp 3 object  app.py:42  12.4 MiB in 25 samples

The API follows tracemalloc's ``Snapshot.statistics``, with each statistic
split by interpreter: ``statistics("lineno" | "filename" | "traceback",
interp=None, domain=None)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import _native
from ._limits import parse_size

DEFAULT_RATE = 512 * 1024
KEY_TYPES = ("lineno", "filename", "traceback")
_last_rate = DEFAULT_RATE


@dataclass(frozen=True)
class Frame:
    """One frame of a sampled stack."""

    filename: str
    name: str
    lineno: int

    def __str__(self) -> str:
        return f"{self.filename}:{self.lineno}"


@dataclass(frozen=True)
class SiteStatistic:
    """What the samples of one site (or one group of sites) add up to.

    ``size`` and ``allocated`` are estimates in bytes: still live, and
    allocated since sampling started. ``count`` is the number of live
    samples, ``samples`` of all samples taken.
    """

    interp: int | None
    traceback: tuple[Frame, ...]
    domains: tuple[str, ...]
    size: int
    allocated: int
    count: int
    samples: int

    @property
    def where(self) -> str:
        """The innermost frame as ``file:line``."""
        return str(self.traceback[0]) if self.traceback else "(no Python frame)"

    def __str__(self) -> str:
        return (
            f"{interp_label(self.interp)} {'+'.join(self.domains)}  {self.where}  "
            f"{self.size / 2**20:.1f} MiB live "
            f"({self.allocated / 2**20:.1f} MiB allocated) in {self.count} of {self.samples} samples"
        )


def interp_label(interp: int | None) -> str:
    """How reports name a bucket: ``interp 3``, or ``no thread state``."""
    return "no thread state" if interp is None else f"interp {interp}"


def _frames(stack: list[Any]) -> tuple[Frame, ...]:
    return tuple(Frame(file, name, line) for file, name, line in stack)


class SitesSnapshot:
    """The sampled sites at one moment (see :func:`sites_snapshot`)."""

    def __init__(self, sites: list[dict[str, Any]], rate: int) -> None:
        self.sites = sites
        self.rate = rate

    def interpreters(self) -> list[int | None]:
        """The interpreters with samples (None: calls without a thread state)."""
        return sorted({s["interp"] for s in self.sites}, key=lambda i: (i is None, i or 0))

    def statistics(
        self, key_type: str = "lineno", *, interp: int | str | None = "all", domain: str | None = None
    ) -> list[SiteStatistic]:
        """Sites grouped by ``key_type`` within each interpreter, largest live
        estimate first: ``"lineno"`` (the innermost frame's file and line),
        ``"filename"`` (its file) or ``"traceback"`` (the whole stack).
        ``interp`` keeps one interpreter's (an ID, or None for calls without a
        thread state); ``domain`` keeps one domain's ("raw", "mem", "object")."""
        if key_type not in KEY_TYPES:
            raise ValueError(f"unknown key_type {key_type!r}: expected one of {', '.join(KEY_TYPES)}")
        if domain is not None and domain not in ("raw", "mem", "object"):
            raise ValueError(f"unknown domain {domain!r}: expected 'raw', 'mem' or 'object'")
        groups: dict[tuple[Any, ...], dict[str, Any]] = {}
        for site in self.sites:
            if interp != "all" and site["interp"] != interp:
                continue
            if domain is not None and site["domain"] != domain:
                continue
            frames = _frames(site["stack"])
            if key_type == "traceback":
                shown = frames
            elif not frames:
                shown = ()
            elif key_type == "lineno":
                shown = (frames[0],)
            else:
                shown = (Frame(frames[0].filename, "", 0),)
            group = groups.setdefault(
                (site["interp"], shown),
                {"domains": set(), "size": 0, "allocated": 0, "count": 0, "samples": 0},
            )
            group["domains"].add(site["domain"])
            group["size"] += site["live_bytes"]
            group["allocated"] += site["allocated_bytes"]
            group["count"] += site["live_samples"]
            group["samples"] += site["samples"]
        stats = [
            SiteStatistic(
                interp=key[0],
                traceback=key[1],
                domains=tuple(d for d in ("raw", "mem", "object") if d in g["domains"]),
                size=g["size"],
                allocated=g["allocated"],
                count=g["count"],
                samples=g["samples"],
            )
            for key, g in groups.items()
        ]
        stats.sort(key=lambda s: (-s.size, -s.allocated))
        return stats

    def to_dict(self) -> dict[str, Any]:
        return {"rate": self.rate, "sites": self.sites}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SitesSnapshot:
        return cls(list(data["sites"]), int(data["rate"]))

    def format_table(self, top: int = 5) -> str:
        """The top sites (by live estimate) of each interpreter, as text."""
        lines = [f"allocation sites (sampled: one per {self.rate / 1024:.0f} KiB on average)"]
        for interp in self.interpreters():
            lines.append(f"  {interp_label(interp)}:")
            for stat in self.statistics("lineno", interp=interp)[:top]:
                name = stat.traceback[0].name if stat.traceback else ""
                lines.append(
                    f"    {stat.size / 2**20:8.1f} MiB live {stat.allocated / 2**20:8.1f} MiB allocated  "
                    f"{'+'.join(stat.domains):<10} {stat.where} ({name})"
                )
        return "\n".join(lines)


def start_sites(rate: int | str = DEFAULT_RATE, *, seed: int | None = None) -> None:
    """Starts sampling allocation sites: one allocation per ``rate`` bytes on
    average (an int, or text such as "512 KiB"). ``seed`` makes the samples
    repeatable. Needs the hooks (:func:`interheap.install`)."""
    if _native.figures_source() == "heaps":
        raise RuntimeError(
            "allocation sites are sampled by interheap's hooks, and interheap reads the allocator's "
            "heaps instead: install with interheap.install(figures='hooks') "
            "(python -m interheap run --sites does)"
        )
    if not _native.is_installed():
        raise RuntimeError(
            "allocation sites are sampled by interheap's hooks: call interheap.install() first "
            "(or run the program with python -m interheap run --sites)"
        )
    size = parse_size(rate) if isinstance(rate, str) else rate
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"the sampling rate must be a positive number of bytes, not {rate!r}")
    if seed is not None and (not isinstance(seed, int) or seed <= 0):
        raise ValueError(f"seed must be a positive int, not {seed!r}")
    global _last_rate
    _last_rate = size
    _native.sites_start(size, seed)


def stop_sites() -> None:
    """Stops sampling; what was sampled stays in :func:`sites_snapshot`."""
    _native.sites_start(0, None)


def reset_sites() -> None:
    """Forgets every sample."""
    _native.sites_reset()


def sites_snapshot() -> SitesSnapshot:
    """The sampled sites now."""
    return SitesSnapshot(_native.sites_snapshot(), _native.sites_rate() or _last_rate)
