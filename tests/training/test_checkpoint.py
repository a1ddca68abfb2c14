"""Resume reads no pickle: a crafted pickle in a checkpoint is never opened, a checkpoint of
the old pickled format is refused with one line, and resume still equals an uninterrupted run."""

import copy
import pickle
from pathlib import Path

import pytest
import torch

from distill.config import build_config
from distill.errors import DistillError
from distill.training.loop import train

from helpers import crash_at, read_metrics, student_weights


class _Boom:
    """Unpickling this writes a marker file: proof that code from the run folder ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def _plant(folder: Path, marker: Path) -> None:
    payload = pickle.dumps(_Boom(str(marker)))
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin", "pytorch_model.bin"):
        (folder / name).write_bytes(payload)


def _full_and_cut(tiny_tree, tmp_path, monkeypatch) -> tuple[dict, dict]:
    """An uninterrupted 4-step run, and the same run crashed after step 3 (checkpoint at 2)."""
    tiny_tree["train"].update(steps=4, checkpoint_every=2)
    full, cut = copy.deepcopy(tiny_tree), copy.deepcopy(tiny_tree)
    full["out_dir"], cut["out_dir"] = str(tmp_path / "full"), str(tmp_path / "cut")
    train(build_config(full), show_progress=False)
    crash_at(monkeypatch, 3, lambda: train(build_config(cut), show_progress=False))
    return full, cut


def test_resume_never_unpickles_and_equals_uninterrupted(tiny_tree, tmp_path, monkeypatch):
    full, cut = _full_and_cut(tiny_tree, tmp_path, monkeypatch)
    ckpt = Path(cut["out_dir"]) / "checkpoints" / "step-000002"
    assert not list(ckpt.glob("*.pkl")) and not list(ckpt.glob("*.bin"))  # nothing pickled is written
    marker = tmp_path / "marker"
    _plant(ckpt, marker)

    train(build_config(cut), resume=True, show_progress=False)
    assert not marker.exists()
    for x, y in zip(read_metrics(full["out_dir"]), read_metrics(cut["out_dir"])):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-6, rel=0)
        assert y["lr"] == x["lr"]
    wf, wc = student_weights(full["out_dir"]), student_weights(cut["out_dir"])
    for k in wf:
        torch.testing.assert_close(wc[k], wf[k], atol=1e-6, rtol=0)


def test_a_checkpoint_in_the_old_pickled_format_is_refused(tiny_tree, tmp_path, monkeypatch):
    tiny_tree["train"].update(steps=4, checkpoint_every=2)
    crash_at(monkeypatch, 3, lambda: train(build_config(tiny_tree), show_progress=False))
    ckpt = Path(tiny_tree["out_dir"]) / "checkpoints" / "step-000002"
    for name in ("optimizer.safetensors", "optimizer.json", "scheduler.json"):
        (ckpt / name).unlink()
    marker = tmp_path / "marker"
    _plant(ckpt, marker)
    with pytest.raises(DistillError, match="never loaded"):
        train(build_config(tiny_tree), resume=True, show_progress=False)
    assert not marker.exists()


def test_resume_drops_a_torn_last_log_line(tiny_tree, tmp_path, monkeypatch):
    full, cut = _full_and_cut(tiny_tree, tmp_path, monkeypatch)
    metrics = Path(cut["out_dir"]) / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 4, "loss": 1.2')  # a disk that filled up in the middle of an append
    train(build_config(cut), resume=True, show_progress=False)
    got, want = read_metrics(cut["out_dir"]), read_metrics(full["out_dir"])
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    assert [m["loss"] for m in got] == pytest.approx([m["loss"] for m in want], abs=1e-6)


def test_a_damaged_line_inside_the_log_is_named(tiny_tree, monkeypatch):
    tiny_tree["train"].update(steps=4, checkpoint_every=2)
    crash_at(monkeypatch, 3, lambda: train(build_config(tiny_tree), show_progress=False))
    metrics = Path(tiny_tree["out_dir"]) / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(DistillError, match=r"metrics.jsonl:2: not a JSON record"):
        train(build_config(tiny_tree), resume=True, show_progress=False)
