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
from ._timeline import DOMAINS, Timeline

#: Most points a chart gets: longer series keep each bin's highest reading.
MAX_CHART_POINTS = 1200
#: Interpreters that get a chart of their own (the largest peaks first).
MAX_INTERPRETER_CHARTS = 16
#: Rows of each interpreter's table of sites.
TOP_SITES = 30


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


def _interpreter_rows(snap: Snapshot, timeline: Timeline | None) -> list[dict[str, Any]]:
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
        if timeline is not None:
            series = timeline.series(interp)
            if series["t"]:
                peak = timeline.peak(interp)
                assert peak is not None
                row.update(
                    first_seen=series["t"][0],
                    last_change=series["t"][-1],
                    peak_t=peak[0],
                    peak=peak[1],
                    first_refusal=timeline.first_refusal(interp),
                )
        rows.append(row)
    return rows


def _key(interp: int | None) -> str:
    return "none" if interp is None else str(interp)


def _timeline_data(timeline: Timeline, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Series per interpreter (stacked by domain) and one grid of every
    interpreter's total (stacked by interpreter), downsampled."""
    per_interp: dict[str, Any] = {}
    for interp in timeline.interpreters():
        s = timeline.series(interp)
        rows_of = [[s[d][i] for d in DOMAINS] for i in range(len(s["t"]))]
        t, values = _downsample(s["t"], rows_of, MAX_CHART_POINTS)
        per_interp[_key(interp)] = {
            "t": [round(x, 4) for x in t],
            **{d: [v[j] for v in values] for j, d in enumerate(DOMAINS)},
        }
    # The combined chart needs one x for every series: each interpreter's
    # last reading held until its next (the timeline keeps only changes).
    grid = sorted({p.t for p in timeline.points})
    order = [r["key"] for r in sorted(rows, key=lambda r: -(r.get("peak") or 0)) if r["key"] in per_interp]
    totals: dict[str, list[int]] = {}
    for key in order:
        interp = None if key == "none" else int(key)
        mine = [(p.t, p.total) for p in timeline.points if p.interp == interp]
        column, i, current = [], 0, 0
        for t in grid:
            while i < len(mine) and mine[i][0] <= t:
                current = mine[i][1]
                i += 1
            column.append(current)
        totals[key] = column
    grid_rows = [[totals[k][i] for k in order] for i in range(len(grid))]
    grid_t, grid_rows = _downsample(grid, grid_rows, MAX_CHART_POINTS)
    return {
        "interval": timeline.interval,
        "interpreters": per_interp,
        "combined": {
            "t": [round(x, 4) for x in grid_t],
            # A list, not an object: JavaScript orders numeric keys itself.
            "series": [[k, [r[j] for r in grid_rows]] for j, k in enumerate(order)],
        },
    }


def _flame_tree(sites: SitesSnapshot, interp: int | None) -> dict[str, Any]:
    """The sampled stacks of one interpreter as a tree, outermost frame at
    the root's children: ``[name, where, live, allocated, children]``."""
    root: list[Any] = [interp_label(interp), "", 0, 0, {}]
    for site in sites.sites:
        if site["interp"] != interp:
            continue
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
        head += ["first seen", "last change"]
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
                f"{r['last_change']:.3f} s" if "last_change" in r else "-",
            ]
        cells += [human_bytes(r["limit"]) if r["limit"] is not None else "-", f"{r['refused']:,}"]
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def render_html(snap: Snapshot, sites: SitesSnapshot | None, timeline: Timeline | None, title: str) -> str:
    """The report as one HTML document (str)."""
    rows = _interpreter_rows(snap, timeline)
    data: dict[str, Any] = {"interpreters": rows, "timeline": None, "flame": {}}
    charted: list[str] = []
    if timeline is not None and timeline.points:
        data["timeline"] = _timeline_data(timeline, rows)
        ranked = sorted((r for r in rows if "peak" in r), key=lambda r: -r["peak"])
        charted = [r["key"] for r in ranked[:MAX_INTERPRETER_CHARTS]]
    data["charted"] = charted
    choices: list[tuple[str, str]] = []
    tables = []
    if sites is not None:
        ranked_interps = sorted(
            sites.interpreters(),
            key=lambda i: -sum(s["allocated_bytes"] for s in sites.sites if s["interp"] == i),
        )
        for interp in ranked_interps:
            key = _key(interp)
            label = next((r["label"] for r in rows if r["key"] == key), interp_label(interp))
            choices.append((key, label))
            data["flame"][key] = _flame_tree(sites, interp)
            hidden = "" if len(tables) == 0 else " hidden"
            tables.append(f'<div class=sites data-interp="{key}"{hidden}>{_sites_table(sites, interp)}</div>')
        data["rate"] = sites.rate

    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    package = resources.files("interheap")
    chart_js = package.joinpath("_vendor/chart.min.js").read_text(encoding="utf-8")
    mode = "free-threaded" if snap.free_threaded else "default build"
    if timeline is not None and timeline.points:
        timeline_html = (
            f"<p class=note>Exact live bytes, read every {timeline.interval * 1000:g} ms "
            "(a point is kept when an interpreter's figures change). "
            "Dashed lines: first seen and last change of a destroyed interpreter; "
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
