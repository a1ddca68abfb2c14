"""Scores against the true distribution, for built-in tasks that know it exactly.

On `builtin:grammar` every target's true next-token distribution is known
(`distill.data.tasks.grammar`), so a model is scored by its held-out KL to the truth,
KL(truth || model) per token: 0 for a perfect model, whatever labels were sampled. The
teacher gets the same score, and the true entropy is the floor of the held-out CE
(CE = entropy + KL, in expectation).
"""

import torch

from distill.data.rows import Row, collate, tokenize_rows
from distill.data.tasks import grammar as grammar_task
from distill.loss.token_losses import IGNORE_INDEX


@torch.no_grad()
def _kl_sums(model, truths: list[torch.Tensor], batch, vocab: int) -> float:
    """Sum over the batch's targets of KL(truth || model)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V')
    targets = batch["labels"][:, 1:] != IGNORE_INDEX  # (B, T-1)
    total = 0.0
    for row, truth in enumerate(truths):
        pos = targets[row].nonzero().squeeze(1)  # (n,) positions whose next token is a target
        row_logits = logits[row, pos, :vocab].float().cpu()  # (n, V)
        total += float(grammar_task.kl_to_truth(truth[:, :vocab], row_logits).sum())
    return total


def truth_scores(model, tokenizer, rows: list[Row], seed: int, batch_size: int, max_length: int, teacher=None) -> dict:
    """{"kl": student's mean KL(truth || student) per target token, "entropy": the mean true
    entropy, "tokens": targets scored; with a teacher also "teacher_kl"}."""
    g = grammar_task.make_grammar(seed)
    examples = tokenize_rows(rows, tokenizer, max_length, source="eval")
    vocab = len(tokenizer)
    device = next(model.parameters()).device
    model.eval()
    sums = {"kl": 0.0, "teacher_kl": 0.0}
    count = 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        truths = [grammar_task.true_probs_tensor(g, r.prompt, r.completion, tokenizer) for r in chunk]
        batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], tokenizer.pad_token_id).items()}
        sums["kl"] += _kl_sums(model, truths, batch, vocab)
        if teacher is not None:
            sums["teacher_kl"] += _kl_sums(teacher, truths, batch, vocab)
        count += sum(t.shape[0] for t in truths)
    samples = [grammar_task.Sample(r.prompt, r.completion) for r in rows]
    out = {"kl": sums["kl"] / max(count, 1), "entropy": grammar_task.entropy_per_token(g, samples), "tokens": count}
    if teacher is not None:
        out["teacher_kl"] = sums["teacher_kl"] / max(count, 1)
    return out
