"""Experiment trackers (`train.report_to`): TensorBoard event files hold metrics.jsonl's numbers
exactly, every numeric field at its step, once each across a crash and resume; the run config
is logged as hyperparameters; a tracker whose package is missing stops the run in one line
before anything is written."""

import copy
import importlib.util
from pathlib import Path

import pytest
import yaml

from distill.config import build_config
from distill.errors import DistillError
from distill.training import trackers
from distill.training.loop import train

from helpers import crash_at, read_metrics, train_in_two_processes

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
from tensorboard.util.tensor_util import make_ndarray


def tensorboard_scalars(run_dir: Path, project: str = "distill") -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} as TensorBoard's loader reads RUN/trackers/PROJECT: the steps
    a resumed writer's purge_step orphaned are hidden."""
    acc = EventAccumulator(str(run_dir / "trackers" / project), size_guidance={"tensors": 0})
    acc.Reload()
    return {tag: [(e.step, make_ndarray(e.tensor_proto).item()) for e in acc.Tensors(tag)] for tag in acc.Tags()["tensors"]}


def test_tensorboard_holds_the_metrics_exactly_across_a_resume(tiny_tree, monkeypatch):
    tiny_tree["train"].update(steps=4, checkpoint_every=2, report_to=["tensorboard"])
    run_dir = Path(tiny_tree["out_dir"])
    crash_at(monkeypatch, 3, lambda: train(build_config(tiny_tree), show_progress=False))  # step 3 logged, then redone
    train(build_config(tiny_tree), resume=True, show_progress=False)
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    scalars = tensorboard_scalars(run_dir)
    fields = {k for m in metrics for k, v in m.items() if k != "step" and isinstance(v, (int, float))}
    assert fields <= set(scalars) and {"loss", "task_ce", "kd", "lr", "grad_norm"} <= fields
    for field in fields:
        expected = [(m["step"], float(m[field])) for m in metrics if field in m]
        assert scalars[field] == expected, field  # float64 in the event file: equal, not close


def test_the_run_config_is_logged_as_hyperparameters(tiny_tree):
    tiny_tree["train"].update(steps=1, report_to=["tensorboard"])
    cfg = build_config(tiny_tree)
    train(cfg, show_progress=False)
    saved = list((Path(cfg.out_dir) / "trackers" / "distill").glob("*/hparams.yml"))
    assert len(saved) == 1
    hparams = yaml.safe_load(saved[0].read_text())
    assert hparams == trackers.hyperparameters(cfg)
    assert hparams["train.lr"] == cfg.train.lr and hparams["student.config.hidden_size"] == 32
    assert hparams["train.report_to"] == '["tensorboard"]'


def test_a_tracker_that_is_not_installed_stops_before_anything_is_written(tiny_tree, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    tiny_tree["train"]["report_to"] = ["tensorboard", "wandb"]
    with pytest.raises(DistillError, match=r"^train.report_to: 'wandb' needs the 'wandb' package, which is not installed: pip install wandb$"):
        train(build_config(tiny_tree), show_progress=False)
    assert not Path(tiny_tree["out_dir"]).exists()


@pytest.mark.parametrize(
    ("report_to", "pattern"),
    [(["tensorbord"], r"train.report_to.0.*tensorboard"), (["tensorboard", "tensorboard"], r"names tensorboard more than once")],
)
def test_unknown_or_repeated_trackers_are_config_errors(tiny_tree, report_to, pattern):
    tree = copy.deepcopy(tiny_tree)
    tree["train"]["report_to"] = report_to
    with pytest.raises(DistillError, match=pattern):
        build_config(tree)


def test_trackers_may_be_added_on_resume(tiny_tree, monkeypatch):
    """report_to changes no result: a resume may add a tracker (the steps before it are not in it)."""
    tiny_tree["objective"]["alpha"] = 0.0  # labels only: the teacher plays no part here
    tiny_tree["train"].update(steps=3, checkpoint_every=1)
    crash_at(monkeypatch, 2, lambda: train(build_config(tiny_tree), show_progress=False))  # resumes from step 1
    tiny_tree["train"]["report_to"] = ["tensorboard"]
    train(build_config(tiny_tree), resume=True, show_progress=False)
    metrics = read_metrics(tiny_tree["out_dir"])
    assert tensorboard_scalars(Path(tiny_tree["out_dir"]))["loss"] == [(m["step"], m["loss"]) for m in metrics[1:]]
    assert list((Path(tiny_tree["out_dir"]) / "trackers" / "distill").glob("*/hparams.yml"))  # the config, once added


@pytest.mark.slow
def test_only_the_main_process_logs(tiny_tree, tmp_path):
    """2 gloo processes: one process's event file, holding the run's metrics.jsonl."""
    tiny_tree["train"].update(steps=2, micro_batch_size=4, report_to=["tensorboard"])
    train_in_two_processes(tiny_tree, tmp_path / "run.yaml", port=29583)
    run_dir = Path(tiny_tree["out_dir"])
    writers = {p.name.split(".")[-2] for p in (run_dir / "trackers").rglob("events.out.tfevents.*")}  # the writing pids
    assert len(writers) == 1
    assert tensorboard_scalars(run_dir)["loss"] == [(m["step"], m["loss"]) for m in read_metrics(run_dir)]
