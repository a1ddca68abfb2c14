"""Gemma-3-270M (SentencePiece, 262,144 tokens) teaching a SmolLM2 student (byte-level BPE,
49,152 tokens): cross-tokenizer KD against sequence-level KD and CE on the text alone.

    python benchmarks/cross_tokenizer.py [--out DIR] [--seeds 3] [--steps 100]

Every student starts from the same init (SmolLM2-135M-Instruct's 10-layer layer-drop
student, `distill student --layers 10`, 63.7M parameters) and takes the same steps of 4
rows; per seed (the data order) only the method differs:

    ce          the training text, CE alone (alpha 0)
    seq_kd      sequence-level KD (Kim & Rush 2016): CE on Gemma's continuations of each
                training row's first 32 tokens (sampled at T 0.7, up to 96 new tokens)
    xkd         cross-tokenizer KD, objective.cross_tokenizer=bucket: alpha 0.5, T 1, forward
                KL over the shared token strings + one leftover bucket, from a cross-tokenizer
                teacher cache (`distill cache`, top-64 in Gemma's ids)
    xkd_uld     the same with cross_tokenizer=uld (+ sorted-probability L1 on the leftovers)

Training text: the long descriptions (READMEs) of the installed Python distributions
(`importlib.metadata`), prose paragraphs. Held-out text, another source: the license texts
of /usr/share/common-licenses (GPL, Apache, Artistic, ...), 32 rows, no paragraph shared
with the training text. Scores (`distill.eval.cross_scores`, T = 1): the student's bits per
byte and per-token perplexity, and at the aligned pairs forward KL(teacher || student) and
top-1 agreement with Gemma. Paired differences with 95% t-intervals over the seeds.

Each finished run is kept in OUT/results.json: a rerun skips it. Run it alone on the machine.
"""

import argparse
import importlib.metadata
import json
import random
import sys
import time
from pathlib import Path

import torch

from distill.config import build_config
from distill.data.rows import read_jsonl, tokenize_rows
from distill.eval.cross_scores import cross_scores
from distill.eval.evaluate import load_student
from distill.eval.paired import mean_sd, paired_difference
from distill.models.loading import count_parameters, load_causal_lm, load_tokenizer
from distill.models.students import make_student
from distill.pipeline.cache import write_teacher_cache
from distill.pipeline.demo_real import clean_paragraphs, pack, spread, write_rows
from distill.pipeline.runner import run_training
from distill.training.cross_teacher import Retokenizer
from distill.training.rollout import Sampling, rollout

SMOL, GEMMA = "packaged:smollm2-135m-instruct", "packaged:gemma-3-270m"
METHODS = ("ce", "seq_kd", "xkd", "xkd_uld")
LICENSES = Path("/usr/share/common-licenses")
MAX_LENGTH, BATCH, LR, WARMUP, HELDOUT_ROWS = 128, 4, 3e-4, 5, 32
PROMPT_TOKENS, NEW_TOKENS = 32, 96


def readme_paragraphs() -> list[str]:
    """Prose paragraphs of every installed distribution's long description, by name."""
    out, seen = [], set()
    dists = sorted(importlib.metadata.distributions(), key=lambda d: (d.metadata.get("Name") or "").lower())
    for d in dists:
        text = d.metadata.get_payload() or d.metadata.get("Description") or ""
        for para in clean_paragraphs(text if isinstance(text, str) else ""):
            if para not in seen:
                seen.add(para)
                out.append(para)
    return out


def license_paragraphs(exclude: set[str]) -> list[str]:
    if not LICENSES.is_dir():
        sys.exit(f"{LICENSES} is missing: the held-out text of this benchmark is the license texts there")
    out = []
    for path in sorted(LICENSES.iterdir()):
        if path.is_file():
            out += [p for p in clean_paragraphs(path.read_text(errors="replace")) if p not in exclude]
    return list(dict.fromkeys(out))


def write_data(out: Path, tok, n_train: int) -> tuple[Path, Path]:
    train = readme_paragraphs()
    room = MAX_LENGTH - 1
    rows = spread(pack(train, tok, room), n_train)
    held = spread(pack(license_paragraphs(set(train)), tok, room), HELDOUT_ROWS)
    return write_rows(out / "data" / "train.jsonl", rows), write_rows(out / "data" / "heldout.jsonl", held)


def write_seq_kd_rows(out: Path, train: Path, s_tok, t_tok, teacher) -> Path:
    """Gemma's sampled continuation of each training row's first PROMPT_TOKENS student tokens."""
    path = out / "data" / "seq_kd.jsonl"
    if path.exists():
        return path
    rows = read_jsonl(train)
    prompts = [s_tok.decode(s_tok(r.completion, add_special_tokens=False).input_ids[:PROMPT_TOKENS]) for r in rows]
    sampling = Sampling(max_new_tokens=NEW_TOKENS, temperature=0.7, min_new_tokens=NEW_TOKENS // 2)
    out_rows = []
    for a in range(0, len(prompts), 16):
        chunk = prompts[a : a + 16]
        ids = [t_tok(p).input_ids for p in chunk]
        got = rollout(teacher, ids, sampling, t_tok.eos_token_id, t_tok.pad_token_id, seeds=list(range(a, a + len(chunk))))
        for p, c in zip(chunk, got.completions):
            out_rows.append({"prompt": p, "completion": t_tok.decode(c, skip_special_tokens=True)})
        print(f"  seq_kd rows {a + len(chunk)}/{len(prompts)}", flush=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in out_rows))
    return path


def tree(method: str, seed: int, steps: int, init: Path, data: dict, run: Path, cache: Path | None) -> dict:
    kd = method.startswith("xkd")
    t = {
        "student": {"name": str(init)},
        "teacher": {"name": GEMMA} if kd else None,
        "data": {"source": str(data["seq_kd" if method == "seq_kd" else "train"]), "eval_source": str(data["heldout"]),
                 "max_length": MAX_LENGTH, "truncate": True, "packing": False},
        "objective": {"alpha": 0.5 if kd else 0.0, "temperature": 1.0, "divergence": "forward_kl",
                      **({"cross_tokenizer": "uld" if method == "xkd_uld" else "bucket"} if kd else {})},
        "features": {"probe_examples": 0},
        "train": {"steps": steps, "micro_batch_size": BATCH, "lr": LR, "warmup_steps": WARMUP, "fused_optimizer": True,
                  "seed": seed},
        "out_dir": str(run),
    }  # fmt: skip
    if kd and cache is not None:
        t["teacher_cache"] = str(cache)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/distill-cross-tokenizer")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    s_tok, t_tok = load_tokenizer(SMOL), load_tokenizer(GEMMA)
    train, heldout = write_data(out, s_tok, args.steps * BATCH)
    init = out / "student-init"
    if not (init / "student.json").exists():
        make_student(SMOL, init, layers=10)
    teacher = load_causal_lm(name=GEMMA).eval().requires_grad_(False)
    retok = Retokenizer(t_tok, s_tok)
    print(f"vocabularies: {retok.vmap.coverage()}", flush=True)
    data = {"train": train, "heldout": heldout, "seq_kd": write_seq_kd_rows(out, train, s_tok, t_tok, teacher)}

    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    cache = out / "cache"
    if "cache_s" not in results:
        t0 = time.perf_counter()
        write_teacher_cache(build_config(tree("xkd", 0, args.steps, init, data, out / "unused", None)), cache, 64, "float16", 64, 4)
        results["cache_s"] = time.perf_counter() - t0
        results_path.write_text(json.dumps(results, indent=1))
    held_rows = read_jsonl(heldout)
    held = tokenize_rows(held_rows, s_tok, MAX_LENGTH, "held-out", truncate=True)

    def score(folder: Path) -> dict:
        model, _ = load_student(folder)
        return cross_scores(model.eval(), teacher, retok, held, 8, len(s_tok), s_tok.pad_token_id)

    if "init" not in results:
        results["init"] = score(init)
        results["teacher_params"] = count_parameters(teacher)
        results_path.write_text(json.dumps(results, indent=1))
    for seed in range(args.seeds):
        for method in METHODS:
            key = f"{method}/{seed}"
            if key in results:
                continue
            run = out / "runs" / method / str(seed)
            summary = run_training(build_config(tree(method, seed, args.steps, init, data, run, cache)), evaluate=False)["train"]
            results[key] = {**score(run / "student"), "s_per_step": summary["wall_s"] / args.steps}
            results_path.write_text(json.dumps(results, indent=1))
            print(f"{key}: {json.dumps(results[key])}", flush=True)
    if "live_step_s" not in results:  # the live teacher's cost per step, 6 steps, for the timing table
        run = out / "runs" / "xkd_live"
        summary = run_training(build_config(tree("xkd", 0, 6, init, data, run, None)), evaluate=False)["train"]
        results["live_step_s"] = summary["wall_s"] / 6
        results["align_s_per_step"] = align_cost(retok, train, s_tok)
        results_path.write_text(json.dumps(results, indent=1))
    report(results, args.seeds)


def align_cost(retok: Retokenizer, train: Path, s_tok) -> float:
    """Seconds per step (BATCH rows) to retokenize rows for the teacher and align them."""
    rows = read_jsonl(train)[: 25 * BATCH]
    ids = [s_tok(r.completion, add_special_tokens=False).input_ids + [s_tok.eos_token_id] for r in rows]
    t0 = time.perf_counter()
    for s in ids:
        retok.pairs(s, retok.teacher_ids(s))
    return (time.perf_counter() - t0) / 25


def report(results: dict, n_seeds: int) -> None:
    keys = ("bits_per_byte", "perplexity", "forward_kl", "agreement_top1", "coverage")

    def value(r: dict, k: str) -> float:
        return r["student"][k] if k in ("bits_per_byte", "perplexity") else r[k]

    init = results["init"]
    print(f"\nteacher (Gemma-3-270M) bits/byte on the held-out text: {init['teacher']['bits_per_byte']:.3f}; "
          f"held-out pairs {init['pairs']}, bytes {init['bytes']}, coverage {init['coverage']:.3f}")  # fmt: skip
    print("| student | bits/byte | perplexity | fwd KL at pairs | top-1 agreement | s/step |")
    print("|---|---|---|---|---|---|")
    print(f"| init (no training) | {value(init, 'bits_per_byte'):.3f} | {value(init, 'perplexity'):.1f} | "
          f"{init['forward_kl']:.3f} | {100 * init['agreement_top1']:.1f}% | - |")  # fmt: skip
    per = {m: [results[f"{m}/{s}"] for s in range(n_seeds) if f"{m}/{s}" in results] for m in METHODS}
    for m, rs in per.items():
        if not rs:
            continue
        cells = []
        for k in keys[:4]:
            mean, sd = mean_sd([value(r, k) for r in rs])
            scale = 100 if k == "agreement_top1" else 1
            cells.append(f"{scale * mean:.3f} ± {scale * sd:.3f}")
        cells.append(f"{mean_sd([r['s_per_step'] for r in rs])[0]:.2f}")
        print(f"| {m} (n={len(rs)}) | " + " | ".join(cells) + " |")
    print("\npaired differences (a - b), mean [95% CI]:")
    print("| a vs b | bits/byte | fwd KL | top-1 agreement (pts) |")
    print("|---|---|---|---|")
    for a, b in (("xkd", "ce"), ("xkd", "seq_kd"), ("xkd_uld", "ce"), ("xkd_uld", "xkd"), ("seq_kd", "ce")):
        if len(per[a]) >= 2 and len(per[a]) == len(per[b]):
            cells = []
            for k in ("bits_per_byte", "forward_kl", "agreement_top1"):
                d = paired_difference([value(r, k) for r in per[a]], [value(r, k) for r in per[b]])
                cells.append(d.format(3) if k != "agreement_top1" else paired_difference(
                    [100 * value(r, k) for r in per[a]], [100 * value(r, k) for r in per[b]]).format(1))
            print(f"| {a} vs {b} | " + " | ".join(cells) + " |")
    if "live_step_s" in results:
        print(f"\ncost per step: live Gemma teacher {results['live_step_s']:.2f} s/step (alignment and retokenizing "
              f"{results['align_s_per_step'] * 1000:.1f} ms of it); the teacher cache pass {results['cache_s']:.0f} s once")  # fmt: skip


if __name__ == "__main__":
    random.seed(0)
    main()
