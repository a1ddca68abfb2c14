"""How one candidate teacher does on the run's rows, and how candidates agree.

    score_local       a transformers model: teacher-forced cross-entropy on the targets (its
                      own tokens), bits per byte, greedy answers, forward and generation speed
    answer_stats      accuracy, refusal rate and mean length of a candidate's answers
    agreement_matrix  the share of rows on which two candidates give the same answer (the final
                      answer on rows with a gold answer, the first words on the others)

Cross-entropy is per token of each candidate's own tokenization, so it compares candidates
of one tokenizer only; bits per byte divides the same summed nats by the UTF-8 bytes of the
targets' text, which every candidate scores whole, so it compares candidates of any
tokenizers.
"""

import math
import time
from collections.abc import Sequence

import torch
from transformers import GenerationConfig

from distill.eval import metrics
from distill.eval.answers import grade, normalize, splitter
from distill.eval.teacher_rows import Sample, encode, stop_ids, stop_strings
from distill.eval.text import forced_text_sums
from distill.training.rollout import left_pad

LN2 = math.log(2.0)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def greedy_ids(model, tokenizer, prompts: list[list[int]], stops: list[int], strings: list[str], max_new_tokens: int,
               batch_size: int) -> list[list[int]]:  # fmt: skip
    """Greedy completions (KV cache, left padding, prompts of similar length batched together),
    each up to and including its first stop token or the token that completes one of the stop
    `strings`, or `max_new_tokens` long."""
    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=pad,
                              stop_strings=strings or None)  # fmt: skip
    extra = {"tokenizer": tokenizer} if strings else {}
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    out: list[list[int]] = [[] for _ in prompts]
    for k in range(0, len(order), batch_size):
        chunk = order[k : k + batch_size]
        ids, mask = left_pad([prompts[i] for i in chunk], pad, device)  # (B, P) each
        new = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, **extra)[:, ids.shape[1] :]  # (B, N)
        for row, i in zip(new.tolist(), chunk):
            out[i] = row[: _end(tokenizer, row, stops, strings)]
    return out


def _end(tokenizer, row: list[int], stops: list[int], strings: list[str]) -> int:
    """Length of a generated row up to and including what stopped it (the rest is padding)."""
    end = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
    if strings:
        done = next((j + 1 for j in range(end) if any(s in tokenizer.decode(row[: j + 1]) for s in strings)), end)
        end = min(end, done)
    return end


def answer_text(tokenizer, ids: list[int], stops: list[int], strings: list[str] = ()) -> str:
    """A completion's text: its stop token, a stop string and what follows it, and every
    special token left out."""
    body = ids[:-1] if ids and ids[-1] in stops else ids
    text = tokenizer.decode(body, skip_special_tokens=True)
    for s in strings:
        text = text.split(s, 1)[0]
    return text.strip()


def score_local(model, tokenizer, samples: Sequence[Sample], who: str, max_length: int, truncate: bool,
                max_new_tokens: int, batch_size: int) -> tuple[dict, list[str]]:  # fmt: skip
    """One local candidate on the samples: (record, greedy answers).

    record: heldout_ce (nats per target token of its own tokenization), perplexity,
    bits_per_byte (the summed nats / ln 2 / the targets' UTF-8 bytes), scored_tokens,
    target_bytes, generated_tokens, mean_tokens (per answer, the stop token included),
    forward_tokens_per_s (input tokens read by the teacher-forced passes per second),
    generate_tokens_per_s (tokens generated per second of greedy decoding)."""
    model.eval()
    encoded = [encode(tokenizer, s, who, i + 1, max_length, truncate) for i, s in enumerate(samples)]
    vocab = len(tokenizer)
    t0 = time.perf_counter()
    sums = forced_text_sums(model, [e.example for e in encoded], _pad_id(tokenizer), batch_size, vocab)
    forward_s = time.perf_counter() - t0
    stops = stop_ids(tokenizer, getattr(model.generation_config, "eos_token_id", None), samples, who)
    strings = stop_strings(tokenizer, samples)
    t0 = time.perf_counter()
    gens = greedy_ids(model, tokenizer, [e.gen_prompt for e in encoded], stops, strings, max_new_tokens, batch_size)
    generate_s = time.perf_counter() - t0
    nats, count = sums.get("student_ce", 0.0), sums.get("count", 0.0)
    n_bytes = sum(e.target_bytes for e in encoded)
    made = sum(len(g) for g in gens)
    ce = nats / count if count else math.nan
    record = {
        "heldout_ce": ce,
        "perplexity": metrics.perplexity(ce),
        "bits_per_byte": nats / LN2 / n_bytes if n_bytes else None,
        "scored_tokens": int(count),
        "target_bytes": n_bytes,
        "generated_tokens": made,
        "mean_tokens": made / len(gens) if gens else None,
        "forward_tokens_per_s": sums["tokens"] / forward_s if forward_s > 0 else None,
        "generate_tokens_per_s": made / generate_s if generate_s > 0 else None,
        "forward_s": forward_s,
        "generate_s": generate_s,
    }
    return record, [answer_text(tokenizer, g, stops, strings) for g in gens]


def answer_stats(samples: Sequence[Sample], texts: Sequence[str], fmt: str, refusal_patterns: Sequence[str]) -> dict:
    """accuracy (over the rows with a gold answer; None without any), answered (those rows),
    refusal_rate (`metrics.refusal_rate`) and mean_words (whitespace-separated words per answer)."""
    graded = [grade(t, s.answer, fmt) for s, t in zip(samples, texts) if s.answer is not None]
    return {
        "accuracy": sum(graded) / len(graded) if graded else None,
        "answered": len(graded),
        "refusal_rate": metrics.refusal_rate(list(texts), list(refusal_patterns)),
        "mean_words": sum(len(t.split()) for t in texts) / len(texts) if texts else None,
    }


def first_words(text: str, n: int) -> list[str]:
    """The first n whitespace-separated words, lower-cased."""
    return [w.lower() for w in text.split()[:n]]


def agreement_key(text: str, gold: str | None, n: int, fmt: str):
    """What two answers to a row must share to agree: on a row with a gold answer, the final
    answer (normalised; None when the format finds none), else the first n words."""
    if gold is not None:
        found = splitter(fmt)(text)
        return None if found is None else normalize(found[1])
    return first_words(text, n)


def agreement_matrix(texts: Sequence[Sequence[str]], golds: Sequence[str | None], n: int, fmt: str) -> list[list[float | None]]:
    """m[a][b]: the share of rows on which candidates a and b agree. On a row with a gold
    answer both must find a final answer and the answers be equal after `normalize` (neither
    finding one is no agreement); on a row without, both answers must begin with the same n
    words (lower-cased; a shorter answer must match whole). The diagonal is 1; None for no rows."""
    keys = [[agreement_key(t, g, n, fmt) for t, g in zip(rows, golds)] for rows in texts]
    out = []
    for a in keys:
        line = []
        for b in keys:
            same = [x is not None and x == y for x, y in zip(a, b)]
            line.append(sum(same) / len(same) if same else None)
        out.append(line)
    for i in range(len(out)):
        out[i][i] = 1.0 if keys[i] else None
    return out
