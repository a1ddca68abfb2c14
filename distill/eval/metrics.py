"""Evaluation metrics beyond accuracy, as pure functions over plain values and tensors.

    ece_bins            expected calibration error and the reliability-diagram bins
    length_stats        generation length drift of a student against its teacher
    paired_length_difference  mean (absolute) per-prompt length difference, student - teacher
    refusal_rate        share of generations that match a refusal pattern
    format_adherence    share of generations in the expected format (regex, JSON schema)
    token_span          the generated tokens that spell a character span of their text
    span_confidence     product of the probabilities of a span of generated tokens
    forced_sums         per-batch sums of the teacher-forced comparison (CE, agreement, D)
    perplexity          exp of a mean cross-entropy
"""

import bisect
import json
import math
import re
from collections.abc import Sequence

import torch

from distill.loss.divergences import divergence
from distill.loss.registry import eval_divergences
from distill.loss.token_losses import IGNORE_INDEX, cross_entropy

# The held-out divergences: name -> parameters, all at temperature 1: the registry's entries
# with `eval_params` (forward_kl, reverse_kl, jsd at beta 0.5, tvd), in registry order.
EVAL_DIVERGENCES: dict[str, dict[str, float]] = eval_divergences()


def perplexity(ce: float) -> float:
    """exp(ce) of a mean cross-entropy in nats; inf where exp overflows a float; NaN for NaN."""
    if math.isnan(ce):
        return math.nan
    return math.exp(ce) if ce < 709.0 else math.inf


def ece_bins(confidences: Sequence[float], correct: Sequence[bool], n_bins: int = 15) -> dict:
    """Expected calibration error over `n_bins` equal-width confidence bins on [0, 1].

    Bin b holds the confidences in [b / n, (b + 1) / n), the last bin also 1.0. With N
    predictions, count_b of them in bin b, mean confidence conf_b and accuracy acc_b there:

        ece = sum_b count_b / N * |acc_b - conf_b|

    Args:
        confidences: one probability in [0, 1] per prediction.
        correct: whether each prediction is right, aligned with `confidences`.
        n_bins: number of bins, >= 1.

    Returns:
        {"ece": float (None when there are no predictions), "bins": [{"lo", "hi", "count",
        "confidence", "accuracy"}] * n_bins}; an empty bin has count 0 and None for both means.
    """
    if len(confidences) != len(correct):
        raise ValueError(f"{len(confidences)} confidences for {len(correct)} grades")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    members: list[list[int]] = [[] for _ in range(n_bins)]
    for i, c in enumerate(confidences):
        if not 0.0 <= c <= 1.0:
            raise ValueError(f"confidence {c!r} is not a probability")
        members[min(int(c * n_bins), n_bins - 1)].append(i)
    bins, ece, n = [], 0.0, len(confidences)
    for b, idx in enumerate(members):
        conf = sum(confidences[i] for i in idx) / len(idx) if idx else None
        acc = sum(bool(correct[i]) for i in idx) / len(idx) if idx else None
        if idx:
            ece += len(idx) / n * abs(acc - conf)
        bins.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "count": len(idx), "confidence": conf, "accuracy": acc})
    return {"ece": ece if n else None, "bins": bins}


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile with linear interpolation between order statistics (numpy's default):
    position h = (n - 1) q in the sorted values, x[floor h] + frac(h) (x[floor h + 1] - x[floor h])."""
    if not values:
        raise ValueError("quantile of no values")
    xs = sorted(values)
    h = (len(xs) - 1) * q
    lo = math.floor(h)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (h - lo) * (xs[hi] - xs[lo])


def length_stats(student: Sequence[int], teacher: Sequence[int]) -> dict:
    """Generation length drift: means and 90th percentiles (`quantile`) of both models'
    lengths in tokens, mean_ratio = student mean / teacher mean, p90_ratio = student p90 /
    teacher p90 (None where the teacher's value is 0)."""
    s_mean, t_mean = sum(student) / len(student), sum(teacher) / len(teacher)
    s_p90, t_p90 = quantile(student, 0.9), quantile(teacher, 0.9)
    return {
        "student_mean": s_mean,
        "teacher_mean": t_mean,
        "student_p90": s_p90,
        "teacher_p90": t_p90,
        "mean_ratio": s_mean / t_mean if t_mean else None,
        "p90_ratio": s_p90 / t_p90 if t_p90 else None,
    }


def paired_length_difference(student: Sequence[int], teacher: Sequence[int]) -> dict:
    """Per-prompt length differences of two models' generations from the same prompts:
    mean_diff = mean(student - teacher), mean_abs_diff = mean(|student - teacher|)."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"{len(student)} student lengths for {len(teacher)} teacher lengths")
    diffs = [s - t for s, t in zip(student, teacher)]
    return {"mean_diff": sum(diffs) / len(diffs), "mean_abs_diff": sum(abs(d) for d in diffs) / len(diffs)}


def refusal_rate(texts: Sequence[str], patterns: Sequence[str]) -> float | None:
    """Share of `texts` in which any of the regular expressions `patterns` is found
    (re.search, case-insensitive); None for no texts."""
    if not texts:
        return None
    compiled = [re.compile(p, re.IGNORECASE) for p in patterns]
    return sum(any(rx.search(t) for rx in compiled) for t in texts) / len(texts)


def format_adherence(texts: Sequence[str], regex: str | None = None, schema: dict | None = None) -> float | None:
    """Share of `texts` in the expected format; None when neither check is given.

    A text adheres when it passes every check given: `regex` must match the whole text
    (re.fullmatch, DOTALL), and the text must parse as JSON and validate against the JSON
    `schema` (jsonschema, the schema's own draft).
    """
    if (regex is None and schema is None) or not texts:
        return None
    rx = re.compile(regex, re.DOTALL) if regex is not None else None
    validator = None
    if schema is not None:
        from jsonschema.validators import validator_for

        validator = validator_for(schema)(schema)

    def adheres(text: str) -> bool:
        if rx is not None and rx.fullmatch(text) is None:
            return False
        if validator is not None:
            try:
                return validator.is_valid(json.loads(text))
            except json.JSONDecodeError:
                return False
        return True

    return sum(adheres(t) for t in texts) / len(texts)


def token_span(ends: Sequence[int], start: int, end: int) -> tuple[int, int]:
    """Tokens [lo, hi) that spell the characters [start, end) of a decoded text.

    Args:
        ends: ends[k] = length of the text decoded from tokens 0..k (non-decreasing; a
            token that decodes to nothing, like EOS, repeats the previous end).
        start, end: the character span, start < end.

    Returns:
        (lo, hi): the first token whose text reaches past `start`, to the token that
        reaches `end`, inclusive; tokens spanning a border count.
    """
    lo = bisect.bisect_right(ends, start)
    hi = min(bisect.bisect_left(ends, end) + 1, len(ends))
    return lo, hi


def span_confidence(logprobs: Sequence[float], lo: int, hi: int) -> float:
    """Product of the probabilities of tokens lo..hi-1: exp(sum of their log-probabilities)."""
    return math.exp(sum(logprobs[lo:hi]))


def forced_sums(
    student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None
) -> dict[str, float]:
    """Sums over the next-token targets of one teacher-forced batch.

    Args:
        student_logits: (B, T, V) already sliced to the shared vocabulary.
        labels: (B, T) token ids, IGNORE_INDEX where no loss falls (prompt, padding).
        teacher_logits: (B, T, V) or None.

    Returns:
        count (valid targets), student_ce; with a teacher also teacher_ce, agreement (targets
        where both models' argmax agree) and each of EVAL_DIVERGENCES at T = 1 (sums; divide
        by count for the per-token means).
    """
    mask = labels[:, 1:] != IGNORE_INDEX  # (B, T-1) position t predicts token t + 1
    targets = labels[:, 1:][mask]  # (n,)
    s = student_logits[:, :-1][mask]  # (n, V) the scored positions only
    out = {"count": float(mask.sum()), "student_ce": cross_entropy(s, targets).item()}
    if teacher_logits is None:
        return out
    t = teacher_logits[:, :-1][mask]  # (n, V)
    every = torch.ones_like(targets, dtype=torch.bool)  # (n,)
    out["teacher_ce"] = cross_entropy(t, targets).item()
    out["agreement"] = float((s.argmax(-1) == t.argmax(-1)).sum())
    for name, params in EVAL_DIVERGENCES.items():
        out[name] = divergence(name, s, t, every, 1.0, **params).item()
    return out
