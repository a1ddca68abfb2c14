"""What the report shows, read from run directories: one plain dict per run, JSON-safe.

Every file but config.yaml may be missing, partial or unreadable: the run still renders and
`missing` / `notes` say what was not there. A path without config.yaml is a DistillError.
"""

import json
import math
from pathlib import Path

import yaml

from distill import rundir
from distill.errors import DistillError
from distill.paths import MAX_YAML_BYTES, load_yaml, read_text

# metrics.jsonl keys that are not loss terms (timings, counts, schedule, flags).
NOT_LOSS = {
    "step", "lr", "grad_norm", "valid_tokens", "tokens_per_s", "step_s", "teacher_s", "on_policy",
    "policy_step", "rollout_s", "generated_tokens", "eos_rate",
}
NOT_LOSS_SUFFIXES = ("_s", "_tokens", "_rate", "_step", "_norm", "_per_s", "lr")
MAX_POINTS = 4000  # per series in the page; longer runs are thinned evenly (the last step kept)
MAX_SAMPLES = 5
MAX_TEXT = 2000  # characters of a prompt or generation shown
PHASES = ["teacher_generation", "teacher_caching", "teacher_scoring", "student_training", "evaluation", "quantization"]
RUN_FILES = [rundir.METRICS, rundir.TRAIN_SUMMARY, rundir.EVAL, rundir.BUDGET, rundir.ALIGNMENT]


def finite(x):
    """JSON-safe copy: NaN and +-inf become None (JSON.parse refuses them)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def is_loss_key(key: str) -> bool:
    return key not in NOT_LOSS and not key.endswith(NOT_LOSS_SUFFIXES)


def read_json_file(path: Path, notes: list[str]):
    """The parsed file, or None (a missing file is listed by the caller; a bad one noted)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, RecursionError) as e:
        notes.append(f"{path.name} is unreadable ({e.__class__.__name__}: {e}); shown as missing")
        return None


def read_jsonl_file(path: Path, notes: list[str]) -> list[dict] | None:
    """The JSON-object lines of a file; a malformed line (a run killed mid-write) is skipped and noted."""
    if not path.is_file():
        return None
    rows, bad = [], 0
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as e:
        notes.append(f"{path.name} is unreadable ({e.__class__.__name__}); shown as missing")
        return None
    for line in text.split("\n"):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            bad += 1
            continue
        if isinstance(obj, dict):
            rows.append(obj)
        else:
            bad += 1
    if bad:
        notes.append(f"{path.name}: {bad} malformed line(s) skipped")
    return rows


def read_config(run_dir: Path) -> dict:
    path = run_dir / rundir.CONFIG
    if not run_dir.is_dir():
        why = "a file, not a directory" if run_dir.exists() else "no such directory"
        raise DistillError(f"not a run directory: {run_dir} ({why})")
    if not path.is_file():
        raise DistillError(f"not a run directory: {run_dir} (no {rundir.CONFIG})")
    try:
        tree = load_yaml(read_text(path, "run config", MAX_YAML_BYTES), str(path))  # bounded: no alias bomb
    except yaml.YAMLError as e:
        raise DistillError(f"{path}: malformed YAML ({e.__class__.__name__})") from None
    if not isinstance(tree, dict):
        raise DistillError(f"{path}: expected a mapping of config sections, got {type(tree).__name__}")
    return tree


def dig(tree, dotted: str, default=None):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return default
        tree = tree[part]
    return tree


def model_label(section) -> str | None:
    """A config's model as one line: its name, or the inline config's type and size."""
    if not isinstance(section, dict):
        return None
    if section.get("name"):
        return str(section["name"])
    cfg = section.get("config")
    if isinstance(cfg, dict):
        bits = [str(cfg.get("model_type", "inline"))]
        if "num_hidden_layers" in cfg:
            bits.append(f"{cfg['num_hidden_layers']} layers")
        if "hidden_size" in cfg:
            bits.append(f"hidden {cfg['hidden_size']}")
        return "inline " + ", ".join(bits)
    return None


OBJECTIVE_KEYS = [
    "objective.alpha", "objective.temperature", "objective.divergence", "features.weight",
    "rationale.mode", "on_policy.lmbda",
]


def metrics_series(records: list[dict], notes: list[str]) -> dict:
    """{"step": [...], "terms": {name: [value or None, ...]}} over the loss-like numeric keys."""
    records = [r for r in records if is_number(r.get("step"))]
    records.sort(key=lambda r: r["step"])
    if len(records) > MAX_POINTS:
        stride = math.ceil(len(records) / MAX_POINTS)
        kept = records[::stride]
        if kept[-1] is not records[-1]:
            kept.append(records[-1])
        notes.append(f"{rundir.METRICS}: {len(records)} steps thinned to {len(kept)} points for the plot")
        records = kept
    names = []
    for r in records:
        for k, v in r.items():
            if is_number(v) and is_loss_key(k) and k not in names:
                names.append(k)
    order = {"loss": 0, "label_loss": 1, "task_ce": 2, "kd": 3, "feature": 4}
    names.sort(key=lambda k: (order.get(k, 5), k))
    terms = {k: [r.get(k) if is_number(r.get(k)) else None for r in records] for k in names}
    return finite({"step": [r["step"] for r in records], "terms": terms})


def budget_phases(budget) -> list[dict]:
    """Phases in pipeline order (unknown ones after): seconds, FLOPs, tokens and shares
    (the file's, else computed over the phases present when every amount is known)."""
    phases = budget.get("phases") if isinstance(budget, dict) else None
    if not isinstance(phases, dict):
        return []
    names = [p for p in PHASES if p in phases] + sorted(p for p in phases if p not in PHASES)
    rows = []
    for name in names:
        rec = phases[name] if isinstance(phases[name], dict) else {}
        rows.append({"phase": name, **{k: rec.get(k) if is_number(rec.get(k)) else None
                                       for k in ("seconds", "flops", "tokens", "share_seconds", "share_flops")}})
    for key, share in (("seconds", "share_seconds"), ("flops", "share_flops")):
        if any(r[key] is None for r in rows):
            continue  # a phase's amount is unknown: so is every share of the total (n/a)
        total = sum(r[key] for r in rows)
        for r in rows:
            if r[share] is None and total > 0:
                r[share] = r[key] / total
    return rows


def clip(text) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + f"... ({len(text) - MAX_TEXT} more characters)"


def load_run(run_dir: Path, name: str) -> dict:
    """Everything the report shows of one run directory (may hold NaN / inf: `finite` before JSON)."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    notes: list[str] = []
    missing = [f for f in RUN_FILES if not (run_dir / f).is_file()]
    summary = read_json_file(run_dir / rundir.TRAIN_SUMMARY, notes)
    summary = summary if isinstance(summary, dict) else None
    metrics = read_jsonl_file(run_dir / rundir.METRICS, notes)
    ev = read_json_file(run_dir / rundir.EVAL, notes)
    ev = ev if isinstance(ev, dict) else None
    budget = read_json_file(run_dir / rundir.BUDGET, notes)
    alignment = read_jsonl_file(run_dir / rundir.ALIGNMENT, notes)

    steps, steps_from = None, None
    if summary and is_number(summary.get("steps")):
        steps, steps_from = summary["steps"], rundir.TRAIN_SUMMARY
    elif metrics:
        done = [r["step"] for r in metrics if is_number(r.get("step"))]
        steps, steps_from = (max(done), rundir.METRICS) if done else (None, None)
    if steps is None and is_number(dig(config, "train.steps")):
        steps, steps_from = dig(config, "train.steps"), "config (planned)"
    quantized = []  # eval-<scheme>.json: the run's quantized students, shown beside eval.json
    for path in sorted(run_dir.glob("eval-*.json")):
        q = read_json_file(path, notes)
        if isinstance(q, dict):
            quantized.append({"scheme": path.stem.removeprefix("eval-"), "eval": {k: v for k, v in q.items() if k != "samples"}})
    samples = (ev or {}).get("samples")
    samples = [s for s in samples if isinstance(s, dict)][:MAX_SAMPLES] if isinstance(samples, list) else []
    return {
        "name": name,
        "dir": str(run_dir.resolve()),
        "missing": missing,
        "notes": notes,
        "student": model_label(config.get("student")),
        "teacher": model_label(config.get("teacher")) or ("teacher cache" if config.get("teacher_cache") else None),
        "params": summary.get("params") if summary else None,
        "steps": steps,
        "steps_from": steps_from,
        "tokens": summary.get("tokens") if summary else None,
        "wall_s": summary.get("wall_s") if summary else None,
        "objective": {k: dig(config, k) for k in OBJECTIVE_KEYS},
        "metrics": metrics_series(metrics, notes) if metrics else None,
        "eval": {k: v for k, v in ev.items() if k != "samples"} if ev is not None else None,
        "quantized": quantized,
        "samples": [{k: clip(s.get(k)) for k in ("prompt", "generated", "answer", "teacher")} for s in samples],
        "budget": budget_phases(budget) if budget is not None else None,
        "alignment": [r for r in alignment if is_number(r.get("step"))] if alignment is not None else None,
    }


def run_names(run_dirs: list[Path]) -> list[str]:
    """Directory names; equal ones get their parent folder, then a counter if still equal."""
    paths = [Path(d).resolve() for d in run_dirs]
    base = [p.name or str(p) for p in paths]
    names = [f"{p.parent.name}/{b}" if base.count(b) > 1 else b for p, b in zip(paths, base)]
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if names.count(n) == 1 else f"{n} #{seen[n]}")
    return out


def load_runs(run_dirs: list[Path], names: list[str] | None = None) -> list[dict]:
    if not run_dirs:
        raise DistillError("no run directories given")
    if names is not None and len(names) != len(run_dirs):
        raise DistillError(f"{len(names)} names for {len(run_dirs)} run directories")
    names = names if names is not None else run_names(run_dirs)
    return [load_run(Path(d), n) for d, n in zip(run_dirs, names)]
