"""The run folder's guards: one run at a time, a fresh run never mixed into another's logs,
a resume that continues the run its config.yaml describes from its newest intact checkpoint.

    open_run_dir(acc, cfg, resume, examples)   before anything is written: batch size against
                                               the data, the lock, the fresh-run or resume
                                               checks; then config.yaml
    resume_from(acc, run_dir, trained, ...)    restore the newest intact checkpoint

A resume may change only the extension keys (`EXTENSION_KEYS`: how long the run goes, how
often it checkpoints and probes, how the processes hold the models, its evaluation and
gates); any other key that differs from the run's config.yaml (models, data, objective, batch layout, seeds, optimizer) is
refused, naming the keys, since the run's record would otherwise describe a run that never
happened.
"""

import os
import shutil
import sys
from pathlib import Path

from distill import rundir
from distill.config import RunConfig, dump_config, load_config
from distill.errors import ConfigError, DistillError
from distill.paths import atomic_write_text, file_mode
from distill.training.checkpoint import checkpoint_problem, checkpoint_step, load_training_state, trim_log

try:
    import fcntl
except ImportError:  # no flock (Windows): runs are not locked there
    fcntl = None

LOCK = ".lock"
# Keys a resume may change (a key, or every key under a section).
EXTENSION_KEYS = (
    "train.steps",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.report_to",
    "train.tracker_project",
    "train.sharding",  # how the processes hold the models: the steps do not depend on it
    "train.teacher_sharding",
    "features.probe_every",
    "eval",
    "gates",
    "out_dir",
)
_held: dict[str, int] = {}  # resolved run folder -> the descriptor holding its lock in this process


def _flat(tree, prefix: str = "") -> dict:
    """{"a.b": value} for every leaf of nested dicts (lists are leaves)."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return {k.rstrip("."): v for k, v in out.items()}


def changed_keys(old: RunConfig, new: RunConfig) -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) for every leaf that differs."""
    a, b = _flat(old.model_dump(mode="json")), _flat(new.model_dump(mode="json"))
    missing = object()
    out = []
    for key in sorted(a.keys() | b.keys()):
        x, y = a.get(key, missing), b.get(key, missing)
        if x != y:
            out.append((key, None if x is missing else x, None if y is missing else y))
    return out


def is_extension(key: str) -> bool:
    return any(key == e or key.startswith(e + ".") for e in EXTENSION_KEYS)


def with_model_dtypes(cfg: RunConfig) -> RunConfig:
    """`cfg` with every null model dtype replaced by the dtype it loads in here
    (`weights_dtype`): a run whose config.yaml says float32 (the default before null) and
    one that leaves it null load the same weights, and resume as the same run."""
    from distill.models.build import weights_dtype

    cfg = cfg.model_copy(deep=True)
    for role in ("student", "teacher"):
        model = getattr(cfg, role)
        if model is not None and model.dtype is None:
            model.dtype = weights_dtype(model, role)  # type: ignore[assignment]
    return cfg


def check_resume_config(run_dir: Path, cfg: RunConfig) -> None:
    """Refuse a resume whose config changes an identity key of the run's config.yaml."""
    path = Path(run_dir) / rundir.CONFIG
    if not path.is_file():
        return
    old, new = with_model_dtypes(load_config(path)), with_model_dtypes(cfg)
    identity = [c for c in changed_keys(old, new) if not is_extension(c[0])]
    if identity:
        shown = ", ".join(f"{k} ({a!r} -> {b!r})" for k, a, b in identity[:4])
        more = f" and {len(identity) - 4} more" if len(identity) > 4 else ""
        raise ConfigError(
            f"{path}: a resume continues this run, but the config changes {shown}{more}; only "
            f"{', '.join(EXTENSION_KEYS[:-1])} may change on resume: start a new run (another out_dir) instead"
        )


def check_fresh(run_dir: Path) -> None:
    """Refuse a fresh run into a folder that holds another run's checkpoints or logs."""
    run_dir = Path(run_dir)
    found = [rundir.CHECKPOINTS] if rundir.checkpoints(run_dir) else []
    for name in (rundir.METRICS, rundir.ALIGNMENT, rundir.TRAIN_SUMMARY):
        path = run_dir / name
        if path.is_file() and path.stat().st_size > 0:
            found.append(name)
    if found:
        raise DistillError(
            f"{run_dir} already holds a run ({', '.join(found)}); resume it with --resume {run_dir} or pick another out_dir"
        )


def check_batch(cfg: RunConfig, examples: list, n_processes: int) -> None:
    """A global batch (micro_batch_size x grad_accum x processes) no larger than the training
    rows (a packed block counts the rows in it): a runaway size stops here, not after minutes."""
    t = cfg.train
    rows = sum(e.position_ids.count(0) if e.position_ids is not None else 1 for e in examples)
    size = t.micro_batch_size * t.grad_accum * n_processes
    if size > rows:
        raise ConfigError(
            f"train.micro_batch_size={t.micro_batch_size} x train.grad_accum={t.grad_accum} x {n_processes} process(es) "
            f"= {size:,} examples per step, more than the {rows:,} training rows; lower them or add data"
        )


def lock_run_dir(run_dir: Path) -> None:
    """Hold RUN/.lock (flock) until `release_run_dir` or the process ends; another process
    holding it is a DistillError. Taking it again in the same process is a no-op."""
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if fcntl is None or key in _held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, file_mode())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DistillError(
            f"{run_dir} is in use by another distill process (it holds {run_dir / LOCK}); "
            "wait for it to end, or pick another out_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for a curious reader
    _held[key] = fd


def release_run_dir(run_dir: Path) -> None:
    fd = _held.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def _agree(acc, error: str | None) -> None:
    """Raise the main process's error on every process (the others would wait forever)."""
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [error]
        broadcast_object_list(box, from_process=0)
        error = box[0]
    if error:
        raise DistillError(error)


def open_run_dir(acc, cfg: RunConfig, resume: bool, examples: list) -> None:
    """Every check that needs the run folder, before anything is written to it, then
    config.yaml. A check that fails leaves a folder it created as it found it (absent)."""
    run_dir = Path(cfg.out_dir)
    check_batch(cfg, examples, acc.num_processes)
    existed = run_dir.exists()
    error = None
    if acc.is_main_process:
        try:
            lock_run_dir(run_dir)
        except DistillError as e:
            error = str(e)
    _agree(acc, error)
    try:
        if resume:
            check_resume_config(run_dir, cfg)
        else:
            check_fresh(run_dir)
    except BaseException:
        if acc.is_main_process:
            release_run_dir(run_dir)
            if not existed:
                (run_dir / LOCK).unlink(missing_ok=True)
                if not any(run_dir.iterdir()):
                    run_dir.rmdir()
        raise
    if acc.is_main_process:
        atomic_write_text(run_dir / rundir.CONFIG, dump_config(cfg))
    acc.wait_for_everyone()


def resume_from(acc, run_dir: Path, trained: list, optimizer, scheduler) -> tuple[int, Path | None]:
    """Restore the newest intact checkpoint; records of later steps are dropped (they are
    redone). A damaged newer checkpoint is named in one line and removed (its steps are
    redone); with no checkpoint yet the run starts over from step 0, its logs emptied."""
    run_dir = Path(run_dir)
    found = rundir.checkpoints(run_dir)
    say = (lambda text: print(text, file=sys.stderr)) if acc.is_main_process else (lambda text: None)
    if not found:
        say(f"{run_dir}: no checkpoint yet; the run starts over from step 0")
        if acc.is_main_process:
            trim_log(run_dir / rundir.METRICS, -1)
            trim_log(run_dir / rundir.ALIGNMENT, -1)
        acc.wait_for_everyone()
        return 0, None
    damaged = []
    for folder in reversed(found):
        problem = checkpoint_problem(folder, len(trained), acc.num_processes)
        if problem is None:
            break
        damaged.append((folder, problem))
    else:
        why = "; ".join(f"{f.name}: {p}" for f, p in damaged)
        raise DistillError(f"{run_dir}: no intact checkpoint to resume from ({why})")
    if damaged:
        names = ", ".join(f"{f.name} ({p})" for f, p in damaged)
        say(f"{run_dir}: damaged checkpoint {names} set aside; resuming from {folder.name}")
    acc.wait_for_everyone()
    if acc.is_main_process:
        for bad, _ in damaged:  # its steps are about to be redone; it could never be read
            aside = bad.with_name(f".damaged-{bad.name}")
            shutil.rmtree(aside, ignore_errors=True)
            bad.rename(aside)
    load_training_state(acc, trained, optimizer, scheduler, folder)
    start = checkpoint_step(folder)
    if acc.is_main_process:
        trim_log(run_dir / rundir.METRICS, start)
        trim_log(run_dir / rundir.ALIGNMENT, start)
    acc.wait_for_everyone()
    return start, folder
