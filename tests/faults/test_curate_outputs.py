"""`distill curate` (findings 9 and 11): an --out that would overwrite its own input (paid
teacher generations) or a generation folder's files is refused before anything is written;
a numeric gold answer is graded; --out an existing folder is one line."""

import json
from pathlib import Path

import pytest
from fault_helpers import one_line


def _generations(folder: Path, golds: list) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {"key": f"k{i}", "prompt": f"Q:{i}+1=", "completion": f"{i}+1={(i + 1) % 10}#{(i + 1) % 10}", "answer": gold,
         "prompt_hash": f"h{i}", "finish_reason": "stop"}
        for i, gold in enumerate(golds)
    ]  # fmt: skip
    path = folder / "generations.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("out", "pattern"),
    [
        ("gen/generations.jsonl", r"curation would write .*gen/generations.jsonl, which is its own input"),
        ("gen/rejected.jsonl", r"curation would write .*gen/rejected.jsonl, which is its own input"),
        ("other/generations.jsonl", r"curation would write .*other/generations.jsonl, which is a generation file"),
        ("gen/budget.json", r"which is a generation file"),
        ("gen", r"--out .*gen is a folder; give the curated rows' file, e.g. .*gen/curated.jsonl"),
    ],
)
def test_an_out_that_would_overwrite_the_input_is_refused(cli, tmp_path, out, pattern):
    source = _generations(tmp_path / "gen", ["1", "2"])
    if out == "gen/rejected.jsonl":  # curating a file named rejected.jsonl: its rejects would land on it
        source = source.rename(tmp_path / "gen" / "rejected.jsonl")
    before = {p.name: p.read_bytes() for p in (tmp_path / "gen").iterdir()}
    one_line(cli("curate", source, "--out", tmp_path / out), 2, pattern)
    assert {p.name: p.read_bytes() for p in (tmp_path / "gen").iterdir()} == before
    assert not (tmp_path / "other").exists()


def test_a_numeric_gold_answer_is_graded(cli, tmp_path):
    source = _generations(tmp_path / "gen", [1, 3, 3.0, "4", None])  # rows 2 and 3: 2+1=3, 3+1=4
    result = cli("curate", source.parent)
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert summary["kept"] == 4 and summary["rejected_by_reason"] == {"wrong_answer": 1}
    kept = [json.loads(line) for line in (tmp_path / "gen" / "curated.jsonl").read_text().splitlines()]
    assert [r["gold"] for r in kept] == ["1", "3.0", "4", None]


def test_a_gold_answer_that_is_no_answer_is_one_line(cli, tmp_path):
    source = _generations(tmp_path / "gen", ["1", {"value": 2}])
    one_line(
        cli("curate", source), 1, r"generations.jsonl:2: 'answer' \(the gold answer\) must be a string or a number, got dict"
    )
    assert not (tmp_path / "gen" / "curated.jsonl").exists()
