"""Release gates: the expression grammar, teacher-relative thresholds, config errors, and
`distill eval --gates` (table on stderr, exit code 3 on a failure)."""

import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from distill.config import build_config
from distill.errors import ConfigError
from distill.eval.gates import GateFailure, check_gates, gates_table, metric_value, parse_gate
from distill.pipeline.runner import run_eval, run_training
from distill.training.loop import train

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "op, at, below, above",  # verdicts for a value equal to, below and above the threshold
    [(">=", True, False, True), ("<=", True, True, False), (">", False, False, True), ("<", False, True, False), ("==", True, False, False)],
)
def test_every_operator(op, at, below, above):
    gate = parse_gate("ece", f"{op} 0.5")
    assert (gate.op, gate.factor, gate.relative) == (op, 0.5, False)
    for value, verdict in ((0.5, at), (0.25, below), (0.75, above)):
        report = check_gates({"ece": f"{op} 0.5"}, {"calibration": {"ece": value}})
        assert report["results"] == [{"metric": "ece", "expr": f"{op} 0.5", "value": value, "threshold": 0.5, "passed": verdict}]
        assert report["passed"] is verdict


@pytest.mark.parametrize("expr, factor", [(">=1e-3", 1e-3), ("<= .5", 0.5), ("> +2", 2.0), ("<  -1.5E1 ", -15.0)])
def test_number_spellings(expr, factor):
    assert parse_gate("tvd", expr).factor == factor


def test_relative_to_teacher():
    result = {"accuracy": 0.5, "heldout_ce": 1.0, "perplexity": 2.0, "teacher": {"accuracy": 0.6, "heldout_ce": 0.8, "perplexity": 2.5}}
    gates = {"accuracy": ">= 0.9 * teacher", "heldout_ce": "<= 1.2*teacher", "perplexity": "< teacher"}
    report = check_gates(gates, result)
    accuracy, ce, ppl = report["results"]
    assert accuracy["threshold"] == pytest.approx(0.9 * 0.6) and accuracy["passed"] is False  # 0.5 < 0.54
    assert ce["threshold"] == pytest.approx(1.2 * 0.8) and ce["passed"] is False  # 1.0 > 0.96
    assert ppl["threshold"] == 2.5 and ppl["passed"] is True
    assert report["passed"] is False
    result["accuracy"], result["heldout_ce"] = 0.55, 0.9
    assert check_gates(gates, result)["passed"] is True


def test_non_finite_values_never_pass():
    nan_run = {"heldout_ce": float("nan"), "perplexity": float("nan"), "teacher": {"perplexity": float("inf")}}
    report = check_gates({"perplexity": "<= 1.2 * teacher", "heldout_ce": "<= 5"}, nan_run)
    assert not report["passed"] and all("not a finite comparison" in r["reason"] for r in report["results"])


def test_missing_metrics_fail_with_a_reason():
    report = check_gates({"accuracy": ">= 0.9 * teacher", "agreement_top1": ">= 0.5", "ece": "<= 0.1"}, {"accuracy": 0.9})
    no_teacher, no_agreement, no_ece = report["results"]
    assert not report["passed"] and not any(r["passed"] for r in report["results"])
    assert no_teacher["threshold"] is None and "no teacher" in no_teacher["reason"]
    assert no_agreement["value"] is None and "agreement_top1 was not measured" in no_agreement["reason"]
    assert "ece was not measured" in no_ece["reason"]


def test_metric_names_read_eval_json_sections():
    result = {"length": {"mean_ratio": 1.1, "p90_ratio": 1.3}, "divergences": {"jsd": 0.2}, "format_adherence": None}
    assert metric_value(result, "length_drift_mean") == 1.1
    assert metric_value(result, "length_drift_p90") == 1.3
    assert metric_value(result, "jsd") == 0.2
    assert metric_value(result, "tvd") is None and metric_value(result, "format_adherence") is None


@pytest.mark.parametrize(
    "gates, message",
    [
        ({"ece": "=> 0.1"}, r"'gates.ece': malformed gate '=> 0.1'"),
        ({"accuracy": ">= 0.9 * teacher * 2"}, r"'gates.accuracy': malformed gate"),
        ({"accuracy": "about 0.9"}, r"'gates.accuracy': malformed gate"),
        ({"accuracy": ">="}, r"'gates.accuracy': malformed gate"),
        ({"ece": "<= teacher"}, r"'gates.ece': gate '<= teacher': 'teacher' is only known for accuracy"),
        ({"acuracy": ">= 0.9"}, r"unknown key 'gates.acuracy' \(did you mean 'gates.accuracy'\?\)"),
        ({"ece": 0.05}, r"'gates.ece': expected a valid string, got 0.05"),
    ],
)
def test_malformed_gates_are_config_errors_naming_the_key(tiny_tree, gates, message):
    with pytest.raises(ConfigError, match=message):
        build_config({**tiny_tree, "gates": gates})


def test_gates_survive_the_saved_config(tiny_tree):
    cfg = build_config({**tiny_tree, "gates": {"ece": "<= 0.05", "accuracy": ">= 0.9 * teacher"}})
    assert cfg.gates.expressions() == {"accuracy": ">= 0.9 * teacher", "ece": "<= 0.05"}
    dumped = cfg.model_dump(mode="json")
    assert dumped["gates"] == {"accuracy": ">= 0.9 * teacher", "ece": "<= 0.05"}  # unset gates are not written
    assert build_config(dumped).gates == cfg.gates
    assert build_config(tiny_tree).gates.expressions() == {}


def test_table_shows_each_gate():
    report = check_gates({"ece": "<= 0.05", "accuracy": ">= teacher"}, {"calibration": {"ece": 0.02}, "accuracy": 0.4})
    out = io.StringIO()
    Console(file=out, width=160).print(gates_table(report))
    text = out.getvalue()
    assert "release gates: 1/2 passed" in text
    ece_line = next(line for line in text.splitlines() if "ece" in line)
    assert "<= 0.05" in ece_line and "0.02" in ece_line and "pass" in ece_line
    accuracy_line = next(line for line in text.splitlines() if "accuracy" in line)
    assert "FAIL" in accuracy_line and "no teacher" in accuracy_line


def _cli_eval(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "distill", "eval", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
    )


def test_distill_eval_gates_exit_codes(tiny_tree, tmp_path):
    tree = copy.deepcopy(tiny_tree)
    tree["train"]["steps"] = 2
    tree["gates"] = {"perplexity": "<= 1e9", "length_drift_p90": ">= 0", "accuracy": ">= 0 * teacher"}
    run = Path(tree["out_dir"])
    train(build_config(tree), show_progress=False)

    ok = _cli_eval(str(run), "--gates")
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout)
    assert result["gates"]["passed"] is True and len(result["gates"]["results"]) == 3
    assert "release gates: 3/3 passed" in ok.stderr
    assert json.loads((run / "eval.json").read_text())["gates"] == result["gates"]

    strict = copy.deepcopy(tree)
    strict["gates"] = {"perplexity": "< 1", "length_drift_p90": ">= 0"}  # a perplexity below 1 is impossible
    strict_path = tmp_path / "strict.yaml"
    strict_path.write_text(yaml.safe_dump(strict))
    failed = _cli_eval(str(run), "--config", str(strict_path), "--gates")
    assert failed.returncode == GateFailure.exit_code == 3
    assert json.loads(failed.stdout)["gates"]["passed"] is False  # eval.json still on stdout
    assert "release gates: 1/2 passed" in failed.stderr and "FAIL" in failed.stderr
    assert "error: 1 of 2 release gates failed: perplexity" in failed.stderr


def test_gates_flag_without_gates_is_a_config_error_and_gates_are_recorded_anyway(tiny_tree):
    tree = copy.deepcopy(tiny_tree)
    tree["train"]["steps"] = 1
    tree["gates"] = {"ece": "<= 1"}
    run_training(build_config(tree), show_progress=False)
    recorded = json.loads((Path(tree["out_dir"]) / "eval.json").read_text())["gates"]
    assert recorded["passed"] is True and recorded["results"][0]["metric"] == "ece"  # no --gates needed
    bare = copy.deepcopy(tree)
    del bare["gates"]
    (Path(tree["out_dir"]) / "config.yaml").write_text(yaml.safe_dump(bare))
    with pytest.raises(ConfigError, match="--gates, but the config sets no 'gates'"):
        run_eval(tree["out_dir"], gates=True)
