"""Rationale distillation on the built-in task: label-only vs step-by-step vs rationale-then-answer.

    python benchmarks/rationale.py --out /tmp/rationale [--n 10000] [--samples 3] [--seeds 0 1 2]

1. The teacher is the demo's (a 1.06M-parameter llama trained on the task; trained once and
   cached like `distill demo` does).
2. `distill generate` has it write rationale + answer for n training prompts, `samples`
   each at temperature 0.7; `distill curate` keeps the consistent, majority, correct ones.
3. Students of the demo's size train on the same curated rows, steps and seeds, labels only
   (objective.alpha 0), in three ways (`rationale.mode`): answer_only (the label-only
   baseline), multitask (Distilling Step-by-Step, lambda 1) and completion (rationale then
   answer as one target). Each is evaluated on the task's 500 held-out problems, greedy, exact.

Prints the accuracy table (mean and standard deviation over seeds) and the teacher cost of
the rationales from generate's budget.json. Runs go `--parallel` at a time, one thread each.
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

MODES = ("answer_only", "multitask", "completion")


def prepare(out: Path, n: int, samples: int) -> tuple[Path, Path, dict, dict]:
    from rich.console import Console

    from distill.data.rows import builtin_rows
    from distill.pipeline.curate import CurateSettings, write_curated
    from distill.pipeline.demo import cached_teacher
    from distill.pipeline.generate import GenerateSettings, run_generate

    teacher_dir, _ = cached_teacher(Console(stderr=True))
    gen_dir = out / "generations"
    settings = GenerateSettings(temperature=0.7, max_new_tokens=48, samples=samples, seed=0)
    run_generate("builtin:chain", gen_dir, settings, teacher=str(teacher_dir / "student"), n=n, batch_size=512, chat_template=False)
    summary = write_curated(gen_dir, gen_dir / "curated.jsonl", CurateSettings(answer_format="chain"))
    test = out / "test.jsonl"
    rows = builtin_rows("test", 500, 0, 3, 6)
    test.write_text("".join(json.dumps({"prompt": r.prompt, "completion": r.completion, "answer": r.answer, "rationale": r.rationale}) + "\n" for r in rows))
    budget = json.loads((gen_dir / "budget.json").read_text())["phases"]["teacher_generation"]
    return gen_dir / "curated.jsonl", test, summary, budget


def run_config(out: Path, curated: Path, test: Path, mode: str, seed: int, steps: int) -> Path:
    from distill.pipeline.demo import packaged_config

    tree = packaged_config("demo_student")
    tree["teacher"] = None
    tree["objective"]["alpha"] = 0.0
    tree["data"].update(source=str(curated), eval_source=str(test), n_test=500)
    tree["train"].update(seed=seed, steps=steps)
    tree["eval"]["answer_format"] = "chain"
    tree["rationale"] = {"mode": mode, "weight": 1.0}
    tree["out_dir"] = str(out / f"{mode}-seed{seed}")
    path = out / "configs" / f"{mode}-seed{seed}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=10000, help="training prompts given to the teacher")
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--parallel", type=int, default=2)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    curated, test, curation, budget = prepare(args.out, args.n, args.samples)

    jobs = [(m, s) for s in args.seeds for m in MODES]
    pending = [(m, s, run_config(args.out, curated, test, m, s, args.steps)) for m, s in jobs]
    running: list[tuple[str, int, subprocess.Popen]] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    while pending or running:
        while pending and len(running) < args.parallel:
            m, s, cfg = pending.pop(0)
            run_dir = args.out / f"{m}-seed{s}"
            if (run_dir / "eval.json").exists():
                continue
            log = open(args.out / f"{m}-seed{s}.log", "w")
            cmd = [sys.executable, "-m", "distill", "train", str(cfg)]
            running.append((m, s, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)))
        time.sleep(2)
        for item in list(running):
            if item[2].poll() is not None:
                running.remove(item)
                if item[2].returncode != 0:
                    sys.exit(f"run {item[0]} seed {item[1]} failed: see {args.out}/{item[0]}-seed{item[1]}.log")

    print(f"\nteacher: the demo's; {args.n} prompts x {args.samples} samples at T 0.7; students: demo size, "
          f"{args.steps} steps, labels only, seeds {args.seeds}\n")
    print("| student target | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean ± sd | train s (mean) |")
    print("|---|" + "---|" * (len(args.seeds) + 2))
    for m in MODES:
        accs = [json.loads((args.out / f"{m}-seed{s}" / "eval.json").read_text())["accuracy"] for s in args.seeds]
        secs = [json.loads((args.out / f"{m}-seed{s}" / "train_summary.json").read_text())["wall_s"] for s in args.seeds]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"| {m} | " + " | ".join(f"{a:.3f}" for a in accs) + f" | {statistics.mean(accs):.3f} ± {sd:.3f} | {statistics.mean(secs):.0f} |")
    kept = curation["kept"]
    print("\ncuration:", json.dumps({k: curation[k] for k in ("rows", "prompts", "kept", "rejected_by_reason", "teacher_accuracy", "majority_accuracy", "mean_agreement")}))
    print("\n| teacher cost (budget.json) | rows | prompt tokens | completion tokens | seconds | FLOPs | per kept row |")
    print("|---|---|---|---|---|---|---|")
    print(f"| teacher_generation | {budget['rows']} | {budget['prompt_tokens']} | {budget['completion_tokens']} | "
          f"{budget['seconds']:.1f} | {budget['flops']:.3g} | {budget['tokens'] / kept:.1f} tokens, {budget['seconds'] / kept * 1e3:.2f} ms |")


if __name__ == "__main__":
    main()
