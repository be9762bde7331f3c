// The HTML report's own script (interheap/_html.py inlines it after Chart.js
// and the data): hands the prepared series to Chart.js, lays out the flame
// graph and switches interpreters. Python did everything else.
"use strict";
const DATA = JSON.parse(document.getElementById("interheap-data").textContent);
const DOMAIN_COLORS = { raw: "#8e6fbf", mem: "#4e9a06", object: "#3465a4" };
const PALETTE = ["#3465a4", "#cc0000", "#4e9a06", "#f57900", "#75507b", "#c17d11", "#06989a", "#888a85",
                 "#729fcf", "#ef2929", "#8ae234", "#fcaf3e", "#ad7fa8", "#e9b96e", "#34e2e2", "#555753"];

function human(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = Math.abs(n), u = 0;
  while (v >= 1024 && u < units.length - 1) { v /= 1024; u++; }
  return (n < 0 ? "-" : "") + (u === 0 ? v.toFixed(0) : v.toFixed(1)) + " " + units[u];
}

function points(ts, ys) { return ts.map((t, i) => ({ x: t, y: ys[i] })); }

// Marks on a timeline chart: life (dashed), peak (dot), first refusal (red).
const lifeMarks = {
  id: "lifeMarks",
  afterDatasetsDraw(chart, args, opts) {
    if (!opts || !opts.row) return;
    const r = opts.row, { ctx, chartArea: a, scales: { x, y } } = chart;
    const vline = (t, color, dash, label) => {
      const px = x.getPixelForValue(t);
      if (px < a.left - 1 || px > a.right + 1) return;
      ctx.save(); ctx.strokeStyle = color; ctx.setLineDash(dash); ctx.beginPath();
      ctx.moveTo(px, a.top); ctx.lineTo(px, a.bottom); ctx.stroke();
      ctx.fillStyle = color; ctx.font = "11px sans-serif";
      const atRight = px > a.right - 70;
      ctx.textAlign = atRight ? "right" : "left"; ctx.fillText(label, px + (atRight ? -3 : 3), a.top + 11); ctx.restore();
    };
    vline(r.first_seen, "#555", [4, 3], "first seen");
    if (r.ended !== null && r.ended !== undefined) vline(r.ended, "#555", [4, 3], "destroyed");
    else if (r.alive === false) vline(r.last_change, "#555", [4, 3], "last change");
    if (r.first_refusal !== null && r.first_refusal !== undefined) vline(r.first_refusal, "#cc0000", [], "limit hit");
    const px = x.getPixelForValue(r.peak_t), py = y.getPixelForValue(r.peak);
    ctx.save(); ctx.fillStyle = "#cc0000"; ctx.beginPath(); ctx.arc(px, py, 4, 0, 2 * Math.PI); ctx.fill();
    ctx.font = "11px sans-serif"; ctx.textAlign = px > (a.left + a.right) / 2 ? "right" : "left";
    ctx.fillText("peak " + human(r.peak), px + (ctx.textAlign === "right" ? -6 : 6), Math.max(a.top + 22, py - 6));
    ctx.restore();
  },
};
Chart.register(lifeMarks);

function timelineOptions(title, row) {
  return {
    animation: false, responsive: true, maintainAspectRatio: false, parsing: false, normalized: true,
    interaction: { mode: "nearest", axis: "x", intersect: false },
    scales: {
      x: { type: "linear", title: { display: true, text: "seconds" } },
      y: { stacked: true, beginAtZero: true, ticks: { callback: v => human(v) } },
    },
    plugins: {
      title: { display: true, text: title },
      tooltip: { callbacks: { label: c => c.dataset.label + ": " + human(c.parsed.y) } },
      lifeMarks: { row: row },
    },
  };
}

// Stacked areas: the first fills to zero, each other down to the one below it.
// A reading holds until the next ("before": Chart.js steps at the later point).
function area(label, color, data, index) {
  return { label, data, borderColor: color, backgroundColor: color + "b0", fill: index === 0 ? "origin" : "-1",
           stepped: "before", pointRadius: 0, borderWidth: 1 };
}

function drawTimeline() {
  const tl = DATA.timeline;
  if (!tl) return;
  const rows = Object.fromEntries(DATA.interpreters.map(r => [r.key, r]));
  const c = tl.combined;
  new Chart(document.getElementById("combined"), {
    type: "line",
    data: { datasets: c.series.map(([k, ys], i) => area(rows[k] ? rows[k].label : k, PALETTE[i % PALETTE.length],
                                                        points(c.t, ys), i)) },
    options: timelineOptions("Live bytes of every interpreter, stacked", null),
  });
  const box = document.getElementById("per-interp");
  box.className = "grid";
  for (const key of DATA.charted) {
    const s = tl.interpreters[key], row = rows[key];
    if (!s || !row) continue;
    const wrap = document.createElement("div");
    const h = document.createElement("h3");
    const life = row.ended !== null && row.ended !== undefined ? "destroyed at " + row.ended.toFixed(3) + " s"
               : row.alive === false ? "destroyed, last change " + row.last_change.toFixed(3) + " s"
               : (row.alive ? "alive at exit" : "");
    h.textContent = row.label + " (first seen " + row.first_seen.toFixed(3) + " s" + (life ? ", " + life : "") + ")";
    const div = document.createElement("div"); div.className = "chart";
    const canvas = document.createElement("canvas"); canvas.dataset.interp = key;
    div.appendChild(canvas); wrap.appendChild(h); wrap.appendChild(div); box.appendChild(wrap);
    new Chart(canvas, {
      type: "line",
      data: { datasets: ["raw", "mem", "object"].map((d, i) => area(d, DOMAIN_COLORS[d], points(s.t, s[d]), i)) },
      options: timelineOptions("peak " + human(row.peak) + " at " + row.peak_t.toFixed(3) + " s", row),
    });
  }
}

// Flame graph: each frame a floating bar [x0, x1] at its depth, root at the bottom.
function flameColor(name) {
  let h = 0;
  for (let i = 0; i < name.length; i++) h = (h * 31 + name.charCodeAt(i)) >>> 0;
  return "hsl(" + (10 + h % 45) + ", " + (70 + h % 20) + "%, " + (55 + (h >> 8) % 15) + "%)";
}

function flameBars(tree, metric) {
  const bars = [];
  let maxDepth = 0;
  (function walk(node, x0, depth) {
    const value = node[metric];
    if (value <= 0) return;
    bars.push({ x: [x0, x0 + value], y: String(depth), node });
    maxDepth = Math.max(maxDepth, depth);
    let x = x0;
    for (const child of node[4]) { walk(child, x, depth + 1); x += child[metric]; }
  })(tree, 0, 0);
  return { bars, maxDepth };
}

const flameLabels = {
  id: "flameLabels",
  afterDatasetsDraw(chart) {
    if (chart.canvas.id !== "flame") return;
    const { ctx } = chart, meta = chart.getDatasetMeta(0);
    ctx.save(); ctx.font = "11px sans-serif"; ctx.fillStyle = "#000"; ctx.textBaseline = "middle";
    meta.data.forEach((bar, i) => {
      const { x, base, y, height } = bar.getProps(["x", "base", "y", "height"], true);
      const left = Math.max(Math.min(x, base), chart.chartArea.left), right = Math.min(Math.max(x, base), chart.chartArea.right);
      if (right - left < 30) return;
      ctx.save(); ctx.beginPath(); ctx.rect(left, y - height / 2, right - left - 2, height); ctx.clip();
      ctx.fillText(chart.data.datasets[0].data[i].node[0], left + 3, y); ctx.restore();
    });
    ctx.restore();
  },
};
Chart.register(flameLabels);

let flameChart = null;
function drawFlame() {
  const select = document.getElementById("interp");
  if (!select) return;
  const key = select.value, metric = Number(document.getElementById("metric").value);
  const tree = DATA.flame[key];
  const { bars, maxDepth } = flameBars(tree, metric);
  const labels = [];
  for (let d = maxDepth; d >= 0; d--) labels.push(String(d));
  document.getElementById("flame-box").style.height = Math.max(160, 40 + 18 * (maxDepth + 1)) + "px";
  for (const div of document.querySelectorAll("div.sites")) div.hidden = div.dataset.interp !== key;
  if (flameChart) flameChart.destroy();
  const total = tree[metric] || 1;
  flameChart = new Chart(document.getElementById("flame"), {
    type: "bar",
    data: { labels, datasets: [{ data: bars, grouped: false, barPercentage: 1, categoryPercentage: 0.92,
                                 backgroundColor: bars.map(b => flameColor(b.node[0])), borderWidth: 0 }] },
    options: {
      indexAxis: "y", animation: false, responsive: true, maintainAspectRatio: false,
      scales: { x: { type: "linear", min: 0, max: total, ticks: { callback: v => human(v) } },
                y: { display: false } },
      plugins: {
        legend: { display: false },
        title: { display: true, text: (metric === 2 ? "Live bytes at exit" : "Bytes allocated") +
                 " by stack (estimated), " + human(tree[metric]) + " in all; click a frame to zoom" },
        tooltip: { callbacks: {
          title: () => "",
          label: c => { const n = c.raw.node; return n[0] + (n[1] ? "  " + n[1] : "") + ": " + human(n[metric]) +
                        " (" + (100 * n[metric] / total).toFixed(1) + "%)"; } } },
      },
      onClick(evt, elements) {
        if (!elements.length) return;
        const b = bars[elements[0].index];
        flameChart.options.scales.x.min = b.x[0]; flameChart.options.scales.x.max = b.x[1]; flameChart.update();
      },
    },
  });
}

drawTimeline();
if (document.getElementById("interp")) {
  document.getElementById("interp").addEventListener("change", drawFlame);
  document.getElementById("metric").addEventListener("change", drawFlame);
  document.getElementById("unzoom").addEventListener("click", drawFlame);
  drawFlame();
}
