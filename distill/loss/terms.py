"""The objective: a weighted sum of named terms, each a sum over valid tokens.

    loss = (1 - alpha) * task_ce + alpha * T^2 * D(teacher, student) [+ beta * feature]

(T^2 only when `objective.t_squared`; the weights come from `ObjectiveConfig.term_weights`;
the feature term, `distill.training.features.feature_term_sum`, with `features.weight` = beta.)

D is any divergence of `distill.loss.divergences` (forward KL by default, Hinton 2015).

Terms are computed on next-token positions: logits at t predict the token at t + 1.
"""

import torch

from distill.loss.divergences import divergence, sparse_divergence
from distill.loss.fused import fused_kd_loss, fused_sparse_kd_loss
from distill.loss.token_losses import IGNORE_INDEX, cross_entropy
from distill.models.last_position import last_position


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
        divergence_name: a name in `distill.loss.divergences.DIVERGENCES`.
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


def sparse_term_sums(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_rest: torch.Tensor,
    vocab_size: int,
    temperature: float,
    divergence_name: str = "forward_kl",
    divergence_params: dict[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """`term_sums` against a cached top-k teacher (`distill.data.teacher_cache`).

    Args:
        student_logits: (B, T, Vs).
        labels: (B, T) with IGNORE_INDEX where there is no target.
        teacher_ids, teacher_logprobs: (B, T-1, k) the teacher's top-k at each next-token
            position (already at the loss temperature), garbage where there is no target.
        teacher_rest: (B, T-1) log of the teacher's leftover mass.
    """
    targets = next_token_targets(labels)  # (B, T-1)
    mask = targets != IGNORE_INDEX
    s = student_logits[:, :-1, :vocab_size]  # (B, T-1, V)
    kd = sparse_divergence(
        divergence_name, s, teacher_ids, teacher_logprobs, mask, temperature, teacher_rest, **(divergence_params or {})
    )
    return {"task_ce": cross_entropy(s, targets), "kd": kd}


def combine(terms: dict[str, torch.Tensor], ce_weight: float, kd_weight: float) -> torch.Tensor:
    """ce_weight * task_ce + kd_weight * kd (still a sum over tokens, not yet normalised);
    the task CE alone, unweighted, without a KD term. The training loop adds beta * feature."""
    if "kd" not in terms:
        return terms["task_ce"]
    return ce_weight * terms["task_ce"] + kd_weight * terms["kd"]


def fused_term_sums(
    student_hidden: torch.Tensor,
    student_head: torch.nn.Linear,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.nn.Linear,
    labels: torch.Tensor,
    vocab_size: int,
    ce_weight: float,
    kd_weight: float,
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
        ce_weight, kd_weight: the term weights (`ObjectiveConfig.term_weights`).

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
        hard_ce_weight=ce_weight,
        divergence_weight=kd_weight,
        chunk_size=chunk_size,
        return_terms=True,
        **(divergence_params or {}),
    )
    return loss, {"task_ce": sums[1], "kd": sums[0]}


def fused_sparse_term_sums(
    student_hidden: torch.Tensor,
    student_head: torch.nn.Linear,
    labels: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_rest: torch.Tensor,
    vocab_size: int,
    ce_weight: float,
    kd_weight: float,
    temperature: float,
    divergence_name: str = "forward_kl",
    divergence_params: dict[str, float] | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`fused_term_sums` against a cached top-k teacher: (B, T-1, k) ids / log-probs and
    (B, T-1) log leftovers at the next-token positions, as `sparse_term_sums` takes them."""
    hs = student_hidden[:, :-1].reshape(-1, student_hidden.shape[-1])  # (N, Hs)
    k = teacher_ids.shape[-1]
    loss, sums = fused_sparse_kd_loss(
        hs,
        student_head.weight,
        teacher_ids.reshape(-1, k),
        teacher_logprobs.reshape(-1, k),
        teacher_rest.reshape(-1),
        labels=next_token_targets(labels).reshape(-1),
        divergence=divergence_name,
        temperature=temperature,
        student_bias=student_head.bias,
        vocab_size=vocab_size,
        hard_ce_weight=ce_weight,
        divergence_weight=kd_weight,
        chunk_size=chunk_size,
        return_terms=True,
        **(divergence_params or {}),
    )
    return loss, {"task_ce": sums[1], "kd": sums[0]}


def head_matches_logits(model, **inputs: torch.Tensor) -> bool:
    """True when logits == lm_head(last hidden state), so the fused path computes the same
    thing (False for softcapped or scaled logits, e.g. Gemma 2/3, Cohere). `inputs`: the
    forward's arguments of a small batch (input_ids and attention_mask or position_ids)."""
    head = model.get_output_embeddings()
    # Exactly nn.Linear: a subclass (a fake-quantized lm_head, quant.exclude without lm_head)
    # computes something else than the matmul of its weight the fused path does.
    if type(head) is not torch.nn.Linear:
        return False
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, logits_to_keep=last_position(next(iter(inputs.values()))))
        if out.hidden_states is None:
            return False
        mine = head(out.hidden_states[-1][:, -1:])  # (B, 1, V)
        return mine.shape == out.logits.shape and torch.allclose(mine.float(), out.logits.float(), atol=1e-4, rtol=1e-4)
