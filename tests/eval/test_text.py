"""Evaluation of {"text"} runs: the held-out hash split, and the text metrics of eval.json
against a direct computation (a teacher identical to the student: KL 0, agreement 1)."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distill.config import EvalConfig, build_config
from distill.data.build import build_rows
from distill.data.rows import Row, collate, text_split, tokenize_rows
from distill.data.tasks.tokenizer import chain_tokenizer
from distill.eval.text import continuation_prompts, evaluate_text, forced_batches
from distill.models.build import build_model
from distill.pipeline.runner import run_training
from distill.report import write_report

from helpers import text_rows, write_text_rows

TOK = chain_tokenizer()


def rows_of(n: int, seed: int = 0) -> list[Row]:
    return [Row("", r["text"]) for r in text_rows(n, seed)]


def test_the_held_out_split_is_deterministic_and_disjoint():
    rows = rows_of(2000)
    train, held = text_split(rows)
    assert text_split(rows) == (train, held)
    assert not {r.completion for r in train} & {r.completion for r in held}  # equal texts share a split
    assert len(train) + len(held) == len(rows)
    assert 0.03 < len(held) / len(rows) < 0.07
    more_train, more_held = text_split(rows + rows_of(500, seed=1))  # a row's split is its text's alone
    assert more_held[: len(held)] == held and more_train[: len(train)] == train
    few = rows_of(3, seed=5)
    assert len(text_split(few)[1]) == 1  # at least one held-out row
    assert text_split(few[:1]) == (few[:1], [])  # a lone row stays in training


def test_text_data_without_eval_source_is_split_and_with_it_is_not(tiny_tree, tmp_path):
    tiny_tree["data"] = {"source": str(write_text_rows(tmp_path / "t.jsonl", 400)), "n_test": 8}
    d = build_config(tiny_tree).data
    train, held = build_rows(d, "train"), build_rows(d, "test")
    assert len(held) == 8 and len(train) + len(text_split(rows_of(400))[1]) == 400
    assert not {r.completion for r in train} & {r.completion for r in held}
    tiny_tree["data"]["eval_source"] = str(write_text_rows(tmp_path / "e.jsonl", 5, seed=9))
    d = build_config(tiny_tree).data
    assert len(build_rows(d, "train")) == 400 and len(build_rows(d, "test")) == 5


def _models(tiny_tree):
    cfg = build_config(tiny_tree)
    return build_model(cfg.student, TOK, "student", 0).eval(), build_model(cfg.teacher, TOK, "teacher", 1).eval()


def _greedy_length(model, prompt: list[int], cap: int) -> int:
    """Tokens of a greedy continuation, EOS included, by transformers' own generate."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=cap, do_sample=False, eos_token_id=TOK.eos_token_id,
                         pad_token_id=TOK.pad_token_id)[0, len(prompt):].tolist()  # fmt: skip
    return out.index(TOK.eos_token_id) + 1 if TOK.eos_token_id in out else len(out)


def test_text_metrics_match_a_direct_computation(tiny_tree):
    student, teacher = _models(tiny_tree)
    rows = rows_of(12, seed=3)
    settings = EvalConfig(max_new_tokens=6, batch_size=5, text_prompt_tokens=4, text_generations=7)
    result, usage = evaluate_text(student, TOK, rows, settings, 128, teacher=teacher)
    text = result["text"]
    ce = kl = rkl = agree = count = 0.0
    with torch.no_grad():
        for e in tokenize_rows(rows, TOK, 128):
            ids = torch.tensor([e.input_ids])
            s, t = student(ids).logits[0, :-1], teacher(ids).logits[0, :-1]  # (n, V) predicting tokens 1..n
            log_q, log_p = s.log_softmax(-1), t.log_softmax(-1)
            ce += F.cross_entropy(s, ids[0, 1:], reduction="sum").item()
            kl += (log_p.exp() * (log_p - log_q)).sum().item()
            rkl += (log_q.exp() * (log_q - log_p)).sum().item()
            agree += (s.argmax(-1) == t.argmax(-1)).sum().item()
            count += len(e.input_ids) - 1
    assert result["n"] == text["rows"] == 12 and text["tokens"] == count
    assert text["heldout_ce"] == pytest.approx(ce / count, rel=1e-5)
    assert text["perplexity"] == pytest.approx(math.exp(ce / count), rel=1e-5)
    assert text["divergences"]["forward_kl"] == pytest.approx(kl / count, rel=1e-4)
    assert text["divergences"]["reverse_kl"] == pytest.approx(rkl / count, rel=1e-4)
    assert text["agreement_top1"] == pytest.approx(agree / count)
    assert 0 < text["divergences"]["jsd"] < text["divergences"]["forward_kl"]
    prompts = continuation_prompts(tokenize_rows(rows, TOK, 128), TOK.eos_token_id, 7, 4)
    assert len(prompts) == text["length"]["prompts"] == 7 and all(1 <= len(p) <= 4 for p in prompts)
    s_len = [_greedy_length(student, p, 6) for p in prompts]
    t_len = [_greedy_length(teacher, p, 6) for p in prompts]
    assert text["length"]["student_mean"] == pytest.approx(sum(s_len) / 7)
    assert text["length"]["teacher_mean"] == pytest.approx(sum(t_len) / 7)
    assert text["length"]["mean_diff"] == pytest.approx(sum(a - b for a, b in zip(s_len, t_len)) / 7)
    assert text["length"]["mean_abs_diff"] == pytest.approx(sum(abs(a - b) for a, b in zip(s_len, t_len)) / 7)
    assert usage["generated_tokens"] == sum(s_len) + sum(t_len) and usage["flops"] > 0
    assert [s["prompt"] for s in result["samples"]] == [TOK.decode(p) for p in prompts[:5]]


def test_a_teacher_identical_to_the_student_has_no_divergence(tiny_tree):
    student, _ = _models(tiny_tree)
    result, _ = evaluate_text(student, TOK, rows_of(9, seed=4), EvalConfig(max_new_tokens=5, batch_size=4), 128,
                              teacher=student)  # fmt: skip
    text = result["text"]
    assert text["agreement_top1"] == 1.0
    for name, value in text["divergences"].items():
        assert value == pytest.approx(0.0, abs=1e-6), name
    assert text["teacher"]["heldout_ce"] == pytest.approx(text["heldout_ce"])
    assert text["length"]["mean_diff"] == 0.0 and text["length"]["mean_ratio"] == 1.0
    alone, _ = evaluate_text(student, TOK, rows_of(9, seed=4), EvalConfig(max_new_tokens=5, batch_size=4), 128)
    assert alone["text"]["heldout_ce"] == pytest.approx(text["heldout_ce"])  # no teacher: the student's values only
    assert "teacher" not in alone["text"] and "divergences" not in alone["text"]
    assert (
        alone["text"]["length"]["student_mean"] == text["length"]["student_mean"] and "mean_diff" not in alone["text"]["length"]
    )


def test_forced_batches_bound_rows_and_logits():
    examples = tokenize_rows(rows_of(30), TOK, 128)
    batches = forced_batches(examples, 4, vocab=100, max_logits=3000)
    assert sorted(i for b in batches for i in b) == list(range(30))
    for b in batches:
        longest = max(len(examples[i].input_ids) for i in b)
        assert len(b) == 1 or (len(b) <= 4 and len(b) * longest * 100 <= 3000)
    batch = collate([examples[i] for i in batches[0]], TOK.pad_token_id)
    assert batch["input_ids"].shape[0] == len(batches[0])


def test_a_text_run_is_evaluated_and_reported(tiny_tree, tmp_path):
    tiny_tree["data"] = {"source": str(write_text_rows(tmp_path / "t.jsonl", 120)), "max_length": 64}
    tiny_tree["eval"] = {"max_new_tokens": 6, "batch_size": 8, "text_generations": 4}
    tiny_tree["gates"] = {"heldout_ce": "<= 1000", "agreement_top1": ">= 0", "accuracy": ">= 0.5"}
    run_training(build_config(tiny_tree), show_progress=False)
    run = Path(tiny_tree["out_dir"])
    ev = json.loads((run / "eval.json").read_text())
    assert ev["n"] == len(text_split(rows_of(120))[1]) > 0
    text = ev["text"]
    assert {"heldout_ce", "perplexity", "agreement_top1", "divergences", "teacher", "length", "tokens"} <= set(text)
    assert {"forward_kl", "reverse_kl", "jsd"} <= set(text["divergences"])
    assert {"mean_diff", "mean_abs_diff", "student_mean", "teacher_mean"} <= set(text["length"])
    gates = {g["metric"]: g for g in ev["gates"]["results"]}
    assert gates["heldout_ce"]["passed"] and gates["agreement_top1"]["passed"]
    assert not gates["accuracy"]["passed"] and "not measured" in gates["accuracy"]["reason"]
    budget = json.loads((run / "budget.json").read_text())
    assert budget["phases"]["evaluation"]["tokens"] > 0
    html = write_report([run], tmp_path / "report.html").read_text()
    section = html[html.index('<div id="text-eval"') : html.index('<section id="sec-reliability"')]
    for label in ("heldout_ce", "perplexity", "agreement_top1", "forward_kl", "reverse_kl", "jsd",
                  "length difference mean (student - teacher)", "<th>student</th><th>teacher</th>"):  # fmt: skip
        assert label in section, label
    assert f"{text['divergences']['forward_kl']:.4g}" in section
