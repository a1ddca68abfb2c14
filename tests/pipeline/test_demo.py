"""The demo's orchestration with tiny configs: teacher cached by config, two students, table."""

import json

import pytest
from transformers import AutoModelForCausalLM

import distill.pipeline.demo as demo
from distill.config import build_config, read_yaml
from distill.errors import DistillError
from distill.pipeline.demo import packaged_config

from helpers import TINY_STUDENT, TINY_TEACHER


@pytest.mark.parametrize("task", ["grammar", "chain"])
def test_packaged_demo_configs_are_valid_and_students_are_10x_smaller(task):
    teacher = build_config(packaged_config(demo.TASKS[task].teacher_config))
    student = build_config(packaged_config(demo.TASKS[task].student_config))
    assert student.data.source == teacher.data.source and student.data.seed == teacher.data.seed
    assert student.data.n_train <= teacher.data.n_train and student.train.steps > 0  # a transfer set the teacher saw

    def params(c):  # llama, tied embeddings, no biases
        d, L, ff, v = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], 78
        return v * d + L * (4 * d * d + 3 * d * ff + 2 * d) + d

    ratio = params(teacher.student.config) / params(student.student.config)
    assert 8 <= ratio <= 12


@pytest.fixture
def tiny_demo(monkeypatch, tmp_path):
    real = packaged_config

    def tiny(name):
        tree = real(name)
        tree["student"]["config"] = dict(TINY_TEACHER if name.endswith("teacher") else TINY_STUDENT)
        tree["data"].update(n_train=64, n_test=8)
        tree["train"].update(steps=3, micro_batch_size=8, warmup_steps=1)
        tree["eval"].update(max_new_tokens=6)
        return tree

    monkeypatch.setattr(demo, "packaged_config", tiny)
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    return tmp_path


@pytest.mark.parametrize("task", ["grammar", "chain"])
def test_demo_runs_caches_teacher_and_prints_table(tiny_demo, capsys, task):
    out = tiny_demo / "demo"
    summary = demo.run_demo(out, seed=1, task_name=task)
    printed = capsys.readouterr().out
    for name in ("teacher", "student, logit KD", "student, labels only"):
        assert name in printed and name in summary["runs"]
    assert summary["gain"].startswith("gain: logit KD") and "gain: logit KD" in printed
    kd_value, labels_value = (summary["runs"][n]["headline"] for n in ("student, logit KD", "student, labels only"))
    shown = (lambda v: f"{v:.4f}") if task == "grammar" else (lambda v: f"{v:.1%}")
    assert f"{shown(kd_value)} vs {shown(labels_value)}" in summary["gain"]
    assert json.loads((out / "demo.json").read_text()) == summary
    page = (out / "report.html").read_text()
    assert summary["report"] == str(out / "report.html") and "student-labels" in page and "Plotly" in page
    kd_dir, lab_dir = out / "student-kd", out / "student-labels"
    packaged_alpha = packaged_config(demo.TASKS[task].student_config)["objective"]["alpha"]
    assert read_yaml(kd_dir / "config.yaml")["objective"]["alpha"] == packaged_alpha > 0
    assert read_yaml(lab_dir / "config.yaml")["teacher"] is None
    AutoModelForCausalLM.from_pretrained(kd_dir / "student")
    teachers = list((tiny_demo / "cache" / "teachers").iterdir())
    assert len(teachers) == 1 and not teachers[0].name.endswith(".partial")
    stamp = (teachers[0] / "student" / "model.safetensors").stat().st_mtime_ns

    # A second demo reuses the cached teacher and replaces its own student runs.
    again = demo.run_demo(out, seed=1, task_name=task)
    assert (teachers[0] / "student" / "model.safetensors").stat().st_mtime_ns == stamp
    assert again["runs"]["teacher"] == summary["runs"]["teacher"]
    assert again["runs"]["student, logit KD"]["headline"] == summary["runs"]["student, logit KD"]["headline"]


def test_demo_refuses_to_clear_a_folder_that_is_not_a_run(tiny_demo):
    out = tiny_demo / "demo"
    (out / "student-kd").mkdir(parents=True)
    (out / "student-kd" / "notes.txt").write_text("mine")
    with pytest.raises(DistillError, match="is not a run directory"):
        demo.run_demo(out)
    assert (out / "student-kd" / "notes.txt").read_text() == "mine"
