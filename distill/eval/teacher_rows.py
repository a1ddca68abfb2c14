"""The rows `distill teachers` scores candidates on, and how each candidate reads them.

A `Sample` is one row of the run's data in a tokenizer-free form: what the model reads first
(a prompt, a conversation, or nothing for a {"text"} row), the target it is scored on (the
completion, the text, or the last assistant turn), the gold answer where there is one, and
the prompt it is asked to continue greedily. Each candidate then encodes every sample with
its own tokenizer (`encode`), so candidates with different vocabularies score the same text.

Chat rows, {"messages": [{"role", "content"}, ...]}, are read here (`chat_samples`) and
rendered with each candidate's own chat template (`chat_parts`); the scored target is the
last assistant turn, the conversation before it is the context. Messages are checked by
`data.chat.parse_messages`, as training's chat rows are; the rendering here differs from
training's (`data.chat.chat_example`) because it scores only the last turn, as text, with
each candidate's template, including candidates without one (plain role lines).
"""

from collections.abc import Sequence
from dataclasses import dataclass

from distill.config import RunConfig
from distill.data.build import build_rows
from distill.data.chat import ROLES, parse_messages
from distill.data.rows import Example, Row, is_text
from distill.errors import DistillError
from distill.loss.token_losses import IGNORE_INDEX
from distill.paths import jsonl_objects

PLAIN_STOPS = tuple(f"\n{r}:" for r in ROLES)  # where an answer in plain role lines ends
TEXT_PROMPT_WORDS = 24  # a {"text"} row's first words (at most half of them) are the prompt continued greedily


@dataclass(frozen=True)
class Sample:
    """One row to score. Exactly one of: a prompt/completion row (`prompt`), a text row
    (empty prompt, no messages), a chat row (`messages`: the conversation before the scored
    assistant turn)."""

    prompt: str
    target: str  # the scored text: completion, whole text, or the last assistant turn's content
    answer: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # ((role, content), ...)
    gen_prompt: str | None = None  # text rows: the words continued greedily

    @property
    def kind(self) -> str:
        return "chat" if self.messages is not None else "text" if not self.prompt else "prompt"


@dataclass(frozen=True)
class Encoded:
    """One sample in one candidate's tokens: the scored example (labels on the target only),
    the generation prompt and the target's UTF-8 bytes."""

    example: Example
    gen_prompt: list[int]
    target_bytes: int


def _check_messages(messages, where: str) -> tuple[tuple[str, str], ...]:
    """((role, content), ...) of a chat row (`data.chat.parse_messages`), here also [system],
    then user/assistant alternating from a user turn, ending with the assistant turn that is
    scored; anything else names the row."""
    out = parse_messages(messages, where, need_assistant=False)  # each message's role and content
    turns = out[1:] if out[0][0] == "system" else out
    expected = ["user" if k % 2 == 0 else "assistant" for k in range(len(turns))]
    if [r for r, _ in turns] != expected or not turns or turns[-1][0] != "assistant":
        got = ", ".join(r for r, _ in out)
        raise DistillError(
            f"{where}: roles {got} do not fit a chat template; expected [system,] user, assistant, user, ..., assistant "
            f"(the last assistant turn is scored)"
        )
    if not out[-1][1]:
        raise DistillError(f"{where}: the last assistant turn is empty: nothing to score")
    return tuple(out)


def chat_samples(path: str, n: int) -> list[Sample] | None:
    """The first n chat rows of a JSONL file; None when its first row is not a chat row (the
    file is read by the ordinary row reader then). A later row that is not a chat row names it."""
    out: list[Sample] = []
    for where, obj in jsonl_objects(path, "dataset file"):
        if "messages" not in obj:
            if not out:
                return None
            raise DistillError(f"{where}: a chat file's rows each need 'messages'")
        msgs = _check_messages(obj["messages"], where)
        answer = obj.get("answer")
        out.append(Sample("", msgs[-1][1], None if answer is None else str(answer), msgs[:-1]))
        if len(out) == n:
            break
    return out or None


def text_prompt(text: str, words: int = TEXT_PROMPT_WORDS) -> str:
    """The first min(words, half of the text's words) words (one at least) of a text row."""
    parts = text.split()
    return " ".join(parts[: max(1, min(words, len(parts) // 2))])


def _from_rows(rows: Sequence[Row]) -> list[Sample]:
    text = is_text(list(rows))
    return [
        Sample("", r.completion, r.answer, gen_prompt=text_prompt(r.completion)) if text
        else Sample(r.prompt, r.completion, r.answer)
        for r in rows
    ]  # fmt: skip


def read_samples(cfg: RunConfig, n: int) -> tuple[list[Sample], str]:
    """The first n rows of the run's held-out split (data.eval_source, the built-in task's test
    split, or the held-out share of {"text"} rows), or of its training rows when it has no
    held-out split; returns (samples, where they came from)."""
    d = cfg.data
    chat_file = d.eval_source if d.eval_source is not None else d.source
    if not chat_file.startswith("builtin:"):
        chat = chat_samples(chat_file, n)
        if chat is not None:
            return chat, f"{chat_file} ({'held-out' if d.eval_source else 'training'} rows, chat)"
    rows, split = build_rows(d, "test"), "held-out"
    if not rows:
        rows, split = build_rows(d, "train"), "training"
    if not rows:
        raise DistillError(f"{d.source}: no rows to score")
    where = d.eval_source if split == "held-out" and d.eval_source else d.source
    return _from_rows(rows[:n]), f"{where} ({split} rows)"


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_parts(tokenizer, sample: Sample, who: str, row: int) -> tuple[str, str, str]:
    """(context, turn, end): the conversation rendered by the candidate's own chat template up
    to the scored turn's generation prompt; the scored turn as the template writes it (its
    content then the template's end-of-turn text); that end-of-turn text alone. A tokenizer
    without a chat template gets plain 'role: content' lines."""
    messages = [{"role": r, "content": c} for r, c in sample.messages]
    turn = {"role": "assistant", "content": sample.target}
    if not has_template(tokenizer):
        context = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return context, sample.target + "\n", "\n"  # answers stop at a next role line: PLAIN_STOPS
    try:
        context = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template([*messages, turn], tokenize=False)
    except Exception as e:  # noqa: BLE001 (jinja's TemplateError, or the template's raise_exception)
        text = str(e).strip().splitlines()
        raise DistillError(f"{who}: row {row}: its chat template refuses the conversation ({text[0] if text else type(e).__name__})") from None
    if not isinstance(context, str) or not isinstance(full, str) or not full.startswith(context):
        raise DistillError(f"{who}: row {row}: its chat template does not render the answer after the generation prompt")
    scored = full[len(context) :]
    at = scored.find(sample.target)
    if at < 0:
        raise DistillError(f"{who}: row {row}: its chat template changes the assistant's text; it cannot be scored")
    return context, scored, scored[at + len(sample.target) :]


def _lead_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before any text by default (Gemma's BOS; none for
    most), read off its encoding of one letter."""
    full = tokenizer("a").input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    return list(full[: full.index(plain[0])]) if plain and plain[0] in full else []


def _start_ids(tokenizer, text: str) -> list[int]:
    """`text` after the tokenizer's leading special tokens (`_lead_ids`); with neither, the
    BOS (the EOS where there is none), so that the first target token is scored too."""
    ids = _lead_ids(tokenizer) + (tokenizer(text, add_special_tokens=False).input_ids if text else [])
    if not ids:
        ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    return ids


def stop_ids(tokenizer, model_eos, samples: Sequence[Sample], who: str) -> list[int]:
    """Token ids that end a generation: the tokenizer's and the model's EOS, and for chat rows
    the first token of the template's end-of-turn text."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    ids |= set(model_eos if isinstance(model_eos, (list, tuple)) else [model_eos] if model_eos is not None else [])
    chats = [s for s in samples if s.kind == "chat"]
    if chats and has_template(tokenizer):
        end = chat_parts(tokenizer, chats[0], who, 1)[2].strip()
        end_ids = tokenizer(end, add_special_tokens=False).input_ids if end else []
        ids |= set(end_ids[:1])
    if not ids:
        raise DistillError(f"{who}: the tokenizer has no eos_token: generations could never end")
    return sorted(ids)


def stop_strings(tokenizer, samples: Sequence[Sample]) -> list[str]:
    """Text that ends an answer: a next role line, for chat rows read as plain role lines."""
    plain = any(s.kind == "chat" for s in samples) and not has_template(tokenizer)
    return list(PLAIN_STOPS) if plain else []


def encode(tokenizer, s: Sample, who: str, row: int, max_length: int, truncate: bool) -> Encoded:
    """One sample in the candidate's tokens. The labels fall on the target only: the
    completion then EOS; the assistant turn as the chat template writes it (its end-of-turn
    included; the context starts with the tokenizer's own leading tokens, as a default
    encoding would); the text then EOS, after the special tokens the tokenizer puts first by default
    (Gemma's BOS), or for a tokenizer that puts none (SmolLM2), after the text's first token,
    which is then context, its bytes not counted. A row over `max_length` tokens names the
    candidate and the row, or with `truncate` is cut (its bytes then those of the kept text)."""
    eos, lead = tokenizer.eos_token_id, []
    if s.kind == "chat":
        context, scored, _ = chat_parts(tokenizer, s, who, row)
        prompt = tokenizer(context, add_special_tokens=False).input_ids
        lead = _lead_ids(tokenizer)  # Gemma's BOS, unless its template already wrote it
        prompt = prompt if prompt[: len(lead)] == lead else lead + prompt
        target = tokenizer(scored, add_special_tokens=False).input_ids
        gen = prompt
    elif s.kind == "prompt":
        prompt = _start_ids(tokenizer, s.prompt)
        target = tokenizer(s.target, add_special_tokens=False).input_ids + [eos]
        gen = prompt
    else:  # a text row: after the tokenizer's own leading tokens (Gemma's BOS), else after its first token
        body = tokenizer(s.target, add_special_tokens=False).input_ids + [eos]
        lead = _lead_ids(tokenizer)
        prompt, target = (lead, body) if lead else (body[:1], body[1:])
        gen = _start_ids(tokenizer, s.gen_prompt or "")
    ids, labels = prompt + target, [IGNORE_INDEX] * len(prompt) + target
    n_bytes = len(s.target.encode("utf-8"))
    if s.kind == "text" and not lead:  # the first token is context only: its bytes are not predicted
        n_bytes -= len(tokenizer.decode(prompt).encode("utf-8"))
    if len(ids) > max_length:
        if not truncate or len(prompt) >= max_length:
            raise DistillError(
                f"{who}: row {row} is {len(ids)} tokens in its tokenizer, over data.max_length={max_length} "
                f"(raise it, or data.truncate=true cuts such rows)"
            )
        ids, labels = ids[:max_length], labels[:max_length]
        kept = labels[len(prompt) :]
        n_bytes = len(tokenizer.decode(kept, skip_special_tokens=True).encode("utf-8"))
    return Encoded(Example(ids, labels), gen, n_bytes)


def server_messages(s: Sample) -> list[dict]:
    """What a chat server is sent for a sample: the conversation, or the prompt (a text row's
    first words) as one user turn."""
    if s.kind == "chat":
        return [{"role": r, "content": c} for r, c in s.messages]
    return [{"role": "user", "content": s.prompt if s.kind == "prompt" else s.gen_prompt or ""}]
