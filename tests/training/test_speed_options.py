"""The speed options keep the loop's invariances: the teacher in bf16 (teacher.dtype),
frozen embeddings (train.freeze_embeddings) and bf16 autocast (train.precision): 1 x 8 ==
8 x 1 micro-batches, resume == uninterrupted, 2 processes == 1; frozen embeddings stay as
they came while the rest learns."""

import copy

import pytest

from distill.config import build_config
from distill.training.loop import train
from distill.training.setup import setup

from helpers import (
    assert_resumed_equals,
    assert_same_students,
    crash_at,
    read_metrics,
    student_weights,
    train_in_two_processes,
    write_text_rows,
)

OPTIONS = {
    "teacher_bf16": lambda tree: tree["teacher"].update(dtype="bfloat16"),
    "frozen_embeddings": lambda tree: tree["train"].update(freeze_embeddings=True),
    "student_bf16": lambda tree: tree["train"].update(precision="bf16"),
}


# Another batch layout rounds bf16 differently (matmuls of other shapes round their bf16
# outputs elsewhere): a bf16 teacher's targets move by a bf16 ulp here and there (losses
# still within 1e-5, weights within 1e-4); bf16 autocast of the student moves its losses
# within bf16 rounding (1e-3) and its weights by a few Adam steps (Adam turns a
# rounding-sized gradient into an lr-sized step; lr 3e-3 here). The config docs say so.
# Resume stays exact for all of them.
LAYOUT_TOLERANCE = {"teacher_bf16": (1e-5, 1e-4), "frozen_embeddings": (1e-5, 1e-5), "student_bf16": (1e-3, 1e-2)}


@pytest.fixture(params=sorted(OPTIONS))
def option_tree(request, tiny_tree, tmp_path) -> dict:
    """The tiny run on packed {"text"} rows with one speed option on (its name: tree["_option"])."""
    tiny_tree["_option"] = request.param
    tiny_tree["data"] = {"source": str(write_text_rows(tmp_path / "text.jsonl", 96)), "max_length": 64}
    tiny_tree["objective"]["fused"] = True
    OPTIONS[request.param](tiny_tree)
    return tiny_tree


def _run(tree, out, **train_changes) -> list[dict]:
    tree = copy.deepcopy(tree)
    tree.pop("_option", None)
    tree["out_dir"] = str(out)
    tree["train"].update(train_changes)
    train(build_config(tree), show_progress=False)
    return read_metrics(out)


def test_accumulation_invariance_1x8_equals_8x1(option_tree, tmp_path):
    tol, weight_tol = LAYOUT_TOLERANCE[option_tree["_option"]]
    ma = _run(option_tree, tmp_path / "a", micro_batch_size=1, grad_accum=8)
    mb = _run(option_tree, tmp_path / "b", micro_batch_size=8, grad_accum=1)
    for x, y in zip(ma, mb):
        assert x["valid_tokens"] == y["valid_tokens"]
        assert x["loss"] == pytest.approx(y["loss"], abs=tol, rel=0)
    assert_same_students(tmp_path / "a", tmp_path / "b", atol=weight_tol)


def test_resume_equals_uninterrupted(option_tree, tmp_path, monkeypatch):
    option_tree["train"].update(steps=6, checkpoint_every=3)
    _run(option_tree, tmp_path / "full")
    cut = copy.deepcopy(option_tree)
    cut.pop("_option")
    cut["out_dir"] = str(tmp_path / "cut")
    crash_at(monkeypatch, 5, lambda: train(build_config(cut), show_progress=False))
    train(build_config(cut), resume=True, show_progress=False)
    assert_resumed_equals(tmp_path / "full", tmp_path / "cut", steps=6)


@pytest.mark.slow
def test_two_processes_match_one(option_tree, tmp_path):
    m1 = _run(option_tree, tmp_path / "one", micro_batch_size=4, grad_accum=2)
    tol, weight_tol = LAYOUT_TOLERANCE[option_tree["_option"]]
    two = copy.deepcopy(option_tree)
    two.pop("_option")
    two["out_dir"] = str(tmp_path / "two")
    two["train"].update(micro_batch_size=4, grad_accum=1)
    train_in_two_processes(two, tmp_path / "two.yaml", port=29547)
    m2 = read_metrics(tmp_path / "two")
    assert len(m2) == len(m1)
    for x, y in zip(m1, m2):
        assert y["loss"] == pytest.approx(x["loss"], abs=tol, rel=0)
    assert_same_students(tmp_path / "one", tmp_path / "two", atol=weight_tol)


def test_frozen_vocabulary_matrices_stay_and_the_rest_learns(tiny_tree, tmp_path):
    tiny_tree["train"]["freeze_embeddings"] = True
    tiny_tree["student"]["config"] = {**tiny_tree["student"]["config"], "tie_word_embeddings": False}
    start = setup(build_config({**tiny_tree, "out_dir": str(tmp_path / "start")}), resume=False)
    before = {k: v.detach().clone() for k, v in start.acc.unwrap_model(start.student).state_dict().items()}
    trained_params = [p for g in start.optimizer.param_groups for p in g["params"]]
    frozen = {"model.embed_tokens.weight", "lm_head.weight"}
    named = dict(start.acc.unwrap_model(start.student).named_parameters())
    assert {id(p) for p in trained_params} == {id(p) for k, p in named.items() if k not in frozen}

    train(build_config(tiny_tree), show_progress=False)
    after = student_weights(tmp_path / "run")
    for k in frozen:
        assert after[k].equal(before[k]), k
    for k in after:  # every other matrix learned (norm weights may stay near 1)
        if k not in frozen and "norm" not in k:
            assert not after[k].equal(before[k]), k
