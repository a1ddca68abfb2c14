"""The real-LLM training step, profiled: the plain loop beside distill's settings, one run.

    python benchmarks/real_step.py --work /tmp/real_step --steps 12

SmolLM2-135M-Instruct (packaged, 134.5M) teaching its 10-layer layer-drop student (63.7M):
forward KL at T 1, alpha 1, fused AdamW 2e-4, 4 rows a step of CPython's reference prose
(benchmarks/real_llm.py's training text: its paragraphs, or with --data joined, paragraphs
joined into rows of up to 250 tokens as in issue 21's measurement). Rows of the table:

    plain                issue 17's 30-line PyTorch loop (real_llm.plain_step): 4 x 256-token
                         blocks, full logits
    plain, host memory   the same with distill's host-memory setting (keep_freed_memory), to
                         show what that setting alone gives a plain loop
    distill, padded rows `distill train` on {"text"} rows with data.packing off: 4 rows a
                         step, padded to the longest (issue 21's measurement), without the
                         host-memory setting (what distill did before it)
    + packing (default)  rows packed into 4 x 256-token blocks, attention kept inside each
                         row: what `distill train` does on {"text"} rows by default
    + teacher bf16       the frozen teacher's weights loaded in bf16 (teacher.dtype: bfloat16)
    + frozen embeddings  train.freeze_embeddings: no lm_head weight gradient
    + rows split         data.split_rows: blocks filled to exactly 256 tokens, a row that
                         does not fit continued in the next block (no padding)
    + host memory        what CPU runs now always do: freed memory kept for reuse
                         (distill.training.host_memory) and the fused loss's chunks sized to
                         be reused (fused.CHUNK_LOGITS_CPU); before it, 2**25-logit chunks
    + student bf16       train.precision: bf16 (autocast of the student's forward)
    recommended + teacher cache
                         the "+ host memory" row (the recommended settings) with the teacher
                         read from a `distill cache` of the same data (top --cache-top-k ids a
                         token, sparse divergence) instead of run each step; the cache is
                         written once before the rows, in a process of its own, and the
                         table says what it saves over a run of --run-steps steps

Each row adds its lever to the row above. Every row runs in its own process, so its peak RSS
is its own; s/step and tokens/s (real tokens, padding not counted) are the median over the
steps after the first --warmup, pooled over --repeats runs of the whole table (rows
interleaved, so a slow spell of the machine touches every row); the breakdown is the median
seconds of each phase (teacher forward, student forward, loss, backward, optimizer, data,
the rest). The loss curves of the rows that change only the arithmetic (teacher bf16, host
memory, student bf16) are printed beside the row before them: the same data and init, so
they differ only by rounding.
Run it alone on the machine: timings beside other work are not valid.
"""

import argparse
import itertools
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import real_llm  # the plain loop, the training text and the teacher's name

PHASES = ("teacher", "student", "loss", "backward", "optimizer", "data", "rest")
LEVERS = {  # row name: the lever it adds to the row above
    "distill, padded rows": None,
    "+ packing (default)": "packing",
    "+ teacher bf16": "teacher_bf16",
    "+ frozen embeddings": "frozen_embeddings",
    "+ rows split": "split_rows",
    "+ host memory": "host_memory",
    "+ student bf16": "student_bf16",
}
CACHE_ROW = "recommended + teacher cache"  # the "+ host memory" row with its teacher read from `distill cache`
ROWS = ("plain", "plain, host memory", *LEVERS, CACHE_ROW)


def levers_of(row: str) -> set[str]:
    """The levers a row has on: its own and every one above it (the cache row: the
    recommended settings' and the cache)."""
    if row == CACHE_ROW:
        return levers_of("+ host memory") | {"teacher_cache"}
    names = list(LEVERS)
    return {LEVERS[n] for n in names[: names.index(row) + 1] if LEVERS[n]}


def distill_config(student: Path, train: Path, out: Path, levers: set[str], steps: int, cache: Path | None = None):
    from distill.config import build_config

    return build_config(distill_tree(student, train, out, levers, steps, cache))


def distill_tree(student: Path, train: Path, out: Path, levers: set[str], steps: int, cache: Path | None = None) -> dict:
    return {
        "student": {"name": str(student)},
        "teacher": {"name": real_llm.SMOL, "dtype": "bfloat16" if "teacher_bf16" in levers else "float32"},
        "data": {"source": str(train), "max_length": 256, "truncate": True, "packing": "packing" in levers, "n_test": 8,
                 "split_rows": "split_rows" in levers},
        "objective": {"alpha": 1.0, "temperature": 1.0, "divergence": "forward_kl"},
        "train": {"steps": steps, "micro_batch_size": 4, "lr": 2e-4, "warmup_steps": 20, "fused_optimizer": True,
                  "freeze_embeddings": "frozen_embeddings" in levers,
                  "precision": "bf16" if "student_bf16" in levers else "fp32"},
        "eval": {"text_generations": 0},
        "teacher_cache": str(cache) if "teacher_cache" in levers else None,
        "out_dir": str(out),
    }  # fmt: skip


def write_cache(work: Path, rows: Path, steps: int, top_k: int) -> dict:
    """`distill cache` over the cache row's training data, in a process of its own: its wall
    seconds, peak RSS, tokens and bytes."""
    import yaml

    config = work / "cache.yaml"
    tree = distill_tree(work / "inits" / "uniform", rows, work / "runs" / "cache", levers_of(CACHE_ROW) - {"teacher_cache"}, steps)
    config.write_text(yaml.safe_dump(tree))
    out = work / "cache"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "distill", "cache", str(config), "--out", str(out), "--top-k", str(top_k), "--batch-size", "4"]
    cmd = [sys.executable, "-c", CHILD_RSS, *cmd]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"distill cache failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    summary = json.loads(proc.stdout[proc.stdout.index("{") : proc.stdout.rindex("}") + 1])
    rss = float(proc.stderr.strip().splitlines()[-1].removeprefix("PEAK_RSS_MIB "))
    return {"seconds": seconds, "peak_rss_mib": rss, "tokens": summary["tokens"], "bytes": summary["bytes"], "top_k": top_k}


# Runs the command given after it as a child and prints that child's peak RSS on stderr.
CHILD_RSS = (
    "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
    "print(f'PEAK_RSS_MIB {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}', file=sys.stderr); sys.exit(rc)"
)


class Clock:
    """Seconds per phase within the current step."""

    def __init__(self):
        self.step: dict[str, float] = {}
        self.last = time.perf_counter()

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.step[phase] = self.step.get(phase, 0.0) + now - self.last
        self.last = now

    def timed(self, phase: str, fn):
        """fn, with its seconds added to `phase` (and not to whatever encloses it)."""

        def wrapper(*args, **kwargs):
            self.mark("_outside")
            out = fn(*args, **kwargs)
            self.mark(phase)
            return out

        return wrapper


def profile_distill(row: str, work: Path, rows: Path, steps: int) -> dict:
    """`steps` training steps of `row`'s settings with each phase timed."""
    import distill.training.step as step_mod
    from distill.training.resume import release_run_dir
    from distill.training.setup import setup

    levers = levers_of(row)
    if "host_memory" not in levers:  # distill as it was before the setting
        import distill.training.setup as setup_mod
        from distill.loss import fused

        setup_mod.keep_freed_memory = lambda: False
        fused.CHUNK_LOGITS_CPU = fused.CHUNK_LOGITS
    out = work / "runs" / row.replace(" ", "_")
    cfg = distill_config(work / "inits" / "uniform", rows, out, levers, steps, work / "cache")
    shutil.rmtree(cfg.out_dir, ignore_errors=True)  # a fresh run each time
    run = setup(cfg, resume=False)
    clock = Clock()
    run.teacher.forward = clock.timed("teacher", run.teacher.forward)
    for name, phase in (("step_batches", "data"), ("global_valid_tokens", "data"), ("update", "optimizer"),
                        ("micro_batch_objective", "loss")):  # fmt: skip
        setattr(step_mod, name, clock.timed(phase, getattr(step_mod, name)))
    run.source.step_examples = clock.timed("data", run.source.step_examples)
    run.acc.backward = clock.timed("backward", run.acc.backward)
    student = run.acc.unwrap_model(run.student)
    student.register_forward_pre_hook(lambda *_: clock.mark("_loss_before_student"))
    student.register_forward_hook(lambda *_: clock.mark("student"))
    run.student.train()
    out = []
    try:
        for step in range(steps):
            clock.step, clock.last = {}, time.perf_counter()
            record, tokens = step_mod.train_step(run, step)
            phases = dict(clock.step)
            phases["loss"] = phases.get("loss", 0.0) + phases.pop("_loss_before_student", 0.0)
            phases["rest"] = record["step_s"] - sum(v for k, v in phases.items() if k in PHASES)
            out.append(
                {
                    "s": record["step_s"],
                    "tokens": tokens,
                    "loss": record["loss"],
                    "phases": {p: phases.get(p, 0.0) for p in PHASES},
                }
            )
    finally:
        release_run_dir(cfg.out_dir)
    return {"steps": out, "params": run.n_params}


def profile_plain(work: Path, rows: Path, steps: int, host_memory: bool = False) -> dict:
    from transformers import AutoModelForCausalLM

    from distill.models.loading import count_parameters, load_causal_lm, load_tokenizer
    from distill.training.host_memory import keep_freed_memory

    if host_memory:
        keep_freed_memory()

    teacher = load_causal_lm(name=real_llm.SMOL, dtype="float32").eval()
    tokenizer = load_tokenizer(real_llm.SMOL)
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(work / "inits" / "uniform", dtype=torch.float32)
    data = real_llm.plain_blocks(rows, tokenizer, 0, steps, 4, 256)
    opt, sched = real_llm.plain_optimizer(student, 200)
    clock, out = Clock(), []
    for step in range(steps):
        clock.step, clock.last = {}, time.perf_counter()
        t0 = clock.last
        loss = real_llm.plain_step(student, teacher, opt, sched, data[step], clock.mark)
        s = time.perf_counter() - t0
        out.append({"s": s, "tokens": data[step].numel(), "loss": loss, "phases": {p: clock.step.get(p, 0.0) for p in PHASES}})
    return {"steps": out, "params": count_parameters(student)}


def child(row: str, work: Path, rows: Path, steps: int) -> None:
    if row.startswith("plain"):
        result = profile_plain(work, rows, steps, host_memory=row == "plain, host memory")
    else:
        result = profile_distill(row, work, rows, steps)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def prepare(work: Path, rows: str) -> Path:
    """The training rows and the layer-drop student, made once in WORK; returns the rows'
    file. `paragraphs`: the training text's paragraphs as they are (the recipe's data);
    `joined`: consecutive paragraphs joined while they fit in 250 tokens (issue 21's "rows
    of about 250 tokens"). Either way the rows differ in length, as a user's do."""
    from distill.models.loading import load_tokenizer
    from distill.models.students import make_student

    if not (work / "inits" / "uniform" / "student.json").exists():
        make_student(real_llm.SMOL, work / "inits" / "uniform", **real_llm.INITS["uniform"])
    paragraphs = real_llm.training_rows(work)
    if rows == "paragraphs":
        return paragraphs
    path = work / "joined.jsonl"
    if not path.exists():
        tokenizer, joined, row, n = load_tokenizer(real_llm.SMOL), [], [], 0
        for line in paragraphs.read_text().splitlines():
            para = json.loads(line)["text"]
            size = len(tokenizer(para)["input_ids"]) + 1
            if row and n + size > 250:
                joined.append(" ".join(row))
                row, n = [], 0
            row, n = [*row, para], n + size
        joined.append(" ".join(row))
        path.write_text("".join(json.dumps({"text": r}) + "\n" for r in joined))
    return path


def table(results: dict[str, dict], cache: dict | None = None, run_steps: int = 200) -> None:
    """The markdown table (each row's "timed" steps), the loss curves beside each other, and
    with the cache row what the cache saves over a whole run of `run_steps` steps."""
    med = lambda xs: statistics.median(xs)
    base = None
    print("\n| setting | s/step | tokens/s | vs plain | peak RSS | " + " | ".join(PHASES) + " |")
    print("|---|---|---|---|---|" + "---|" * len(PHASES))
    for row, r in results.items():
        steps = r["timed"]
        tps = med([s["tokens"] / s["s"] for s in steps])
        base = tps if row == "plain" else base
        ratio = f"{tps / base:.2f}x" if base else ""
        phases = " | ".join(f"{med([s['phases'][p] for s in steps]):.2f}" for p in PHASES)
        print(f"| {row} | {med([s['s'] for s in steps]):.2f} | {tps:.0f} | {ratio} | {r['peak_rss_mib']:,.0f} MiB | {phases} |")
    live = results.get("+ host memory")
    if cache is not None and live is not None and CACHE_ROW in results:
        s_live, s_cache = (med([s["s"] for s in results[r]["timed"]]) for r in ("+ host memory", CACHE_ROW))
        print(
            f"\nteacher cache, end to end for {run_steps} steps: live teacher {run_steps * s_live:.0f} s; cache "
            f"{cache['seconds']:.0f} s (top-{cache['top_k']}, {cache['tokens']:,} tokens, {cache['bytes'] / 2**20:.0f} MiB, "
            f"peak RSS {cache['peak_rss_mib']:,.0f} MiB) + {run_steps * s_cache:.0f} s of steps = "
            f"{cache['seconds'] + run_steps * s_cache:.0f} s: {run_steps * s_live / (cache['seconds'] + run_steps * s_cache):.2f}x"
        )
        if s_live > s_cache:
            print(f"the cache pays for itself after {cache['seconds'] / (s_live - s_cache):.0f} steps; "
                  f"each further student of a sweep on the same data saves {run_steps * (s_live - s_cache):.0f} s")  # fmt: skip
    rows = list(results)
    for row in ("+ teacher bf16", "+ host memory", "+ student bf16"):
        if row in results and rows.index(row) > 0:
            before = rows[rows.index(row) - 1]
            a, b = [s["loss"] for s in results[before]["steps"]], [s["loss"] for s in results[row]["steps"]]
            diffs = [abs(x - y) / abs(x) for x, y in zip(a, b)]
            print(f"\nloss curve, {before!r} vs {row!r} (same data and init): largest relative difference {max(diffs):.2e}")
            print("step | " + " | ".join(str(i + 1) for i in range(len(a))))
            print(f"{before} | " + " | ".join(f"{x:.4f}" for x in a))
            print(f"{row} | " + " | ".join(f"{y:.4f}" for y in b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the medians")
    ap.add_argument("--repeats", type=int, default=1, help="runs of the whole table, rows interleaved; medians pool them")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS, metavar="ROW", help=f"of {ROWS}")
    ap.add_argument("--data", choices=["paragraphs", "joined"], default="paragraphs",
                    help="rows: the training text's paragraphs, or paragraphs joined into rows of up to 250 tokens")  # fmt: skip
    ap.add_argument("--cache-top-k", type=int, default=32, help="teacher ids per token in the cache row's cache")
    ap.add_argument("--run-steps", type=int, default=200, help="steps of the whole run the cache's end-to-end line is for")
    ap.add_argument("--one", choices=ROWS, help=argparse.SUPPRESS)  # the child process of one row
    ap.add_argument("--rows-file", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps <= args.warmup:
        ap.error(f"--steps {args.steps} must be above --warmup {args.warmup}")
    if args.one:
        child(args.one, args.work, args.rows_file, args.steps)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    rows_file = prepare(args.work, args.data)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(
        f"rows: {args.data} ({rows_file}), {args.steps} steps, medians over steps {args.warmup + 1}..{args.steps}"
        f" of {args.repeats} run(s)"
    )
    cache = None
    if CACHE_ROW in args.rows:  # once, before any row: the cache row reads it
        cache = write_cache(args.work, rows_file, args.steps, args.cache_top_k)
        print(f"distill cache: {cache['seconds']:.1f} s for {cache['tokens']:,} tokens, peak RSS {cache['peak_rss_mib']:,.0f} MiB")
    results: dict[str, dict] = {}
    for repeat, row in itertools.product(range(args.repeats), args.rows):
        cmd = [
            sys.executable,
            __file__,
            "--one",
            row,
            "--work",
            str(args.work),
            "--rows-file",
            str(rows_file),
            "--steps",
            str(args.steps),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"row {row!r} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
        got = json.loads(lines[-1].removeprefix("RESULT "))
        if row in results:  # another repeat: its timed steps join the row's, its loss curve is the same
            results[row]["timed"] += got["steps"][args.warmup :]
            results[row]["peak_rss_mib"] = max(results[row]["peak_rss_mib"], got["peak_rss_mib"])
        else:
            results[row] = {**got, "timed": got["steps"][args.warmup :]}
        print(f"{row} ({repeat + 1}/{args.repeats}): done", flush=True)
    table(results, cache, args.run_steps)


if __name__ == "__main__":
    main()
