"""The latent page's HTML and JavaScript: one self-contained file, plotly.js inline.

The data (computed in latents.py) sits in a <script type="application/json"> tag with
<, > and & written as JSON escapes; the script reads it with JSON.parse, puts every text
that comes from data into the page with textContent, and escapes trace names for plotly
(which reads a little HTML in them). Element ids the tests rely on: #latent-plot,
#checkpoint-slider, #checkpoint-label, #run-select, #cka-plot.
"""

import html

from distill.report.page import json_for_script, plotly_script

PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#17becf"]
FIXED = {"symbol": "#9a9a9a", "other": "#9a9a9a", "end": "#222222"}


def colours(classes: list[str]) -> list[str]:
    out, i = [], 0
    for c in classes:
        if c in FIXED:
            out.append(FIXED[c])
        else:
            out.append(PALETTE[i % len(PALETTE)])
            i += 1
    return out


def explanation(data: dict) -> str:
    """The page's text (static HTML, every data value escaped)."""
    e = html.escape
    ex = data["explained"]
    n, shown = data["n_tokens"], len(data["index"])
    sim = (
        "<p class=sim><b>This is a simulation</b>: no model was trained or run. A synthetic teacher "
        "(5 classes in 16-D), a logit-only student that learns its own geometry (outputs could match, "
        "the arrangement does not) and a feature-KD student whose projector pulls it onto the teacher "
        "over 10 simulated checkpoints; fixed seed, the same maths as for real runs.</p>"
        if data["simulated"]
        else ""
    )
    return f"""{sim}
<p>Layer pair: {e(data["pair"])}. Faint dots: the frozen teacher's states of the {shown} plotted
probe tokens (of {n}; a fixed-seed subsample when there are more than {data["max_points"]}), in the
plane of the teacher's top two principal directions ({ex[0] * 100:.1f}% and {ex[1] * 100:.1f}% of its
variance) &mdash; one basis for the whole page. Bright dots: the selected run's student at the selected
checkpoint, in the teacher's space and then in the same plane; thin lines join {len(data["links"])}
of them (evenly spread) to their own token's teacher state.</p>
<p>Feature-KD runs are shown through their learned projector. Logit-only runs have no projector (their width
may differ), so a ridge least-squares map (lambda = {data["ridge"]:g} x the mean squared singular value of
the student states) is fitted from student to teacher states at each checkpoint: the best linear read-out,
which flatters the student; what stays off is geometry no linear map repairs. Colour: {e(data["class_rule"])}.</p>
<p>Right: linear CKA between the teacher's states and the run's (projected states for feature KD, raw
states for logit-only, since the ridge map is fitted on these very tokens); 1 means the same geometry up to
rotation and scale. The ring marks the selected run and checkpoint.</p>"""


SCRIPT = r"""
(() => {
const D = JSON.parse(document.getElementById('latent-data').textContent);
const esc = s => String(s).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
const runSel = document.getElementById('run-select');
const slider = document.getElementById('checkpoint-slider');
const label = document.getElementById('checkpoint-label');
const info = document.getElementById('step-info');
const config = {displaylogo: false, responsive: true};
D.runs.forEach((r, i) => {
  const o = document.createElement('option');
  o.value = String(i);
  o.textContent = r.label;
  runSel.appendChild(o);
});
let run = 0, k = 0;
const tColour = D.cls.map(c => D.colours[c]);

function latentTraces() {
  const r = D.runs[run], xs = r.x[k], ys = r.y[k];
  const lx = [], ly = [];
  for (const i of D.links) {
    lx.push(xs[i], D.teacher.x[i], null);
    ly.push(ys[i], D.teacher.y[i], null);
  }
  const traces = [
    {type: 'scatter', mode: 'markers', name: 'teacher (frozen)', x: D.teacher.x, y: D.teacher.y,
     marker: {color: tColour, size: 9, opacity: 0.16}, hoverinfo: 'skip'},
    {type: 'scatter', mode: 'lines', name: 'student \u2192 teacher', x: lx, y: ly,
     line: {color: 'rgba(80,80,80,0.35)', width: 1}, hoverinfo: 'skip'},
  ];
  D.classes.forEach((c, j) => {
    const px = [], py = [], txt = [];
    D.cls.forEach((cj, i) => {
      if (cj === j) { px.push(xs[i]); py.push(ys[i]); txt.push('token ' + D.index[i]); }
    });
    if (px.length) traces.push({type: 'scatter', mode: 'markers', name: esc(c), x: px, y: py, text: txt,
      marker: {color: D.colours[j], size: 6, opacity: 0.9, line: {color: 'white', width: 0.5}},
      hovertemplate: '%{text}<extra>' + esc(c) + '</extra>'});
  });
  return traces;
}

function latentLayout() {
  const r = D.runs[run];
  const pc = i => 'PC' + (i + 1) + ' of the teacher (' + (100 * D.explained[i]).toFixed(1) + '%)';
  return {title: {text: esc(r.label) + ' \u2014 step ' + r.steps[k]}, uirevision: 'keep',
    margin: {l: 60, r: 10, t: 50, b: 50}, legend: {title: {text: 'class'}},
    xaxis: {title: {text: pc(0)}, range: D.range.x, zeroline: false},
    yaxis: {title: {text: pc(1)}, range: D.range.y, zeroline: false}};
}

function ckaTraces() {
  const traces = D.runs.map((r, i) => ({type: 'scatter', mode: 'lines+markers', name: esc(r.label),
    x: r.steps, y: r.cka, line: {width: i === run ? 3 : 1.5}, marker: {size: i === run ? 7 : 4},
    opacity: i === run ? 1 : 0.55}));
  const r = D.runs[run];
  traces.push({type: 'scatter', mode: 'markers', name: 'selected', showlegend: false,
    x: [r.steps[k]], y: [r.cka[k]], marker: {size: 16, color: 'rgba(0,0,0,0)', line: {color: '#111', width: 2}},
    hovertemplate: 'step %{x}: CKA %{y:.3f}<extra></extra>'});
  return traces;
}

const ckaLayout = {title: {text: 'linear CKA to the teacher'}, margin: {l: 50, r: 10, t: 50, b: 50},
  xaxis: {title: {text: 'step'}}, yaxis: {title: {text: 'CKA'}, range: [0, 1.02]},
  legend: {orientation: 'h', y: -0.25}, uirevision: 'keep'};

function update() {
  const r = D.runs[run];
  label.textContent = 'step ' + r.steps[k] + ' (' + (k + 1) + '/' + r.steps.length + ')';
  const fit = r.fit_r2[k] === null ? '' : '; ridge fit R\u00b2 ' + r.fit_r2[k].toFixed(3);
  info.textContent = 'CKA ' + r.cka[k].toFixed(3) + ' \u2014 shown through ' + r.method + fit;
  Plotly.react('latent-plot', latentTraces(), latentLayout(), config);
  Plotly.react('cka-plot', ckaTraces(), ckaLayout, config);
}

function setRun(i) {
  const step = D.runs[run].steps[k];
  run = i;
  const steps = D.runs[run].steps;
  let best = 0;
  steps.forEach((s, j) => { if (Math.abs(s - step) < Math.abs(steps[best] - step)) best = j; });
  k = best;
  slider.max = String(steps.length - 1);
  slider.value = String(k);
  update();
}

slider.addEventListener('input', () => { k = Number(slider.value); update(); });
slider.addEventListener('change', () => { k = Number(slider.value); update(); });
runSel.addEventListener('change', () => setRun(Number(runSel.value)));
setRun(0);
})();
"""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 18px 26px; color: #222; }
h1 { font-size: 1.35em; margin: 0 0 8px; }
.controls { display: flex; gap: 22px; align-items: center; flex-wrap: wrap; margin: 10px 0; }
.controls input[type=range] { width: 360px; }
#checkpoint-label { font-variant-numeric: tabular-nums; min-width: 9em; display: inline-block; }
#step-info { color: #555; }
.plots { display: grid; grid-template-columns: 3fr 2fr; gap: 12px; }
#latent-plot { height: 640px; } #cka-plot { height: 460px; }
.text { max-width: 1100px; font-size: 0.92em; line-height: 1.45; color: #333; }
.sim { background: #fff6d6; padding: 6px 10px; border-left: 4px solid #e0b400; }
"""


def render(data: dict) -> str:
    """The whole page as one string."""
    data = {**data, "colours": colours(data["classes"])}
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(data["title"])}</title>
<style>{STYLE}</style>
{plotly_script()}
</head><body>
<h1>{html.escape(data["title"])}</h1>
<div class="controls">
  <label>run <select id="run-select"></select></label>
  <label>checkpoint <input type="range" id="checkpoint-slider" min="0" max="0" step="1" value="0"></label>
  <span id="checkpoint-label"></span>
  <span id="step-info"></span>
</div>
<div class="plots"><div id="latent-plot"></div><div id="cka-plot"></div></div>
<div class="text" id="latent-legend">{explanation(data)}</div>
<script type="application/json" id="latent-data">{json_for_script(data)}</script>
<script>{SCRIPT}</script>
</body></html>
"""
