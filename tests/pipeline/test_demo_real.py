"""`distill demo --real`: its pieces and a whole demo with a tiny random llama as the teacher;
one short run of the real thing (SmolLM2-135M-Instruct, `-m real`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import distill.pipeline.demo_real as real
from distill.config import read_yaml
from distill.data.rows import Row
from distill.data.tasks.tokenizer import chain_tokenizer
from distill.errors import DistillError
from distill.eval.evaluate import forced_scores
from distill.loss.token_losses import IGNORE_INDEX
from distill.models.loading import load_causal_lm

from helpers import TINY_TEACHER, read_metrics


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "distill", *args], check=False, capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.fixture
def tiny_teacher(tmp_path) -> Path:
    """A saved 4-layer random llama with the built-in character tokenizer."""
    tok = chain_tokenizer()
    torch.manual_seed(0)
    config = {**TINY_TEACHER, "num_hidden_layers": 4, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id}
    folder = tmp_path / "teacher"
    load_causal_lm(config=config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_settings(teacher: Path, **kw) -> real.RealDemo:
    return real.RealDemo(**{"teacher": str(teacher), "layers": 2, "steps": 3, "batch": 2, "max_length": 48, "lr": 1e-3,
                            "warmup_steps": 1, "heldout_rows": 4, "eval_batch": 2, **kw})  # fmt: skip


def test_text_sums_by_hand():
    torch.manual_seed(0)
    logits, t_logits = torch.randn(2, 4, 5), torch.randn(2, 4, 5)  # (B, T, V)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, 3], [IGNORE_INDEX, 4, IGNORE_INDEX, IGNORE_INDEX]])
    mask = labels[:, 1:] != IGNORE_INDEX
    t_logp = t_logits[:, :-1][mask].log_softmax(-1)  # (n, V): what text_scores passes
    got = real.text_sums(logits, labels, t_logp)
    s, targets = logits[:, :-1][mask], labels[:, 1:][mask]
    assert got["count"] == 4
    assert got["ce"] == pytest.approx(F.cross_entropy(s, targets, reduction="sum").item(), rel=1e-6)
    assert got["t_ce"] == pytest.approx(F.cross_entropy(t_logits[:, :-1][mask], targets, reduction="sum").item(), rel=1e-6)
    kl = F.kl_div(s.log_softmax(-1), t_logp, log_target=True, reduction="sum").item()
    assert got["kl"] == pytest.approx(kl, rel=1e-5)
    assert got["agreement"] == float((s.argmax(-1) == t_logp.argmax(-1)).sum())
    same = real.text_sums(t_logits, labels, t_logp)  # the teacher against itself
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["agreement"] == 4 and same["ce"] == pytest.approx(same["t_ce"])


def test_pack_fills_rows_and_keeps_every_word():
    tok = chain_tokenizer()
    paragraphs = ["a short one here", "b " * 70 + "end", "another paragraph of words", "c d e"]
    rows = real.pack(paragraphs, tok, 30)
    assert all(0 < len(tok(r, add_special_tokens=False).input_ids) <= 30 for r in rows)
    assert " ".join(r.replace("\n\n", " ") for r in rows).split() == " ".join(paragraphs).split()
    assert rows[0] == "a short one here"  # the long paragraph does not fit beside it: a new row
    assert real.spread(list(range(10)), 3) == [0, 3, 6] and real.spread([1, 2], 5) == [1, 2]


def test_heldout_text_is_another_source_than_the_training_text():
    train = real.train_paragraphs()
    held = real.heldout_paragraphs(set(train))
    assert len(train) > 1000 and len(held) > 200
    assert not set(held) & set(train) and len(set(held)) == len(held)
    assert held == real.heldout_paragraphs(set(train))  # the same text every time
    assert any("argument" in p for p in held) and all(80 < len(p) < 600 for p in held)


def test_real_demo_with_a_tiny_teacher(tiny_teacher, tmp_path, capsys):
    out = tmp_path / "demo"
    settings = tiny_settings(tiny_teacher)
    summary = real.run_real_demo(out, seed=1, settings=settings)
    printed = capsys.readouterr().out
    runs = summary["runs"]
    for name in ("teacher", "student at init (layer drop)", "student, logit KD", "student, labels only"):
        assert name in printed and name in runs
    kd, labels = runs["student, logit KD"], runs["student, labels only"]
    assert "KL to teacher" in printed and summary["setup"] in printed
    assert f"3 steps x 2 rows of <= 48 tokens of CPython reference prose ({kd['train_tokens']:,} tokens per" in summary["setup"]
    assert summary["gain"].startswith("gain: logit KD") and summary["gain"] in printed.replace("\n", " ")
    assert f"held-out KL {kd['kl']:.3f} vs {labels['kl']:.3f}" in summary["gain"]
    assert json.loads((out / "demo.json").read_text()) == summary
    page = (out / "report.html").read_text()
    assert summary["report"] == str(out / "report.html") and "student-labels" in page and "Plotly" in page

    # Both students start from the one layer-drop student and differ only in the objective.
    kd_cfg, lab_cfg = (read_yaml(out / n / "config.yaml") for n in ("student-kd", "student-labels"))
    assert kd_cfg["student"] == lab_cfg["student"] == {**kd_cfg["student"], "name": str(out / "student-init")}
    assert kd_cfg["objective"]["alpha"] == 1.0 and kd_cfg["objective"]["temperature"] == 1.0
    assert kd_cfg["objective"]["divergence"] == "forward_kl" and kd_cfg["teacher"]["name"] == str(tiny_teacher)
    assert lab_cfg["objective"]["alpha"] == 0.0 and lab_cfg["teacher"] is None
    assert kd_cfg["train"] == lab_cfg["train"] and kd_cfg["data"] == lab_cfg["data"] and kd_cfg["train"]["seed"] == 1
    assert json.loads((out / "student-init" / "student.json").read_text())["kept_layers"] == [0, 3]
    kd_tokens = [m["valid_tokens"] for m in read_metrics(out / "student-kd")]
    assert kd_tokens == [m["valid_tokens"] for m in read_metrics(out / "student-labels")] and len(kd_tokens) == 3

    # Every number shown comes from the runs: the training summaries and the held-out scores,
    # which agree with the evaluation's own teacher-forced scores of the saved students.
    held = [json.loads(line)["text"] for line in (out / "data" / "heldout.jsonl").read_text().splitlines()]
    assert len(held) == summary["heldout_rows"] == 4
    teacher, tok = load_causal_lm(str(tiny_teacher)), chain_tokenizer()
    for name, run in (("student-kd", kd), ("student-labels", labels)):
        train = json.loads((out / name / "train_summary.json").read_text())
        assert (run["tokens_per_s"], run["wall_s"], run["params"]) == (train["tokens_per_s"], train["wall_s"], train["params"])
        ev = json.loads((out / name / "eval.json").read_text())
        assert (ev["divergences"]["forward_kl"], ev["agreement_top1"], ev["perplexity"]) == (
            run["kl"],
            run["agreement"],
            run["perplexity"],
        )
        student = load_causal_lm(str(out / name / "student"))
        ref = forced_scores(student, tok, [Row("", t) for t in held], 2, settings.max_length, teacher, len(tok))
        assert run["kl"] == pytest.approx(ref["forward_kl"] / ref["count"], rel=1e-4)
        assert run["agreement"] == pytest.approx(ref["agreement"] / ref["count"])
        assert ev["teacher"]["heldout_ce"] == pytest.approx(ref["teacher_ce"] / ref["count"], rel=1e-5)
        assert run["heldout_ce"] == pytest.approx(ref["student_ce"] / ref["count"], rel=1e-5)
    assert runs["teacher"]["perplexity"] == json.loads((out / "student-kd" / "eval.json").read_text())["teacher"]["perplexity"]
    assert kd["kl"] != labels["kl"] and runs["student at init (layer drop)"]["tokens_per_s"] is None


def test_real_demo_refuses_to_clear_a_folder_that_is_not_its_own(tiny_teacher, tmp_path):
    out = tmp_path / "demo"
    (out / "student-labels").mkdir(parents=True)
    (out / "student-labels" / "notes.txt").write_text("mine")
    with pytest.raises(DistillError, match="is not a run directory"):
        real.run_real_demo(out, settings=tiny_settings(tiny_teacher))
    assert (out / "student-labels" / "notes.txt").read_text() == "mine" and not (out / "student-init").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--steps", "3"], "--steps sets the students' steps of --real only"), (["--real", "--task", "chain"], "drop --task")],
)
def test_demo_option_mistakes_are_usage_errors(args, message, tmp_path):
    proc = run_cli("demo", "--out", str(tmp_path / "d"), *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert message in proc.stderr and not (tmp_path / "d").exists()


@pytest.mark.real
def test_real_demo_command_with_two_steps(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("demo", "--real", "--steps", "2", "--out", str(out), timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "student, logit KD" in proc.stdout and "gain: logit KD" in proc.stdout
    summary = json.loads((out / "demo.json").read_text())
    assert summary["settings"]["steps"] == 2 and summary["settings"]["teacher"] == real.SMOL
    assert summary["heldout_rows"] == 32 and summary["heldout_tokens"] > 2000
    runs = summary["runs"]
    assert runs["teacher"]["params"] > 130e6 and 60e6 < runs["student, logit KD"]["params"] < 70e6
    init = runs["student at init (layer drop)"]["kl"]
    assert runs["student, logit KD"]["kl"] < init and runs["student, labels only"]["kl"] < init  # two steps already help
    assert runs["teacher"]["perplexity"] < runs["student, logit KD"]["perplexity"]
    for name in ("student-kd", "student-labels"):
        assert (out / name / "eval.json").exists() and (out / name / "student" / "model.safetensors").exists()
    assert "student-kd" in (out / "report.html").read_text()
