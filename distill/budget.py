"""Where the compute went: `budget.json`, one record per phase, summed over resumed runs.

    {"phases": {"teacher_generation": {"tokens": ..., "prompt_tokens": ..., "completion_tokens":
     ..., "flops": ..., "seconds": ..., "retries": ..., "records": 2, "share_seconds": 0.4,
     "share_flops": 0.7}, ...},
     "total": {"seconds": ..., "flops": ..., "tokens": ...}}

Phases: teacher_generation (`distill generate`), teacher_caching (`distill cache`),
student_training and teacher_scoring (the loop; the teacher's live forwards are timed apart
and left out of the student's seconds), evaluation (`distill eval`), quantization
(`distill quantize` of a run's student, or the export of a run with a `quant` section:
seconds, and 0 FLOPs and tokens since it does no matmul). A run directory's file
copies the generation and caching phases from the folders its data and cache came from.
"total" and the shares are recomputed on every write; a total is null when a phase's value
is unknown, and so are the shares of that quantity.

FLOPs are the usual dense estimate: 2 x parameters per token for a forward pass (6 x with
the backward), attention's quadratic term left out; null where the parameter count is
unknown (a teacher behind a server).
"""

import math
from pathlib import Path

from distill import rundir
from distill.errors import DistillError
from distill.paths import atomic_write_json, read_json


def forward_flops(params: int | None, tokens: int) -> float | None:
    return None if params is None else 2.0 * params * tokens


def record_phase(path: Path, phase: str, add: dict | None = None, totals: dict | None = None) -> dict:
    """Update `phase` in the budget file at `path` (created if missing); returns the file's tree.

    add: counts of this run, added to what earlier (resumed) runs recorded; a None (unknown)
    makes the sum unknown. totals: counts recomputed from the phase's whole output, which
    replace the old ones (they survive a run that was killed before it could record).
    """
    path = Path(path)
    tree = read_json(path, "budget file") if path.exists() else {"phases": {}}
    phases = tree.get("phases") if isinstance(tree, dict) else None
    if not isinstance(phases, dict) or not all(isinstance(r, dict) for r in phases.values()):
        raise DistillError(f"{path}: not a budget file (no mapping of phases to records); move it aside and rerun")
    record = phases.setdefault(phase, {"records": 0})
    record["records"] = (record["records"] if _is_number(record.get("records")) else 0) + 1  # per checkpoint / shard
    for key, value in (add or {}).items():
        old = record.get(key, 0)
        record[key] = old + value if _is_number(old) and _is_number(value) else None  # unknown stays unknown
    record.update(totals or {})
    summarize(tree)
    atomic_write_json(path, tree)
    return tree


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def summarize(tree: dict) -> dict:
    """Set tree["total"] (seconds, flops, tokens summed over phases; null when any phase's is
    unknown) and each phase's share_seconds and share_flops of the total (null when the
    total is unknown or 0). Returns the tree."""
    phases = tree["phases"]
    tree["total"] = {}
    for key in ("seconds", "flops", "tokens"):
        values = [p.get(key) for p in phases.values()]
        tree["total"][key] = sum(values) if all(_is_number(v) for v in values) else None
    for record in phases.values():
        for key in ("seconds", "flops"):
            total = tree["total"][key]
            value = record.get(key)
            record[f"share_{key}"] = value / total if total and _is_number(value) else None
    return tree


def copy_phase(source: Path, phase: str, target: Path) -> bool:
    """Copy `phase` of the budget file `source` (if it has one) into the budget file
    `target`, replacing the copy made before; returns whether there was one to copy."""
    source = Path(source)
    if not source.is_file():
        return False
    tree = read_json(source, "budget file")
    phases = tree.get("phases") if isinstance(tree, dict) else None
    record = phases.get(phase) if isinstance(phases, dict) else None
    if not isinstance(record, dict):
        return False
    copied = {k: v for k, v in record.items() if not k.startswith("share_")}
    record_phase(target, phase, totals=copied)
    return True


def record_training(run_dir: Path, cfg, student_params: int, teacher_params: int | None, totals: dict) -> dict:
    """The training phases of a (possibly resumed) run, written to RUN/budget.json as totals.

    totals: the run's work so far over all its segments (`training_totals`): tokens,
    seconds (the loop's, less the teacher's), teacher_s, records. student_training: the
    tokens, 6 x params x tokens FLOPs (forward and backward), the seconds; teacher_scoring
    (a live teacher): the same tokens, 2 x teacher params x tokens, the teacher's seconds.
    A checkpoint carries the totals through its step, so a resume writes them again and a
    kill between a checkpoint and this record loses nothing. Also copies
    teacher_generation from a `distill generate` folder holding data.source, and
    teacher_caching from cfg.teacher_cache.
    """
    path = Path(run_dir) / rundir.BUDGET
    source = Path(cfg.data.source)
    if not cfg.data.source.startswith("builtin:"):
        copy_phase(source.parent / rundir.BUDGET, "teacher_generation", path)
    if cfg.teacher_cache is not None:
        copy_phase(Path(cfg.teacher_cache) / rundir.BUDGET, "teacher_caching", path)
    tokens, records = totals["tokens"], totals["records"]
    if teacher_params is not None:
        scoring = {"tokens": tokens, "flops": forward_flops(teacher_params, tokens), "seconds": totals["teacher_s"]}
        record_phase(path, "teacher_scoring", totals={**scoring, "records": records})
    training = {"tokens": tokens, "flops": 6.0 * student_params * tokens, "seconds": totals["seconds"], "records": records}
    return record_phase(path, "student_training", totals=training)


def training_totals(run_dir: Path, saved=None) -> dict:
    """The run's training totals so far: `saved` (what a checkpoint's state.json carries)
    when it is a mapping of numbers, else what RUN/budget.json holds (a checkpoint written
    before checkpoints carried their own): tokens, seconds, teacher_s, records. A value that
    is not a number (a hand-edited file) counts as 0."""

    def number(value, kind=float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
        return kind(value) if ok else kind(0)

    keys = ("tokens", "seconds", "teacher_s", "records")
    if isinstance(saved, dict) and all(k in saved for k in keys):
        tree = saved
    else:
        path = Path(run_dir) / rundir.BUDGET
        phases = read_json(path, "budget file").get("phases", {}) if path.is_file() else {}
        phases = phases if isinstance(phases, dict) else {}
        student, teacher = phases.get("student_training") or {}, phases.get("teacher_scoring") or {}
        student, teacher = (p if isinstance(p, dict) else {} for p in (student, teacher))
        tree = {
            "tokens": student.get("tokens"),
            "seconds": student.get("seconds"),
            "teacher_s": teacher.get("seconds"),
            "records": student.get("records"),
        }
    return {
        "tokens": number(tree["tokens"], int),
        "seconds": number(tree["seconds"]),
        "teacher_s": number(tree["teacher_s"]),
        "records": number(tree["records"], int),
    }
