"""KD between models of different vocabularies, at aligned positions, as pure functions.

At a KD pair (`distill.data.alignment`) the teacher's distribution over ITS vocabulary is
carried into the student's: the probability of each teacher token whose bytes are a
student token goes to that student id (several teacher ids with the same bytes add up);
the probability of every other teacher token forms one leftover bucket. The student's own
distribution keeps its probabilities on the ids that have a teacher counterpart, and puts
all the rest into its leftover bucket. The divergence is then computed exactly between the
two distributions over (shared ids + 1 bucket): with one tokenizer on both sides nothing is
left over and it equals the ordinary divergence.

    teacher_in_student_space   teacher log-probs (full, or top-k from a cache) -> buckets
    bucket_divergence          the registered divergence on those buckets, per pair
    uld                        Boizard et al. 2024's sorted-probability L1 between the two
                               sides' leftover tokens (no shared ids needed), per pair

A teacher known by its top-k (a cache) has buckets only on the mapped ids of its top-k, the
rest (its stored leftover and its unmapped top-k entries) in the bucket, as the sparse
path of `distill.loss.divergences` does.
"""

import math

import torch

from distill.loss.registry import check_divergence


def _logsumexp_scatter(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """out[m, c] = logsumexp of values[m, i] over i with index[m, i] == c; -inf where none.

    values, index: (M, K) (index may be an expanded view); out (M, size)."""
    m = values.new_full((values.shape[0], size), -math.inf).scatter_reduce(1, index, values, "amax")  # (M, size)
    shift = torch.where(m == -math.inf, 0.0, m)  # (M, size)
    total = values.new_zeros(values.shape[0], size).scatter_add(1, index, (values - shift.gather(1, index)).exp())
    return torch.where(m == -math.inf, -math.inf, shift + total.log())


def teacher_in_student_space(
    teacher_logprobs: torch.Tensor,
    t2s: torch.Tensor,
    student_vocab: int,
    teacher_ids: torch.Tensor | None = None,
    teacher_rest: torch.Tensor | None = None,
    uld_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The teacher's buckets in the student's vocabulary.

    Args:
        teacher_logprobs: (M, Vt) full log-probs, or (M, k) top-k ones with `teacher_ids`.
        t2s: (Vt,) student id of each teacher id, -1 where none (`VocabMap.t2s`).
        student_vocab: Vs.
        teacher_ids: (M, k) teacher ids of a top-k, or None for the full vocabulary.
        teacher_rest: (M,) log of a top-k's leftover mass (a cache's), or None.
        uld_k: how many of the largest unmatched teacher log-probs to return, sorted (ULD).

    Returns:
        log_p (M, Vs): log-probs on the student ids that are buckets of their own, -inf
            elsewhere; own (M, Vs) bool: which ids are; rest (M,): log of the leftover
            bucket; unmatched (M, uld_k) sorted largest first (-inf padded), or None.
    """
    rows = teacher_logprobs.shape[0]
    s_of = t2s.unsqueeze(0) if teacher_ids is None else t2s[teacher_ids]  # (1, Vt) or (M, k)
    lp = teacher_logprobs.float()
    index = torch.where(s_of >= 0, s_of, student_vocab).expand(rows, -1)  # (M, K) unmatched -> the extra column
    buckets = _logsumexp_scatter(lp, index, student_vocab + 1)  # (M, Vs + 1)
    own = torch.zeros(rows, student_vocab + 1, dtype=torch.bool, device=lp.device).scatter_(1, index, True)[:, :-1]
    rest = buckets[:, -1]  # (M,)
    if teacher_rest is not None:
        rest = torch.logaddexp(rest, teacher_rest.float())
    unmatched = None
    if uld_k > 0:
        masked = torch.where(s_of >= 0, -math.inf, lp)  # (M, K)
        unmatched = masked.topk(min(uld_k, masked.shape[1]), dim=-1).values  # (M, uld_k)
    return buckets[:, :-1], own, rest, unmatched


def _student_buckets(student_logits: torch.Tensor, own: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log q on own ids (-inf elsewhere) (M, V) and the log leftover (M,): an exact logsumexp."""
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)  # (M, V)
    others = torch.where(own, -math.inf, log_q)  # (M, V)
    empty = (others == -math.inf).all(-1)  # (M,) every id is its own bucket
    lse = torch.where(empty.unsqueeze(-1), 0.0, others).logsumexp(-1)  # clean backward where empty
    return torch.where(own, log_q, -math.inf), torch.where(empty, -math.inf, lse)


def bucket_divergence(
    name: str,
    student_logits: torch.Tensor,
    teacher_log: torch.Tensor,
    own: torch.Tensor,
    teacher_rest: torch.Tensor,
    temperature: float = 1.0,
    **params: float,
) -> torch.Tensor:
    """Per-pair divergence `name` on (own ids + one leftover bucket) -> (M,).

    Args:
        student_logits: (M, Vs) the student's logits at the pairs (divided by T here).
        teacher_log, own, teacher_rest: from `teacher_in_student_space` (already at T).
    """
    spec = check_divergence(name, params, temperature)
    log_q_own, log_q_rest = _student_buckets(student_logits, own, temperature)
    log_p = torch.cat([torch.where(own, teacher_log, -math.inf), teacher_rest.unsqueeze(-1)], dim=-1)  # (M, Vs + 1)
    # Both sides empty in the leftover (one tokenizer): drop it; a teacher leftover where the
    # student has none cannot be matched and is renormalised away, as the sparse path does.
    log_p[:, -1] = torch.where(log_q_rest == -math.inf, -math.inf, log_p[:, -1])
    log_p = log_p - log_p.logsumexp(-1, keepdim=True)
    log_q = torch.cat([log_q_own, log_q_rest.unsqueeze(-1)], dim=-1)  # (M, Vs + 1)
    return spec.value(log_q, log_p, **spec.bind(params))


def uld(student_logits: torch.Tensor, own: torch.Tensor, teacher_unmatched: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Sorted-probability L1 between the unmatched parts of both sides -> (M,).

    The student's probabilities on its ids without a teacher counterpart and the teacher's
    on its unmatched ids (`teacher_unmatched`, largest first), each sorted, the shorter
    padded with zeros, compared rank by rank: the ULD loss (Boizard et al. 2024) restricted
    to what the shared-id buckets cannot compare, over the k largest of each side.
    """
    k = teacher_unmatched.shape[-1]
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)  # (M, V)
    others = torch.where(own, -math.inf, log_q)  # (M, V)
    q_sorted = others.topk(min(k, others.shape[-1]), dim=-1).values.exp()  # (M, <=k)
    p_sorted = teacher_unmatched.exp()  # (M, k)
    if q_sorted.shape[-1] < k:
        q_sorted = torch.nn.functional.pad(q_sorted, (0, k - q_sorted.shape[-1]))
    return (q_sorted - p_sorted).abs().sum(-1)
