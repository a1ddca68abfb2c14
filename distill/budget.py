"""Where the compute went: `budget.json`, one record per phase, summed over resumed runs.

    {"phases": {"teacher_generation": {"tokens": ..., "prompt_tokens": ..., "completion_tokens":
     ..., "flops": ..., "seconds": ..., "retries": ..., "records": 2, "share_seconds": 0.4,
     "share_flops": 0.7}, ...},
     "total": {"seconds": ..., "flops": ..., "tokens": ...}}

Phases: teacher_generation (`distill generate`), teacher_caching (`distill cache`),
student_training and teacher_scoring (the loop; the teacher's live forwards are timed apart
and left out of the student's seconds), evaluation (`distill eval`). A run directory's file
copies the generation and caching phases from the folders its data and cache came from.
"total" and the shares are recomputed on every write; a total is null when a phase's value
is unknown, and so are the shares of that quantity.

FLOPs are the usual dense estimate: 2 x parameters per token for a forward pass (6 x with
the backward), attention's quadratic term left out; null where the parameter count is
unknown (a teacher behind a server).
"""

from pathlib import Path

from distill import rundir
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
    record = tree["phases"].setdefault(phase, {"records": 0})
    record["records"] += 1  # a run records at each checkpoint, a cache at each shard
    for key, value in (add or {}).items():
        old = record.get(key, 0)
        record[key] = None if old is None or value is None else old + value
    record.update(totals or {})
    summarize(tree)
    atomic_write_json(path, tree)
    return tree


def summarize(tree: dict) -> dict:
    """Set tree["total"] (seconds, flops, tokens summed over phases; null when any phase's is
    unknown) and each phase's share_seconds and share_flops of the total (null when the
    total is unknown or 0). Returns the tree."""
    phases = tree["phases"]
    tree["total"] = {}
    for key in ("seconds", "flops", "tokens"):
        values = [p.get(key) for p in phases.values()]
        tree["total"][key] = None if any(v is None for v in values) else sum(values)
    for record in phases.values():
        for key in ("seconds", "flops"):
            total = tree["total"][key]
            value = record.get(key)
            record[f"share_{key}"] = value / total if total and value is not None else None
    return tree


def copy_phase(source: Path, phase: str, target: Path) -> bool:
    """Copy `phase` of the budget file `source` (if it has one) into the budget file
    `target`, replacing the copy made before; returns whether there was one to copy."""
    source = Path(source)
    if not source.is_file():
        return False
    record = read_json(source, "budget file").get("phases", {}).get(phase)
    if record is None:
        return False
    copied = {k: v for k, v in record.items() if not k.startswith("share_")}
    record_phase(target, phase, totals=copied)
    return True


def record_training(
    run_dir: Path, cfg, student_params: int, teacher_params: int | None, tokens: int, seconds: float, teacher_s: float
) -> dict:
    """The training phases of one (possibly resumed) run, added to RUN/budget.json.

    student_training: tokens seen, 6 x params x tokens FLOPs (forward and backward), the
    loop's seconds less the teacher's; teacher_scoring (a live teacher): the same tokens,
    2 x teacher params x tokens, the teacher's forward seconds. Also copies
    teacher_generation from a `distill generate` folder holding data.source, and
    teacher_caching from cfg.teacher_cache.
    """
    path = Path(run_dir) / rundir.BUDGET
    source = Path(cfg.data.source)
    if not cfg.data.source.startswith("builtin:"):
        copy_phase(source.parent / rundir.BUDGET, "teacher_generation", path)
    if cfg.teacher_cache is not None:
        copy_phase(Path(cfg.teacher_cache) / rundir.BUDGET, "teacher_caching", path)
    if teacher_params is not None:
        add = {"tokens": tokens, "flops": forward_flops(teacher_params, tokens), "seconds": teacher_s}
        record_phase(path, "teacher_scoring", add=add)
    add = {"tokens": tokens, "flops": 6.0 * student_params * tokens, "seconds": seconds - teacher_s}
    return record_phase(path, "student_training", add=add)
