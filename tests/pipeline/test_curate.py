"""Answer extraction and `distill curate`: every rejection reason, votes, duplicates, files."""

import json
import subprocess
import sys

import pytest

from distill.data.rows import read_jsonl
from distill.errors import ConfigError, DistillError
from distill.eval.answers import consistent, grade, normalize, splitter
from distill.pipeline.curate import CurateSettings, curate, read_generations, write_curated


@pytest.mark.parametrize(
    "fmt, text, expected",
    [
        ("gsm8k", "3 + 4 = 7\n#### 7", ("3 + 4 = 7", "7")),
        ("boxed", "so \\boxed{12} is it", ("so", "12")),
        ("answer_line", "2*3=6.\nAnswer: 6", ("2*3=6.", "6")),
        ("answer_line", "Thus the answer is 41.", ("Thus the", "41")),
        ("answer_line", "Answer: 10. Then we stop", ("", "10")),
        ("answer_line", "Answer: Paris", ("", "Paris")),
        ("chain", "7+3=0*2=0#0", ("7+3=0*2=0", "0")),
        ("auto", "x #### 5", ("x", "5")),
        ("auto", "5*5=25 Answer: 25", ("5*5=25", "25")),
        ("regex:FINAL\\((\\d+)\\)", "a FINAL(3) b FINAL(4)", ("a FINAL(3) b", "4")),
        ("auto", "no answer here", None),
        ("auto", "#### Step 1\n3+4=7\n#### Final Answer\nThe answer is 7.", ("#### Step 1\n3+4=7\n#### Final Answer\nThe", "7")),
        ("auto", "### Solution\nso 7 fruits.", None),
        ("auto", "The answer is 3/4.", ("The", "3/4.")),
        ("boxed", "\\boxed{5} then \\boxed{2^{10}}", ("\\boxed{5} then", "2^{10}")),
        ("boxed", "is \\boxed{\\frac{3}{4}}", ("is", "\\frac{3}{4}")),
        ("answer_line", "This answers nothing", None),
    ],
)
def test_splitters(fmt, text, expected):
    assert splitter(fmt)(text) == expected


def test_normalize_conclusion_and_grade():
    assert normalize(" $1,234. ") == normalize("1234") == "1234"
    assert normalize("Paris") == normalize("paris.")
    assert normalize("18.00") == normalize("18") and normalize("-0.0") == "0" and normalize("1,234.50") == "1234.5"
    assert consistent("7+3=0*2=0-5=5+8=3", "3") and consistent("7+3=0*2=0-5=5+8=3", "4") is False
    assert consistent("9*2=18.\n\n**Step 4: Final**\nThe", "18")  # the last equation's result counts
    assert consistent("no numbers", "3") is None and consistent("2+2=4", "Paris") is None
    assert grade("7+3=0#0", "0") and not grade("7+3=0#1", "0") and not grade("7+3=0", "0")
    # the built-in task grades as strictly as ever: the whole tail after '#'
    assert not grade("7+3=0*2=0#0*1=0", "0") and not grade("7+3=0#3 junk", "3") and not grade("7+3=0#3.", "3")
    assert grade(" 42 ", "42", direct=True) and not grade("#42", "42", direct=True)
    with pytest.raises(ConfigError, match="unknown answer format 'nope'"):
        splitter("nope")
    with pytest.raises(ConfigError, match="needs a capture group"):
        splitter("regex:abc")


def gen(prompt, completion, gold=None, sample=0, finish="stop"):
    return {"prompt": prompt, "completion": completion, "answer": gold, "prompt_hash": prompt, "sample": sample,
            "key": f"{prompt}:{sample}", "finish_reason": finish, "teacher": "t"}


def reasons(rejected):
    return {r["key"]: r["reason"] for r in rejected}


def test_every_rejection_reason():
    rows = [
        gen("Q:a", "1+1=2#2", gold="2"),  # kept
        gen("Q:b", "1+1=2", finish="length"),  # truncated
        gen("Q:c", "I do not know"),  # no_answer
        gen("Q:d", "#5"),  # too_short (empty rationale)
        gen("Q:e", "1+1=2 " + "x" * 100 + "#2"),  # too_long
        gen("Q:f", "1+1=2#3"),  # inconsistent
        gen("Q:g", "2+2=4#4", gold="5"),  # wrong_answer
        gen("Q:h", "2+2=4#4", sample=0), gen("Q:h", "2+2=5#5", sample=1), gen("Q:h", "2 plus 2 is 4#4", sample=2),
        gen("Q:a ", "1+1=2#2", gold="2", sample=1),  # the same text as the first row: duplicate
    ]
    kept, rejected, summary = curate(rows, CurateSettings(max_chars=50, per_prompt=2, near_dup=None))
    assert [r["key"] for r in kept] == ["Q:a:0", "Q:h:0", "Q:h:2"]
    assert reasons(rejected) == {
        "Q:b:0": "truncated", "Q:c:0": "no_answer", "Q:d:0": "too_short", "Q:e:0": "too_long",
        "Q:f:0": "inconsistent", "Q:g:0": "wrong_answer", "Q:h:1": "not_majority", "Q:a :1": "duplicate",
    }
    h = [r for r in kept if r["prompt"] == "Q:h"]
    assert all(r["majority_answer"] == "4" and r["agreement"] == pytest.approx(2 / 3) and r["n_samples"] == 3 for r in h)
    assert summary["kept"] == 3 and summary["rejected"] == 8 and summary["rows"] == 11
    assert summary["rejected_by_reason"]["not_majority"] == 1
    assert summary["teacher_accuracy"] == pytest.approx(2 / 3)  # Q:a twice right, Q:g wrong


def test_low_agreement_surplus_and_switches():
    rows = [gen("Q:x", f"1=1#{a}", sample=i) for i, a in enumerate("1123")] + [gen("Q:y", "2=2#2", sample=i) for i in range(3)]
    kept, rejected, _ = curate(rows, CurateSettings(min_agreement=0.6, near_dup=None, check_consistency=False))
    assert {r["reason"] for r in rejected if r["prompt"] == "Q:x"} == {"low_agreement"}  # 2 of 4 agree
    assert [r["key"] for r in kept] == ["Q:y:0"]
    assert [r["reason"] for r in rejected if r["prompt"] == "Q:y"] == ["duplicate", "duplicate"]
    # Switched off, the same rows pass those checks.
    rows = [gen("Q:f", "1+1=2#3", gold="4")]
    kept, _, _ = curate(rows, CurateSettings(check_consistency=False, check_gold=False))
    assert len(kept) == 1


def test_near_duplicates_go_and_distinct_rows_stay():
    base = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."
    rows = [
        gen(base, "48 / 2 = 24, 48 + 24 = 72. Answer: 72"),
        gen(base.replace("Natalia", "Natalie"), "48 / 2 = 24, 48 + 24 = 72. Answer: 72"),
        gen("Weng earns $12 an hour for babysitting. Yesterday she did 50 minutes.", "12 / 60 * 50 = 10. Answer: 10"),
    ]
    kept, rejected, _ = curate(rows, CurateSettings())
    assert [r["prompt"][:7] for r in kept] == ["Natalia", "Weng ea"]
    assert reasons(rejected) == {rows[1]["key"]: "near_duplicate"}
    with pytest.raises(ConfigError, match="near-dup"):
        curate(rows, CurateSettings(near_dup=1.5))


def test_files_and_cli(tmp_path):
    src = tmp_path / "gen"
    src.mkdir()
    rows = [gen("Q:1+1=", "1+1=2#2", gold="2"), gen("Q:2+2=", "2+2=4#5", gold="4"), gen("Q:<script>", "3=3#3")]
    (src / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = subprocess.run([sys.executable, "-m", "distill", "curate", str(src)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["kept"] == 2 and summary["rejected_by_reason"] == {"inconsistent": 1}
    assert "rejected: inconsistent" in done.stderr
    curated = read_jsonl(src / "curated.jsonl")  # a training dataset as it is
    assert [(r.prompt, r.completion, r.rationale, r.answer) for r in curated] == [
        ("Q:1+1=", "1+1=2#2", "1+1=2", "2"), ("Q:<script>", "3=3#3", "3=3", "3"),
    ]
    assert json.loads((src / "rejected.jsonl").read_text())["reason"] == "inconsistent"
    assert json.loads((src / "curation.json").read_text())["kept"] == 2
    # A broken line is named, nothing is written.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "generations.jsonl").write_text(json.dumps(rows[0]) + "\n{oops\n")
    done = subprocess.run([sys.executable, "-m", "distill", "curate", str(bad)], capture_output=True, text=True)
    assert done.returncode != 0 and "generations.jsonl:2: not valid JSON" in done.stderr
    assert done.stderr.count("\n") == 1 and not (bad / "curated.jsonl").exists()
    with pytest.raises(DistillError, match="generations not found"):
        read_generations(tmp_path / "missing")
    write_curated(src, tmp_path / "elsewhere" / "c.jsonl", CurateSettings())
    assert (tmp_path / "elsewhere" / "curation.json").exists()
