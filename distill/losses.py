"""Distillation losses as pure functions: fp32 inside, summed over valid tokens.

Every function returns the SUM over valid tokens; the training loop divides by the global
count of valid tokens (across micro-batches and processes), so the loss of a step does not
depend on how the batch was split.
"""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 are upcast to fp32; fp64 stays fp64 (gradcheck, reference computations)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Sum over valid tokens of KL(p_teacher || p_student), both softened by `temperature`.

    Args:
        student_logits: (..., V) any float dtype.
        teacher_logits: (..., V) same shape; -inf entries (masked ids) are allowed.
        mask: (...) bool, True where the token counts.
        temperature: loss temperature T; the T^2 factor is applied by the caller.

    Returns:
        Scalar tensor, fp32 (fp64 for fp64 inputs).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} != teacher logits {tuple(teacher_logits.shape)}")
    log_q = F.log_softmax(_at_least_fp32(student_logits) / temperature, dim=-1)  # (..., V)
    log_p = F.log_softmax(_at_least_fp32(teacher_logits) / temperature, dim=-1)  # (..., V)
    p = log_p.exp()
    # 0 * log 0 = 0: ids the teacher gives no mass (masked, -inf) contribute nothing, not NaN.
    per_token = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)  # (...)
    return torch.where(mask, per_token, 0.0).sum()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over valid tokens of -log p(label). logits (..., V), labels (...) with IGNORE_INDEX."""
    return F.cross_entropy(
        _at_least_fp32(logits).reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
