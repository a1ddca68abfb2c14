"""The one training loop, on Hugging Face Accelerate: one process, DDP or FSDP alike.

    run = setup(cfg)                      models, teacher, batch source, terms, optimizer
    for step in steps:
        record = train_step(run, step)    one global batch, every term / global valid tokens
        log, checkpoint, probe            metrics.jsonl, checkpoints/, alignment.jsonl
    export                                student/ (+ student-<scheme>/ with quant), projectors/, train_summary.json

Recipes differ in their teacher (`distill.training.teachers`), batch source
(`distill.training.batch_sources`) and loss terms (`distill.training.objective`), never
in this loop.
"""

import json
import time

from distill import rundir
from distill.budget import record_training, training_totals
from distill.config import RunConfig
from distill.models.loading import count_parameters
from distill.models.quantize import Scheme
from distill.models.quantized_io import quantize_folder
from distill.paths import atomic_write_json
from distill.progress import Progress
from distill.training.checkpoint import checkpoint_state, export_student, save_checkpoint
from distill.training.features import export_projectors
from distill.training.resume import release_run_dir
from distill.training.setup import Run, setup
from distill.training.sharding import full_state, is_sharded
from distill.training.step import train_step
from distill.training.trackers import end_trackers, log_metrics, start_trackers


class BudgetMeter:
    """The run's training work over all its segments: tokens, seconds (the loop's, less the
    teacher's), teacher seconds, records. At each checkpoint (the last step always is one)
    the work since the last one is folded in; the totals go into the checkpoint's
    state.json and then budget.json. A resume starts from its checkpoint's totals and writes
    them at once: a crash loses only steps that the resume redoes, and a kill between a
    checkpoint and its budget record loses nothing."""

    def __init__(self, run: Run):
        self.run, self.tokens, self.teacher_s, self.since = run, 0, 0.0, time.perf_counter()
        self.totals = {"tokens": 0, "seconds": 0.0, "teacher_s": 0.0, "records": 0}
        if run.last_checkpoint is not None:  # a resume: the totals through its checkpoint
            self.totals = training_totals(run.run_dir, checkpoint_state(run.last_checkpoint).get("budget"))
        self.start = dict(self.totals)

    def add(self, tokens: int, teacher_s: float) -> None:
        self.tokens += tokens
        self.teacher_s += teacher_s

    def fold(self) -> dict:
        """Fold the work since the last call into the totals; return them."""
        if self.tokens:
            seconds = time.perf_counter() - self.since
            t = self.totals
            self.totals = {
                "tokens": t["tokens"] + self.tokens,
                "seconds": t["seconds"] + seconds - self.teacher_s,
                "teacher_s": t["teacher_s"] + self.teacher_s,
                "records": t["records"] + 1,
            }
        self.tokens, self.teacher_s, self.since = 0, 0.0, time.perf_counter()
        return dict(self.totals)

    def fold_time(self) -> None:
        """Add the seconds since the last fold (the checkpoint save itself) to the totals."""
        now = time.perf_counter()
        self.totals["seconds"] += now - self.since
        self.since = now

    def record(self) -> None:
        """Write the totals into budget.json (main process; nothing before the first record)."""
        r = self.run
        if r.acc.is_main_process and self.totals["records"]:
            record_training(r.run_dir, r.cfg, r.n_params, r.teacher_params, self.totals)


def log_record(run: Run, record: dict) -> None:
    if run.acc.is_main_process:
        with open(run.run_dir / rundir.METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
    log_metrics(run.acc, record)  # the trackers' copy (train.report_to), after the record


def after_step(run: Run, done: int, budget: BudgetMeter) -> dict | None:
    """Checkpoint (with its budget record) and alignment probe, where due after `done` steps.
    Returns the probe's result when it ran."""
    t, f = run.cfg.train, run.cfg.features
    checkpoint = (t.checkpoint_every and done % t.checkpoint_every == 0) or done == t.steps
    if checkpoint:
        extra = {"budget": budget.fold()}  # the totals through this step travel with the checkpoint
        run.last_checkpoint = save_checkpoint(
            run.acc, run.trained, run.optimizer, run.scheduler, run.run_dir, done, t.keep_checkpoints, extra
        )
        budget.fold_time()  # the save's own seconds (a resume from this checkpoint leaves just them out)
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


def finish(run: Run, tokens: int, wall: float, alignment: dict | None, before: dict) -> dict:
    """Export the student (and projectors); write and return train_summary.json: tokens and
    wall_s of the whole run (every segment: `before` holds the earlier segments' totals),
    and this segment's alone under "segment"."""
    acc = run.acc
    export_student(acc, run.student, run.tokenizer, run.run_dir)
    quantized = None
    if run.cfg.quant.scheme is not None and acc.is_main_process:  # student-<scheme>/: the same weights quantized
        scheme = Scheme.from_config(run.cfg.quant)
        out = run.run_dir / rundir.quantized_student(scheme.name)
        record = quantize_folder(run.run_dir / rundir.STUDENT, out, scheme, run.run_dir)
        quantized = {k: record[k] for k in ("scheme", "group_size", "activations", "weights_bytes", "fp_weights_bytes")}
    acc.wait_for_everyone()
    projectors = acc.unwrap_model(run.projectors) if run.projectors is not None else None
    if projectors is not None:
        state = full_state(acc, run.projectors)  # every process: sharded projectors are gathered
        if acc.is_main_process:
            export_projectors(projectors, state, run.run_dir)
    all_tokens, all_wall = before["tokens"] + tokens, before["seconds"] + before["teacher_s"] + wall
    summary = {
        "steps": run.cfg.train.steps,
        "resumed_from": run.start,
        "params": run.n_params,
        "tokens": all_tokens,
        "wall_s": all_wall,
        "tokens_per_s": all_tokens / all_wall if all_wall > 0 else 0.0,
        "segment": {"tokens": tokens, "wall_s": wall},
        "processes": acc.num_processes,
        "sharded": {"student": is_sharded(run.student), "teacher": is_sharded(run.teacher.model)},
        "fused_loss": run.teacher.fused,
        "teacher": run.teacher.kind,
        "feature_pairs": len(projectors.pairs) if projectors is not None else 0,
        "projector_params": count_parameters(projectors) if projectors is not None else 0,
    }
    if quantized is not None:
        summary["quantized"] = quantized
    if alignment is not None:
        summary["alignment"] = {k: v for k, v in alignment.items() if k != "pairs"}
    if acc.is_main_process:
        atomic_write_json(run.run_dir / rundir.TRAIN_SUMMARY, summary)
    return summary


def train(cfg: RunConfig, resume: bool = False, show_progress: bool = True) -> dict:
    """Run (or resume) the run described by `cfg` in cfg.out_dir. Returns the train summary.
    The run folder is locked (RUN/.lock) from setup to the summary."""
    run = None
    try:
        run = setup(cfg, resume)
        start_trackers(run.acc, cfg, run.run_dir, run.start, resume)
        budget = BudgetMeter(run)
        budget.record()  # a resume: the totals through its checkpoint, in case their record was lost
        alignment = initial_probe(run)
        run.student.train()
        progress = Progress(cfg.train.steps, run.start, enabled=show_progress and run.acc.is_main_process)
        tokens, t_start = 0, time.perf_counter()
        budget.since = t_start
        for step in range(run.start, cfg.train.steps):
            record, step_tokens = train_step(run, step)
            tokens += step_tokens
            budget.add(step_tokens, record.get("teacher_s", 0.0))
            log_record(run, record)
            progress.update(step + 1, record["loss"], record["tokens_per_s"])
            alignment = after_step(run, step + 1, budget) or alignment
        progress.close()
        return finish(run, tokens, time.perf_counter() - t_start, alignment, budget.start)
    finally:
        if run is not None:
            end_trackers(run.acc)
        release_run_dir(cfg.out_dir)
