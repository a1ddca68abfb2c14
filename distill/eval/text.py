"""Evaluation of a run on {"text"} rows: what a pre-training-style distillation is judged by.

Text rows have no prompt and no answer, so accuracy, calibration and format mean nothing;
a text run is scored on its held-out rows (the hash split of `distill.data.rows.text_split`,
or data.eval_source), each row scored alone (never packed):

    teacher-forced     held-out cross-entropy and perplexity of the student (and the
                       teacher); against the teacher at T = 1, per target token: top-1
                       agreement, forward KL, reverse KL, JSD (beta 0.5) and TVD
    generation         the first eval.text_prompt_tokens tokens of a held-out row (at most
                       half of it) are a prompt that both models continue greedily, up to
                       eval.max_new_tokens or EOS: the drift of the continuation length
                       (student minus teacher, per prompt) and how often each ends with EOS

eval.json holds these under `text` (the gates read that block: heldout_ce, perplexity,
agreement_top1, divergences, length.mean_ratio, length.p90_ratio). Everything runs batched
under no_grad; the teacher-forced batches hold at most about MAX_LOGITS logits per model.
"""

import time

import torch

from distill.config import EvalConfig
from distill.data.rows import Example, Row, tokenize_rows
from distill.eval import metrics
from distill.eval.evaluate import forced_sums_over
from distill.models.loading import count_parameters
from distill.training.rollout import Sampling, rollout

MAX_LOGITS = 1 << 25  # per model and teacher-forced batch: 128 MiB of fp32 logits
SAMPLES = 5


def forced_batches(examples: list[Example], batch_size: int, vocab: int, max_logits: int = MAX_LOGITS) -> list[list[int]]:
    """Example indices in batches, longest first: at most `batch_size` rows and about
    `max_logits` logits (rows x longest x vocab) per batch (one row at least)."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    batches: list[list[int]] = []
    for i in order:
        if batches:
            last = batches[-1]
            width = len(examples[last[0]].input_ids)  # the longest of the batch: its first
            if len(last) < batch_size and (len(last) + 1) * width * vocab <= max_logits:
                last.append(i)
                continue
        batches.append([i])
    return batches


def forced_text_sums(model, examples: list[Example], pad_id: int, batch_size: int, vocab: int, teacher=None) -> dict:
    """`metrics.forced_sums` over every held-out row (each alone, right-padded, batched by
    length: `forced_batches`), plus `tokens`, the input tokens each model read."""
    return forced_sums_over(model, examples, forced_batches(examples, batch_size, vocab), pad_id, vocab, teacher)


def continuation_prompts(examples: list[Example], eos: int, n: int, prompt_tokens: int) -> list[list[int]]:
    """The prompts of the generation drift: for each of the first `n` rows, its first
    min(prompt_tokens, half of its text) tokens (one at least; EOS is not text)."""
    out = []
    for e in examples[:n]:
        text = e.input_ids[:-1] if e.input_ids[-1] == eos else e.input_ids
        out.append(text[: max(1, min(prompt_tokens, len(text) // 2))])
    return out


@torch.no_grad()
def greedy_continuations(model, prompts: list[list[int]], max_new_tokens: int, eos: int, pad: int, batch_size: int):
    """Greedy continuations (`distill.training.rollout`, KV cache): (completions, ended)."""
    model.eval()
    completions: list[list[int]] = []
    ended: list[bool] = []
    for i in range(0, len(prompts), batch_size):
        done = rollout(model, prompts[i : i + batch_size], Sampling(max_new_tokens, temperature=0.0), eos, pad)
        completions += done.completions
        ended += done.ended
    return completions, ended


def length_drift(student: list[int], s_ended: list[bool], teacher: list[int], t_ended: list[bool]) -> dict:
    """Continuation lengths: `metrics.length_stats`, the mean paired difference and its mean
    absolute value (student minus teacher, per prompt) and both EOS rates; the student's
    mean, p90 and EOS rate alone when there is no teacher (`teacher` empty)."""
    if not teacher:
        mean, p90 = sum(student) / len(student), metrics.quantile(student, 0.9)
        return {"student_mean": mean, "student_p90": p90, "student_eos_rate": sum(s_ended) / len(s_ended)}
    return {
        **metrics.length_stats(student, teacher),
        **metrics.paired_length_difference(student, teacher),
        "student_eos_rate": sum(s_ended) / len(s_ended),
        "teacher_eos_rate": sum(t_ended) / len(t_ended),
    }


def _teacher_forced(text: dict, forced: dict, has_teacher: bool) -> None:
    """The teacher-forced entries of the `text` block, from the summed scores."""
    count = max(forced.get("count", 0.0), 1.0)
    text["tokens"] = forced.get("count", 0.0)
    text["heldout_ce"] = forced["student_ce"] / count
    text["perplexity"] = metrics.perplexity(text["heldout_ce"])
    if has_teacher:
        t_ce = forced["teacher_ce"] / count
        text["teacher"] = {"heldout_ce": t_ce, "perplexity": metrics.perplexity(t_ce)}
        text["agreement_top1"] = forced["agreement"] / count
        text["divergences"] = {name: forced[name] / count for name in metrics.EVAL_DIVERGENCES}


def _samples(tokenizer, prompts: list[list[int]], student: list[list[int]], teacher: list[list[int]]) -> list[dict]:
    """The first SAMPLES prompts with both continuations, as text."""

    def text(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    return [
        {"prompt": text(p), "generated": text(s), **({"teacher": text(teacher[i])} if teacher else {})}
        for i, (p, s) in enumerate(zip(prompts[:SAMPLES], student))
    ]


def _usage(model, scored: float, prompts: list[list[int]], generated: list[list[int]]) -> dict:
    """One model's evaluation compute: tokens read (scored rows, prompts, its generations)
    and 2 x parameters FLOPs per token."""
    made = sum(len(c) for c in generated)
    tokens = scored + sum(len(p) for p in prompts) + made
    return {"tokens": tokens, "scored_tokens": scored, "generated_tokens": made, "flops": 2.0 * count_parameters(model) * tokens}


def evaluate_text(
    model,
    tokenizer,
    rows: list[Row],
    settings: EvalConfig,
    max_length: int,
    truncate: bool = False,
    teacher=None,
    vocab: int | None = None,
) -> tuple[dict, dict]:
    """Evaluate a student (and compare it with its teacher) on held-out text rows.

    Returns:
        (result, usage): result is eval.json's tree, {"n", "text", "samples", "wall_s"};
        usage the compute spent (tokens, scored_tokens, generated_tokens, flops, seconds).
    """
    t0 = time.perf_counter()
    model.eval()
    vocab = vocab or len(tokenizer)
    eos, pad, bs, cap = tokenizer.eos_token_id, tokenizer.pad_token_id, settings.batch_size, settings.max_new_tokens
    examples = tokenize_rows(rows, tokenizer, max_length, source="held-out text", truncate=truncate)
    forced = forced_text_sums(model, examples, pad, bs, vocab, teacher)
    text: dict = {"rows": len(rows)}
    _teacher_forced(text, forced, teacher is not None)
    prompts = continuation_prompts(examples, eos, settings.text_generations, settings.text_prompt_tokens)
    s_gen, s_end = greedy_continuations(model, prompts, cap, eos, pad, bs)
    t_gen, t_end = greedy_continuations(teacher, prompts, cap, eos, pad, bs) if teacher is not None else ([], [])
    if prompts:
        text["length"] = length_drift([len(c) for c in s_gen], s_end, [len(c) for c in t_gen], t_end)
        text["length"].update(prompts=len(prompts), max_new_tokens=cap)
    usage = _usage(model, forced["tokens"], prompts, s_gen)
    if teacher is not None:
        for k, v in _usage(teacher, forced["tokens"], prompts, t_gen).items():
            usage[k] += v
    result = {"n": len(rows), "text": text, "samples": _samples(tokenizer, prompts, s_gen, t_gen)}
    result["wall_s"] = usage["seconds"] = time.perf_counter() - t0
    return result, usage
