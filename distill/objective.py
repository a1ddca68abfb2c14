"""The objective: a weighted sum of named terms, each a sum over valid tokens.

    loss = (1 - alpha) * task_ce + alpha * T^2 * D(teacher, student)

D is any divergence of `distill.divergences` (forward KL by default, Hinton 2015).

Terms are computed on next-token positions: logits at t predict the token at t + 1.
"""

import torch

from distill.divergences import divergence
from distill.fused import fused_kd_loss
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


def fused_term_sums(
    student_hidden: torch.Tensor,
    student_head: torch.nn.Linear,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.nn.Linear,
    labels: torch.Tensor,
    vocab_size: int,
    alpha: float,
    temperature: float,
    divergence_name: str = "forward_kl",
    divergence_params: dict[str, float] | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The whole objective in one fused, chunked pass: no (tokens, vocab) logits tensor.

    Args:
        student_hidden: (B, T, Hs) final (normed) student hidden states.
        student_head: the student's lm_head.
        teacher_hidden: (B, T, Ht) final teacher hidden states.
        teacher_head: the teacher's lm_head.
        labels: (B, T) with IGNORE_INDEX where there is no target.

    Returns:
        (the weighted loss sum, {"task_ce": sum, "kd": sum}) like `combine(term_sums(...))`.
    """
    hs = student_hidden[:, :-1].reshape(-1, student_hidden.shape[-1])  # (N, Hs)
    ht = teacher_hidden[:, :-1].reshape(-1, teacher_hidden.shape[-1])  # (N, Ht)
    targets = next_token_targets(labels).reshape(-1)  # (N,)
    loss, sums = fused_kd_loss(
        hs,
        student_head.weight,
        ht,
        teacher_head.weight,
        labels=targets,
        divergence=divergence_name,
        temperature=temperature,
        student_bias=student_head.bias,
        teacher_bias=teacher_head.bias,
        vocab_size=vocab_size,
        hard_ce_weight=1 - alpha,
        divergence_weight=alpha * temperature**2,
        chunk_size=chunk_size,
        return_terms=True,
        **(divergence_params or {}),
    )
    return loss, {"task_ce": sums[1], "kd": sums[0]}


def head_matches_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> bool:
    """True when logits == lm_head(last hidden state), so the fused path computes the same
    thing (False for softcapped or scaled logits, e.g. Gemma 2/3, Cohere)."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return False
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=1)
        if out.hidden_states is None:
            return False
        mine = head(out.hidden_states[-1][:, -1:])  # (B, 1, V)
        return mine.shape == out.logits.shape and torch.allclose(mine.float(), out.logits.float(), atol=1e-4, rtol=1e-4)
