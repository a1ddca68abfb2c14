"""Task losses as pure functions: fp32 inside, summed over valid tokens.

The teacher-student divergences live in `distill/divergences.py`.

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
