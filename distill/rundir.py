"""The run directory: every file and folder name a run writes, in one place.

    RUN/config.yaml            the resolved config
    RUN/metrics.jsonl          one record per optimizer step
    RUN/alignment.jsonl        CKA per layer pair at probe steps (runs with a teacher model)
    RUN/checkpoints/step-N/    what a resume needs (`distill.training.checkpoint`)
    RUN/student/               save_pretrained student + tokenizer
    RUN/student-<scheme>/      the student quantized (int8 / int4): quant.json + safetensors
    RUN/projectors/            feature projectors (runs with a feature term)
    RUN/latents/               probe states at step 0 and each checkpoint
    RUN/train_summary.json     steps, tokens, wall time, ...
    RUN/eval.json              held-out evaluation
    RUN/eval-<scheme>.json     held-out evaluation of RUN/student-<scheme>
    RUN/budget.json            tokens, FLOPs and seconds per phase
    RUN/trackers/              files of the experiment trackers (train.report_to)
    RUN/teachers.json          `distill teachers`: candidate teachers scored on the run's rows
"""

from pathlib import Path

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
ALIGNMENT = "alignment.jsonl"
CHECKPOINTS = "checkpoints"
STUDENT = "student"
PROJECTORS = "projectors"
LATENTS = "latents"
TRAIN_SUMMARY = "train_summary.json"
TRACKERS = "trackers"
EVAL = "eval.json"
BUDGET = "budget.json"
TEACHERS = "teachers.json"
CHECKPOINT_STATE = "state.json"  # inside a checkpoint: its step, written last
QUANT = "quant.json"  # inside a quantized model folder: scheme, modules, sizes


def quantized_student(scheme: str) -> str:
    """`student-int4`: the run's student quantized with `scheme`."""
    return f"{STUDENT}-{scheme}"


def eval_name(scheme: str | None) -> str:
    """eval.json for the full-precision student, `eval-int4.json` for its int4 version."""
    return EVAL if scheme is None else f"eval-{scheme}.json"


def step_name(step: int) -> str:
    """`step-000042`: checkpoint folders and latent snapshots sort by step."""
    return f"step-{step:06d}"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / step_name(step)


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first (temp folders of a cut save excluded)."""
    return sorted((Path(run_dir) / CHECKPOINTS).glob("step-*"))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None
