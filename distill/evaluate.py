"""Held-out evaluation: exact-match accuracy of greedy generations, and held-out loss."""

import time
from pathlib import Path

import torch

from distill.data import Row, collate, tokenize_rows
from distill.losses import IGNORE_INDEX, cross_entropy
from distill.objective import next_token_targets
from distill.rollout import Sampling, rollout
from distill.answers import grade


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions (KV cache, left padding), decoded without special tokens."""
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right: pad the left
    device = next(model.parameters()).device
    out = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


@torch.no_grad()
def generate_sampled(model, tokenizer, prompts: list[str], sampling: Sampling, seed: int, batch_size: int) -> list[str]:
    """Sampled completions (`distill.rollout`, KV cache), prompt i drawn with seed (seed, i):
    reproducible, and independent of the batch size."""
    model.eval()
    ids = tokenizer(prompts, add_special_tokens=False).input_ids
    out = []
    for i in range(0, len(ids), batch_size):
        chunk = ids[i : i + batch_size]
        seeds = [seed * 1_000_003 + i + j for j in range(len(chunk))]
        done = rollout(model, chunk, sampling, tokenizer.eos_token_id, tokenizer.pad_token_id, seeds)
        out += tokenizer.batch_decode(done.completions, skip_special_tokens=True)
    return out


@torch.no_grad()
def heldout_loss(model, tokenizer, rows: list[Row], batch_size: int, max_length: int) -> float:
    """Mean next-token cross-entropy (nats) over the completion tokens of held-out rows."""
    model.eval()
    device = next(model.parameters()).device
    examples = tokenize_rows(rows, tokenizer, max_length, source="eval")
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        b = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], tokenizer.pad_token_id).items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        targets = next_token_targets(b["labels"])
        total += cross_entropy(logits[:, :-1, : len(tokenizer)], targets).item()
        count += (targets != IGNORE_INDEX).sum().item()
    return total / max(count, 1)


def evaluate_rows(
    model,
    tokenizer,
    rows: list[Row],
    max_new_tokens: int,
    batch_size: int,
    max_length: int,
    answer_format: str = "chain",
    direct: bool = False,
) -> dict:
    """Accuracy (where rows carry gold answers) and held-out loss; with wall seconds.

    answer_format: where the answer is in a generation (`distill.answers`); direct: the
    whole generation is the answer (the label task of step-by-step training)."""
    t0 = time.perf_counter()
    result: dict = {"n": len(rows), "heldout_ce": heldout_loss(model, tokenizer, rows, batch_size, max_length)}
    graded = [r for r in rows if r.answer is not None]
    if graded:
        texts = generate_greedy(model, tokenizer, [r.prompt for r in graded], max_new_tokens, batch_size)
        result["accuracy"] = sum(grade(t, r.answer, answer_format, direct) for t, r in zip(texts, graded)) / len(graded)
        result["samples"] = [
            {"prompt": r.prompt, "generated": t, "answer": r.answer} for r, t in list(zip(graded, texts))[:5]
        ]
    result["wall_s"] = time.perf_counter() - t0
    return result


def load_student(run_or_model_dir: str | Path):
    """A run directory's exported student, or a save_pretrained folder, with its tokenizer."""
    from distill.models import load_causal_lm, load_tokenizer

    path = Path(run_or_model_dir)
    folder = path / "student" if (path / "student" / "config.json").exists() else path
    return load_causal_lm(name=str(folder)), load_tokenizer(str(folder))
