"""The objective: a weighted sum of named terms, each a sum over valid tokens.

    loss = (1 - alpha) * task_ce + alpha * T^2 * D(teacher, student)

D is any divergence of `distill.divergences` (forward KL by default, Hinton 2015).

Terms are computed on next-token positions: logits at t predict the token at t + 1.
"""

import torch

from distill.divergences import divergence
from distill.losses import IGNORE_INDEX, cross_entropy


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> (B, T - 1) targets of positions 0..T-2."""
    return labels[:, 1:]


def term_sums(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    vocab_size: int,
    temperature: float,
    divergence_name: str = "forward_kl",
    divergence_params: dict[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-term sums over the valid tokens of one micro-batch.

    Args:
        student_logits: (B, T, Vs); ids at or past `vocab_size` (model padding) are dropped.
        labels: (B, T) with IGNORE_INDEX where there is no target.
        teacher_logits: (B, T, Vt) or None for a label-only run.
        vocab_size: the real vocabulary both tokenizers share.
        temperature: loss temperature of the KD term.
        divergence_name: a name in `distill.divergences.DIVERGENCES`.
        divergence_params: its parameters (jsd: beta; skew KLs: alpha).
    """
    targets = next_token_targets(labels)  # (B, T-1)
    mask = targets != IGNORE_INDEX
    s = student_logits[:, :-1, :vocab_size]  # (B, T-1, V)
    terms = {"task_ce": cross_entropy(s, targets)}
    if teacher_logits is not None:
        t = teacher_logits[:, :-1, :vocab_size]  # (B, T-1, V)
        terms["kd"] = divergence(divergence_name, s, t, mask, temperature, **(divergence_params or {}))
    return terms


def combine(terms: dict[str, torch.Tensor], alpha: float, temperature: float) -> torch.Tensor:
    """Weighted sum of the term sums (still a sum over tokens, not yet normalised)."""
    if "kd" not in terms:
        return terms["task_ce"]
    return (1 - alpha) * terms["task_ce"] + alpha * temperature**2 * terms["kd"]
