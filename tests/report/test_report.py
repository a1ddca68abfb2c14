"""distill report: one self-contained HTML page over run directories, checked as text and
in headless chromium (fixture open_page: no network, console errors collected)."""

import copy
import json
import math
import re
from pathlib import Path

import pytest

from distill.config import build_config, dump_config
from distill.errors import DistillError
from distill.pipeline.runner import run_training
from distill.report import write_report
from distill.report.report_data import MAX_POINTS, metrics_series, run_names

SECTIONS = ["runs", "loss-curves", "eval-table", "text-eval", "quantized", "reliability", "gates-table", "budget", "alignment",
            "samples", "teachers"]
PLOTS = ["loss-curves", "reliability", "budget", "alignment"]
XSS_PROMPT = "Q:<script>alert(1)</script>1+2="


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_run(path: Path, tree: dict, *, metrics=True, summary=True, eval_json=True, budget=True, alignment=True,
             multitask=False, prompt="Q:3+4*2=") -> Path:
    """A run directory written by hand, shaped like what training / eval / budget write."""
    tree = copy.deepcopy(tree)
    tree["out_dir"] = str(path)
    if multitask:
        tree["rationale"] = {"mode": "multitask", "weight": 0.5}
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(dump_config(build_config(tree)))
    steps = 12
    if metrics:
        rows = []
        for s in range(1, steps + 1):
            ce, kd = 3.0 * math.exp(-s / 6) + 0.4, 1.5 * math.exp(-s / 5) + 0.1
            row = {"task_ce": ce, "kd": kd, "loss": 0.5 * ce + 0.5 * 4 * kd, "step": s, "lr": 3e-3 * min(1, s / 2),
                   "grad_norm": 1.2 / s, "valid_tokens": 480.0, "tokens_per_s": 9000.0 + s, "step_s": 0.05,
                   "teacher_s": 0.01}
            if multitask:
                row.update(rationale_task_ce=ce * 1.3, rationale_kd=kd * 1.1, label_loss=row["loss"])
                row["loss"] += 0.5 * (0.5 * ce * 1.3 + 2 * kd * 1.1)
            rows.append(row)
        write_jsonl(path / "metrics.jsonl", rows)
    if summary:
        (path / "train_summary.json").write_text(json.dumps({
            "steps": steps, "resumed_from": 0, "params": 37664, "tokens": 12 * 600, "wall_s": 1.9,
            "tokens_per_s": 3800.0, "processes": 1, "fused_loss": True, "teacher": "live", "feature_pairs": 0,
            "projector_params": 0, "alignment": {"step": steps, "tokens": 300, "cka_mean": 0.61}}))
    if eval_json:
        bins = [{"lo": i / 5, "hi": (i + 1) / 5, "count": c, "confidence": (i + 0.5) / 5 if c else None,
                 "accuracy": min(1.0, (i + 0.3) / 5) if c else None} for i, c in enumerate([0, 3, 9, 14, 22])]
        (path / "eval.json").write_text(json.dumps({
            "n": 8, "accuracy": 0.375, "heldout_ce": 0.91, "perplexity": 2.48, "wall_s": 0.7,
            "samples": [{"prompt": prompt, "generated": "3+8=11 #### 11", "answer": "11"},
                        {"prompt": "Q:9-2=", "generated": "7", "answer": "7"}],
            "agreement_top1": 0.82, "divergences": {"forward_kl": 0.31, "reverse_kl": 0.27, "jsd": 0.06, "tvd": 0.19},
            "teacher": {"accuracy": 0.75, "heldout_ce": 0.52, "perplexity": 1.68},
            "length": {"student_mean": 11.2, "teacher_mean": 10.4, "student_p90": 15, "teacher_p90": 14,
                       "mean_ratio": 1.077, "p90_ratio": 1.071},
            "calibration": {"ece": 0.083, "bins": bins}, "refusal_rate": 0.0, "format_adherence": 0.875,
            "gates": {"passed": False, "results": [
                {"metric": "accuracy", "expr": "accuracy >= 0.9 * teacher.accuracy", "value": 0.375,
                 "threshold": 0.675, "passed": False},
                {"metric": "calibration.ece", "expr": "calibration.ece <= 0.1", "value": 0.083, "threshold": 0.1,
                 "passed": True},
                {"metric": "<i>refusal_rate</i>", "expr": "refusal_rate <= 0.9 * teacher.refusal_rate", "value": 0.0,
                 "threshold": None, "passed": False, "reason": "no teacher value"}]}}))
    if budget:
        (path / "budget.json").write_text(json.dumps({"phases": {
            "teacher_generation": {"tokens": 5000, "flops": None, "seconds": 40.0, "records": 1},
            "student_training": {"tokens": 7200, "flops": 1.6e9, "seconds": 1.9, "records": 1,
                                 "share_seconds": 0.043, "share_flops": 0.8},
            "evaluation": {"tokens": 900, "flops": 4e8, "seconds": 2.2, "records": 1}},
            "total": {"seconds": 44.1, "flops": 2e9, "tokens": 13100}}))
    if alignment:
        pairs = [{"student": 1, "teacher": 1, "weight": 1.0, "student_layer": 0, "teacher_layer": 0},
                 {"student": 2, "teacher": 2, "weight": 1.0, "student_layer": 1, "teacher_layer": 1}]
        write_jsonl(path / "alignment.jsonl", [
            {"step": s, "tokens": 300, "pairs": [{**p, "cka": 0.3 + 0.03 * s + 0.05 * k} for k, p in enumerate(pairs)],
             "cka_mean": 0.325 + 0.03 * s} for s in (0, 4, 8, 12)])
    return path


def report_data(html: str) -> dict:
    m = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html, re.S)
    assert m and "<" not in m.group(1) and ">" not in m.group(1) and "&" not in m.group(1)
    return json.loads(m.group(1))


def trace_count(page, pid: str) -> int:
    return page.evaluate(f"(document.getElementById('{pid}').data || []).length")


def check_page(p) -> None:
    assert p.errors == []
    for sid in SECTIONS:
        assert p.page.query_selector(f"#{sid}") is not None, sid


def test_full_report_is_self_contained_and_renders(tiny_tree, tmp_path, open_page):
    run = make_run(tmp_path / "kd-run", tiny_tree)
    bare = tmp_path / "bare-run"
    bare.mkdir()
    (bare / "config.yaml").write_text(dump_config(build_config(tiny_tree)))
    out = write_report([run, bare], tmp_path / "out" / "report.html")
    assert out == tmp_path / "out" / "report.html"
    assert [f.name for f in out.parent.iterdir()] == ["report.html"]  # written atomically, no temp left
    html = out.read_text()
    # offline: no external script or stylesheet; the plotly bundle is inline
    assert not re.search(r"<(script|link)\b[^>]*\b(src|href)\s*=", html, re.I)
    assert "plotly.js v" in html and "window.Plotly = Plotly" in html and len(html) > 3_000_000
    data = report_data(html)
    assert [r["name"] for r in data["runs"]] == ["kd-run", "bare-run"]
    kd = data["runs"][0]
    assert list(kd["metrics"]["terms"]) == ["loss", "task_ce", "kd"]  # no lr, grad_norm, timings
    assert kd["params"] == 37664 and kd["steps"] == 12 and kd["objective"]["objective.alpha"] == 0.5
    assert data["runs"][1]["missing"] == ["metrics.jsonl", "train_summary.json", "eval.json", "budget.json",
                                          "alignment.jsonl"]
    # the sections say what the bare run lacks
    for text in ("no metrics.jsonl: bare-run", "no eval.json: bare-run", "no budget.json: bare-run",
                 "no alignment.jsonl (written when training has a live teacher): bare-run"):
        assert text in html

    p = open_page(out)
    check_page(p)
    for pid in PLOTS:
        assert trace_count(p.page, pid) > 0, pid
    assert trace_count(p.page, "loss-curves") == 3
    assert trace_count(p.page, "reliability") == 3  # the diagonal, the run's bins, its counts
    assert p.page.evaluate("document.querySelectorAll('#loss-curves .scatterlayer .trace').length") == 3
    # tables: eval side by side with the teacher, gates pass / fail, budget shares
    eval_text = p.page.text_content("#eval-table")
    assert "0.375" in eval_text and "0.75" in eval_text and "divergences.jsd" in eval_text
    assert "no eval.json" in eval_text
    gates = p.page.inner_text("#gates-table")
    assert "accuracy >= 0.9 * teacher.accuracy" in gates and "fail" in gates and "pass" in gates
    assert "no eval.json" in gates and "fail (no teacher value)" in gates and "<i>refusal_rate</i>" in gates
    budget_rows = p.page.inner_text("#sec-budget table")
    assert "student_training" in budget_rows and "80.0%" in budget_rows and "4.3%" in budget_rows
    runs_text = p.page.inner_text("#runs")
    assert "37,664" in runs_text and "12 (config (planned))" not in runs_text and "4 (config (planned))" in runs_text
    assert p.screenshot("report.png").stat().st_size > 10_000


def test_data_and_model_text_is_escaped(tiny_tree, tmp_path, open_page):
    evil_dir = tmp_path / "<img src=x onerror=alert(2)>"
    run = make_run(evil_dir, tiny_tree, prompt=XSS_PROMPT)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    write_jsonl(run / "metrics.jsonl", [{**r, "<svg onload=alert(3)>": 1.0} for r in rows])
    other = make_run(tmp_path / "plain", tiny_tree)
    out = write_report([run, other], tmp_path / "report.html", names=["<b>x</b>", "plain"])
    html = out.read_text()
    for raw in ("<script>alert(1)</script>", "<b>x</b>", "<img src=x", "<svg onload"):
        assert raw not in html, raw
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;b&gt;x&lt;/b&gt;" in html
    data = report_data(html)
    assert data["runs"][0]["samples"][0]["prompt"] == XSS_PROMPT and data["runs"][0]["name"] == "<b>x</b>"

    p = open_page(out)
    dialogs = []
    p.page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    p.page.add_init_script("window.__alerts = []; window.alert = function (m) { window.__alerts.push(String(m)); };")
    p.page.reload()
    p.page.wait_for_load_state("load")
    check_page(p)
    assert dialogs == [] and p.page.evaluate("window.__alerts") == []
    assert p.page.evaluate("document.querySelectorAll('main img, main b, main svg[onload]').length") == 0
    assert XSS_PROMPT in p.page.text_content("#samples")  # shown literally
    assert "<b>x</b>" in p.page.text_content("#runs") and "<img src=x onerror=alert(2)>" in p.page.text_content("#runs")
    legend = p.page.evaluate("[...document.querySelectorAll('#loss-curves .legendtext')].map(e => e.textContent)")
    assert "<b>x</b> \u00b7 loss" in legend and "<b>x</b> \u00b7 <svg onload=alert(3)>" in legend
    ticks = p.page.evaluate("[...document.querySelectorAll('#budget .xtick text')].map(e => e.textContent)")
    assert "<b>x</b>" in ticks


def test_runs_side_by_side(tiny_tree, tmp_path, open_page):
    a = make_run(tmp_path / "a" / "run", tiny_tree)
    b = make_run(tmp_path / "b" / "run", tiny_tree, multitask=True, budget=False, alignment=False)
    ev = json.loads((b / "eval.json").read_text())
    del ev["gates"], ev["teacher"]
    ev["accuracy"], ev["perplexity"] = 0.625, float("inf")
    (b / "eval.json").write_text(json.dumps(ev))
    out = write_report([a, b], tmp_path / "report.html")
    data = report_data(out.read_text())
    assert [r["name"] for r in data["runs"]] == ["a/run", "b/run"]
    assert data["runs"][1]["eval"]["perplexity"] is None  # inf: JSON null in the page data
    assert list(data["runs"][1]["metrics"]["terms"]) == ["loss", "label_loss", "task_ce", "kd", "rationale_kd",
                                                         "rationale_task_ce"]
    p = open_page(out)
    check_page(p)
    assert trace_count(p.page, "loss-curves") == 3 + 6
    groups = p.page.evaluate("[...new Set(document.getElementById('loss-curves').data.map(t => t.legendgroup))]")
    assert groups == ["run0", "run1"]
    colors = p.page.evaluate("document.getElementById('loss-curves').data.map(t => t.line.color)")
    assert len(set(colors[:3])) == 1 and colors[3] != colors[0]
    assert trace_count(p.page, "reliability") == 1 + 2 * 2
    assert trace_count(p.page, "alignment") > 0 and trace_count(p.page, "budget") > 0
    header = p.page.evaluate(
        "[...document.querySelectorAll('#eval-table thead tr:first-child th')].map(e => e.textContent)")
    assert header == ["metric", "a/run", "b/run"]
    cells = p.page.evaluate(
        "[...document.querySelectorAll('#eval-table tbody tr')].map(r => [...r.children].map(c => c.textContent))")
    rows = {r[0]: r[1:] for r in cells}
    # a: student, teacher; b: student, teacher (its length.teacher_* only)
    assert rows["accuracy"] == ["0.375", "0.75", "0.625", "n/a"]
    assert rows["perplexity"] == ["2.48", "1.68", "inf", "n/a"]
    assert rows["length.mean"] == ["11.2", "10.4", "11.2", "10.4"]
    assert rows["refusal_rate"] == ["0", "", "0", ""]
    gates = p.page.inner_text("#gates-table")
    assert "b/run" in gates and "no gates configured" in gates
    assert "no budget.json: b/run" in p.page.inner_text("#sec-budget")


def test_text_runs_show_their_text_evaluation_side_by_side(tiny_tree, tmp_path, open_page):
    """Runs on {"text"} rows (eval.json `text`) side by side, student and teacher; a run with
    a text evaluation and no teacher gets one column; a prompt/completion run is named as
    having none."""
    text = {"rows": 21, "tokens": 840.0, "heldout_ce": 2.1, "perplexity": 8.17, "agreement_top1": 0.64,
            "teacher": {"heldout_ce": 1.7, "perplexity": 5.47},
            "divergences": {"forward_kl": 0.42, "reverse_kl": 0.39, "jsd": 0.081, "tvd": 0.3},
            "length": {"student_mean": 30.5, "teacher_mean": 24.0, "student_p90": 48, "teacher_p90": 40,
                       "mean_ratio": 1.27, "p90_ratio": 1.2, "mean_diff": 6.5, "mean_abs_diff": 9.25,
                       "student_eos_rate": 0.5, "teacher_eos_rate": 0.75, "prompts": 4, "max_new_tokens": 48}}
    runs = []
    for name, block in (("kd", text), ("labels", {k: v for k, v in text.items() if k not in ("teacher", "length")})):
        run = make_run(tmp_path / name, tiny_tree, alignment=False)
        samples = [{"prompt": "the <i>cat</i>", "generated": "sat on", "teacher": "sat down"}]
        (run / "eval.json").write_text(json.dumps({"n": 21, "text": block, "samples": samples, "wall_s": 1.0}))
        runs.append(run)
    runs.append(make_run(tmp_path / "chain", tiny_tree, alignment=False))
    out = write_report(runs, tmp_path / "report.html")
    p = open_page(out)
    check_page(p)
    header = p.page.evaluate("[...document.querySelectorAll('#text-eval thead tr:first-child th')].map(e => e.textContent)")
    assert header == ["metric", "kd", "labels"]
    cells = p.page.evaluate(
        "[...document.querySelectorAll('#text-eval tbody tr')].map(r => [...r.children].map(c => c.textContent))")
    rows = {r[0]: r[1:] for r in cells}
    assert rows["heldout_ce"] == ["2.1", "1.7", "2.1"] and rows["perplexity"] == ["8.17", "5.47", "8.17"]
    assert rows["forward_kl"] == ["0.42", "", "0.42"] and rows["jsd"] == ["0.081", "", "0.081"]
    assert rows["length difference mean (student - teacher)"] == ["6.5", "", "n/a"]
    assert rows["EOS rate"] == ["0.5", "0.75", "n/a"]
    assert "no text evaluation" in p.page.inner_text("#sec-text-eval") and "chain" in p.page.inner_text("#sec-text-eval")
    samples = p.page.inner_text("#samples")
    assert "the <i>cat</i>" in samples and "sat down" in samples  # the teacher's continuation, shown literally


def test_report_of_a_real_training_run(tiny_tree, tmp_path, open_page):
    tiny_tree["train"]["steps"] = 2
    run_training(build_config(tiny_tree), show_progress=False)
    run = Path(tiny_tree["out_dir"])
    out = write_report([run], tmp_path / "report.html")
    data = report_data(out.read_text())["runs"][0]
    assert data["name"] == "run" and data["steps"] == 2 and data["params"] > 0
    assert {"loss", "task_ce", "kd"} <= set(data["metrics"]["terms"]) and data["metrics"]["step"] == [1, 2]
    assert data["eval"]["n"] == 8 and data["samples"]
    p = open_page(out)
    check_page(p)
    assert trace_count(p.page, "loss-curves") == len(data["metrics"]["terms"])
    # whatever else training and evaluation wrote is drawn too
    for pid, present in (("alignment", data["alignment"]), ("budget", data["budget"]),
                         ("reliability", (data["eval"].get("calibration") or {}).get("bins"))):
        assert (trace_count(p.page, pid) > 0) == bool(present), pid
    rows = p.page.evaluate(
        "[...document.querySelectorAll('#eval-table tbody tr')].map(r => [...r.children].map(c => c.textContent))")
    rows = {r[0]: r[1:] for r in rows}
    assert rows["n"][0] == "8" and rows["accuracy"][0] != "n/a"
    for key in ("agreement_top1", "perplexity"):  # n/a in an eval.json of the older shape
        assert (rows[key][0] == "n/a") == (data["eval"].get(key.split(".")[0]) is None)
    p.screenshot("report-real-run.png")


def test_not_a_run_directory(tiny_tree, tmp_path):
    run = make_run(tmp_path / "ok", tiny_tree)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DistillError, match=re.escape(f"not a run directory: {empty} (no config.yaml)")):
        write_report([run, empty], tmp_path / "r.html")
    with pytest.raises(DistillError, match="no such directory"):
        write_report([tmp_path / "nope"], tmp_path / "r.html")
    with pytest.raises(DistillError, match="a file, not a directory"):
        write_report([run / "config.yaml"], tmp_path / "r.html")
    with pytest.raises(DistillError, match="no run directories"):
        write_report([], tmp_path / "r.html")
    (empty / "config.yaml").write_text("student: [unclosed\n")
    with pytest.raises(DistillError, match="malformed YAML"):
        write_report([empty], tmp_path / "r.html")
    with pytest.raises(DistillError, match="is a directory"):
        write_report([run], tmp_path)
    assert not (tmp_path / "r.html").exists()


def test_damaged_files_still_render(tiny_tree, tmp_path, open_page):
    run = make_run(tmp_path / "r", tiny_tree)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 13, "loss": 0.')  # a run killed mid-write
    (run / "eval.json").write_text("{not json")
    (run / "budget.json").write_text(json.dumps({"phases": {"student_training": {"seconds": None, "flops": None}}}))
    html = write_report([run], tmp_path / "report.html").read_text()
    data = report_data(html)["runs"][0]
    assert data["metrics"]["step"][-1] == 12 and data["eval"] is None
    assert any("1 malformed line" in n for n in data["notes"])
    assert any("eval.json is unreadable" in n for n in data["notes"])
    assert "no eval.json: r" in html and "no gates configured" not in html
    assert "no calibration.bins" not in html and "nothing to plot" in html  # reliability: the file is the problem
    p = open_page(tmp_path / "report.html")
    check_page(p)  # no console errors from null budget values or the empty sections
    assert trace_count(p.page, "loss-curves") == 3 and trace_count(p.page, "reliability") == 0


def test_names_and_thinning():
    assert run_names([Path("/x/a/run"), Path("/x/b/run"), Path("/x/c")]) == ["a/run", "b/run", "c"]
    assert run_names([Path("/x/a/run"), Path("/x/a/run")]) == ["a/run #1", "a/run #2"]
    recs = [{"step": s, "loss": 1.0 / s, "lr": 0.1, "tokens_per_s": 5.0} for s in range(1, 3 * MAX_POINTS + 2)]
    notes = []
    series = metrics_series(recs, notes)
    assert len(series["step"]) <= MAX_POINTS + 1 and series["step"][0] == 1 and series["step"][-1] == 3 * MAX_POINTS + 1
    assert list(series["terms"]) == ["loss"] and notes
