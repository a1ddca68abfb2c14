"""`distill quantize` and `distill eval --scheme` through the real command: the happy path
writes what it says, and every bad input is one `error:` line with nothing half-written."""

import json
import shutil

import pytest
from fault_helpers import one_line

pytest.importorskip("torchao")


@pytest.fixture
def run(cli, tree, write_yaml):
    """A trained tiny run (no evaluation yet)."""
    result = cli("train", write_yaml(tree), "--no-eval")
    assert result.code == 0, result.err
    return tree["out_dir"]


def test_quantize_then_eval_and_gate_the_quantized_student(cli, run, tmp_path):
    result = cli("quantize", run, "--scheme", "int4", "--group-size", "16")
    assert result.code == 0, result.err
    record = json.loads(result.out)
    assert record["out"].endswith("student-int4") and record["scheme"] == "int4" and record["weights_bytes"] > 0
    budget = json.loads((tmp_path / "run" / "budget.json").read_text())
    assert budget["phases"]["quantization"]["records"] == 1
    config = tmp_path / "gated.yaml"
    config.write_text((tmp_path / "run" / "config.yaml").read_text() + "\ngates:\n  accuracy: '>= 2.0'\n")
    gated = cli("eval", run, "--scheme", "int4", "--config", config, "--gates")
    one_line(gated, 3, r"1 of 1 release gates failed: accuracy")
    written = json.loads((tmp_path / "run" / "eval-int4.json").read_text())
    assert written["model"]["quant"]["scheme"] == "int4" and written["gates"]["passed"] is False
    assert not (tmp_path / "run" / "eval.json").exists()  # the full-precision evaluation is another file


def test_bad_quantize_options_are_one_line(cli, run, tmp_path):
    one_line(cli("quantize", run, "--scheme", "int5"), 1, r"unknown quantization scheme 'int5'; known: int8, int4")
    bad_group = cli("quantize", run, "--scheme", "int4", "--group-size", "24")
    one_line(bad_group, 1, r"q_proj: input size 32 is not a multiple of quant\.group_size 24")
    assert not list((tmp_path / "run").glob("student-*"))


def test_eval_of_a_missing_or_damaged_quantized_student_is_one_line(cli, run, tmp_path):
    one_line(cli("eval", run, "--scheme", "int8"), 1, r"has no quantized student student-int8/: run distill quantize .* --scheme int8")
    assert cli("quantize", run, "--scheme", "int8").code == 0
    folder = tmp_path / "run" / "student-int8"
    weights = folder / "quantized.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    one_line(cli("eval", run, "--scheme", "int8"), 1, r"could not read .*student-int8/quantized\.safetensors")
    assert not (tmp_path / "run" / "eval-int8.json").exists()
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    one_line(cli("quantize", copy, "--scheme", "int4"), 1, r"is already quantized \(quant\.json\)")


def test_training_a_quantized_student_is_refused(cli, run, tree, write_yaml, tmp_path):
    assert cli("quantize", run, "--scheme", "int8").code == 0
    tree["student"] = {"name": str(tmp_path / "run" / "student-int8")}
    tree["out_dir"] = str(tmp_path / "again")
    one_line(cli("train", write_yaml(tree, "again.yaml")), 2, r"student\.name .*student-int8' is a quantized model")
    assert not (tmp_path / "again").exists()
