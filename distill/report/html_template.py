"""The report page's stylesheet and script (see html.py).

The script reads the JSON in #report-data and draws the plots with plotly. It never writes
HTML: text from data reaches the page only through plotly trace names, axis titles and tick
labels, and those go through `esc` first, because plotly reads a small HTML subset (<b>,
<br>, <a>) in them and shows entities (&lt;) as the literal characters.
"""

CSS = """
:root { --fg: #1f2328; --muted: #656d76; --line: #d0d7de; --bg: #f6f8fa; --ok: #1a7f37; --bad: #cf222e; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); }
header { padding: 16px 24px 8px; border-bottom: 1px solid var(--line); background: var(--bg); }
header h1 { margin: 0 0 4px; font-size: 22px; }
header p { margin: 0 0 6px; color: var(--muted); overflow-wrap: anywhere; }
nav a { color: #0969da; text-decoration: none; }
main { padding: 8px 24px 40px; }
section { margin: 18px 0 28px; }
h2 { font-size: 18px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 15px; margin: 14px 0 6px; }
.block { overflow-x: auto; }
.plot { min-height: 60px; }
table { border-collapse: collapse; margin: 4px 0 8px; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
thead th { background: var(--bg); }
tbody th { font-weight: 500; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.na, td.blank { color: var(--muted); }
td.path { font-family: ui-monospace, monospace; font-size: 12px; overflow-wrap: anywhere; max-width: 340px; }
td.code { font-family: ui-monospace, monospace; }
td.pass { color: var(--ok); font-weight: 600; }
td.fail { color: var(--bad); font-weight: 600; }
.name { font-weight: 600; }
table.samples td { max-width: 560px; }
pre { margin: 0; white-space: pre-wrap; overflow-wrap: anywhere; font-size: 12px; }
.missing, .empty { color: var(--muted); font-style: italic; margin: 4px 0; }
"""

PAGE_JS = r"""
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("report-data").textContent);
  var RUNS = DATA.runs || [];
  var COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                "#7f7f7f", "#bcbd22", "#17becf"];
  var DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"];
  var CONFIG = {responsive: true, displaylogo: false};

  // Plotly renders a subset of HTML in names and titles; entities show literally.
  function esc(s) {
    return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  }
  function color(i) { return COLORS[i % COLORS.length]; }
  function num(x) { return typeof x === "number" && isFinite(x) ? x : null; }
  function title(text) { return {text: esc(text)}; }
  function isObject(x) { return x !== null && typeof x === "object"; }
  function binEdges(b) { return num(b.lo) !== null && num(b.hi) !== null; }

  function plot(id, traces, layout) {
    var div = document.getElementById(id);
    if (!div || !traces.length || typeof Plotly === "undefined") { return; }
    div.textContent = "";
    var base = {margin: {t: 40, r: 30, b: 60, l: 70}, hovermode: "closest", height: 460,
                legend: {font: {size: 11}}};
    Plotly.newPlot(div, traces, Object.assign(base, layout), CONFIG);
  }

  function lossCurves() {
    var terms = [];
    RUNS.forEach(function (run) {
      if (run.metrics) {
        Object.keys(run.metrics.terms).forEach(function (t) { if (terms.indexOf(t) < 0) { terms.push(t); } });
      }
    });
    var traces = [];
    RUNS.forEach(function (run, i) {
      if (!run.metrics) { return; }
      Object.keys(run.metrics.terms).forEach(function (term) {
        traces.push({
          type: "scatter", mode: "lines", x: run.metrics.step, y: run.metrics.terms[term],
          name: esc(run.name + " \u00b7 " + term), legendgroup: "run" + i,
          line: {color: color(i), width: 1.6, dash: DASHES[terms.indexOf(term) % DASHES.length]}
        });
      });
    });
    var scale = function (type) { return {label: type, method: "relayout", args: [{"yaxis.type": type}]}; };
    plot("loss-curves", traces, {
      xaxis: {title: title("step")}, yaxis: {title: title("per valid token")},
      updatemenus: [{type: "buttons", direction: "right", x: 1, xanchor: "right", y: 1.12, yanchor: "top",
                     buttons: [scale("linear"), scale("log")]}]
    });
  }

  function reliability() {
    var traces = [];
    RUNS.forEach(function (run, i) {
      var cal = run.eval && run.eval.calibration;
      var bins = cal && Array.isArray(cal.bins) ? cal.bins.filter(isObject) : [];
      if (!bins.length) { return; }
      var ece = num(cal.ece);
      var label = run.name + (ece === null ? "" : " (ECE " + ece.toFixed(3) + ")");
      traces.push({
        type: "scatter", mode: "lines+markers", name: esc(label), legendgroup: "run" + i,
        x: bins.map(function (b) { return num(b.confidence); }), y: bins.map(function (b) { return num(b.accuracy); }),
        customdata: bins.map(function (b) { return num(b.count); }), connectgaps: true,
        hovertemplate: "confidence %{x:.3f}<br>accuracy %{y:.3f}<br>count %{customdata}",
        line: {color: color(i)}, marker: {color: color(i), size: 7}
      });
      traces.push({
        type: "bar", name: esc(run.name + " \u00b7 count"), legendgroup: "run" + i, yaxis: "y2",
        x: bins.map(function (b) { return binEdges(b) ? (num(b.lo) + num(b.hi)) / 2 : null; }),
        y: bins.map(function (b) { return num(b.count); }),
        width: bins.map(function (b) { return binEdges(b) ? 0.9 * (num(b.hi) - num(b.lo)) : 0; }),
        marker: {color: color(i), opacity: 0.25}, hovertemplate: "bin %{x:.2f}<br>count %{y}"
      });
    });
    if (traces.length) {
      traces.unshift({type: "scatter", mode: "lines", x: [0, 1], y: [0, 1], name: "perfect calibration",
                      line: {color: "#888", dash: "dot"}, hoverinfo: "skip"});
    }
    plot("reliability", traces, {
      xaxis: {title: title("confidence"), range: [0, 1]}, yaxis: {title: title("accuracy"), range: [0, 1.02]},
      yaxis2: {title: title("count"), overlaying: "y", side: "right", showgrid: false, rangemode: "tozero"},
      barmode: "overlay", legend: {x: 1.08, font: {size: 11}}
    });
  }

  function budget() {
    var runs = RUNS.filter(function (r) { return Array.isArray(r.budget) && r.budget.length; });
    var phases = [];
    runs.forEach(function (r) {
      r.budget.forEach(function (p) { if (phases.indexOf(p.phase) < 0) { phases.push(p.phase); } });
    });
    var names = runs.map(function (r) { return esc(r.name); });
    var traces = [];
    phases.forEach(function (phase, k) {
      var pick = function (key) {
        return runs.map(function (r) {
          var p = r.budget.filter(function (q) { return q.phase === phase; })[0];
          return p ? num(p[key]) : null;
        });
      };
      var common = {type: "bar", name: esc(phase), legendgroup: "phase" + k, marker: {color: color(k + 3)}};
      traces.push(Object.assign({x: names, y: pick("seconds"), customdata: pick("share_seconds"),
        hovertemplate: "%{y:.4g} s (%{customdata:.1%} of seconds)"}, common));
      traces.push(Object.assign({x: names, y: pick("flops"), customdata: pick("share_flops"), xaxis: "x2",
        yaxis: "y2", showlegend: false, hovertemplate: "%{y:.3e} FLOPs (%{customdata:.1%} of FLOPs)"}, common));
    });
    plot("budget", traces, {
      barmode: "stack", height: 420,
      xaxis: {domain: [0, 0.45], type: "category"}, xaxis2: {domain: [0.55, 1], anchor: "y2", type: "category"},
      yaxis: {title: title("seconds")}, yaxis2: {title: title("FLOPs"), anchor: "x2", exponentformat: "e"}
    });
  }

  function pairCka(rec, k) {
    return Array.isArray(rec.pairs) && isObject(rec.pairs[k]) ? num(rec.pairs[k].cka) : null;
  }

  function alignment() {
    var traces = [];
    RUNS.forEach(function (run, i) {
      var recs = Array.isArray(run.alignment) ? run.alignment : [];
      if (!recs.length) { return; }
      var steps = recs.map(function (r) { return r.step; });
      [["cka_mean", "CKA mean", "solid"], ["cka_projected_mean", "projected CKA mean", "dash"]].forEach(function (m) {
        var ys = recs.map(function (r) { return num(r[m[0]]); });
        if (ys.every(function (y) { return y === null; })) { return; }
        traces.push({type: "scatter", mode: "lines+markers", x: steps, y: ys, legendgroup: "run" + i,
                     name: esc(run.name + " \u00b7 " + m[1]), line: {color: color(i), dash: m[2], width: 2.2}});
      });
      var pairs = recs[recs.length - 1].pairs;
      (Array.isArray(pairs) ? pairs : []).forEach(function (p, k) {
        if (!isObject(p)) { return; }
        var layer = function (side) { var v = p[side + "_layer"]; return v === undefined ? p[side] : v; };
        var label = "student " + layer("student") + " \u2194 teacher " + layer("teacher");
        traces.push({type: "scatter", mode: "lines", x: steps, visible: "legendonly", legendgroup: "run" + i,
                     y: recs.map(function (r) { return pairCka(r, k); }), name: esc(run.name + " \u00b7 " + label),
                     line: {color: color(i), width: 1, dash: DASHES[(k + 2) % DASHES.length]}});
      });
    });
    plot("alignment", traces, {xaxis: {title: title("step")},
                               yaxis: {title: title("linear CKA to the teacher"), range: [0, 1.02]}});
  }

  [lossCurves, reliability, budget, alignment].forEach(function (draw) {
    try { draw(); } catch (e) { console.error("report: " + draw.name + ": " + e); }
  });
})();
"""
