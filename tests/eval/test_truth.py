"""Scores against the true distribution (builtin:grammar): independent of batching and
padding, equal to a per-row reference computation, and part of a run's eval.json."""

import json
from pathlib import Path

import pytest
import torch

from distill.config import build_config
from distill.data.build import build_rows
from distill.data.tasks import grammar as grammar_task
from distill.data.tasks.tokenizer import chain_tokenizer
from distill.eval.truth import truth_scores
from distill.models.build import build_model
from distill.pipeline.runner import run_training


@pytest.fixture
def grammar_tree(tiny_tree) -> dict:
    tiny_tree["data"] = {"source": "builtin:grammar", "n_train": 64, "n_test": 9, "max_length": 80, "seed": 3}
    tiny_tree["eval"]["max_new_tokens"] = 4
    return tiny_tree


def test_truth_kl_equals_a_per_row_reference_whatever_the_batch(grammar_tree):
    cfg = build_config(grammar_tree)
    tok = chain_tokenizer()
    model = build_model(cfg.student, tok, "student", seed=0).eval()
    rows = build_rows(cfg.data, "test")
    g = grammar_task.make_grammar(3)
    kls = []
    with torch.no_grad():
        for r in rows:  # one row at a time, no padding: the completion's targets are the last n positions
            ids = tok(r.prompt + r.completion, add_special_tokens=False).input_ids + [tok.eos_token_id]
            logits = model(input_ids=torch.tensor([ids])).logits[0]  # (T, V)
            truth = grammar_task.true_probs_tensor(g, r.prompt, r.completion, tok)  # (n, V)
            n = truth.shape[0]
            kls.append(grammar_task.kl_to_truth(truth, logits[-n - 1 : -1]))
    reference = float(torch.cat(kls).mean())
    for batch_size in (1, 4, 9):
        scores = truth_scores(model, tok, rows, 3, batch_size, cfg.data.max_length)
        assert scores["kl"] == pytest.approx(reference, rel=1e-6)
        assert scores["tokens"] == sum(len(r.completion) + 1 for r in rows)
    assert scores["kl"] > 0 and scores["entropy"] == pytest.approx(grammar_task.entropy_per_token(g, [
        grammar_task.Sample(r.prompt, r.completion) for r in rows]))


def test_a_grammar_run_reports_its_and_the_teachers_distance_to_the_truth(grammar_tree):
    grammar_tree["train"]["steps"] = 2
    result = run_training(build_config(grammar_tree), show_progress=False)
    truth = json.loads((Path(grammar_tree["out_dir"]) / "eval.json").read_text())["truth"]
    assert truth == result["eval"]["truth"]
    assert truth["kl"] > 0 and truth["teacher_kl"] > 0 and 0 < truth["entropy"] < 3
