"""`distill report`: one self-contained HTML page comparing run directories side by side.

The page opens with no network: plotly.js is embedded inline, the data sits in a
<script type="application/json" id="report-data"> tag with <, > and & escaped as \\u003c ...,
tables are rendered here with every text HTML-escaped, and the page script draws the plots
from the data, handing plotly only entity-escaped text (see html_template.py).

Sections (element ids): #runs, #loss-curves, #eval-table, #text-eval (runs on {"text"}
rows), #quantized (eval-<scheme>.json beside eval.json), #reliability, #gates-table, #budget,
#alignment, #samples, #teachers (the teachers.json of `distill teachers`). A plot section's id
is the plotly div itself. A folder with a teachers.json and no config.yaml (teachers scored
before any run) is shown in #teachers alone.
"""

import json
from html import escape
from pathlib import Path

from distill import rundir
from distill.errors import DistillError
from distill.paths import atomic_write_text
from distill.report.html_template import CSS, PAGE_JS
from distill.report.page import inline_script, json_for_script, plotly_script
from distill.report.report_data import OBJECTIVE_KEYS, dig, finite, is_number, load_runs
from distill.report.teachers import load_choice, teachers_section

# (label, student key, teacher key or None); dotted keys into eval.json.
EVAL_ROWS = [
    ("n", "n", None),
    ("accuracy", "accuracy", "teacher.accuracy"),
    ("heldout_ce", "heldout_ce", "teacher.heldout_ce"),
    ("perplexity", "perplexity", "teacher.perplexity"),
    ("agreement_top1", "agreement_top1", None),
    ("divergences.forward_kl", "divergences.forward_kl", None),
    ("divergences.reverse_kl", "divergences.reverse_kl", None),
    ("divergences.jsd", "divergences.jsd", None),
    ("divergences.tvd", "divergences.tvd", None),
    ("length.mean", "length.student_mean", "length.teacher_mean"),
    ("length.p90", "length.student_p90", "length.teacher_p90"),
    ("length.mean_ratio", "length.mean_ratio", None),
    ("length.p90_ratio", "length.p90_ratio", None),
    ("calibration.ece", "calibration.ece", None),
    ("refusal_rate", "refusal_rate", None),
    ("format_adherence", "format_adherence", None),
    ("wall_s", "wall_s", None),
]
# eval.json's `text` block ({"text"} rows, distill/eval/text.py), student and teacher side by side.
TEXT_ROWS = [
    ("held-out rows", "rows", None),
    ("tokens scored", "tokens", None),
    ("heldout_ce", "heldout_ce", "teacher.heldout_ce"),
    ("perplexity", "perplexity", "teacher.perplexity"),
    ("agreement_top1", "agreement_top1", None),
    ("forward_kl", "divergences.forward_kl", None),
    ("reverse_kl", "divergences.reverse_kl", None),
    ("jsd", "divergences.jsd", None),
    ("continuation length mean", "length.student_mean", "length.teacher_mean"),
    ("continuation length p90", "length.student_p90", "length.teacher_p90"),
    ("length difference mean (student - teacher)", "length.mean_diff", None),
    ("length |difference| mean", "length.mean_abs_diff", None),
    ("length mean_ratio", "length.mean_ratio", None),
    ("EOS rate", "length.student_eos_rate", "length.teacher_eos_rate"),
    ("prompts continued", "length.prompts", None),
]
SECTIONS = [
    ("runs", "Runs"), ("loss-curves", "Loss curves"), ("eval-table", "Evaluation"), ("text-eval", "Text evaluation"),
    ("quantized", "Quantized vs full precision"),
    ("reliability", "Reliability"), ("gates-table", "Gates"), ("budget", "Compute budget"),
    ("alignment", "Alignment (CKA)"), ("samples", "Samples"), ("teachers", "Teacher choice"),
]  # fmt: skip


def fmt(v) -> str:
    """A value as table text: n/a for missing, thousands for ints, 4 significant digits."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.3e}" if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3) else f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v)


def pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def td(v, cls: str = "") -> str:
    text = v if isinstance(v, str) else fmt(v)
    cls = cls or ("na" if v is None else "num" if is_number(v) else "")
    return f'<td class="{cls}">{escape(text)}</td>' if cls else f"<td>{escape(text)}</td>"


def table(head: list[str], rows: list[str], cls: str = "") -> str:
    ths = "".join(f"<th>{escape(h)}</th>" for h in head)
    return f'<table class="{cls}"><thead><tr>{ths}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def lacking(runs: list[dict], test, what: str) -> str:
    """A note naming the runs for which `test(run)` is false, or ''."""
    names = [r["name"] for r in runs if not test(r)]
    return f'<p class="missing">{escape(what)}: {escape(", ".join(names))}</p>' if names else ""


def runs_section(runs: list[dict]) -> str:
    head = ["run", "directory", "student", "teacher", "params", "steps", "tokens", "train wall s"]
    head += [k.removeprefix("objective.") for k in OBJECTIVE_KEYS] + ["files missing"]
    rows = []
    for r in runs:
        planned = r["steps_from"] not in (None, rundir.TRAIN_SUMMARY)
        steps = td(f"{fmt(r['steps'])} ({r['steps_from']})") if planned else td(r["steps"])
        cells = [td(r["name"], "name"), td(r["dir"], "path"), td(r["student"]), td(r["teacher"]), td(r["params"])]
        cells.append(steps)
        cells += [td(r["tokens"]), td(r["wall_s"])] + [td(r["objective"][k]) for k in OBJECTIVE_KEYS]
        cells.append(td(", ".join(r["missing"]) or "none", "path"))
        rows.append(f"<tr>{''.join(cells)}</tr>")
    notes = "".join(f"<li>{escape(r['name'])}: {escape(n)}</li>" for r in runs for n in r["notes"])
    return table(head, rows) + (f'<ul class="missing">{notes}</ul>' if notes else "")


def side_by_side(runs: list[dict], evals: list[dict], rows_def: list[tuple[str, str, str | None]]) -> str:
    """A metric x run table: a student column per run, and a teacher column where the run
    has any teacher value."""
    has_teacher = [any(dig(e, t) is not None for _, _, t in rows_def if t) for e in evals]
    top = '<th rowspan="2">metric</th>' + "".join(
        f'<th colspan="{2 if t else 1}" class="name">{escape(r["name"])}</th>' for r, t in zip(runs, has_teacher)
    )
    sub = "".join("<th>student</th><th>teacher</th>" if t else "<th>student</th>" for t in has_teacher)
    body = []
    for label, key, tkey in rows_def:
        cells = [f"<th>{escape(label)}</th>"]
        for e, t in zip(evals, has_teacher):
            cells.append(td(dig(e, key)))
            if t:
                cells.append(td(dig(e, tkey)) if tkey else '<td class="blank"></td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f'<table class="eval"><thead><tr>{top}</tr><tr>{sub}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def eval_section(runs: list[dict]) -> str:
    evals = [r["eval"] or {} for r in runs]
    extra = sorted({k for e in evals if isinstance(e.get("divergences"), dict) for k in e["divergences"]})
    rows_def = EVAL_ROWS + [(f"divergences.{k}", f"divergences.{k}", None) for k in extra
                            if f"divergences.{k}" not in {d for _, d, _ in EVAL_ROWS}]
    note = lacking(runs, lambda r: r["eval"] is not None, f"no {rundir.EVAL}")
    return side_by_side(runs, evals, rows_def) + note


def has_text(r: dict) -> bool:
    return isinstance(dig(r["eval"], "text"), dict)


def text_section(runs: list[dict]) -> str:
    """The text runs' held-out scores side by side (eval.json `text`); a note names the others."""
    texts = [r for r in runs if has_text(r)]
    note = lacking(runs, has_text, 'no text evaluation (only runs on {"text"} rows have one)')
    if not texts:
        return '<p class="empty">no run has a text evaluation</p>' + note
    return side_by_side(texts, [r["eval"]["text"] for r in texts], TEXT_ROWS) + note


def quantized_section(runs: list[dict]) -> str:
    """Per run with eval-<scheme>.json files: its full-precision student and each quantized
    one side by side (the text block for {"text"} runs), with the weights' size on disk."""
    size = [("weights bytes", "model.quant.weights_bytes", None)]
    blocks = []
    for r in runs:
        if not r.get("quantized"):
            continue
        evals = [r["eval"] or {}] + [q["eval"] for q in r["quantized"]]
        full = next((dig(e, "model.quant.fp_weights_bytes") for e in evals[1:] if dig(e, "model.quant") is not None), None)
        evals[0] = {**evals[0], "model": {"quant": {"weights_bytes": full}}}  # the fp32 weights the quantizer measured
        columns = [{"name": f"{r['name']} (full precision)"}] + [{"name": f"{r['name']} ({q['scheme']})"} for q in r["quantized"]]
        if any(isinstance(e.get("text"), dict) for e in evals):
            texts = [{**(e.get("text") or {}), "model": e.get("model")} for e in evals]
            blocks.append(side_by_side(columns, texts, size + TEXT_ROWS))
        else:
            blocks.append(side_by_side(columns, evals, size + EVAL_ROWS))
    note = lacking(runs, lambda r: bool(r.get("quantized")), "no quantized evaluation (eval-SCHEME.json: distill eval RUN --scheme SCHEME)")
    return ("".join(blocks) or '<p class="empty">no run has a quantized evaluation</p>') + note


def gates_section(runs: list[dict]) -> str:
    rows, any_results = [], False
    for r in runs:
        gates = (r["eval"] or {}).get("gates")
        results = gates.get("results") if isinstance(gates, dict) else None
        if not isinstance(results, list) or not results:
            why = f"no {rundir.EVAL}" if r["eval"] is None else "no gates configured"
            rows.append(f'<tr>{td(r["name"], "name")}<td colspan="5" class="na">{why}</td></tr>')
            continue
        any_results = True
        for g in results:
            g = g if isinstance(g, dict) else {}
            ok, why = g.get("passed"), f" ({g['reason']})" if g.get("reason") else ""
            word = "pass" if ok else "fail" if ok is not None else "n/a"
            verdict = td(word + why, word if ok is not None else "na")
            rows.append(f"<tr>{td(r['name'], 'name')}{td(g.get('metric'))}{td(g.get('expr'), 'code')}"
                        f"{td(g.get('value'))}{td(g.get('threshold'))}{verdict}</tr>")
        if isinstance(gates.get("passed"), bool):
            word, cls = ("all gates passed", "pass") if gates["passed"] else ("gates failed", "fail")
            rows.append(f'<tr class="total">{td(r["name"], "name")}<td colspan="5" class="{cls}">{word}</td></tr>')
    if not any_results:
        none = '<p class="empty">no gates configured</p>' if any(r["eval"] is not None for r in runs) else ""
        return none + lacking(runs, lambda r: r["eval"] is not None, f"no {rundir.EVAL}")
    return table(["run", "metric", "expression", "value", "threshold", "result"], rows)


def budget_table(runs: list[dict]) -> str:
    rows = []
    for r in runs:
        for p in r["budget"] or []:
            cells = [td(r["name"], "name"), td(p["phase"]), td(p["seconds"]), td(pct(p["share_seconds"]), "num"),
                     td(p["flops"]), td(pct(p["share_flops"]), "num"), td(p["tokens"])]
            rows.append(f"<tr>{''.join(cells)}</tr>")
    if not rows:
        return ""
    return table(["run", "phase", "seconds", "share of seconds", "FLOPs", "share of FLOPs", "tokens"], rows)


def samples_section(runs: list[dict]) -> str:
    parts = []
    for r in runs:
        parts.append(f'<h3 class="name">{escape(r["name"])}</h3>')
        if not r["samples"]:
            why = f"no {rundir.EVAL}" if r["eval"] is None else f"no samples in {rundir.EVAL}"
            parts.append(f'<p class="missing">{why}</p>')
            continue
        keys = ("prompt", "generated", "teacher" if any(s.get("teacher") for s in r["samples"]) else "answer")
        rows = [f"<tr>{''.join(f'<td><pre>{escape(s[k])}</pre></td>' for k in keys)}</tr>" for s in r["samples"]]
        parts.append(table(list(keys), rows, "samples"))
    return "".join(parts)


def has_bins(r: dict) -> bool:
    bins = dig(r["eval"], "calibration.bins")
    return isinstance(bins, list) and any(isinstance(b, dict) for b in bins)


def why_no(r: dict, plot: str) -> str | None:
    """Why a run has nothing in a plot (None: it has something)."""
    if plot == "loss-curves":
        ok, file = bool(r["metrics"] and r["metrics"]["terms"]), rundir.METRICS
        other = f"no loss terms in {rundir.METRICS}"
    elif plot == "reliability":
        ok, file, other = has_bins(r), rundir.EVAL, f"no calibration.bins in {rundir.EVAL}"
    elif plot == "budget":
        ok, file, other = bool(r["budget"]), rundir.BUDGET, f"no phases in {rundir.BUDGET}"
    else:
        ok, file, other = bool(r["alignment"]), rundir.ALIGNMENT, f"no records in {rundir.ALIGNMENT}"
    if ok:
        return None
    return f"no {file}" if file in r["missing"] or (file == rundir.EVAL and r["eval"] is None) else other


def plot_section(runs: list[dict], plot: str) -> tuple[str, str]:
    """(content of the plot div, note under it): what each run lacks; a placeholder in the
    div when no run has the data."""
    reasons: dict[str, list[str]] = {}
    for r in runs:
        why = why_no(r, plot)
        if why is not None:
            reasons.setdefault(why, []).append(r["name"])
    no_alignment = f"no {rundir.ALIGNMENT}"
    if plot == "alignment" and no_alignment in reasons:
        reasons[f"{no_alignment} (written when training has a live teacher)"] = reasons.pop(no_alignment)
    note = "".join(f'<p class="missing">{escape(w)}: {escape(", ".join(n))}</p>' for w, n in reasons.items())
    if sum(len(n) for n in reasons.values()) == len(runs):
        return '<p class="empty">nothing to plot</p>', note
    return "", note


def render(runs: list[dict], choices: list[dict] | None = None, choice_notes: list[str] | None = None) -> str:
    content = {
        "runs": (runs_section(runs), ""),
        "loss-curves": plot_section(runs, "loss-curves"),
        "eval-table": (eval_section(runs), ""),
        "text-eval": (text_section(runs), ""),
        "quantized": (quantized_section(runs), ""),
        "reliability": plot_section(runs, "reliability"),
        "gates-table": (gates_section(runs), ""),
        "budget": plot_section(runs, "budget"),
        "alignment": plot_section(runs, "alignment"),
        "samples": (samples_section(runs), ""),
        "teachers": (teachers_section(choices or [], choice_notes or []), ""),
    }
    content["budget"] = (content["budget"][0], budget_table(runs) + content["budget"][1])
    plots = {"loss-curves", "reliability", "budget", "alignment"}
    nav = " · ".join(f'<a href="#{sid}">{escape(title)}</a>' for sid, title in SECTIONS)
    sections = "".join(
        f'<section id="sec-{sid}"><h2>{escape(title)}</h2>'
        f'<div id="{sid}" class="{"plot" if sid in plots else "block"}">{content[sid][0]}</div>'
        f"{content[sid][1]}</section>"
        for sid, title in SECTIONS
    )
    data = json_for_script(finite({"runs": runs}))
    title = "distill report: " + ", ".join(r["name"] for r in runs)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
        f'<header><h1>distill report</h1><p>{len(runs)} run(s): {escape(", ".join(r["name"] for r in runs))}</p>'
        f"<nav>{nav}</nav></header><main>{sections}</main>"
        f'<script type="application/json" id="report-data">{data}</script>\n'
        f"<script>window.PlotlyConfig = {{MathJaxConfig: 'local'}};</script>\n"
        f"{plotly_script()}\n<script>{inline_script(PAGE_JS)}</script>\n</body></html>\n"
    )


def write_report(run_dirs: list[Path], out: Path, *, names: list[str] | None = None) -> Path:
    """Write one self-contained HTML report comparing `run_dirs` to `out` (atomically).

    names: labels for the runs (default: directory names, disambiguated when equal).
    A path without config.yaml is a DistillError; any other missing file is shown as missing.
    """
    out = Path(out)
    if out.is_dir():
        raise DistillError(f"--out {out} is a directory; give a file path such as report.html")
    dirs = [Path(d) for d in run_dirs]
    alone = [not (d / rundir.CONFIG).is_file() and (d / rundir.TEACHERS).is_file() for d in dirs]
    run_names = None if names is None else [n for n, a in zip(names, alone) if not a]
    only_choices = bool(dirs) and all(alone)  # no run yet: the teacher choice alone
    runs = [] if only_choices else load_runs([d for d, a in zip(dirs, alone) if not a], run_names)
    notes: list[str] = []
    choices = [c for c in (load_choice(d, notes) for d in dirs) if c is not None]
    atomic_write_text(out, render(runs, choices, notes))
    return out
