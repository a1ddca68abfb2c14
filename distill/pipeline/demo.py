"""`distill demo`: a teacher, a logit-KD student and a label-only student, one table and
one HTML report (DEMO/report.html).

Offline and on CPU: the teacher is a small llama trained on the built-in task (cached on
disk, keyed by its config), the students have about a tenth of its parameters and the
same data, steps and seed; only the objective differs.
"""

import hashlib
import json
import shutil
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


def cached_teacher(console: Console) -> tuple[Path, dict]:
    """The teacher run directory, trained on first use and reused after.

    It trains in `<key>.partial` beside its final folder (the name it has always had, kept so
    the cache's files stay as they were); then config.yaml, which names the folder the run
    trained in, is pointed at the final folder, and the whole folder is published there."""
    cfg = build_config(packaged_config("demo_teacher"), source="demo_teacher.yaml")
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


def student_run(name: str, out: Path, teacher_dir: Path, alpha: float, seed: int) -> dict:
    tree = packaged_config("demo_student")
    tree["teacher"] = {"name": str(teacher_dir / rundir.STUDENT)} if alpha > 0 else None
    tree["objective"]["alpha"] = alpha
    tree["train"]["seed"] = seed
    tree["out_dir"] = str(out / name)
    fresh_run_dir(out / name)
    return run_training(build_config(tree, source="demo_student.yaml"))


def run_demo(out: Path, seed: int = 0) -> dict:
    console = Console(stderr=True)
    teacher_dir, teacher_train = cached_teacher(console)
    teacher_eval = json.loads((teacher_dir / rundir.EVAL).read_text())
    console.print("[bold]student[/] with logit KD (alpha 0.5, T 2)")
    kd = student_run("student-kd", out, teacher_dir, alpha=0.5, seed=seed)
    console.print("[bold]student[/] on labels only (alpha 0)")
    labels = student_run("student-labels", out, teacher_dir, alpha=0.0, seed=seed)

    rows = [
        ("teacher", teacher_train, teacher_eval, teacher_dir),
        ("student, logit KD", kd["train"], kd["eval"], Path(kd["run_dir"])),
        ("student, labels only", labels["train"], labels["eval"], Path(labels["run_dir"])),
    ]
    table = Table(title=f"distill demo: built-in chain task, {teacher_eval['n']} held-out problems, seed {seed}")
    for col in ("model", "test acc", "held-out CE", "params", "train tok/s", "train s"):
        table.add_column(col, justify="left" if col == "model" else "right", no_wrap=True)
    summary = {"seed": seed, "runs": {}}
    for name, tr, ev, path in rows:
        table.add_row(
            name,
            f"{ev['accuracy']:.1%}",
            f"{ev['heldout_ce']:.3f}",
            f"{tr['params']:,}",
            f"{tr['tokens_per_s']:,.0f}",
            f"{tr['wall_s']:.0f}",
        )
        summary["runs"][name] = {
            "accuracy": ev["accuracy"],
            "heldout_ce": ev["heldout_ce"],
            "params": tr["params"],
            "tokens_per_s": tr["tokens_per_s"],
            "wall_s": tr["wall_s"],
            "run_dir": str(path),
        }
    out_console = Console()
    if not out_console.is_terminal:  # a pipe or log file: do not squeeze the table to 80 columns
        out_console = Console(width=120)
    out_console.print(table)
    for name, _, _, path in rows:
        out_console.print(f"{name:>22}: {path}", soft_wrap=True)
    out.mkdir(parents=True, exist_ok=True)
    report = write_report([p for _, _, _, p in rows], out / "report.html", names=["teacher", "student-kd", "student-labels"])
    out_console.print(f"{'report':>22}: {report}", soft_wrap=True)
    summary["report"] = str(report)
    atomic_write_json(out / "demo.json", summary)
    return summary
