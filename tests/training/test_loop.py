"""End-to-end training on CPU with tiny random models: artifacts, learning, invariances."""

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import distill.training.teachers as teachers_mod
from distill.config import build_config
from distill.errors import DistillError
from distill.pipeline.runner import run_training
from distill.training.loop import train

from helpers import assert_resumed_equals, assert_same_students, crash_at, read_metrics, student_weights, train_in_two_processes


def _train(tree, **changes):
    tree = copy.deepcopy(tree)
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        tree[section][key] = value
    return train(build_config(tree), show_progress=False)


def test_run_writes_artifacts_and_learns(tiny_tree):
    tiny_tree["train"].update(steps=30, lr=1e-2)
    tiny_tree["data"]["n_train"] = 512
    tiny_tree["train"]["checkpoint_every"] = 10
    result = run_training(build_config(tiny_tree), show_progress=False)
    run = Path(tiny_tree["out_dir"])
    for name in ("config.yaml", "metrics.jsonl", "train_summary.json", "eval.json", "student/config.json"):
        assert (run / name).exists(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000020", "step-000030"]
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, 31))
    assert {"loss", "task_ce", "kd", "lr", "tokens_per_s"} <= set(metrics[0])
    first, last = sum(m["task_ce"] for m in metrics[:3]) / 3, sum(m["task_ce"] for m in metrics[-3:]) / 3
    assert last < 0.8 * first
    assert 0.0 <= result["eval"]["accuracy"] <= 1.0
    # plain transformers reloads the exported student and its tokenizer
    model = AutoModelForCausalLM.from_pretrained(run / "student")
    tok = AutoTokenizer.from_pretrained(run / "student")
    assert tok.decode(tok("Q:1+2=").input_ids) == "Q:1+2="
    initial = build_config(tiny_tree)
    assert model.config.hidden_size == initial.student.config["hidden_size"]


def test_label_only_run_needs_no_teacher(tiny_tree):
    tiny_tree["objective"]["alpha"] = 0.0
    del tiny_tree["teacher"]
    _train(tiny_tree)
    metrics = read_metrics(tiny_tree["out_dir"])
    assert "kd" not in metrics[0]
    assert metrics[0]["loss"] == pytest.approx(metrics[0]["task_ce"])


def test_accumulation_invariance_1x8_equals_8x1(tiny_tree, tmp_path):
    a, b = copy.deepcopy(tiny_tree), copy.deepcopy(tiny_tree)
    a["out_dir"], b["out_dir"] = str(tmp_path / "a"), str(tmp_path / "b")
    _train(a, train__micro_batch_size=1, train__grad_accum=8)
    _train(b, train__micro_batch_size=8, train__grad_accum=1)
    ma, mb = read_metrics(a["out_dir"]), read_metrics(b["out_dir"])
    for x, y in zip(ma, mb):
        assert x["valid_tokens"] == y["valid_tokens"]
        for k in ("loss", "task_ce", "kd"):
            assert x[k] == pytest.approx(y[k], abs=1e-5, rel=0)
    wa, wb = student_weights(a["out_dir"]), student_weights(b["out_dir"])
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0)


@pytest.mark.parametrize("feature_weight", [0.0, 0.5])
def test_resume_equals_uninterrupted(tiny_tree, tmp_path, monkeypatch, feature_weight):
    tiny_tree["features"] = {"weight": feature_weight, "probe_every": 1}  # 0.5: projectors are resumed too
    tiny_tree["train"].update(steps=6, checkpoint_every=3)
    full, cut = copy.deepcopy(tiny_tree), copy.deepcopy(tiny_tree)
    full["out_dir"], cut["out_dir"] = str(tmp_path / "full"), str(tmp_path / "cut")
    _train(full)

    # Interrupt the second run at step 5, after the step-3 checkpoint and step 4's metrics.
    crash_at(monkeypatch, 5, lambda: _train(cut))
    assert len(read_metrics(cut["out_dir"])) == 5
    assert not (Path(cut["out_dir"]) / "student").exists()

    train(build_config(cut), resume=True, show_progress=False)
    assert_resumed_equals(full["out_dir"], cut["out_dir"], steps=6)
    af, ac = ([json.loads(x) for x in (Path(d) / "alignment.jsonl").read_text().splitlines()] for d in (full["out_dir"], cut["out_dir"]))
    assert [r["step"] for r in ac] == [r["step"] for r in af] == list(range(7))  # stale records trimmed
    assert [r["cka_mean"] for r in ac] == pytest.approx([r["cka_mean"] for r in af], abs=1e-6)
    if feature_weight:
        pf, pc = (load_file(str(Path(d) / "projectors" / "projectors.safetensors")) for d in (full["out_dir"], cut["out_dir"]))
        for k in pf:
            torch.testing.assert_close(pc[k], pf[k], atol=1e-6, rtol=0)
        mf, mc = read_metrics(full["out_dir"]), read_metrics(cut["out_dir"])
        assert [m["feature"] for m in mc] == pytest.approx([m["feature"] for m in mf], abs=1e-6, rel=0)


def test_existing_run_is_not_overwritten(tiny_tree):
    _train(tiny_tree)
    with pytest.raises(DistillError, match="already holds a run"):
        _train(tiny_tree)


@pytest.mark.parametrize("fused", [False, True])
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_tree, monkeypatch, fused):
    tiny_tree["train"].update(steps=6, checkpoint_every=2)
    tiny_tree["objective"]["fused"] = fused
    calls = {"n": 0}

    def poison(fn):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            out = fn(*args, **kwargs)
            if calls["n"] != 3:
                return out
            return (out[0] * float("nan"), out[1]) if isinstance(out, tuple) else out * float("nan")

        return wrapped

    monkeypatch.setattr(teachers_mod, "combine", poison(teachers_mod.combine))
    monkeypatch.setattr(teachers_mod, "fused_term_sums", poison(teachers_mod.fused_term_sums))
    with pytest.raises(DistillError, match=r"loss became nan at step 3; .*step-000002"):
        _train(tiny_tree)
    ckpts = sorted(p.name for p in (Path(tiny_tree["out_dir"]) / "checkpoints").iterdir())
    assert ckpts == ["step-000002"]


@pytest.mark.parametrize("name", ["forward_kl", "jsd"])
def test_fused_path_trains_like_the_naive_path(tiny_tree, tmp_path, name):
    a, b = copy.deepcopy(tiny_tree), copy.deepcopy(tiny_tree)
    a["out_dir"], b["out_dir"] = str(tmp_path / "naive"), str(tmp_path / "fused")
    a["objective"].update(fused=False, divergence=name)
    b["objective"].update(fused=True, divergence=name, chunk_size=7)
    assert _train(a)["fused_loss"] is False
    assert _train(b)["fused_loss"] is True
    for x, y in zip(read_metrics(a["out_dir"]), read_metrics(b["out_dir"])):
        for k in ("loss", "task_ce", "kd"):
            assert y[k] == pytest.approx(x[k], abs=1e-5, rel=1e-5)
    wa, wb = student_weights(a["out_dir"]), student_weights(b["out_dir"])
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("feature_weight", "lmbda", "mode", "overlap"),
    [
        (0.0, 0.0, "completion", False), (0.5, 0.0, "completion", False), (0.0, 0.5, "completion", False),
        (0.0, 0.0, "multitask", False), (0.0, 0.5, "completion", True),
    ],
)  # fmt: skip
def test_two_processes_match_one(tiny_tree, tmp_path, feature_weight, lmbda, mode, overlap):
    """DDP over 2 CPU processes (gloo) takes the same steps as one process, same global batch
    (with the feature term: the projectors are a second DDP model; on-policy: every rank
    makes the same lambda draw, and each row's sample depends on its own seed only, also
    when sampled ahead in a thread; multitask: each task's valid tokens are counted over
    both processes)."""
    tiny_tree["features"] = {"weight": feature_weight}
    tiny_tree["on_policy"] = {"lmbda": lmbda, "max_new_tokens": 12, "overlap": overlap}
    tiny_tree["rationale"] = {"mode": mode, "weight": 0.7}
    one, two = copy.deepcopy(tiny_tree), copy.deepcopy(tiny_tree)
    one["out_dir"], two["out_dir"] = str(tmp_path / "one"), str(tmp_path / "two")
    one["train"].update(micro_batch_size=4, grad_accum=2)
    two["train"].update(micro_batch_size=4, grad_accum=1)
    _train(one)
    port = 29517 + int(feature_weight * 10) + int(lmbda * 100) + 7 * (mode == "multitask") + 3 * overlap
    train_in_two_processes(two, tmp_path / "two.yaml", port)
    m1, m2 = read_metrics(one["out_dir"]), read_metrics(two["out_dir"])
    assert len(m2) == len(m1) == tiny_tree["train"]["steps"]
    for x, y in zip(m1, m2):
        assert y["valid_tokens"] == x["valid_tokens"]
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-5, rel=0)
        assert y.get("on_policy") == x.get("on_policy") and y.get("generated_tokens") == x.get("generated_tokens")
        if feature_weight:
            assert y["feature"] == pytest.approx(x["feature"], abs=1e-5, rel=0)
        if mode == "multitask":
            assert y["rationale_task_ce"] == pytest.approx(x["rationale_task_ce"], abs=1e-5, rel=0)
    assert_same_students(one["out_dir"], two["out_dir"], atol=1e-5)
    if feature_weight:
        p1 = load_file(str(Path(one["out_dir"]) / "projectors" / "projectors.safetensors"))
        p2 = load_file(str(Path(two["out_dir"]) / "projectors" / "projectors.safetensors"))
        for k in p1:
            torch.testing.assert_close(p2[k], p1[k], atol=1e-5, rtol=0)
        assert (Path(two["out_dir"]) / "alignment.jsonl").read_text() != ""


@pytest.mark.parametrize("name", ["reverse_kl", "jsd", "skew_forward_kl", "tvd"])
def test_every_divergence_trains(tiny_tree, name):
    tiny_tree["objective"].update(divergence=name, jsd_beta=0.3, skew_alpha=0.2)
    _train(tiny_tree)
    metrics = read_metrics(tiny_tree["out_dir"])
    assert all(m["kd"] >= 0 and m["loss"] == m["loss"] for m in metrics)
