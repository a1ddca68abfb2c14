"""`distill demo`: a teacher, a logit-KD student and a label-only student, one table, the
gain in one line, and one HTML report (DEMO/report.html).

Offline and on CPU: the teacher is a small llama trained on a built-in task with plenty of
data (cached on disk, keyed by its config); the students are much smaller and share their
data (a small transfer set), steps, initialisation and seed; only the objective differs.

Tasks (`--task`):
    grammar  (default) a stochastic grammar whose true next-token distribution is known;
             headline: held-out KL to the truth, nats per token (lower is better)
    chain    the deterministic reasoning chain; headline: exact-match accuracy
"""

import hashlib
import json
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from distill import __version__, rundir
from distill.config import RunConfig, build_config, dump_config, read_yaml
from distill.errors import DistillError
from distill.paths import atomic_write_json, cache_root, publish_folder
from distill.pipeline.runner import run_training
from distill.report import write_report


def packaged_config(name: str) -> dict:
    return read_yaml(Path(str(resources.files("distill") / "configs" / f"{name}.yaml")))


def teacher_key(cfg: RunConfig) -> str:
    """Hash of everything that shapes the teacher (not where it is written)."""
    tree = cfg.model_dump(mode="json")
    tree.pop("out_dir")
    blob = json.dumps({"config": tree, "version": __version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]




@dataclass(frozen=True)
class DemoTask:
    teacher_config: str  # packaged config names (distill/configs/)
    student_config: str
    metric: str  # the headline's name in the table
    lower_is_better: bool

    def headline(self, ev: dict) -> float:
        return ev["truth"]["kl"] if self.lower_is_better else ev["accuracy"]

    def shown(self, value: float) -> str:
        return f"{value:.4f}" if self.lower_is_better else f"{value:.1%}"


TASKS = {
    "grammar": DemoTask("grammar_teacher", "grammar_student", "KL to truth", lower_is_better=True),
    "chain": DemoTask("demo_teacher", "demo_student", "test acc", lower_is_better=False),
}


def cached_teacher(console: Console, task: DemoTask) -> tuple[Path, dict]:
    """The teacher run directory, trained on first use and reused after.

    It trains in `<key>.partial` beside its final folder (the name it has always had, kept so
    the cache's files stay as they were); then config.yaml, which names the folder the run
    trained in, is pointed at the final folder, and the whole folder is published there."""
    cfg = build_config(packaged_config(task.teacher_config), source=f"{task.teacher_config}.yaml")
    final = cache_root() / "teachers" / teacher_key(cfg)
    if (final / rundir.STUDENT / "config.json").exists() and (final / rundir.EVAL).exists():
        console.print(f"[green]teacher[/] reused from cache: {final}")
        return final, json.loads((final / rundir.TRAIN_SUMMARY).read_text())
    console.print(f"[bold]teacher[/]: training once, cached at {final}")
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)  # a killed first try left it
    cfg.out_dir = str(tmp)
    result = run_training(cfg)
    (tmp / rundir.CONFIG).write_text(dump_config(cfg.model_copy(update={"out_dir": str(final)})))
    publish_folder(tmp, final)
    return final, result["train"]


def fresh_run_dir(path: Path) -> None:
    """The demo owns its run folders: clear a previous demo's run, never anything else."""
    if path.exists():
        if not (path / rundir.CONFIG).exists():
            raise DistillError(f"{path} exists and is not a run directory; choose another --out")
        shutil.rmtree(path)


def student_run(name: str, out: Path, teacher_dir: Path, task: DemoTask, kd: bool, seed: int) -> dict:
    """One student: the packaged config's logit KD, or (kd False) the same run on labels alone."""
    tree = packaged_config(task.student_config)
    tree["teacher"] = {"name": str(teacher_dir / rundir.STUDENT)} if kd else None
    if not kd:
        tree["objective"]["alpha"] = 0.0
    tree["train"]["seed"] = seed
    tree["out_dir"] = str(out / name)
    fresh_run_dir(out / name)
    return run_training(build_config(tree, source=f"{task.student_config}.yaml"))


def gain_line(task: DemoTask, kd: float, labels: float, seed: int) -> str:
    """The comparison in one sentence, with what it means."""
    diff = labels - kd if task.lower_is_better else kd - labels
    verdict = "better" if diff > 0 else "worse" if diff < 0 else "no different"
    if task.lower_is_better:
        return (
            f"gain: logit KD left the student {abs(diff):.4f} nats/token {'closer to' if diff > 0 else 'further from'} the true "
            f"distribution than labels alone (KL {kd:.4f} vs {labels:.4f}: {verdict}; same data, init and steps, seed {seed})"
        )
    return (
        f"gain: logit KD {'raised' if diff > 0 else 'lowered'} held-out accuracy by {abs(diff):.1%} over labels alone "
        f"({kd:.1%} vs {labels:.1%}: {verdict}; same data, init and steps, seed {seed})"
    )


def demo_table(task_name: str, task: DemoTask, rows: list, n: int, seed: int) -> Table:
    table = Table(title=f"distill demo: built-in {task_name} task, {n} held-out rows, seed {seed}")
    for col in ("model", task.metric, "held-out CE", "params", "train tok/s", "train s"):
        table.add_column(col, justify="left" if col == "model" else "right", no_wrap=True)
    for name, tr, ev, _ in rows:
        table.add_row(
            name, task.shown(task.headline(ev)), f"{ev['heldout_ce']:.3f}", f"{tr['params']:,}",
            f"{tr['tokens_per_s']:,.0f}", f"{tr['wall_s']:.0f}",
        )
    return table


def run_demo(out: Path, seed: int = 0, task_name: str = "grammar") -> dict:
    if task_name not in TASKS:
        raise DistillError(f"--task must be one of {', '.join(TASKS)}, got {task_name!r}")
    task, console = TASKS[task_name], Console(stderr=True)
    teacher_dir, teacher_train = cached_teacher(console, task)
    teacher_eval = json.loads((teacher_dir / rundir.EVAL).read_text())
    console.print("[bold]student[/] with logit KD")
    kd = student_run("student-kd", out, teacher_dir, task, kd=True, seed=seed)
    console.print("[bold]student[/] on labels only (alpha 0)")
    labels = student_run("student-labels", out, teacher_dir, task, kd=False, seed=seed)
    rows = [
        ("teacher", teacher_train, teacher_eval, teacher_dir),
        ("student, logit KD", kd["train"], kd["eval"], Path(kd["run_dir"])),
        ("student, labels only", labels["train"], labels["eval"], Path(labels["run_dir"])),
    ]
    summary: dict = {"task": task_name, "metric": task.metric, "seed": seed, "runs": {}}
    for name, tr, ev, path in rows:
        summary["runs"][name] = {
            "headline": task.headline(ev), "accuracy": ev.get("accuracy"), "heldout_ce": ev["heldout_ce"],
            "params": tr["params"], "tokens_per_s": tr["tokens_per_s"], "wall_s": tr["wall_s"], "run_dir": str(path),
        }
    gain = gain_line(task, task.headline(kd["eval"]), task.headline(labels["eval"]), seed)
    out_console = Console()
    if not out_console.is_terminal:  # a pipe or log file: do not squeeze the table to 80 columns
        out_console = Console(width=120)
    out_console.print(demo_table(task_name, task, rows, teacher_eval["n"], seed))
    if "truth" in teacher_eval:
        out_console.print(f"the true distribution's entropy is {teacher_eval['truth']['entropy']:.4f} nats/token "
                          f"(the floor of the held-out CE)", soft_wrap=True)
    out_console.print(gain, soft_wrap=True)
    for name, _, _, path in rows:
        out_console.print(f"{name:>22}: {path}", soft_wrap=True)
    out.mkdir(parents=True, exist_ok=True)
    report = write_report([p for _, _, _, p in rows], out / "report.html", names=["teacher", "student-kd", "student-labels"])
    out_console.print(f"{'report':>22}: {report}", soft_wrap=True)
    summary.update(gain=gain, report=str(report))
    atomic_write_json(out / "demo.json", summary)
    return summary
