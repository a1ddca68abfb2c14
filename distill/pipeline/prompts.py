"""The prompts of `distill generate`: the built-in task's, or a JSONL file of {"prompt",
"answer"?} rows or chat rows {"messages", "answer"?} (`distill.data.chat`), whose
conversation so far the teacher answers."""

import hashlib
import json
from dataclasses import dataclass

from distill.data.chat import Message, as_dicts, parse_messages
from distill.data.hf import hf_objects
from distill.data.rows import builtin_rows
from distill.data.sources import is_hf
from distill.errors import ConfigError, DistillError
from distill.paths import jsonl_objects


@dataclass(frozen=True)
class Prompt:
    index: int
    prompt: str  # a chat row: its last user turn
    answer: str | None  # gold answer, where known
    messages: tuple[Message, ...] | None = None  # a chat row: the conversation the teacher answers

    @property
    def identity(self) -> str:
        """What the prompt hash covers: the prompt, or the whole conversation."""
        return self.prompt if self.messages is None else json.dumps(self.messages, ensure_ascii=False)

    def conversation(self, system: str | None) -> list[dict]:
        """The messages a chat teacher answers: the conversation (or the prompt as one user
        turn), `system` first unless the conversation has a system turn of its own."""
        turns = list(self.messages) if self.messages is not None else [("user", self.prompt)]
        if system and turns[0][0] != "system":
            turns = [("system", system), *turns]
        return as_dicts(turns)


def chat_prompt(obj: dict, index: int, where: str) -> Prompt:
    """A chat row as a prompt: the conversation before a last assistant turn, which must then
    end with the user's turn."""
    messages = parse_messages(obj["messages"], where, need_assistant=False)
    if messages[-1][0] == "assistant":
        messages = messages[:-1]  # the teacher writes this turn anew
    if not messages or messages[-1][0] != "user":
        raise DistillError(f"{where}: a chat prompt must end with a user turn (or a user turn then the assistant's)")
    answer = obj.get("answer")
    return Prompt(index, messages[-1][1], None if answer is None else str(answer), messages)


def read_prompts(source: str, n: int | None, split: str | None = None, columns: dict[str, str] | None = None) -> list[Prompt]:
    """'builtin:chain' (the built-in task's training prompts, with gold answers; n of them),
    a JSONL file of {"prompt", "answer"?} or {"messages", "answer"?} rows, or an hf: source
    (its `split`, `columns` mapping prompt / answer to its columns): the first n rows, if n
    is given."""
    if n is not None and n < 1:
        raise ConfigError(f"--n {n}: give at least 1 prompt (or leave --n out for every prompt of a file)")
    if source == "builtin:chain":
        if n is None:
            raise ConfigError("--prompts builtin:chain needs --n (how many training prompts)")
        return [Prompt(i, r.prompt, r.answer) for i, r in enumerate(builtin_rows("train", n, 0, 3, 6))]
    if (split or columns) and not is_hf(source):
        raise ConfigError(f"--split and --columns read hf: sources; --prompts is {source!r}")
    if is_hf(source):  # with --n, only the first n rows are read
        objects = hf_objects(source, split, columns, n is not None, n, key="--split", needs=("prompt",), flag="--columns")
    else:
        objects = jsonl_objects(source, "prompt file")
    out = []
    for where, obj in objects:
        if "messages" in obj:
            out.append(chat_prompt(obj, len(out), where))
        elif not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise DistillError(f"{where}: a row needs a non-empty string 'prompt' (or chat 'messages')")
        else:
            answer = obj.get("answer")
            out.append(Prompt(len(out), obj["prompt"], None if answer is None else str(answer)))
        if n is not None and len(out) == n:
            break
    if not out:
        raise DistillError(f"{source}: no prompts")
    return out


def prompt_hash(prompt: str, system: str | None) -> str:
    return hashlib.sha256(f"{system or ''}\x00{prompt}".encode()).hexdigest()[:16]
