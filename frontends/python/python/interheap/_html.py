"""The HTML report: one self-contained file that opens offline.

``python -m interheap report --html out.html FILE.json`` (or ``run --html``)
writes it from what ``run --json`` recorded. It holds:

* a summary table of every interpreter (life, live and peak bytes, limit);
* the timeline: every interpreter's live bytes stacked in one chart, then one
  chart per interpreter stacked by domain, with its life (first seen, last
  change if destroyed), its peak and the first refusal of its limit marked;
* a flame graph of the sampled stacks of the interpreter chosen in a menu,
  by live or by allocated bytes, click to zoom;
* the table of its top sites.

The charts are drawn by Chart.js (``_vendor/chart.min.js``, MIT, from
Debian's ``libjs-chart.js``), inlined with the data, the page's script
(``_html_assets/report.js``) and style, so the file has no outside
reference. Python prepares everything the page shows (the series
downsampled, the flame tree, the tables); the script only hands it to
Chart.js, lays out the flame graph and switches interpreters.
"""

from __future__ import annotations

import html
import json
from importlib import resources
from typing import Any

from ._report import human_bytes
from ._sites import SitesSnapshot, interp_label
from ._stats import Snapshot
from ._timeline import DOMAINS, Timeline, TimelinePoint

#: Most points a chart gets: longer series keep each bin's highest reading.
MAX_CHART_POINTS = 1200
#: Interpreters that get a chart of their own (the largest peaks first).
MAX_INTERPRETER_CHARTS = 16
#: Rows of each interpreter's table of sites.
TOP_SITES = 30

#: A timeline's points per interpreter, in time order.
ByInterp = dict[int | None, list[TimelinePoint]]


def _downsample(times: list[float], rows: list[list[int]], limit: int) -> tuple[list[float], list[list[int]]]:
    """At most ``limit`` readings: per time bin, the one with the highest
    sum (so peaks survive), plus the last reading."""
    if len(times) <= limit:
        return times, rows
    start, span = times[0], (times[-1] - times[0]) or 1.0
    best: dict[int, int] = {}
    for i, row in enumerate(rows):
        b = min(limit - 1, int((times[i] - start) / span * (limit - 1)))
        if b not in best or sum(row) > sum(rows[best[b]]):
            best[b] = i
    keep = sorted(set(best.values()) | {len(times) - 1})
    return [times[i] for i in keep], [rows[i] for i in keep]


def _interpreter_rows(snap: Snapshot, by_interp: ByInterp, timeline: Timeline | None) -> list[dict[str, Any]]:
    rows = []
    for entry in snap.interpreters:
        if entry.kind == "overflow":
            continue
        interp = entry.id if entry.kind == "interpreter" else None
        row: dict[str, Any] = {
            "id": interp,
            "key": _key(interp),
            "label": entry.label,
            "alive": entry.alive,
            "live": entry.live_bytes,
            "peak_domains": {d: s.peak_bytes or 0 for d, s in entry.domains.items()},
            "limit": entry.limit,
            "refused": entry.refused,
        }
        mine = by_interp.get(interp)
        if mine:
            peak = max(mine, key=lambda p: p.total)
            row.update(
                first_seen=mine[0].t,
                last_change=mine[-1].t,
                peak_t=peak.t,
                peak=peak.total,
                first_refusal=next((p.t for p in mine if p.refused), None),
                ended=timeline.ended(interp) if timeline is not None else None,
            )
        rows.append(row)
    return rows


def _key(interp: int | None) -> str:
    return "none" if interp is None else str(interp)


def _group(timeline: Timeline | None) -> ByInterp:
    """The timeline's points per interpreter, in time order (one pass)."""
    grouped: ByInterp = {}
    for p in timeline.points if timeline is not None else ():
        grouped.setdefault(p.interp, []).append(p)
    return grouped


def _timeline_data(timeline: Timeline, by_interp: ByInterp, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Series per interpreter (stacked by domain) and one grid of every
    interpreter's total (stacked by interpreter), downsampled."""
    per_interp: dict[str, Any] = {}
    for interp, mine in by_interp.items():
        values = [[p.raw, p.mem, p.object] for p in mine]
        t, values = _downsample([p.t for p in mine], values, MAX_CHART_POINTS)
        per_interp[_key(interp)] = {
            "t": [round(x, 4) for x in t],
            **{d: [v[j] for v in values] for j, d in enumerate(DOMAINS)},
        }
    # The combined chart needs one x for every series: each interpreter's
    # reading held until its next (the timeline keeps only changes). Past
    # MAX_CHART_POINTS distinct times, the x are equal bins and each
    # interpreter shows its highest reading in the bin.
    times = sorted({p.t for p in timeline.points})
    if len(times) > MAX_CHART_POINTS:
        start, width = times[0], (times[-1] - times[0]) / MAX_CHART_POINTS
        grid = [start + i * width for i in range(MAX_CHART_POINTS)]

        def bin_of(t: float) -> int:
            return min(MAX_CHART_POINTS - 1, int((t - start) / width))
    else:
        grid = times
        bin_of = {t: i for i, t in enumerate(times)}.__getitem__

    order = [r["key"] for r in sorted(rows, key=lambda r: -(r.get("peak") or 0)) if r["key"] in per_interp]
    series = []
    for key in order:
        column: list[int | None] = [None] * len(grid)
        for p in by_interp[None if key == "none" else int(key)]:
            b = bin_of(p.t)
            column[b] = p.total if column[b] is None else max(column[b] or 0, p.total)
        held, filled = 0, []
        for value in column:
            held = held if value is None else value
            filled.append(held)
        series.append([key, filled])
    return {
        "interval": timeline.interval,
        "interpreters": per_interp,
        # A list, not an object: JavaScript orders numeric keys itself.
        "combined": {"t": [round(x, 4) for x in grid], "series": series},
    }


def _flame_tree(sites: SitesSnapshot, interp: int | None) -> list[Any]:
    """The sampled stacks of one interpreter (``sites`` holds only its own)
    as a tree, outermost frame at the root's children:
    ``[name, where, live, allocated, children]``."""
    root: list[Any] = [interp_label(interp), "", 0, 0, {}]
    for site in sites.sites:
        live, allocated = site["live_bytes"], site["allocated_bytes"]
        node = root
        node[2] += live
        node[3] += allocated
        frames = list(reversed(site["stack"])) or [["(no Python frame)", "", 0]]
        for filename, name, lineno in frames:
            where = f"{filename}:{lineno}" if filename else ""
            child = node[4].get((name, where))
            if child is None:
                child = node[4][(name, where)] = [name, where, 0, 0, {}]
            child[2] += live
            child[3] += allocated
            node = child

    def pack(n: list[Any]) -> list[Any]:
        children = sorted(n[4].values(), key=lambda c: -c[3])
        return [n[0], n[1], n[2], n[3], [pack(c) for c in children]]

    return pack(root)


def _sites_table(sites: SitesSnapshot, interp: int | None) -> str:
    stats = sites.statistics("lineno", interp=interp)
    if not stats:
        return "<p>No samples.</p>"
    stats.sort(key=lambda s: (-s.size, -s.allocated))
    out = [
        "<table><thead><tr><th>live (est.)</th><th>allocated (est.)</th><th>samples</th>"
        "<th>domain</th><th>function</th><th>where</th></tr></thead><tbody>"
    ]
    for stat in stats[:TOP_SITES]:
        name = stat.traceback[0].name if stat.traceback else ""
        out.append(
            f"<tr><td class=n>{human_bytes(stat.size)}</td><td class=n>{human_bytes(stat.allocated)}</td>"
            f"<td class=n>{stat.count} / {stat.samples}</td><td>{'+'.join(stat.domains)}</td>"
            f"<td>{html.escape(name)}</td><td class=where>{html.escape(stat.where)}</td></tr>"
        )
    out.append("</tbody></table>")
    if len(stats) > TOP_SITES:
        out.append(f"<p class=note>{len(stats) - TOP_SITES} more sites not shown.</p>")
    return "".join(out)


def _summary_table(rows: list[dict[str, Any]], has_timeline: bool) -> str:
    head = ["interpreter", "state", "live at exit", "peak"]
    if has_timeline:
        head += ["first seen", "destroyed at", "last change"]
    head += ["limit", "refused"]
    out = ["<table><thead><tr>", *(f"<th>{h}</th>" for h in head), "</tr></thead><tbody>"]
    for r in rows:
        state = "-" if r["alive"] is None else ("alive" if r["alive"] else "destroyed")
        peak = r.get("peak")
        if peak is not None:
            peak_text = human_bytes(peak)
        else:  # no timeline: at most the sum of the domains' exact peaks
            peak_text = "≤ " + human_bytes(sum(r["peak_domains"].values()))
        cells = [html.escape(r["label"]), state, human_bytes(r["live"]), peak_text]
        if has_timeline:
            cells += [
                f"{r['first_seen']:.3f} s" if "first_seen" in r else "-",
                f"{r['ended']:.3f} s" if r.get("ended") is not None else "-",
                f"{r['last_change']:.3f} s" if "last_change" in r else "-",
            ]
        cells += [human_bytes(r["limit"]) if r["limit"] is not None else "-", f"{r['refused']:,}"]
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def render_html(snap: Snapshot, sites: SitesSnapshot | None, timeline: Timeline | None, title: str) -> str:
    """The report as one HTML document (str)."""
    by_interp = _group(timeline)
    rows = _interpreter_rows(snap, by_interp, timeline)
    data: dict[str, Any] = {"interpreters": rows, "timeline": None, "flame": {}}
    charted: list[str] = []
    if timeline is not None and timeline.points:
        data["timeline"] = _timeline_data(timeline, by_interp, rows)
        ranked = sorted((r for r in rows if "peak" in r), key=lambda r: -r["peak"])
        charted = [r["key"] for r in ranked[:MAX_INTERPRETER_CHARTS]]
    data["charted"] = charted
    choices: list[tuple[str, str]] = []
    tables = []
    if sites is not None:
        # One pass to split the samples by interpreter; the menu lists the
        # interpreters by bytes allocated, largest first.
        grouped: dict[int | None, list[dict[str, Any]]] = {}
        for site in sites.sites:
            grouped.setdefault(site["interp"], []).append(site)
        labels = {r["key"]: r["label"] for r in rows}
        ranked = sorted(grouped.items(), key=lambda kv: -sum(s["allocated_bytes"] for s in kv[1]))
        for interp, own in ranked:
            key, mine = _key(interp), SitesSnapshot(own, sites.rate)
            choices.append((key, labels.get(key, interp_label(interp))))
            data["flame"][key] = _flame_tree(mine, interp)
            hidden = "" if len(tables) == 0 else " hidden"
            tables.append(f'<div class=sites data-interp="{key}"{hidden}>{_sites_table(mine, interp)}</div>')
        data["rate"] = sites.rate

    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    package = resources.files("interheap")
    chart_js = package.joinpath("_vendor/chart.min.js").read_text(encoding="utf-8")
    mode = "free-threaded" if snap.free_threaded else "default build"
    if timeline is not None and timeline.points:
        timeline_html = (
            f"<p class=note>Exact live bytes, read every {timeline.interval * 1000:g} ms "
            "(a point is kept when an interpreter's figures change). "
            "Dashed lines: first seen, and destroyed (when the hooks saw its state freed); "
            "dot: peak; red line: its limit's first refusal.</p>"
            '<div class="chart wide"><canvas id=combined></canvas></div><div id=per-interp></div>'
        )
    else:
        timeline_html = "<p>No timeline was recorded (run with <code>--timeline</code>).</p>"
    if sites is not None and choices:
        options = "".join(f'<option value="{k}">{html.escape(label)}</option>' for k, label in choices)
        sites_html = (
            f"<p class=note>Sampled: one allocation per {sites.rate / 1024:g} KiB on average; "
            "estimates are the samples scaled by their chance of being sampled.</p>"
            f"<label>Interpreter <select id=interp>{options}</select></label> "
            '<label>Bytes <select id=metric><option value="2">live at exit</option>'
            '<option value="3" selected>allocated</option></select></label> '
            "<button id=unzoom>Reset zoom</button>"
            '<div id=flame-box class="chart wide"><canvas id=flame></canvas></div>'
            "<h3>Top sites</h3>" + "".join(tables)
        )
    else:
        sites_html = "<p>No allocation sites were sampled (run with <code>--sites</code>).</p>"

    return _TEMPLATE.format(
        title=html.escape(title),
        python=html.escape(snap.python),
        mode=mode,
        summary=_summary_table(rows, data["timeline"] is not None),
        timeline=timeline_html,
        sites=sites_html,
        chart_js=chart_js,
        payload=payload,
        css=package.joinpath("_html_assets/report.css").read_text(encoding="utf-8"),
        script=package.joinpath("_html_assets/report.js").read_text(encoding="utf-8"),
    )


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>interheap: {title}</title>
<style>
{css}</style></head>
<body>
<h1>interheap: {title}</h1>
<p class=meta>Python {python}, {mode}</p>
<h2>Interpreters</h2>
{summary}
<h2>Timeline</h2>
{timeline}
<h2>Allocation sites</h2>
{sites}
<script>{chart_js}</script>
<script type="application/json" id="interheap-data">{payload}</script>
<script>{script}</script>
</body></html>
"""
