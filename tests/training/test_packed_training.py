"""Training on packed {"text"} rows (whole, or cut across blocks) keeps the loop's invariances: 1 x 8 == 8 x 1 micro-batches,
resume == uninterrupted (with the feature term and the probe), a k = V teacher cache ==
the live teacher, and 2 processes == 1."""

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.config import build_config
from distill.data.build import build_examples
from distill.models.build import build_tokenizer
from distill.pipeline.cache import write_teacher_cache
from distill.training.loop import train

from helpers import crash_at, read_metrics, student_weights, train_in_two_processes, write_text_rows


@pytest.fixture(params=[False, True], ids=["whole-rows", "split-rows"])
def text_tree(tiny_tree, tmp_path, request) -> dict:
    """The tiny run on 96 {"text"} rows, packed (the default for text rows) into blocks of 64:
    rows kept whole, or cut across blocks (data.split_rows)."""
    source = str(write_text_rows(tmp_path / "text.jsonl", 96))
    tiny_tree["data"] = {"source": source, "max_length": 64, "split_rows": request.param}
    return tiny_tree


def _run(tree, out: Path, **train_changes) -> list[dict]:
    tree = copy.deepcopy(tree)
    tree["out_dir"] = str(out)
    tree["train"].update(train_changes)
    train(build_config(tree), show_progress=False)
    return read_metrics(out)


def _same_weights(a, b, atol: float) -> None:
    wa, wb = student_weights(a), student_weights(b)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=atol, rtol=0)


def test_the_data_is_packed(text_tree):
    blocks = build_examples(build_config(text_tree).data, build_tokenizer(build_config(text_tree).student, "student"))
    assert all(b.position_ids is not None and b.position_ids.count(0) > 1 for b in blocks[:-1])


@pytest.mark.parametrize("fused", [False, True])
def test_accumulation_invariance_1x8_equals_8x1(text_tree, tmp_path, fused):
    text_tree["objective"]["fused"] = fused
    ma = _run(text_tree, tmp_path / "a", micro_batch_size=1, grad_accum=8)
    mb = _run(text_tree, tmp_path / "b", micro_batch_size=8, grad_accum=1)
    for x, y in zip(ma, mb):
        assert x["valid_tokens"] == y["valid_tokens"]
        for k in ("loss", "task_ce", "kd"):
            assert x[k] == pytest.approx(y[k], abs=1e-5, rel=0)
    _same_weights(tmp_path / "a", tmp_path / "b", 1e-5)


def test_resume_equals_uninterrupted(text_tree, tmp_path, monkeypatch):
    text_tree["features"] = {"weight": 0.5, "probe_every": 1}  # per-document first tokens left out; projectors resumed
    text_tree["train"].update(steps=6, checkpoint_every=3)
    full = _run(text_tree, tmp_path / "full")
    cut = copy.deepcopy(text_tree)
    cut["out_dir"] = str(tmp_path / "cut")
    crash_at(monkeypatch, 5, lambda: train(build_config(cut), show_progress=False))
    train(build_config(cut), resume=True, show_progress=False)
    resumed = read_metrics(tmp_path / "cut")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(full, resumed):
        for k in ("loss", "feature"):
            assert y[k] == pytest.approx(x[k], abs=1e-6, rel=0)
    _same_weights(tmp_path / "full", tmp_path / "cut", 1e-6)
    pf, pc = (load_file(str(tmp_path / d / "projectors" / "projectors.safetensors")) for d in ("full", "cut"))
    for k in pf:
        torch.testing.assert_close(pc[k], pf[k], atol=1e-6, rtol=0)
    alignment = [json.loads(x) for x in (tmp_path / "cut" / "alignment.jsonl").read_text().splitlines()]
    assert [r["step"] for r in alignment] == list(range(7))  # the held-out split feeds the probe


def test_a_full_teacher_cache_of_packed_blocks_equals_the_live_teacher(text_tree, tmp_path):
    text_tree["objective"]["fused"] = False
    vocab = len(build_tokenizer(build_config(text_tree).teacher, "teacher"))
    manifest = write_teacher_cache(build_config(text_tree), tmp_path / "c", vocab, "float32", 8, 4, show_progress=False)
    assert manifest["n_examples"] == len(build_examples(build_config(text_tree).data, build_tokenizer(
        build_config(text_tree).teacher, "teacher")))  # fmt: skip
    live = _run(text_tree, tmp_path / "live")
    text_tree["teacher_cache"] = str(tmp_path / "c")
    cached = _run(text_tree, tmp_path / "cached")
    for x, y in zip(live, cached):
        for k in ("loss", "task_ce", "kd"):
            assert y[k] == pytest.approx(x[k], abs=1e-5, rel=0)


@pytest.mark.slow
def test_two_processes_match_one(text_tree, tmp_path):
    one, two = copy.deepcopy(text_tree), copy.deepcopy(text_tree)
    m1 = _run(one, tmp_path / "one", micro_batch_size=4, grad_accum=2)
    two["out_dir"] = str(tmp_path / "two")
    two["train"].update(micro_batch_size=4, grad_accum=1)
    train_in_two_processes(two, tmp_path / "two.yaml", port=29541)
    m2 = read_metrics(tmp_path / "two")
    assert len(m2) == len(m1) == text_tree["train"]["steps"]
    for x, y in zip(m1, m2):
        assert y["valid_tokens"] == x["valid_tokens"]
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-5, rel=0)
    _same_weights(tmp_path / "one", tmp_path / "two", 1e-5)
