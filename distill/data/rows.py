"""Datasets as (prompt, completion) rows, tokenized with the prompt masked out of the loss.

Sources: the built-in task (`builtin:chain`) or a JSONL file of {"prompt", "completion"}
rows ({"text"} alone is a completion with an empty prompt) or {"messages"} chat rows
(`distill.data.chat`: the model's chat template, the loss on the assistant turns). A JSONL
file of text rows with no held-out file is split by a hash of each row's text
(`text_split`). The order of examples is a pure function of (seed, step), so a resumed or
multi-process run sees exactly the batches an uninterrupted single-process run would.
"""

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from distill import seeds
from distill.data import chat
from distill.data.tasks import chain, grammar
from distill.errors import DistillError
from distill.loss.token_losses import IGNORE_INDEX
from distill.paths import jsonl_objects


@dataclass(frozen=True)
class Row:
    prompt: str
    completion: str
    answer: str | None = None  # gold answer, where exact grading is possible
    rationale: str | None = None  # the reasoning before the answer (step-by-step training)
    messages: tuple[chat.Message, ...] | None = None  # a chat row; prompt/completion then hold its plain text


def builtin_rows(split: str, n: int, seed: int, min_ops: int, max_ops: int) -> list[Row]:
    return [
        Row(p.prompt, p.target, p.answer, p.rationale)
        for p in chain.generate_split(split, n, seed=seed, min_ops=min_ops, max_ops=max_ops)
    ]


def read_jsonl(path: str | Path) -> list[Row]:
    """Read prompt/completion, text or chat rows; a bad line is an error naming the file and line."""
    rows = [row_from_object(obj, where) for where, obj in jsonl_objects(path, "dataset file")]
    if not rows:
        raise DistillError(f"{path}: the dataset is empty")
    return rows


def row_from_object(obj: dict, where: str) -> Row:
    """One row from a JSON object (a JSONL line, a Hugging Face dataset row); a bad one is an
    error naming `where` (file:line, or the dataset and row number). A row with "messages" is a
    chat row (its "prompt" and "completion", which `distill generate` writes beside them, are
    then not read)."""
    if "messages" in obj:
        return chat_row(obj, where)
    if "completion" not in obj and "text" not in obj:
        raise DistillError(f"{where}: a row needs 'completion' (with 'prompt'), 'text' or chat 'messages'")
    completion = obj.get("completion", obj.get("text"))
    prompt = obj.get("prompt", "")
    answer, rationale = obj.get("answer"), obj.get("rationale")
    for key, val in (("prompt", prompt), ("completion", completion), ("rationale", rationale or "")):
        if not isinstance(val, str):
            raise DistillError(f"{where}: '{key}' must be a string, got {type(val).__name__}")
    if not completion:
        raise DistillError(f"{where}: empty completion")
    return Row(prompt, completion, None if answer is None else str(answer), rationale)


def chat_row(obj: dict, where: str) -> Row:
    messages = chat.parse_messages(obj["messages"], where)
    answer = obj.get("answer")
    return Row(*chat.plain_parts(messages), None if answer is None else str(answer), messages=messages)


def prompt_text(row: Row, tokenizer, where: str = "data") -> str:
    """The text a model is asked to continue: the row's prompt, or a chat row's conversation
    before its last assistant turn with the template's generation prompt."""
    return row.prompt if row.messages is None else chat.generation_prompt(tokenizer, row.messages, where)


BUILTIN_SOURCES = ("builtin:chain", "builtin:grammar")


def load_rows(source: str, split: str, n: int, seed: int, min_ops: int, max_ops: int) -> list[Row]:
    if source == "builtin:chain":
        return builtin_rows(split, n, seed, min_ops, max_ops)
    if source == "builtin:grammar":
        return [Row(s.prompt, s.completion) for s in grammar.generate_split(split, n, seed)]
    if source.startswith("builtin:"):
        raise DistillError(f"unknown built-in dataset '{source}' (available: {', '.join(BUILTIN_SOURCES)})")
    return read_jsonl(source)


def is_text(rows: list[Row]) -> bool:
    """True for plain-text rows: every row has an empty prompt (a {"text"} row)."""
    return bool(rows) and all(not r.prompt and r.messages is None for r in rows)


HELDOUT_SHARE = 0.05  # of text rows held out for evaluation when there is no data.eval_source


def _text_hash(row: Row) -> float:
    """A row's place in [0, 1), from the sha256 of its text alone (not its position)."""
    return int(hashlib.sha256((row.prompt + row.completion).encode()).hexdigest()[:16], 16) / 2**64


def text_split(rows: list[Row], share: float = HELDOUT_SHARE) -> tuple[list[Row], list[Row]]:
    """(train, held-out): a row is held out when the hash of its text falls below `share`.

    A row's split depends on its text only, so adding rows never moves another row, and
    equal texts share a split. When no row falls below `share` and there are two or more
    rows, the row with the smallest hash is held out (at least one held-out row).
    """
    places = [_text_hash(r) for r in rows]
    held = [p < share for p in places]
    if not any(held) and len(rows) > 1:
        lowest = min(places)
        held = [p == lowest for p in places]
    return [r for r, h in zip(rows, held) if not h], [r for r, h in zip(rows, held) if h]


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens
    position_ids: list[int] | None = None  # packed blocks only: 0 at each document's first token
    messages: tuple | None = None  # a chat row's conversation (a teacher of another tokenizer renders its own)


MAX_CHARS_PER_TOKEN = 64  # no tokenizer averages more over a row: a longer row is surely over max_length


def bounded_rows(rows: list[Row], max_length: int, source: str, truncate: bool) -> list[Row]:
    """Rows whose text is too long for `max_length` tokens at MAX_CHARS_PER_TOKEN characters
    a token, caught by character count before tokenizing: an error naming the row, or with
    `truncate` the text cut to that many characters (tokenizing then cuts it to max_length)."""
    limit = max_length * MAX_CHARS_PER_TOKEN
    out = list(rows)
    for i, r in enumerate(rows):
        chars = len(r.prompt) + len(r.completion) if r.messages is None else sum(len(c) for _, c in r.messages)
        if chars <= limit:
            continue
        if not truncate:
            raise DistillError(
                f"{source}: row {i + 1} has {chars:,} characters, more than data.max_length={max_length} tokens can "
                f"hold (checked before tokenizing; data.truncate=true cuts such rows)"
            )
        if r.messages is not None:
            messages = chat.cut_messages(r.messages, limit)
            out[i] = dataclasses.replace(r, messages=messages, **dict(zip(("prompt", "completion"), chat.plain_parts(messages))))
            continue
        out[i] = dataclasses.replace(r, prompt=r.prompt[:limit], completion=r.completion[: max(limit - len(r.prompt), 1)])
    return out


def _token_pairs(rows: list[Row], tokenizer, eos: int, source: str) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per row: prompt + completion + EOS (the loss on completion and
    EOS), or a chat row as its template renders it (the loss on the assistant turns)."""
    plain = [i for i, r in enumerate(rows) if r.messages is None]
    out: list = [None] * len(rows)
    if plain:
        prompts = tokenizer([rows[i].prompt for i in plain], add_special_tokens=False).input_ids
        completions = tokenizer([rows[i].completion for i in plain], add_special_tokens=False).input_ids
        for i, p, c in zip(plain, prompts, completions):
            out[i] = (p + c + [eos], [IGNORE_INDEX] * len(p) + c + [eos])
    for i, r in enumerate(rows):
        if r.messages is not None:
            out[i] = chat.chat_example(tokenizer, r.messages, f"{source}: row {i + 1}")
    return out


def _first_target(labels: list[int]) -> int:
    """Tokens before the first supervised label (a row's prompt)."""
    return next((t for t, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def tokenize_rows(rows: list[Row], tokenizer, max_length: int, source: str = "data", truncate: bool = False) -> list[Example]:
    """prompt + completion + EOS; the loss falls on completion and EOS only. A chat row: the
    template's rendering, the loss on the assistant turns (`distill.data.chat`).

    A row over `max_length` tokens is an error naming it, or with `truncate` cut to its
    first `max_length` tokens (it then has no EOS); a row whose prompt alone fills
    `max_length` would keep no target and is an error either way.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DistillError("the tokenizer has no eos_token: completions could never end")
    if not rows:
        return []
    rows = bounded_rows(rows, max_length, source, truncate)  # before tokenizing: a 50 MB row never reaches it
    out = []
    for i, (ids, labels) in enumerate(_token_pairs(rows, tokenizer, eos, source)):
        n_prompt = _first_target(labels)  # tokens before the first target: a row's prompt
        if n_prompt == len(labels):
            raise DistillError(f"{source}: row {i + 1}: the chat template renders no assistant token to learn")
        if len(ids) > max_length:
            if not truncate:
                raise DistillError(
                    f"{source}: row {i + 1} is {len(ids)} tokens, over data.max_length={max_length} "
                    f"(data.truncate=true cuts such rows)"
                )
            if max(n_prompt, 1) >= max_length:  # labels[1:] would hold no target
                raise DistillError(
                    f"{source}: row {i + 1} has a {n_prompt}-token prompt; data.max_length={max_length} leaves no target"
                )
            ids, labels = ids[:max_length], labels[:max_length]
        out.append(Example(ids, labels, messages=rows[i].messages))
    return out


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example. Returns input_ids, attention_mask, labels: (B, T),
    and for packed blocks position_ids (B, T): the pad run counts again from 0, a document
    of its own that no real token attends to."""
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    packed = examples[0].position_ids is not None
    if any((e.position_ids is not None) != packed for e in examples):
        raise ValueError("a batch mixes packed blocks and whole rows")
    positions = torch.arange(T).repeat(len(examples), 1) if packed else None  # (B, T)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
        if positions is not None:
            positions[i, :n] = torch.tensor(e.position_ids)
            positions[i, n:] -= n
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return batch | ({"position_ids": positions} if positions is not None else {})


def global_batch_indices(step: int, n_examples: int, global_batch: int, seed: int) -> list[int]:
    """Example indices of optimizer step `step`: a fresh permutation each epoch, by seed.

    Depends only on (step, sizes, seed), never on how many processes or micro-batches
    share the work, so every layout trains on the same examples in the same order.
    """
    out = []
    start = step * global_batch
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), n_examples)
        g = torch.Generator().manual_seed(seeds.epoch_order(seed, epoch))
        perm = torch.randperm(n_examples, generator=g)
        take = min(global_batch - len(out), n_examples - offset)
        out += perm[offset : offset + take].tolist()
    return out


def micro_batches(
    indices: list[int], rank: int, world_size: int, micro_batch_size: int
) -> list[list[int]]:
    """This process's share of a global batch, split into micro-batches.

    Rank r takes micro-batches r, r + world, r + 2 * world, ... so the global order of
    micro-batches is the same as in one process with more accumulation.
    """
    chunks = [indices[i : i + micro_batch_size] for i in range(0, len(indices), micro_batch_size)]
    return chunks[rank::world_size]


def step_micro_batches(
    step: int, n_examples: int, micro_batch_size: int, grad_accum: int, seed: int, rank: int, world_size: int
) -> list[list[int]]:
    """This process's micro-batches of optimizer step `step` (example indices)."""
    indices = global_batch_indices(step, n_examples, micro_batch_size * grad_accum * world_size, seed)
    return micro_batches(indices, rank, world_size, micro_batch_size)
