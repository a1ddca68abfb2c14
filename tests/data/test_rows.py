import json

import pytest

from distill.data.rows import IGNORE_INDEX, collate, global_batch_indices, micro_batches, read_jsonl, tokenize_rows
from distill.data.tasks.chain import OPS, generate_split, grade
from distill.data.tasks.tokenizer import chain_tokenizer
from distill.errors import DistillError


def test_chain_problems_are_correct_and_deterministic():
    a = generate_split("train", 200, seed=3)
    assert a == generate_split("train", 200, seed=3)
    assert a != generate_split("train", 200, seed=4)
    for p in a:
        body = p.prompt.removeprefix("Q:").removesuffix("=")
        value = int(body[0])
        for op, digit in zip(body[1::2], body[2::2]):
            value = OPS[op](value, int(digit))
        assert p.answer == str(value)
        assert p.target.endswith(f"#{p.answer}")
        assert p.rationale.count("=") == len(body[1::2])


def test_splits_are_disjoint_and_stable_in_size():
    train = {p.prompt for p in generate_split("train", 3000)}
    test = {p.prompt for p in generate_split("test", 300)}
    val = {p.prompt for p in generate_split("val", 100)}
    assert not train & test and not train & val and not test & val
    assert [p.prompt for p in generate_split("test", 50)] == [p.prompt for p in generate_split("test", 300)][:50]


def test_grade_is_exact():
    assert grade("1+2=3#3", "3")
    assert not grade("1+2=3#4", "3")
    assert not grade("1+2=3", "3")
    assert grade("x#9#3", "3")


def test_tokenize_masks_prompt_and_appends_eos():
    tok = chain_tokenizer()
    rows = [r for r in __import__("distill.data.rows", fromlist=["x"]).builtin_rows("train", 2, 0, 3, 4)]
    ex = tokenize_rows(rows, tok, 128)[0]
    n_prompt = len(rows[0].prompt)
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex.input_ids[-1] == tok.eos_token_id == ex.labels[-1]
    assert tok.decode(ex.input_ids[n_prompt:-1]) == rows[0].completion
    with pytest.raises(DistillError, match="row 1 is .* over data.max_length=5"):
        tokenize_rows(rows, tok, 5, source="src")


def test_collate_right_pads():
    tok = chain_tokenizer()
    rows = __import__("distill.data.rows", fromlist=["x"]).builtin_rows("train", 8, 0, 3, 6)
    b = collate(tokenize_rows(rows, tok, 128), tok.pad_token_id)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    assert (b["labels"][b["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_batch_order_independent_of_layout():
    idx = global_batch_indices(5, 37, 8, seed=1)
    assert len(idx) == 8 and len(set(idx)) == 8
    one = micro_batches(idx, 0, 1, 2)
    two = [micro_batches(idx, r, 2, 2) for r in range(2)]
    assert sorted(sum(two[0] + two[1], [])) == sorted(idx)
    assert one[0::2] == two[0] and one[1::2] == two[1]
    # every example once per epoch
    epoch = sum((global_batch_indices(s, 40, 8, seed=2) for s in range(5)), [])
    assert sorted(epoch) == list(range(40))


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "the dataset is empty"),
        ('{"prompt": "a", "completion": "b"}\n{oops\n', r"data.jsonl:2: not valid JSON"),
        ('{"prompt": "a"}\n', r"data.jsonl:1: a row needs 'completion'"),
        ('[1, 2]\n', r"data.jsonl:1: expected a JSON object, got list"),
        ('{"prompt": "a", "completion": 3}\n', r"data.jsonl:1: 'completion' must be a string"),
        ('\n{"prompt": "a", "completion": ""}\n', r"data.jsonl:2: empty completion"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    p = tmp_path / "data.jsonl"
    p.write_text(content)
    with pytest.raises(DistillError, match=message):
        read_jsonl(p)


def test_jsonl_rows(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text(json.dumps({"text": "hello"}) + "\n" + json.dumps({"prompt": "q", "completion": "a", "answer": 4}) + "\n")
    rows = read_jsonl(p)
    assert rows[0].prompt == "" and rows[0].completion == "hello"
    assert rows[1].answer == "4"
    with pytest.raises(DistillError, match="dataset file not found"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    import os

    from distill.paths import atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~mask
