"""Held-out evaluation: greedy generations, exact-match accuracy, held-out loss, and the
comparison with a teacher (agreement, divergences, length drift), calibration, refusals and
format adherence. The metric math lives in `distill.eval.metrics`."""

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from distill import rundir, seeds
from distill.config import EvalConfig
from distill.data.rows import Example, Row, collate, prompt_text, tokenize_rows
from distill.eval import metrics
from distill.eval.answers import grade, splitter
from distill.models.loading import count_parameters, load_causal_lm, load_tokenizer
from distill.training.rollout import Sampling, rollout


@dataclass(frozen=True)
class Generation:
    """One greedy completion: its text (special tokens dropped), its token ids up to and
    including EOS, the model's log-probability of each of those tokens, and the prompt length."""

    text: str
    ids: list[int]
    logprobs: list[float]
    prompt_tokens: int


class _ChosenLogprob(LogitsProcessor):
    """Records, per decoding step, log p of the greedy (argmax) token; changes nothing."""

    def __init__(self):
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # scores (B, V) fp32: max - logsumexp = log softmax of the token greedy decoding picks
        self.steps.append((scores.max(-1).values - scores.logsumexp(-1)).cpu())  # (B,)
        return scores


@torch.no_grad()
def generate_greedy_ids(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[Generation]:
    """Greedy completions (KV cache, left padding) with their tokens and log-probabilities.

    The log-probabilities are the model's own at each decoding step, which is the model's
    distribution teacher-forced on its generation, read without a second forward pass."""
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right: pad the left
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    out = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            record = _ChosenLogprob()
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos,
                logits_processor=LogitsProcessorList([record]),
            )
            new = gen[:, enc["input_ids"].shape[1] :].tolist()  # (B, steps), padded after EOS
            step_lp = torch.stack(record.steps, 1).tolist() if record.steps else [[] for _ in new]  # (B, steps)
            for row, ids in enumerate(new):
                n = ids.index(eos) + 1 if eos in ids else len(ids)
                text = tokenizer.decode(ids[:n], skip_special_tokens=True)
                out.append(Generation(text, ids[:n], step_lp[row][:n], int(enc["attention_mask"][row].sum())))
    finally:
        tokenizer.padding_side = side
    return out


def generate_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions (KV cache, left padding), decoded without special tokens."""
    return [g.text for g in generate_greedy_ids(model, tokenizer, prompts, max_new_tokens, batch_size)]


@torch.no_grad()
def generate_sampled(model, tokenizer, prompts: list[str], sampling: Sampling, seed: int, batch_size: int) -> list[str]:
    """Sampled completions (`distill.training.rollout`, KV cache), prompt i drawn with seed (seed, i):
    reproducible, and independent of the batch size."""
    model.eval()
    ids = tokenizer(prompts, add_special_tokens=False).input_ids
    out = []
    for i in range(0, len(ids), batch_size):
        chunk = ids[i : i + batch_size]
        row_seeds = [seeds.eval_sample(seed, i + j) for j in range(len(chunk))]
        done = rollout(model, chunk, sampling, tokenizer.eos_token_id, tokenizer.pad_token_id, row_seeds)
        out += tokenizer.batch_decode(done.completions, skip_special_tokens=True)
    return out


@torch.no_grad()
def forced_scores(
    model,
    tokenizer,
    rows: list[Row],
    batch_size: int,
    max_length: int,
    teacher=None,
    vocab: int | None = None,
    truncate: bool = False,
) -> dict[str, float]:
    """One teacher-forced forward per batch of held-out rows (and of the teacher on the same
    batch): the sums of `metrics.forced_sums` over all rows, plus `tokens`, the input tokens
    each model read. vocab: the real (shared) vocabulary logits are sliced to; truncate:
    data.truncate (cut over-long rows instead of refusing them)."""
    model.eval()
    vocab = vocab or len(tokenizer)
    examples = tokenize_rows(rows, tokenizer, max_length, source="eval", truncate=truncate)
    batches = [range(i, min(i + batch_size, len(examples))) for i in range(0, len(examples), batch_size)]
    return forced_sums_over(model, examples, batches, tokenizer.pad_token_id, vocab, teacher)


@torch.no_grad()
def forced_sums_over(model, examples: Sequence[Example], batches, pad_id: int, vocab: int, teacher=None) -> dict[str, float]:
    """`metrics.forced_sums` summed over batches of examples (each batch: indices into
    `examples`, right-padded together), the teacher on the same batch, plus `tokens`, the
    input tokens each model read."""
    device = next(model.parameters()).device
    sums: dict[str, float] = {"tokens": 0.0}
    for chosen in batches:
        b = {k: v.to(device) for k, v in collate([examples[i] for i in chosen], pad_id).items()}
        inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        logits = model(**inputs).logits[..., :vocab]  # (B, T, V)
        t_logits = teacher(**inputs).logits[..., :vocab] if teacher is not None else None  # (B, T, V)
        for k, v in metrics.forced_sums(logits, b["labels"], t_logits).items():
            sums[k] = sums.get(k, 0.0) + v
        sums["tokens"] += float(b["attention_mask"].sum())
    return sums


def heldout_loss(model, tokenizer, rows: list[Row], batch_size: int, max_length: int) -> float:
    """Mean next-token cross-entropy (nats) over the completion tokens of held-out rows."""
    sums = forced_scores(model, tokenizer, rows, batch_size, max_length)
    return sums.get("student_ce", 0.0) / max(sums.get("count", 0.0), 1.0)


class _PrefixEnds(Sequence):
    """ends[k] = length of the text decoded from ids[: k + 1], decoded on demand (bisect
    asks for O(log n) of them)."""

    def __init__(self, tokenizer, ids: list[int]):
        self.tokenizer, self.ids = tokenizer, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, k):
        return len(self.tokenizer.decode(self.ids[: k + 1], skip_special_tokens=True))


def answer_confidence(gen: Generation, tokenizer, split=None) -> float:
    """The model's confidence in the answer it generated: the product of the probabilities
    of the answer's tokens (`Generation.logprobs`, the model's own at each greedy step).

    split: the answer format's splitter (`distill.eval.answers.splitter`); the answer's tokens are
    those that spell it where the splitter found it, right after the rationale (for the
    built-in chain task, the one token after the last '#'). split None (the label task: the whole output is the answer),
    or a generation with no answer found: the answer is the whole generation, so the
    confidence is the product over every generated token but a final EOS (over the EOS
    alone when nothing else was generated). Such a generation grades wrong, so a model that
    commits confidently to output without an answer counts as over-confident, and one that
    rambles lands in the lowest bin.
    """
    eos = tokenizer.eos_token_id
    body = len(gen.ids) - (1 if gen.ids and gen.ids[-1] == eos else 0)
    lo, hi = (0, body) if body > 0 else (0, len(gen.ids))
    found = split(gen.text) if split is not None else None
    start = -1
    if found is not None:  # the answer where the splitter found it: the first after the rationale
        after = gen.text.find(found[0]) + len(found[0]) if found[0] else 0
        start = gen.text.find(found[1], after)
    if start >= 0:
        lo, hi = metrics.token_span(_PrefixEnds(tokenizer, gen.ids), start, start + len(found[1]))
    return metrics.span_confidence(gen.logprobs, lo, hi)


def _accuracy(rows: list[Row], gens: list[Generation], fmt: str, direct: bool) -> tuple[list[bool], float | None]:
    correct = [grade(g.text, r.answer, fmt, direct) for r, g in zip(rows, gens) if r.answer is not None]
    return correct, sum(correct) / len(correct) if correct else None


def _tokens_read(forced: dict, gens: list[Generation]) -> float:
    """Tokens a model read: teacher-forced inputs, prompts and generated tokens."""
    return forced["tokens"] + sum(g.prompt_tokens + len(g.ids) for g in gens)


def evaluate_rows(
    model,
    tokenizer,
    rows: list[Row],
    settings: EvalConfig,
    max_length: int,
    answer_format: str = "chain",
    direct: bool = False,
    format_regex: str | None = None,
    teacher=None,
    teacher_tokenizer=None,
    vocab: int | None = None,
    truncate: bool = False,
) -> tuple[dict, dict]:
    """Evaluate a student (and compare it with its teacher) on held-out rows.

    Args:
        settings: the run's eval section (generation length, batch size, calibration bins,
            refusal patterns, JSON schema).
        answer_format: where the answer is in a generation (`distill.eval.answers`).
        direct: the whole generation is the answer (the label task of step-by-step training).
        format_regex: the regex of format adherence (the caller's default for the task).
        teacher, teacher_tokenizer: a teacher model sharing the student's vocabulary, or None.
        vocab: the shared real vocabulary size logits are sliced to.
        truncate: cut held-out rows over max_length (data.truncate) instead of refusing them.

    Returns:
        (result, usage): result is eval.json's tree (n, accuracy, heldout_ce, perplexity,
        samples, calibration, refusal_rate, format_adherence, wall_s; with a teacher also
        agreement_top1, divergences, teacher, length); usage is the compute spent: tokens,
        scored_tokens, generated_tokens, flops.
    """
    t0 = time.perf_counter()
    bs, prompts = settings.batch_size, [prompt_text(r, tokenizer, f"eval: row {i + 1}") for i, r in enumerate(rows)]
    forced = forced_scores(model, tokenizer, rows, bs, max_length, teacher, vocab, truncate)
    count = max(forced["count"], 1.0)
    ce = forced["student_ce"] / count
    gens = generate_greedy_ids(model, tokenizer, prompts, settings.max_new_tokens, bs)
    texts = [g.text for g in gens]
    correct, accuracy = _accuracy(rows, gens, answer_format, direct)
    split = None if direct else splitter(answer_format)
    confidences = [answer_confidence(g, tokenizer, split) for r, g in zip(rows, gens) if r.answer is not None]
    result: dict = {
        "n": len(rows),
        "accuracy": accuracy,
        "heldout_ce": ce,
        "perplexity": metrics.perplexity(ce),
        "samples": [{"prompt": r.prompt, "generated": g.text, "answer": r.answer} for r, g in zip(rows, gens)][:5],
        "calibration": metrics.ece_bins(confidences, correct, settings.calibration_bins),
        "refusal_rate": metrics.refusal_rate(texts, settings.refusal_patterns),
        "format_adherence": metrics.format_adherence(texts, format_regex, settings.format_json_schema),
    }
    s_tokens = _tokens_read(forced, gens)
    usage = {"tokens": s_tokens, "scored_tokens": forced["tokens"], "generated_tokens": sum(len(g.ids) for g in gens)}
    usage["flops"] = 2.0 * count_parameters(model) * s_tokens
    if teacher is not None:
        t_gens = generate_greedy_ids(teacher, teacher_tokenizer or tokenizer, prompts, settings.max_new_tokens, bs)
        t_ce = forced["teacher_ce"] / count
        result["agreement_top1"] = forced["agreement"] / count
        result["divergences"] = {name: forced[name] / count for name in metrics.EVAL_DIVERGENCES}
        result["teacher"] = {
            "accuracy": _accuracy(rows, t_gens, answer_format, direct)[1],
            "heldout_ce": t_ce,
            "perplexity": metrics.perplexity(t_ce),
        }
        result["length"] = metrics.length_stats([len(g.ids) for g in gens], [len(g.ids) for g in t_gens])
        t_tokens = _tokens_read(forced, t_gens)
        usage["tokens"] += t_tokens
        usage["scored_tokens"] += forced["tokens"]
        usage["generated_tokens"] += sum(len(g.ids) for g in t_gens)
        usage["flops"] += 2.0 * count_parameters(teacher) * t_tokens
    result["wall_s"] = usage["seconds"] = time.perf_counter() - t0
    return result, usage


def load_student(run_or_model_dir: str | Path):
    """A run directory's exported student, or a save_pretrained folder, with its tokenizer."""
    path = Path(run_or_model_dir)
    folder = path / rundir.STUDENT if (path / rundir.STUDENT / "config.json").exists() else path
    return load_causal_lm(name=str(folder)), load_tokenizer(str(folder))
