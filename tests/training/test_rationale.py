"""Step-by-step training: task views, per-task normalisation, lambda, KD, evaluation."""

import copy
import json
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from distill.config import build_config
from distill.data.build import build_rows
from distill.data.rationale import eval_rows, task_rows
from distill.data.rows import collate, global_batch_indices, tokenize_rows
from distill.errors import ConfigError, DistillError
from distill.loss.token_losses import IGNORE_INDEX
from distill.models.build import build_models
from distill.pipeline.runner import run_training
from distill.training.loop import train

from helpers import read_metrics


def multitask(tree, weight=0.5, **train_changes):
    tree = copy.deepcopy(tree)
    tree["rationale"] = {"mode": "multitask", "weight": weight}
    tree["objective"]["alpha"] = 0.0
    tree["train"].update(train_changes)
    return tree


def test_task_views_of_a_builtin_row(tiny_tree):
    cfg = build_config(multitask(tiny_tree))
    row = build_rows(cfg.data, "train")[0]
    label, rationale = (task[0] for task in task_rows([row], cfg.rationale))
    assert (label.prompt, label.completion) == ("predict: " + row.prompt, row.answer)
    assert (rationale.prompt, rationale.completion) == ("explain: " + row.prompt, row.rationale)
    assert row.completion == f"{row.rationale}#{row.answer}"
    only = build_config({**tiny_tree, "rationale": {"mode": "answer_only"}}).rationale
    assert [(r.prompt, r.completion) for r in task_rows([row], only)[0]] == [(row.prompt, row.answer)]
    assert [(r.prompt, r.completion) for r in eval_rows([row], cfg.rationale)] == [("predict: " + row.prompt, row.answer)]


def test_each_task_is_normalised_by_its_own_tokens(tiny_tree):
    tree = multitask(tiny_tree, weight=0.3, steps=1, micro_batch_size=4, grad_accum=2)
    cfg = build_config(tree)
    train(cfg, show_progress=False)
    record = read_metrics(cfg.out_dir)[0]

    set_seed(cfg.train.seed)
    student, _, tok, vocab = build_models(cfg)  # the same initial weights as the run
    rows = build_rows(cfg.data, "train")
    picked = global_batch_indices(0, len(rows), 8, cfg.train.seed)
    means = []
    for task in task_rows([rows[i] for i in picked], cfg.rationale):
        batch = collate(tokenize_rows(task, tok, cfg.data.max_length), tok.pad_token_id)
        with torch.no_grad():
            logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        ce = torch.nn.functional.cross_entropy(logits[:, :-1, :vocab].transpose(1, 2), targets, ignore_index=IGNORE_INDEX)
        means.append(ce.item())
    assert record["task_ce"] == pytest.approx(means[0], rel=1e-5)
    assert record["rationale_task_ce"] == pytest.approx(means[1], rel=1e-5)
    assert record["loss"] == pytest.approx(means[0] + 0.3 * means[1], rel=1e-5)
    assert record["label_loss"] == pytest.approx(means[0], rel=1e-5)


def test_accumulation_invariance(tiny_tree):
    runs = []
    for i, (mbs, accum) in enumerate([(8, 1), (2, 4)]):
        tree = multitask(tiny_tree, steps=3, micro_batch_size=mbs, grad_accum=accum)
        tree["out_dir"] = str(Path(tiny_tree["out_dir"]).parent / f"acc{i}")
        train(build_config(tree), show_progress=False)
        runs.append(tree["out_dir"])
    a, b = (load_file(str(Path(r) / "student" / "model.safetensors")) for r in runs)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)


def test_lambda_zero_is_label_training_with_the_prefix(tiny_tree, tmp_path):
    cfg = build_config(multitask(tiny_tree, weight=0.0, steps=3))
    rows = build_rows(cfg.data, "train")
    data = tmp_path / "label.jsonl"
    data.write_text("".join(json.dumps({"prompt": "predict: " + r.prompt, "completion": r.answer}) + "\n" for r in rows))
    plain = copy.deepcopy(tiny_tree)
    plain["objective"]["alpha"] = 0.0
    plain["train"]["steps"] = 3
    plain["data"]["source"] = str(data)
    plain["out_dir"] = str(tmp_path / "plain")
    train(cfg, show_progress=False)
    train(build_config(plain), show_progress=False)
    a = load_file(str(Path(cfg.out_dir) / "student" / "model.safetensors"))
    b = load_file(str(tmp_path / "plain" / "student" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_multitask_with_kd_and_label_task_evaluation(tiny_tree):
    tree = multitask(tiny_tree, weight=1.0, steps=3)
    tree["objective"]["alpha"] = 0.5
    result = run_training(build_config(tree), show_progress=False)
    m = read_metrics(tree["out_dir"])[-1]
    assert {"task_ce", "kd", "rationale_task_ce", "rationale_kd", "label_loss"} <= set(m)
    ce_w, kd_w = 0.5, 0.5 * 4.0
    rationale_loss = ce_w * m["rationale_task_ce"] + kd_w * m["rationale_kd"]
    assert m["loss"] == pytest.approx(m["label_loss"] + rationale_loss, rel=1e-5)
    assert m["label_loss"] == pytest.approx(ce_w * m["task_ce"] + kd_w * m["kd"], rel=1e-5)
    samples = json.loads((Path(tree["out_dir"]) / "eval.json").read_text())["samples"]
    assert all(s["prompt"].startswith("predict: Q:") for s in samples)
    assert 0.0 <= result["eval"]["accuracy"] <= 1.0


def test_answer_only_grades_the_whole_output(tiny_tree, monkeypatch):
    import distill.eval.evaluate as ev

    def sevens(model, tok, prompts, *a):
        return [ev.Generation("7", [tok.convert_tokens_to_ids("7"), tok.eos_token_id], [0.0, 0.0], 0)] * len(prompts)

    monkeypatch.setattr(ev, "generate_greedy_ids", sevens)
    tree = copy.deepcopy(tiny_tree)
    tree["rationale"] = {"mode": "answer_only"}
    tree["objective"]["alpha"] = 0.0
    tree["train"]["steps"] = 1
    result = run_training(build_config(tree), show_progress=False)
    rows = build_rows(build_config(tree).data, "test")
    assert result["eval"]["accuracy"] == sum(r.answer == "7" for r in rows) / len(rows)


def test_bad_combinations_are_config_errors(tiny_tree, tmp_path):
    tree = multitask(tiny_tree)
    with pytest.raises(ConfigError, match="teacher_cache covers the rows' completions"):
        build_config({**tree, "teacher_cache": "x", "objective": {"alpha": 0.5}})
    with pytest.raises(ConfigError, match="rationale.mode=completion"):
        build_config({**tree, "objective": {"alpha": 0.5}, "on_policy": {"lmbda": 0.5}})
    with pytest.raises(ConfigError, match="unknown answer format"):
        build_config({**tiny_tree, "eval": {"answer_format": "nope"}})
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b#1", "answer": "1", "rationale": "b"}\n{"prompt": "c", "completion": "d#2", "answer": "2"}\n')
    tree["data"]["source"] = str(data)
    with pytest.raises(DistillError, match=r"d.jsonl: row 2 has no 'rationale' \(rationale.mode=multitask needs answer and rationale\)"):
        train(build_config(tree), show_progress=False)
    assert not Path(tree["out_dir"]).exists()
