"""Quantization-aware distillation (the `quant` section) end to end on tiny random models:
the exported quantized student is what training saw, resume and 2 processes reproduce the
single uninterrupted run, it composes with the objective's terms and batch sources, and the
quantized student is evaluated, gated, budgeted and reported beside the full-precision one."""

import copy
import json
from pathlib import Path

import pytest
import torch

from distill.config import build_config
from distill.errors import DistillError
from distill.models.loading import load_causal_lm
from distill.models.quantize import Scheme, prepare_qat
from distill.pipeline.runner import run_eval, run_training
from distill.report import write_report
from distill.training.loop import train

from helpers import assert_resumed_equals, assert_same_students, crash_at, read_metrics, train_in_two_processes

pytest.importorskip("torchao")


def _train(tree):
    return train(build_config(copy.deepcopy(tree)), show_progress=False)


def _quant(tree, **quant):
    tree = copy.deepcopy(tree)
    tree["quant"] = {"scheme": "int4", "group_size": 16, **quant}
    return tree


def test_qat_run_exports_the_quantized_student_it_trained(tiny_tree):
    tree = _quant(tiny_tree)
    tree["gates"] = {"agreement_top1": ">= 0.0"}
    result = run_training(build_config(tree), show_progress=False)
    run = Path(tree["out_dir"])
    record = json.loads((run / "student-int4" / "quant.json").read_text())
    assert (record["scheme"], record["group_size"], record["bits"]) == ("int4", 16, 4)
    assert record["weights_bytes"] == (run / "student-int4" / "quantized.safetensors").stat().st_size
    assert record["weights_bytes"] < (run / "student" / "model.safetensors").stat().st_size
    assert result["train"]["quantized"]["scheme"] == "int4"
    # The quantized export computes what the fake-quantized student computed in training.
    quantized = load_causal_lm(str(run / "student-int4"))
    fake = load_causal_lm(str(run / "student"))
    prepare_qat(fake, Scheme("int4", 16))
    ids = torch.randint(0, fake.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(quantized(ids).logits, fake(ids).logits, atol=1e-5, rtol=0)
    # Both students evaluated: eval.json (full precision) and eval-int4.json say which they hold.
    full, quant = (json.loads((run / name).read_text()) for name in ("eval.json", "eval-int4.json"))
    assert full["model"]["quant"] is None and full["model"]["folder"].endswith("student")
    assert quant["model"]["quant"]["scheme"] == "int4" and quant["model"]["folder"].endswith("student-int4")
    assert result["eval_quantized"]["gates"]["passed"] is True
    budget = json.loads((run / "budget.json").read_text())
    assert budget["phases"]["quantization"]["seconds"] > 0 and budget["phases"]["quantization"]["records"] == 1
    # distill eval --scheme int4 --gates: the quantized student again, gates on its metrics.
    again = run_eval(str(run), gates=True, scheme="int4")
    assert again["model"]["quant"]["scheme"] == "int4" and again["gates"]["passed"] is True
    assert again["divergences"] == quant["divergences"]
    # The report shows both side by side.
    page = write_report([run], run / "report.html").read_text()
    assert "Quantized vs full precision" in page and "run (int4)" in page and "run (full precision)" in page


def test_fake_quantization_changes_training_and_post_training_does_not(tiny_tree, tmp_path):
    plain, qat, ptq = (copy.deepcopy(tiny_tree) for _ in range(3))
    qat, ptq = _quant(qat), _quant(ptq, aware=False)
    for tree, name in ((plain, "plain"), (qat, "qat"), (ptq, "ptq")):
        tree["out_dir"] = str(tmp_path / name)
        _train(tree)
    mp, mq, mt = (read_metrics(tmp_path / n) for n in ("plain", "qat", "ptq"))
    assert [m["loss"] for m in mt] == [m["loss"] for m in mp]  # aware=false trains in full precision
    assert mq[0]["loss"] != mp[0]["loss"]  # the fake-quantized forward is another function
    assert (tmp_path / "ptq" / "student-int4" / "quant.json").is_file()
    assert not (tmp_path / "plain" / "student-int4").exists()


@pytest.mark.parametrize("quant", [{"scheme": "int8"}, {"activations": True}])
def test_qat_resume_equals_uninterrupted(tiny_tree, tmp_path, monkeypatch, quant):
    tree = _quant(tiny_tree, **quant)
    tree["train"].update(steps=6, checkpoint_every=3)
    full, cut = copy.deepcopy(tree), copy.deepcopy(tree)
    full["out_dir"], cut["out_dir"] = str(tmp_path / "full"), str(tmp_path / "cut")
    _train(full)
    crash_at(monkeypatch, 5, lambda: _train(cut))
    train(build_config(cut), resume=True, show_progress=False)
    assert_resumed_equals(full["out_dir"], cut["out_dir"], steps=6)
    scheme = tree["quant"]["scheme"]
    from safetensors.torch import load_file

    qf, qc = (load_file(str(Path(d) / f"student-{scheme}" / "quantized.safetensors")) for d in (full["out_dir"], cut["out_dir"]))
    for k in qf:
        torch.testing.assert_close(qc[k], qf[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "changes",
    [{"objective": {"fused": True}}, {"features": {"weight": 0.5}}, {"on_policy": {"lmbda": 1.0, "max_new_tokens": 6}},
     {"objective": {"divergence": "reverse_kl"}}, {"rationale": {"mode": "multitask"}}],
    ids=["fused", "feature", "on_policy", "reverse_kl", "multitask"],
)
def test_qat_composes_with_terms_and_batch_sources(tiny_tree, tmp_path, changes):
    """The fake quantization sits in the student, not the loss: every objective term and
    batch source trains through it (the fused lm_head loss too: lm_head is not quantized)."""
    plain = copy.deepcopy(tiny_tree)
    for section, values in changes.items():
        plain.setdefault(section, {}).update(values)
    plain["train"]["steps"] = 2
    qat = _quant(plain)
    plain["out_dir"], qat["out_dir"] = str(tmp_path / "plain"), str(tmp_path / "qat")
    _train(plain)
    summary = _train(qat)
    mp, mq = read_metrics(plain["out_dir"]), read_metrics(qat["out_dir"])
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in mq)
    assert mq[0]["loss"] != pytest.approx(mp[0]["loss"], abs=1e-9)
    assert summary["quantized"]["scheme"] == "int4"
    if changes.get("objective", {}).get("fused"):
        assert summary["fused_loss"] is True


def test_int8_of_a_trained_student_keeps_forward_kl(tiny_tree):
    """Acceptance on a tiny trained student: int8 weight-only changes the held-out forward KL
    to the teacher by at most 0.02 nats/token (post-training quantization at the export)."""
    tree = _quant(tiny_tree, scheme="int8", aware=False)
    tree["train"].update(steps=30, lr=1e-2)
    tree["data"]["n_train"] = 512
    result = run_training(build_config(tree), show_progress=False)
    full, quant = result["eval"]["divergences"]["forward_kl"], result["eval_quantized"]["divergences"]["forward_kl"]
    assert abs(quant - full) <= 0.02, (full, quant)


@pytest.mark.slow
def test_qat_two_processes_match_one(tiny_tree, tmp_path):
    """DDP over 2 CPU processes (gloo) with fake-quantized linears: the same steps as one process."""
    tree = _quant(tiny_tree)
    one, two = copy.deepcopy(tree), copy.deepcopy(tree)
    one["out_dir"], two["out_dir"] = str(tmp_path / "one"), str(tmp_path / "two")
    one["train"].update(micro_batch_size=4, grad_accum=2)
    two["train"].update(micro_batch_size=4, grad_accum=1)
    _train(one)
    train_in_two_processes(two, tmp_path / "two.yaml", port=29561)
    m1, m2 = read_metrics(one["out_dir"]), read_metrics(two["out_dir"])
    assert len(m2) == len(m1) == tree["train"]["steps"]
    for x, y in zip(m1, m2):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-5, rel=0)
    assert_same_students(one["out_dir"], two["out_dir"], atol=1e-5)
    assert (Path(two["out_dir"]) / "student-int4" / "quant.json").is_file()


def test_a_quantized_lm_head_leaves_the_fused_path(tiny_tree, tmp_path):
    """quant.exclude without lm_head: the fused loss would use the unrounded head weight, so the
    run takes the naive path (objective.fused=true is refused), and the export still loads."""
    tree = _quant(tiny_tree, exclude=[])
    tree["train"]["steps"] = 2
    assert _train(tree)["fused_loss"] is False
    record = json.loads((Path(tree["out_dir"]) / "student-int4" / "quant.json").read_text())
    assert "lm_head" in record["modules"] and record["tied"] == []
    load_causal_lm(str(Path(tree["out_dir"]) / "student-int4"))
    tree["objective"]["fused"] = True
    tree["out_dir"] = str(tmp_path / "fused")
    with pytest.raises(DistillError, match="not a plain lm_head"):
        _train(tree)
