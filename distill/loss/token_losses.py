"""Task losses as pure functions: fp32 inside, summed over valid tokens.

The teacher-student divergences live in `distill/loss/divergences.py`.

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


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over valid tokens of -log p(label). logits (..., V), labels (...) with IGNORE_INDEX."""
    return F.cross_entropy(
        _at_least_fp32(logits).reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def _feature_per_token(name: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    s, t = _at_least_fp32(student), _at_least_fp32(teacher)
    if name == "mse":
        return (s - t).pow(2).mean(-1)
    if name == "ln_mse":
        return (F.layer_norm(s, s.shape[-1:]) - F.layer_norm(t, t.shape[-1:])).pow(2).mean(-1)
    if name == "cosine":
        return 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    raise ValueError(f"unknown feature loss {name!r}; known: {', '.join(FEATURE_LOSSES)}")


FEATURE_LOSSES = ("mse", "cosine", "ln_mse")


def feature_loss(name: str, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over valid tokens of a per-token distance between hidden states of one width.

    Args:
        name: 'mse' (mean over the hidden dimension of the squared difference), 'cosine'
            (1 - cosine similarity) or 'ln_mse' (MSE after a parameter-free layer norm of both).
        student: (..., D) projected student states.
        teacher: (..., D) teacher states (no gradient is taken through them).
        mask: (...) bool, True at the tokens that count.
    """
    if student.shape != teacher.shape or student.shape[:-1] != mask.shape:
        raise ValueError(f"feature_loss: student {tuple(student.shape)}, teacher {tuple(teacher.shape)} and mask {tuple(mask.shape)} disagree")
    return _feature_per_token(name, student[mask], teacher.detach()[mask]).sum()  # (n_valid,) -> ()
