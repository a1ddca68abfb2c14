"""Chat rows: the template's rendering, the loss on exactly the assistant turns, bad rows named."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.data.chat import chat_example, generation_prompt
from distill.data.packing import pack_examples
from distill.data.rows import IGNORE_INDEX, is_text, prompt_text, read_jsonl, tokenize_rows
from distill.data.tasks.tokenizer import chain_tokenizer
from distill.errors import DistillError
from distill.training.on_policy import prompt_length

from helpers import chat_rows, chat_tokenizer

THREE_TURNS = [
    {"role": "system", "content": "add digits"},
    {"role": "user", "content": "one and two"},
    {"role": "assistant", "content": "three"},
    {"role": "user", "content": "and four"},
    {"role": "assistant", "content": "seven"},
    {"role": "user", "content": "and zero"},
    {"role": "assistant", "content": "still seven"},
]


def write_rows(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def template_mask(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """The ids and assistant mask transformers derives from the template's {% generation %} marks."""
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), list(out["assistant_masks"])


@pytest.mark.parametrize("messages", [THREE_TURNS, THREE_TURNS[1:], THREE_TURNS[:3]], ids=["system", "default-system", "one-turn"])
def test_mask_covers_exactly_the_assistant_tokens(tmp_path, messages):
    tok = chat_tokenizer()
    ex = tokenize_rows(read_jsonl(write_rows(tmp_path / "c.jsonl", [{"messages": messages}])), tok, 512)[0]
    ids, mask = template_mask(tok, messages)
    assert ex.input_ids == ids  # the template's own rendering, token for token
    assert sum(mask) > 0
    for t, (label, m) in enumerate(zip(ex.labels, mask)):
        assert (label != IGNORE_INDEX) == bool(m), f"token {t} {tok.decode([ids[t]])!r}"
        assert label in (IGNORE_INDEX, ids[t])
    # each supervised span is one assistant turn's content and its end-of-turn token, in order
    spans, current = [], []
    for i, label in zip(ids, ex.labels):
        if label != IGNORE_INDEX:
            current.append(i)
        elif current:
            spans, current = spans + [current], []
    spans += [current] if current else []
    wanted = [m["content"] + "<eos>" for m in messages if m["role"] == "assistant"]
    assert [tok.decode(s) for s in spans] == wanted


def test_system_prompt_and_history_are_context_only():
    tok = chat_tokenizer()
    ids, labels = chat_example(tok, tuple((m["role"], m["content"]) for m in THREE_TURNS), "t")
    text_of_labels = tok.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])
    assert "add digits" in tok.decode(ids) and "add digits" not in text_of_labels
    assert "one and two" not in text_of_labels and "brief" not in tok.decode(ids)  # own system prompt: no default


def test_the_student_continues_the_conversation_from_its_last_assistant_turn(tmp_path):
    """On-policy: the prompt is the conversation before the last assistant turn with the
    generation prompt, exactly the ids of that rendering."""
    tok = chat_tokenizer()
    rows = read_jsonl(write_rows(tmp_path / "c.jsonl", [{"messages": THREE_TURNS}]))
    ex = tokenize_rows(rows, tok, 512)[0]
    prompt = generation_prompt(tok, rows[0].messages, "t")
    assert prompt == prompt_text(rows[0], tok)
    assert prompt.endswith("<|user|>and zero<eos> <|assistant|>")
    n = prompt_length(ex)
    assert ex.input_ids[:n] == tok(prompt, add_special_tokens=False).input_ids
    assert tok.decode(ex.labels[n : n + len("still seven") + 1]) == "still seven<eos>"


def test_chat_and_prompt_rows_mix_and_are_not_text(tmp_path):
    path = write_rows(tmp_path / "m.jsonl", [{"messages": THREE_TURNS[1:3], "answer": 3}, {"prompt": "a", "completion": "b"}])
    rows = read_jsonl(path)
    assert rows[0].messages is not None and rows[0].answer == "3" and rows[0].completion == "three"
    assert rows[1].messages is None and not is_text(rows[:1])
    b = tokenize_rows(rows, chat_tokenizer(), 128)[1]
    assert b.labels[-1] == chain_tokenizer().eos_token_id and sum(x != IGNORE_INDEX for x in b.labels) == 2


@pytest.mark.parametrize(
    "messages, says",
    [
        ([{"role": "user", "content": "hi"}], "no assistant turn"),
        ([{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}], 'message 1 has role "tool"'),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": None}], "message 2 .assistant. needs a string"),
        ([{"role": "user", "content": "x"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "y"}],
         "message 2 is a system message"),
        ([{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}], "message 1 is an assistant turn"),
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([["user", "x"]], "must be an object"),
    ],
)  # fmt: skip
def test_bad_chat_rows_name_file_and_line(tmp_path, messages, says):
    path = write_rows(tmp_path / "bad.jsonl", [{"messages": THREE_TURNS}, {"messages": messages}])
    with pytest.raises(DistillError, match=rf"bad.jsonl:2: .*{says}"):
        read_jsonl(path)


def test_roles_the_template_refuses_are_one_line_naming_the_row(tmp_path):
    rows = [{"messages": THREE_TURNS}, {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                                     {"role": "assistant", "content": "c"}]}]  # fmt: skip
    path = write_rows(tmp_path / "c.jsonl", rows)
    with pytest.raises(DistillError, match=r"c.jsonl: row 2: the chat template refuses .* must alternate") as e:
        tokenize_rows(read_jsonl(path), chat_tokenizer(), 128, source=path)
    assert "\n" not in str(e.value)


def test_a_tokenizer_without_a_template_is_named(tmp_path):
    path = write_rows(tmp_path / "c.jsonl", [{"messages": THREE_TURNS}])
    with pytest.raises(DistillError, match=r"row 1: chat rows .* this tokenizer has none"):
        tokenize_rows(read_jsonl(path), chain_tokenizer(), 128, source=path)


def test_long_chat_rows_are_refused_or_cut(tmp_path):
    tok = chat_tokenizer()
    path = write_rows(tmp_path / "c.jsonl", [{"messages": THREE_TURNS}])
    rows = read_jsonl(path)
    with pytest.raises(DistillError, match="row 1 is .* tokens, over data.max_length=40"):
        tokenize_rows(rows, tok, 40, source=path)
    ex = tokenize_rows(rows, tok, 40, source=path, truncate=True)[0]
    full = tokenize_rows(rows, tok, 512)[0]
    assert ex.input_ids == full.input_ids[:40] and ex.labels == full.labels[:40]
    with pytest.raises(DistillError, match="row 1 has a .*-token prompt; data.max_length=20 leaves no target"):
        tokenize_rows(rows, tok, 20, source=path, truncate=True)


def test_packed_chat_rows_keep_every_rows_targets():
    """Chat rows pack (data.packing: true) like any example: a block's targets are its rows'."""
    tok = chat_tokenizer()
    rows = read_jsonl_rows(chat_rows(12, seed=1))
    examples = tokenize_rows(rows, tok, 256)
    blocks = pack_examples(examples, 256)
    assert len(blocks) < len(examples)
    targets = sorted(t for e in examples for t in e.labels if t != IGNORE_INDEX)
    assert sorted(t for b in blocks for t in b.labels if t != IGNORE_INDEX) == targets


def read_jsonl_rows(objs: list[dict]):
    from distill.data.rows import chat_row

    return [chat_row(o, f"row {i + 1}") for i, o in enumerate(objs)]


turns = st.lists(
    st.tuples(st.sampled_from(["system", "user", "assistant"]), st.text(alphabet="ab <>|eos\n", max_size=12)),
    min_size=1, max_size=6,
)  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(messages=turns)
def test_any_conversation_is_masked_as_the_template_marks_it_or_refused_in_one_line(messages):
    """Random conversations, contents with special-token text and characters the tokenizer
    does not know among them: the labels are transformers' assistant mask token by token,
    or the row is a one-line DistillError (roles the template refuses, no assistant turn)."""
    tok = chat_tokenizer()
    try:
        ids, labels = chat_example(tok, tuple(messages), "row 1")
    except DistillError as e:
        assert str(e).startswith("row 1: ") and "\n" not in str(e)
        return
    want_ids, mask = template_mask(tok, [{"role": r, "content": c} for r, c in messages])
    assert ids == want_ids
    assert [label != IGNORE_INDEX for label in labels] == [bool(m) for m in mask]
