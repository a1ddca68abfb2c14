"""Offline teacher cache on a real teacher and real text: size, fidelity, speed, quality.

    python benchmarks/teacher_cache.py                     # SmolLM2-135M-Instruct, CPython prose
    python benchmarks/teacher_cache.py --seeds 0 1 --epochs 1 --work /tmp/cache-bench

Teacher: the packaged SmolLM2-135M-Instruct (no download). Text: paragraphs of CPython's
language reference (`pydoc_data.topics`), split by hash into train and held-out rows.
Prints three tables:

1. per k in --ks: bytes per token of the written cache (shard files / cached tokens), and
   on the held-out rows the teacher mass outside the top-k and two reconstruction KLs from
   the full teacher distribution p to the cached one (see `fidelity`): on the k + 1
   buckets the sparse loss uses, and over the whole vocabulary with the leftover spread
   evenly over the other V - k ids;
2. per seed: a student trained from the cache (k = --train-k) vs one trained with the live
   teacher, same config, data order and steps: wall time of one epoch and the held-out
   forward KL(teacher || student) at T = 1, mean over held-out target tokens;
3. mean and spread over seeds.
The student is a narrow llama with SmolLM2's tokenizer (another width; random init).
"""

import argparse
import hashlib
import json
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch

SMOL = "packaged:smollm2-135m-instruct"
STUDENT = {
    "model_type": "llama",
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 768,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}


def prose_rows(work: Path) -> tuple[Path, Path]:
    """Train / held-out JSONL of CPython reference paragraphs, split by a hash of the text."""
    from pydoc_data.topics import topics

    train, held = [], []
    for name in sorted(topics):
        for para in topics[name].split("\n\n"):
            para = " ".join(para.split())
            if 80 < len(para) < 600 and not para.startswith(("*", "|", ">>>")):
                bucket = int(hashlib.sha256(para.encode()).hexdigest(), 16) % 10
                (held if bucket == 0 else train).append({"text": para})
    paths = work / "train.jsonl", work / "heldout.jsonl"
    for path, rows in zip(paths, (train, held)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def run_tree(train_path: Path, held_path: Path, out: Path, seed: int, steps: int, batch: int) -> dict:
    return {
        "student": {"config": STUDENT, "tokenizer": SMOL},
        "teacher": {"name": SMOL},
        # whole rows, as results.md measured (text rows would pack by default)
        "data": {"source": str(train_path), "eval_source": str(held_path), "max_length": 256, "packing": False},
        "objective": {"alpha": 0.5, "temperature": 1.0, "divergence": "forward_kl"},
        "train": {"steps": steps, "micro_batch_size": batch, "lr": 2e-3, "warmup_steps": 10, "seed": seed},
        "out_dir": str(out),
    }


@torch.no_grad()
def teacher_log_probs(teacher, examples, pad_id: int, vocab: int) -> torch.Tensor:
    """(n, V) full teacher log-probs at every held-out next-token target, T = 1."""
    from distill.data.rows import collate
    from distill.loss.token_losses import IGNORE_INDEX

    out = []
    for i in range(0, len(examples), 16):
        b = collate(examples[i : i + 16], pad_id)
        logits = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1, :vocab]
        out.append(torch.log_softmax(logits[b["labels"][:, 1:] != IGNORE_INDEX].float(), -1))
    return torch.cat(out)


def fidelity(log_p: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, rest: torch.Tensor) -> dict:
    """How well the cached (ids, logprobs, rest) describe the full teacher log-probs (n, V).

    mass_out: mean teacher mass outside the top-k (the leftover bucket);
    kl_buckets: mean KL(p || cached) on the k + 1 buckets the sparse loss sees (p summed
        into the same buckets): the error of what is stored (fp16 rounding, normalisation);
    kl_full: mean KL(p || p_hat) over all V ids, p_hat = the cached top-k plus the leftover
        spread evenly over the other V - k ids: what the summary loses about the tail.
    """
    n, vocab = log_p.shape
    k = ids.shape[1]
    both = torch.cat([logprobs.float(), rest.unsqueeze(1)], 1)
    both = both - both.logsumexp(1, keepdim=True)  # the buckets as the loss normalises them
    true_top = log_p.gather(1, ids)  # (n, k)
    true_rest = log_p.scatter(1, ids, -torch.inf).logsumexp(1)  # (n,)
    true_buckets = torch.cat([true_top, true_rest.unsqueeze(1)], 1)
    kl_buckets = torch.where(true_buckets > -torch.inf, true_buckets.exp() * (true_buckets - both), 0.0).sum(1)
    log_hat = (both[:, k] - torch.log(torch.tensor(float(vocab - k)))).unsqueeze(1).expand(n, vocab).clone()
    log_hat.scatter_(1, ids, both[:, :k])
    kl_full = (log_p.exp() * (log_p - log_hat)).sum(1)
    return {"mass_out": true_rest.exp().mean().item(), "kl_buckets": kl_buckets.mean().item(),
            "kl_full": kl_full.mean().item()}  # fmt: skip


@torch.no_grad()
def heldout_kl(student, teacher_lp: torch.Tensor, examples, pad_id: int, vocab: int) -> float:
    """Mean forward KL(teacher || student) at T = 1 over held-out next-token targets."""
    student_lp = teacher_log_probs(student, examples, pad_id, vocab)
    return (teacher_lp.exp() * (teacher_lp - student_lp)).sum(1).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/distill-cache-bench")
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--train-k", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--modes", nargs="+", default=["live", "cache"], choices=["live", "cache"],
                        help="which students to train (the live ones are deterministic per seed)")  # fmt: skip
    args = parser.parse_args()

    from distill.config import DataConfig, build_config
    from distill.data.build import build_examples
    from distill.data.teacher_cache import TeacherCache
    from distill.eval.evaluate import load_student
    from distill.models.build import build_tokenizer
    from distill.models.loading import load_causal_lm
    from distill.pipeline.cache import write_teacher_cache
    from distill.training.loop import train

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train_path, held_path = prose_rows(work)
    tok = build_tokenizer(build_config(run_tree(train_path, held_path, work, 0, 1, 1)).teacher, "teacher")
    vocab = len(tok)
    whole = {"max_length": 256, "packing": False}  # every row, unpacked (eval_source set: no held-out carve)
    n_train = len(build_examples(DataConfig(source=str(train_path), eval_source=str(held_path), **whole), tok))
    held = build_examples(DataConfig(source=str(held_path), eval_source=str(held_path), **whole), tok)
    steps_per_epoch = n_train // args.batch
    steps = steps_per_epoch * args.epochs
    teacher = load_causal_lm(SMOL).eval()
    teacher_lp = teacher_log_probs(teacher, held, tok.pad_token_id, vocab)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"# teacher {SMOL} (V={vocab}); {n_train} train rows, {len(held)} held-out rows "
          f"({teacher_lp.shape[0]} held-out target tokens); full distribution = {vocab * 2:,} B/token in bf16")  # fmt: skip

    # 1. size and fidelity per k: caches of the held-out rows, compared with the full teacher
    print("\n| k | dtype | bytes/token | mean mass outside top-k | KL on the k+1 buckets | KL full vocab, tail spread evenly |")
    print("|---|---|---|---|---|---|")
    held_tree = run_tree(held_path, held_path, work / "unused", 0, 1, 1)
    for k in args.ks:
        manifest = write_teacher_cache(build_config(held_tree), work / f"held-k{k}", k, args.dtype, 1024, 16, False)
        bytes_per_token = sum(s["bytes"] for s in manifest["shards"]) / sum(s["tokens"] for s in manifest["shards"])
        cache = TeacherCache(work / f"held-k{k}", {})
        parts = [cache.example(i) for i in range(len(held))]
        ids, lps, rests = (torch.cat([p[j] for p in parts]) for j in range(3))
        f = fidelity(teacher_lp, ids, lps, rests)
        print(f"| {k} | {args.dtype} | {bytes_per_token:.1f} | {f['mass_out']:.4f} | {f['kl_buckets']:.2e} | "
              f"{f['kl_full']:.4f} |", flush=True)  # fmt: skip

    t0 = time.perf_counter()
    train_cache = work / f"cache-k{args.train_k}"
    tree = run_tree(train_path, held_path, work / "unused", 0, 1, 1)
    write_teacher_cache(build_config(tree), train_cache, args.train_k, args.dtype, 256, 16, False)
    print(f"\nwriting the k={args.train_k} cache of the {n_train} train rows (one teacher pass): "
          f"{time.perf_counter() - t0:.1f} s")  # fmt: skip

    # 2. students: cache vs live teacher, equal steps
    print(f"\n{steps} steps = {args.epochs} epochs of {steps_per_epoch} steps x {args.batch} rows; "
          f"alpha 0.5, T 1, forward KL; cache k={args.train_k} {args.dtype}")  # fmt: skip
    print("\n| seed | teacher | epoch wall s | held-out KL(teacher ‖ student) |")
    print("|---|---|---|---|")
    results: dict[str, list[tuple[float, float]]] = {mode: [] for mode in args.modes}
    for seed in args.seeds:
        for mode in args.modes:
            out = work / f"student-{mode}-s{seed}"
            tree = run_tree(train_path, held_path, out, seed, steps, args.batch)
            if mode == "cache":
                tree["teacher_cache"] = str(train_cache)
            shutil.rmtree(out, ignore_errors=True)
            summary = train(build_config(tree), show_progress=False)
            student, _ = load_student(out)
            kl = heldout_kl(student.eval(), teacher_lp, held, tok.pad_token_id, vocab)
            epoch_s = summary["wall_s"] / args.epochs
            results[mode].append((epoch_s, kl))
            print(f"| {seed} | {mode} | {epoch_s:.1f} | {kl:.4f} |", flush=True)

    def stat(xs: list[float]) -> str:
        return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"

    print("\n| teacher | epoch wall s (mean) | held-out KL mean ± sd |")
    print("|---|---|---|")
    for mode, rows in results.items():
        print(f"| {mode} | {statistics.mean(r[0] for r in rows):.1f} | {stat([r[1] for r in rows])} |")
    if len(results) == 2:
        live_s = statistics.mean(r[0] for r in results["live"])
        cache_s = statistics.mean(r[0] for r in results["cache"])
        paired = [c[1] - v[1] for c, v in zip(results["cache"], results["live"])]
        print(f"\nepoch speed-up from the cache: {live_s / cache_s:.2f}x; held-out KL, cache minus live "
              f"(paired by seed): {stat(paired)}")  # fmt: skip


if __name__ == "__main__":
    main()
