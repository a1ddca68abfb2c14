"""Throughput of one on-policy distillation step (rollout + teacher scoring + student
update): distill vs TRL's GKDTrainer and DistillationTrainer, same models, data, settings.

    python benchmarks/on_policy.py --trl-python /tmp/bench-trl/bin/python       # CPU
    python benchmarks/on_policy.py --gpu --trl-python ...                        # CUDA

CPU: teacher SmolLM2-135M-Instruct (packaged, fp32, 30 layers), student of a third of its
layers (`distill student --layers 10`, 64M params), prompts = the first <= 48 tokens of
paragraphs of CPython's reference prose, batch 4, 64 new tokens forced (EOS masked until
then), sampling temperature 1, lmbda 1 (every step on-policy), generalized JSD beta 0.5 at
loss temperature 1, fused AdamW lr 1e-5 (on both sides).
GPU (--gpu): random-init models of the Qwen2.5-1.5B (teacher) and Qwen2.5-0.5B (student)
shapes in bf16 (no weights needed: speed does not depend on their values), a word-level
tokenizer over all 151936 of Qwen's ids, batch 8, prompts of 200 random ids, 256 new
tokens forced.

distill's rows (--distill-rows) add one lever each to the row above, as
benchmarks/real_step.py's do: `distill` (fp32 everything), `+ bf16 sampling`
(on_policy.sample_dtype: bfloat16), `+ teacher bf16` (teacher.dtype: bfloat16), `+ frozen
embeddings` (train.freeze_embeddings), `+ compiled decode` (on_policy.compile_decode: a
static KV cache and a torch.compile'd decode step; compiled in the first warm-up step,
whose time the `1st step` column shows), `+ overlapped rollouts` (on_policy.overlap: the next
step's rollout in a thread during this step's scoring and update; the rollout column is
then what the step waited for it). With --trl-same-settings each TRL trainer also runs
with what of the last distill row it can take (a bf16 teacher, frozen embeddings) and
glibc's malloc set as distill sets it on CPU (distill.training.host_memory, through the
MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ environment), so its best setting is shown.

Each trainer runs in its own process (peak RSS is that process's; on CUDA also the peak
allocated GPU memory), --warmup steps untimed, then --steps timed; the table shows the
median step. distill's share of the step: rollout, teacher scoring (teacher forwards) and
update (student forward, loss, backward, optimizer), from its metrics.jsonl.
TRL lives only in the environment of --trl-python (benchmarks/trl_baseline.py), never in
distill's dependencies; without --trl-python only distill's rows are printed. To make one
that shares this environment's torch and transformers:

    python -m venv --system-site-packages /tmp/bench-trl
    pip freeze | grep -iE "^(torch|transformers|accelerate|tokenizers|safetensors)==" > /tmp/pins.txt
    /tmp/bench-trl/bin/pip install -c /tmp/pins.txt trl
"""

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from distill.training.host_memory import MMAP_THRESHOLD_MAX, TRIM_THRESHOLD

HERE = Path(__file__).parent
DISTILL_ROWS = {  # row: the lever it adds to the row above
    "distill": None,
    "+ bf16 sampling": "bf16_sampling",
    "+ teacher bf16": "teacher_bf16",
    "+ frozen embeddings": "frozen_embeddings",
    "+ compiled decode": "compile_decode",
    "+ overlapped rollouts": "overlap",
}


def levers_of(row: str) -> set[str]:
    """The levers a distill row has on: its own and every one above it."""
    names = list(DISTILL_ROWS)
    return {DISTILL_ROWS[n] for n in names[: names.index(row) + 1] if DISTILL_ROWS[n]}

SMOL = "packaged:smollm2-135m-instruct"
QWEN_15B = {  # Qwen2.5-1.5B's shape
    "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
    "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 32768,
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
}
QWEN_05B = {  # Qwen2.5-0.5B's shape
    **QWEN_15B, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
}
# --tiny (gpu.sh --dry): the GPU setting's code path on CPU, at toy shapes
TINY_T = {**QWEN_15B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
TINY_S = {**TINY_T, "hidden_size": 32, "intermediate_size": 64}


def random_shapes(args) -> tuple[dict, dict]:
    """(teacher, student) configs of the random-init setting."""
    return (TINY_T, TINY_S) if args.tiny else (QWEN_15B, QWEN_05B)


def prose_prompts(tokenizer, n: int, prompt_tokens: int) -> list[dict]:
    """Rows {"prompt", "completion"}: prose cut after prompt_tokens tokens (consecutive
    paragraphs joined when one is shorter) and the rest of it."""
    from pydoc_data.topics import topics

    rows, text = [], ""
    for name in sorted(topics):
        for para in topics[name].split("\n\n"):
            para = " ".join(para.split())
            if len(para) < 80 or para.startswith(("*", "|", ">>>")):
                continue
            text = f"{text} {para}".strip()
            ids = tokenizer(text, add_special_tokens=False).input_ids
            if len(ids) >= prompt_tokens + 8:
                rows.append({"prompt": tokenizer.decode(ids[:prompt_tokens]), "completion": tokenizer.decode(ids[prompt_tokens:])})
                text = ""
            if len(rows) == n:
                return rows
    return rows


def prepare(work: Path, n_rows: int, prompt_tokens: int) -> dict:
    """Student folder, teacher folder (for TRL, which loads it from disk) and the prompt
    file; reused when present."""
    from distill.models.loading import load_causal_lm, load_tokenizer
    from distill.models.students import make_student

    student, teacher = work / "student10", work / "teacher"
    prompts = work / f"prompts-{prompt_tokens}.jsonl"
    if not (student / "student.json").exists():
        shutil.rmtree(student, ignore_errors=True)
        make_student(SMOL, student, layers=10)
    tok = load_tokenizer(SMOL)
    if not (teacher / "config.json").exists():
        load_causal_lm(name=SMOL).save_pretrained(teacher)
        tok.save_pretrained(teacher)
    if not prompts.exists():
        rows = prose_prompts(tok, n_rows, prompt_tokens)
        prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"student": str(student), "teacher": str(teacher), "prompts": str(prompts)}


def prepare_gpu(work: Path, n_rows: int, prompt_tokens: int, vocab_size: int = QWEN_15B["vocab_size"]) -> dict:
    """A word-level tokenizer with all of Qwen2.5's 151936 ids (3 specials, then "t3" .. "t151935"), so the
    random-init Qwen shapes see their real vocabulary size, and prompts of random ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder, prompts = work / f"vocab-{vocab_size}-tokenizer", work / f"prompts-random-{prompt_tokens}.jsonl"
    if not (folder / "tokenizer.json").exists():
        specials = ["<unk>", "<eos>", "<pad>"]  # ids 0, 1, 2
        vocab = {name: i for i, name in enumerate(specials)} | {f"t{i}": i for i in range(3, vocab_size)}
        core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>").save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n_rows):
        ids = torch.randint(3, vocab_size, (prompt_tokens + 8,), generator=g).tolist()
        rows.append({"prompt": " ".join(f"t{i}" for i in ids[:prompt_tokens]), "completion": " ".join(f"t{i}" for i in ids[prompt_tokens:])})
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"tokenizer": str(folder), "prompts": str(prompts)}


def ours_tree(args, paths: dict, out: Path, levers: frozenset[str] = frozenset()) -> dict:
    steps = args.warmup + args.steps
    if args.gpu or args.tiny:
        t_config, s_config = random_shapes(args)
        dtype = {"dtype": "bfloat16"} if args.gpu else {}
        student = {"config": s_config, "tokenizer": paths["tokenizer"], **dtype}
        teacher = {"config": t_config, "tokenizer": paths["tokenizer"], **dtype}
    else:
        student, teacher = {"name": paths["student"]}, {"name": SMOL}
        if "teacher_bf16" in levers:
            teacher["dtype"] = "bfloat16"
    return {
        "student": student,
        "teacher": teacher,
        "data": {"source": paths["prompts"], "max_length": 512},
        "objective": {"alpha": 1.0, "temperature": 1.0, "divergence": "jsd", "jsd_beta": args.beta},
        "train": {
            "steps": steps, "micro_batch_size": args.batch, "lr": 1e-5, "warmup_steps": 0, "seed": 0,
            "fused_optimizer": True,  # TRL's default optimizer is fused AdamW too
            "precision": "bf16" if args.gpu or args.bf16 else "fp32",
            "freeze_embeddings": "frozen_embeddings" in levers,
        },
        "on_policy": {
            "lmbda": 1.0, "max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "temperature": 1.0,
            "sample_dtype": "bfloat16" if "bf16_sampling" in levers else "float32",
            "overlap": "overlap" in levers,
            "compile_decode": "compile_decode" in levers,
        },
        "features": {"probe_examples": 0},
        "out_dir": str(out),
    }


def run_ours(tree: dict, gpu: bool, warmup: int) -> dict:
    """Worker: train for warmup + steps on-policy steps and summarise metrics.jsonl."""
    from distill.config import build_config
    from distill.training.loop import train

    shutil.rmtree(tree["out_dir"], ignore_errors=True)
    train(build_config(tree), show_progress=False)
    metrics = [json.loads(line) for line in (Path(tree["out_dir"]) / "metrics.jsonl").read_text().splitlines()]
    timed = metrics[warmup:]
    med = statistics.median(m["step_s"] for m in timed)
    waited = [m.get("rollout_wait_s", m["rollout_s"]) for m in timed]  # overlapped: what the step waited for
    share = {"rollout_s": statistics.median(waited), "teacher_s": statistics.median(m["teacher_s"] for m in timed)}
    share["update_s"] = statistics.median(m["step_s"] - w - m["teacher_s"] for m, w in zip(timed, waited))
    share["rollout_ahead_s"] = statistics.median(m["rollout_s"] for m in timed)  # the rollout itself
    return {
        "trainer": "distill", "s_per_step": med, "samples_per_s": tree["train"]["micro_batch_size"] / med,
        "gen_tokens_per_step": statistics.median(m["generated_tokens"] for m in timed),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
        "step_times": [m["step_s"] for m in timed], "first_step_s": metrics[0]["step_s"], **share,
    }


# distill.training.host_memory's setting, as glibc reads it from the environment at start
MALLOC_SETTING = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_MAX), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}


def run_worker(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, **(env or {})})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1][len("RESULT ") :])


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="the --gpu setting's code path on CPU at toy shapes, no TRL (gpu.sh --dry)")
    ap.add_argument("--distill-rows", nargs="+", default=["distill"], choices=list(DISTILL_ROWS), metavar="ROW",
                    help=f"distill's rows, each adding a lever to the one above: {list(DISTILL_ROWS)}")
    ap.add_argument("--trl-same-settings", action="store_true",
                    help="each TRL trainer also with the last distill row's bf16 teacher and frozen embeddings, "
                         "and distill's malloc setting")
    ap.add_argument("--trl-python", default=None, help="a python with trl installed (benchmark-only)")
    ap.add_argument("--trl", nargs="*", default=["gkd", "gkd-gc", "distillation", "distillation-gc"],
                    help="TRL rows: gkd | gkd-gc | distillation | distillation-gc (-gc: gradient checkpointing)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--bf16", action="store_true", help="CPU: bf16 autocast on both sides (the GPU setting always is)")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-on-policy"))
    ap.add_argument("--worker", choices=["ours"], help=argparse.SUPPRESS)
    ap.add_argument("--tree", help=argparse.SUPPRESS)
    return ap


def measure(args) -> list[dict]:
    """distill's row, then one per TRL trainer (with --trl-python), each in its own process."""
    args.work.mkdir(parents=True, exist_ok=True)
    n_rows = 64 * args.batch
    if args.gpu or args.tiny:
        paths = prepare_gpu(args.work, n_rows, 16 if args.tiny else 200, random_shapes(args)[0]["vocab_size"])
    else:
        paths = prepare(args.work, n_rows, 48)
    rows = []
    for i, label in enumerate(args.distill_rows):
        tree = ours_tree(args, paths, args.work / f"run-distill-{i}", frozenset(levers_of(label)))
        row = run_worker([sys.executable, __file__, "--worker", "ours", "--tree", json.dumps(tree),
                          "--warmup", str(args.warmup), *(["--gpu"] if args.gpu else [])])  # fmt: skip
        rows.append({**row, "label": label})
    same = levers_of(args.distill_rows[-1])
    for name in args.trl if args.trl_python and not args.tiny else []:
        trainer, gc = name.removesuffix("-gc"), int(name.endswith("-gc"))
        cmd = [args.trl_python, str(HERE / "trl_baseline.py"), "--trainer", trainer, "--gradient-checkpointing", str(gc),
               "--batch", str(args.batch), "--max-new-tokens", str(args.new_tokens), "--beta", str(args.beta),
               "--lmbda", "1.0", "--steps", str(args.steps), "--warmup", str(args.warmup), *(["--bf16"] if args.bf16 else [])]
        cmd += ["--prompts", paths["prompts"]]
        cmd += ["--gpu", "--tokenizer", paths["tokenizer"]] if args.gpu else ["--teacher", paths["teacher"], "--student", paths["student"]]
        rows.append({"label": name, **run_worker(cmd)})
        if args.trl_same_settings and not args.gpu:
            extra = (["--teacher-dtype", "bfloat16"] if "teacher_bf16" in same else []) + (
                ["--freeze-embeddings"] if "frozen_embeddings" in same else [])
            rows.append({"label": f"{name}, same settings", **run_worker(cmd + extra, MALLOC_SETTING)})
    return rows


def main() -> None:
    args = parser().parse_args()
    args.batch = args.batch or (8 if args.gpu else 4)
    args.new_tokens = args.new_tokens or (256 if args.gpu else 64)
    if args.worker:
        print("RESULT " + json.dumps(run_ours(json.loads(args.tree), args.gpu, args.warmup)), flush=True)
        return
    print_table(measure(args), args)


def print_table(rows: list[dict], args) -> None:
    device = torch.cuda.get_device_name() if args.gpu else f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    precision = "bf16 autocast" if args.gpu or args.bf16 else "fp32"
    print(f"\non-policy step, {device}, torch {torch.__version__}, {precision}: batch {args.batch}, {args.new_tokens} new tokens, "
          f"lmbda 1, JSD beta {args.beta}; median of {args.steps} steps after {args.warmup} warmup\n")
    head = (f"{'trainer':<28} {'s/step':>7} {'samples/s':>9} {'gen tok/s':>9} {'peak RSS':>9} {'peak GPU':>9} {'1st step':>8}"
            "   rollout / scoring / update")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        label = r.get("label", r.get("trainer", "?"))
        if "error" in r:
            print(f"{label:<28} {r['error']}")
            continue
        gpu = f"{r['peak_gpu_gib']:.1f} GiB" if r.get("peak_gpu_gib") else "-"
        share = "-"
        if "rollout_s" in r:
            s = r["s_per_step"]
            share = " / ".join(f"{100 * r[k] / s:.0f}%" for k in ("rollout_s", "teacher_s", "update_s"))
        tok_s = r["gen_tokens_per_step"] / r["s_per_step"]
        first = f"{r['first_step_s']:.1f} s" if "first_step_s" in r else "-"
        print(f"{label:<28} {r['s_per_step']:>7.2f} {r['samples_per_s']:>9.3f} {tok_s:>9.1f} "
              f"{r['peak_rss_gib']:>5.2f} GiB {gpu:>9} {first:>8}   {share}")
    best: dict[str, dict] = {}  # each TRL trainer's fastest row
    for r in rows:
        trl = r.get("trainer") not in (None, "distill") and "error" not in r
        if trl and (r["trainer"] not in best or r["samples_per_s"] > best[r["trainer"]]["samples_per_s"]):
            best[r["trainer"]] = r
    last = next((r for r in reversed(rows) if r.get("trainer") == "distill"), None)
    for trainer, r in best.items() if last else ():
        print(f"{last['label']} vs {trainer}'s best row ({r['label']}): {last['samples_per_s'] / r['samples_per_s']:.2f}x "
              f"samples/s, peak RSS {last['peak_rss_gib'] / r['peak_rss_gib']:.2f}x")
    ours = [r for r in rows if r.get("trainer") == "distill"]
    for base in ours:
        for r in rows:
            if r.get("trainer") != "distill" and "error" not in r:
                print(f"{base['label']} vs {r['label']}: {base['samples_per_s'] / r['samples_per_s']:.2f}x samples/s, "
                      f"peak RSS {base['peak_rss_gib'] / r['peak_rss_gib']:.2f}x")


if __name__ == "__main__":
    main()
