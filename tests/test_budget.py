"""budget.json: counts add up over resumed runs, unknowns stay unknown, totals replace; a
run's file holds every phase that made its student, with totals and shares."""

import copy
import json
from pathlib import Path

import pytest

from distill.budget import forward_flops, record_phase
from distill.config import build_config
from distill.errors import DistillError
from distill.models.loading import count_parameters
from distill.pipeline.runner import run_training
from distill.training.loop import train


def test_record_phase_adds_replaces_and_keeps_unknowns(tmp_path):
    path = tmp_path / "budget.json"
    record_phase(path, "teacher_generation", add={"seconds": 1.5, "retries": 2}, totals={"tokens": 10})
    tree = record_phase(path, "teacher_generation", add={"seconds": 2.0, "retries": None}, totals={"tokens": 25})
    assert tree == json.loads(path.read_text())
    shares = {"share_seconds": 1.0, "share_flops": None}  # the only phase; its FLOPs unknown
    assert tree["phases"]["teacher_generation"] == {"records": 2, "seconds": 3.5, "retries": None, "tokens": 25, **shares}
    tree = record_phase(path, "student_training", add={"seconds": 4.0, "flops": 8.0, "tokens": 5})
    assert set(tree["phases"]) == {"teacher_generation", "student_training"}
    assert tree["total"] == {"seconds": 7.5, "flops": None, "tokens": 30}  # one phase's FLOPs are unknown
    assert tree["phases"]["student_training"]["share_seconds"] == pytest.approx(4.0 / 7.5)
    assert tree["phases"]["student_training"]["share_flops"] is None
    assert forward_flops(10, 3) == 60.0 and forward_flops(None, 3) is None


def test_a_broken_budget_file_is_named(tmp_path):
    path = tmp_path / "budget.json"
    path.write_text("{oops")
    with pytest.raises(DistillError, match=r"budget.json:1: budget file is not valid JSON"):
        record_phase(path, "x", add={"seconds": 1.0})


def _budget(run_dir) -> dict:
    return json.loads((Path(run_dir) / "budget.json").read_text())


def test_a_run_records_every_phase_with_shares(tiny_tree):
    run_training(build_config(tiny_tree), show_progress=False)
    tree, summary = _budget(tiny_tree["out_dir"]), json.loads((Path(tiny_tree["out_dir"]) / "train_summary.json").read_text())
    phases = tree["phases"]
    assert set(phases) == {"student_training", "teacher_scoring", "evaluation"}
    for name, p in phases.items():
        assert p["tokens"] > 0 and p["flops"] > 0 and p["seconds"] > 0 and p["records"] == 1, name
    train_p, teacher_p = phases["student_training"], phases["teacher_scoring"]
    assert train_p["tokens"] == teacher_p["tokens"] == summary["tokens"]
    assert train_p["flops"] == 6 * summary["params"] * summary["tokens"]
    from distill.models.build import build_models

    teacher = build_models(build_config(tiny_tree))[1]
    assert teacher_p["flops"] == 2 * count_parameters(teacher) * summary["tokens"]
    assert 0.5 * summary["wall_s"] < train_p["seconds"] + teacher_p["seconds"] <= summary["wall_s"]  # the loop, split
    for key in ("seconds", "flops", "tokens"):
        assert tree["total"][key] == pytest.approx(sum(p[key] for p in phases.values()))
    for key in ("share_seconds", "share_flops"):
        assert sum(p[key] for p in phases.values()) == pytest.approx(1.0)


def test_resume_adds_to_the_training_phases(tiny_tree):
    tree = copy.deepcopy(tiny_tree)
    tree["train"]["steps"] = 2
    first = train(build_config(tree), show_progress=False)
    tree["train"]["steps"] = 4
    second = train(build_config(tree), resume=True, show_progress=False)
    phases = _budget(tree["out_dir"])["phases"]
    assert second["resumed_from"] == 2
    assert second["tokens"] == first["tokens"] + second["segment"]["tokens"]  # the summary counts both segments
    for name in ("student_training", "teacher_scoring"):
        assert phases[name]["records"] == 2
        assert phases[name]["tokens"] == second["tokens"]
    assert phases["student_training"]["flops"] == 6 * first["params"] * second["tokens"]


def test_a_crash_loses_no_recorded_work(tiny_tree, monkeypatch):
    from helpers import crash_at

    tree = copy.deepcopy(tiny_tree)
    tree["train"].update(steps=4, checkpoint_every=2)
    whole = copy.deepcopy(tree)
    whole["out_dir"] = tree["out_dir"] + "-whole"
    train(build_config(whole), show_progress=False)
    crash_at(monkeypatch, 3, lambda: train(build_config(tree), show_progress=False))  # after checkpoint 2
    train(build_config(tree), resume=True, show_progress=False)
    resumed, uninterrupted = _budget(tree["out_dir"])["phases"], _budget(whole["out_dir"])["phases"]
    for name in ("student_training", "teacher_scoring"):
        assert resumed[name]["tokens"] == uninterrupted[name]["tokens"]  # steps 1-2 before, 3-4 after
        assert resumed[name]["records"] == uninterrupted[name]["records"] == 2


def test_cache_and_generation_phases_are_copied(tiny_tree, tmp_path):
    from distill.pipeline.cache import write_teacher_cache

    gen_dir = tmp_path / "generated"  # a `distill generate` folder: its rows and budget
    gen_dir.mkdir()
    rows = [{"prompt": f"Q:{i}+1=", "completion": f"{i}+1={(i + 1) % 10}#{(i + 1) % 10}"} for i in range(10)]
    (gen_dir / "curated.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    generated = {"tokens": 300, "flops": 6.0e5, "seconds": 2.5, "rows": 10}
    record_phase(gen_dir / "budget.json", "teacher_generation", add={"seconds": 2.5}, totals=generated)
    tree = copy.deepcopy(tiny_tree)
    tree["data"] = {"source": str(gen_dir / "curated.jsonl"), "n_test": 8}
    tree["train"]["steps"] = 2
    cache = tmp_path / "cache"
    write_teacher_cache(build_config(tree), cache, 4, "float32", 4, 4, show_progress=False)
    cached = _budget(cache)["phases"]["teacher_caching"]
    n_tokens = sum(len(r["prompt"]) + len(r["completion"]) + 1 for r in rows)  # one token a character, + EOS
    assert cached["tokens"] == n_tokens and cached["seconds"] > 0 and cached["records"] == 3  # a record per shard
    tree["teacher_cache"] = str(cache)
    train(build_config(tree), show_progress=False)
    phases = _budget(tree["out_dir"])["phases"]
    assert set(phases) == {"teacher_generation", "teacher_caching", "student_training"}
    drop = ("share_seconds", "share_flops")
    assert {k: v for k, v in phases["teacher_caching"].items() if k not in drop} == {k: v for k, v in cached.items() if k not in drop}
    assert {k: phases["teacher_generation"][k] for k in generated} == generated
