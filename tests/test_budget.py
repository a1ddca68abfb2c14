"""budget.json: counts add up over resumed runs, unknowns stay unknown, totals replace."""

import json

import pytest

from distill.budget import forward_flops, record_phase
from distill.errors import DistillError


def test_record_phase_adds_replaces_and_keeps_unknowns(tmp_path):
    path = tmp_path / "budget.json"
    record_phase(path, "teacher_generation", add={"seconds": 1.5, "retries": 2}, totals={"tokens": 10})
    tree = record_phase(path, "teacher_generation", add={"seconds": 2.0, "retries": None}, totals={"tokens": 25})
    assert tree == json.loads(path.read_text())
    assert tree["phases"]["teacher_generation"] == {"runs": 2, "seconds": 3.5, "retries": None, "tokens": 25}
    record_phase(path, "student_training", add={"seconds": 4.0})
    assert set(json.loads(path.read_text())["phases"]) == {"teacher_generation", "student_training"}
    assert forward_flops(10, 3) == 60.0 and forward_flops(None, 3) is None


def test_a_broken_budget_file_is_named(tmp_path):
    path = tmp_path / "budget.json"
    path.write_text("{oops")
    with pytest.raises(DistillError, match=r"budget.json:1: budget file is not valid JSON"):
        record_phase(path, "x", add={"seconds": 1.0})
