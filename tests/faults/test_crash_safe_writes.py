"""Writes that survive faults (finding 16, the file-mode item and the fsync of finding 6):
a full disk in the middle of a checkpoint is one line and a resume afterwards equals an
uninterrupted run; a kill between a checkpoint and its budget record loses no budget;
files reach the disk before they are renamed into place; safetensors files get the mode
the umask gives, not 0600."""

import errno
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from fault_helpers import one_line

from distill.config import build_config
from distill.training.loop import train

from helpers import read_metrics, student_weights


def _train(tree: dict, resume: bool = False) -> dict:
    return train(build_config(tree), resume=resume, show_progress=False)


def _budget(run: Path) -> dict:
    return json.loads((Path(run) / "budget.json").read_text())["phases"]


def test_a_full_disk_during_a_checkpoint_is_one_line_and_resume_equals_uninterrupted(cli, tree, write_yaml, monkeypatch):
    from distill.training import checkpoint

    whole = {**tree, "out_dir": tree["out_dir"] + "-whole"}
    _train(whole)
    real_save, calls = checkpoint.save_file, {"n": 0}

    def disk_full(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if "step-000004" in path:  # the second checkpoint: the disk fills up in the middle of it
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    result = cli("train", write_yaml(tree), "--no-eval")
    one_line(result, 1, r"step-000004/model.safetensors: No space left on device \(free some space, then resume")
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    run = Path(tree["out_dir"])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [".tmp-step-000004", "step-000002"]

    assert cli("train", "--resume", run, "--no-eval").code == 0
    assert [m["loss"] for m in read_metrics(run)] == pytest.approx([m["loss"] for m in read_metrics(whole["out_dir"])], abs=1e-6)
    a, b = student_weights(whole["out_dir"]), student_weights(run)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)
    assert _budget(run)["student_training"]["tokens"] == _budget(whole["out_dir"])["student_training"]["tokens"]


def test_a_kill_between_a_checkpoint_and_its_budget_record_loses_nothing(tree, monkeypatch):
    """Finding 16 (training): each checkpoint carries the run's budget through its step, and
    a resume writes it back, so the record the kill cut off is not lost."""
    from distill.training import loop

    whole = {**tree, "out_dir": tree["out_dir"] + "-whole"}
    _train(whole)
    real = loop.record_training

    def killed(*args, **kwargs):  # the first budget record: right after the step-2 checkpoint
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "record_training", killed)
    with pytest.raises(KeyboardInterrupt):
        _train(tree)
    monkeypatch.setattr(loop, "record_training", real)
    run = Path(tree["out_dir"])
    assert (run / "checkpoints" / "step-000002").is_dir() and not (run / "budget.json").exists()
    _train(tree, resume=True)
    got, want = _budget(run), _budget(whole["out_dir"])
    for phase in ("student_training", "teacher_scoring"):
        assert got[phase]["tokens"] == want[phase]["tokens"] and got[phase]["records"] == want[phase]["records"] == 2
        assert got[phase]["flops"] == want[phase]["flops"]


def test_files_reach_the_disk_before_they_are_renamed(tree, monkeypatch):
    """Finding 6: saves were renamed but never fsynced. Every file of a checkpoint, the logs
    up to its step and every atomically written JSON file are flushed to disk first."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    tree["train"].update(steps=2, checkpoint_every=0)
    _train(tree)
    run = Path(tree["out_dir"]).resolve()
    ckpt = run / "checkpoints" / "step-000002"
    for f in ckpt.iterdir():
        assert any(s.startswith(str(run / "checkpoints" / ".tmp-step-000002")) and s.endswith(f.name) for s in synced), f
    for name in ("metrics.jsonl", "alignment.jsonl"):
        assert str(run / name) in synced
    for f in (run / "student").iterdir():
        assert any(s.endswith((f"/student/{f.name}", f"/.tmp-student/{f.name}")) for s in synced), f
    assert any(s.startswith(str(run / ".config.yaml.")) for s in synced)  # the atomic write's temp file
    assert any(s.startswith(str(run / ".budget.json.")) for s in synced)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_safetensors_files_get_the_umask_mode(tree, umask):
    """Also: every safetensors file was written 0600 whatever the umask."""
    tree["train"].update(steps=2, checkpoint_every=0)
    tree["features"] = {"weight": 0.5}  # projectors/ too
    old = os.umask(umask)
    try:
        _train(tree)
    finally:
        os.umask(old)
    run = Path(tree["out_dir"])
    files = [*run.glob("**/*.safetensors"), *run.glob("**/*.json"), run / "metrics.jsonl"]
    assert {p.parent.name for p in files} >= {"student", "step-000002", "latents", "projectors", "run"}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p
