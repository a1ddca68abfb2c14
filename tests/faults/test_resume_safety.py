"""Run folders and resume (findings 5, 6, 7, 14 and the run-folder lock): a fresh run never
appends to another run's logs; resume falls back to the newest intact checkpoint and says
so in one line; a resume may extend a run but not change what it is; train_summary.json
counts every segment; two processes never train into one folder."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fault_helpers import one_line

from distill.config import build_config
from distill.training.loop import train

from helpers import crash_at, read_metrics, student_weights


def _train(tree: dict, resume: bool = False) -> dict:
    return train(build_config(tree), resume=resume, show_progress=False)


def _same_run(a: Path, b: Path) -> None:
    """Two run folders hold the same run: every metrics record and the exported weights."""
    ma, mb = read_metrics(a), read_metrics(b)
    assert [m["step"] for m in mb] == [m["step"] for m in ma]
    assert [m["loss"] for m in mb] == pytest.approx([m["loss"] for m in ma], abs=1e-6, rel=0)
    wa, wb = student_weights(a), student_weights(b)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The reference: the `tree` fixture's run (6 steps, checkpoints every 2), never stopped."""
    from helpers import TINY_STUDENT, TINY_TEACHER

    out = tmp_path_factory.mktemp("full") / "run"
    _train({
        "student": {"config": TINY_STUDENT, "tokenizer": "builtin"}, "teacher": {"config": TINY_TEACHER, "tokenizer": "builtin"},
        "data": {"n_train": 32, "n_test": 4}, "eval": {"max_new_tokens": 2, "batch_size": 4}, "out_dir": str(out),
        "train": {"steps": 6, "micro_batch_size": 4, "warmup_steps": 1, "checkpoint_every": 2},
    })  # fmt: skip
    return out


def test_a_rerun_of_a_run_killed_before_its_first_checkpoint_never_appends(cli, tree, write_yaml, monkeypatch):
    """Finding 5: the rerun used to append to the old logs (80 rows for a 60-step run). Now a
    fresh run is refused with one line, and --resume starts the run over from step 0."""
    tree["train"]["checkpoint_every"] = 0  # the only checkpoint: the last step
    config = write_yaml(tree)
    crash_at(monkeypatch, 2, lambda: _train(tree))
    run = Path(tree["out_dir"])
    before = (run / "metrics.jsonl").read_text()
    assert len(before.splitlines()) == 2 and not (run / "checkpoints").exists()

    one_line(cli("train", config, "--no-eval"), 1, rf"{run} already holds a run \(metrics.jsonl, alignment.jsonl\); resume it")
    assert (run / "metrics.jsonl").read_text() == before

    result = cli("train", "--resume", run, "--no-eval")
    assert result.code == 0, result.err
    assert f"{run}: no checkpoint yet; the run starts over from step 0" in result.err
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4]
    probes = [json.loads(line)["step"] for line in (run / "alignment.jsonl").read_text().splitlines()]
    assert probes == [0, 4]  # the killed run's step-0 probe is not kept twice


def _damage(kind: str, ckpt: Path) -> None:
    if kind == "truncated model":
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif kind in ("garbled optimizer state", "garbled optimizer tensors"):  # the size state.json recorded, garbled
        name = "optimizer.json" if kind == "garbled optimizer state" else "optimizer.safetensors"
        size = (ckpt / name).stat().st_size
        (ckpt / name).write_bytes(b'{"param_groups": [' + b"\xff" * (size - 18))
    elif kind == "missing state.json":
        (ckpt / "state.json").unlink()
    elif kind == "missing rng":
        (ckpt / "rng-0.safetensors").unlink()


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        ("truncated model", r"model.safetensors is \d+ bytes, state.json says \d+"),
        ("garbled optimizer state", r"optimizer.json: checkpoint file is not UTF-8 text"),
        ("garbled optimizer tensors", r"optimizer.safetensors: Error while deserializing header"),
        ("missing state.json", r"checkpoint state not found"),
        ("missing rng", r"rng-0.safetensors is missing"),
    ],
)
def test_a_damaged_latest_checkpoint_falls_back_to_the_intact_one(tree, monkeypatch, capsys, uninterrupted, kind, why):
    """Finding 6: a damaged newest checkpoint crashed --resume with a traceback although an
    intact one was kept. Now resume names it in one line and continues from the one before,
    ending exactly where an uninterrupted run ends."""
    tree["train"]["steps"] = 6
    crash_at(monkeypatch, 5, lambda: _train(tree))  # checkpoints at 2 and 4
    run = Path(tree["out_dir"])
    _damage(kind, run / "checkpoints" / "step-000004")
    capsys.readouterr()
    _train(tree, resume=True)
    said = [line for line in capsys.readouterr().err.splitlines() if "damaged checkpoint" in line]
    assert len(said) == 1
    assert said[0].startswith(f"{run}: damaged checkpoint step-000004 (") and said[0].endswith("resuming from step-000002")
    assert re.search(why, said[0]), said[0]
    _same_run(uninterrupted, run)


def test_no_intact_checkpoint_is_one_line(cli, tree, monkeypatch):
    crash_at(monkeypatch, 3, lambda: _train(tree))  # one checkpoint, at 2
    run = Path(tree["out_dir"])
    _damage("truncated model", run / "checkpoints" / "step-000002")
    one_line(cli("train", "--resume", run), 1, rf"{run}: no intact checkpoint to resume from \(step-000002: model.safetensors is")


def test_a_resume_refuses_identity_changes_and_allows_extensions(cli, tree, write_yaml):
    """Finding 7: --resume applied any override mid-run and rewrote config.yaml (another data
    seed, temperature, micro-batch size; a new model shape ended in a state_dict traceback)."""
    result = cli("train", write_yaml(tree), "--no-eval")
    assert result.code == 0, result.err
    run = Path(tree["out_dir"])
    config = (run / "config.yaml").read_text()
    line = one_line(
        cli("train", "--resume", run, "data.seed=1", "objective.temperature=3", "train.micro_batch_size=2"),
        2,
        rf"{run}/config.yaml: a resume continues this run, but the config changes ",
    )
    for change in ("data.seed (0 -> 1)", "objective.temperature (2.0 -> 3.0)", "train.micro_batch_size (4 -> 2)"):
        assert change in line
    one_line(cli("train", "--resume", run, "student.config.hidden_size=64"), 2, r"student.config.hidden_size \(32 -> 64\)")
    one_line(cli("train", "--resume", run, "teacher=null", "objective.alpha=0"), 2, r"objective.alpha .*teacher")
    assert (run / "config.yaml").read_text() == config  # the run's record is untouched

    result = cli("train", "--resume", run, "train.steps=6", "train.checkpoint_every=3", "eval.max_new_tokens=3", "--no-eval")
    assert result.code == 0, result.err
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    saved = build_config(__import__("yaml").safe_load((run / "config.yaml").read_text()))
    assert (saved.train.steps, saved.train.checkpoint_every, saved.eval.max_new_tokens) == (6, 3, 3)


def test_train_summary_counts_every_segment(tree, monkeypatch, uninterrupted):
    """Finding 14: a resumed run's summary counted its last segment only, and a resume of a
    finished run rewrote tokens as 0."""
    whole = json.loads((uninterrupted / "train_summary.json").read_text())
    tree["train"]["steps"] = 6
    crash_at(monkeypatch, 5, lambda: _train(tree))
    resumed = _train(tree, resume=True)
    assert resumed["resumed_from"] == 4 and resumed["tokens"] == whole["tokens"]
    assert 0 < resumed["segment"]["tokens"] < resumed["tokens"]
    again = _train(tree, resume=True)  # the run is finished: nothing to do
    assert again["tokens"] == whole["tokens"] and again["segment"]["tokens"] == 0
    assert json.loads((Path(tree["out_dir"]) / "train_summary.json").read_text())["tokens"] == whole["tokens"]


LOCK_HOLDER = """
import sys, time
from distill.training.resume import lock_run_dir
lock_run_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def test_two_runs_never_share_a_folder(cli, tree, write_yaml):
    """Also: two concurrent runs in one out_dir were not locked out. The second one is
    refused with one line and writes nothing; a lock held by a killed process is no lock."""
    run = Path(tree["out_dir"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(run)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        config = write_yaml(tree)
        one_line(cli("train", config), 1, rf"{run} is in use by another distill process")
        one_line(cli("train", "--resume", run), 2, r"config.yaml")  # not a run yet: no config.yaml to resume
        assert sorted(p.name for p in run.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait(timeout=60)
    time.sleep(0.1)
    result = cli("train", config, "--no-eval")
    assert result.code == 0, result.err


def test_a_run_recorded_with_the_old_float32_default_resumes_with_dtype_left_null(tree, tmp_path):
    """Model dtypes default to null now (float32 on CPU); a config.yaml written before says
    float32 explicitly and must still be the same run."""
    from distill import rundir
    from distill.config import dump_config
    from distill.errors import ConfigError
    from distill.training.resume import check_resume_config

    cfg = build_config(tree)
    assert cfg.teacher.dtype is None and cfg.student.dtype is None
    old = cfg.model_copy(deep=True)
    old.student.dtype, old.teacher.dtype = "float32", "float32"
    (tmp_path / rundir.CONFIG).write_text(dump_config(old))
    check_resume_config(tmp_path, cfg)  # the same weights: no error
    old.teacher.dtype = "bfloat16"
    (tmp_path / rundir.CONFIG).write_text(dump_config(old))
    with pytest.raises(ConfigError, match=r"teacher.dtype \('bfloat16' -> 'float32'\)"):
        check_resume_config(tmp_path, cfg)
