"""Feature alignment: layer maps, projectors, feature losses, the combined objective."""

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from distill.config import FeatureConfig, ObjectiveConfig, build_config
from distill.data.tasks.tokenizer import chain_tokenizer
from distill.errors import ConfigError
from distill.loss.divergences import divergence
from distill.loss.terms import combine
from distill.loss.token_losses import cross_entropy, feature_loss
from distill.models.loading import load_causal_lm
from distill.models.students import layer_drop_student, save_student
from distill.training.features import FeatureProjectors, Pair, feature_term_sum, layer_pairs, load_projectors
from distill.training.loop import train

from helpers import read_metrics


class ModernKDLoss(nn.Module):
    """The chapter's combined objective, written the chapter's way (nn.functional, mean
    reductions): (1 - alpha) CE + alpha T^2 KL(teacher || student) + beta MSE(proj(h_s), h_t)."""

    def __init__(self, d_student, d_teacher, alpha=0.5, beta=0.1, temperature=2.0):
        super().__init__()
        self.alpha, self.beta, self.t = alpha, beta, temperature
        self.projector = nn.Linear(d_student, d_teacher)

    def forward(self, student_logits, teacher_logits, labels, student_hidden, teacher_hidden):
        v = student_logits.size(-1)
        ce = F.cross_entropy(student_logits.view(-1, v), labels.view(-1))
        kl = F.kl_div(
            F.log_softmax(student_logits.view(-1, v) / self.t, dim=-1),
            F.softmax(teacher_logits.view(-1, v) / self.t, dim=-1),
            reduction="batchmean",
        ) * self.t**2
        feat = F.mse_loss(self.projector(student_hidden), teacher_hidden)
        return (1 - self.alpha) * ce + self.alpha * kl + self.beta * feat


def test_reproduces_the_chapter_modern_kd_loss():
    """batch 4, seq 128, vocab 32000, d_student 1024, d_teacher 4096: same tensors, same
    projector weights, the same loss within 1e-6."""
    torch.manual_seed(0)
    b, t, v, ds, dt = 4, 128, 32000, 1024, 4096
    student_logits, teacher_logits = torch.randn(b, t, v), torch.randn(b, t, v) * 2
    labels = torch.randint(0, v, (b, t))
    h_s, h_t = torch.randn(b, t, ds), torch.randn(b, t, dt)
    reference = ModernKDLoss(ds, dt, alpha=0.5, beta=0.1, temperature=2.0)
    expected = reference(student_logits, teacher_logits, labels, h_s, h_t)

    objective = ObjectiveConfig(alpha=0.5, temperature=2.0)
    fcfg = FeatureConfig(weight=0.1, projector_bias=True)
    projectors = FeatureProjectors([Pair(0, 0, 1.0)], ds, dt, fcfg)
    projectors.projs[0].load_state_dict(reference.projector.state_dict())
    mask = torch.ones(b, t, dtype=torch.bool)
    terms = {
        "task_ce": cross_entropy(student_logits, labels),
        "kd": divergence("forward_kl", student_logits, teacher_logits, mask, objective.temperature),
        "feature": feature_term_sum(projectors, projectors.pairs, "mse", (h_s,), (h_t,), mask),
    }
    ours = (combine(terms, *objective.term_weights()) + fcfg.weight * terms["feature"]) / mask.sum()
    assert abs(ours.item() - expected.item()) < 1e-6, (ours.item(), expected.item())
    # and the gradients reaching the student's states and the projector agree
    h_s.requires_grad_(True)
    g_ref = torch.autograd.grad(reference(student_logits, teacher_logits, labels, h_s, h_t), h_s)[0]
    g_ours = torch.autograd.grad(0.1 * feature_term_sum(projectors, projectors.pairs, "mse", (h_s,), (h_t,), mask) / mask.sum(), h_s)[0]
    torch.testing.assert_close(g_ours, g_ref, atol=1e-9, rtol=1e-5)


@pytest.mark.parametrize("name", ["mse", "cosine", "ln_mse"])
def test_feature_losses_match_torch_and_ignore_masked_tokens(name):
    torch.manual_seed(1)
    s, t = torch.randn(3, 5, 16, dtype=torch.float64), torch.randn(3, 5, 16, dtype=torch.float64)
    mask = torch.rand(3, 5) > 0.3
    if name == "mse":
        expected = F.mse_loss(s[mask], t[mask], reduction="none").mean(-1).sum()
    elif name == "cosine":
        expected = (1 - F.cosine_similarity(s[mask], t[mask], dim=-1)).sum()
    else:
        ln = nn.LayerNorm(16, elementwise_affine=False, dtype=torch.float64)
        expected = F.mse_loss(ln(s[mask]), ln(t[mask]), reduction="none").mean(-1).sum()
    torch.testing.assert_close(feature_loss(name, s, t, mask), expected)
    # garbage (even NaN) at masked positions changes nothing, value or gradient
    s2 = s.clone().masked_fill(~mask.unsqueeze(-1), float("nan")).requires_grad_(True)
    value = feature_loss(name, s2, t, mask)
    value.backward()
    torch.testing.assert_close(value, expected)
    assert torch.isfinite(s2.grad).all() and (s2.grad[~mask] == 0).all()


def test_feature_loss_names_shape_mismatch():
    with pytest.raises(ValueError, match=r"student \(2, 3, 4\), teacher \(2, 3, 5\)"):
        feature_loss("mse", torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), torch.ones(2, 3, dtype=torch.bool))


def test_uniform_map_follows_the_formula():
    pairs = layer_pairs(FeatureConfig(weight=1.0), 10, 30)
    assert [(p.student, p.teacher) for p in pairs] == [(i + 1, 3 * (i + 1)) for i in range(10)]
    # student layer i <-> teacher layer round((i + 1) * L_t / L_s) - 1, halves rounded up
    pairs = layer_pairs(FeatureConfig(weight=1.0), 4, 6)
    assert [p.teacher - 1 for p in pairs] == [1, 2, 4, 5]  # 1.5 -> 2, 3, 4.5 -> 5, 6
    assert [p.teacher - 1 for p in layer_pairs(FeatureConfig(weight=1.0), 2, 3)] == [1, 2]
    assert layer_pairs(FeatureConfig(weight=1.0, layers="last"), 2, 5) == [Pair(2, 5, 1.0)]
    with_emb = layer_pairs(FeatureConfig(weight=1.0, layers="last", embeddings=True), 2, 5)
    assert with_emb == [Pair(0, 0, 1.0), Pair(2, 5, 1.0)]


def test_explicit_pairs_and_their_weights():
    fcfg = FeatureConfig(weight=1.0, layers=[{"student": 0, "teacher": 3, "weight": 2.0}, {"student": "embeddings", "teacher": "embeddings"}])
    assert layer_pairs(fcfg, 2, 4) == [Pair(1, 4, 2.0), Pair(0, 0, 1.0)]
    # the term is the weight-normalised mean of the pair losses
    torch.manual_seed(0)
    states_s = tuple(torch.randn(2, 3, 4) for _ in range(3))
    states_t = tuple(torch.randn(2, 3, 6) for _ in range(5))
    proj = FeatureProjectors(layer_pairs(fcfg, 2, 4), 4, 6, fcfg)
    mask = torch.ones(2, 3, dtype=torch.bool)
    each = [feature_loss("mse", proj.projs[k](states_s[p.student]), states_t[p.teacher], mask) for k, p in enumerate(proj.pairs)]
    torch.testing.assert_close(feature_term_sum(proj, proj.pairs, "mse", states_s, states_t, mask), (2 * each[0] + each[1]) / 3)


@pytest.mark.parametrize(
    "layers, message",
    [
        ([{"student": 2, "teacher": 0}], r"features.layers\[0\].student: student layer 2 does not exist; the student has layers 0..1"),
        ([{"student": 0, "teacher": 1}, {"student": 1, "teacher": -1}], r"features.layers\[1\].teacher: teacher layer -1 does not exist; the teacher has layers 0..1"),
    ],
)
def test_a_map_naming_a_missing_layer_is_a_config_error(tiny_tree, layers, message):
    tiny_tree["features"] = {"weight": 1.0, "layers": layers}
    with pytest.raises(ConfigError, match=message):
        train(build_config(tiny_tree), show_progress=False)
    assert not Path(tiny_tree["out_dir"]).exists()  # nothing written


def test_feature_config_needs_a_live_teacher(tiny_tree):
    tree = copy.deepcopy(tiny_tree)
    tree["features"] = {"weight": 1.0}
    del tree["teacher"]
    tree["objective"]["alpha"] = 0.0
    with pytest.raises(ConfigError, match="features.weight > 0 aligns hidden states with a teacher"):
        build_config(tree)
    tree = copy.deepcopy(tiny_tree)
    tree["features"] = {"weight": 1.0}
    tree["teacher_cache"] = "somewhere"
    with pytest.raises(ConfigError, match="a teacher_cache holds logits only"):
        build_config(tree)


@pytest.mark.parametrize("projector", ["linear", "mlp"])
def test_feature_run_trains_projectors_and_exports_them_apart(tiny_tree, projector):
    tiny_tree["features"] = {"weight": 1.0, "projector": projector, "mlp_hidden": 24, "loss": "ln_mse"}
    tiny_tree["objective"]["alpha"] = 0.0  # CE + feature only: the feature term must fall
    tiny_tree["train"].update(steps=25, lr=1e-2)
    summary = train(build_config(tiny_tree), show_progress=False)
    run = Path(tiny_tree["out_dir"])
    metrics = read_metrics(run)
    assert metrics[-1]["feature"] < 0.7 * metrics[0]["feature"]
    assert all(m["loss"] == pytest.approx(m["task_ce"] + m["feature"], rel=1e-5) for m in metrics)
    assert summary["feature_pairs"] == 2 and summary["projector_params"] > 0
    # exported apart from the student, and reloadable with the trained weights
    student = load_file(str(run / "student" / "model.safetensors"))
    assert student and not any(k.startswith("projs.") for k in student)
    projectors = load_projectors(run)
    saved = load_file(str(run / "projectors" / "projectors.safetensors"))
    for k, v in projectors.state_dict().items():
        torch.testing.assert_close(v, saved[k])
    ckpt = load_file(str(run / "checkpoints" / "step-000025" / "model_1.safetensors"))
    for k, v in saved.items():
        torch.testing.assert_close(ckpt[k], v)


def test_fused_and_naive_paths_agree_with_features(tiny_tree, tmp_path):
    tiny_tree["features"] = {"weight": 0.5, "embeddings": True}
    a, b = copy.deepcopy(tiny_tree), copy.deepcopy(tiny_tree)
    a["out_dir"], b["out_dir"] = str(tmp_path / "naive"), str(tmp_path / "fused")
    a["objective"]["fused"], b["objective"]["fused"] = False, True
    train(build_config(a), show_progress=False)
    train(build_config(b), show_progress=False)
    for x, y in zip(read_metrics(a["out_dir"]), read_metrics(b["out_dir"])):
        for k in ("loss", "task_ce", "kd", "feature"):
            assert y[k] == pytest.approx(x[k], abs=1e-5, rel=1e-5)
    pa, pb = load_projectors(a["out_dir"]), load_projectors(b["out_dir"])
    for (k, va), vb in zip(pa.state_dict().items(), pb.state_dict().values()):
        torch.testing.assert_close(vb, va, atol=1e-5, rtol=1e-4)


def test_accumulation_invariance_with_features(tiny_tree, tmp_path):
    tiny_tree["features"] = {"weight": 0.5, "loss": "cosine"}
    a, b = copy.deepcopy(tiny_tree), copy.deepcopy(tiny_tree)
    a["out_dir"], b["out_dir"] = str(tmp_path / "a"), str(tmp_path / "b")
    a["train"].update(micro_batch_size=1, grad_accum=8)
    b["train"].update(micro_batch_size=8, grad_accum=1)
    train(build_config(a), show_progress=False)
    train(build_config(b), show_progress=False)
    for x, y in zip(read_metrics(a["out_dir"]), read_metrics(b["out_dir"])):
        assert y["feature"] == pytest.approx(x["feature"], abs=1e-5, rel=0)
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-5, rel=0)


def test_first_token_is_left_out_of_the_feature_term_unless_asked(tiny_tree, tmp_path):
    """Completion-only rows put position 0 under a target; attention-sink states stay out."""
    rows = "".join('{"text": "Q:%d+%d=%d"}\n' % (i, i, (2 * i) % 10) for i in range(16))
    (tmp_path / "rows.jsonl").write_text(rows)
    tiny_tree["data"] = {"source": str(tmp_path / "rows.jsonl")}
    tiny_tree["train"]["steps"] = 1
    runs = {}
    for skip in (True, False):
        tree = copy.deepcopy(tiny_tree)
        tree["features"] = {"weight": 1.0, "skip_first_token": skip}
        tree["out_dir"] = str(tmp_path / f"skip-{skip}")
        train(build_config(tree), show_progress=False)
        runs[skip] = read_metrics(tree["out_dir"])[0]
    assert runs[True]["task_ce"] == runs[False]["task_ce"]  # the same batch and models
    assert runs[True]["feature"] != pytest.approx(runs[False]["feature"], rel=1e-3)


def test_kept_map_pairs_a_layer_drop_student_with_its_source_layers(tiny_tree, tmp_path):
    tok = chain_tokenizer()
    torch.manual_seed(0)
    deep = {**tiny_tree["teacher"]["config"], "num_hidden_layers": 5, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id}
    teacher = load_causal_lm(config=deep)
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    save_student(layer_drop_student(teacher, [1, 4]), tok, tmp_path / "student", {"kept_layers": [1, 4]})
    tiny_tree["teacher"] = {"name": str(tmp_path / "teacher")}
    tiny_tree["student"] = {"name": str(tmp_path / "student")}
    tiny_tree["features"] = {"weight": 1.0, "layers": "kept"}
    train(build_config(tiny_tree), show_progress=False)
    record = json.loads((Path(tiny_tree["out_dir"]) / "alignment.jsonl").read_text().splitlines()[0])
    assert [(p["student_layer"], p["teacher_layer"]) for p in record["pairs"]] == [(0, 1), (1, 4)]
    # a student without a student.json is refused, naming the key
    tiny_tree["student"] = {"name": str(tmp_path / "teacher")}
    tiny_tree["out_dir"] = str(tmp_path / "other")
    with pytest.raises(ConfigError, match="features.layers=kept needs a layer-drop student"):
        train(build_config(tiny_tree), show_progress=False)
