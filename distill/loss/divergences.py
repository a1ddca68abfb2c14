"""Divergences between teacher and student next-token distributions, as pure functions.

p = softmax(teacher / T) is the teacher, q = softmax(student / T) the student. Every
divergence is computed in log space, fp32 inside (bf16/fp16 are upcast, fp64 stays fp64),
with 0 * log 0 = 0: an id one distribution gives no mass (a -inf logit) contributes
nothing, never NaN, in value or gradient. `divergence` / `sparse_divergence` return the SUM
over valid tokens, or that sum divided by a given `num_valid` (the global count of valid
tokens); T^2 is the caller's.

The built-in divergences, registered here in `distill.loss.registry.DIVERGENCES` (also
importable from this module) with their closed forms (`distill.loss.closed_forms`); every
function below that takes a `name` looks it up there, so a divergence registered later
works the same. Each value function is f(student_logprobs, teacher_logprobs, **params):
    forward_kl       KL(p || q)
    reverse_kl       KL(q || p); +inf where q > 0 but p = 0 (the student covers an id the
                     teacher rules out): that is its true value, and its gradient is NaN.
    jsd(beta=0.5)    normalised generalised JSD, see `jsd`; beta=0 -> forward, 1 -> reverse.
    skew_forward_kl(alpha=0.1)   KL(p || alpha p + (1 - alpha) q)   (DistiLLM, Ko et al. 2024)
    skew_reverse_kl(alpha=0.1)   KL(q || alpha q + (1 - alpha) p)
    tvd              0.5 * sum |p - q|
Rows must hold at least one finite logit; +inf and NaN logits are not supported.
"""

import math

import torch

from distill.loss.closed_forms import (
    forward_kl_value_and_grad,
    jsd_value_and_grad,
    reverse_kl_value_and_grad,
    skew_forward_kl_value_and_grad,
    skew_reverse_kl_value_and_grad,
    tvd_value_and_grad,
)
from distill.loss.registry import DIVERGENCES as DIVERGENCES  # re-exported: the registry
from distill.loss.registry import DivergenceParam, DivergenceSpec, check_divergence, register_divergence
from distill.loss.registry import resolve_divergence as resolve_divergence  # re-exported


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) over the last dim from log-probabilities (..., K) -> (...); 0 log 0 = 0."""
    a = log_a.exp()  # (..., K)
    live = a > 0  # (..., K) ids outside a's support (or underflowed to 0) contribute nothing
    # Sanitise both operands off the support too: a bare where would still back-propagate
    # 0 * inf = NaN through the unselected branch (log 0 - log 0 = -inf + inf).
    la = torch.where(live, log_a, 0.0)  # (..., K)
    lb = torch.where(live, log_b, 0.0)  # (..., K)
    return torch.where(live, a * (la - lb), 0.0).sum(-1)  # (...)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w * a + (1 - w) * b) elementwise (..., K), stable for -inf and for w in {0, 1}."""
    x = log_a + (math.log(w) if w > 0 else -math.inf)  # (..., K)
    y = log_b + (math.log1p(-w) if w < 1 else -math.inf)  # (..., K)
    dead = (x == -math.inf) & (y == -math.inf)  # (..., K) no mass in either term
    # logaddexp(-inf, -inf) is -inf but its backward is exp(nan): feed it zeros there instead.
    mixed = torch.logaddexp(torch.where(dead, 0.0, x), torch.where(dead, 0.0, y))  # (..., K)
    return torch.where(dead, -math.inf, mixed)


def forward_kl(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """KL(p || q): student log-probs `log_q`, teacher `log_p`, both (..., K) -> (...)."""
    return _kl(log_p, log_q)


def reverse_kl(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """KL(q || p): (..., K) -> (...); +inf where the student covers an id the teacher does not."""
    return _kl(log_q, log_p)


def jsd(log_q: torch.Tensor, log_p: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalised JSD of GKD (Agarwal et al. 2024), normalised by beta * (1 - beta).

    With m = beta * p + (1 - beta) * q (the mixture of TRL's `generalized_jsd_loss`):

        JSD_beta = beta * KL(p || m) + (1 - beta) * KL(q || m)
        jsd      = JSD_beta / (beta * (1 - beta)) = KL(p || m) / (1 - beta) + KL(q || m) / beta

    Raw JSD_beta tends to 0 at both ends; the normalised form is continuous on [0, 1] with
    jsd(0) = KL(p || q) (forward) and jsd(1) = KL(q || p) (reverse), both special-cased
    exactly. Taylor expansion as beta -> 0 (m = q + beta (p - q)):
        KL(q || m) = beta^2 / 2 * chi2(p || q) + O(beta^3),
        KL(p || m) = KL(p || q) - beta * chi2(p || q) + O(beta^2),
    so jsd = KL(p || q) + beta * (KL(p || q) - chi2(p || q) / 2) + O(beta^2), where
    chi2(p || q) = sum (p - q)^2 / q. Since jsd_beta(p, q) = jsd_{1-beta}(q, p), the beta -> 1
    limit is KL(q || p) with the mirrored error term. TRL/paper values = this * beta(1-beta)
    (e.g. 4x smaller at beta = 0.5). In fp32 the KL(q || m) / beta term cancels to ~eps/beta
    relative error, so beta within 1e-3 of an end costs digits; use 0 or 1 there.

    Args:
        log_q: student log-probabilities (..., K).
        log_p: teacher log-probabilities (..., K).
        beta: mixture weight of the teacher, in [0, 1].

    Returns:
        (...) per-token values.
    """
    if beta == 0:
        return _kl(log_p, log_q)
    if beta == 1:
        return _kl(log_q, log_p)
    log_m = _log_mix(log_p, log_q, beta)  # (..., K)
    return _kl(log_p, log_m) / (1 - beta) + _kl(log_q, log_m) / beta


def skew_forward_kl(log_q: torch.Tensor, log_p: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """KL(p || alpha p + (1 - alpha) q), (..., K) -> (...); alpha = 0 is exactly forward KL."""
    return _kl(log_p, _log_mix(log_p, log_q, alpha))


def skew_reverse_kl(log_q: torch.Tensor, log_p: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """KL(q || alpha q + (1 - alpha) p), (..., K) -> (...); alpha = 0 is exactly reverse KL.

    Finite for alpha > 0 even where the teacher has no mass (the mixture keeps alpha * q).
    """
    return _kl(log_q, _log_mix(log_q, log_p, alpha))


def tvd(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """Total variation 0.5 * sum |p - q|, (..., K) -> (...), in [0, 1]."""
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


# The built-ins, in the order of every listing (config errors, tests, eval.json).
JSD_BETA = DivergenceParam("beta", 0.5, config_field="jsd_beta")
SKEW_ALPHA = DivergenceParam("alpha", 0.1, config_field="skew_alpha")
register_divergence(DivergenceSpec("forward_kl", forward_kl, forward_kl_value_and_grad, eval_params={}, summary="KL(p || q)"))
register_divergence(DivergenceSpec("reverse_kl", reverse_kl, reverse_kl_value_and_grad, eval_params={}, summary="KL(q || p)"))
register_divergence(
    DivergenceSpec("jsd", jsd, jsd_value_and_grad, (JSD_BETA,), eval_params={"beta": 0.5}, summary="normalised generalised JSD")
)
register_divergence(
    DivergenceSpec("skew_forward_kl", skew_forward_kl, skew_forward_kl_value_and_grad, (SKEW_ALPHA,), summary="skew forward KL")
)
register_divergence(
    DivergenceSpec("skew_reverse_kl", skew_reverse_kl, skew_reverse_kl_value_and_grad, (SKEW_ALPHA,), summary="skew reverse KL")
)
register_divergence(DivergenceSpec("tvd", tvd, tvd_value_and_grad, eval_params={}, summary="total variation distance"))


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 at least (bf16/fp16 upcast), fp64 if any input is fp64."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _normalise(total: torch.Tensor, num_valid: float | torch.Tensor | None) -> torch.Tensor:
    """total / max(num_valid, 1), or total when num_valid is None."""
    if num_valid is None:
        return total
    if isinstance(num_valid, torch.Tensor):
        return total / num_valid.to(total.dtype).clamp_min(1)
    if not (math.isfinite(num_valid) and num_valid >= 0):
        raise ValueError(f"num_valid must be a finite count >= 0, got {num_valid!r}")
    return total / max(num_valid, 1)


def _check_mask(mask: torch.Tensor, lead: torch.Size) -> None:
    if mask.dtype != torch.bool or mask.shape != lead:
        raise ValueError(f"mask must be bool of shape {tuple(lead)}, got {mask.dtype} {tuple(mask.shape)}")


def per_token(
    name: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0, **params: float
) -> torch.Tensor:
    """Per-token divergence `name` between softmax(teacher / T) and softmax(student / T).

    Args:
        name: a key of `DIVERGENCES` (the registry).
        student_logits: (..., V) any float dtype; -inf only where the teacher is -inf too
            (else forward_kl, jsd(beta=0), skew_forward_kl(alpha=0) are +inf, their true value).
        teacher_logits: (..., V) same shape; -inf entries (ids with no mass) are allowed; where
            the student keeps mass on one, reverse_kl, jsd(beta=1), skew_reverse_kl(alpha=0) are +inf.
        temperature: loss temperature T, > 0; the T^2 factor is applied by the caller.
        **params: the divergence's parameters (`beta` for jsd, `alpha` for the skew KLs, each
            in [0, 1]); the registered defaults fill in the others.

    Returns:
        (...) values, fp32 (fp64 if an input is fp64).
    """
    spec = check_divergence(name, params, temperature)
    if student_logits.shape != teacher_logits.shape:
        shapes = f"{tuple(student_logits.shape)} != teacher logits {tuple(teacher_logits.shape)}"
        raise ValueError(f"student logits {shapes}")
    dtype = _compute_dtype(student_logits, teacher_logits)
    log_q = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # (..., V)
    log_p = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)  # (..., V)
    return spec.value(log_q, log_p, **spec.bind(params))


def divergence(
    name: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    num_valid: float | torch.Tensor | None = None,
    **params: float,
) -> torch.Tensor:
    """Sum over valid tokens of `per_token(name, ...)`, or that sum / num_valid.

    Args:
        name, student_logits, teacher_logits, temperature, params: as in `per_token`.
        mask: (...) bool, True where the token counts.
        num_valid: the count to normalise by, e.g. the valid tokens of the whole global
            batch (all micro-batches and processes), so accumulated pieces add up to the
            global mean. None: return the sum. A count of 0 divides by 1 (the sum is 0 then).

    Returns:
        Scalar, fp32 (fp64 if an input is fp64). Masked positions contribute exactly 0 to it
        and exactly 0 gradient, whatever their logits hold.
    """
    _check_mask(mask, student_logits.shape[:-1])
    keep = mask.unsqueeze(-1)  # (..., 1)
    # Masked rows are replaced by zeros *before* the math, not just zeroed after: an infinite
    # value there (reverse KL off the teacher's support) would otherwise back-propagate NaN.
    s = torch.where(keep, student_logits, 0.0)  # (..., V)
    t = torch.where(keep, teacher_logits, 0.0)  # (..., V)
    return _normalise(torch.where(mask, per_token(name, s, t, temperature, **params), 0.0).sum(), num_valid)


def sparse_per_token(
    name: str,
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    temperature: float = 1.0,
    teacher_rest: torch.Tensor | None = None,
    **params: float,
) -> torch.Tensor:
    """Per-token divergence `name` against a teacher known only by its top-k, on k + 1 buckets.

    The teacher gives k distinct ids and their log-probabilities, already at the loss
    temperature (log p_T, so `temperature` divides the student logits only). Its leftover
    mass max(0, 1 - sum p_topk) forms ONE extra bucket. The student is collapsed to the same
    buckets: its probabilities on the k ids, and the total of all other ids. The divergence
    is then computed between these two (k + 1)-point distributions; by the data-processing
    inequality it is at most the dense value for the KLs, JSD and TVD, and the gap shrinks
    as the buckets refine. No teacher rest bucket remains where the top-k sum reaches 1, or
    where the student's rest is empty (k = V, or every other id is -inf for the student: a
    leftover there is taken as rounding residue); the top-k is then renormalised to sum to 1.
    So k = V equals the dense result.

    Args:
        name: a key of `DIVERGENCES` whose record allows the sparse path (`DivergenceSpec.sparse`).
        student_logits: (..., V) any float dtype.
        teacher_ids: (..., k) long, distinct ids in [0, V) per position, 1 <= k <= V.
        teacher_logprobs: (..., k) log p_T of those ids (-inf allowed).
        temperature: loss temperature T applied to the student, > 0.
        teacher_rest: optional (...) log of the teacher's leftover mass, as stored by a
            teacher cache (exact in fp32 even when the top-k log-probs are stored in fp16,
            where 1 - sum p_topk would lose the small leftovers). Given, the k + 1 buckets
            are normalised jointly instead of derived from the top-k sum; with no student
            rest (k = V) it is dropped as above.
        **params: as in `per_token`.

    Returns:
        (...) values, fp32 (fp64 if an input is fp64).
    """
    spec = check_divergence(name, params, temperature, sparse=True)
    _check_sparse_teacher(student_logits, teacher_ids, teacher_logprobs, teacher_rest)
    dtype = _compute_dtype(student_logits, teacher_logprobs)
    log_q_top, log_q_rest, empty = _student_buckets(student_logits, teacher_ids, temperature, dtype)  # (..., k), (...), (...)
    log_p = _teacher_buckets(teacher_logprobs.to(dtype), teacher_rest, empty)  # (..., k + 1)
    log_q = torch.cat([log_q_top, log_q_rest.unsqueeze(-1)], dim=-1)  # (..., k + 1)
    return spec.value(log_q, log_p, **spec.bind(params))


def _check_sparse_teacher(
    student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_rest: torch.Tensor | None
) -> None:
    """Raise ValueError unless the top-k teacher fits the student logits (see `sparse_per_token`)."""
    lead, vocab, k = student_logits.shape[:-1], student_logits.shape[-1], teacher_ids.shape[-1]
    if teacher_ids.dtype != torch.long:
        raise ValueError(f"teacher_ids must be torch.long, got {teacher_ids.dtype}")
    if teacher_ids.shape != teacher_logprobs.shape or teacher_ids.shape[:-1] != lead or not 1 <= k <= vocab:
        raise ValueError(
            f"need teacher_ids and teacher_logprobs of shape (..., k) with 1 <= k <= V matching student (..., V); "
            f"got {tuple(teacher_ids.shape)}, {tuple(teacher_logprobs.shape)}, {tuple(student_logits.shape)}"
        )
    if teacher_rest is not None and teacher_rest.shape != lead:
        raise ValueError(f"teacher_rest must have shape {tuple(lead)}, got {tuple(teacher_rest.shape)}")


def _student_buckets(
    student_logits: torch.Tensor, teacher_ids: torch.Tensor, temperature: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The student's log-probs on the top-k ids (..., k), of the rest of the vocabulary (...),
    and where that rest is empty (...) bool."""
    log_q_full = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # (..., V)
    log_q_top = log_q_full.gather(-1, teacher_ids)  # (..., k)
    in_top = torch.zeros_like(log_q_full, dtype=torch.bool).scatter_(-1, teacher_ids, True)  # (..., V)
    others = torch.where(in_top, -math.inf, log_q_full)  # (..., V)
    # The student's rest mass as an exact logsumexp (not log(1 - sum q_top), which cancels
    # for a peaked student); rows with no rest mass (k = V) go through zeros for a clean backward.
    empty = (others == -math.inf).all(-1)  # (...)
    lse = torch.where(empty.unsqueeze(-1), 0.0, others).logsumexp(-1)  # (...)
    log_q_rest = torch.where(empty, -math.inf, lse)  # (...)
    return log_q_top, log_q_rest, empty


def _teacher_buckets(log_p_top: torch.Tensor, teacher_rest: torch.Tensor | None, empty: torch.Tensor) -> torch.Tensor:
    """The teacher's k + 1 bucket log-probs (..., k + 1) from its top-k (..., k) and optional
    stored log leftover (...); `empty` (...) marks rows where the student has no rest mass."""
    # Teacher leftover log(1 - sum p_top). None is left when the sum reaches 1 (rounding up),
    # nor where the student's rest is empty: there the inputs promise the teacher has no mass
    # either, so a positive leftover is rounding residue that would make forward KL +inf.
    # Without a rest bucket the top-k is renormalised, so the buckets still sum to 1 and the
    # KLs stay >= 0 (bf16-stored log-probs are off by ~0.4%).
    if teacher_rest is not None:
        rest_given = torch.where(empty, -math.inf, teacher_rest.to(log_p_top.dtype))  # (...)
        both = torch.cat([log_p_top, rest_given.unsqueeze(-1)], dim=-1)  # (..., k + 1)
        return both - both.logsumexp(-1, keepdim=True)  # (..., k + 1) sums to 1
    total = log_p_top.logsumexp(-1)  # (...)
    none_left = (total >= 0) | empty  # (...)
    shift = torch.where(none_left & (total > -math.inf), total, 0.0)  # (...)
    log_p_top = log_p_top - shift.unsqueeze(-1)  # (..., k)
    # log(-expm1) is accurate in absolute terms, which a log-prob inside p * log(p / q) needs.
    rest = torch.log(-torch.expm1(torch.where(none_left, -1.0, total)))  # (...)
    log_p_rest = torch.where(none_left, -math.inf, rest)  # (...)
    return torch.cat([log_p_top, log_p_rest.unsqueeze(-1)], dim=-1)  # (..., k + 1)


def sparse_divergence(
    name: str,
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    teacher_rest: torch.Tensor | None = None,
    num_valid: float | torch.Tensor | None = None,
    **params: float,
) -> torch.Tensor:
    """Sum over valid tokens of `sparse_per_token(name, ...)`, or that sum / num_valid.

    Args:
        name, student_logits, teacher_ids, teacher_logprobs, temperature, teacher_rest,
            params: as in `sparse_per_token`; values at masked positions may be anything
            (they are replaced).
        num_valid: as in `divergence`.
        mask: (...) bool, True where the token counts.

    Returns:
        Scalar, fp32 (fp64 if an input is fp64); masked positions give exactly 0 value and
        0 gradient.
    """
    _check_mask(mask, student_logits.shape[:-1])
    keep = mask.unsqueeze(-1)  # (..., 1)
    vocab, k = student_logits.shape[-1], teacher_ids.shape[-1]
    # Masked rows become a uniform student and teacher on ids 0..k-1: valid, finite, and
    # their garbage (out-of-range ids, -inf everywhere) never reaches gather or backward.
    s = torch.where(keep, student_logits, 0.0)  # (..., V)
    ids = torch.where(keep, teacher_ids, torch.arange(k, device=teacher_ids.device))  # (..., k)
    logp = torch.where(keep, teacher_logprobs, -math.log(vocab))  # (..., k)
    rest = None
    if teacher_rest is not None:
        rest = torch.where(mask, teacher_rest, math.log1p(-k / vocab) if k < vocab else -math.inf)  # (...)
    total = torch.where(mask, sparse_per_token(name, s, ids, logp, temperature, rest, **params), 0.0).sum()
    return _normalise(total, num_valid)
