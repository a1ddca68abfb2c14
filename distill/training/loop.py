"""The one training loop, on Hugging Face Accelerate: one process, DDP or FSDP alike.

    run = setup(cfg)                      models, teacher, batch source, terms, optimizer
    for step in steps:
        record = train_step(run, step)    one global batch, every term / global valid tokens
        log, checkpoint, probe            metrics.jsonl, checkpoints/, alignment.jsonl
    export                                student/, projectors/, train_summary.json

Recipes differ in their teacher (`distill.training.teachers`), batch source
(`distill.training.batch_sources`) and loss terms (`distill.training.objective`), never
in this loop.
"""

import json
import time

from distill import rundir
from distill.budget import record_training
from distill.config import RunConfig
from distill.models.loading import count_parameters
from distill.paths import atomic_write_json
from distill.progress import Progress
from distill.training.checkpoint import export_student, save_checkpoint
from distill.training.features import export_projectors
from distill.training.setup import Run, setup
from distill.training.step import train_step


class BudgetMeter:
    """The work since the last record, added to budget.json at each checkpoint (the last
    step always is one), so a crash loses only steps that a resume redoes."""

    def __init__(self, run: Run):
        self.run, self.tokens, self.teacher_s, self.since = run, 0, 0.0, time.perf_counter()

    def add(self, tokens: int, teacher_s: float) -> None:
        self.tokens += tokens
        self.teacher_s += teacher_s

    def record(self) -> None:
        r = self.run
        if r.acc.is_main_process and self.tokens:
            seconds = time.perf_counter() - self.since
            record_training(r.run_dir, r.cfg, r.n_params, r.teacher_params, self.tokens, seconds, self.teacher_s)
        self.tokens, self.teacher_s, self.since = 0, 0.0, time.perf_counter()


def log_record(run: Run, record: dict) -> None:
    if run.acc.is_main_process:
        with open(run.run_dir / rundir.METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")


def after_step(run: Run, done: int, budget: BudgetMeter) -> dict | None:
    """Checkpoint (with its budget record) and alignment probe, where due after `done` steps.
    Returns the probe's result when it ran."""
    t, f = run.cfg.train, run.cfg.features
    checkpoint = (t.checkpoint_every and done % t.checkpoint_every == 0) or done == t.steps
    if checkpoint:
        run.last_checkpoint = save_checkpoint(
            run.acc, run.trained, run.optimizer, run.scheduler, run.run_dir, done, t.keep_checkpoints
        )
        budget.record()
    if run.probe is not None and (checkpoint or (f.probe_every and done % f.probe_every == 0)):
        return run.probe(done, run.student, run.projectors, snapshot=bool(checkpoint))
    return None


def initial_probe(run: Run) -> dict | None:
    """CKA and a latent snapshot at the start (also a snapshot that a crash cut short)."""
    snapshot = run.run_dir / rundir.LATENTS / f"{rundir.step_name(run.start)}.safetensors"
    if run.probe is not None and (run.start == 0 or not snapshot.exists()):
        return run.probe(run.start, run.student, run.projectors, snapshot=True)
    return None


def finish(run: Run, tokens: int, wall: float, alignment: dict | None) -> dict:
    """Export the student (and projectors); write and return train_summary.json."""
    acc = run.acc
    export_student(acc, run.student, run.tokenizer, run.run_dir)
    projectors = acc.unwrap_model(run.projectors) if run.projectors is not None else None
    if projectors is not None:
        state = acc.get_state_dict(run.projectors)
        if acc.is_main_process:
            export_projectors(projectors, state, run.run_dir)
    summary = {
        "steps": run.cfg.train.steps,
        "resumed_from": run.start,
        "params": run.n_params,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "processes": acc.num_processes,
        "fused_loss": run.teacher.fused,
        "teacher": run.teacher.kind,
        "feature_pairs": len(projectors.pairs) if projectors is not None else 0,
        "projector_params": count_parameters(projectors) if projectors is not None else 0,
    }
    if alignment is not None:
        summary["alignment"] = {k: v for k, v in alignment.items() if k != "pairs"}
    if acc.is_main_process:
        atomic_write_json(run.run_dir / rundir.TRAIN_SUMMARY, summary)
    return summary


def train(cfg: RunConfig, resume: bool = False, show_progress: bool = True) -> dict:
    """Run (or resume) the run described by `cfg` in cfg.out_dir. Returns the train summary."""
    run = setup(cfg, resume)
    alignment = initial_probe(run)
    run.student.train()
    progress = Progress(cfg.train.steps, run.start, enabled=show_progress and run.acc.is_main_process)
    budget, tokens, t_start = BudgetMeter(run), 0, time.perf_counter()
    for step in range(run.start, cfg.train.steps):
        record, step_tokens = train_step(run, step)
        tokens += step_tokens
        budget.add(step_tokens, record.get("teacher_s", 0.0))
        log_record(run, record)
        progress.update(step + 1, record["loss"], record["tokens_per_s"])
        alignment = after_step(run, step + 1, budget) or alignment
    progress.close()
    return finish(run, tokens, time.perf_counter() - t_start, alignment)
