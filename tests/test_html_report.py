"""The HTML report (``report --html``, ``run --html``) opened in a real
browser: Debian's chromium (installed by scripts/setup.sh) loads the file
from disk with the network off, and a probe script injected into a copy of
the page reports what Chart.js drew: every chart, how many elements, how
many pixels of each canvas are painted, and any error or console.error. The
untouched page is screenshotted (out/html-report-<tag>.png)."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest
from conftest import ROOT, run_python

CHROMIUM = shutil.which("chromium")
FT = "t" if sysconfig.get_config_var("Py_GIL_DISABLED") else ""
TAG = f"{sys.version_info[0]}.{sys.version_info[1]}{FT}"

# Two isolated interpreters in parallel threads, each filling at its own
# function, one of them against its limit; main holds some too.
WORKLOAD = r"""
import threading
from scenario_support import create, run, destroy

FILL = '''
import time
def fill_{name}():
    return [bytearray(1000) for _ in range({count})]
keep = fill_{name}()
try:
    more = [bytearray(100_000) for _ in range({extra})]
except MemoryError:
    refused = True
time.sleep(0.15)
'''
grow, limited = create("isolated"), create("isolated")
import interheap
interheap.set_limit(limited, "20 MB")
threads = [
    threading.Thread(target=run, args=(grow, FILL.format(name="grow", count=30_000, extra=0))),
    threading.Thread(target=run, args=(limited, FILL.format(name="limited", count=8_000, extra=400))),
]
[t.start() for t in threads]
[t.join() for t in threads]
main_keep = [bytearray(1000) for _ in range(5_000)]
destroy(grow)
destroy(limited)
"""

# Injected first in <head>: records errors from the start; after load, writes
# what every chart drew into <pre id=probe>, then switches the flame graph to
# the second interpreter and records what it shows.
PROBE = r"""<script>
window.__errors = [];
addEventListener("error", e => __errors.push("error: " + e.message));
addEventListener("unhandledrejection", e => __errors.push("rejection: " + e.reason));
const __consoleError = console.error;
console.error = (...a) => { __errors.push("console.error: " + a.join(" ")); __consoleError(...a); };
function __ink(canvas) {
  const d = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let n = 0;
  for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
  return n;
}
function __charts() {
  return Object.values(Chart.instances).map(c => ({
    id: c.canvas.id, interp: c.canvas.dataset.interp || null, type: c.config.type,
    datasets: c.data.datasets.map(d => d.label || ""),
    elements: c.data.datasets.reduce((n, d, i) => n + c.getDatasetMeta(i).data.length, 0),
    ink: __ink(c.canvas), pixels: c.canvas.width * c.canvas.height,
  }));
}
addEventListener("load", () => setTimeout(() => {
  const out = { first: __charts() };
  const flame = () => Chart.getChart("flame");
  out.firstRoot = flame() ? flame().data.datasets[0].data[0].node[0] : null;
  const select = document.getElementById("interp");
  if (select && select.options.length > 1) {
    select.value = select.options[1].value;
    select.dispatchEvent(new Event("change"));
    out.switched = { value: select.value, root: flame().data.datasets[0].data[0].node[0],
                     names: flame().data.datasets[0].data.map(b => b.node[0]), ink: __ink(flame().canvas),
                     visibleTables: [...document.querySelectorAll("div.sites")].filter(d => !d.hidden)
                                      .map(d => d.dataset.interp) };
  }
  out.errors = __errors;
  const pre = document.createElement("pre"); pre.id = "probe"; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
}, 50));
</script>"""


def chromium(*args: str) -> subprocess.CompletedProcess:
    # --no-sandbox: the tests may run as root, which chromium's sandbox refuses.
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--virtual-time-budget=10000", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A real run with --sites, --timeline and a limit, its JSON and HTML."""
    tmp = tmp_path_factory.mktemp("html")
    script = tmp / "workload.py"
    script.write_text(WORKLOAD)
    json_path, html_path = tmp / "run.json", tmp / "run.html"
    proc = run_python(
        ["-m", "interheap", "run", "--no-report", "--sites", "64KiB", "--timeline", "5",
         "--json", str(json_path), "--html", str(html_path), str(script)],
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(json_path.read_text()), html_path, tmp


def page_data(text: str) -> dict:
    found = re.search(r'<script type="application/json" id="interheap-data">(.*?)</script>', text, re.S)
    assert found, "the page carries its data"
    return json.loads(found.group(1))


def test_the_page_is_self_contained_and_small(report):
    _, html_path, _ = report
    text = html_path.read_text()
    # No outside reference: no src/href to anything, no URL but the library's banner.
    assert not re.search(r"""<(script|link|img)[^>]+(src|href)=""", text)
    assert "Chart.js v3.9.1" in text
    assert len(text) < 600_000, len(text)
    data = page_data(text)
    grow, limited = (r for r in data["interpreters"] if r["id"] not in (0, None))
    assert grow["alive"] is False and limited["alive"] is False
    # Each one's end, as the hooks saw its state freed, marks its life.
    assert grow["ended"] is not None and limited["ended"] is not None
    assert grow["first_seen"] < grow["ended"] and limited["first_seen"] < limited["ended"]
    # The limit's first refusal and each one's life are in the data the charts mark.
    assert limited["first_refusal"] is not None and grow.get("first_refusal") is None
    assert limited["first_seen"] <= limited["first_refusal"] <= limited["last_change"]
    assert grow["peak"] > 30 * 1000 * 1000 > limited["peak"]
    # Flame trees for both, each with its own fill function and not the other's.
    for row, mine, other in ((grow, "fill_grow", "fill_limited"), (limited, "fill_limited", "fill_grow")):
        names = json.dumps(data["flame"][str(row["id"])])
        assert f'"{mine}"' in names and f'"{other}"' not in names
    assert "fill_grow" in text and "<table>" in text


def test_report_html_from_the_json_matches_run_html(report):
    _, html_path, tmp = report
    again = tmp / "again.html"
    proc = run_python(["-m", "interheap", "report", "--html", str(again), str(tmp / "run.json")])
    assert proc.returncode == 0, proc.stderr
    assert page_data(again.read_text()) == page_data(html_path.read_text())


def test_bad_report_arguments_are_refused_and_write_nothing(report, tmp_path):
    _, _, tmp = report
    cases = [
        (["--html"], "--html needs"),
        (["--html", str(tmp_path / "no" / "such" / "dir.html"), str(tmp / "run.json")], "does not exist"),
        (["--html", str(tmp_path / "x.html")], "exactly one FILE.json"),
        (["--bogus", str(tmp / "run.json")], "unknown option"),
    ]
    for args, message in cases:
        proc = run_python(["-m", "interheap", "report", *args])
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
    not_json = tmp_path / "not.json"
    not_json.write_text("{")
    proc = run_python(["-m", "interheap", "report", "--html", str(tmp_path / "x.html"), str(not_json)])
    assert proc.returncode == 2 and "cannot read" in proc.stderr
    assert not (tmp_path / "x.html").exists()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is installed by scripts/setup.sh")
def test_chromium_draws_the_timeline_and_flame_graph_without_errors(report):
    document, html_path, tmp = report
    ids = [i["id"] for i in document["interpreters"] if i["id"] not in (0, None)]
    probed = tmp / "probed.html"
    probed.write_text(html_path.read_text().replace("<head>", "<head>" + PROBE, 1))
    proc = chromium("--dump-dom", probed.as_uri())
    found = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"the probe did not run\n{proc.stderr[-3000:]}"
    out = json.loads(html.unescape(found.group(1)))
    assert out["errors"] == [], out["errors"]
    charts = {(c["id"] or c["interp"]): c for c in out["first"]}
    # The combined timeline: one stacked series per interpreter, painted.
    combined = charts["combined"]
    assert combined["type"] == "line" and len(combined["datasets"]) >= 3
    assert combined["ink"] > 0.05 * combined["pixels"], combined
    # One chart per interpreter, stacked by domain, painted.
    for interp in ids:
        chart = charts[str(interp)]
        assert chart["datasets"] == ["raw", "mem", "object"] and chart["ink"] > 0.05 * chart["pixels"], chart
    # The flame graph: bars drawn for the first interpreter in the menu.
    flame = charts["flame"]
    assert flame["type"] == "bar" and flame["elements"] >= 3 and flame["ink"] > 0.02 * flame["pixels"], flame
    # Switching interpreters redraws it with the other's stacks and table.
    switched = out["switched"]
    assert switched["root"] == f"interp {switched['value']}" and switched["ink"] > 0
    assert switched["visibleTables"] == [switched["value"]]
    fill = "fill_grow" if int(switched["value"]) == ids[0] else "fill_limited"
    assert fill in switched["names"], switched["names"]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is installed by scripts/setup.sh")
def test_chromium_screenshot(report):
    _, html_path, _ = report
    out_dir = ROOT / "out"
    out_dir.mkdir(exist_ok=True)
    shot = out_dir / f"html-report-{TAG}.png"
    shot.unlink(missing_ok=True)
    proc = chromium("--window-size=1280,1600", f"--screenshot={shot}", html_path.as_uri())
    assert shot.exists(), proc.stderr[-3000:]
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (1280, 1600)
    # A blank page of that size compresses to a few KB; charts and text do not.
    assert len(png) > 60_000, len(png)


def test_long_timelines_are_cut_to_size_and_keep_their_peaks():
    from interheap._html import MAX_CHART_POINTS, _group, _timeline_data
    from interheap._timeline import Timeline, TimelinePoint

    points = []
    for k in range(10_000):
        # Interpreter 1 spikes once, for one reading; interpreter 2 ramps.
        points.append(TimelinePoint(k * 0.001, 1, 0, 0, 5_000_000 if k == 6_789 else 1_000, 0))
        points.append(TimelinePoint(k * 0.001, 2, 10, k, 0, 0))
    timeline = Timeline(points, 0.001)
    grouped = _group(timeline)
    rows = [{"key": "1", "peak": 5_000_000}, {"key": "2", "peak": 9_999}]
    data = _timeline_data(timeline, grouped, rows)
    one, two = data["interpreters"]["1"], data["interpreters"]["2"]
    assert len(one["t"]) <= MAX_CHART_POINTS + 1 and len(two["t"]) <= MAX_CHART_POINTS + 1
    assert max(one["object"]) == 5_000_000, "the one-reading spike survives"
    assert two["mem"][-1] == 9_999 and two["t"][-1] == round(9_999 * 0.001, 4), "the last reading is kept"
    combined = dict(data["combined"]["series"])
    assert len(data["combined"]["t"]) == MAX_CHART_POINTS
    assert max(combined["1"]) == 5_000_000 and combined["2"][-1] == 10 + 9_999
    assert list(combined) == ["1", "2"], "largest peak first"
