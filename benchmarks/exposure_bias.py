"""Exposure bias, measured: off-policy KD vs on-policy (GKD) at lmbda 0.5 and 1.0.

    python benchmarks/exposure_bias.py --seeds 0 1 2
    python benchmarks/exposure_bias.py --seeds 0 1 2 --reuse      # re-read finished runs

The built-in task with long step-by-step outputs (6..10 operations: rationales of 25-41
characters before the answer). The teacher is the demo's teacher shape (128 wide, 4
layers, 1.06M params) trained with labels on these chains (trained here once, into
--work/teacher). As in GKD, the student starts from supervised fine-tuning: per seed, a
96-wide, 4-layer student (0.60M params) trained on the gold chains with labels only
(--sft-steps, lr 3e-3): it gets single steps mostly right and whole chains mostly wrong. From that same checkpoint, three distillation runs of --steps steps each
differ only in where each step's completions come from: the dataset's gold chains
(off-policy, lmbda 0) or the student's own samples at sampling temperature 1 (lmbda 0.5:
half the steps, drawn per step; 1.0: every step). Objective: alpha 1 (distillation only),
generalized JSD beta 0.5 at loss temperature 1.

Reports, on the 500 held-out problems: exact-match accuracy of greedy generations and of
sampled ones (temperature 1, one sample per problem, seeded), per run and for the SFT
starting point, then mean and sample sd per variant. Runs go two at a time, one thread each.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

VARIANTS = {"off-policy": 0.0, "on-policy 0.5": 0.5, "on-policy 1.0": 1.0}


def teacher_tree(work: Path) -> dict:
    from distill.pipeline.demo import packaged_config

    tree = packaged_config("demo_teacher")
    tree["data"].update(min_ops=6, max_ops=10)
    tree["train"]["steps"] = 1200
    tree["eval"]["max_new_tokens"] = 64
    tree["out_dir"] = str(work / "teacher")
    return tree


STUDENT_SHAPE = {"hidden_size": 96, "intermediate_size": 384}


def sft_tree(work: Path, seed: int, steps: int) -> dict:
    """The starting point: the student trained on gold chains with labels only."""
    from distill.pipeline.demo import packaged_config

    tree = packaged_config("demo_student")
    tree["student"]["config"].update(STUDENT_SHAPE)
    tree.pop("teacher")
    tree["data"].update(min_ops=6, max_ops=10)
    tree["objective"] = {"alpha": 0.0}
    tree["train"].update(steps=steps, seed=seed, lr=3e-3)
    tree["eval"]["max_new_tokens"] = 64
    tree["out_dir"] = str(work / f"sft-seed{seed}")
    return tree


def student_tree(work: Path, seed: int, lmbda: float, steps: int) -> dict:
    from distill.pipeline.demo import packaged_config

    tree = packaged_config("demo_student")
    tree["student"] = {"name": str(work / f"sft-seed{seed}" / "student")}
    tree["teacher"] = {"name": str(work / "teacher" / "student")}
    tree["data"].update(min_ops=6, max_ops=10)
    tree["objective"] = {"alpha": 1.0, "temperature": 1.0, "divergence": "jsd", "jsd_beta": 0.5}
    tree["train"].update(steps=steps, seed=seed, lr=1e-3, warmup_steps=10)
    tree["on_policy"] = {"lmbda": lmbda, "max_new_tokens": 48, "temperature": 1.0}
    tree["features"] = {"probe_examples": 0}
    tree["eval"]["max_new_tokens"] = 64
    tree["out_dir"] = str(work / f"lmbda{lmbda}-seed{seed}")
    return tree


def launch(tree: dict, work: Path) -> subprocess.Popen:
    cfg = work / f"{Path(tree['out_dir']).name}.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(work / f"{Path(tree['out_dir']).name}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "distill", "train", str(cfg)], env=env, stdout=log, stderr=log)


def run_all(trees: list[dict], work: Path, parallel: int) -> None:
    pending = [t for t in trees if not (Path(t["out_dir"]) / "eval.json").exists()]
    running: list[subprocess.Popen] = []
    while pending or running:
        while pending and len(running) < parallel:
            running.append(launch(pending.pop(0), work))
        time.sleep(2)
        for p in [p for p in running if p.poll() is not None]:
            running.remove(p)
            if p.returncode != 0:
                raise SystemExit(f"a run failed (exit {p.returncode}); see the logs in {work}")


def sampled_accuracy(run_dir: Path, n_test: int, seed: int) -> float:
    import torch

    from distill.data.rows import builtin_rows
    from distill.data.tasks.chain import grade
    from distill.eval.evaluate import generate_sampled, load_student
    from distill.training.rollout import Sampling

    torch.set_num_threads(1)
    model, tok = load_student(run_dir)
    rows = builtin_rows("test", n_test, 0, 6, 10)
    texts = generate_sampled(model, tok, [r.prompt for r in rows], Sampling(64, temperature=1.0), seed, 250)
    return sum(grade(t, r.answer) for t, r in zip(texts, rows)) / len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sft-steps", type=int, default=600)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--work", type=Path, default=Path("runs/bench-exposure"))
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--reuse", action="store_true", help="only read finished runs")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.reuse:
        run_all([teacher_tree(args.work)], args.work, 1)
        run_all([sft_tree(args.work, s, args.sft_steps) for s in args.seeds], args.work, args.parallel)
        trees = [student_tree(args.work, s, lm, args.steps) for s in args.seeds for lm in VARIANTS.values()]
        run_all(trees, args.work, args.parallel)
    teacher = json.loads((args.work / "teacher" / "eval.json").read_text())
    print(f"\nteacher (labels only, 1.06M params): greedy accuracy {teacher['accuracy']:.3f}")
    print(f"student 96 wide, 4 layers: {args.sft_steps} SFT steps, then {args.steps} distillation steps "
          f"(alpha 1, JSD beta 0.5, T 1); 500 held-out chains of 6..10 operations\n")
    print(f"{'variant':<15} {'seed':>4} {'greedy':>7} {'sampled':>8} {'on-policy steps':>16} {'time in rollouts':>17}")
    table: dict[str, dict[str, list[float]]] = {}
    for seed in args.seeds:
        run = Path(sft_tree(args.work, seed, args.sft_steps)["out_dir"])
        if (run / "eval.json").exists():
            ev = json.loads((run / "eval.json").read_text())
            sampled = sampled_accuracy(run, 500, seed)
            table.setdefault("SFT start", {"greedy": [], "sampled": []})
            table["SFT start"]["greedy"].append(ev["accuracy"])
            table["SFT start"]["sampled"].append(sampled)
            print(f"{'SFT start':<15} {seed:>4} {ev['accuracy']:>7.3f} {sampled:>8.3f} {'-':>16} {'-':>17}")
    for name, lmbda in VARIANTS.items():
        for seed in args.seeds:
            run = Path(student_tree(args.work, seed, lmbda, args.steps)["out_dir"])
            if not (run / "eval.json").exists():
                continue
            ev = json.loads((run / "eval.json").read_text())
            metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            sampled = sampled_accuracy(run, 500, seed)
            share = sum(m.get("on_policy", False) for m in metrics) / len(metrics)
            rollout = sum(m.get("rollout_s", 0.0) for m in metrics) / sum(m["step_s"] for m in metrics)
            table.setdefault(name, {"greedy": [], "sampled": []})
            table[name]["greedy"].append(ev["accuracy"])
            table[name]["sampled"].append(sampled)
            print(f"{name:<15} {seed:>4} {ev['accuracy']:>7.3f} {sampled:>8.3f} {share:>16.2f} {rollout:>17.0%}")
    print(f"\n{'variant':<15} {'greedy mean ± sd':>18} {'sampled mean ± sd':>19}  n")
    for name, cols in table.items():
        cells = [f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0:.3f}" for v in cols.values()]
        print(f"{name:<15} {cells[0]:>18} {cells[1]:>19}  {len(cols['greedy'])}")


if __name__ == "__main__":
    main()
