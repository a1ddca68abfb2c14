"""The method ladder's pure parts (benchmarks/methods.py): configs, table, results file. No training."""

import json
import math
import os
from pathlib import Path

import pytest
import yaml

from distill.config import build_config, dump_config

from helpers import load_benchmark

methods = load_benchmark("methods")

ALL = ["labels", "fkl", "rkl", "jsd", "fkl_feature", "on_policy_0.5", "on_policy_1", "multitask", "answer_only"]
# method -> (alpha or None for the base's, divergence or None for any, features.weight, lmbda, rationale.mode)
EXPECTED = {
    "labels": (0.0, None, 0.0, 0.0, "completion"),
    "fkl": (None, "forward_kl", 0.0, 0.0, "completion"),
    "rkl": (None, "reverse_kl", 0.0, 0.0, "completion"),
    "jsd": (None, "jsd", 0.0, 0.0, "completion"),
    "fkl_feature": (None, "forward_kl", 1.0, 0.0, "completion"),
    "on_policy_0.5": (None, "jsd", 0.0, 0.5, "completion"),
    "on_policy_1": (None, "jsd", 0.0, 1.0, "completion"),
    "multitask": (0.0, None, 0.0, 0.0, "multitask"),
    "answer_only": (0.0, None, 0.0, 0.0, "answer_only"),
}


@pytest.fixture
def grammar_yaml(tiny_tree, tmp_path) -> Path:
    tiny_tree["data"] = {"source": "builtin:grammar", "seed": 7, "n_train": 64, "n_test": 8}
    tiny_tree["objective"]["alpha"] = 0.3
    tiny_tree["features"] = {"weight": 0.5}  # the ladder resets it for every method but fkl_feature
    path = tmp_path / "grammar_student.yaml"
    path.write_text(yaml.safe_dump(tiny_tree))
    return path


def test_methods_per_task():
    assert methods.task_methods("chain") == ALL
    assert methods.task_methods("grammar") == ALL[:7]
    assert methods.task_methods("chain", ["rkl"]) == ["labels", "fkl", "rkl"]  # the baselines always run
    with pytest.raises(SystemExit, match="applies to chain only"):
        methods.task_methods("grammar", ["multitask"])
    with pytest.raises(SystemExit, match="unknown method 'kd'"):
        methods.task_methods("chain", ["kd"])
    for name in ALL:  # the docstring's table documents every method
        assert f"\n| {name} | " in methods.__doc__


@pytest.mark.parametrize("task", ["chain", "grammar"])
def test_every_method_builds_the_intended_config(task, grammar_yaml, tmp_path):
    base = methods.base_tree(task, grammar_yaml if task == "grammar" else None)
    base_cfg = build_config({**base, "teacher": {"name": "t"}})
    dumps = {}
    for m in methods.task_methods(task):
        cfg = build_config(methods.method_tree(base, m, 3, "T/student", tmp_path / m, steps=7), source=m)
        alpha, divergence, weight, lmbda, mode = EXPECTED[m]
        assert cfg.objective.alpha == (base_cfg.objective.alpha if alpha is None else alpha)
        assert (cfg.objective.alpha > 0) == (m not in ("labels", "multitask", "answer_only"))
        assert divergence is None or cfg.objective.divergence == divergence
        assert (cfg.features.weight, cfg.on_policy.lmbda, cfg.rationale.mode) == (weight, lmbda, mode)
        assert cfg.objective.jsd_beta == 0.5 and cfg.teacher_cache is None and cfg.teacher.name == "T/student"
        assert (cfg.train.seed, cfg.train.steps, cfg.out_dir) == (3, 7, str(tmp_path / m))
        # the same data for every method and seed (packing null resolves to off for on-policy and
        # multitask runs; the built-in tasks never pack, so that is the same data)
        assert cfg.data.model_dump(exclude={"packing"}) == base_cfg.data.model_dump(exclude={"packing"})
        assert not cfg.data.packing and not base_cfg.data.packing
        assert cfg.objective.temperature == base_cfg.objective.temperature
        dumps[m] = cfg.model_dump(mode="json")
        dumps[m]["data"].pop("packing")  # null or the false it resolves to: never packed (above)
    # paired: besides out_dir, two methods differ only in the sections the ladder varies
    varied = {"objective", "features", "on_policy", "rationale", "out_dir"}
    for m, d in dumps.items():
        assert {k for k in d if d[k] != dumps["labels"][k]} <= varied, m
        assert d["train"] == dumps["labels"]["train"] and d["student"] == dumps["labels"]["student"]


def test_seed_sets_train_seed_only(tmp_path):
    base = methods.base_tree("chain", None)
    a, b = (build_config(methods.method_tree(base, "fkl", s, "T", tmp_path / "r")) for s in (0, 4))
    assert (a.train.seed, b.train.seed) == (0, 4)
    assert a.data.seed == b.data.seed == (base.get("data", {}).get("seed") or 0)
    assert a.train.steps == b.train.steps == base["train"]["steps"]  # no --steps: the base's


def test_base_config_errors(tmp_path, monkeypatch, grammar_yaml):
    monkeypatch.setattr(methods, "packaged_or_none", lambda name: None)
    with pytest.raises(SystemExit, match="no packaged grammar_student config; pass --student-config"):
        methods.base_tree("grammar", None)
    with pytest.raises(SystemExit, match="data.source is 'builtin:grammar'"):
        methods.base_tree("chain", grammar_yaml)
    tree = yaml.safe_load(grammar_yaml.read_text())
    tree["objective"]["alpha"] = 0.0
    zero = tmp_path / "zero.yaml"
    zero.write_text(yaml.safe_dump(tree))
    with pytest.raises(SystemExit, match="alpha is 0"):
        methods.base_tree("grammar", zero)


def test_finished_runs_are_reused_and_other_configs_refused(tmp_path):
    tree = methods.method_tree(methods.base_tree("chain", None), "labels", 0, "T", tmp_path / "run")
    cfg = build_config(tree)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(cfg))
    (run / "eval.json").write_text(json.dumps({"accuracy": 0.5}))
    (run / "train_summary.json").write_text(json.dumps({"wall_s": 12.0}))
    assert methods.run_once(cfg) == {"eval": {"accuracy": 0.5}, "train_summary": {"wall_s": 12.0}}
    other = build_config({**tree, "train": {**tree["train"], "steps": 3}})
    with pytest.raises(SystemExit, match="holds a run of another config"):
        methods.run_once(other)


def fake(values: list[float], ce: float = 1.0, wall: float = 10.0) -> dict[int, dict]:
    return {s: {"metric": v, "heldout_ce": ce, "wall_s": wall} for s, v in enumerate(values)}


def test_chain_table_with_a_null_a_loss_and_a_gain():
    results = {
        "labels": fake([0.50, 0.60, 0.55, 0.52, 0.58], wall=20.0),
        "fkl": fake([0.70, 0.80, 0.75, 0.72, 0.78]),  # +0.20 on every seed
        "rkl": fake([0.70, 0.81, 0.74, 0.73, 0.77]),  # about fkl: a null against it
        "on_policy_1": fake([0.40, 0.52, 0.44, 0.41, 0.49]),  # a loss against both
        "multitask": fake([0.60, 0.70, 0.65, 0.62, 0.68]),
        "answer_only": fake([0.60, 0.70, 0.65, 0.62, 0.68]),  # identical: zero-width interval
    }
    lines = methods.format_table("chain", results, [0, 1, 2, 3, 4])
    text = "\n".join(lines)
    assert lines[0].startswith("| method | accuracy per seed (0, 1, 2, 3, 4) | mean ± sd | vs labels [95% CI] | vs fkl")
    assert "| labels | 0.500, 0.600, 0.550, 0.520, 0.580 | 0.550 ± 0.041 | — | -0.200 [-0.200, -0.200] | 1.000 ± 0.000 | 20.0 |" in text
    assert "| fkl | 0.700, 0.800, 0.750, 0.720, 0.780 | 0.750 ± 0.041 | +0.200 [+0.200, +0.200] | — |" in text
    assert "- labels: vs fkl: worse (-0.200 [-0.200, -0.200])" in text
    assert "- fkl: vs labels: better (+0.200 [+0.200, +0.200])" in text
    assert "- rkl: vs labels: better" in text and "vs fkl: no detectable difference (+0.000 [" in text
    assert "- on_policy_1: vs labels: worse" in text and "vs fkl: worse" in text
    assert "- multitask vs answer_only: no detectable difference (+0.000 [+0.000, +0.000])" in text
    assert "(accuracy: higher is better)" in text


def test_grammar_lower_is_better_and_a_diverged_run_is_not_a_null():
    results = {
        "labels": fake([0.100, 0.110, 0.105]),
        "fkl": fake([0.080, 0.092, 0.083]),  # lower KL: better
        "jsd": fake([0.080, math.nan, 0.083]),  # a run without a value
    }
    text = "\n".join(methods.format_table("grammar", results, [0, 1, 2]))
    assert "| method | truth.kl per seed (0, 1, 2) |" in text
    assert "- fkl: vs labels: better (-0.0200 [" in text
    assert "- jsd: vs labels: not measured (a run has no value)" in text
    assert "0.0800, nan, 0.0830" in text
    assert "(truth.kl: lower is better)" in text


def test_one_seed_gives_no_interval():
    text = "\n".join(methods.format_table("chain", {"labels": fake([0.5]), "fkl": fake([0.7])}, [0]))
    assert "| labels | 0.500 | 0.500 ± n/a | — | — |" in text and "- fkl: baseline" in text


def test_metric_row_reads_the_task_metric():
    ev = {"accuracy": 0.9, "heldout_ce": 0.3, "truth": {"kl": 0.05}}
    assert methods.metric_row("chain", ev, {"wall_s": 5}) == {"metric": 0.9, "heldout_ce": 0.3, "wall_s": 5.0}
    assert methods.metric_row("grammar", ev, {"wall_s": 5})["metric"] == 0.05
    assert math.isnan(methods.metric_row("grammar", {"accuracy": 0.1}, {})["metric"])


def test_results_section_is_appended_then_replaced(tmp_path):
    path = tmp_path / "docs" / "results.md"
    head = "## Method ladder: chain"
    methods.write_section(path, head, [head, "", "first", ""])
    assert path.read_text() == f"{head}\n\nfirst\n"
    path.write_text("# Measured results\n\n## The demo\n\ndemo text\n\n" + f"{head}\n\nold\n\n### sub\n\nold sub\n\n## Later\n\nlater\n")
    methods.write_section(path, head, [head, "", "new", ""])
    assert path.read_text() == f"# Measured results\n\n## The demo\n\ndemo text\n\n{head}\n\nnew\n\n## Later\n\nlater\n"
    methods.write_section(path, head, [head, "", "new", ""])  # idempotent
    assert path.read_text().count(head) == 1 and "old" not in path.read_text()
    methods.write_section(path, "## Method ladder: grammar", ["## Method ladder: grammar", "", "g"])
    assert path.read_text().endswith("## Later\n\nlater\n\n## Method ladder: grammar\n\ng\n")
    methods.write_section(path, "## Method ladder: grammar", ["## Method ladder: grammar", "", "g2", ""])
    assert path.read_text().endswith("later\n\n## Method ladder: grammar\n\ng2\n") and "\ng\n" not in path.read_text()


def test_section_header_states_machine_command_and_date(monkeypatch):
    monkeypatch.setattr(methods.sys, "argv", ["benchmarks/methods.py", "--task", "chain", "--seeds", "0", "1"])
    lines = methods.section("chain", ["| table |"], ["- Teacher: t"])
    assert lines[0] == "## Method ladder: chain"
    assert lines[2].startswith("- Machine: ") and "CPUs (nproc), torch " in lines[2]
    assert lines[3] == "- Command: `python benchmarks/methods.py --task chain --seeds 0 1`"
    assert lines[4].startswith("- Date: 20") and lines[4].endswith(" UTC")
    assert "| table |" in lines


def test_a_run_another_process_trains_is_never_cleared(tmp_path):
    """Two ladders on one folder: the second must not delete the run the first is training."""
    import fcntl

    run = tmp_path / "fkl-seed4"
    run.mkdir()
    (run / "config.yaml").write_text("out_dir: x\n")
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the other ladder's training process
    try:
        with pytest.raises(SystemExit, match="in use by another distill process"):
            methods.fresh_run_dir(run)
        assert (run / "config.yaml").exists()
    finally:
        os.close(fd)
    methods.fresh_run_dir(run)  # unfinished and unlocked: cleared for a fresh start
    assert not run.exists()
