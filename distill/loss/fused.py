"""Fused, chunked lm_head + divergence: the KD loss without ever holding (N, V) logits.

`fused_kd_loss` takes the final hidden states and lm_head weights of student and teacher
and returns the SUM over valid tokens of `distill.loss.divergences.per_token` (plus an optional,
explicitly weighted hard cross-entropy). Tokens are processed `chunk_size` at a time: for
each chunk the student and teacher logits (chunk, V) are formed in fp32, the per-token
divergence is computed, and - in the forward pass, so there is no second pass - its
closed-form gradient w.r.t. the chunk's student logits (the `value_and_grad` of its record in
`distill.loss.registry`; `distill.loss.closed_forms` for the built-ins; no autograd graph) is
formed and immediately contracted into the
gradients of the student hidden states, lm_head weight and bias. Only those two/three
gradients are kept for backward, which just scales them by grad_output. Peak extra memory
is therefore O(chunk * V) rather than O(N * V). The teacher receives no gradient.

`fused_sparse_kd_loss` is the same against a cached top-k teacher (`distill.data.teacher_cache`):
the teacher side is (ids, log-probs, log leftover) per token instead of hidden states and
an lm_head, and the divergence is the sparse one on k + 1 buckets.

As in `distill.loss.divergences`, the caller divides by the valid-token count and applies T^2.
"""

import math
from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable

from distill.loss.closed_forms import log_probs_value_and_grad, log_softmax_at, sparse_value_and_grad
from distill.loss.registry import check_divergence
from distill.loss.token_losses import IGNORE_INDEX

# Auto chunk: about 2**25 logits (128 MiB in fp32) per (chunk, V) buffer on an accelerator,
# whatever V is; a chunk keeps at most ~6 such buffers alive (logits, log-probs, probs,
# gradient, scratch). On CPU 2**23 (32 MiB): glibc serves a larger block by mmap and unmaps
# it when freed, so each new (chunk, V) buffer page-faults in afresh, which costs about three
# times the element-wise pass it holds (measured: `exp` of 682 x 49152 values 48 ms into a new
# buffer, 12 ms into a reused one). At or under 32 MiB, with `distill.training.host_memory`'s
# setting, freed buffers are reused instead (benchmarks/fused_chunks.py: no page fault a
# call, and the fastest of the chunk sizes it tries).
CHUNK_LOGITS = 1 << 25
CHUNK_LOGITS_CPU = 1 << 23


def auto_chunk_size(vocab_size: int, device: torch.device | str = "cuda") -> int:
    """Tokens per chunk so that one (chunk, V) fp32 buffer holds about CHUNK_LOGITS values
    (CHUNK_LOGITS_CPU on the CPU)."""
    budget = CHUNK_LOGITS_CPU if torch.device(device).type == "cpu" else CHUNK_LOGITS
    return max(16, budget // max(vocab_size, 1))


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """hidden (c, H) @ weight (V, H).T (+ bias (V,)) as `dtype`: matmul in input dtype, then upcast."""
    out = hidden @ weight.T  # (c, V) input dtype, fp32 accumulation inside the matmul
    if bias is not None:
        out = out + bias
    return out.to(dtype)  # (c, V)


def _add_tn(acc: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """acc (V, H) += g (c, V).T @ h (c, H), accumulated in acc's dtype (fp32 for bf16 inputs).

    bf16 on CUDA: bf16 operands (tensor cores) with an fp32 result; elsewhere fp32 operands.
    Rounding each chunk's product to bf16 would add one rounding per chunk to the weight grad.
    """
    if h.dtype == acc.dtype:
        acc.addmm_(g.to(acc.dtype).T, h)
        return
    if h.is_cuda:
        try:
            acc += torch.mm(g.to(h.dtype).T, h, out_dtype=acc.dtype)  # type: ignore[call-arg]
            return
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    acc.addmm_(g.to(acc.dtype).T, h.to(acc.dtype))


def _dense_teacher(h_t: torch.Tensor, w_t: torch.Tensor, b_t: torch.Tensor | None, opts: dict):
    """Per-chunk (values, student-logit grad) against a teacher given by hidden states + lm_head."""
    vocab, temperature = opts["vocab_size"], opts["temperature"]
    wt, bt = w_t[:vocab], None if b_t is None else b_t[:vocab]  # padded rows are never used

    def chunk(idx: torch.Tensor, log_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t_logits = _logits(h_t.index_select(0, idx), wt, bt, log_q.dtype)  # (c, V) no grad
        log_p = log_softmax_at(t_logits, temperature)  # (c, V)
        del t_logits
        return log_probs_value_and_grad(opts["divergence"], log_q, log_p, temperature, **opts["params"])

    return chunk


def _sparse_teacher(ids: torch.Tensor, logprobs: torch.Tensor, rest: torch.Tensor, opts: dict):
    """Per-chunk (values, student-logit grad) against a cached top-k teacher."""

    def chunk(idx: torch.Tensor, log_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sparse_value_and_grad(
            opts["divergence"], log_q, ids.index_select(0, idx), logprobs.index_select(0, idx),
            rest.index_select(0, idx), opts["temperature"], **opts["params"],
        )  # fmt: skip

    return chunk


class _FusedKD(torch.autograd.Function):
    """Chunked lm_head + divergence whose gradients are computed during forward.

    `teacher_chunk(idx, log_q)` gives the chunk's per-token values and student-logit
    gradient: `_dense_teacher` (hidden states + lm_head) or `_sparse_teacher` (cached top-k).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        h_s: torch.Tensor,
        w_s: torch.Tensor,
        b_s: torch.Tensor | None,
        valid: torch.Tensor,
        labels: torch.Tensor | None,
        opts: dict,
        teacher_chunk: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        vocab: int = opts["vocab_size"]
        chunk: int = opts["chunk_size"]
        ce_weight: float = opts["hard_ce_weight"]
        div_weight: float = opts["divergence_weight"]
        temperature: float = opts["temperature"]
        want_ce = labels is not None and (ce_weight > 0 or opts["return_terms"])
        need_h, need_w, need_b = ctx.needs_input_grad[:3]  # type: ignore[attr-defined]
        dtype = torch.promote_types(torch.float32, torch.promote_types(h_s.dtype, w_s.dtype))
        ws = w_s[:vocab]  # (V, Hs) view: padded rows are never used
        bs = None if b_s is None else b_s[:vocab]  # (V,)

        loss = torch.zeros((), dtype=dtype, device=h_s.device)
        terms = torch.zeros(2, dtype=dtype, device=h_s.device)  # [divergence sum, CE sum], for logging
        grad_h = torch.zeros_like(h_s) if need_h else None  # (N, Hs)
        # Weight/bias gradients accumulate across chunks in fp32 (fp64 for fp64 inputs).
        grad_w = torch.zeros(w_s.shape, dtype=dtype, device=w_s.device) if need_w else None  # (V_pad, Hs)
        grad_b = torch.zeros(b_s.shape, dtype=dtype, device=b_s.device) if need_b and b_s is not None else None

        rows = valid.nonzero().squeeze(1)  # (n,) masked tokens skip all compute
        for start in range(0, rows.numel(), chunk):
            idx = rows[start : start + chunk]  # (c,)
            hs = h_s.index_select(0, idx)  # (c, Hs)
            s_logits = _logits(hs, ws, bs, dtype)  # (c, V)
            log_sm = torch.log_softmax(s_logits, dim=-1) if want_ce and temperature != 1.0 else None  # (c, V), T = 1
            log_q = log_softmax_at(s_logits, temperature)  # (c, V)
            del s_logits
            ce_grad = None
            if want_ce:
                assert labels is not None
                target = labels.index_select(0, idx).unsqueeze(1)  # (c, 1)
                at_one = log_q if log_sm is None else log_sm  # (c, V) log-probs at T = 1
                ce = -at_one.gather(1, target).sum()
                terms[1] += ce
                if ce_weight > 0:
                    loss += ce_weight * ce
                    ce_grad = at_one.exp() if log_sm is None else log_sm.exp_()  # (c, V) softmax(s)
                    ce_grad.scatter_add_(1, target, torch.full_like(target, -1, dtype=ce_grad.dtype))
                del log_sm, at_one
            div_tok, g = teacher_chunk(idx, log_q)  # (c,), (c, V); log_q may be overwritten
            del log_q
            div = div_tok.sum()
            loss += div_weight * div
            terms[0] += div
            if div_weight != 1.0:
                g.mul_(div_weight)  # (c, V) d(chunk loss)/d(student logits)
            if ce_grad is not None:
                g.add_(ce_grad, alpha=ce_weight)
                del ce_grad
            if grad_h is not None:
                grad_h.index_copy_(0, idx, (g.to(ws.dtype) @ ws).to(grad_h.dtype))  # (c, Hs)
            if grad_w is not None:
                _add_tn(grad_w[:vocab], g, hs)  # (V, Hs)
            if grad_b is not None:
                grad_b[:vocab] += g.sum(0)  # (V,)
            del g
        ctx.save_for_backward(
            grad_h,
            None if grad_w is None else grad_w.to(w_s.dtype),
            None if grad_b is None else grad_b.to(b_s.dtype),  # type: ignore[union-attr]
        )
        ctx.mark_non_differentiable(terms)
        return loss, terms

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor, _grad_terms) -> tuple:  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.saved_tensors  # type: ignore[attr-defined]

        def scale(g: torch.Tensor | None) -> torch.Tensor | None:
            return None if g is None else g * grad_out.to(g.dtype)

        return scale(grad_h), scale(grad_w), scale(grad_b), None, None, None, None


def _check_student(
    h: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    vocab_size: int,
    chunk_size: int | None,
    hard_ce_weight: float,
    divergence_weight: float,
) -> tuple[torch.Tensor, int]:
    """Validate the student side and the weights; return the valid-token mask (N,) and chunk size."""
    n = h.shape[0]
    if h.dim() != 2:
        raise ValueError(f"student_hidden must be (N, Hs), got {tuple(h.shape)}")
    if w.dim() != 2 or w.shape[1] != h.shape[1]:
        raise ValueError(f"student_weight must be (V, {h.shape[1]}), got {tuple(w.shape)}")
    if not 1 <= vocab_size <= w.shape[0]:
        raise ValueError(f"vocab_size must be in [1, {w.shape[0]}], got {vocab_size}")
    if b is not None and b.shape != (w.shape[0],):
        raise ValueError(f"student_bias must be ({w.shape[0]},), got {tuple(b.shape)}")
    if chunk_size is None:
        chunk_size = auto_chunk_size(vocab_size, h.device)
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    for name, weight in (("hard_ce_weight", hard_ce_weight), ("divergence_weight", divergence_weight)):
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {weight!r}")
    if mask is None and labels is None:
        raise ValueError("pass mask (N,) bool or labels (N,) with ignore_index -100")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != (n,)):
        raise ValueError(f"mask must be bool of shape ({n},), got {mask.dtype} {tuple(mask.shape)}")
    if labels is not None and (labels.dtype != torch.long or labels.shape != (n,)):
        raise ValueError(f"labels must be long of shape ({n},), got {labels.dtype} {tuple(labels.shape)}")
    if hard_ce_weight > 0 and labels is None:
        raise ValueError("hard_ce_weight > 0 needs labels")
    valid = torch.ones(n, dtype=torch.bool, device=h.device) if mask is None else mask
    if labels is not None:
        valid = valid & (labels != IGNORE_INDEX)  # (N,)
    return valid, chunk_size


def _check_teacher(
    h_s: torch.Tensor,
    w_s: torch.Tensor,
    h_t: torch.Tensor,
    w_t: torch.Tensor,
    b_t: torch.Tensor | None,
    vocab_size: int | None,
) -> int:
    """Validate the dense teacher side against the student's; return the shared vocab size."""
    n = h_s.shape[0]
    if h_s.dim() != 2 or h_t.dim() != 2 or h_t.shape[0] != n:
        raise ValueError(f"need student_hidden (N, Hs) and teacher_hidden (N, Ht), got {tuple(h_s.shape)} and {tuple(h_t.shape)}")
    if w_t.dim() != 2 or w_t.shape[1] != h_t.shape[1]:
        raise ValueError(f"teacher_weight must be (V, {h_t.shape[1]}), got {tuple(w_t.shape)}")
    vs, vt = w_s.shape[0], w_t.shape[0]
    if vocab_size is None:
        if vs != vt:
            raise ValueError(f"student vocab {vs} != teacher vocab {vt}; pass vocab_size to slice padded heads")
        vocab_size = vs
    if not 1 <= vocab_size <= vt:
        raise ValueError(f"vocab_size must be in [1, {min(vs, vt)}], got {vocab_size}")
    if b_t is not None and b_t.shape != (vt,):
        raise ValueError(f"teacher_bias must be ({vt},), got {tuple(b_t.shape)}")
    return vocab_size


def _options(
    divergence: str, temperature: float, params: dict, vocab_size: int, chunk_size: int,
    hard_ce_weight: float, divergence_weight: float, return_terms: bool,
) -> dict:  # fmt: skip
    """The non-tensor arguments of `_FusedKD`, as plain Python values."""
    return {
        "divergence": divergence,
        "temperature": float(temperature),
        "params": dict(params),
        "vocab_size": int(vocab_size),
        "chunk_size": chunk_size,
        "hard_ce_weight": float(hard_ce_weight),
        "divergence_weight": float(divergence_weight),
        "return_terms": return_terms,
    }


def fused_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    vocab_size: int | None = None,
    hard_ce_weight: float = 0.0,
    divergence_weight: float = 1.0,
    chunk_size: int | None = None,
    return_terms: bool = False,
    **divergence_params: float,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sum over valid tokens of divergence(teacher || student) (+ hard_ce_weight * CE sum), fused.

    Equal (up to rounding) to building the full logits, calling
    `distill.loss.divergences.divergence(divergence, student_logits, teacher_logits, valid, T, **params)`
    and adding `hard_ce_weight * cross_entropy(student_logits[valid], labels[valid], reduction="sum")`
    (CE at temperature 1), but never allocates more than (chunk_size, V) logits at a time.
    Gradients flow to the student hidden states, weight and bias only; backward is free
    (the gradients are computed during forward), so forward costs about as much as
    forward + backward of the naive path. Double backward is not supported.

    Args:
        student_hidden: (N, Hs) final student hidden states (flatten batch and time first).
        student_weight: (V_s, Hs) student lm_head weight (V_s >= V).
        teacher_hidden: (N, Ht) teacher hidden states; never differentiated.
        teacher_weight: (V_t, Ht) teacher lm_head weight (V_t >= V).
        mask: (N,) bool, True where the token counts. Optional if `labels` is given.
        labels: (N,) long targets, `IGNORE_INDEX` (-100) where the token does not count. The
            valid set is `mask & (labels != -100)` when both are given. Required if
            hard_ce_weight > 0.
        divergence: a key of `distill.loss.registry.DIVERGENCES`.
        temperature: softens both distributions, > 0; T^2 scaling is the caller's.
        student_bias: (V_s,) optional student lm_head bias.
        teacher_bias: (V_t,) optional teacher lm_head bias.
        vocab_size: use only the first `vocab_size` ids of both heads (padded vocabularies);
            None requires V_s == V_t. Padded student rows get zero gradient.
        hard_ce_weight: weight of the hard-label cross-entropy sum; 0 (default) adds nothing.
        divergence_weight: weight of the divergence sum (1 by default; the loop passes
            alpha * T^2 so one pass yields the whole objective).
        chunk_size: tokens per chunk; peak extra memory is about six (chunk_size, V) fp32
            tensors. None: `auto_chunk_size(V, device)` (2**25 logits
            per buffer, 2**23 on CPU).
        return_terms: also return the unweighted sums [divergence, CE] (2,) for logging
            (CE is computed when labels are given, even at weight 0).
        **divergence_params: its parameters (`beta` for jsd, `alpha` for the skew KLs).

    Returns:
        Scalar, fp32 (fp64 if the student inputs are fp64): the weighted sum over valid
        tokens; with return_terms, (that scalar, the (2,) unweighted term sums).
    """
    check_divergence(divergence, divergence_params, temperature)  # validates name, params, T
    vocab_size = _check_teacher(student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_bias, vocab_size)
    valid, chunk_size = _check_student(
        student_hidden, student_weight, student_bias, mask, labels, vocab_size, chunk_size, hard_ce_weight,
        divergence_weight,
    )  # fmt: skip
    opts = _options(divergence, temperature, divergence_params, vocab_size, chunk_size, hard_ce_weight,
                    divergence_weight, return_terms)  # fmt: skip
    b_t = None if teacher_bias is None else teacher_bias.detach()
    teacher = _dense_teacher(teacher_hidden.detach(), teacher_weight.detach(), b_t, opts)
    loss, terms = _FusedKD.apply(student_hidden, student_weight, student_bias, valid, labels, opts, teacher)
    return (loss, terms) if return_terms else loss


def fused_sparse_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_rest: torch.Tensor,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    student_bias: torch.Tensor | None = None,
    vocab_size: int | None = None,
    hard_ce_weight: float = 0.0,
    divergence_weight: float = 1.0,
    chunk_size: int | None = None,
    return_terms: bool = False,
    **divergence_params: float,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`fused_kd_loss` against a cached top-k teacher (`distill.data.teacher_cache`).

    Equal (up to rounding) to `distill.loss.divergences.sparse_divergence(divergence,
    student_logits, teacher_ids, teacher_logprobs, valid, T, teacher_rest, **params)` (+ the
    weighted hard CE) on the full student logits, computed chunk by chunk with closed-form
    gradients (`distill.loss.closed_forms.sparse_value_and_grad`), so no (N, V) tensor exists.

    Args:
        student_hidden, student_weight, student_bias, mask, labels, divergence, temperature,
            hard_ce_weight, divergence_weight, chunk_size, return_terms, divergence_params:
            as in `fused_kd_loss`.
        teacher_ids: (N, k) long, distinct ids per token (anything where not valid).
        teacher_logprobs: (N, k) the teacher's log-probs of those ids at `temperature`.
        teacher_rest: (N,) log of the teacher's leftover mass (-inf: none).
        vocab_size: the first `vocab_size` student ids (padded heads); None: all rows.
    """
    check_divergence(divergence, divergence_params, temperature, sparse=True)
    n = student_hidden.shape[0]
    k = teacher_ids.shape[-1] if teacher_ids.dim() == 2 else -1
    if teacher_ids.shape != (n, k) or teacher_logprobs.shape != (n, k) or teacher_rest.shape != (n,):
        raise ValueError(
            f"need teacher_ids and teacher_logprobs (N, k) and teacher_rest (N,) with N = {n}; got "
            f"{tuple(teacher_ids.shape)}, {tuple(teacher_logprobs.shape)}, {tuple(teacher_rest.shape)}"
        )
    if teacher_ids.dtype != torch.long:
        raise ValueError(f"teacher_ids must be torch.long, got {teacher_ids.dtype}")
    vocab_size = student_weight.shape[0] if vocab_size is None else vocab_size
    if k > vocab_size:
        raise ValueError(f"top-k {k} exceeds the vocabulary {vocab_size}")
    valid, chunk_size = _check_student(
        student_hidden, student_weight, student_bias, mask, labels, vocab_size, chunk_size, hard_ce_weight,
        divergence_weight,
    )  # fmt: skip
    opts = _options(divergence, temperature, divergence_params, vocab_size, chunk_size, hard_ce_weight,
                    divergence_weight, return_terms)  # fmt: skip
    loss, terms = _FusedKD.apply(
        student_hidden, student_weight, student_bias, valid, labels, opts,
        _sparse_teacher(teacher_ids, teacher_logprobs.detach(), teacher_rest.detach(), opts),
    )  # fmt: skip
    return (loss, terms) if return_terms else loss
