"""Chat rows on the real packaged SmolLM2-135M-Instruct with its own chat template: the mask
of a 3-turn conversation token by token, and a chat run that trains it."""

import json
from pathlib import Path
from pydoc_data.topics import topics

import pytest

from distill.config import build_config
from distill.data.chat import chat_example
from distill.data.rows import IGNORE_INDEX
from distill.models.loading import load_tokenizer
from distill.training.loop import train

from helpers import read_metrics

pytestmark = pytest.mark.real
SMOL = "packaged:smollm2-135m-instruct"

# SmolLM2's own template (as its tokenizer ships it) with transformers' {% generation %} marks
# around what an assistant turn must learn: the same text, and a mask to test against.
MARKED = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def conversations(n: int, system: bool = True, longest: int = 240) -> list[dict]:
    """3-turn conversations about CPython's language reference (real English, no download),
    answers of 60 to `longest` characters."""
    rows = []
    for name in sorted(topics):
        paras = [" ".join(p.split()) for p in topics[name].split("\n\n")]
        paras = [p for p in paras if 60 < len(p) < longest and not p.startswith(("*", "|", ">>>"))]
        if len(paras) < 3:
            continue
        messages = [{"role": "system", "content": "You explain Python precisely."}] if system else []
        for question, answer in zip((f"What is '{name}' in Python?", "Tell me more.", "Anything else?"), paras):
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        rows.append({"messages": messages})
        if len(rows) == n:
            return rows
    raise AssertionError("not enough topics")


@pytest.mark.parametrize("system", [True, False], ids=["system", "default-system"])
def test_mask_of_a_three_turn_conversation_is_exactly_the_assistant_tokens(system):
    tok = load_tokenizer(SMOL)
    messages = conversations(1, system)[0]["messages"]
    ids, labels = chat_example(tok, tuple((m["role"], m["content"]) for m in messages), "t")
    assert tok.apply_chat_template(messages, chat_template=MARKED, tokenize=False) == tok.apply_chat_template(messages, tokenize=False)
    out = tok.apply_chat_template(messages, chat_template=MARKED, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == list(out["input_ids"])
    mask = list(out["assistant_masks"])
    assert sum(mask) > 3 * 10
    assert [label != IGNORE_INDEX for label in labels] == [bool(m) for m in mask]  # token by token
    assert all(label in (IGNORE_INDEX, i) for label, i in zip(labels, ids))
    spans, current = [], []
    for i, label in zip(ids + [0], labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX:
            current.append(i)
        elif current:
            spans, current = spans + [tok.decode(current)], []
    assert spans == [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]


def write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_smollm2_trains_on_chat_rows_with_its_own_template(tmp_path):
    """SmolLM2 itself as the student: the CE on its assistant turns falls over two steps on
    the same conversations."""
    tree = {
        "student": {"name": SMOL},
        "data": {"source": write_rows(tmp_path / "chat.jsonl", conversations(2, longest=160)), "max_length": 256},
        "objective": {"alpha": 0.0},
        "train": {"steps": 2, "micro_batch_size": 2, "lr": 1e-4, "warmup_steps": 1},
        "out_dir": str(tmp_path / "run"),
    }
    train(build_config(tree), show_progress=False)
    m = read_metrics(tmp_path / "run")
    assert 0 < m[1]["task_ce"] < m[0]["task_ce"] < 5.0  # an instruct model already knows the format
    assert m[0]["valid_tokens"] > 100
    assert (tmp_path / "run" / "student" / "chat_template.jinja").exists()  # the exported student keeps its template

