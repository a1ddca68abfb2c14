"""Experiment trackers (`train.report_to`) through Accelerate's: a copy of metrics.jsonl.

    accelerator_settings(cfg)     Accelerator(log_with=..., project_config=...) arguments; a
                                  tracker whose package is missing stops the run here, in
                                  one line, before anything is written
    start_trackers(...)           after the run folder is open: the trackers' runs, and the
                                  run config as hyperparameters to each tracker that lacks it
    log_metrics(acc, record)      every numeric field of one metrics.jsonl record, at its step
    end_trackers(acc)             flush and close (also when the run stops with an error)

metrics.jsonl stays the run's record: trackers get what it gets, on the main process only
(Accelerate logs there alone). TensorBoard writes scalars in float64, so its event files
hold metrics.jsonl's numbers exactly. A resume continues the same runs: TensorBoard's
writer gets `purge_step` = the first step logged again, so the steps logged after the
checkpoint and before the crash are hidden, not shown twice; wandb resumes the run of the
id kept in RUN/trackers/run.json (`resume="allow"`), where steps not above its last one
are dropped; trackio reopens its run by name and appends (redone steps appear twice).
The other trackers start a new run.
"""

import importlib.util
import json
import secrets
from pathlib import Path

from accelerate.utils import ProjectConfiguration

from distill import rundir
from distill.errors import DistillError
from distill.paths import atomic_write_json, read_json

# The Python module each of Accelerate's trackers needs (its pip package: _ written -)
PACKAGES = {
    "tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow", "comet_ml": "comet_ml",
    "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
}  # fmt: skip
RUN_FILE = "run.json"  # inside RUN/trackers/: the id of the run in the trackers that can resume one


def check_installed(names: list[str]) -> None:
    """A one-line error naming the package of the first tracker that is not installed."""
    for name in names:
        module = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            pip = module.replace("_", "-")
            raise DistillError(
                f"train.report_to: '{name}' needs the '{pip}' package, which is not installed: pip install {pip}"
            )


def accelerator_settings(cfg) -> dict:
    """Keyword arguments for the run's Accelerator: none without trackers."""
    names = list(cfg.train.report_to)
    if not names:
        return {}
    check_installed(names)
    run_dir = Path(cfg.out_dir)
    project = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / rundir.TRACKERS))
    return {"log_with": names, "project_config": project}


def hyperparameters(cfg) -> dict:
    """The run config as flat {"section.key": value}: numbers, strings, booleans and None kept,
    lists and mappings written as JSON (trackers take scalars only)."""

    def flat(tree, prefix):
        for key, value in tree.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict) and value:
                yield from flat(value, name + ".")
            elif value is None or isinstance(value, (bool, int, float, str)):
                yield name, value
            else:
                yield name, json.dumps(value)

    return dict(flat(cfg.model_dump(mode="json"), ""))


def tracker_state(run_dir: Path, fresh: bool) -> dict:
    """RUN/trackers/run.json: {"id": this run's id in the trackers, "configured": the trackers
    that have the run config}; made anew at a fresh start, read back on resume."""
    path = run_dir / rundir.TRACKERS / RUN_FILE
    if not fresh and path.is_file():
        saved = read_json(path, "tracker run file")
        if isinstance(saved, dict) and isinstance(saved.get("id"), str) and isinstance(saved.get("configured"), list):
            return saved
    return {"id": secrets.token_hex(8), "configured": []}


def start_trackers(acc, cfg, run_dir: Path, start: int, resume: bool) -> None:
    """Start the trackers' runs (main process; no-op without train.report_to) and give each
    tracker that lacks it the run config. `start`: the optimizer steps already done."""
    names = list(cfg.train.report_to)
    if not names or not acc.is_main_process:
        return
    state = tracker_state(run_dir, fresh=not resume)
    name = Path(cfg.out_dir).resolve().name
    settings = {
        "tensorboard": {"purge_step": start + 1},  # step numbers are 1-based: the first one logged again
        "wandb": {"name": name, "id": state["id"], "resume": "allow", "dir": str(run_dir / rundir.TRACKERS)},
        "trackio": {"name": name, "resume": "allow"},
    }
    (run_dir / rundir.TRACKERS).mkdir(parents=True, exist_ok=True)
    try:
        acc.init_trackers(cfg.train.tracker_project, init_kwargs={k: settings[k] for k in names if k in settings})
        config = hyperparameters(cfg)
        for tracker in acc.trackers:
            if tracker.name not in state["configured"]:  # a resumed run's trackers have it already
                tracker.store_init_configuration(config)
    except DistillError:
        raise
    except Exception as e:  # noqa: BLE001 - a tracker's own failure to start (no login, a bad setting): one line
        acc.trackers.clear()  # end_trackers must not finish a tracker that never started
        lines = [line for line in str(e).splitlines() if line.strip()]
        raise DistillError(f"train.report_to: a tracker could not start ({type(e).__name__}: {lines[0] if lines else e!r})") from None
    state["configured"] = sorted(set(state["configured"]) | {t.name for t in acc.trackers})
    atomic_write_json(run_dir / rundir.TRACKERS / RUN_FILE, state)


def scalars(record: dict) -> dict[str, float]:
    """The numeric fields of a metrics.jsonl record but its step (booleans as 0 / 1)."""
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}


def log_metrics(acc, record: dict) -> None:
    """Send one metrics.jsonl record to the trackers, at its step (no-op without trackers)."""
    if acc.log_with:
        acc.log(scalars(record), step=record["step"], log_kwargs={"tensorboard": {"new_style": True, "double_precision": True}})


def end_trackers(acc) -> None:
    """Flush and close the trackers (no-op without trackers). Not `acc.end_training()`, which
    also ends the process group that evaluation after training still uses."""
    if acc.is_main_process:
        for tracker in acc.trackers:
            tracker.finish()
