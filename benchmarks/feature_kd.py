"""Does the feature term help? Logit-only vs logit + feature students, equal size and steps.

    python benchmarks/feature_kd.py --setting builtin --seeds 0 1 2
    python benchmarks/feature_kd.py --setting smollm2 --seeds 0 1 2 --steps 60

builtin: the demo's teacher (cached by `distill demo`, trained here if missing) and the
    demo's student shape (48 wide vs the teacher's 128, 4 layers each), the demo's data,
    steps and objective (alpha 0.5, T 2, forward KL); the variants differ only in
    features.weight (beta; 0 = logit-only). Reports held-out exact-match accuracy (greedy)
    and the mean linear CKA over the uniform layer pairs on the fixed held-out probe, raw
    and (feature runs) through the learned projectors.
smollm2: the packaged SmolLM2-135M-Instruct teacher (30 layers) and a student made by
    layer drop (`distill student --layers 10`: 10 teacher layers copied, 64M params) on
    CPython's reference prose; alpha 0.5, T 1, forward KL. Reports the held-out forward
    KL(teacher || student) at T = 1 over held-out target tokens, and CKA as above.

Each (variant, seed) is one real `distill train` run; seeds change the data order and
projector init, and on the built-in task the student init (the layer-drop init is
deterministic). CKA is recomputed from the run's saved latents (step 0 and the last
checkpoint), each example's first token left out. Prints one row per run, then mean ± sd
per variant and the paired difference to logit-only. --reuse reads finished runs back.
"""

import argparse
import json
import platform
import shutil
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from teacher_cache import SMOL, heldout_kl, prose_rows, teacher_log_probs  # noqa: E402


def builtin_tree(teacher: Path, out: Path, seed: int, weight: float, loss: str, steps: int | None) -> dict:
    from distill.pipeline.demo import packaged_config

    tree = packaged_config("demo_student")
    tree["teacher"] = {"name": str(teacher / "student")}
    tree["train"]["seed"] = seed
    if steps is not None:
        tree["train"]["steps"] = steps
    tree["features"] = {"weight": weight, "loss": loss}
    tree["out_dir"] = str(out)
    return tree


def smol_tree(student: Path, train_path: Path, held_path: Path, out: Path, seed: int, weight: float, args) -> dict:
    return {
        "student": {"name": str(student)},
        "teacher": {"name": SMOL},
        "data": {
            "source": str(train_path),
            "eval_source": str(held_path),
            "max_length": 256,
            "n_test": 32,
            "packing": False,
        },  # whole rows, as results.md measured
        "objective": {"alpha": 0.5, "temperature": 1.0, "divergence": "forward_kl"},
        "features": {"weight": weight, "loss": args.loss, "layers": args.layer_map, "probe_examples": 32},
        "train": {"steps": args.steps, "micro_batch_size": args.batch, "lr": 2e-4, "warmup_steps": 5, "seed": seed},
        "out_dir": str(out),
    }


def cka_from_latents(run: Path) -> dict:
    """Mean linear CKA over the layer pairs from the saved latents, at step 0 and at the end:
    raw student states, and (feature runs) projected ones; each example's first token left
    out, as `features.skip_first_token` does."""
    from safetensors.torch import load_file

    from distill.training.alignment import linear_cka

    latents = run / "latents"
    meta = json.loads((latents / "probe.json").read_text())
    keep = torch.tensor(meta["tokens"]["position"]) > 0
    teacher = load_file(str(latents / "teacher.safetensors"))
    steps = sorted(latents.glob("step-*.safetensors"))
    out = {}
    for name, path in (("cka0", steps[0]), ("cka", steps[-1])):
        states = load_file(str(path))
        pairs = meta["pairs"]
        t = [teacher[f"teacher.{p['teacher']}"].float()[keep] for p in pairs]
        out[name] = statistics.mean(linear_cka(states[f"student.{p['student']}"].float()[keep], y) for p, y in zip(pairs, t))
        if name == "cka" and "projected.0" in states:
            out["cka_projected"] = statistics.mean(linear_cka(states[f"projected.{k}"].float()[keep], y) for k, y in enumerate(t))
    out.setdefault("cka_projected", None)
    return out


def done(out: Path, reuse: bool, needs: str) -> bool:
    """--reuse: a finished run is read back instead of trained again."""
    if reuse and (out / needs).exists():
        return True
    shutil.rmtree(out, ignore_errors=True)
    return False


def run_variants(args, work: Path, prefix: str, suffix: str, needs: str, train_one, quality) -> dict:
    """Every (beta, seed): train it (unless --reuse finds it done), measure it, print a row.

    train_one(out, seed, beta) trains into `out`; quality(out) -> (values, table cells).
    Returns the rows by beta.
    """
    results = {}
    for weight in args.weights:
        for seed in args.seeds:
            out = work / f"{prefix}-b{weight}{suffix}-s{seed}"
            if not done(out, args.reuse, needs):
                train_one(out, seed, weight)
            values, cells = quality(out)
            metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            row = {**values, **cka_from_latents(out), "feature": metrics[-1].get("feature")}
            results.setdefault(weight, []).append(row)
            proj = "-" if row["cka_projected"] is None else f"{row['cka_projected']:.4f}"
            feat = "-" if row["feature"] is None else f"{row['feature']:.4f}"
            print(f"| {weight} | {seed} | {cells[0]} | {row['cka0']:.4f} | {row['cka']:.4f} | {proj} | {feat} |"
                  + "".join(f" {c} |" for c in cells[1:]), flush=True)  # fmt: skip
    return results


def stat(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"


def run_builtin(args, work: Path) -> dict:
    from rich.console import Console

    from distill.config import build_config
    from distill.pipeline.demo import cached_teacher
    from distill.pipeline.runner import run_training

    teacher = Path(args.teacher) if args.teacher else cached_teacher(Console(stderr=True))[0]
    teacher_eval = json.loads((teacher / "eval.json").read_text())
    print(f"teacher {teacher}: accuracy {teacher_eval['accuracy']:.3f}")
    print("\n| beta | seed | accuracy | CKA raw, step 0 | CKA raw, end | CKA projected, end | feature term, end |")
    print("|---|---|---|---|---|---|---|")

    def train_one(out: Path, seed: int, weight: float) -> None:
        run_training(build_config(builtin_tree(teacher, out, seed, weight, args.loss, args.steps)), show_progress=False)

    def quality(out: Path) -> tuple[dict, list[str]]:
        accuracy = json.loads((out / "eval.json").read_text())["accuracy"]
        return {"accuracy": accuracy}, [f"{accuracy:.3f}"]

    return run_variants(args, work, "builtin", "", "eval.json", train_one, quality)


def run_smollm2(args, work: Path) -> dict:
    from distill.config import DataConfig, ModelConfig, build_config
    from distill.data.build import build_examples
    from distill.eval.evaluate import load_student
    from distill.models.build import build_tokenizer
    from distill.models.loading import load_causal_lm
    from distill.models.students import make_student
    from distill.training.loop import train

    train_path, held_path = prose_rows(work)
    student_dir = work / "smol-student-10"
    if not (student_dir / "student.json").exists():
        shutil.rmtree(student_dir, ignore_errors=True)
        make_student(SMOL, student_dir, layers=10)
    tok = build_tokenizer(ModelConfig(name=SMOL), "teacher")
    vocab = len(tok)
    held = build_examples(DataConfig(source=str(held_path), eval_source=str(held_path), max_length=256, packing=False), tok)
    teacher = load_causal_lm(SMOL).eval()
    teacher_lp = teacher_log_probs(teacher, held, tok.pad_token_id, vocab)
    init, _ = load_student(student_dir)
    print(f"student {student_dir}: {json.loads((student_dir / 'student.json').read_text())['kept_layers']} kept; "
          f"{len(held)} held-out rows, {teacher_lp.shape[0]} target tokens; "
          f"held-out KL at init {heldout_kl(init.eval(), teacher_lp, held, tok.pad_token_id, vocab):.4f}")  # fmt: skip
    del init
    print(f"\n{args.steps} steps x {args.batch} rows, lr 2e-4, alpha 0.5, T 1, forward KL, feature loss {args.loss}, "
          f"layer map {args.layer_map}")  # fmt: skip
    print("\n| beta | seed | held-out KL | CKA raw, step 0 | CKA raw, end | CKA projected, end | feature term, end | wall s |")
    print("|---|---|---|---|---|---|---|---|")

    def train_one(out: Path, seed: int, weight: float) -> None:
        train(build_config(smol_tree(student_dir, train_path, held_path, out, seed, weight, args)), show_progress=False)

    def quality(out: Path) -> tuple[dict, list[str]]:
        student, _ = load_student(out)
        kl = heldout_kl(student.eval(), teacher_lp, held, tok.pad_token_id, vocab)
        wall = json.loads((out / "train_summary.json").read_text())["wall_s"]
        return {"kl": kl}, [f"{kl:.4f}", f"{wall:.0f}"]

    suffix = "" if args.layer_map == "uniform" else f"-{args.layer_map}"
    return run_variants(args, work, "smol", suffix, "train_summary.json", train_one, quality)


def summarise(results: dict, metric: str) -> None:
    print(f"\n| beta | {metric} mean ± sd | CKA raw mean ± sd | CKA projected mean ± sd | {metric}, minus beta=0 (paired) |")
    print("|---|---|---|---|---|")
    base = results.get(0.0)
    for weight, rows in results.items():
        proj = [r["cka_projected"] for r in rows if r["cka_projected"] is not None]
        diff = stat([r[metric] - b[metric] for r, b in zip(rows, base)]) if base and weight != 0.0 else "-"
        print(f"| {weight} | {stat([r[metric] for r in rows])} | {stat([r['cka'] for r in rows])} | "
              f"{stat(proj) if proj else '-'} | {diff} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=["builtin", "smollm2"], required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0], help="features.weight (beta) per variant")
    parser.add_argument("--loss", default="ln_mse", choices=["mse", "cosine", "ln_mse"])
    parser.add_argument("--layer-map", default="uniform", choices=["uniform", "last", "kept"],
                        help="features.layers (kept: smollm2 only, the layer-drop student's source layers)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=None, help="builtin: the demo's 1500; smollm2: 60")
    parser.add_argument("--batch", type=int, default=8, help="smollm2 rows per step")
    parser.add_argument("--work", default="/tmp/distill-feature-bench")
    parser.add_argument("--reuse", action="store_true", help="read finished runs in --work back instead of retraining")
    parser.add_argument("--teacher", help="builtin: this teacher run directory instead of the demo's cached one")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    if args.setting == "builtin":
        summarise(run_builtin(args, work), "accuracy")
    else:
        args.steps = args.steps or 60
        summarise(run_smollm2(args, work), "kl")


if __name__ == "__main__":
    main()
