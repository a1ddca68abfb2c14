"""Runaway inputs (finding 13, and JSON nested 100,000 deep of finding 11): YAML with alias,
depth and size limits anywhere distill reads it; JSON depth limits; a row's length checked
by characters before it is tokenized; a batch size checked against the data. Each refused
in one line, at once, instead of exhausting memory."""

import json
from pathlib import Path

import pytest
import yaml
from fault_helpers import one_line


def alias_bomb(levels: int = 9) -> str:
    """YAML whose 9 anchors of 9 aliases each expand to 9**9 (387 million) strings."""
    lines = ['    l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]")
    return "\n".join(lines)


def test_a_yaml_alias_bomb_in_a_config_is_refused_at_once(cli, tree, tmp_path):
    config = tmp_path / "bomb.yaml"
    text = yaml.safe_dump({k: v for k, v in tree.items() if k != "student"})
    config.write_text(text + "student:\n  tokenizer: builtin\n  config:\n    model_type: llama\n" + alias_bomb() + "\n")
    one_line(cli("train", config), 2, r"bomb.yaml: YAML expands to more than 100,000 values \(aliases of aliases\?\); refused")
    assert not (tmp_path / "run").exists()


def test_a_yaml_alias_bomb_in_an_override_is_refused(cli, tree, write_yaml):
    bomb = "[&b0 [0,0,0,0,0,0,0,0,0,0], " + ", ".join(f"&b{i} [{', '.join([f'*b{i - 1}'] * 10)}]" for i in range(1, 7)) + "]"
    one_line(cli("train", write_yaml(tree), f"student.config.x={bomb}"), 2, r"override 'student.config.x': YAML expands")


def test_a_yaml_alias_bomb_in_a_run_folder_does_not_take_the_report_down(cli, tmp_path):
    """`distill report` reads a run's config.yaml: someone else's run folder is input too."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("student:\n  config:\n" + alias_bomb() + "\n")
    one_line(cli("report", run, "--out", tmp_path / "r.html"), 1, r"config.yaml: YAML expands to more than 100,000 values")
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("a: &a [*a]\n", r"YAML an alias contains itself; refused"),
        ("student: " + "[" * 5000 + "]" * 5000 + "\n", r"YAML (nested deeper than 100 levels|nested too deeply)"),
    ],
)
def test_self_referring_and_deep_yaml(cli, tmp_path, text, pattern):
    config = tmp_path / "odd.yaml"
    config.write_text(text)
    one_line(cli("train", config), 2, rf"odd.yaml: {pattern}")


def test_json_nested_100000_deep_is_one_line(cli, tree, write_yaml, tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    data = tmp_path / "deep.jsonl"
    data.write_text('{"prompt": "Q:", "completion": "1"}\n{"prompt": "Q:", "completion": ' + deep + "}\n")
    tree["data"] = {"source": str(data)}
    one_line(cli("train", write_yaml(tree)), 1, r"deep.jsonl:2: nested too deeply to be read")
    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / "generations.jsonl").write_text('{"prompt": "Q:", "completion": ' + deep + "}\n")
    one_line(cli("curate", gen), 1, r"generations.jsonl:1: nested too deeply to be read")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "manifest.json").write_text(deep)
    tree["data"], tree["teacher_cache"], tree["teacher"] = {"n_train": 32, "n_test": 4}, str(cache), None
    one_line(cli("train", write_yaml(tree)), 1, r"manifest.json: teacher cache manifest is nested too deeply to be read")


def test_a_huge_row_is_refused_before_it_is_tokenized(cli, tree, write_yaml, tmp_path, monkeypatch):
    """A 50 MB row was tokenized before the length check (6.6 GB, then SIGABRT); here 4 MB,
    and the tokenizer is watched: it never sees the row."""
    from transformers import PreTrainedTokenizerBase

    seen: list[int] = []
    real_call = PreTrainedTokenizerBase.__call__

    def watched(self, text=None, *args, **kwargs):
        seen.append(max((len(t) for t in text), default=0) if isinstance(text, list) else len(text or ""))
        return real_call(self, text, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", watched)
    data = tmp_path / "huge.jsonl"
    rows = [{"prompt": "Q:1+1=", "completion": "2#2"}] * 8 + [{"prompt": "Q:", "completion": "1" * 4_000_000}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tree["data"] = {"source": str(data), "max_length": 64}
    one_line(
        cli("train", write_yaml(tree)), 1, r"huge.jsonl: row 9 has 4,000,002 characters, more than data.max_length=64 tokens"
    )
    assert max(seen, default=0) < 10_000

    from distill.config import build_config
    from distill.data.build import build_examples
    from distill.data.tasks.tokenizer import chain_tokenizer

    tree["data"]["truncate"] = True  # the row is cut instead: characters first, then tokens
    examples = build_examples(build_config(tree).data, chain_tokenizer())
    assert len(examples[-1].input_ids) == 64 and max(seen) < 10_000


@pytest.mark.parametrize("override", ["train.micro_batch_size=1000000000", "train.grad_accum=1000000000"])
def test_a_runaway_batch_size_is_refused_before_training(cli, tree, write_yaml, tmp_path, override):
    """micro_batch_size=1e9 ground for 78 s, then MemoryError."""
    result = cli("train", write_yaml(tree), override)
    one_line(result, 2, r"000,000,000 examples per step, more than the 32 training rows; lower them or add data")
    assert not Path(tree["out_dir"]).exists()
