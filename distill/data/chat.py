"""Chat rows: {"messages": [{"role", "content"}, ...]}, rendered with the model's own chat
template, the loss on the assistant turns only.

A chat row is read (`parse_messages`, no tokenizer needed) into a tuple of (role, content)
pairs: roles are system, user and assistant; a system message comes first if at all; a
training row has at least one assistant turn, and does not open with one. What else a template demands (alternating
roles, a user turn first) is the template's to say: an error it raises names the row.

Rendering (`chat_example`) tokenizes the text `tokenizer.apply_chat_template` writes for the
whole conversation, and finds each assistant turn by rendering prefixes of it:

    start = tokens of render(messages[:a], add_generation_prompt=True)   "...<|im_start|>assistant\\n"
    end   = tokens of render(messages[:a + 1])                           "...content<|im_end|>\\n"

Each prefix must render to a prefix of the whole text and tokenize to a prefix of its ids;
otherwise the row is an error naming it (no guessing at a boundary). The labels are the
ids of [start, end): the assistant's content and the end-of-turn token, which the model
must learn to emit to stop. What the template writes after the last special token of the
turn, when it is only whitespace (ChatML's newline between turns), is not a target: a model
stops at the end-of-turn token and never generates it. Everything else (system prompt,
user turns, role headers, a template's default system prompt) is context, IGNORE_INDEX.

`start` of the last assistant turn is also where the student continues the conversation
on-policy (`training.on_policy.prompt_length`: the start of the last supervised span) and
`generation_prompt` is the text a model answers at evaluation.
"""

import json

from jinja2 import TemplateError

from distill.errors import DistillError
from distill.loss.token_losses import IGNORE_INDEX

ROLES = ("system", "user", "assistant")

Message = tuple[str, str]  # (role, content)


def parse_messages(value, where: str, need_assistant: bool = True) -> tuple[Message, ...]:
    """The (role, content) pairs of a row's "messages"; a bad one is an error naming `where`
    (file:line) and the message."""
    if not isinstance(value, list) or not value:
        raise DistillError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    out = []
    for j, m in enumerate(value, 1):
        if not isinstance(m, dict):
            raise DistillError(f"{where}: message {j} must be an object with 'role' and 'content', got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or role not in ROLES:
            raise DistillError(f"{where}: message {j} has role {json.dumps(role)[:40]}; chat rows take {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DistillError(f"{where}: message {j} ({role}) needs a string 'content', got {type(content).__name__}")
        if role == "system" and j != 1:
            raise DistillError(f"{where}: message {j} is a system message; the system prompt must be the first message")
        out.append((role, content))
    if need_assistant and not any(r == "assistant" for r, _ in out):
        raise DistillError(f"{where}: the conversation has no assistant turn (nothing to learn)")
    if need_assistant and out[0][0] == "assistant":  # its start is the empty conversation's generation prompt
        raise DistillError(f"{where}: message 1 is an assistant turn; open the conversation with a system or user turn")
    return tuple(out)


def as_dicts(messages) -> list[dict]:
    return [{"role": r, "content": c} for r, c in messages]


def last_assistant(messages) -> int:
    """Index of the last assistant message (-1: none)."""
    return max((i for i, (r, _) in enumerate(messages) if r == "assistant"), default=-1)


def plain_parts(messages) -> tuple[str, str]:
    """(prompt, completion) as plain text, for what reads rows without a tokenizer (length
    bounds, display, calibration text): the contents before the last assistant turn, and
    that turn's content."""
    k = last_assistant(messages)
    before = messages[:k] if k >= 0 else messages
    return "\n\n".join(c for _, c in before), messages[k][1] if k >= 0 else ""


def cut_messages(messages, limit: int) -> tuple[Message, ...]:
    """The conversation cut to `limit` characters of content: later messages dropped, the
    one crossing the limit shortened (data.truncate's guard before tokenizing)."""
    out, left = [], limit
    for role, content in messages:
        if left <= 0:
            break
        out.append((role, content[:left]))
        left -= len(content)
    return tuple(out)


def check_template(tokenizer, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DistillError(
            f"{where}: chat rows ({{\"messages\"}}) are rendered with the model's chat template, and this tokenizer has none "
            "(set tokenizer.chat_template, or use a model that ships one)"
        )


def render(tokenizer, messages, generation_prompt: bool, where: str) -> str:
    """The template's text for `messages`; an error the template raises names `where`."""
    try:
        return tokenizer.apply_chat_template(as_dicts(messages), tokenize=False, add_generation_prompt=generation_prompt)
    except (TemplateError, TypeError, ValueError, KeyError, IndexError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DistillError(f"{where}: the chat template refuses this conversation: {first}") from None


def generation_prompt(tokenizer, messages, where: str) -> str:
    """The text a model continues: the conversation before its last assistant turn (the whole
    conversation when it ends with another role), with the template's generation prompt."""
    check_template(tokenizer, where)
    k = last_assistant(messages)
    return render(tokenizer, messages[:k] if k >= 0 else messages, True, where)


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    # The template writes the special tokens it wants (a BOS among them): add none.
    return tokenizer(texts, add_special_tokens=False).input_ids


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False))
    return ids


def _turn_end(tokenizer, ids: list[int], start: int, end: int, special: set[int]) -> int:
    """`end`, less the template's whitespace after the turn's last special token."""
    last = max((i for i in range(start, end) if ids[i] in special), default=None)
    if last is None or last + 1 == end:
        return end
    return last + 1 if not tokenizer.decode(ids[last + 1 : end]).strip() else end


def chat_example(tokenizer, messages, where: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation: labels are the ids of the assistant turns
    (content and end-of-turn token), IGNORE_INDEX elsewhere."""
    check_template(tokenizer, where)
    turns = [a for a, (r, _) in enumerate(messages) if r == "assistant"]
    full = render(tokenizer, messages, False, where)
    prefixes = []
    for a in turns:
        prefixes += [render(tokenizer, messages[:a], True, where), render(tokenizer, messages[: a + 1], False, where)]
    encoded = _encode(tokenizer, [full, *prefixes])
    ids, labels, special = encoded[0], [IGNORE_INDEX] * len(encoded[0]), _special_ids(tokenizer)
    bounds = []
    for j, (text, tokens) in enumerate(zip(prefixes, encoded[1:])):
        turn = turns[j // 2] + 1
        if not full.startswith(text):
            raise DistillError(
                f"{where}: the chat template renders the conversation up to message {turn} differently from the whole "
                "conversation, so its assistant tokens cannot be found"
            )
        if ids[: len(tokens)] != tokens:
            raise DistillError(
                f"{where}: message {turn}: the template's text at the edge of the assistant turn does not split into "
                "tokens where the turn starts or ends, so its tokens cannot be told apart"
            )
        bounds.append(len(tokens))
    for start, end in zip(bounds[::2], bounds[1::2]):
        end = _turn_end(tokenizer, ids, start, end, special)
        labels[start:end] = ids[start:end]
    return ids, labels
