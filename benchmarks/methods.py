"""The method ladder: every distillation method at equal student size, data and steps.

    python benchmarks/methods.py --task chain --seeds 0 1 2 3 4 --write-results docs/results.md
    python benchmarks/methods.py --task grammar --student-config S.yaml --teacher-config T.yaml

Each (method, seed) is one real `run_training` run, one at a time (wall times stay
comparable), into OUT/<method>-seed<s>. Every method is the same base run config (the
student config) with these dotted-key overrides; first every method resets the knobs the
ladder varies to off (features.weight=0, on_policy.lmbda=0, rationale.mode=completion,
teacher_cache=null), and `teacher` is the ladder's teacher in every run:

| method | overrides | tasks |
|---|---|---|
| labels | objective.alpha=0 (labels only; the teacher is unused in training, evaluation still compares with it) | chain, grammar |
| fkl | objective.divergence=forward_kl (alpha and T from the base config) | chain, grammar |
| rkl | objective.divergence=reverse_kl | chain, grammar |
| jsd | objective.divergence=jsd, objective.jsd_beta=0.5 | chain, grammar |
| fkl_feature | objective.divergence=forward_kl, features.weight=1.0 | chain, grammar |
| on_policy_0.5 | on_policy.lmbda=0.5, objective.divergence=jsd, objective.jsd_beta=0.5 (GKD) | chain, grammar |
| on_policy_1 | on_policy.lmbda=1.0, objective.divergence=jsd, objective.jsd_beta=0.5 (GKD) | chain, grammar |
| multitask | objective.alpha=0, rationale.mode=multitask, rationale.weight=1.0 (step-by-step, labels only) | chain |
| answer_only | objective.alpha=0, rationale.mode=answer_only (the label-only baseline of step-by-step) | chain |

On chain the default completion mode is "rationale then answer" (the completion is the
steps, then the answer): `labels` is rationale-then-answer on labels only, and every KD
method distils that completion. Seed s sets train.seed = s (student init, data order,
projector init, on-policy draws: the same for every method at a seed); data.seed stays the
base config's, so every seed and method sees the same data. Everything else is the base's.

Headline metric: chain, held-out exact-match accuracy (greedy; higher is better);
grammar, eval.json truth.kl, the held-out KL(truth || student) per token (lower is
better). Also held-out CE and the training wall time (train_summary.json wall_s). Every
method is paired against `labels` and `fkl` on the same seeds (both always run): mean ± sd,
the paired difference (method - baseline) with its 95% t-interval
(`distill.eval.paired`), and a verdict per comparison. A run folder with eval.json is
reused, so a killed ladder reruns only what is missing.

Teacher: --teacher RUN_DIR, else one trained from --teacher-config (else the packaged
teacher config of the task) into OUT/teacher, unless a cached teacher folder under
cache_root()/teachers (the demo's) holds exactly that config.
"""

import argparse
import copy
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from distill.eval.paired import PairedDiff, mean_sd, paired_difference


@dataclass(frozen=True)
class Task:
    metric: str  # dotted key into eval.json
    about: str
    higher_better: bool
    digits: int
    student_config: str  # packaged config names
    teacher_config: str


GKD = {"objective.divergence": "jsd", "objective.jsd_beta": 0.5}
NEUTRAL = {"features.weight": 0.0, "on_policy.lmbda": 0.0, "rationale.mode": "completion", "teacher_cache": None}
METHODS: dict[str, dict] = {  # method -> dotted-key overrides (the docstring's table)
    "labels": {"objective.alpha": 0.0},
    "fkl": {"objective.divergence": "forward_kl"},
    "rkl": {"objective.divergence": "reverse_kl"},
    "jsd": {"objective.divergence": "jsd", "objective.jsd_beta": 0.5},
    "fkl_feature": {"objective.divergence": "forward_kl", "features.weight": 1.0},
    "on_policy_0.5": {**GKD, "on_policy.lmbda": 0.5},
    "on_policy_1": {**GKD, "on_policy.lmbda": 1.0},
    "multitask": {"objective.alpha": 0.0, "rationale.mode": "multitask", "rationale.weight": 1.0},
    "answer_only": {"objective.alpha": 0.0, "rationale.mode": "answer_only"},
}
CHAIN_ONLY = ("multitask", "answer_only")  # they need rows with a rationale and an answer
BASELINES = ("labels", "fkl")
EXTRA_PAIRS = (("multitask", "answer_only"),)  # step-by-step against its own label-only baseline
TASKS = {
    "chain": Task("accuracy", "held-out exact-match accuracy, greedy", True, 3, "demo_student", "demo_teacher"),
    "grammar": Task("truth.kl", "held-out KL(truth || student) per token", False, 4, "grammar_student", "grammar_teacher"),
}


def task_methods(task: str, wanted: list[str] | None = None) -> list[str]:
    """The methods to run for `task`, in ladder order: the wanted ones (default all that
    apply) plus both baselines; a method that does not apply to the task is an error."""
    names = [m for m in METHODS if task == "chain" or m not in CHAIN_ONLY]
    if wanted is None:
        return names
    for m in wanted:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
        if m not in names:
            raise SystemExit(f"method {m!r} applies to chain only, not --task {task}")
    return [m for m in names if m in wanted or m in BASELINES]


def set_dotted(tree: dict, key: str, value) -> None:
    """tree[a][b][c] = value for key 'a.b.c', creating (or replacing a null) section on the way."""
    *parents, last = key.split(".")
    node = tree
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[last] = value


def dig(tree: dict, key: str):
    """tree[a][b] for 'a.b', or None when a part is missing."""
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def method_tree(base: dict, method: str, seed: int, teacher_model: str, run_dir: Path, steps: int | None = None) -> dict:
    """The run config of one (method, seed): the base tree, the resets, the method's
    overrides, the ladder's teacher, train.seed = seed, optional train.steps, out_dir."""
    tree = copy.deepcopy(base)
    for key, value in {**NEUTRAL, **METHODS[method]}.items():
        set_dotted(tree, key, value)
    tree["teacher"] = {"name": teacher_model}
    set_dotted(tree, "train.seed", seed)
    if steps is not None:
        set_dotted(tree, "train.steps", steps)
    tree["out_dir"] = str(run_dir)
    return tree


def packaged_or_none(name: str) -> dict | None:
    """A packaged config (distill/configs/NAME.yaml) as a tree, or None when there is none."""
    from distill.errors import ConfigError
    from distill.pipeline.demo import packaged_config

    try:
        return packaged_config(name)
    except ConfigError:
        return None


def base_tree(task: str, path: Path | None) -> dict:
    """The student config every method modifies: --student-config, else the packaged one."""
    from distill.config import build_config, read_yaml

    tree = read_yaml(path) if path is not None else packaged_or_none(TASKS[task].student_config)
    if tree is None:
        raise SystemExit(f"--task {task}: no packaged {TASKS[task].student_config} config; pass --student-config YAML")
    source = dig(tree, "data.source") or "builtin:chain"
    if source != f"builtin:{task}":
        raise SystemExit(f"--task {task}, but the student config's data.source is {source!r}")
    probe = copy.deepcopy(tree)
    probe["teacher"] = {"name": "teacher"}
    if build_config(probe, source=str(path or TASKS[task].student_config)).objective.alpha == 0:
        raise SystemExit("the student config's objective.alpha is 0; the KD methods take alpha from it: set it (e.g. 0.5)")
    return tree


def same_config(a, b) -> bool:
    """Two RunConfigs equal in everything but out_dir."""
    da, db = a.model_dump(mode="json"), b.model_dump(mode="json")
    da.pop("out_dir"), db.pop("out_dir")
    return da == db


def cached_teacher_dir(cfg) -> Path | None:
    """A finished teacher run under cache_root()/teachers (where `distill demo` keeps its
    teacher) trained from exactly this config, or None."""
    from distill.config import load_config
    from distill.errors import ConfigError
    from distill.paths import cache_root

    for d in sorted((cache_root() / "teachers").glob("*/")):
        if (d / "eval.json").exists() and (d / "student" / "config.json").exists() and (d / "config.yaml").exists():
            try:
                if same_config(load_config(d / "config.yaml"), cfg):
                    return d
            except ConfigError:
                continue
    return None


def fresh_run_dir(path: Path) -> None:
    """Clear a previous (unfinished) run in `path`; refuse to delete anything else, or a run
    another process is training (it holds the run's lock)."""
    from distill.errors import DistillError
    from distill.training.resume import lock_run_dir, release_run_dir

    if path.exists():
        if any(path.iterdir()) and not (path / "config.yaml").exists():
            raise SystemExit(f"{path} exists and is not a run folder; choose another --out")
        try:  # another ladder training this run right now holds its lock: never delete under it
            lock_run_dir(path)
        except DistillError as e:
            raise SystemExit(str(e)) from None
        release_run_dir(path)
        shutil.rmtree(path)


def run_once(cfg) -> dict:
    """Train and evaluate `cfg` into cfg.out_dir, unless it is done: a folder with eval.json
    is reused; one with a finished training (train_summary.json) is only evaluated; a run
    of another config there is an error (never silently reused)."""
    from distill.config import load_config
    from distill.pipeline.runner import run_eval, run_training

    run_dir = Path(cfg.out_dir)
    if (run_dir / "config.yaml").exists() and not same_config(load_config(run_dir / "config.yaml"), cfg):
        raise SystemExit(f"{run_dir} holds a run of another config (other --steps or base config?); delete it or use another --out")
    if not (run_dir / "eval.json").exists():
        if (run_dir / "train_summary.json").exists() and (run_dir / "student" / "config.json").exists():
            run_eval(str(run_dir))
        else:
            fresh_run_dir(run_dir)
            run_training(cfg)
    return {name: json.loads((run_dir / f"{name}.json").read_text()) for name in ("eval", "train_summary")}


def resolve_teacher(args, student_base: dict) -> Path:
    """The teacher run folder: --teacher, a cached one of the teacher config, or one trained
    into OUT/teacher. Its data (source and seed) must be the students'."""
    from distill.config import build_config, load_config, read_yaml

    if args.teacher is not None:
        if not (args.teacher / "student" / "config.json").exists():
            raise SystemExit(f"--teacher {args.teacher}: not a finished run folder (no student/config.json)")
        cfg = load_config(args.teacher / "config.yaml")
        found = args.teacher
    else:
        name = TASKS[args.task].teacher_config
        tree = read_yaml(args.teacher_config) if args.teacher_config else packaged_or_none(name)
        if tree is None:
            raise SystemExit(f"--task {args.task}: no packaged {name} config; pass --teacher RUN_DIR or --teacher-config YAML")
        cfg = build_config(tree, source=str(args.teacher_config or name))
        found = cached_teacher_dir(cfg)
        if found is None:
            cfg.out_dir = str(args.out / "teacher")
            print(f"teacher: training into {cfg.out_dir}", file=sys.stderr)
            run_once(cfg)
            found = args.out / "teacher"
    data = student_base.get("data") or {}
    if (cfg.data.source, cfg.data.seed) != (data.get("source", "builtin:chain"), data.get("seed", 0)):
        raise SystemExit(f"teacher {found} learned {cfg.data.source} with data.seed {cfg.data.seed}; the students' data differs")
    return found


def metric_row(task: str, eval_json: dict, summary: dict) -> dict:
    """The numbers the table needs from one run; nan where the run has none."""
    def num(v) -> float:
        return float(v) if isinstance(v, (int, float)) else math.nan

    return {"metric": num(dig(eval_json, TASKS[task].metric)), "heldout_ce": num(eval_json.get("heldout_ce")),
            "wall_s": num(summary.get("wall_s"))}


def verdict(d: PairedDiff, higher_better: bool) -> str:
    """'better', 'worse' or 'no detectable difference' (the interval holds 0), or 'not
    measured' when a run has no value (a diverged run is not averaged away)."""
    if math.isnan(d.diff_mean) or math.isnan(d.ci_low):
        return "not measured (a run has no value)"
    if not d.excludes_zero:
        return "no detectable difference"
    return "better" if (d.diff_mean > 0) == higher_better else "worse"


def pm(values: list[float], digits: int) -> str:
    m, s = mean_sd(values)
    return f"{m:.{digits}f} ± " + ("n/a" if math.isnan(s) else f"{s:.{digits}f}")


def format_table(task: str, results: dict[str, dict[int, dict]], seeds: list[int]) -> list[str]:
    """Markdown: one row per method (per-seed values, mean ± sd, paired differences against
    the baselines with 95% intervals, held-out CE, wall time), then one verdict line each."""
    spec, digits = TASKS[task], TASKS[task].digits
    nan = {"metric": math.nan, "heldout_ce": math.nan, "wall_s": math.nan}

    def col(m: str, key: str = "metric") -> list[float]:
        return [results.get(m, {}).get(s, nan)[key] for s in seeds]

    def diff(m: str, base: str) -> PairedDiff | None:
        return paired_difference(col(m), col(base)) if m != base and base in results and len(seeds) >= 2 else None

    head = f"| method | {spec.metric} per seed ({', '.join(map(str, seeds))}) | mean ± sd | vs labels [95% CI] | "
    lines = [head + "vs fkl [95% CI] | held-out CE mean ± sd | wall s (mean) |", "|---|---|---|---|---|---|---|"]
    verdicts = []
    for m in results:
        diffs = {b: diff(m, b) for b in BASELINES}
        cells = [d.format(digits) if d else "—" for d in diffs.values()]
        per_seed = ", ".join(f"{v:.{digits}f}" for v in col(m))
        lines.append(f"| {m} | {per_seed} | {pm(col(m), digits)} | {cells[0]} | {cells[1]} | "
                     f"{pm(col(m, 'heldout_ce'), 3)} | {mean_sd(col(m, 'wall_s'))[0]:.1f} |")
        said = [f"vs {b}: {verdict(d, spec.higher_better)} ({d.format(digits)})" for b, d in diffs.items() if d]
        verdicts.append(f"- {m}: " + ("; ".join(said) or "baseline"))
    for a, b in EXTRA_PAIRS:
        if a in results and b in results and (d := diff(a, b)):
            verdicts.append(f"- {a} vs {b}: {verdict(d, spec.higher_better)} ({d.format(digits)})")
    direction = "higher" if spec.higher_better else "lower"
    return lines + ["", f"Differences are method minus baseline on the same seed ({spec.metric}: {direction} is better):", ""] + verdicts


def machine() -> str:
    """CPU model, CPUs available, torch version and threads, the GPU if any (read now)."""
    import torch

    try:
        out = subprocess.run(["lscpu"], check=False, capture_output=True, text=True, timeout=10).stdout
        cpu = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), platform.processor())
    except (OSError, subprocess.SubprocessError):
        cpu = platform.processor() or "unknown CPU"
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {len(os.sched_getaffinity(0))} CPUs (nproc), torch {torch.__version__} with {torch.get_num_threads()} threads{gpu}"


def section(task: str, body: list[str], setup: list[str]) -> list[str]:
    """The results-file section: heading, machine, command, date, setup, table, verdicts."""
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = shlex.join(["python", *sys.argv])
    return [f"## Method ladder: {task}", "", f"- Machine: {machine()}", f"- Command: `{command}`", f"- Date: {when}",
            *setup, "", *body, ""]


def write_section(path: Path, heading: str, lines: list[str]) -> None:
    """Put `lines` (starting with `heading`) into the markdown file at `path`: replace the
    section with that heading (up to the next '# ' or '## ' heading) or append it."""
    old = path.read_text().splitlines() if path.exists() else []
    start = next((i for i, ln in enumerate(old) if ln.rstrip() == heading), None)
    if start is None:
        new = old + ([""] if old and old[-1].strip() else []) + lines
    else:
        end = next((j for j in range(start + 1, len(old)) if old[j].startswith(("# ", "## "))), len(old))
        new = old[:start] + lines + ([""] if end < len(old) and lines and lines[-1].strip() else []) + old[end:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(new).rstrip("\n") + "\n")


def ladder_configs(args, base: dict, teacher: Path, methods: list[str]) -> list[tuple[str, int, object]]:
    """(method, seed, RunConfig) of every run, seed-major (a stopped ladder has whole seeds
    done); a config the schema refuses stops here, before anything trains."""
    from distill.config import build_config

    return [
        (m, s, build_config(method_tree(base, m, s, str(teacher / "student"), args.out / f"{m}-seed{s}", args.steps), f"{m} seed {s}"))
        for s in args.seeds
        for m in methods
    ]


def run_ladder(args, base: dict, teacher: Path, methods: list[str]) -> tuple[dict, dict]:
    """Every (method, seed), one at a time -> (numbers, run folders), both {method: {seed: ...}}."""
    results: dict[str, dict[int, dict]] = {m: {} for m in methods}
    dirs: dict[str, dict[int, Path]] = {m: {} for m in methods}
    for m, s, cfg in ladder_configs(args, base, teacher, methods):
        print(f"{m} seed {s}: {cfg.out_dir}", file=sys.stderr)
        got = run_once(cfg)
        results[m][s] = metric_row(args.task, got["eval"], got["train_summary"])
        dirs[m][s] = Path(cfg.out_dir)
    return results, dirs


def setup_lines(args, base: dict, teacher: Path) -> list[str]:
    """What the runs share: teacher, base config, steps, seeds, data seed, metric."""
    spec = TASKS[args.task]
    t_eval = json.loads((teacher / "eval.json").read_text())
    steps = args.steps or dig(base, "train.steps") or "the schema default"
    student = args.student_config or f"packaged {spec.student_config}"
    seeds = " ".join(map(str, args.seeds))
    better = "higher" if spec.higher_better else "lower"
    lines = [
        f"- Teacher: `{teacher}` ({spec.metric} {metric_row(args.task, t_eval, {})['metric']:.{spec.digits}f})",
        f"- Students: {student}, {steps} steps, seeds {seeds} (train.seed), data.seed {dig(base, 'data.seed') or 0} for all",
        f"- Metric: {spec.metric}, {spec.about} ({better} is better); intervals: 95% t over the paired seeds",
    ]
    if args.task == "chain":
        lines.append("- On chain `labels` and every KD method learn the completion: rationale then answer. Held-out CE "
                     "is over each method's own targets (the answer alone for multitask and answer_only): not comparable across modes.")
    if len(args.seeds) < 3:
        lines.append(f"- Only {len(args.seeds)} seed(s): below the project's standard of at least 3 (5 here).")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=sorted(TASKS), required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--methods", nargs="+", default=None, help=f"default: all that apply ({', '.join(METHODS)})")
    ap.add_argument("--out", type=Path, default=None, help="run folders (default benchmarks-out/methods-<task>)")
    ap.add_argument("--steps", type=int, default=None, help="train.steps for every run (default: the student config's)")
    ap.add_argument("--teacher", type=Path, default=None, help="a trained teacher run folder")
    ap.add_argument("--teacher-config", type=Path, default=None, help="YAML of the teacher to train when --teacher is not given")
    ap.add_argument("--student-config", type=Path, default=None, help="YAML of the student run every method modifies")
    ap.add_argument("--write-results", type=Path, default=None, help="markdown file to put the '## Method ladder: <task>' section in")
    ap.add_argument("--report", type=Path, default=None, help="report page (default OUT/report.html)")
    ap.add_argument("--report-all", action="store_true", help="every seed's runs in the report, not only the first seed's")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (default torch's)")
    args = ap.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        ap.error("--seeds repeats a seed (pairs would count it twice)")
    args.out = args.out or Path("benchmarks-out") / f"methods-{args.task}"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    methods = task_methods(args.task, args.methods)  # checked before anything trains
    base = base_tree(args.task, args.student_config)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    ladder_configs(args, base, Path("TEACHER"), methods)  # every config checked before the teacher trains
    args.out.mkdir(parents=True, exist_ok=True)
    teacher = resolve_teacher(args, base)
    results, dirs = run_ladder(args, base, teacher, methods)
    lines = section(args.task, format_table(args.task, results, args.seeds), setup_lines(args, base, teacher))
    print("\n".join(lines))
    if args.write_results:
        write_section(args.write_results, lines[0], lines)
    from distill.report import write_report

    seeds = args.seeds if args.report_all else args.seeds[:1]
    pairs = [("teacher", teacher)] + [(f"{m}-seed{s}", dirs[m][s]) for s in seeds for m in methods]
    report = write_report([d for _, d in pairs], args.report or args.out / "report.html", names=[n for n, _ in pairs])
    print(f"\nreport: {report}", file=sys.stderr)


if __name__ == "__main__":
    main()
