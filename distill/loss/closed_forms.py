"""Closed-form per-token divergences AND their gradients w.r.t. the student logits.

The fused loss (`distill.loss.fused`) needs, for each chunk of tokens, the divergence value and
d(value)/d(student logits). Asking autograd for that keeps about ten (chunk, V) buffers
alive; the closed forms below need about four, and do no graph bookkeeping.

With z = s / T, q = softmax(z) (student), p = softmax(t / T) (teacher), every divergence D
here is a function of q, so by the softmax Jacobian

    dD/ds_i = q_i * (a_i - sum_j q_j a_j) / T,    a_j = dD/dq_j  (any constant in a cancels)

and for each built-in divergence a has a simple form (m is the mixture of that divergence),
one function `<name>_value_and_grad` each, which the registry (`distill.loss.registry`)
points at; `log_probs_value_and_grad` dispatches on the name through it:

    forward_kl        dD/ds = (q - p) / T                      (a_j = -p_j / q_j)
    reverse_kl        a = log q - log p
    jsd(beta)         a = (log q - log m) / beta,  m = beta p + (1 - beta) q
                      (the -p/m terms of KL(p||m)/(1-beta) and KL(q||m)/beta cancel)
    skew_forward_kl   q a = -(1 - alpha) q p / m,  m = alpha p + (1 - alpha) q
    skew_reverse_kl   a = log q - log m - alpha q / m,  m = alpha q + (1 - alpha) p
    tvd               a = sign(q - p) / 2

Terms with q_j = 0 contribute 0 (the q_j factor wins: q log q -> 0). The values equal
`distill.loss.divergences.per_token` and the gradients equal its autograd gradient wherever that
is finite (tested against autograd, gradcheck and the same Hypothesis extremes); where the
true value is +inf (reverse KL with student mass on an id the teacher rules out) the
gradient is NaN, as autograd's is. Everything is computed in fp32 (fp64 for fp64 inputs).
A divergence registered later brings its own closed form in its `DivergenceSpec`.
"""

import math

import torch

from distill.loss.registry import check_divergence, get_divergence


def log_softmax_at(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(x / T) over the last dim, as a new tensor; x is consumed (divided by T in
    place when T != 1).

    torch's kernel subtracts the row max exactly before the log-sum-exp, so log-probs near 0
    keep full precision even for logits of 1e4 (a bare x - logsumexp(x) would be off by
    ulp(1e4) ~ 1e-3), in one fused pass.
    """
    if temperature != 1.0:
        x.div_(temperature)
    return torch.log_softmax(x, dim=-1)


def _mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w a + (1 - w) b) (c, V) for 0 < w < 1; -inf where both are 0 (no NaN)."""
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def _softmax_chain(
    q: torch.Tensor, qa: torch.Tensor, temperature: float, row_sum: torch.Tensor | None = None, scale: float = 1.0
) -> torch.Tensor:
    """In place into qa: scale * q * (a - sum q a) / T from qa = q * a (c, V) (0 where q = 0).
    row_sum: sum q a per row (c,) when the caller already has it."""
    total = qa.sum(-1) if row_sum is None else row_sum  # (c,)
    qa.sub_(q * total.unsqueeze(-1))  # the rounding autograd's softmax backward has
    if scale / temperature != 1.0:
        qa.mul_(scale / temperature)
    return qa


def _xlogy_rows(p: torch.Tensor, log_p: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    """sum_j p_j (log p_j - log r_j) per row (c,), with 0 where p_j = 0 (KL(p || r))."""
    return _weighted_log_ratio_(p, log_p, log_r, out=torch.empty_like(log_p)).sum(-1)  # (c,)


def _weighted_log_ratio_(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out <- a * (log a - log b) (c, V), 0 where a = 0; out may be log_a or log_b (in place).

    The only NaN a finite-or-(-inf) input can give is 0 * inf where a = 0: set to 0. An inf
    where a > 0 (b = 0) stays: that term of KL(a || b) is +inf.
    """
    torch.sub(log_a, log_b, out=out).mul_(a)
    return out.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)


def per_token_and_grad(
    name: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    **params: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token divergence `name` (as `divergences.per_token`) and its student-logit gradient.

    Args:
        name: a key of `distill.loss.registry.DIVERGENCES`.
        student_logits: (c, V) any float dtype. Not modified.
        teacher_logits: (c, V) same shape. Not modified.
        temperature: loss temperature T, > 0 (T^2 is the caller's).
        **params: the divergence's parameters (`beta` for jsd, `alpha` for the skew KLs).

    Returns:
        values (c,) and d(sum of values)/d(student_logits) (c, V), both fp32 (fp64 if an
        input is fp64).
    """
    check_divergence(name, params, temperature)
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"need student and teacher logits of one shape (c, V), got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    dtype = torch.promote_types(torch.float32, torch.promote_types(student_logits.dtype, teacher_logits.dtype))
    log_q = log_softmax_at(student_logits.to(dtype, copy=True), temperature)  # (c, V)
    log_p = log_softmax_at(teacher_logits.to(dtype, copy=True), temperature)  # (c, V)
    return log_probs_value_and_grad(name, log_q, log_p, temperature, **params)


def log_probs_value_and_grad(
    name: str, log_q: torch.Tensor, log_p: torch.Tensor, temperature: float, **params: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_token_and_grad` from log-probabilities at temperature T; may overwrite log_p.

    Args:
        name: a key of `distill.loss.registry.DIVERGENCES`; its `value_and_grad` is called
            with `params` completed by the registered defaults.
        log_q: (c, V) student log_softmax(s / T), fp32/fp64.
        log_p: (c, V) teacher log_softmax(t / T), same dtype; used as scratch space.

    Returns:
        values (c,), gradient w.r.t. the student logits s (c, V).
    """
    spec = get_divergence(name)
    return spec.value_and_grad(log_q, log_p, temperature, **spec.bind(params))


# One closed form per built-in divergence, registered in `distill.loss.divergences`. Each is
# f(log_q, log_p, T, **params) -> (values (c,), gradient (c, V)) and may overwrite log_p.
# Buffers are reused in place where the value is no longer needed: each (c, V) pass costs
# about as much as the lm_head matmul's share per token on CPU.


def forward_kl_value_and_grad(log_q: torch.Tensor, log_p: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(p || q) and its gradient (q - p) / T."""
    q = log_q.exp()  # (c, V)
    p = log_p.exp()  # (c, V)
    value = _weighted_log_ratio_(p, log_p, log_q, out=log_p).sum(-1)  # (c,)
    grad = p.neg_().add_(q)  # (c, V) q - p
    return value, (grad.div_(temperature) if temperature != 1.0 else grad)


def reverse_kl_value_and_grad(log_q: torch.Tensor, log_p: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(q || p) and its gradient, a = log q - log p."""
    q = log_q.exp()  # (c, V)
    qa = _weighted_log_ratio_(q, log_q, log_p, out=log_p)  # (c, V) q (log q - log p)
    value = qa.sum(-1)  # (c,) = sum q a, reused by the chain rule
    return value, _softmax_chain(q, qa, temperature, row_sum=value)


def jsd_value_and_grad(
    log_q: torch.Tensor, log_p: torch.Tensor, temperature: float, beta: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised generalised JSD and its gradient, a = (log q - log m) / beta; beta = 0 is
    exactly forward KL, beta = 1 exactly reverse KL."""
    if beta == 0:
        return forward_kl_value_and_grad(log_q, log_p, temperature)
    if beta == 1:
        return reverse_kl_value_and_grad(log_q, log_p, temperature)
    q = log_q.exp()  # (c, V)
    log_m = _mix(log_p, log_q, beta)  # (c, V)
    p = log_p.exp()  # (c, V)
    kl_pm = _weighted_log_ratio_(p, log_p, log_m, out=log_p).sum(-1)  # (c,)
    qa = _weighted_log_ratio_(q, log_q, log_m, out=log_m)  # (c, V) q (log q - log m)
    kl_qm = qa.sum(-1)  # (c,)
    value = kl_pm / (1 - beta) + kl_qm / beta  # (c,)
    return value, _softmax_chain(q, qa, temperature, row_sum=kl_qm, scale=1.0 / beta)


def skew_forward_kl_value_and_grad(
    log_q: torch.Tensor, log_p: torch.Tensor, temperature: float, alpha: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(p || m), m = alpha p + (1 - alpha) q, and its gradient; alpha = 0 is exactly forward KL."""
    if alpha == 0:
        return forward_kl_value_and_grad(log_q, log_p, temperature)
    q = log_q.exp()  # (c, V)
    log_m = _mix(log_p, log_q, alpha)  # (c, V)
    p = log_p.exp()  # (c, V)
    value = _xlogy_rows(p, log_p, log_m)  # (c,)
    # q a = -(1 - alpha) q p / m, formed in log space; 0 where p or q is 0.
    qa = torch.where(p * q > 0, (log_q + log_p - log_m).exp_(), 0.0).mul_(-(1 - alpha))  # (c, V)
    return value, _softmax_chain(q, qa, temperature)


def skew_reverse_kl_value_and_grad(
    log_q: torch.Tensor, log_p: torch.Tensor, temperature: float, alpha: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(q || m), m = alpha q + (1 - alpha) p, and its gradient; alpha = 0 is exactly reverse KL."""
    if alpha == 0:
        return reverse_kl_value_and_grad(log_q, log_p, temperature)
    q = log_q.exp()  # (c, V)
    log_m = _mix(log_q, log_p, alpha)  # (c, V)
    value = _xlogy_rows(q, log_q, log_m)  # (c,)
    r = torch.where(q > 0, log_q - log_m, 0.0)  # (c, V) log(q / m), 0 off the support
    qa = q * (r - alpha * r.exp())  # (c, V)
    return value, _softmax_chain(q, qa, temperature)


def tvd_value_and_grad(log_q: torch.Tensor, log_p: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * sum |p - q| and its gradient, a = sign(q - p) / 2."""
    q = log_q.exp()  # (c, V)
    diff = q - log_p.exp_()  # (c, V) q - p
    value = 0.5 * diff.abs().sum(-1)  # (c,)
    qa = q * diff.sign_().mul_(0.5)  # (c, V)
    return value, _softmax_chain(q, qa, temperature)


def sparse_value_and_grad(
    name: str,
    log_q: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_rest: torch.Tensor,
    temperature: float,
    **params: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`divergences.sparse_per_token` (with a stored leftover) and its student-logit gradient.

    The student is collapsed to the k + 1 buckets (its top-k-id probabilities and the rest,
    Q), the teacher's buckets P are normalised jointly. With G = dD/d(bucket logits) from
    `log_probs_value_and_grad` on the buckets, the gradient w.r.t. a student logit i is
    G_b(i) / T for a top-k id, and (q_i / Q_rest) * G_rest / T for every other id.

    Args:
        name: a key of `distill.loss.registry.DIVERGENCES` whose record allows the sparse path.
        log_q: (c, V) student log_softmax(s / T); overwritten (used as scratch).
        teacher_ids: (c, k) long, distinct ids per row.
        teacher_logprobs: (c, k) teacher log-probs at T.
        teacher_rest: (c,) log of the teacher's leftover mass.

    Returns:
        values (c,), gradient w.r.t. the student logits (c, V), in log_q's dtype.
    """
    check_divergence(name, params, temperature, sparse=True)
    dtype = log_q.dtype
    k = teacher_ids.shape[1]
    log_q_top = log_q.gather(1, teacher_ids)  # (c, k)
    others = log_q.scatter_(1, teacher_ids, -math.inf)  # (c, V) in place: student log-probs off the top-k
    log_q_rest = torch.logsumexp(others, dim=1)  # (c,)
    empty = log_q_rest == -math.inf  # (c,) no student mass off the top-k (k = V)
    rest_p = torch.where(empty, -math.inf, teacher_rest.to(dtype))  # (c,)
    both = torch.cat([teacher_logprobs.to(dtype), rest_p.unsqueeze(1)], dim=1)  # (c, k + 1)
    log_p_buckets = both - both.logsumexp(1, keepdim=True)  # (c, k + 1)
    log_q_buckets = torch.cat([log_q_top, log_q_rest.unsqueeze(1)], dim=1)  # (c, k + 1)
    values, g_buckets = log_probs_value_and_grad(name, log_q_buckets, log_p_buckets, 1.0, **params)
    # share of each non-top id in the student's rest bucket, q_i / Q_rest; 0 where empty
    shift = torch.where(empty, 0.0, log_q_rest).unsqueeze(1)  # (c, 1)
    grad = others.sub_(shift).exp_().mul_(g_buckets[:, k : k + 1])  # (c, V)
    grad.scatter_(1, teacher_ids, g_buckets[:, :k])
    if temperature != 1.0:
        grad.div_(temperature)
    return values, grad
