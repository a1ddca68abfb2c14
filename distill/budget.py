"""Where the compute went: `budget.json`, one record per phase, summed over resumed runs.

    {"phases": {"teacher_generation": {"tokens": ..., "prompt_tokens": ..., "completion_tokens":
     ..., "flops": ..., "seconds": ..., "retries": ..., "runs": 2}, ...}}

FLOPs are the usual dense estimate: 2 x parameters per token for a forward pass (6 x with
the backward), attention's quadratic term left out; null where the parameter count is
unknown (a teacher behind a server).
"""

from pathlib import Path

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
    record = tree["phases"].setdefault(phase, {"runs": 0})
    record["runs"] += 1
    for key, value in (add or {}).items():
        old = record.get(key, 0)
        record[key] = None if old is None or value is None else old + value
    record.update(totals or {})
    atomic_write_json(path, tree)
    return tree
